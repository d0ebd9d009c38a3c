"""Dual encoders saved by Hugging Face transformers and embedded by ``get_image_features`` /
``get_text_features``: AltCLIP (``AltCLIPModel``: BAAI's ``AltCLIP``), ALIGN (``AlignModel``:
``kakaobrain/align-base``), MetaCLIP 2 (``MetaClip2Model``), AIMv2's LiT models (``Aimv2Model``;
its image encoders, ``Aimv2VisionModel``, too) and ``VisionTextDualEncoderModel`` (a CLIP or ViT vision tower beside a BERT or
XLM-RoBERTa text tower), against transformers' own models, tokenizers and image processors on
small models built in the test: multilingual texts, RoBERTa's positions, ALIGN's EfficientNet
preprocessing, and ``unicom embed``, ``index`` and ``search --text``."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from unicom.embed import embed_images, embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import ALIGN_PREPROCESSOR, HFBlip, HFFeatures, efficientnet_transform

from support import (
    MULTILINGUAL_CAPTIONS,
    class_image,
    tiny_hf_aimv2,
    tiny_hf_aimv2_vision,
    tiny_hf_align,
    tiny_hf_altclip,
    tiny_hf_blip,
    tiny_hf_dual_encoder,
    tiny_hf_metaclip2,
)
from test_hf_clip import (
    built_model,
    embed_index_and_search,
    features,
    images_embed_as_transformers_embeds_them,
    unit,
)
from test_hf_dinov2 import unifex_model_exports_and_loads_again

TEXTS = ["a photo of a cat", "ein rotes Auto bei Nacht", "一只猫的照片", "a red dog, on the grass!"]
# longer than AltCLIP's 16 positions of text: cut there
LONG = " ".join(MULTILINGUAL_CAPTIONS)


# each kind: (its builder, the texts' positions, the encoder's name)
KINDS = {
    "altclip": (tiny_hf_altclip, 16, "AltCLIP"),  # 18 positions, RoBERTa's: two fewer for a text
    "align": (tiny_hf_align, 24, "ALIGN"),
    "metaclip_2": (tiny_hf_metaclip2, 16, "MetaCLIP 2"),
    "aimv2": (tiny_hf_aimv2, 16, "AIMv2"),  # its text tower pools at the end-of-text token, masked causally
    "dual-clip-roberta": (functools.partial(tiny_hf_dual_encoder, vision="clip", text="roberta"), 18,
                          "VisionTextDualEncoder"),
    "dual-vit-bert": (functools.partial(tiny_hf_dual_encoder, vision="vit", text="bert"), 20, "VisionTextDualEncoder"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The model of a kind of :data:`KINDS` (or BLIP's), built once for the module."""
    entries = {}

    def build(name):
        if name not in entries:
            entries[name] = built_model(tmp_path_factory, f"hf-{name}",
                                        tiny_hf_blip if name == "blip" else KINDS[name][0])
        return entries[name]

    return build


@pytest.fixture(scope="module")
def altclip(built):
    return built("altclip")


@pytest.fixture(scope="module")
def align(built):
    return built("align")


def reference_texts(entry, texts: list[str]) -> np.ndarray:
    """transformers' text embeddings, the texts tokenized with their mask, cut to the tower's positions."""
    batch = entry["tokenizer"](texts, padding=True, truncation=True, max_length=entry["encoder"].max_tokens,
                               return_tensors="pt")
    with torch.no_grad():
        return features(entry["model"].get_text_features(**batch)).numpy()


@pytest.mark.parametrize("name", KINDS)
def test_a_folder_loads_with_its_sizes(name, built):
    entry = built(name)
    encoder = entry["encoder"]
    assert isinstance(encoder, HFFeatures) and encoder.has_text and encoder.embedding_dim == 16
    assert encoder.max_tokens == KINDS[name][1] and encoder.name.startswith(f"transformers {KINDS[name][2]} ")
    assert encoder.weights_sha256() == load_encoder(str(entry["folder"])).weights_sha256()


