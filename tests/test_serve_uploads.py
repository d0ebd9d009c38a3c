"""What an uploaded image becomes before ``unicom serve`` embeds it: the pixels of a full
decode, held as a small image while it waits for its batch."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torchvision import transforms as T

from unicom.search.service import create_app
from unicom.search.uploads import DECODER_OVERHEAD, ModelInput, decode_for_model, decoding_bytes

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
    """Four bytes a pixel (Pillow keeps RGB as RGBX): the resized 64000 x 32 image, Pillow's
    first pass over the rows (64000 wide, as high as the image), the 32 x 33 window."""
    prepare = ModelInput(TRANSFORM)
    assert prepare.resized_bytes((20000, 10)) == 4 * (64000 * 32 + 64000 * 10 + 32 * 33)
    assert prepare.resized_bytes((10, 20000)) == 4 * (32 * 64000 + 32 * 20000 + 32 * 33)
    assert ModelInput(T.Compose([T.Resize((32, 32)), T.ToTensor()])).resized_bytes((20000, 10)) == 0


def test_what_decoding_holds_is_counted_by_mode_and_format():
    """Pillow keeps 1, L and P in a byte a pixel, 16-bit modes in two, the others in four;
    a mode other than RGB is copied to RGB (16-bit samples through 6 bytes more, F through
    L); WebP's decoder holds 14 bytes a pixel more."""
    pixels = 1000 * 10
    for mode, format, per_pixel in [("RGB", "JPEG", 4), ("L", "PNG", 1 + 4), ("P", "GIF", 1 + 4),
                                    ("RGBA", "PNG", 4 + 4), ("CMYK", "JPEG", 4 + 4), ("I;16", "PNG", 2 + 4 + 6),
                                    ("I;16B", "TIFF", 2 + 4 + 6), ("I", "TIFF", 4 + 4), ("I", "PNG", 4 + 4 + 16),
                                    ("F", "TIFF", 4 + 4 + 1), ("RGB", "WEBP", 4 + 14), ("RGBA", "WEBP", 4 + 4 + 14)]:
        assert decoding_bytes((1000, 10), mode, format) == pixels * per_pixel + DECODER_OVERHEAD, (mode, format)


def can_reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not can_reset_high_water_mark(), reason="needs Linux's /proc/self/clear_refs (the peak resident memory)")
@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_what_decoding_holds_is_within_what_the_server_counts(tmp_path):
    """Noise images of each kind decoded in a fresh process, for a model (short side to 224)
    and as an item's thumbnail: the most resident memory the process held over each
    decoding (the kernel's own high-water mark, reset before it) is at most what the
    decoding budget counts for it, and the count at most 1.6 times that (plus the fixed
    overhead counted for every image)."""
    import json
    import subprocess

    kinds = ["RGB:JPEG", "L:PNG", "P:GIF", "RGBA:PNG", "CMYK:JPEG", "I;16:PNG", "F:TIFF", "RGB:WEBP", "RGBA:WEBP"]
    found = subprocess.run([sys.executable, str(Path(__file__).with_name("decoding_memory.py")), "1600", "1200", *kinds],
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert [line["kind"] for line in lines] == kinds
    for line in lines:
        for path in ("upload", "thumbnail"):
            held, counted = line[path]
            assert held <= counted <= 1.6 * held + DECODER_OVERHEAD, (line["kind"], path, held, counted)


@pytest.mark.skipif(not can_reset_high_water_mark(), reason="needs Linux's /proc/self/clear_refs (the peak resident memory)")
def test_what_fetching_an_image_url_holds_is_within_what_the_fetches_budget_counts():
    """Files of 1, 6.25 and 20 MB fetched from a local HTTP server in a fresh process, as
    /knn-service fetches an image_url: the most resident memory held over each fetch is at
    most what the fetches budget counts for it (twice its length) and a few read buffers
    (measured: 0.8 to 2.0 times the length, as the C allocator reuses the pieces' memory or not)."""
    import json
    import subprocess

    sizes = ["1000000", "6250000", "20000000"]
    found = subprocess.run([sys.executable, str(Path(__file__).with_name("decoding_memory.py")), "fetch", *sizes],
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert [str(line["fetch"]) for line in lines] == sizes
    for line in lines:
        assert line["counted"] == 2 * line["fetch"]
        assert line["held"] <= line["counted"] + 256 * 1024, line


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
    resized = (short_side * 2000) * short_side + (short_side * 2000) * 10 + short_side * (short_side + 1)
    assert app.state.decoding.peak == 4 * 20000 * 10 + DECODER_OVERHEAD + 4 * resized


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
