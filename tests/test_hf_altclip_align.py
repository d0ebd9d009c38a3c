"""AltCLIP and ALIGN saved by Hugging Face transformers (``AltCLIPModel``: BAAI's ``AltCLIP``;
``AlignModel``: ``kakaobrain/align-base``), against transformers' own models, tokenizers and image
processors, on small models built in the test: multilingual texts through AltCLIP's XLM-RoBERTa
positions, ALIGN's EfficientNet preprocessing, and ``unicom embed``, ``index`` and ``search --text``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from unicom.embed import embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import ALIGN_PREPROCESSOR, HFFeatures, efficientnet_transform

from support import MULTILINGUAL_CAPTIONS, class_image, tiny_hf_align, tiny_hf_altclip
from test_hf_clip import embed_index_and_search, features, images_embed_as_transformers_embeds_them, unit

TEXTS = ["a photo of a cat", "ein rotes Auto bei Nacht", "一只猫的照片", "a red dog, on the grass!"]
# longer than AltCLIP's 16 positions of text: cut there
LONG = " ".join(MULTILINGUAL_CAPTIONS[:4])


def built(tmp_path_factory, name, build):
    folder = tmp_path_factory.mktemp(name) / "model"
    model, tokenizer, processor = build(folder)
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "processor": processor,
            "encoder": load_encoder(str(folder))}


@pytest.fixture(scope="module")
def altclip(tmp_path_factory):
    return built(tmp_path_factory, "hf-altclip", tiny_hf_altclip)


@pytest.fixture(scope="module")
def align(tmp_path_factory):
    return built(tmp_path_factory, "hf-align", tiny_hf_align)


def reference_texts(entry, texts: list[str]) -> np.ndarray:
    """transformers' text embeddings, the texts tokenized with their mask, cut to the tower's positions."""
    batch = entry["tokenizer"](texts, padding=True, truncation=True, max_length=entry["encoder"].max_tokens,
                               return_tensors="pt")
    with torch.no_grad():
        return features(entry["model"].get_text_features(**batch)).numpy()


def test_altclip_loads_with_two_positions_fewer_for_a_text_than_its_tower(altclip):
    encoder = altclip["encoder"]
    assert isinstance(encoder, HFFeatures) and encoder.has_text and encoder.embedding_dim == 16
    assert encoder.max_tokens == 16  # 18 positions, numbered from the pad token's id (1) + 1
    assert encoder.weights_sha256() == load_encoder(str(altclip["folder"])).weights_sha256()
    # the tower's own limit: a text of 17 tokens would ask for position 18, which it does not have
    ids = altclip["tokenizer"]([LONG], truncation=True, max_length=17, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 17
    with pytest.raises((IndexError, RuntimeError), match="out of (range|bounds)"):
        altclip["model"].get_text_features(input_ids=ids)


def test_altclip_texts_in_several_languages_embed_as_transformers_embeds_them(altclip):
    texts = [*TEXTS, LONG]
    assert len(altclip["tokenizer"](LONG)["input_ids"]) > 16
    np.testing.assert_allclose(embed_texts(altclip["encoder"], texts), unit(reference_texts(altclip, texts)), atol=2e-6)
    alone = np.concatenate([embed_texts(altclip["encoder"], [text]) for text in texts])
    np.testing.assert_allclose(alone, embed_texts(altclip["encoder"], texts), atol=2e-6)  # padding changes nothing


def test_altclip_images_embed_as_transformers_embeds_them(altclip, tmp_path):
    pixels = images_embed_as_transformers_embeds_them(altclip, tmp_path, mean=1e-3, most=0.05)
    assert pixels.shape[-2:] == (32, 32)


def test_align_loads_and_its_texts_embed_as_transformers_embeds_them(align):
    encoder = align["encoder"]
    assert isinstance(encoder, HFFeatures) and (encoder.embedding_dim, encoder.max_tokens) == (16, 24)
    texts = ["a photo of a cat", "a red dog, on the grass!", "blue"]
    np.testing.assert_allclose(embed_texts(encoder, texts), unit(reference_texts(align, texts)), atol=2e-6)


def test_align_images_embed_as_transformers_embeds_them(align, tmp_path):
    # std 0.5: a grey level is about 0.008 of a normalised pixel
    pixels = images_embed_as_transformers_embeds_them(align, tmp_path, mean=2e-3, most=0.05)
    assert pixels.shape[-2:] == (32, 32)
    with torch.no_grad():  # the images embed apart: the cosine bound above tells the transforms apart
        embedded = torch.nn.functional.normalize(align["encoder"].encode_image(pixels), dim=1)
    assert float((embedded @ embedded.T - 2 * torch.eye(len(pixels))).max()) < 0.995
    steps = [type(step).__name__ for step in align["encoder"].image_transform.transforms]
    assert steps[:2] == ["Resize", "CenterCrop"]  # both sides to 40, then the centre 32


@pytest.mark.parametrize("settings", [
    {},  # transformers' EfficientNetImageProcessor defaults: normalised, and by image_std once more (include_top)
    {"rescale_offset": True, "rescale_factor": 1 / 127.5, "do_normalize": False, "include_top": False},
    {"rescale_offset": True, "rescale_factor": 1 / 127.5, "image_mean": [0.1, -0.2, 0.3], "image_std": [0.7, 0.4, 2.0]},
    {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "include_top": False, "resample": 3},
    {"do_normalize": False, "image_std": [0.25, 0.5, 2.0], "do_center_crop": True},
])
def test_efficientnet_preprocessing_gives_transformers_pixels(settings, tmp_path):
    """Every combination of rescale, offset, normalisation and include_top, against transformers'
    PIL processor on the same image (the same PIL resize: equal to float precision)."""
    import transformers

    processor_class = getattr(transformers, "EfficientNetImageProcessorPil", transformers.EfficientNetImageProcessor)
    config = {"size": {"height": 40, "width": 40}, "crop_size": {"height": 24, "width": 24}, **settings}
    processor = processor_class(**config)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8), "RGB")
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    ours = efficientnet_transform(json.loads(processor.to_json_string()), tmp_path / "preprocessor_config.json")(image)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=2e-5)


def test_align_without_preprocessor_config_takes_the_published_preprocessing(align, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(align["folder"], folder)
    (folder / "preprocessor_config.json").unlink()
    transform = load_encoder(str(folder)).image_transform
    image = class_image(1, 0, 400)
    expected = np.asarray(image.resize((346, 346), Image.BILINEAR), dtype=np.float32)[28:317, 28:317] / 127.5 - 1
    np.testing.assert_allclose(transform(image).numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert ALIGN_PREPROCESSOR["include_top"] is False and ALIGN_PREPROCESSOR["do_normalize"] is False


def test_what_is_not_read_is_named(align, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(align["folder"], folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    for change, message in (({"do_resize": False}, "do_resize False"),
                            ({"crop_size": {"height": 48, "width": 48}}, "crop of 48 pixels"),
                            ({"size": {"height": 40, "width": 32}}, "square crop"),
                            ({"include_top": True, "image_std": [0.5, 0, 0.5]}, "image_std")):
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(InputError, match=message):
            load_encoder(str(folder))


def test_an_align_whose_image_and_text_embeddings_differ_in_width_is_refused(tmp_path):
    from transformers import AlignConfig, AlignModel

    config = AlignConfig(text_config=dict(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=64),
                         vision_config=dict(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=16,
                                            kernel_sizes=[3], in_channels=[32], out_channels=[24], strides=[1],
                                            num_block_repeats=[1], expand_ratios=[1], depthwise_padding=[]),
                         projection_dim=16)
    AlignModel(config).save_pretrained(tmp_path / "model")
    with pytest.raises(InputError, match="24 channels.*projection_dim is 16"):
        load_encoder(str(tmp_path / "model"))


@pytest.mark.parametrize("name", ["altclip", "align"])
def test_embed_index_and_search_with_altclip_and_align_folders(name, request, tmp_path, capsys):
    embed_index_and_search(request.getfixturevalue(name), reference_texts, tmp_path, capsys)
