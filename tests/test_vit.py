"""CLIP-shaped ViTs: shapes against open_clip, open_clip weights, export, the model factory."""

from __future__ import annotations

import pytest
import torch

from unicom.errors import InputError
from unicom.models.registry import MODELS
from unicom.models.vit import ClipViT, ClipViTSettings, create_model, open_clip_to_clip_vit


def tiny_open_clip(embed_dim: int = 48, seed: int = 0):
    """A small open_clip CLIP (image tower 32 px, patches of 8, width 128, 2 blocks) with random weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32, head_width=64)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"])
def test_registered_sizes_have_the_shapes_of_open_clips_image_towers(name):
    import open_clip

    with torch.device("meta"):
        reference = open_clip.create_model(name, device="meta").visual.state_dict()
        ours = create_model(name).module.state_dict()
    converted = open_clip_to_clip_vit({f"visual.{k}": v for k, v in reference.items()})
    trunk = {k: tuple(v.shape) for k, v in ours.items() if k.startswith("trunk.")}
    assert trunk == {k: tuple(v.shape) for k, v in converted.items() if k.startswith("trunk.")}
    # the embedding sizes of the paper: 512 for B/32, 768 for the others (CLIP's B/16 has 512)
    sizes = MODELS[name].settings
    assert ours["projection.weight"].shape == (sizes["embedding_dim"], sizes["width"])
    assert sizes["embedding_dim"] == (512 if name == "ViT-B-32" else 768)


def test_an_open_clip_checkpoint_gives_open_clips_image_embeddings(tmp_path):
    reference = tiny_open_clip()
    path = tmp_path / "open_clip.pt"
    torch.save(reference.state_dict(), path)
    created = create_model(init=str(path))
    assert created.architecture == "clip_vit" and created.reinitialised == []
    assert created.settings["width"] == 128 and created.settings["depth"] == 2 and created.settings["embedding_dim"] == 48
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(created.module.eval()(images), reference.encode_image(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-H-14", "ViT-bigG-14"])
def test_the_head_count_of_open_clip_weights_is_open_clips(name):
    # ViT-H-14 has 16 heads of 80 dimensions, not width / 64 = 20: the shapes do not say
    import open_clip

    from unicom.models.vit import open_clip_settings

    with torch.device("meta"):
        visual = open_clip.create_model(name, device="meta").visual.state_dict()
    vision = open_clip.get_model_config(name)["vision_cfg"]
    settings = open_clip_settings({f"visual.{k}": v for k, v in visual.items()})
    assert settings.heads == vision["width"] // vision.get("head_width", 64)
    assert (settings.width, settings.depth) == (vision["width"], vision["layers"])


def test_the_head_count_of_a_tower_open_clip_does_not_know_is_model_heads(tmp_path):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32, head_width=32)  # 4 heads
    reference = CLIP(embed_dim=24, vision_cfg=vision, text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32,
                                                                            heads=2, layers=1)).eval()
    path = tmp_path / "open_clip.pt"
    torch.save(reference.state_dict(), path)
    created = create_model(init=str(path), overrides={"heads": 4})
    assert created.settings["heads"] == 4 and created.reinitialised == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(created.module.eval()(images), reference.encode_image(images), rtol=1e-5, atol=1e-5)


def test_another_embedding_size_keeps_the_tower_and_starts_a_new_projection(tmp_path):
    reference = tiny_open_clip()
    path = tmp_path / "open_clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    created = create_model(init=str(path), overrides={"embedding_dim": 16})
    assert created.reinitialised == ["projection.weight"]
    assert created.module.projection.weight.shape == (16, 128)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = created.module.eval().trunk(images)
        expected = reference.visual.ln_post(_class_token(reference.visual, images))
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def _class_token(visual, images):
    """open_clip's tower up to the transformer output of the class token (no ln_post, no proj)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.transformer(visual.ln_pre(x))
    return x[:, 0]


def test_open_clip_weights_that_do_not_fit_the_named_size_are_refused(tmp_path):
    path = tmp_path / "open_clip.pt"
    torch.save(tiny_open_clip().state_dict(), path)
    with pytest.raises(InputError, match="not a ViT-B-32.*width 128 in the file, 768"):
        create_model("ViT-B-32", init=str(path))


def test_an_exported_clip_vit_loads_as_an_encoder_with_the_same_outputs(tmp_path):
    from unicom.models.encoders import load_encoder
    from unicom.models.export import save_model

    settings = ClipViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=2, embedding_dim=24)
    torch.manual_seed(1)
    model = ClipViT(settings).eval()
    created = create_model("ViT-B-32", overrides=settings.to_dict())
    save_model(tmp_path / "model", model, "clip_vit", settings.to_dict(), created.preprocess())
    encoder = load_encoder(str(tmp_path / "model"))
    assert encoder.embedding_dim == 24
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(images), model(images))


