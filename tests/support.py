"""Small real inputs for tests: images with class-dependent content, webdataset tars.

Images are real encoded files (JPEG/PNG) written with Pillow. A class is a colour and a
stripe orientation plus per-image noise, so that even simple features separate classes.
"""

from __future__ import annotations

import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def class_image(label: int, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image whose content depends on ``label`` (colour, stripes) and ``index`` (noise)."""
    rng = np.random.default_rng([seed, label, index])
    base = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 199 + 90) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = 4 + (label % 5) * 3
    stripes = ((xx if label % 2 else yy) // period % 2).astype(np.float32)[..., None]
    pixels = base * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_image(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_class_folder(root: Path, labels: list[int], per_class: int, size: int = 64, fmt: str = "JPEG") -> list[Path]:
    """``root/<label>/<i>.jpg`` for each label; returns the written paths in order."""
    paths = []
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for label in labels:
        folder = Path(root) / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:04d}{suffix}"
            path.write_bytes(encode_image(class_image(label, i, size), fmt))
            paths.append(path)
    return paths


def write_tar_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar: each sample ``{"key": ..., "jpg"|"png": bytes, "txt": str, "json": dict}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["key"]
            for ext, value in sample.items():
                if ext == "key":
                    continue
                if isinstance(value, dict):
                    value = json.dumps(value).encode()
                elif isinstance(value, str):
                    value = value.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
