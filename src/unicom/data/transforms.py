"""Image decoding for extraction: bytes, files or PIL images -> RGB images, with failures named.

JPEG decoding can shrink the image by 2, 4 or 8 inside the decoder (Pillow's *draft*
mode), which is several times faster than decoding the full image and resizing it. We use
it only when the model's own transform starts with a resize and the image is at least twice
that size on both sides, so the model still receives at least the resolution it asks for.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
from typing import Callable, Iterator

from PIL import Image

from unicom import storage


class DecodeError(Exception):
    """An image that cannot be decoded; the message is the reason shown in failure reports.

    A sample whose image was not read (a shard member over :data:`MAX_IMAGE_BYTES`) carries
    one in place of its bytes: decoding it raises it.
    """


class ImageTooLarge(DecodeError):
    """An image over a size limit (:data:`MAX_IMAGE_BYTES`, :data:`MAX_RESIZED_PIXELS` or
    Pillow's decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS``); the message names it."""


@contextlib.contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """Inside the block, torch's, NumPy's and Python's global generators (timm's random
    transforms draw from all three) are seeded by ``seed``; the caller's states come back
    after it, so what the caller draws next does not depend on the block."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class DrawnPerKey:
    """A random transform whose draws for a sample are seeded by ``(seed, the sample's key)``:
    the same view of a sample whichever process, batch or run computes it (a build killed
    and run again, other worker counts). :class:`~unicom.data.loading.BatchStream` seeds it
    by :meth:`seed_of` around each sample; its ``transforms`` and ``repr`` are the wrapped
    transform's."""

    def __init__(self, transform: Callable, seed: int):
        self.transform, self.seed = transform, int(seed)
        self.transforms = getattr(transform, "transforms", [transform])

    def seed_of(self, key: str) -> int:
        import hashlib

        return int.from_bytes(hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()[:8], "little")

    def __call__(self, image):
        return self.transform(image)

    def __repr__(self) -> str:
        return repr(self.transform)


# The longest encoded image read into memory (a 100-megapixel PNG is about 300 MB
# decoded, far less encoded): longer files and shard members fail as images, unread.
MAX_IMAGE_BYTES = 256 * 2**20


def _read_image_file(location) -> bytes:
    """The bytes of an image file or URL, at most :data:`MAX_IMAGE_BYTES` of them."""
    try:
        return storage.read_bytes(location, max_bytes=MAX_IMAGE_BYTES)
    except storage.TooLarge as error:
        length = f"{error.size:,} bytes" if error.size is not None else f"over {MAX_IMAGE_BYTES:,} bytes"
        raise ImageTooLarge(f"image file of {length}, longer than the {MAX_IMAGE_BYTES:,} bytes an image may have") from error


# The most pixels the leading resize of a model's transform may make of one image (Pillow's
# decompression-bomb warning limit): resizing the short side enlarges a thin image without
# bound (a 1 x 200,000 PNG of 700 bytes would become 224 x 44,800,000 pixels, 30 GB).
MAX_RESIZED_PIXELS = 89_478_485


def leading_resize(transform: Callable | None):
    """The torchvision ``Resize`` that ``transform`` (a ``Compose`` or one step) begins with, or None."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", [transform])
    first = steps[0] if steps else None
    return first if isinstance(first, T.Resize) else None


def short_side_size(transform: Callable | None) -> int | None:
    """S when ``transform`` begins by resizing the short side of an image to S without a
    bound on the long side (``Resize(S)``), else None."""
    first = leading_resize(transform)
    if first is None or getattr(first, "max_size", None):
        return None
    size = first.size
    if isinstance(size, int):
        return size
    return int(size[0]) if len(size) == 1 else None


def resized_pixels(short_side: int, size: tuple[int, int]) -> int:
    """Pixels of an image of ``size`` (width, height) once its short side is resized to ``short_side``."""
    width, height = size
    return short_side * int(short_side * max(width, height) / max(1, min(width, height)))


def check_resized_pixels(short_side: int | None, size: tuple[int, int]) -> None:
    """Raise :class:`DecodeError` when resizing the short side of an image of ``size``
    (width, height) to ``short_side`` (:func:`short_side_size`) would make more than
    :data:`MAX_RESIZED_PIXELS` pixels; nothing when ``short_side`` is None."""
    if short_side is None:
        return
    width, height = size
    pixels = resized_pixels(short_side, size)
    if pixels > MAX_RESIZED_PIXELS:
        raise ImageTooLarge(
            f"a {width}x{height} image: resizing its short side to {short_side} would make {pixels:,} pixels, "
            f"more than the {MAX_RESIZED_PIXELS:,} an image may have (sides in a ratio above "
            f"{MAX_RESIZED_PIXELS // short_side**2}:1)"
        )


def draft_size(transform: Callable | None) -> tuple[int, int] | None:
    """(width, height) that an image must keep for ``transform``, or None if unknown.

    Known when the transform (a torchvision ``Compose`` or a single transform) begins with
    a ``Resize``: ``Resize(224)`` (shorter side) -> (224, 224), ``Resize((h, w))`` -> (w, h).
    """
    first = leading_resize(transform)
    if first is None:
        return None
    size = first.size
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return size[0], size[0]
    return int(size[1]), int(size[0])


# Pillow's modes of 16-bit samples (16-bit grayscale PNG and TIFF), values 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image.

    16-bit samples (modes :data:`SIXTEEN_BIT_MODES`, and mode ``I`` of a PNG, as Pillow
    before 10.3 opens 16-bit PNGs) are scaled to 8 bits, ``round(v * 255 / 65535)``,
    as torchvision scales them; Pillow's own conversion clips every value above 255, which
    turns a 16-bit image white. Other modes take Pillow's conversion (alpha is dropped,
    palettes and CMYK are converted, 32-bit float ``F`` values are read as 0..255).
    """
    if sixteen_bit_samples(image.mode, image.format):
        import numpy as np

        samples = np.asarray(image)
        if samples.dtype.kind == "u" and samples.dtype.itemsize == 2:  # big-endian (I;16B): swapped
            samples = samples.astype(np.uint16, copy=False)
        else:  # mode I: 32-bit integers
            samples = samples.clip(0, 65535).astype(np.uint16)
        # looked up in a table of the 65,536 values: 8-bit output only, where the arithmetic on
        # the whole image would hold 4-byte integers (12 bytes a pixel)
        image = Image.fromarray(_sixteen_to_eight()[samples], "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def sixteen_bit_samples(mode: str, format: str | None) -> bool:
    """Whether :func:`to_rgb` scales an image of ``mode`` and ``format`` from 16 to 8 bits."""
    return mode in SIXTEEN_BIT_MODES or (mode == "I" and format == "PNG")


@functools.lru_cache(maxsize=1)
def _sixteen_to_eight():
    """uint8 (65536,): ``round(v * 255 / 65535)`` of every 16-bit value v."""
    import numpy as np

    return ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


# Pillow's names of JPEG files: MPO is a JPEG with further pictures after the photo (what
# many cameras and phones write), decoded as its first picture, in draft mode too.
JPEG_FORMATS = ("JPEG", "MPO")


def decode_image(source, draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` (encoded bytes, a file path or URL, a PIL image, or an object whose
    ``decoded()`` makes the PIL image, such as :class:`unicom.data.sources.QueryCrop`) to an
    RGB image.

    Returns ``(image, (width, height))`` where the size is the stored image's, before any
    draft reduction. Raises :class:`DecodeError` with a readable reason.
    """
    if callable(getattr(source, "decoded", None)):
        try:
            source = source.decoded()
        except Exception as error:  # noqa: BLE001 - whatever it raises, this sample is left out and named
            raise DecodeError(str(error)) from error
    if isinstance(source, DecodeError):  # an image that was not read
        raise type(source)(str(source))
    if isinstance(source, str) and storage.is_url(source):
        source = _read_image_file(source)  # a storage.FetchError when it cannot be fetched
    try:
        if isinstance(source, Image.Image):  # decoded here if opened lazily (Image.open): a truncated file fails here
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(os.fspath(source))
        size = image.size
        if draft is not None and image is not source and image.format in JPEG_FORMATS:  # never the caller's image
            image.draft("RGB", draft)
        image.load()  # the full decode: truncated data fails here
        image = to_rgb(image)
    except FileNotFoundError as error:
        raise DecodeError(f"file not found: {error.filename}") from error
    except Image.UnidentifiedImageError as error:
        raise DecodeError("not an image in a format Pillow can read") from error
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image too large ({error})") from error
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
        return normalize_pixels(images, self.mean, self.std)


def thumbnail_of(source, side: int) -> Image.Image:
    """A thumbnail of at most side x side of ``source`` (anything :func:`decode_image` takes),
    decoded reduced (JPEG draft) where it can be; raises :class:`DecodeError`."""
    image, _ = decode_image(source, draft=(side, side))
    image.thumbnail((side, side), reducing_gap=2.0)
    return image


def jpeg_data_uri(image: Image.Image) -> str:
    """A PIL image as a ``data:`` URL of a JPEG (quality 85), for a self-contained HTML page."""
    import base64

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _as_sequence(value):
    return value.tolist() if hasattr(value, "tolist") else list(value)


# --------------------------------------------------------------------------- decoding where the model runs

DECODES = ("auto", "cpu", "gpu")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
# Images shrunk more than this to the model's size decode on the CPU, at a reduced size
# (Pillow's draft mode): the device would hold the whole image in float pixels, and its
# antialiased resize has a limit on the scale factor (about 47 for bicubic).
MAX_DEVICE_DOWNSCALE = 8.0
# Evaluation resizes images of one size together, in stacks of at most this many float pixels.
DEVICE_RESIZE_PIXELS = 64 * 2**20


def jpeg_size(data) -> tuple[int, int] | None:
    """(width, height) of a JPEG that the device decoder takes (RGB or greyscale), else None.

    Reads the header and the last bytes only. CMYK/YCCK JPEGs, other formats, data Pillow
    cannot identify and JPEGs that do not end with the end-of-image marker (cut short, or
    with bytes after the image) give None: they take the CPU path, where Pillow decodes
    them or names the failure. A GPU decoder is not trusted to refuse a truncated stream.
    """
    if bytes(data[:3]) != JPEG_MAGIC or not bytes(data[-64:]).rstrip(b"\x00\r\n\t ").endswith(JPEG_END):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            return image.size
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse goes to the CPU path
        return None


def encoded_bytes(image) -> bytes | None:
    """The encoded bytes of a sample's image (bytes as given, a file or URL read), or None for
    a decoded (PIL) image. Raises :class:`DecodeError` for a file that cannot be read."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, DecodeError):  # an image that was not read
        raise type(image)(str(image))
    if isinstance(image, str) and storage.is_url(image):
        return _read_image_file(image)  # a storage.FetchError when it cannot be fetched, as decode_image
    if isinstance(image, (str, os.PathLike)):
        try:
            return _read_image_file(os.fspath(image))
        except FileNotFoundError as error:
            raise DecodeError(f"file not found: {error.filename}") from error
        except OSError as error:
            raise DecodeError(f"cannot read image: {type(error).__name__}: {error}") from error
    return None


def resolve_decode(decode: str, device, transform: Callable | None) -> bool:
    """Whether images are decoded where the model runs (True) or by Pillow in the workers.

    ``decode``: ``cpu``; ``gpu`` (torchvision's decoder on the model's device: nvJPEG on a
    GPU; on a CPU device libjpeg-turbo in the main process, which exists for tests);
    ``auto``: ``gpu`` on a CUDA device when the model's transform can run on tensors.
    Raises :class:`unicom.errors.InputError` for ``gpu`` with a transform that cannot.
    """
    from unicom.errors import InputError

    if decode not in DECODES:
        raise InputError(f"decode={decode!r}: choose one of {', '.join(DECODES)}")
    if decode == "cpu" or transform is None:
        return False
    reason = TensorTransform.unsupported(transform)
    if decode == "gpu" and reason is not None:
        raise InputError(f"decode=gpu: {reason}; use decode=cpu (or auto)")
    import torch

    return reason is None and (decode == "gpu" or torch.device(device).type == "cuda")


SHARE_STEPS = 1000  # a workers' share is kept in thousandths: the same samples on every machine


def check_workers_share(share: float, key: str = "decode_workers_share") -> float:
    """``share`` (0 to 1) as the thousandths :func:`decoded_by_workers` uses; else an InputError naming ``key``."""
    from unicom.errors import InputError

    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise InputError(f"{key}={share!r}: give a share of the JPEGs from 0 to 1 (0.3: about 3 in 10)")
    return round(share * SHARE_STEPS) / SHARE_STEPS


def decoded_by_workers(index: int, share: float) -> bool:
    """Whether the JPEG of sample ``index`` (its position in its part) is decoded by the
    workers with Pillow although the model's device could decode it: ``share`` of the
    samples, spread evenly (one in three at 1/3), the same ones in every run and slice.
    Decoding on the device, the main process does per image what the workers, reading
    bytes only, mostly wait for: a share taken by them can relieve it."""
    steps = round(share * SHARE_STEPS)
    return (index + 1) * steps // SHARE_STEPS > index * steps // SHARE_STEPS


_RESIZE_NAMES = {"Resize"}
_CENTER_CROP_NAMES = {"CenterCrop"}
_RANDOM_CROP_NAMES = {"RandomResizedCrop", "RandomResizedCropAndInterpolation"}
_FLIP_NAMES = {"RandomHorizontalFlip"}
_RGB_NAMES = {"MaybeConvertMode", "_convert_to_rgb"}


class TensorTransform:
    """A model's image transform carried out on decoded uint8 tensors, on any device.

    Two forms of PIL transform are recognised: evaluation, ``Resize(short side) ->
    CenterCrop -> ToTensor -> Normalize`` (open_clip's and timm's), and training,
    ``RandomResizedCrop -> [RandomHorizontalFlip] -> ToTensor -> Normalize`` (timm's
    ``create_transform`` without colour or RandAugment steps). Each image gets a
    :meth:`plan` on the host (its random crop and flip, drawn in exactly the order and from
    the same generators as the PIL transform, so a seeded sample is cropped alike on
    either path); :meth:`__call__` applies the plans to a list of decoded images.

    Resizing uses torchvision's antialiased bicubic (or bilinear) interpolation on float
    pixels, rounded to integers as Pillow's uint8 output is. Against Pillow on the same
    decoded pixels the difference is at most a few levels of 255 at sharp edges and below
    half a level on average (``tests/test_gpu_decode.py`` states the bounds); the model's
    embeddings agree to a cosine of at least 0.999.
    """

    def __init__(self, transform: Callable):
        reason = self.unsupported(transform)
        if reason is not None:
            raise ValueError(reason)
        steps = list(transform.transforms)
        first = steps[0]
        self.size = _pair(first.size)  # (height, width) after the geometric steps
        self.random_crop = type(first).__name__ in _RANDOM_CROP_NAMES
        self.first = first
        self.interpolation = first.interpolation
        self.resize = first.size if not self.random_crop else None
        crops = [s for s in steps if type(s).__name__ in _CENTER_CROP_NAMES]
        self.crop = _pair(crops[0].size) if crops else None
        flips = [s for s in steps if type(s).__name__ in _FLIP_NAMES]
        self.flip_probability = float(flips[0].p) if flips else 0.0
        normalize = steps[-1]
        self.mean = tuple(float(m) for m in _as_sequence(normalize.mean))
        self.std = tuple(float(s) for s in _as_sequence(normalize.std))
        if self.crop is not None:
            self.size = self.crop

    @staticmethod
    def unsupported(transform: Callable) -> str | None:
        """Why ``transform`` cannot run on tensors, or None when it can."""
        steps = list(getattr(transform, "transforms", []))
        names = [getattr(step, "__name__", type(step).__name__) for step in steps]
        if len(steps) < 3 or names[-2] not in _TO_TENSOR_NAMES or names[-1] != "Normalize":
            return f"the image transform {names or type(transform).__name__} does not end in ToTensor, Normalize"
        middle = names[:-2]
        if middle and middle[0] in _RESIZE_NAMES:
            rest = [n for n in middle[1:] if n not in _RGB_NAMES]
            if rest not in ([], ["CenterCrop"]):
                return f"the image transform's steps {middle} are not Resize, CenterCrop"
            if not rest and len(_as_list(steps[0].size)) == 1:
                return "a Resize of the shorter side without CenterCrop gives images of different shapes"
        elif middle and middle[0] in _RANDOM_CROP_NAMES:
            if [n for n in middle[1:] if n not in _RGB_NAMES] not in ([], ["RandomHorizontalFlip"]):
                return (f"the training transform's steps {middle} are not a random resized crop and flip alone "
                        "(colour jitter, RandAugment and random erasing run on the CPU)")
        else:
            return f"the image transform's steps {middle} do not start with Resize or RandomResizedCrop"
        for step in steps[:-2]:
            mode = getattr(step, "interpolation", None)
            modes = mode if isinstance(mode, (list, tuple)) else [mode]
            if mode is not None and any(getattr(m, "value", m) not in ("bicubic", "bilinear") for m in modes):
                return f"interpolation {mode} has no antialiased tensor form"
        resize = steps[0]
        if middle[0] in _RESIZE_NAMES and getattr(resize, "max_size", None) is not None:
            return "Resize with max_size is not supported on tensors"
        return None

    def takes(self, width: int, height: int) -> bool:
        """Whether an image of ``width`` x ``height`` is shrunk at most :data:`MAX_DEVICE_DOWNSCALE`
        times to the model's input (a random crop may keep the whole image)."""
        if self.random_crop:
            target_height, target_width = self.size
        elif isinstance(self.resize, int) or len(_as_list(self.resize)) == 1:
            target_height = target_width = _as_list(self.resize)[0]
            width = height = min(width, height)  # the shorter side goes to the resize size
        else:
            target_height, target_width = _pair(self.resize)
        return max(width / target_width, height / target_height) <= MAX_DEVICE_DOWNSCALE

    def device_size(self, data) -> tuple[int, int] | None:
        """(width, height) of the encoded image ``data`` when it is decoded where the model
        runs (:func:`jpeg_size` and :meth:`takes`), else None (Pillow decodes it)."""
        size = jpeg_size(data)
        return size if size is not None and self.takes(*size) else None

    def plan(self, width: int, height: int) -> tuple:
        """The geometric decisions for one image of ``width`` x ``height``: for training,
        ``(top, left, crop height, crop width, interpolation, flip)`` drawn with the same
        random calls, in the same order, as the PIL transform; for evaluation, ``()``."""
        if not self.random_crop:
            return ()
        import random

        import torch

        shape = torch.empty(3, height, width, device="meta")
        top, left, h, w = self.first.get_params(shape, self.first.scale, self.first.ratio)
        interpolation = self.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        flip = bool(torch.rand(1) < self.flip_probability) if self.flip_probability > 0 else False
        return int(top), int(left), int(h), int(w), getattr(interpolation, "value", interpolation), flip

    def __call__(self, images: list, plans: list[tuple]):
        """Decoded uint8 images ((3, H, W) each, on one device) -> float32 (B, 3, h, w) model input.

        Nothing here is copied from the host or indexed by indices made on the host: on a GPU
        either is a copy after which the host waits until the stream has run everything
        queued on it (PyTorch synchronises the stream after a blocking host-to-device copy).
        """
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        device = images[0].device
        if self.random_crop:
            out = torch.empty(len(images), 3, *self.size, dtype=torch.float32, device=device)
            for i, (image, (top, left, h, w, mode, flip)) in enumerate(zip(images, plans)):
                crop = TF.crop(image, top, left, h, w).float()  # cropped as uint8: float pixels of the crop only
                pixels = TF.resize(crop, list(self.size), InterpolationMode(mode), antialias=True)
                out[i] = pixels.flip(-1) if flip else pixels
        else:
            # images of one size are resized together: one kernel for the group
            groups: dict[tuple[int, int], list[int]] = {}
            for i, image in enumerate(images):
                groups.setdefault(tuple(image.shape[-2:]), []).append(i)
            out, rows = None, [None] * len(images)
            for (height, width), members in groups.items():
                step = max(1, DEVICE_RESIZE_PIXELS // (3 * height * width))
                for first in range(0, len(members), step):
                    chunk = members[first : first + step]
                    stack = torch.stack([images[i] for i in chunk]).float()
                    pixels = TF.resize(stack, _as_list(self.resize), self.interpolation, antialias=True)
                    pixels = TF.center_crop(pixels, list(self.crop)) if self.crop else pixels
                    if len(chunk) == len(images):  # one stack of the whole batch: already in its order
                        out = pixels.contiguous()
                    else:
                        for k, i in enumerate(chunk):
                            rows[i] = pixels[k]
            if out is None:  # the rows of several stacks, put in the batch's order by one copy
                out = torch.stack(rows)
        out.clamp_(0, 255).round_()  # Pillow resizes to uint8
        return normalize_pixels(out, self.mean, self.std)


def normalize_pixels(images, mean, std):
    """Float or uint8 pixels (B, 3, H, W) in 0..255 -> ``(x / 255 - mean) / std``, float32, in place for float input."""
    import torch

    images = images.float() if images.dtype != torch.float32 else images
    return images.div_(255).sub_(_channel_values(mean, images.device)).div_(_channel_values(std, images.device))


_CHANNEL_VALUES: dict = {}  # (values, device) -> float32 (C, 1, 1) tensor on the device


def _channel_values(values, device):
    """``values`` (one per channel) as a float32 (C, 1, 1) tensor on ``device``, copied there
    once per device (a copy from host memory per batch could wait for the device's queue)."""
    import torch

    key = (tuple(values), str(device))
    found = _CHANNEL_VALUES.get(key)
    if found is None:
        found = _CHANNEL_VALUES[key] = torch.tensor(key[0], dtype=torch.float32).view(-1, 1, 1).to(device)
    return found


def decode_jpegs(encoded: list, device) -> list:
    """Decode JPEG bytes (1-D uint8 CPU tensors) to RGB uint8 (3, H, W) tensors on ``device``
    (nvJPEG on a GPU, in one batched call); an image the decoder refuses gives its
    exception in its place (the batch is retried one image at a time to find it)."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one spelling: torchvision makes a decoder per device name
        device = torch.device("cuda", torch.cuda.current_device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice that its decoders move to TorchCodec
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except torch.cuda.OutOfMemoryError:
            raise  # not the images' fault: a smaller batch size is the cure
        except RuntimeError:
            results = []
            for data in encoded:
                try:
                    results.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError as error:
                    results.append(error)
            return results


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else size


def _as_list(size) -> list[int]:
    return [size] if isinstance(size, int) else list(size)


class EncodedJpegs:
    """The JPEGs of a batch, left encoded for the model's device.

    ``data``: their bytes concatenated (one uint8 tensor: one shared-memory block from a
    worker, however many images); ``ends``: where each ends; ``plans``: their
    :meth:`TensorTransform.plan`; ``slots``: their positions among the batch's samples;
    ``sources`` and ``keys``: where each came from and its key (named in failure reports).
    """

    def __init__(self, chunks: list[bytes], plans: list[tuple], slots: list[int], sources: list[str],
                 keys: list[str] | None = None):
        import numpy as np
        import torch

        self.ends = np.cumsum([len(c) for c in chunks]).tolist()
        self.data = torch.from_numpy(np.frombuffer(b"".join(chunks), dtype=np.uint8).copy())
        self.plans, self.slots, self.sources = list(plans), list(slots), list(sources)
        self.keys = list(keys) if keys is not None else [""] * len(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def pin_memory(self) -> "EncodedJpegs":
        """The bytes moved to pinned (page-locked) memory, in the DataLoader's pinning thread:
        the decoder's copies to the GPU then go without a staging copy per image (from
        pageable memory each costs the host a synchronous copy; 8,128 of them took 222 ms of
        the main process per 8,000 images on an H200)."""
        self.data = self.data.pin_memory()
        return self

    def images(self, device) -> list:
        """Decoded uint8 (3, H, W) tensors on ``device``; an image the device decoder refuses
        is decoded by Pillow instead, and one Pillow refuses too is its :class:`DecodeError`."""
        import numpy as np
        import torch

        starts = [0] + self.ends[:-1]
        encoded = [self.data[a:b] for a, b in zip(starts, self.ends)]
        decoded = decode_jpegs(encoded, device)
        if self.data.is_pinned():
            _hold_until_the_device_passes(self.data, device)
        for i, image in enumerate(decoded):
            if isinstance(image, Exception):
                try:
                    pil, _ = decode_image(encoded[i].numpy().tobytes())
                    decoded[i] = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).to(device)
                except DecodeError as error:
                    decoded[i] = error
        return decoded


_HELD: list = []  # (event, pinned tensor): host memory a device copy may still be reading
_HELD_LOCK = threading.Lock()


def _hold_until_the_device_passes(tensor, device) -> None:
    """Keep ``tensor`` (pinned host memory that a decoder copied from) alive until the work
    queued so far on ``device``'s current stream is done.

    Released earlier, PyTorch's caching host allocator could hand its block to the next
    batch's bytes while a copy still reads it (it guards only blocks copied with
    ``Tensor.copy_``), and an image would be decoded from the wrong bytes. torchvision's
    decoder waits for its own stream before returning and orders the current stream after
    it, so the event recorded here passes once the decoder is done with the bytes, whatever
    its version does inside.
    """
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    with _HELD_LOCK:
        while _HELD and _HELD[0][0].query():
            _HELD.pop(0)
        _HELD.append((event, tensor))


def images_on_device(count: int, cpu_images, jpegs: EncodedJpegs | None, device, split: SplitTransform,
                     tensor: TensorTransform | None):
    """The model input of a batch whose samples took either path: float32 (n, 3, H, W) on
    ``device`` in the order of the batch, and ``{position: reason}`` of the JPEGs that no
    decoder could read (left out, so ``n = count - len(reasons)``).

    ``cpu_images``: (count - len(jpegs), 3, H, W) from :meth:`SplitTransform.on_worker`
    (uint8, or the transform's float output) or None; ``jpegs``: the rest, decoded here.
    """
    if not jpegs:
        return split.on_device(cpu_images.to(device, non_blocking=True)), {}
    return assemble_model_input(count, cpu_images, jpegs.images(device), jpegs, device, split, tensor)


def assemble_model_input(count: int, cpu_images, decoded: list, jpegs: EncodedJpegs, device, split: SplitTransform,
                         tensor: TensorTransform):
    """:func:`images_on_device` once the JPEGs are ``decoded`` (a tensor or an exception
    each): their model input and the CPU path's, in the batch's order, failures left out.

    The batch is put in order by stacking its rows (one copy on the device), never by
    indices made on the host: on a GPU those would be copied there first, and after a
    blocking copy the host waits until the stream has run everything queued on it.
    """
    import torch

    failed: dict[int, str] = {}
    good = [i for i, image in enumerate(decoded) if not isinstance(image, Exception)]
    for i, image in enumerate(decoded):
        if isinstance(image, Exception):
            failed[jpegs.slots[i]] = str(image)
    from_jpegs = tensor([decoded[i] for i in good], [jpegs.plans[i] for i in good]) if good else None
    on_cpu = None
    if cpu_images is not None and len(cpu_images):
        on_cpu = split.on_device(cpu_images.to(device, non_blocking=True))
    if on_cpu is None and not failed and jpegs.slots == list(range(count)):
        return from_jpegs, failed  # the usual batch: every sample a JPEG decoded here, in order
    rows = {}
    for k, i in enumerate(good):
        rows[jpegs.slots[i]] = from_jpegs[k]
    if on_cpu is not None:
        on_jpeg = set(jpegs.slots)
        for k, i in enumerate(i for i in range(count) if i not in on_jpeg):
            rows[i] = on_cpu[k]
    if not rows:
        return torch.empty(0, 3, *tensor.size, dtype=torch.float32, device=device), failed
    return torch.stack([rows[i] for i in range(count) if i in rows]), failed