def test_a_recipe_that_names_a_size_and_resizes_it_continues_from_its_own_model(tmp_path):
    """model.name=ViT-B-32 with the recipe's image_size, width, ... (configs/scratch_small.yaml)
    and model.init= a model of those sizes: the recipe describes the weights, so they load
    (the compact epoch of a small run); another size is still refused."""
    from unicom.models.export import save_model

    settings = ClipViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=2, embedding_dim=24)
    torch.manual_seed(1)
    model = ClipViT(settings).eval()
    created = create_model("ViT-B-32", overrides=settings.to_dict())
    save_model(tmp_path / "model", model, "clip_vit", settings.to_dict(), created.preprocess())
    resumed = create_model("ViT-B-32", init=str(tmp_path / "model"), overrides=settings.to_dict())
    assert resumed.settings == settings.to_dict() and resumed.reinitialised == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(resumed.module.eval()(images), model(images))
    with pytest.raises(InputError, match="model.name='ViT-B-32' does not describe the weights"):
        create_model("ViT-B-32", init=str(tmp_path / "model"), overrides={**settings.to_dict(), "width": 96})


def test_gradient_checkpointing_leaves_the_gradients_unchanged():
    torch.manual_seed(0)
    model = ClipViT(ClipViTSettings(image_size=32, patch_size=8, width=64, depth=3, heads=2, embedding_dim=16))
    images = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(images).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_a_released_name_builds_the_released_architecture():
    with torch.device("meta"):
        created = create_model("ViT-B/32")
    assert created.architecture == "unicom_vit"
    assert created.settings["embedding_dim"] == 512 and created.settings["patch_size"] == 32
    assert type(created.module).__name__ == "UnicomViT"


def test_a_released_format_file_starts_the_released_architecture(tmp_path):
    from support import random_unicom_vit

    from unicom.models.unicom_vit import ViTSettings

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=2, heads=1, mlp_dim=128, embedding_dim=16)
    reference = random_unicom_vit(settings)
    path = tmp_path / "FP16-tiny.pt"
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, path)
    created = create_model(init=str(path))
    assert created.architecture == "unicom_vit" and created.settings == settings.to_dict()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(created.module.eval()(images), reference(images), rtol=1e-4, atol=1e-4)


def test_settings_that_contradict_the_weights_are_an_error(tmp_path):
    path = tmp_path / "open_clip.pt"
    torch.save(tiny_open_clip().state_dict(), path)
    with pytest.raises(InputError, match="model.depth=3 differs from the weights"):
        create_model(init=str(path), overrides={"depth": 3})


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(InputError, match="known: .*ViT-B-32.*ViT-L/14@336px"):
        create_model("ViT-X-99")


def test_attention_runs_through_scaled_dot_product_attention_whatever_timm_says(monkeypatch):
    import timm.layers.config
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)  # as TIMM_FUSED_ATTN=0 would
    model = ClipViT(ClipViTSettings(image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=8)).eval()
    called = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record(), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert sum("scaled_dot_product" in name for name in called) == 2  # one per block
    assert not any("softmax" in name for name in called)


def test_the_patch_embedding_as_one_matrix_product_is_the_convolution():
    """PatchConv gives Conv2d's output and gradients (F.conv2d as the reference), keeps the
    parameter names of checkpoints, and takes the convolution where a side is not a multiple
    of the patch (which the convolution crops)."""
    import torch.nn.functional as F
    from torch import nn

    from unicom.models.vit import PatchConv

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, 8, 8, bias=True)
    patch = PatchConv.of(conv)
    assert isinstance(patch, PatchConv) and patch.weight is conv.weight and patch.bias is conv.bias
    assert list(patch.state_dict()) == ["weight", "bias"]
    for size in ((32, 24), (35, 24)):
        x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
        weight = conv.weight.detach().double().requires_grad_()
        bias = conv.bias.detach().double().requires_grad_()
        reference = F.conv2d(x, weight, bias, stride=8)
        patch.double()
        got = patch(x)
        assert got.shape == reference.shape == (2, 24, size[0] // 8, 3)
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
        upstream = torch.randn_like(reference)
        grads = torch.autograd.grad(got, (x, patch.weight, patch.bias), upstream)
        expected = torch.autograd.grad(reference, (x, weight, bias), upstream)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert PatchConv.of(nn.Conv2d(3, 8, 3, 1, padding=1)).__class__ is nn.Conv2d  # not a patch embedding


def test_clip_vits_embed_patches_with_the_matrix_product():
    from unicom.models.vit import PatchConv

    model = create_model("ViT-B-32", overrides={"depth": 1, "width": 64, "heads": 2}).module
    assert isinstance(model.trunk.patch_embed.proj, PatchConv)
