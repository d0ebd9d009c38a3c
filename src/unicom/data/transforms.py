"""Image decoding for extraction: bytes, files or PIL images -> RGB images, with failures named.

JPEG decoding can shrink the image by 2, 4 or 8 inside the decoder (Pillow's *draft*
mode), which is several times faster than decoding the full image and resizing it. We use
it only when the model's own transform starts with a resize and the image is at least twice
that size on both sides, so the model still receives at least the resolution it asks for.
"""

from __future__ import annotations

import io
import os
from typing import Callable

from PIL import Image

from unicom import storage


class DecodeError(Exception):
    """An image that cannot be decoded; the message is the reason shown in failure reports."""


def draft_size(transform: Callable | None) -> tuple[int, int] | None:
    """(width, height) that an image must keep for ``transform``, or None if unknown.

    Known when the transform (a torchvision ``Compose`` or a single transform) begins with
    a ``Resize``: ``Resize(224)`` (shorter side) -> (224, 224), ``Resize((h, w))`` -> (w, h).
    """
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", [transform])
    first = steps[0] if steps else None
    if not isinstance(first, T.Resize):
        return None
    size = first.size
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return size[0], size[0]
    return int(size[1]), int(size[0])


def decode_image(source, draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` (encoded bytes, a file path or URL, or a PIL image) to an RGB image.

    Returns ``(image, (width, height))`` where the size is the stored image's, before any
    draft reduction. Raises :class:`DecodeError` with a readable reason.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB"), source.size
    if isinstance(source, str) and storage.is_url(source):
        source = storage.read_bytes(source)  # a storage.FetchError when it cannot be fetched
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(os.fspath(source))
        size = image.size
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", draft)
        image.load()  # the full decode: truncated data fails here
        if image.mode != "RGB":
            image = image.convert("RGB")
    except FileNotFoundError as error:
        raise DecodeError(f"file not found: {error.filename}") from error
    except Image.UnidentifiedImageError as error:
        raise DecodeError("not an image in a format Pillow can read") from error
    except Image.DecompressionBombError as error:
        raise DecodeError(f"image too large ({error})") from error
    except Exception as error:  # Pillow's plugins raise many types on malformed data
        raise DecodeError(f"cannot decode image: {type(error).__name__}: {error}") from error
    return image, size


# Steps that take a PIL image to a PIL image, safe to run before the tensor conversion.
_PIL_STEP_NAMES = {"Resize", "CenterCrop", "MaybeConvertMode", "_convert_to_rgb"}
_TO_TENSOR_NAMES = {"ToTensor", "MaybeToTensor"}


class SplitTransform:
    """A model's image transform cut in two, so workers ship uint8 pixels instead of floats.

    When the transform is ``[PIL steps…, ToTensor, Normalize]`` (open_clip's and timm's
    evaluation transforms), :meth:`on_worker` runs the PIL steps and returns uint8
    (3, H, W), and :meth:`on_device` does ``(x / 255 - mean) / std`` on a batch where the
    model runs: the same operations as ``ToTensor`` + ``Normalize``, bit for bit, with a
    quarter of the bytes through shared and pinned memory and the GPU doing the arithmetic.
    Any other transform runs whole in :meth:`on_worker` and :meth:`on_device` passes its
    float output through.
    """

    def __init__(self, transform: Callable):
        self.transform = transform
        self.pil_steps: list[Callable] | None = None
        self.mean = self.std = None
        steps = list(getattr(transform, "transforms", []))
        names = [getattr(step, "__name__", type(step).__name__) for step in steps]
        if len(steps) >= 2 and names[-2] in _TO_TENSOR_NAMES and names[-1] == "Normalize":
            if all(name in _PIL_STEP_NAMES for name in names[:-2]) and not getattr(steps[-1], "inplace", False):
                self.pil_steps = steps[:-2]
                self.mean = tuple(float(m) for m in _as_sequence(steps[-1].mean))
                self.std = tuple(float(s) for s in _as_sequence(steps[-1].std))

    @property
    def split(self) -> bool:
        return self.pil_steps is not None

    def on_worker(self, image: Image.Image):
        """PIL RGB image -> uint8 (3, H, W) when split, else the transform's float tensor."""
        import numpy as np
        import torch

        if self.pil_steps is None:
            return self.transform(image)
        for step in self.pil_steps:
            image = step(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def on_device(self, images):
        """Batch (B, 3, H, W) from :meth:`on_worker`, on its device -> float32 model input."""
        import torch

        if images.dtype != torch.uint8:
            return images
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        return images.float().div(255).sub(mean).div(std)


def _as_sequence(value):
    return value.tolist() if hasattr(value, "tolist") else list(value)
