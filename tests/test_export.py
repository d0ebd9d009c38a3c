"""The project's model folder: unicom_model.json + model.safetensors, architectures as data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support import random_unicom_vit
from torch import nn

from unicom.errors import InputError
from unicom.models import export, registry
from unicom.models.encoders import load_encoder
from unicom.models.registry import clip_preprocess
from unicom.models.unicom_vit import ViTSettings

TINY = ViTSettings(image_size=32, patch_size=16, width=64, depth=2, heads=1, mlp_dim=256, embedding_dim=24)


class MeanColour(nn.Module):
    """A toy architecture: mean RGB -> Linear -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embedding_dim = dim
        self.proj = nn.Linear(3, dim)

    def forward(self, images):
        return self.proj(images.mean(dim=(2, 3)))


def build_mean_colour(settings):
    return MeanColour(settings["dim"])


@pytest.fixture
def toy_architecture(monkeypatch):
    monkeypatch.setitem(registry.ARCHITECTURES, "mean_colour", registry.Architecture("mean_colour", build_mean_colour))


SQUASH = {"size": 4, "resize_mode": "squash", "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def test_saved_model_loads_back_with_the_same_outputs_and_transform(tmp_path):
    model = random_unicom_vit(TINY, seed=5)
    export.save_model(tmp_path / "m", model, "unicom_vit", TINY, clip_preprocess(32), provenance={"run": "test"})
    loaded, transform = export.load_model(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not loaded.training
    assert transform(Image.new("RGB", (40, 36))).shape == (3, 32, 32)


def test_a_model_folder_gets_the_mode_a_plain_write_gives(tmp_path, toy_architecture):
    """safetensors' save_file replaces the file it writes by one of mode 0o600: the weights
    would be unreadable by the other users of a shared folder (a server run as another user)."""
    import os

    previous = os.umask(0o022)
    try:
        folder = export.save_model(tmp_path / "toy", MeanColour(5), "mean_colour", {"dim": 5}, SQUASH)
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "model.safetensors": 0o644, "unicom_model.json": 0o644}


def test_config_records_architecture_settings_preprocessing_and_provenance(tmp_path):
    export.save_model(tmp_path / "m", random_unicom_vit(TINY), "unicom_vit", TINY, clip_preprocess(32), provenance={"run": "r1"})
    config = json.loads((tmp_path / "m" / "unicom_model.json").read_text())
    assert config["format"] == "unicom-model" and config["format_version"] == 1
    assert config["architecture"] == "unicom_vit" and config["architecture_module"] == "unicom.models.unicom_vit"
    assert config["settings"] == {"image_size": 32, "patch_size": 16, "width": 64, "depth": 2, "heads": 1, "mlp_dim": 256, "embedding_dim": 24, "in_chans": 3}
    assert config["embedding_dim"] == 24
    assert config["preprocess"] == clip_preprocess(32)
    assert config["provenance"]["run"] == "r1" and "created" in config["provenance"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "unicom_model.json"]


def test_tensors_are_stored_as_given_and_loaded_as_float32(tmp_path):
    state = {k: v.half() for k, v in random_unicom_vit(TINY).state_dict().items()}
    export.save_model(tmp_path / "m", state, "unicom_vit", TINY.to_dict(), clip_preprocess(32))
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored.keys() == state.keys() and all(torch.equal(stored[k], state[k]) and stored[k].dtype == state[k].dtype for k in state)
    loaded, _ = export.load_model(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_weights_that_do_not_fit_the_settings_are_refused_before_writing(tmp_path):
    model = random_unicom_vit(TINY)
    with pytest.raises(InputError, match=r"wrong shapes: pos_embed \(1, 4, 64\) \(expected \(1, 16, 64\)\)"):
        export.save_model(tmp_path / "m", model, "unicom_vit", {**TINY.to_dict(), "image_size": 64}, clip_preprocess(64))
    assert not (tmp_path / "m").exists()


def test_a_registered_architecture_round_trips(tmp_path, toy_architecture):
    model = MeanColour(5)
    export.save_model(tmp_path / "toy", model, "mean_colour", {"dim": 5}, SQUASH)
    encoder = load_encoder(str(tmp_path / "toy"))
    assert encoder.embedding_dim == 5
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(x), model(x), rtol=1e-5, atol=1e-5)


def test_architectures_can_be_named_as_module_and_function(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.ARCHITECTURES, "toy_by_name", registry.Architecture("toy_by_name", f"{__name__}:build_mean_colour"))
    export.save_model(tmp_path / "toy", MeanColour(2), "toy_by_name", {"dim": 2}, SQUASH)
    model, _ = export.load_model(tmp_path / "toy")
    assert isinstance(model, MeanColour)


def test_unknown_architecture_lists_the_known_ones(tmp_path):
    with pytest.raises(InputError, match=r"unknown architecture 'vit_giant'; known: \[.*'unicom_vit'"):
        export.save_model(tmp_path / "m", MeanColour(2), "vit_giant", {}, SQUASH)


def test_register_architecture_refuses_to_replace_silently(toy_architecture):
    with pytest.raises(ValueError, match="already registered"):
        registry.register_architecture("mean_colour", MeanColour)
    registry.register_architecture("mean_colour", MeanColour, overwrite=True)
    assert registry.ARCHITECTURES["mean_colour"].builder is MeanColour


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(InputError, match="no unicom_model.json"):
        export.load_model(tmp_path / "m")


def test_newer_format_version_asks_for_an_upgrade(tmp_path, toy_architecture):
    export.save_model(tmp_path / "toy", MeanColour(2), "mean_colour", {"dim": 2}, SQUASH)
    path = tmp_path / "toy" / "unicom_model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": export.FORMAT_VERSION + 1}))
    with pytest.raises(InputError, match=f"format_version {export.FORMAT_VERSION + 1} is not supported.*upgrade unicom"):
        export.load_model(tmp_path / "toy")


