"""open_clip and timm encoders: names, local checkpoint files, safe loading, clear errors."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import timm
import torch
from support import class_image

from unicom.embed import embed_images, embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.foundation import OpenClipEncoder, TimmEncoder, accepts_open_clip, accepts_timm


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A test_vit with a 1000-class head, random weights, saved as a plain state dict."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit")
    path = tmp_path_factory.mktemp("timm") / "test_vit.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory):
    """An open_clip ViT-B-32 with random weights, saved as the user's own checkpoint file."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("open_clip") / "vit-b-32.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    return path, model


@pytest.fixture(scope="module")
def open_clip_loaded(open_clip_checkpoint):
    path, reference = open_clip_checkpoint
    return load_encoder("ViT-B-32", str(path)), reference


def test_spec_forms_pick_the_backend():
    assert accepts_timm("timm/resnet50") and accepts_timm("timm:resnet50") and not accepts_timm("ViT-B-32")
    assert accepts_open_clip("ViT-B-32") and accepts_open_clip("hf-hub:org/model") and not accepts_open_clip("timm/resnet50")


def test_timm_file_loads_every_weight_but_the_classifier(timm_checkpoint):
    path, reference = timm_checkpoint
    encoder = load_encoder("timm/test_vit", str(path))
    assert isinstance(encoder, TimmEncoder) and not encoder.training
    loaded = encoder.model.state_dict()
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert encoder.embedding_dim == reference.num_features


def test_timm_embeddings_equal_the_pooled_features_normalised(timm_checkpoint):
    path, reference = timm_checkpoint
    images = [class_image(i, i, 200) for i in range(3)]
    got = embed_images("timm/test_vit", images, batch_size=2, pretrained=str(path), num_workers=0, device="cpu")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference))
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(torch.stack([transform(i) for i in images])), pre_logits=True)
    expected = features.numpy() / np.linalg.norm(features.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_timm_checkpoint_inside_a_training_dict_with_module_prefix(tmp_path, timm_checkpoint):
    path, reference = timm_checkpoint
    wrapped = tmp_path / "train.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in torch.load(path).items()}, "epoch": 3}, wrapped)
    encoder = load_encoder("timm/test_vit", str(wrapped))
    assert torch.equal(encoder.model.pos_embed, reference.pos_embed)


def test_a_checkpoint_as_timms_train_script_saves_it_loads_its_moving_average(tmp_path, timm_checkpoint):
    """timm's train.py keeps its arguments (an argparse.Namespace) and the optimizer beside
    the weights and the moving average; the Namespace is read as data, not refused."""
    path, reference = timm_checkpoint
    weights = torch.load(path)
    average = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    args = argparse.Namespace(model="test_vit", lr=5e-4, mean=None, aa="rand-m9-mstd0.5", drop_path=0.1)
    torch.save({"epoch": 9, "arch": "test_vit", "state_dict": weights, "state_dict_ema": average, "version": 2,
                "args": args, "optimizer": torch.optim.SGD(reference.parameters(), lr=0.1).state_dict(),
                "metric": 71.2}, tmp_path / "model_best.pth.tar")
    encoder = load_encoder("timm/test_vit", str(tmp_path / "model_best.pth.tar"))
    assert torch.equal(encoder.model.pos_embed, average["pos_embed"])


def test_a_timm_model_folder_loads_by_local_dir(tmp_path, timm_checkpoint):
    _, model = timm_checkpoint
    timm.models.save_for_hf(model, str(tmp_path / "folder"), safe_serialization=True)
    encoder = load_encoder(f"timm/local-dir:{tmp_path / 'folder'}")
    assert isinstance(encoder, TimmEncoder) and encoder.embedding_dim == model.num_features
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(x), model.forward_head(model.forward_features(x), pre_logits=True))
    with pytest.raises(InputError, match="the model folder holds its weights; leave out --pretrained other.pth"):
        load_encoder(f"timm/local-dir:{tmp_path / 'folder'}", "other.pth")


def test_a_timm_or_open_clip_folder_given_as_a_model_folder_is_named(tmp_path, timm_checkpoint):
    from support import tiny_open_clip

    timm.models.save_for_hf(timm_checkpoint[1], str(tmp_path / "timm"), safe_serialization=True)
    with pytest.raises(InputError, match=r"it is a timm model folder: give timm/local-dir:.*timm"):
        load_encoder(str(tmp_path / "timm"))
    tiny_open_clip(tmp_path / "clip", weights=False)
    with pytest.raises(InputError, match=r"it is an open_clip model folder: give local-dir:.*clip"):
        load_encoder(str(tmp_path / "clip"))


