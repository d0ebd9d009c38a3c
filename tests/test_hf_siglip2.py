"""SigLIP 2's NaFlex models saved by Hugging Face transformers (``Siglip2Model`` folders:
``google/siglip2-*-naflex`` on the Hub), against transformers' own model, image processors and
the sizes its processor chooses, on a small model built in the test: images at their own aspect
ratio as patch sequences, texts as SigLIP's, the vision tower saved alone, refusals, and
``unicom embed``, ``index`` and ``search`` (an image query too)."""

from __future__ import annotations

import functools
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from unicom.cli import main
from unicom.embed import embed_images, embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import HFImageModel, HFSiglip
from unicom.models.naflex import NaFlexTransform, patch_grid, unpack

from support import class_image, tiny_hf_siglip
from test_hf_clip import built_model, embed_index_and_search, features, loads_with_its_sizes, unit
from test_hf_siglip import TEXTS, reference_texts

# wide, tall, square, tiny and thin images: each its own grid of patches
SIZES = ((64, 64), (90, 30), (30, 90), (7, 5), (400, 9), (48, 33))


@pytest.fixture(scope="module")
def naflex(tmp_path_factory):
    return built_model(tmp_path_factory, "hf-siglip2", functools.partial(tiny_hf_siglip, naflex_patches=24))


def images() -> list[Image.Image]:
    drawn = [class_image(label, label, 64).resize(size) for label, size in enumerate(SIZES)]
    ramp = np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None], (50, 1, 3))
    return [*drawn, Image.fromarray(ramp)]


def reference(model, processor, pictures) -> tuple[np.ndarray, dict]:
    """transformers' image embeddings of ``pictures`` and its processor's inputs."""
    inputs = dict(processor(images=pictures, return_tensors="pt"))
    with torch.no_grad():
        output = model.get_image_features(**inputs) if hasattr(model, "get_image_features") else model(**inputs)
    return features(output).numpy(), inputs


def test_a_folder_loads_as_transformers_siglip2_with_its_sizes(naflex):
    loads_with_its_sizes(naflex, HFSiglip, 32, 16)
    transform = naflex["encoder"].image_transform
    assert isinstance(transform, NaFlexTransform) and (transform.patch, transform.max_patches) == (8, 24)
    assert transform.interpolation == "bilinear"  # the folder's resample 2


def test_the_grid_is_the_one_transformers_processor_chooses():
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    draw = random.Random(0)
    for _ in range(3000):
        height, width = draw.randint(1, 4000), draw.choice([draw.randint(1, 4000), draw.randint(1, 40)])
        patch, most = draw.choice([8, 14, 16]), draw.choice([16, 24, 256, 729, 1024])
        rows, columns = patch_grid(height, width, patch, most)
        assert (rows * patch, columns * patch) == get_image_size_for_max_num_patches(height, width, patch, most)
        assert 1 <= rows * columns <= most
    assert patch_grid(64, 64, 8, 24) == (4, 4) and patch_grid(30, 90, 8, 24) == (3, 8)


def test_images_embed_as_transformers_embeds_them(naflex, tmp_path):
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    pictures = images()
    pil = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=24)
    expected, inputs = reference(naflex["model"], pil, pictures)
    packed = torch.stack([naflex["encoder"].image_transform(picture) for picture in pictures])
    ours = unpack(packed)
    # transformers' PIL processor: the same grids, masks and pixels (Pillow's bilinear filter on both sides)
    np.testing.assert_array_equal(ours["spatial_shapes"].numpy(), inputs["spatial_shapes"].numpy())
    np.testing.assert_array_equal(ours["pixel_attention_mask"].numpy(), inputs["pixel_attention_mask"].numpy())
    np.testing.assert_allclose(ours["pixel_values"].numpy(), inputs["pixel_values"].numpy(), atol=1e-6)
    assert len({tuple(shape) for shape in inputs["spatial_shapes"].tolist()}) >= 5  # grids of many shapes
    with torch.no_grad():
        np.testing.assert_allclose(naflex["encoder"].encode_image(packed).numpy(), expected, atol=1e-5)
    # transformers 5's default processor resizes on tensors (torchvision): within a few grey levels
    fast, fast_inputs = reference(naflex["model"], naflex["processor"], pictures)
    difference = (ours["pixel_values"] - fast_inputs["pixel_values"]).abs()  # std 0.5: a grey level is 0.0078
    assert float(difference.mean()) < 0.01 and float(difference.max()) < 0.1
    paths = []
    for number, picture in enumerate(pictures):
        paths.append(tmp_path / f"{number}.png")
        picture.save(paths[-1])
    embedded = embed_images(naflex["encoder"], [str(path) for path in paths], batch_size=3, num_workers=0)
    np.testing.assert_allclose(embedded, unit(expected), atol=2e-6)
    assert (np.sum(embedded * unit(fast), axis=1) >= 0.9999).all()


