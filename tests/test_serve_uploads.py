"""What an uploaded image becomes before ``unicom serve`` embeds it: the pixels of a full
decode, held as a small image while it waits for its batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torchvision import transforms as T

from unicom.search.service import create_app
from unicom.search.uploads import ModelInput, decode_for_model, decoded_bytes

from support import indexed_image_collection

# a model transform as open_clip and timm make them: short side to 32, centre crop 30
TRANSFORM = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(30), T.ToTensor(),
                       T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def reference(data: bytes) -> torch.Tensor:
    """The model input as open_clip's preprocess makes it: Pillow's full decode, then the transform."""
    return TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_uploaded_jpeg_reaches_the_model_as_its_full_decode():
    # 512 x 384 is 12 times the model's 32 pixels: a decoder scaling by 1/8 would change the pixels
    data = encoded(noise(64, 48).resize((512, 384), Image.BICUBIC), "JPEG")
    waiting = decode_for_model(data, "q.jpg", ModelInput(TRANSFORM), 512 * 384)
    assert waiting.height == 32 and waiting.width in (32, 33)  # resized to 42 x 32, cut around the crop
    assert torch.equal(TRANSFORM(waiting), reference(data))


@pytest.mark.parametrize("size", [(20000, 10), (10, 20000), (1001, 10), (1002, 10), (10, 1003), (43, 32), (33, 32)])
def test_a_thin_upload_waits_as_the_window_its_centre_crop_takes(size):
    data = encoded(noise(*size, seed=sum(size)), "PNG")
    waiting = decode_for_model(data, "thin.png", ModelInput(TRANSFORM), size[0] * size[1])
    assert sorted(waiting.size) in ([32, 32], [32, 33])  # 20000 x 10 would otherwise wait as 64000 x 32
    assert torch.equal(TRANSFORM(waiting), reference(data))


def test_the_upload_of_a_square_image_is_resized_only():
    data = encoded(noise(100, 100), "PNG")
    waiting = decode_for_model(data, "q.png", ModelInput(TRANSFORM), 100 * 100)
    assert waiting.size == (32, 32) and torch.equal(TRANSFORM(waiting), reference(data))


def test_what_the_first_resize_makes_is_counted_in_bytes():
    prepare = ModelInput(TRANSFORM)
    assert prepare.resized_bytes((20000, 10)) == 3 * 32 * 64000
    assert prepare.resized_bytes((10, 20000)) == 3 * 32 * 64000
    assert ModelInput(T.Compose([T.Resize((32, 32)), T.ToTensor()])).resized_bytes((20000, 10)) == 0


def test_a_thin_upload_takes_its_resized_size_from_the_decoding_budget(tmp_path):
    """A 20000 x 10 PNG of a few hundred bytes is 600 KB decoded, but the model's first
    resize (short side to 160) makes 3.2 million pixels of it: the budget that bounds what
    uploads being decoded hold (--max-decode-mb) counts both."""
    found = indexed_image_collection(tmp_path)
    app = create_app(found["index"], found["encoder"])
    data = encoded(Image.new("RGB", (20000, 10), (30, 160, 90)), "PNG")
    with TestClient(app) as client:
        response = client.post("/search", files={"image": ("thin.png", data, "image/png")}, data={"k": "3"})
    assert response.status_code == 200, response.text
    short_side = 168  # test_vit's transform: Resize(168), CenterCrop(160)
    assert app.state.decoding.peak == decoded_bytes((20000, 10), 3) + 3 * short_side * (short_side * 2000)


def mpo_photo() -> bytes:
    """A JPEG that carries a second picture after the photo, as many cameras and phones
    write them: Pillow names its format MPO."""
    photo = noise(64, 48, seed=3)
    buffer = io.BytesIO()
    photo.save(buffer, format="MPO", save_all=True, append_images=[photo.transpose(Image.FLIP_LEFT_RIGHT)])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    return buffer.getvalue()


def test_a_phone_photo_with_a_second_picture_is_searched_and_served_as_a_jpeg(tmp_path):
    import pyarrow as pa

    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    found = indexed_image_collection(tmp_path)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(mpo_photo())
    rows = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    write_part(tmp_path / "photos", 0, image=rows, metadata=pa.table({"key": ["photo"], "image_path": [str(photo)]}))
    app = create_app({"classes": found["index"], "photos": Index.build(tmp_path / "photos", tmp_path / "photos_index")},
                     {"classes": found["encoder"]})
    with TestClient(app) as client:
        searched = client.post("/search", files={"image": ("photo.jpg", photo.read_bytes(), "image/jpeg")}, data={"k": "3"})
        served = client.get("/image/0?index=photos")
    assert searched.status_code == 200, searched.text
    assert len(searched.json()["results"]) == 3
    assert served.status_code == 200, served.text
    assert served.headers["content-type"] == "image/jpeg" and served.content == photo.read_bytes()


def test_an_upload_that_is_not_an_image_lists_each_accepted_format_once():
    from fastapi import HTTPException

    from unicom.search.uploads import probe_image

    with pytest.raises(HTTPException) as refused:
        probe_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "drawing.svg", 10**6, 10**6)
    assert refused.value.status_code == 415
    assert refused.value.detail == "drawing.svg: not an image; upload a JPEG, PNG, WebP, GIF, BMP file"
