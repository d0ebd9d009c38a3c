"""open_clip models whose image tower is a timm model (SigLIP, EVA, ConvNeXt): their size, their
preprocessing without a pretrained tag, and image features without the text tokenizer.

The towers are built on the meta device (shapes only, no weights, no memory), so their
output size is checked against open_clip's own configuration and a shape-only forward pass.
"""

from __future__ import annotations

import sys
import warnings

import open_clip
import pytest
import torch

from unicom.errors import InputError
from unicom.models.foundation import open_clip_encoder, visual_output_dim


def meta_encoder(spec: str):
    with warnings.catch_warnings(), torch.device("meta"):  # no initialisation, no memory
        warnings.simplefilter("ignore")
        return open_clip_encoder(spec, None, "meta")


@pytest.fixture(scope="module")
def siglip():
    return meta_encoder("ViT-B-16-SigLIP")


@pytest.mark.parametrize("spec", ["ViT-B-16-SigLIP", "convnext_base"])
def test_a_timm_tower_reports_the_size_of_its_output(spec, siglip):
    encoder = siglip if spec == "ViT-B-16-SigLIP" else meta_encoder(spec)
    assert not hasattr(encoder.model.visual, "output_dim")  # open_clip's TimmModel states no size
    size = encoder.model.visual.image_size
    out = encoder.encode_image(torch.empty(2, 3, *size, device="meta"))
    assert encoder.embedding_dim == out.shape[1] == open_clip.get_model_config(spec)["embed_dim"]


def test_an_open_clip_tower_keeps_its_stated_size():
    encoder = meta_encoder("ViT-B-32")
    assert encoder.embedding_dim == visual_output_dim(encoder.model.visual) == encoder.model.visual.output_dim == 512


def test_image_features_do_not_need_the_text_tokenizer(siglip, monkeypatch):
    # SigLIP's tokenizer is a Hugging Face one: building it needs `transformers` and its files
    encoder = siglip
    assert encoder.encode_image(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 768)
    for name in [name for name in sys.modules if name == "transformers" or name.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as where it is not installed: importing it fails
    with pytest.raises(InputError, match="needs the transformers package.*image embeddings do not need it"):
        encoder.tokenize(["a photo"])


def test_without_a_tag_the_preprocessing_is_the_one_all_tags_share(siglip):
    # random weights (and a local checkpoint file) get SigLIP's preprocessing, not CLIP's default
    encoder = siglip
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16-SigLIP")
    expected = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", tags[0])
    steps = {type(step).__name__: step for step in encoder.image_transform.transforms}
    assert tuple(steps["Normalize"].mean) == tuple(expected["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(steps["Normalize"].std) == tuple(expected["std"])
    assert expected["resize_mode"] == "squash" and "CenterCrop" not in steps
    assert steps["Resize"].size in ([224, 224], (224, 224))
    # CLIP's tags share CLIP's preprocessing: the short side resized, then a centre crop
    clip = meta_encoder("ViT-B-32")
    assert "CenterCrop" in {type(step).__name__ for step in clip.image_transform.transforms}
