"""Loading released Unicom checkpoints: architecture, strict keys, safe reading, preprocessing."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import random_unicom_vit

import unicom
from unicom.errors import InputError
from unicom.models.encoders import Encoder, load_encoder
from unicom.models.export import build_transform
from unicom.models.registry import MODELS, available_models, clip_preprocess
from unicom.models.unicom_vit import UnicomViT, ViTSettings, infer_settings
from unicom.models.weights import read_state_dict

# 48 px, patch 16 -> 9 tokens of width 128 (two 64-d heads), 2 blocks, 32-d embeddings
TINY = ViTSettings(image_size=48, patch_size=16, width=128, depth=2, heads=2, mlp_dim=512, embedding_dim=32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def released_settings(name: str) -> ViTSettings:
    return ViTSettings.from_dict(MODELS[name].settings)


def image_transform(n_px: int):
    return build_transform(clip_preprocess(n_px))


@pytest.fixture
def model():
    return random_unicom_vit(TINY, seed=1)


@pytest.fixture
def checkpoint(tmp_path, model):
    """The tiny model saved like a released file: float16 tensors under the official keys."""
    path = tmp_path / "FP16-ViT-tiny.pt"
    torch.save({key: value.half() for key, value in model.state_dict().items()}, path)
    return path


def images(n=3, size=48, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def specified_forward(state: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The released architecture written out in tensor operations, from its description."""
    s = {key: value.float() for key, value in state.items()}
    width, _, patch, _ = s["patch_embed.proj.weight"].shape
    h = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + s["pos_embed"]  # (B, N, width), no class token
    batch, tokens, _ = h.shape
    depth = len({key.split(".")[1] for key in s if key.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (width,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
        q, k, v = (y @ s[p + "attn.qkv.weight"].T).split(width, dim=-1)
        q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
        h = h + attended @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        y = F.layer_norm(h, (width,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
        hidden = (y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]).clamp(0, 6)
        h = h + hidden @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    h = F.layer_norm(h, (width,), s["norm.weight"], s["norm.bias"], eps=1e-5)
    z = h.reshape(batch, tokens * width)
    for linear, bn in (("feature.0", "feature.1"), ("feature.2", "feature.3")):
        z = z @ s[f"{linear}.weight"].T
        z = (z - s[f"{bn}.running_mean"]) / torch.sqrt(s[f"{bn}.running_var"] + 2e-5) * s[f"{bn}.weight"] + s[f"{bn}.bias"]
    return z


def test_available_models_are_the_four_releases():
    assert unicom.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


def test_module_matches_the_written_out_architecture(model):
    x = images()
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(ours, specified_forward(model.state_dict(), x, heads=2), rtol=1e-4, atol=1e-4)
    hidden = model.blocks[0].mlp.fc1(torch.randn(24, 128, generator=torch.Generator().manual_seed(0)))
    assert (hidden > 6).any() and (hidden < 0).any()  # the test exercises both ReLU6 bounds


def test_float16_file_loads_to_the_same_outputs(model, checkpoint):
    loaded, transform = unicom.load(str(checkpoint))
    assert isinstance(loaded, UnicomViT) and not loaded.training
    assert loaded.settings == TINY
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert transform(Image.new("RGB", (60, 50))).shape == (3, 48, 48)


def test_renamed_key_is_named_in_the_error(model, tmp_path):
    state = {key.replace("blocks.1.attn.qkv.weight", "blocks.1.attn.in_proj.weight"): value.half() for key, value in model.state_dict().items()}
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(InputError) as error:
        unicom.load(str(tmp_path / "renamed.pt"))
    assert "missing keys: blocks.1.attn.qkv.weight" in str(error.value)
    assert "unexpected keys: blocks.1.attn.in_proj.weight" in str(error.value)


def test_a_key_needed_to_infer_the_architecture_is_named(model, tmp_path):
    state = {("pos_embedding" if key == "pos_embed" else key): value for key, value in model.state_dict().items()}
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(InputError, match="key 'pos_embed' is missing"):
        unicom.load(str(tmp_path / "renamed.pt"))


def test_a_timm_state_dict_is_named_with_how_to_load_it(tmp_path):
    import timm

    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "test_vit.pth")
    with pytest.raises(InputError, match=r"test_vit.pth: a timm ViT state dict .*--model timm/<name> --pretrained FILE"):
        unicom.load(str(tmp_path / "test_vit.pth"))
    with pytest.raises(InputError, match=r"a timm ViT state dict"):
        load_encoder(str(tmp_path / "test_vit.pth"))


def test_an_open_clip_state_dict_is_named_with_how_to_load_it(tmp_path):
    import open_clip
    from support import TINY_CLIP

    model = open_clip.CLIP(**TINY_CLIP)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "clip.pt")
    with pytest.raises(InputError, match=r"clip.pt: an open_clip CLIP state dict .* --pretrained FILE"):
        unicom.load(str(tmp_path / "clip.pt"), arch="ViT-B/32")


def test_arch_given_with_a_model_folder_or_a_released_name_is_refused_not_ignored(model, tmp_path):
    from unicom.models.export import save_model

    folder = save_model(tmp_path / "folder", model, "unicom_vit", TINY, clip_preprocess(48))
    with pytest.raises(InputError, match=r"folder: arch='ViT-B/32' was given, but .* records its own architecture"):
        unicom.load(str(folder), arch="ViT-B/32")
    with pytest.raises(InputError, match=r"ViT-L/14: arch='ViT-B/32' was given"):
        unicom.load("ViT-L/14", arch="ViT-B/32", download_root=tmp_path / "cache")
    loaded, _ = unicom.load(str(folder))  # without arch the folder's own architecture is used
    torch.testing.assert_close(loaded(images(1)), model.eval()(images(1)), rtol=1e-5, atol=1e-5)


def test_explicit_arch_with_other_sizes_lists_the_wrong_shapes(checkpoint):
    with pytest.raises(InputError) as error:
        unicom.load(str(checkpoint), arch="ViT-B/32")
    message = str(error.value)
    assert "wrong shapes: " in message and "pos_embed (1, 9, 128) (expected (1, 49, 768))" in message
    assert "unexpected keys: " not in message  # depth differs too: blocks 2..11 are missing
    assert "missing keys: blocks.2.norm1.weight" in message


@pytest.mark.parametrize("prefix", ["module.", "model."])
def test_wrapper_prefix_and_absent_batch_counters_are_accepted(model, tmp_path, prefix):
    state = {prefix + key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "wrapped.pt")
    loaded, _ = unicom.load(str(tmp_path / "wrapped.pt"))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_compiled_and_wrapped_compiled_modules_load(model, tmp_path, prefix):
    torch.save({prefix + key: value for key, value in model.state_dict().items()}, tmp_path / "compiled.pt")
    loaded, _ = unicom.load(str(tmp_path / "compiled.pt"))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["state_dict_ema", "model_ema", "ema"])
def test_a_checkpoint_holding_only_its_moving_average_loads_that(model, tmp_path, key):
    torch.save({key: model.state_dict(), "epoch": 3}, tmp_path / "ema.pt")
    loaded, _ = unicom.load(str(tmp_path / "ema.pt"))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys", [("state_dict", "state_dict_ema"), ("model", "model_ema"), ("state_dict", "model_ema")])
def test_the_moving_average_is_preferred_to_the_trained_weights_as_timm_does(model, tmp_path, keys):
    from timm.models import load_state_dict

    trained, average = keys
    halved = {key: value / 2 if value.is_floating_point() else value for key, value in model.state_dict().items()}
    torch.save({trained: model.state_dict(), average: halved, "epoch": 3}, tmp_path / "both.pt")
    loaded = read_state_dict(tmp_path / "both.pt")
    by_timm = load_state_dict(str(tmp_path / "both.pt"), weights_only=True)
    assert sorted(loaded) == sorted(by_timm) == sorted(halved)
    assert all(torch.equal(loaded[key], halved[key]) and torch.equal(by_timm[key], halved[key]) for key in halved)


class _Payload:
    """Unpickling this would create a file: the loader must refuse before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_files_with_python_objects_are_refused_without_running_them(model, tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"state_dict": model.state_dict(), "extra": _Payload(marker)}, tmp_path / "unsafe.pt")
    with pytest.raises(InputError, match="not unpickled for safety"):
        unicom.load(str(tmp_path / "unsafe.pt"))
    assert not marker.exists()


class _Command:
    """Unpickling this would run a shell command (os.system, whose module PyTorch blocks outright)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_a_command_is_refused_as_holding_python_objects_not_as_damaged(model, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": model.state_dict(), "hook": _Command(marker)}, tmp_path / "unsafe.pt")
    with pytest.raises(InputError, match=r"unsafe.pt: holds Python objects besides tensors \((posix|nt)\.system\), "
                                         "which are not unpickled for safety; re-save its weights"):
        unicom.load(str(tmp_path / "unsafe.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("kept", [0, 5000])
def test_a_file_cut_short_says_so_with_its_size(model, tmp_path, kept):
    torch.save(model.state_dict(), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:kept])
    with pytest.raises(InputError, match=f"cut.pt: not a readable PyTorch checkpoint .*its {kept} bytes may be cut short"):
        unicom.load(str(tmp_path / "cut.pt"))


def test_damaged_file_is_reported_as_unreadable(tmp_path):
    (tmp_path / "damaged.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="damaged.pt: not a readable PyTorch checkpoint"):
        unicom.load(str(tmp_path / "damaged.pt"))


def test_unknown_name_lists_the_released_names():
    with pytest.raises(InputError, match="ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px"):
        unicom.load("ViT-H/14")


@pytest.mark.parametrize("name", available_models())
def test_architecture_is_inferred_for_every_released_shape(name):
    with torch.device("meta"):  # shapes only: no memory for up to 900M parameters
        state = UnicomViT(released_settings(name)).state_dict()
    assert infer_settings(state) == released_settings(name)


def test_released_sizes_follow_the_published_description():
    sizes = {}
    for name in available_models():
        s = released_settings(name)
        sizes[name] = (s.width, s.depth, s.heads, s.embedding_dim, s.image_size)
    assert sizes == {
        "ViT-B/32": (768, 12, 12, 512, 224),
        "ViT-B/16": (768, 12, 12, 768, 224),
        "ViT-L/14": (1024, 24, 16, 768, 224),
        "ViT-L/14@336px": (1024, 24, 16, 768, 336),
    }


def test_images_of_another_size_are_refused_with_the_expected_size(model):
    with pytest.raises(ValueError, match="expects 48x48 images"):
        model(images(size=64))


def _expected(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Bicubic resize with PIL, crop, RGB, /255, CLIP mean/std, channels first."""
    pixels = np.asarray(image.resize(size, Image.BICUBIC).crop(box).convert("RGB"), dtype=np.float32) / 255
    return ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "width, height, size, box",
    [
        # landscape 9x5 -> short side 5 to 4, long side int(4 * 9 / 5) = 7; crop 4 columns
        # starting at round((7 - 4) / 2) = round(1.5) = 2 (round half to even)
        (9, 5, (7, 4), (2, 0, 6, 4)),
        # portrait 5x8 -> (4, int(4 * 8 / 5) = 6); crop rows from round((6 - 4) / 2) = 1
        (5, 8, (4, 6), (0, 1, 4, 5)),
    ],
)
def test_transform_resizes_short_side_bicubic_crops_centre_and_normalises(width, height, size, box):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    out = image_transform(4)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 4)
    np.testing.assert_allclose(out.numpy(), _expected(image, size, box), rtol=0, atol=1e-6)


def test_transform_turns_grey_images_into_three_equal_channels():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 6), dtype=np.uint8), "L")
    out = image_transform(4)(image)
    np.testing.assert_allclose(out.numpy(), _expected(image, (4, 4), (0, 0, 4, 4)), rtol=0, atol=1e-6)


def test_released_file_is_an_encoder(model, checkpoint):
    encoder = load_encoder(str(checkpoint))
    assert isinstance(encoder, Encoder) and encoder.embedding_dim == 32 and not encoder.has_text
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(x), model(x), rtol=1e-5, atol=1e-5)
    assert encoder.image_transform(Image.new("RGB", (48, 48))).shape == (3, 48, 48)


@pytest.mark.parametrize("name", ["model_best.pth.tar", "last.ckpt"])
def test_checkpoints_named_as_timm_and_lightning_name_them_are_encoders(model, tmp_path, name):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / name)
    encoder = load_encoder(str(tmp_path / name))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_keeping_its_training_arguments_loads(model, tmp_path):
    """timm's train.py saves its argparse.Namespace of arguments beside the weights."""
    args = argparse.Namespace(model="vit", lr=5e-4, epochs=30, mean=(0.5, 0.5, 0.5), resume="")
    torch.save({"epoch": 29, "state_dict": model.state_dict(), "args": args, "version": 2}, tmp_path / "model_best.pth.tar")
    encoder = load_encoder(str(tmp_path / "model_best.pth.tar"))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["model.pt", "model_best.pth.tar", "last.ckpt", "model.safetensors"])
def test_a_checkpoint_file_that_is_not_there_is_named_not_found(tmp_path, name):
    """It was 'no model matches ...: give ... a checkpoint file', as if the name were not one."""
    with pytest.raises(InputError) as error:
        load_encoder(str(tmp_path / name))
    assert str(error.value).startswith(f"{tmp_path / name}: file not found (a checkpoint file, by its name")


def test_released_names_are_this_projects_and_sizes_without_weights_are_open_clips():
    from unicom.models.factory import is_unicom_spec

    assert is_unicom_spec("ViT-L/14@336px")
    assert not is_unicom_spec("ViT-B-32")  # a size to train here; as a --model it is open_clip's ViT-B-32


def test_pickle_of_the_transform_survives_for_dataloader_workers():
    transform = pickle.loads(pickle.dumps(image_transform(8)))
    assert transform(Image.new("RGB", (10, 8))).shape == (3, 8, 8)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    x = images(n=4)
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(x).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-4, msg=name)


def test_stochastic_depth_rises_linearly_over_the_blocks():
    vit = UnicomViT(dataclasses.replace(TINY, depth=3), drop_path_rate=0.1)
    assert [getattr(block.drop_path, "drop_prob", 0.0) for block in vit.blocks] == pytest.approx([0.0, 0.05, 0.1])
    assert isinstance(vit.blocks[0].drop_path, torch.nn.Identity)