@pytest.mark.parametrize("name", KINDS)
def test_texts_embed_as_transformers_embeds_them(name, built):
    entry = built(name)
    texts = [*TEXTS, LONG]
    assert len(entry["tokenizer"](LONG)["input_ids"]) > entry["encoder"].max_tokens  # cut to the positions
    np.testing.assert_allclose(embed_texts(entry["encoder"], texts), unit(reference_texts(entry, texts)), atol=2e-6)
    alone = np.concatenate([embed_texts(entry["encoder"], [text]) for text in texts])
    np.testing.assert_allclose(alone, embed_texts(entry["encoder"], texts), atol=2e-6)  # padding changes nothing


@pytest.mark.parametrize("name", [name for name in KINDS if name != "align"])
def test_images_embed_as_transformers_embeds_them(name, built, tmp_path):
    # CLIP's std of about 0.27 (a grey level: 0.015 of a normalised pixel), ViT's 0.5
    images_embed_as_transformers_embeds_them(built(name), tmp_path, mean=1e-3, most=0.05)


def test_altclips_texts_have_two_positions_fewer_than_its_tower(altclip):
    # the tower's own limit: a text of 17 tokens would ask for position 18, which it does not have
    ids = altclip["tokenizer"]([LONG], truncation=True, max_length=17, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 17
    with pytest.raises((IndexError, RuntimeError), match="out of (range|bounds)"):
        altclip["model"].get_text_features(input_ids=ids)


def test_align_images_embed_as_transformers_embeds_them(align, tmp_path):
    # std 0.5: a grey level is about 0.008 of a normalised pixel
    pixels = images_embed_as_transformers_embeds_them(align, tmp_path, mean=2e-3, most=0.05)
    assert pixels.shape[-2:] == (32, 32)
    with torch.no_grad():  # the images embed apart: the cosine bound above tells the transforms apart
        embedded = torch.nn.functional.normalize(align["encoder"].encode_image(pixels), dim=1)
    assert float((embedded @ embedded.T - 2 * torch.eye(len(pixels))).max()) < 0.995
    steps = [type(step).__name__ for step in align["encoder"].image_transform.transforms]
    assert steps[:2] == ["Resize", "CenterCrop"]  # both sides to 40, then the centre 32


def test_a_unifex_model_on_an_align_folder_exports_and_loads_again(align, tmp_path):
    """ALIGN's squash and centre crop described in the model folder and built again."""
    unifex_model_exports_and_loads_again(align, 16, tmp_path)
    image = class_image(0, 0, 90).crop((0, 0, 90, 60))
    loaded = load_encoder(str(tmp_path / "model")).image_transform(image)
    assert loaded.shape == (3, 32, 32) and torch.equal(loaded, align["encoder"].image_transform(image))


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


def test_a_dual_encoder_names_the_preprocessing_it_needs_and_the_processors_it_reads(built, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(built("dual-vit-bert")["folder"], folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "image_processor_type": "DeiTImageProcessor"}))
    with pytest.raises(InputError, match="DeiTImageProcessor'; read are CLIPImageProcessor, ViTImageProcessor"):
        load_encoder(str(folder))
    path.unlink()
    with pytest.raises(InputError, match="holds preprocessor_config.json"):
        load_encoder(str(folder))


@pytest.mark.parametrize("name", KINDS)
def test_embed_index_and_search_with_a_folder(name, built, tmp_path, capsys):
    embed_index_and_search(built(name), reference_texts, tmp_path, capsys)


@pytest.fixture(scope="module")
def blip(built):
    return built("blip")