@pytest.mark.parametrize("config, said", [
    ({"model_type": "jina_clip", "auto_map": {"AutoModel": "modeling_clip.JinaCLIPModel"}},
     "it holds a transformers model of type 'jina_clip', whose code is in its repository (auto_map; transformers' "
     "trust_remote_code, which unicom does not run); the types read are clip, siglip, "),
    ({"model_type": "owlvit"}, "it holds a transformers model of type 'owlvit'; the types read are clip, siglip, "),
])
def test_a_transformers_folder_of_a_type_not_read_is_named(tmp_path, config, said):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=re.escape(said)):
        load_encoder(str(tmp_path))
    with pytest.raises(InputError, match=r"timm/local-dir:.*gone: timm cannot load it as a model folder"):
        load_encoder(f"timm/local-dir:{tmp_path / 'gone'}")


def _as_timm_loads_it(name: str, path) -> dict:
    """The weights timm's own loader gives ``name`` for the file ``path``: the reference."""
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0)
    return model.state_dict()


def _assert_same_weights(encoder, reference: dict) -> None:
    loaded = encoder.model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)


def test_a_checkpoint_of_another_layout_and_size_is_converted_as_timm_converts_it(tmp_path):
    """A ViT checkpoint as Meta's DINOv2 code saves one (its ``mask_token`` beside timm's names),
    trained at 224 pixels for a model of 160: timm's conversion drops the token and resamples
    the position embeddings to the model's grid, as timm's own loader does."""
    torch.manual_seed(3)
    state = timm.create_model("test_vit", img_size=224, num_classes=0).state_dict()
    state["mask_token"] = torch.randn(1, state["cls_token"].shape[-1])
    torch.save(state, tmp_path / "dinov2_layout.pth")
    encoder = load_encoder("timm/test_vit", tmp_path / "dinov2_layout.pth")
    reference = _as_timm_loads_it("test_vit", tmp_path / "dinov2_layout.pth")
    assert reference["pos_embed"].shape == (1, 101, 64) and state["pos_embed"].shape == (1, 197, 64)
    _assert_same_weights(encoder, reference)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert encoder.encode_image(x).shape == (2, 64)


def test_dinov2_with_registers_in_metas_layout_loads_as_timm_loads_it(tmp_path):
    """Meta's DINOv2-with-registers checkpoints (``register_tokens``, a class token whose position
    embedding is part of ``pos_embed``) into timm's ``vit_small_patch14_reg4_dinov2``."""
    torch.manual_seed(4)
    timm_state = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0).state_dict()
    meta = {key: value for key, value in timm_state.items() if key not in ("reg_token", "cls_token", "pos_embed")}
    first = torch.randn(1, 1, timm_state["pos_embed"].shape[-1])  # the class token's position embedding
    meta.update({"register_tokens": timm_state["reg_token"], "cls_token": timm_state["cls_token"] - first,
                 "pos_embed": torch.cat([first, timm_state["pos_embed"]], dim=1), "mask_token": torch.zeros(1, 384)})
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    encoder = load_encoder("timm/vit_small_patch14_reg4_dinov2", tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    reference = _as_timm_loads_it("vit_small_patch14_reg4_dinov2", tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    _assert_same_weights(encoder, reference)
    torch.testing.assert_close(encoder.model.state_dict()["cls_token"], timm_state["cls_token"])


def test_timm_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(InputError, match="does not fit test_vit"):
        load_encoder("timm/test_vit", str(path))


def test_timm_missing_file_and_unknown_model_are_named(tmp_path):
    with pytest.raises(InputError, match="missing.pth: file not found"):
        load_encoder("timm/test_vit", str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="timm has no model 'no_such_net'"):
        load_encoder("timm:no_such_net")


def test_timm_without_weights_warns_of_random_init():
    with pytest.warns(UserWarning, match="random weights"):
        encoder = load_encoder("timm/test_vit", "none")
    assert not encoder.has_text


@pytest.mark.parametrize("spec", ["timm/test_vit", "ViT-B-32"])
def test_checkpoints_that_need_unpickling_code_are_refused(tmp_path, spec):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "config": OpaqueConfig()}, path)
    with pytest.raises(InputError, match=r"pickled.pt: holds Python objects besides tensors \(\S*OpaqueConfig\), which are "
                                         r"not unpickled"):
        load_encoder(spec, str(path))


