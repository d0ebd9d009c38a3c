"""Model folders that timm loads: config.json + model.safetensors in timm's keys."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support import random_unicom_vit

import unicom
from unicom.errors import InputError
from unicom.models import export
from unicom.models.registry import clip_preprocess
from unicom.models.unicom_vit import ViTSettings
from unicom.models.vit import ClipViT, ClipViTSettings, create_model

SMALL = ClipViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=2, embedding_dim=24)


def clip_vit(settings: ClipViTSettings = SMALL, seed: int = 0) -> ClipViT:
    torch.manual_seed(seed)
    model = ClipViT(settings).eval()
    with torch.no_grad():  # timm starts some tensors at zero; random values exercise every weight
        for tensor in model.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape))
    return model


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_timm_builds_a_clip_vit_folder_and_gives_the_same_embeddings(tmp_path, act):
    settings = ClipViTSettings(**{**SMALL.to_dict(), "act": act})
    model = clip_vit(settings)
    export.save_model(tmp_path / "m", model, "clip_vit", settings, clip_preprocess(32))
    by_timm = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    ours, _ = unicom.load(str(tmp_path / "m"))
    x = images()
    with torch.no_grad():
        expected = model(x)
        assert (by_timm(x) - expected).abs().max() <= 1e-6
        assert (ours(x) - expected).abs().max() <= 1e-6


def test_the_folder_holds_the_weights_once_in_timms_keys(tmp_path):
    model = clip_vit()
    export.save_model(tmp_path / "m", model, "clip_vit", SMALL, clip_preprocess(32))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "unicom_model.json"]
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    reference = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=False)
    assert stored.keys() == reference.state_dict().keys()
    assert not stored["head.bias"].any()
    assert json.loads((tmp_path / "m" / "unicom_model.json").read_text())["weights_layout"] == "timm"
    read = export.read_weights(tmp_path / "m")  # the module's own keys again
    assert read.keys() == model.state_dict().keys() and all(torch.equal(read[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("preprocess", [
    clip_preprocess(32),
    {**clip_preprocess(32), "resize_size": 37, "interpolation": "bilinear"},
    {"size": 32, "resize_mode": "squash", "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]},
    {"size": 32, "resize_mode": "squash", "resize_size": 39, "interpolation": "bilinear", "mean": [0.5] * 3,
     "std": [0.5] * 3},
])
def test_timm_preprocesses_like_the_folder(tmp_path, preprocess):
    export.save_model(tmp_path / "m", clip_vit(), "clip_vit", SMALL, preprocess)
    model = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=False)
    by_timm = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    _, ours = unicom.load(str(tmp_path / "m"))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
    np.testing.assert_allclose(by_timm(image).numpy(), ours(image).numpy(), rtol=0, atol=1e-6)


def test_crop_fraction_gives_timm_the_exact_resize_size():
    for size in range(8, 400, 7):
        for resize in range(size, 2 * size, 3):
            crop_pct = export.timm_data_config({**clip_preprocess(size), "resize_size": resize})["crop_pct"]
            assert math.floor(size / crop_pct) == resize, (size, resize)


def test_folders_written_in_the_module_layout_still_load(tmp_path):
    model = clip_vit(seed=2)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "unicom_model.json").write_text(json.dumps({
        "format": "unicom-model", "format_version": 1, "architecture": "clip_vit", "settings": SMALL.to_dict(),
        "embedding_dim": 24, "preprocess": clip_preprocess(32), "provenance": {},
    }))
    loaded, _ = unicom.load(str(folder))
    created = create_model(init=str(folder))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(created.module.eval()(x), model(x), rtol=0, atol=1e-6)


def test_training_starts_from_a_timm_layout_folder_with_the_same_weights(tmp_path):
    model = clip_vit(seed=3)
    export.save_model(tmp_path / "m", model, "clip_vit", SMALL, clip_preprocess(32))
    created = create_model(init=str(tmp_path / "m"))
    assert created.architecture == "clip_vit" and created.reinitialised == []
    assert all(torch.equal(created.module.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_head_bias_the_architecture_cannot_hold_is_refused(tmp_path):
    export.save_model(tmp_path / "m", clip_vit(), "clip_vit", SMALL, clip_preprocess(32))
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    stored["head.bias"] = torch.ones_like(stored["head.bias"])
    save_file(stored, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(InputError, match="model.safetensors: head.bias is not zero"):
        unicom.load(str(tmp_path / "m"))


def test_architectures_timm_cannot_build_carry_no_timm_config(tmp_path):
    tiny = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=128, embedding_dim=16)
    export.save_model(tmp_path / "m", clip_vit(), "clip_vit", SMALL, clip_preprocess(32))
    export.save_model(tmp_path / "m", random_unicom_vit(tiny), "unicom_vit", tiny, clip_preprocess(32))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "unicom_model.json"]
    assert json.loads((tmp_path / "m" / "unicom_model.json").read_text())["format_version"] == 1
