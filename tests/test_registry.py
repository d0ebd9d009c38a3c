"""The model registry: one table of names read by unicom.load, load_encoder and create_model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from support import random_unicom_vit

import unicom
from unicom.errors import InputError
from unicom.models import registry
from unicom.models.encoders import load_encoder
from unicom.models.registry import MODELS, register_model
from unicom.models.unicom_vit import ViTSettings
from unicom.models.vit import create_model, model_names

TINY = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=128, embedding_dim=16)


@pytest.fixture
def forget_models():
    """Names registered by the test are removed afterwards."""
    before = set(MODELS)
    yield
    for name in set(MODELS) - before:
        del MODELS[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_entry_records_every_setting_of_its_architecture(name):
    cfg = MODELS[name]
    with torch.device("meta"):
        module = registry.get_architecture(cfg.architecture).build(cfg.settings)
    assert module.settings.to_dict() == cfg.settings  # nothing left to the builder's defaults
    assert cfg.preprocess == registry.clip_preprocess(cfg.settings["image_size"])


def test_one_call_registers_a_size_that_create_model_builds(forget_models):
    register_model("ViT-T-16", "clip_vit", {"image_size": 32, "patch_size": 16, "width": 64, "depth": 1, "heads": 1, "embedding_dim": 8})
    assert MODELS["ViT-T-16"].settings == {"image_size": 32, "patch_size": 16, "width": 64, "depth": 1, "heads": 1,
                                           "mlp_ratio": 4.0, "embedding_dim": 8, "act": "gelu", "in_chans": 3}
    assert "ViT-T-16" in model_names() and "ViT-T-16" not in unicom.available_models()  # no weights to load
    created = create_model("ViT-T-16")
    assert created.architecture == "clip_vit" and created.module(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_a_registered_preprocessing_travels_with_the_name_into_training(forget_models):
    squash = {"size": 32, "resize_mode": "squash", "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    register_model("ViT-T-16", "clip_vit", {"image_size": 32, "patch_size": 16, "width": 64, "depth": 1, "heads": 1}, squash)
    assert create_model("ViT-T-16").preprocess() == squash  # what unicom train exports with the model
    assert create_model("ViT-T-16", overrides={"image_size": 48}).preprocess() == registry.clip_preprocess(48)


def test_one_call_registers_weights_that_every_way_in_loads(forget_models, tmp_path, monkeypatch):
    model = random_unicom_vit(TINY, seed=4)
    path = tmp_path / "served" / "FP16-ViT-tiny.pt"
    path.parent.mkdir()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UNICOM_BASE_URL", raising=False)
    register_model("tiny", "unicom_vit", TINY, url=path.as_uri(), sha256=sha256)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded, transform = unicom.load("tiny")
    created = create_model(init="tiny")
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_encoder("tiny").encode_image(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(created.module.eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert "tiny" in unicom.available_models() and created.init_kind == "released"
    assert (tmp_path / "cache" / path.name).is_file()


def test_settings_are_checked_before_a_name_is_added(forget_models):
    with pytest.raises(InputError, match="image_size 40 is not a multiple of patch_size 16"):
        register_model("odd", "unicom_vit", {**TINY.to_dict(), "image_size": 40})
    assert "odd" not in MODELS


def test_weights_need_their_checksum(forget_models):
    with pytest.raises(InputError, match="give both url and sha256"):
        register_model("unverified", "unicom_vit", TINY, url="https://example.org/w.pt")


def test_a_taken_name_is_not_replaced_silently(forget_models):
    with pytest.raises(ValueError, match="'ViT-B/32' is already registered"):
        register_model("ViT-B/32", "unicom_vit", TINY)
    assert MODELS["ViT-B/32"].settings["width"] == 768


def test_a_size_without_weights_is_not_loadable_and_says_which_are(forget_models):
    with pytest.raises(InputError, match="ViT-L-14 is a clip_vit size without released weights.*ViT-B/32, ViT-B/16"):
        unicom.load("ViT-L-14")


@pytest.mark.parametrize("spec", ["ViT-B-32", "timm/vit_base_patch16_224", "local-dir:clip"])
def test_an_open_clip_or_timm_name_given_to_load_points_to_load_encoder(spec):
    """unicom.load takes this project's models only; the names `unicom embed --model` also
    takes from open_clip and timm are load_encoder's, and the error says so."""
    with pytest.raises(InputError, match=r"load with unicom\.load_encoder\(name, pretrained=\.\.\.\)"):
        unicom.load(spec)


def test_a_damaged_file_given_to_load_is_said_to_be_damaged_without_pointing_elsewhere(tmp_path):
    """A file named without a checkpoint suffix is still a file: its error is its own, not
    a hint that it might be an open_clip or timm name."""
    weights = tmp_path / "weights"
    weights.write_bytes(b"junk\n")
    with pytest.raises(InputError) as error:
        unicom.load(str(weights))
    assert str(error.value).startswith(f"{weights}: not a readable PyTorch checkpoint")
    assert "load_encoder" not in str(error.value)


@pytest.mark.parametrize("spec, meant", [("vit-b/32", "ViT-B/32"), ("ViT-L/14@336", "ViT-L/14@336px"), ("ViT-B/61", "ViT-B/16")])
def test_a_misspelt_released_name_is_answered_with_the_closest_one(spec, meant):
    with pytest.raises(InputError, match=f"{spec}: neither a released model \\(did you mean {meant}\\?\\)"):
        unicom.load(spec)


def test_a_released_name_is_not_offered_for_an_unrelated_path():
    with pytest.raises(InputError) as error:
        unicom.load("/no/such/checkpoint.pt")
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize("module", ["'unicom.unifex.model'", "None"], ids=["named-module", "entry-point"])
def test_the_unifex_architecture_registers_itself_on_first_use(module):
    # a folder names the module that registers its architecture; folders written before
    # `architecture_module` existed do not, and the package's entry point declares it
    code = (
        "import sys; from unicom.models import registry; "
        "assert 'unifex' not in registry.ARCHITECTURES and 'unicom.unifex.model' not in sys.modules; "
        f"found = registry.get_architecture('unifex', {module}); "
        "print(found.module, found.builder.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["unicom.unifex.model", "build_unifex"]


def test_a_module_outside_the_package_is_not_imported_on_a_files_word(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "unicom_model.json").write_text(json.dumps({
        "format": "unicom-model", "format_version": 1, "architecture": "mystery", "architecture_module": "json.tool",
        "settings": {}, "embedding_dim": 2, "preprocess": registry.clip_preprocess(32),
    }))
    sys.modules.pop("json.tool", None)
    with pytest.raises(InputError, match="unknown architecture 'mystery'.*defined in 'json.tool': import that module first"):
        unicom.load(str(folder))
    assert "json.tool" not in sys.modules


def test_a_folder_that_names_no_module_says_how_to_register_its_architecture(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "unicom_model.json").write_text(json.dumps({
        "format": "unicom-model", "format_version": 1, "architecture": "mystery",
        "settings": {}, "embedding_dim": 2, "preprocess": registry.clip_preprocess(32),
    }))
    with pytest.raises(InputError, match="unknown architecture 'mystery'.*import that module first, or add \"architecture_module\""):
        unicom.load(str(folder))