def test_a_setting_this_unicom_does_not_know_is_refused_naming_the_folders_json(tmp_path):
    export.save_model(tmp_path / "m", random_unicom_vit(TINY), "unicom_vit", TINY, clip_preprocess(32))
    _edit_config(tmp_path / "m", settings={"register_tokens": 4})
    with pytest.raises(InputError) as error:
        export.load_model(tmp_path / "m")
    assert str(error.value).startswith(f"{tmp_path / 'm' / 'unicom_model.json'} 'settings': unknown ViT setting(s) ['register_tokens']")


def test_bad_preprocess_names_the_field(tmp_path, toy_architecture):
    with pytest.raises(InputError, match=r"resize_mode='crop'"):
        export.save_model(tmp_path / "toy", MeanColour(2), "mean_colour", {"dim": 2}, {**SQUASH, "resize_mode": "crop"})
    assert not (tmp_path / "toy").exists()


def test_squash_preprocessing_resizes_both_sides():
    pixels = np.random.default_rng(2).integers(0, 256, (7, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    out = export.build_transform(SQUASH)(image)
    expected = (np.asarray(image.resize((4, 4), Image.BILINEAR), dtype=np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_squash_preprocessing_with_a_resize_size_resizes_both_sides_then_crops_the_centre():
    """ALIGN's preprocessing: both sides to 9 (its 346), then the centre 4 (its 289)."""
    pixels = np.random.default_rng(3).integers(0, 256, (7, 12, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    out = export.build_transform({**SQUASH, "resize_size": 9})(image)
    resized = np.asarray(image.resize((9, 9), Image.BILINEAR), dtype=np.float32)[2:6, 2:6]  # torchvision's centre
    np.testing.assert_allclose(out.numpy(), ((resized / 255 - 0.5) / 0.5).transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_exported_folder_loads_through_unicom_load(tmp_path):
    import unicom

    model = random_unicom_vit(TINY, seed=7)
    export.save_model(tmp_path / "m", model, "unicom_vit", TINY, clip_preprocess(32))
    loaded, _ = unicom.load(str(tmp_path / "m"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def _edit_config(folder, **changes):
    path = folder / export.CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


def test_a_recorded_embedding_dim_the_network_does_not_give_is_refused_naming_both(tmp_path):
    """The recorded size is what an encoder reports (an index, a search compare against it):
    a folder whose json says 512 while its weights give 24 dimensions is another model."""
    export.save_model(tmp_path / "m", random_unicom_vit(TINY), "unicom_vit", TINY, clip_preprocess(32))
    path = _edit_config(tmp_path / "m", embedding_dim=512)
    with pytest.raises(InputError) as error:
        load_encoder(str(tmp_path / "m"))
    assert str(error.value).startswith(f"{path}: records embedding_dim 512, but its network (unicom_vit ")
    assert "gives 24-dimensional embeddings; set \"embedding_dim\": 24 in the file" in str(error.value)
    _edit_config(tmp_path / "m", embedding_dim=24)
    assert load_encoder(str(tmp_path / "m")).embedding_dim == 24


@pytest.mark.parametrize("arch", ["unicom_vit", "clip_vit"])
def test_a_preprocess_size_the_network_does_not_take_is_refused_on_load(tmp_path, arch):
    """It was an error at the first batch, telling the user to use the transform returned
    with the model, which was the one at fault."""
    from unicom.models.vit import ClipViT, ClipViTSettings

    settings = TINY if arch == "unicom_vit" else ClipViTSettings(image_size=32, patch_size=16, width=64, depth=1,
                                                                 heads=1, embedding_dim=24)
    model = random_unicom_vit(TINY) if arch == "unicom_vit" else ClipViT(settings)
    export.save_model(tmp_path / "m", model, arch, settings, clip_preprocess(32))
    path = _edit_config(tmp_path / "m", preprocess={"size": 48})
    with pytest.raises(InputError) as error:
        export.load_model(tmp_path / "m")
    assert str(error.value) == (
        f"{path}: its preprocess gives 48x48 images, but its network ({arch}) is built for settings.image_size 32 and "
        "does not take them; set the preprocess's \"size\" to 32 (a resize_size above it keeps a centre crop)")
    _edit_config(tmp_path / "m", preprocess={"size": 32, "resize_size": 40})
    _, transform = export.load_model(tmp_path / "m")
    assert transform(Image.new("RGB", (50, 60))).shape == (3, 32, 32)


def test_a_model_folder_is_not_written_to_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="gs://bucket/m: a model folder is written to a local path, not to a URL"):
        export.save_model("gs://bucket/m", random_unicom_vit(TINY), "unicom_vit", TINY, clip_preprocess(32))
    assert list(tmp_path.iterdir()) == []


def test_a_config_json_of_the_folder_that_describes_no_weights_is_kept(tmp_path):
    """timm's config.json beside model.safetensors describes those weights and goes with them;
    one in a folder without a model (a run's own settings) is not this writer's to remove."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"lr": 0.1}')
    export.save_model(tmp_path / "run", random_unicom_vit(TINY), "unicom_vit", TINY, clip_preprocess(32))
    assert (tmp_path / "run" / "config.json").read_text() == '{"lr": 0.1}'
    assert export.read_config(tmp_path / "run")["architecture"] == "unicom_vit"


class CheckedColour(MeanColour):
    """A toy architecture that checks its pixels' values, built for an image size."""

    def forward(self, images):
        if not torch.isfinite(images).all():
            raise ValueError("non-finite pixels")
        return super().forward(images)


def test_a_network_that_reads_its_pixels_is_not_refused_for_a_size_the_meta_device_cannot_try(tmp_path, monkeypatch):
    """The size probe runs the network on the meta device, which has no values: a forward that
    checks them fails there for any size, and was reported as refusing the preprocess size."""
    monkeypatch.setitem(registry.ARCHITECTURES, "checked_colour",
                        registry.Architecture("checked_colour", lambda settings: CheckedColour(settings["dim"])))
    model = CheckedColour(3)
    export.save_model(tmp_path / "toy", model, "checked_colour", {"dim": 3, "image_size": 4}, {**SQUASH, "size": 8})
    loaded, transform = export.load_model(tmp_path / "toy")
    x = transform(Image.new("RGB", (10, 12), (200, 30, 90)))[None]
    assert x.shape == (1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
