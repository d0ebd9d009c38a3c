"""Chinese-CLIP saved by Hugging Face transformers (``ChineseCLIPModel`` folders: OFA-Sys'
``chinese-clip-vit-*`` models on the Hub), against transformers' own model, BERT tokenizer and
image processor, on a small model built in the test: texts in Chinese and English, images
resized on both sides as the published folders say, and ``unicom embed``, ``index`` and
``search --text``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from unicom.embed import embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import HFFeatures

from support import class_image, tiny_hf_chinese_clip
from test_hf_clip import (
    built_model,
    embed_index_and_search,
    features,
    images_embed_as_transformers_embeds_them,
    unit,
)

TEXTS = ["一只猫", "红色的狗在草地上", "a photo of a cat", "a red dog, on the grass!", "蓝色的房子和一只白色的小猫在草地上的照片"]


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    return built_model(tmp_path_factory, "hf-chinese-clip", tiny_hf_chinese_clip)


def reference_texts(entry, texts: list[str]) -> np.ndarray:
    """transformers' text embeddings, as its documentation tokenizes for them (padding, the mask and types)."""
    batch = entry["tokenizer"](texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return features(entry["model"].get_text_features(**batch)).numpy()


def test_a_folder_loads_as_transformers_chinese_clip(chinese):
    encoder = chinese["encoder"]
    assert isinstance(encoder, HFFeatures) and encoder.has_text
    assert (encoder.embedding_dim, encoder.max_tokens) == (16, 24)
    assert encoder.weights_sha256() == load_encoder(str(chinese["folder"])).weights_sha256()


def test_texts_embed_as_transformers_embeds_them(chinese):
    tokens = chinese["encoder"].tokenize(TEXTS)
    assert tokens.shape[:2] == (5, 3)  # ids, mask and token types
    assert len(chinese["tokenizer"](TEXTS[4])["input_ids"]) <= 24
    np.testing.assert_allclose(embed_texts(chinese["encoder"], TEXTS), unit(reference_texts(chinese, TEXTS)), atol=2e-6)
    # padding changes nothing: each text alone embeds as in the batch
    alone = np.concatenate([embed_texts(chinese["encoder"], [text]) for text in TEXTS])
    np.testing.assert_allclose(alone, embed_texts(chinese["encoder"], TEXTS), atol=2e-6)


def test_images_embed_as_transformers_embeds_them(chinese, tmp_path):
    pixels = images_embed_as_transformers_embeds_them(chinese, tmp_path, mean=1e-3, most=0.05)
    assert pixels.shape[-2:] == (32, 32)
    wide = class_image(0, 0, 64).resize((120, 40))  # both sides resized: the whole image, squeezed
    assert chinese["encoder"].image_transform(wide).shape == (3, 32, 32)


def test_a_crop_of_another_size_is_read_as_clips_and_one_that_cannot_be_is_named(chinese, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(chinese["folder"], folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "size": {"shortest_edge": 40}, "do_center_crop": True}))
    assert load_encoder(str(folder)).image_transform(class_image(0, 0, 90)).shape == (3, 32, 32)
    path.write_text(json.dumps({**config, "size": {"height": 32, "width": 48}}))
    with pytest.raises(InputError, match="preprocessor_config.json"):
        load_encoder(str(folder))


def test_embed_index_and_search_with_a_chinese_clip_folder(chinese, tmp_path, capsys):
    embed_index_and_search(chinese, reference_texts, tmp_path, capsys)