class OpaqueConfig:
    """An arbitrary object: only a full (unsafe) unpickling could restore it."""


@pytest.mark.parametrize("refusal", [
    "Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default. Please use ...",
    "Weights only load failed. ... WeightsUnpickler error: Unsupported class argparse.Namespace",
], ids=["recent-torch", "torch-2.1"])
def test_the_class_a_checkpoint_holds_is_named_in_either_words_of_pytorchs_unpickler(refusal):
    """PyTorch versions before safe_globals (which reads a Namespace as data) refuse it in other
    words: the file still holds Python objects, not damaged bytes."""
    import pickle

    from unicom.models.weights import unpickling_refused

    assert str(unpickling_refused("model_best.pth.tar", pickle.UnpicklingError(refusal))).startswith(
        "model_best.pth.tar: holds Python objects besides tensors (argparse.Namespace), which are not unpickled")
    assert str(unpickling_refused("x.pt", pickle.UnpicklingError("invalid load key, 'v'."))) == (
        "x.pt: not a readable PyTorch checkpoint (damaged, or another format)")


def test_open_clip_local_checkpoint_loads_the_users_weights(open_clip_loaded):
    encoder, reference = open_clip_loaded
    assert isinstance(encoder, OpenClipEncoder) and encoder.has_text and encoder.embedding_dim == 512
    loaded, expected = encoder.model.state_dict(), reference.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_open_clip_text_embeddings_match_the_model(open_clip_loaded):
    import open_clip

    encoder, reference = open_clip_loaded
    texts = ["a photo of a cat", "a diagram", "", "a photo of a dog"]
    got = embed_texts(encoder, texts, batch_size=3)
    with torch.no_grad():
        expected = reference.eval().encode_text(open_clip.get_tokenizer("ViT-B-32")(texts))
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_weights_given_besides_an_open_clip_folder_are_refused_not_ignored(tmp_path, open_clip_checkpoint):
    from support import tiny_open_clip

    spec = tiny_open_clip(tmp_path / "clip")
    with pytest.raises(InputError, match=r"clip: the model folder holds its weights; leave out --pretrained .*vit-b-32.pt"):
        load_encoder(spec, str(open_clip_checkpoint[0]))
    assert load_encoder(spec, "none").has_text  # "no weights given" spelled out is not a second set


def test_weights_given_besides_a_unicom_model_are_refused(tmp_path):
    from support import random_unicom_vit

    from unicom.models.export import save_model
    from unicom.models.registry import clip_preprocess
    from unicom.models.unicom_vit import ViTSettings

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=64, embedding_dim=8)
    save_model(tmp_path / "model", random_unicom_vit(settings), "unicom_vit", settings, clip_preprocess(32))
    with pytest.raises(InputError, match=r"model: a unicom model holds its weights; leave out --pretrained other.pt"):
        load_encoder(str(tmp_path / "model"), "other.pt")


def test_open_clip_unknown_tag_lists_the_known_ones():
    with pytest.raises(InputError, match="not a file and not a pretrained tag of ViT-B-32.*laion400m_e32"):
        load_encoder("ViT-B-32", "no-such-tag")


def test_open_clip_file_of_another_model_is_refused(timm_checkpoint):
    path, _ = timm_checkpoint
    with pytest.raises(InputError, match="does not hold ViT-B-32 weights"):
        load_encoder("ViT-B-32", str(path))


def test_texts_need_a_text_tower(timm_checkpoint):
    encoder = load_encoder("timm/test_vit", str(timm_checkpoint[0]))
    with pytest.raises(InputError, match="no text tower"):
        embed_texts(encoder, ["a caption"])


@pytest.fixture
def tiny_clip_name(tmp_path):
    """A tiny CLIP registered with open_clip under a model name, as a user's own config."""
    import json

    import open_clip
    from support import TINY_CLIP

    (tmp_path / "tiny-clip-for-tests.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-clip-for-tests.json")
    return "tiny-clip-for-tests"


