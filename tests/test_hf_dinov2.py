"""DINOv2 models saved by Hugging Face transformers (``Dinov2Model`` and
``Dinov2WithRegistersModel`` folders: Meta's ``facebook/dinov2-*`` models on the Hub) as image
encoders, against transformers' own model and image processor on small models built in the
test, and through ``unicom embed``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from unicom.cli import main
from unicom.embed import embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import HFImageModel

from support import class_image, tiny_hf_dinov2, write_class_folder
from test_hf_clip import images_embed_as_transformers_embeds_them, reference_images, unit


@pytest.fixture(scope="module", params=[0, 2], ids=["dinov2", "with-registers"])
def dinov2(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-dinov2") / "model"
    model, processor = tiny_hf_dinov2(folder, registers=request.param)
    return {"folder": folder, "model": model, "processor": processor, "encoder": load_encoder(str(folder)),
            "registers": request.param}


def test_a_folder_loads_as_an_image_encoder_without_texts(dinov2):
    encoder = dinov2["encoder"]
    assert isinstance(encoder, HFImageModel) and not encoder.has_text and encoder.embedding_dim == 32
    assert type(encoder.model).__name__ == ("Dinov2WithRegistersModel" if dinov2["registers"] else "Dinov2Model")
    assert encoder.weights_sha256() == load_encoder(str(dinov2["folder"])).weights_sha256()
    with pytest.raises(InputError, match=r"has no text tower"):
        embed_texts(encoder, ["a cat"])
    with pytest.raises(InputError, match=r"has no text tower \(DINOv2 embeds images only\)"):
        encoder.tokenize(["a cat"])


def test_images_embed_as_transformers_embeds_them(dinov2, tmp_path):
    # ImageNet's std of about 0.225: a grey level is about 0.017 of a normalised pixel
    pixels = images_embed_as_transformers_embeds_them(dinov2, tmp_path, mean=1e-3, most=0.05)
    assert pixels.shape == (4, 3, 32, 32)


def test_a_folder_without_its_preprocessing_takes_dinov2s(dinov2, tmp_path):
    from transformers import BitImageProcessor

    bare = tmp_path / "bare"
    shutil.copytree(dinov2["folder"], bare)
    (bare / "preprocessor_config.json").unlink()
    image = class_image(0, 0, 300)
    published = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    expected = published(images=[image], return_tensors="pt")["pixel_values"][0]
    ours = load_encoder(str(bare)).image_transform(image)
    assert ours.shape == expected.shape == (3, 224, 224) and float((ours - expected).abs().mean()) < 1e-3


def test_unicom_embed_stores_transformers_embeddings(dinov2, tmp_path):
    from PIL import Image

    paths = write_class_folder(tmp_path / "images", [0, 1], 3)
    assert main(["embed", "--input", str(tmp_path / "images"), "--model", str(dinov2["folder"]), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32", "--workers", "0"]) == 0
    stored = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    import pyarrow.parquet as pq

    order = [str(path) for path in pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet")
             .column("image_path").to_pylist()]
    expected, _ = reference_images(dinov2, [Image.open(path).convert("RGB") for path in order])
    assert len(order) == len(paths) and (np.sum(stored * unit(expected), axis=1) >= 0.9999).all()
    assert main(["embed", "--input", str(tmp_path / "images"), "--model", str(dinov2["folder"]), "--out",
                 str(tmp_path / "emb-text"), "--modalities", "image,text", "--workers", "0"]) != 0


def test_a_unifex_model_on_a_dinov2_folder_exports_and_loads_again(dinov2, tmp_path):
    unifex_model_exports_and_loads_again(dinov2, 32, tmp_path)


def unifex_model_exports_and_loads_again(entry, width: int, tmp_path):
    """The frozen backbone of a UniFEx model named by the folder (``entry``'s, whose features are
    ``width`` wide): the exported model folder rebuilds it, its transform described, and gives the
    neck's embedding of its features."""
    import torch

    from unicom.models.export import save_model
    from unicom.unifex.model import LinearNeck, backbone_features, describe_transform, unifex_settings

    backbone = entry["encoder"]
    settings = unifex_settings(str(entry["folder"]), None, width, {"kind": "linear", "embedding_dim": 8,
                                                                   "batchnorm": False})
    torch.manual_seed(1)
    neck = LinearNeck(width, 8, batchnorm=False)
    folder = save_model(tmp_path / "model", {f"neck.{k}": v for k, v in neck.state_dict().items()}, "unifex",
                        settings, describe_transform(backbone.image_transform), embedding_dim=8)
    encoder = load_encoder(str(folder))
    images = torch.stack([encoder.image_transform(class_image(label, 0, size=80)) for label in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(images), neck.eval()(backbone_features(backbone, images)))