def test_texts_embed_as_siglip_was_trained(naflex):
    np.testing.assert_allclose(embed_texts(naflex["encoder"], TEXTS), unit(reference_texts(naflex, TEXTS)), atol=2e-6)
    np.testing.assert_allclose(embed_texts(naflex["encoder"], ["a red dog on a mat"])[0],
                               embed_texts(naflex["encoder"], [TEXTS[1]])[0], atol=1e-7)


def test_a_vision_tower_saved_alone_gives_the_image_embeddings(naflex, tmp_path):
    from transformers import Siglip2VisionModel

    Siglip2VisionModel.from_pretrained(str(naflex["folder"])).save_pretrained(tmp_path / "tower")
    naflex["processor"].save_pretrained(tmp_path / "tower")
    encoder = load_encoder(str(tmp_path / "tower"))
    assert isinstance(encoder, HFImageModel) and not encoder.has_text and encoder.embedding_dim == 32
    pictures = images()
    packed = torch.stack([encoder.image_transform(picture) for picture in pictures])
    with torch.no_grad():
        np.testing.assert_allclose(encoder.encode_image(packed).numpy(),
                                   naflex["encoder"].encode_image(packed).numpy(), atol=1e-6)
    with pytest.raises(InputError, match="Siglip2VisionModel .* has no text tower"):
        embed_texts(encoder, ["a cat"])


def test_a_folder_without_its_preprocessing_takes_naflexs_defaults(naflex, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(naflex["folder"], folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(InputError, match="patch_size 16, but the vision tower's patches are 8"):
        load_encoder(str(folder))  # the processor's default patch, not this model's
    (folder / "preprocessor_config.json").write_text(json.dumps({"patch_size": 8}))  # the rest: the defaults
    transform = load_encoder(str(folder)).image_transform
    assert (transform.patch, transform.max_patches, transform.interpolation) == (8, 256, "bilinear")
    assert transform.mean.flatten().tolist() == [0.5] * 3 and transform.std.flatten().tolist() == [0.5] * 3


@pytest.mark.parametrize("change, message", [
    ({"do_resize": False}, "do_resize false"),
    ({"max_num_patches": 0}, "max_num_patches 0"),
    ({"patch_size": 16}, "patch_size 16, but the vision tower's patches are 8"),
    ({"resample": 5}, "resample 5"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ({"rescale_factor": 1.0}, "rescale_factor 1.0"),
])
def test_preprocessing_that_cannot_be_read_is_named(naflex, tmp_path, change, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(naflex["folder"], folder)
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(InputError, match=message) as raised:
        load_encoder(str(folder))
    assert str(path) in str(raised.value)


def test_input_not_made_by_its_transform_is_refused(naflex):
    packed = naflex["encoder"].image_transform(images()[0])[None]
    packed[0, -1, :2] = torch.tensor([5.0, 5.0])  # 25 patches, more than the 24 there are
    with pytest.raises(ValueError, match="prepared by its image_transform"):
        unpack(packed)
    with pytest.raises(ValueError, match="prepared by its image_transform"):
        unpack(torch.zeros(2, 32, 32))  # read as 31 patches: its grid, 0 x 0, is none
    with pytest.raises(ValueError, match="expected \\(batch, max_patches \\+ 1, values\\)"):
        unpack(torch.zeros(2, 3, 32, 32))  # pixels of another model's transform


def test_embed_index_and_search_with_a_siglip2_naflex_folder(naflex, tmp_path, capsys):
    embed_index_and_search(naflex, reference_texts, tmp_path, capsys)
    # an image query: the stored embedding of that image is its own nearest neighbour
    query = sorted(path for path in (tmp_path / "images").rglob("*") if path.is_file())[0]
    assert main(["search", "--index", str(tmp_path / "index"), str(query), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert hit["score"] == pytest.approx(1.0, abs=1e-5)
    # unicom serve: an uploaded image (decoded as uploads are, then patched) and a text
    from fastapi.testclient import TestClient

    from unicom.search.index import Index
    from unicom.search.service import create_app

    with TestClient(create_app(Index.load(tmp_path / "index"), naflex["encoder"])) as client:
        answer = client.post("/search", files={"image": (query.name, query.read_bytes(), "image/png")},
                             data={"k": "1"}).json()
        assert answer["results"][0]["id"] == hit["id"] and answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        texts = client.post("/search", json={"text": "a red dog", "k": 4}).json()["results"]
    assert main(["search", "--index", str(tmp_path / "index"), "--text", "a red dog", "-k", "4", "--json"]) == 0
    assert [r["id"] for r in texts] == [r["id"] for r in json.loads(capsys.readouterr().out)[0]["results"]]


def test_a_naflex_model_is_refused_as_a_frozen_backbone_by_name(naflex):
    """``unicom probe``'s model folder describes a fixed-size transform; a NaFlex one is refused
    before training, naming the backbone."""
    from unicom.unifex.model import describe_transform

    with pytest.raises(InputError, match="my-naflex: its image transform has a step .*NaFlexTransform"):
        describe_transform(naflex["encoder"].image_transform, "my-naflex")