def test_an_open_clip_file_that_does_not_fit_names_its_missing_and_unexpected_keys(tmp_path, tiny_clip_name):
    import open_clip

    state = open_clip.create_model(tiny_clip_name).state_dict()
    state.pop("visual.proj")
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(InputError, match=r"edited.pt: does not hold tiny-clip-for-tests weights; missing keys: "
                                         r"visual.proj; unexpected keys: visual.extra$"):
        load_encoder(tiny_clip_name, str(tmp_path / "edited.pt"))


@pytest.mark.parametrize("failure", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                     RuntimeError("Expected all tensors to be on the same device")])
def test_an_open_clip_failure_that_is_not_about_the_weights_passes_through(tmp_path, tiny_clip_name, monkeypatch,
                                                                           failure):
    import open_clip

    torch.save(open_clip.create_model(tiny_clip_name).state_dict(), tmp_path / "fits.pt")
    assert load_encoder(tiny_clip_name, str(tmp_path / "fits.pt")) is not None

    def fail(model, *args, **kwargs):  # raised where open_clip loads the file, as a GPU out of memory would be
        raise failure

    monkeypatch.setattr(open_clip.factory, "load_checkpoint", fail)
    with pytest.raises(type(failure)) as raised:
        load_encoder(tiny_clip_name, str(tmp_path / "fits.pt"))
    assert raised.value is failure and not isinstance(raised.value, InputError)


def test_an_open_clip_file_that_does_not_fit_is_named_under_a_torch_without_its_device_agnostic_oom_error(
        tmp_path, tiny_clip_name, monkeypatch):
    # torch.OutOfMemoryError came with torch 2.5; the project supports torch from 2.1 (torch.cuda.OutOfMemoryError)
    import open_clip

    state = open_clip.create_model(tiny_clip_name).state_dict()
    state.pop("visual.proj")
    torch.save(state, tmp_path / "edited.pt")
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    with pytest.raises(InputError, match=r"edited.pt: does not hold tiny-clip-for-tests weights; missing keys: visual.proj$"):
        load_encoder(tiny_clip_name, str(tmp_path / "edited.pt"))


def test_an_image_tower_alone_is_refused_saying_open_clip_loads_both_towers(tmp_path, tiny_clip_name):
    import open_clip

    state = open_clip.create_model(tiny_clip_name).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, tmp_path / "tower.pt")
    with pytest.raises(InputError, match=r"tower.pt: does not hold tiny-clip-for-tests weights; missing keys: "
                                         r"positional_embedding, text_projection, .* \(tiny-clip-for-tests is a whole "
                                         r"CLIP, and the file holds its image tower alone: open_clip loads both towers; "
                                         r"save the whole model's state_dict\)"):
        load_encoder(tiny_clip_name, str(tmp_path / "tower.pt"))


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_a_model_without_weights_is_the_same_network_at_every_load_and_leaves_the_callers_generator_alone():
    """Random weights (tests, smoke runs: `--model ViT-B-32` without --pretrained) are built with
    torch's generator seeded, so a rerun into the same --out, `unicom search` on the embeddings
    and a feature cache find the weights they recorded; the caller's random stream goes on as
    if nothing was built."""
    from unicom.models.encoders import load_encoder

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_encoder("timm/test_vit", None)
    assert torch.equal(torch.rand(3), expected_next)
    second = load_encoder("timm/test_vit", "none")
    assert first.weights_sha256() == second.weights_sha256()


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_building_a_model_without_weights_leaves_the_callers_cuda_generator_alone():
    """The seed a model without weights is built with is the CPU generator's alone: a caller
    that seeded its GPU's generator (dropout on the GPU draws from it) draws on as seeded.
    Without a GPU, torch keeps a CUDA seed for when CUDA starts: that one is left as it was."""
    from unicom.models.encoders import load_encoder

    torch.cuda.manual_seed_all(4321)
    if torch.cuda.is_available():
        expected_next = torch.rand(3, device="cuda")
        torch.cuda.manual_seed_all(4321)
        load_encoder("timm/test_vit", None)
        assert torch.equal(torch.rand(3, device="cuda"), expected_next)
    else:
        pending = torch.cuda._lazy_seed_tracker.manual_seed_all_cb  # torch's CUDA seed waiting for CUDA to start
        load_encoder("timm/test_vit", None)
        assert torch.cuda._lazy_seed_tracker.manual_seed_all_cb is pending