def test_blip_embeddings_give_its_image_text_contrastive_scores(blip, tmp_path):
    """transformers' BlipForImageTextRetrieval with use_itm_head=False scores each image against
    each text by the cosine of its two projections: the cosines of our embeddings."""
    from unicom.embed import embed_images

    encoder = blip["encoder"]
    assert isinstance(encoder, HFBlip) and (encoder.embedding_dim, encoder.max_tokens) == (16, 24)
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48), (2, 90))]
    images.append(Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None], (50, 1, 3))))
    pixels = blip["processor"](images=images, return_tensors="pt")["pixel_values"]
    texts = [*TEXTS, LONG]
    batch = blip["tokenizer"](texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        scores = blip["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=pixels, use_itm_head=False).itm_score
        ours = unit(encoder.encode_image(pixels).numpy()) @ embed_texts(encoder, texts).T
    assert scores.shape == (4, 5) and float(scores.std()) > 0.05  # scores that tell the pairs apart
    np.testing.assert_allclose(ours, scores.numpy(), atol=2e-6)
    # the images as its processor prepares them: both sides to 32, CLIP's mean and std
    prepared = torch.stack([encoder.image_transform(image) for image in images])
    difference = (prepared - pixels).abs()
    assert prepared.shape == pixels.shape and float(difference.mean()) < 1e-3 and float(difference.max()) < 0.05
    for number, image in enumerate(images):
        image.save(tmp_path / f"{number}.png")
    embedded = embed_images(encoder, [str(tmp_path / f"{n}.png") for n in range(4)], batch_size=2, num_workers=0)
    assert (np.sum(embedded * unit(encoder.encode_image(pixels).detach().numpy()), axis=1) >= 0.9999).all()


def test_blips_captioning_models_are_refused_named(blip, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(blip["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BlipForConditionalGeneration"]}))
    with pytest.raises(InputError, match="BlipForConditionalGeneration .* has no image-text embeddings"):
        load_encoder(str(folder))


def test_embed_index_and_search_with_a_blip_folder(blip, tmp_path, capsys):
    def blip_texts(entry, texts):  # its text embeddings: checked against its own scores above
        return embed_texts(entry["encoder"], texts)

    embed_index_and_search(blip, blip_texts, tmp_path, capsys)


@pytest.mark.parametrize("head", [False, True])
def test_aimv2_image_encoders_embed_by_their_head_or_the_mean_of_their_tokens(head, tmp_path):
    from unicom.models.hf_clip import HFImageModel

    model, processor = tiny_hf_aimv2_vision(tmp_path / "model", head=head)
    encoder = load_encoder(str(tmp_path / "model"))
    assert isinstance(encoder, HFImageModel) and not encoder.has_text and encoder.embedding_dim == 32
    assert "AIMv2" in encoder.name and "no text tower" in encoder.no_text_reason
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48), (2, 90))]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixels)
        # the head's pooled output, else the tokens' mean, as timm's global_pool="avg" pools AIMv2
        expected = output.pooler_output if head else output.last_hidden_state.mean(dim=1)
        assert (output.pooler_output is None) != head
        np.testing.assert_allclose(encoder.encode_image(pixels).numpy(), expected.numpy(), atol=1e-5)
    paths = []
    for number, image in enumerate(images):
        paths.append(tmp_path / f"{number}.png")
        image.save(paths[-1])
    embedded = embed_images(encoder, [str(path) for path in paths], batch_size=2, num_workers=0)
    assert (np.sum(embedded * unit(expected.numpy()), axis=1) >= 0.9999).all()


def test_apples_own_layout_of_an_aimv2_image_encoder_is_refused_naming_timms_reading(tmp_path):
    folder = tmp_path / "aimv2-large-patch14-224"
    folder.mkdir()
    # the config.json of Apple's repositories (their code beside it), which transformers does not build
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["AIMv2Model"], "auto_map": {"AutoConfig": "configuration_aimv2.AIMv2Config",
                                                      "AutoModel": "modeling_aimv2.AIMv2Model"},
        "hidden_size": 1024, "image_size": 224, "intermediate_size": 2816, "model_type": "aimv2",
        "num_attention_heads": 8, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
        "projection_dropout": 0.0, "qkv_bias": False, "rms_norm_eps": 1e-05, "use_bias": False}))
    with pytest.raises(InputError, match="Apple's own layout.*timm/aimv2_large_patch14_224.apple_pt"):
        load_encoder(str(folder))


def test_an_aimv2_texts_embedding_is_causal_whatever_else_its_batch_holds(built):
    """transformers' eager attention masks AIMv2's text tower causally; its SDPA path, given a batch
    that needs no padding, would let each token see the later ones: the encoder's texts embed as
    the eager model embeds them, alone or beside longer texts."""
    from transformers import Aimv2Model

    entry = built("aimv2")
    eager = Aimv2Model.from_pretrained(str(entry["folder"]), attn_implementation="eager").eval()
    texts = ["a photo of a cat", "a red dog, on the grass!"]
    for batch in ([texts[0]], texts):
        tokens = entry["tokenizer"](batch, padding=True, truncation=True, max_length=entry["encoder"].max_tokens,
                                    return_tensors="pt")
        with torch.no_grad():
            expected = features(eager.get_text_features(**tokens)).numpy()
        np.testing.assert_allclose(embed_texts(entry["encoder"], batch), unit(expected), atol=2e-6)
