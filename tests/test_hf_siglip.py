"""SigLIP models saved by Hugging Face transformers (``SiglipModel`` folders: Google's
``google/siglip-*`` and ``google/siglip2-*`` models on the Hub), against transformers' own
model, tokenizers (SigLIP's sentencepiece one, SigLIP 2's Gemma one) and image processor and
open_clip's text clean-up on small models built in the test: from a folder, from a Hub on
127.0.0.1 and then offline, and through ``unicom embed``, ``index`` and ``search``."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch

from unicom.embed import embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import HFSiglip

from support import class_image, tiny_hf_siglip
from test_hf_clip import (
    built_model,
    embed_index_and_search,
    features,
    from_the_hub_and_then_offline,
    images_embed_as_transformers_embeds_them,
    loads_with_its_sizes,
    unit,
)

TEXTS = ["a cat", "A Red DOG, on a mat!", "Ünïcode text ✓ 猫", "a hot_dog",
         "a photo of the cat on a mat at night and a dog with its tail in the grass near a blue house"]


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    return built_model(tmp_path_factory, "hf-siglip", tiny_hf_siglip)


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    return built_model(tmp_path_factory, "hf-siglip2", functools.partial(tiny_hf_siglip, gemma=True))


def reference_texts(siglip, texts: list[str], mask: bool = False) -> np.ndarray:
    """transformers' text embeddings of texts made canonical by open_clip (as it does for its
    SigLIP models) and padded to the positions, as transformers' documentation says SigLIP
    was trained; the token ids alone (big_vision's and open_clip's way), or with the attention
    mask transformers 5's tokenizer also gives."""
    from open_clip.tokenizer import canonicalize_text

    batch = siglip["tokenizer"]([canonicalize_text(text) for text in texts], padding="max_length", truncation=True,
                                return_tensors="pt")
    inputs = dict(batch) if mask else {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        return features(siglip["model"].get_text_features(**inputs)).numpy()


def test_a_folder_loads_as_transformers_siglip_with_its_sizes(siglip):
    loads_with_its_sizes(siglip, HFSiglip, 32, 16)  # SigLIP's embedding: the towers' width


def test_texts_embed_as_siglip_was_trained(siglip):
    tokens = siglip["encoder"].tokenize(TEXTS)
    assert tokens.shape == (5, 16) and (tokens[:, -1] == siglip["tokenizer"].eos_token_id).all()  # padded with it
    assert len(siglip["tokenizer"](TEXTS[4])["input_ids"]) > 16  # the last one is cut to the positions
    embedded = embed_texts(siglip["encoder"], TEXTS)
    np.testing.assert_allclose(embedded, unit(reference_texts(siglip, TEXTS)), atol=2e-6)
    # lower case, no punctuation: the same text
    np.testing.assert_allclose(embed_texts(siglip["encoder"], ["a red dog on a mat"])[0], embedded[1], atol=1e-7)
    # an underscore is a space, as open_clip has it (transformers' SigLIP tokenizer alone drops it)
    np.testing.assert_allclose(embed_texts(siglip["encoder"], ["a hot dog"])[0], embedded[3], atol=1e-7)
    assert siglip["tokenizer"]("a hot_dog")["input_ids"] != siglip["tokenizer"]("a hot dog")["input_ids"]
    # the attention mask that transformers 5's tokenizer gives changes the embeddings: none is applied
    masked = unit(reference_texts(siglip, TEXTS, mask=True))
    assert np.abs(masked - embedded).max() > 1e-2


def test_siglip2_texts_are_made_canonical_before_gemmas_tokenizer(siglip2):
    """SigLIP 2's Gemma tokenizer keeps case and punctuation; its captions were canonical in
    training, as open_clip makes them."""
    assert isinstance(siglip2["encoder"], HFSiglip) and type(siglip2["tokenizer"]).__name__ == "GemmaTokenizer"
    tokenizer = siglip2["tokenizer"]
    assert tokenizer(TEXTS[1])["input_ids"] != tokenizer("a red dog on a mat")["input_ids"]  # the tokenizer alone
    embedded = embed_texts(siglip2["encoder"], TEXTS)
    np.testing.assert_allclose(embedded, unit(reference_texts(siglip2, TEXTS)), atol=2e-6)
    np.testing.assert_allclose(embed_texts(siglip2["encoder"], ["a red dog on a mat"])[0], embedded[1], atol=1e-7)
    tokens = siglip2["encoder"].tokenize(["a cat"])[0].tolist()
    assert tokens == tokenizer("a cat")["input_ids"] + [tokenizer.pad_token_id] * (16 - len(tokenizer("a cat")["input_ids"]))


def test_images_embed_as_transformers_embeds_them(siglip, tmp_path):
    # SigLIP's std of 0.5: a grey level is about 0.008 of a normalised pixel
    pixels = images_embed_as_transformers_embeds_them(siglip, tmp_path, mean=5e-4, most=0.02)
    assert pixels.shape == (4, 3, 32, 32)  # both sides resized, nothing cropped


def test_a_vision_tower_saved_alone_gives_siglips_image_embeddings(siglip, tmp_path):
    """A SiglipVisionModel folder (SigLIP's vision tower alone, as image encoders of other
    models publish it) embeds images as the whole SigLIP does."""
    from transformers import SiglipVisionModel

    from unicom.models.hf_clip import HFImageModel
    from test_hf_clip import reference_images

    SiglipVisionModel.from_pretrained(str(siglip["folder"])).save_pretrained(tmp_path / "tower")
    shutil.copy(siglip["folder"] / "preprocessor_config.json", tmp_path / "tower")
    encoder = load_encoder(str(tmp_path / "tower"))
    assert isinstance(encoder, HFImageModel) and not encoder.has_text and encoder.embedding_dim == 32
    images = [class_image(label, label, 64) for label in range(3)]
    expected, pixels = reference_images(siglip, images)
    assert encoder.image_transform(images[0]).shape == (3, 32, 32)  # SigLIP's resize of both sides
    with torch.no_grad():
        np.testing.assert_allclose(encoder.encode_image(pixels).numpy(), expected, atol=1e-5)


def test_a_folder_without_its_preprocessing_takes_siglips_defaults(siglip, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(siglip["folder"], older)
    (older / "preprocessor_config.json").unlink()
    encoder = load_encoder(str(older))
    image = class_image(0, 0, 300)
    assert encoder.image_transform(image).shape == (3, 224, 224)
    from transformers import SiglipImageProcessor

    default = SiglipImageProcessor()(images=[image], return_tensors="pt")["pixel_values"][0]
    difference = (encoder.image_transform(image) - default).abs()
    assert float(difference.mean()) < 5e-4 and float(difference.max()) < 0.02


def test_a_folder_that_cannot_be_read_is_named(siglip, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(siglip["folder"], bad)
    state = load_file(bad / "model.safetensors")
    save_file({key: value for key, value in state.items() if key != "text_model.head.weight"}, bad / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors .*text_model.head.weight"):
        load_encoder(str(bad))
    save_file(state, bad / "model.safetensors")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"], "projection_size": 16}}))
    with pytest.raises(InputError, match=r"projection_size \(16\) is not the vision tower's hidden_size \(32\)"):
        load_encoder(str(bad))
    (bad / "config.json").write_text(json.dumps(config))
    processor = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**processor, "size": {"height": 32, "width": 48}}))
    with pytest.raises(InputError, match="read are a square crop"):
        load_encoder(str(bad))
    (bad / "preprocessor_config.json").write_text(json.dumps({**processor, "do_center_crop": True}))
    with pytest.raises(InputError, match="do_center_crop true"):
        load_encoder(str(bad))
    (bad / "preprocessor_config.json").write_text(json.dumps(processor))
    (bad / "spiece.model").unlink()
    with pytest.raises(InputError, match="its tokenizer could not be read"):
        load_encoder(str(bad))


@pytest.mark.slow
def test_a_repository_on_the_hub_loads_and_then_loads_offline(siglip, tmp_path):
    from test_hf_hub import COMMIT

    hub, said = from_the_hub_and_then_offline(siglip, "google-like/siglip-tiny", reference_texts, tmp_path)
    # the sentencepiece model came with the other files, all of one commit
    assert ("GET", f"/google-like/siglip-tiny/resolve/{COMMIT}/spiece.model") in hub.requests
    assert said.startswith("HFSiglip (32, 32)")  # its preprocessor_config.json came with it


def test_embed_index_and_search_with_a_transformers_siglip_folder(siglip, tmp_path, capsys):
    embed_index_and_search(siglip, reference_texts, tmp_path, capsys)
