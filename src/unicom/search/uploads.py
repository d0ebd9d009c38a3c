"""Uploaded images for ``unicom serve``: checked from their header, decoded straight to the model's input.

:func:`probe_image` reads the format and size from the header and answers 413 (too many
bytes or pixels, decompression bombs included) or 415 (not an accepted image) before
anything is decoded (:func:`read_header`; :func:`decoding_bytes` is what decoding then
holds, the share of the server's decoding budget that uploads and thumbnails take).
:func:`decode_for_model` decodes in full, as ``unicom embed`` (without ``--draft``) and
``unicom search`` do, so that an upload of an indexed image gives its indexed embedding,
and applies the model's leading resize and the window of it that the model's centre crop
takes (:class:`ModelInput`), so that a query waits for its batch as a small image; after a
large image it hands the freed memory back to the system. :func:`parse_form` reads a
multipart body (python-multipart's parser), its file copied out of the body once;
:func:`take_base64` the base64 images of JSON bodies.
"""

from __future__ import annotations

import binascii
import io
import re
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from fastapi import HTTPException

from unicom.search.item_images import STORED_MEDIA_TYPES

# Pillow's format names -> what users call them; Pillow names a JPEG that carries more than one
# picture (an MPO: what many cameras and phones write, a preview or depth map after the photo) MPO
IMAGE_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
ACCEPTED = ", ".join(dict.fromkeys(IMAGE_FORMATS.values()))  # for messages: JPEG, PNG, WebP, GIF, BMP
MEDIA_TYPES = {name: STORED_MEDIA_TYPES[name] for name in IMAGE_FORMATS}  # of uploads: the stored formats but TIFF
MAX_PIXELS = 40_000_000  # the largest image accepted, in pixels (the documented limit)
TRIM_PIXELS = 4_000_000  # after decoding an image this large, freed memory goes back to the system
MAX_REDIRECTS = 5  # redirects an image_url may take


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def probe_image(data: bytes, name: str, max_upload: int, max_pixels: int) -> tuple[str, tuple[int, int], str]:
    """(format, (width, height), mode) from the image header (:func:`read_header`),
    answering 413/415 for oversized or unsupported files."""
    from PIL import Image

    if len(data) > max_upload:
        raise _error(413, f"{name}: {len(data)} bytes, larger than the limit of {max_upload} bytes")
    try:
        kind, (width, height), mode = read_header(data)
    except Image.DecompressionBombError as error:  # Pillow's own limit, far above ours
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise _error(413, f"{name}: {size}, more than the limit of {max_pixels:,} pixels") from None
    except Exception:  # Pillow raises several types for data it cannot identify
        raise _error(415, f"{name}: not an image; upload a {ACCEPTED} file") from None
    if kind not in IMAGE_FORMATS:
        raise _error(415, f"{name}: {kind} images are not accepted; upload a {ACCEPTED} file")
    if width * height > max_pixels:
        raise _error(413, f"{name}: {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} pixels")
    return kind, (width, height), mode


def read_header(source, draft: tuple[int, int] | None = None) -> tuple[str, tuple[int, int], str]:
    """(format, (width, height), mode) of the image in ``source`` (bytes or a local path)
    from its header, nothing decoded. With ``draft``, a JPEG's size and mode as
    :func:`unicom.data.transforms.decode_image` decodes it in draft mode. Raises what
    Pillow raises for data it cannot identify (a ``DecompressionBombError`` included)."""
    from PIL import Image

    from unicom.data.transforms import JPEG_FORMATS

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as probe:
        if draft is not None and probe.format in JPEG_FORMATS:
            probe.draft("RGB", draft)
        return probe.format, probe.size, probe.mode


# Bytes a pixel takes in Pillow's memory: one in modes 1, L and P, two in the 16-bit modes,
# four in every other (RGB is kept as four bytes a pixel, as RGBA is).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, **dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), 2)}
# Bytes a pixel takes in a format's decoder beside the image: Pillow's WebP plugin holds the
# frame that libwebp decoded and its copy in a bytes object (measured: 13.7 a pixel for RGB).
_DECODER_BYTES = {"WEBP": 14}
# What decoders hold besides the pixels, whatever the size: read buffers of up to a MiB.
DECODER_OVERHEAD = 2 << 20


def pixel_bytes(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in Pillow's memory."""
    return _PIXEL_BYTES.get(mode, 4)


def decoding_bytes(size: tuple[int, int], mode: str, format: str | None) -> int:
    """The most bytes that decoding an image of ``size`` (width, height) pixels, ``mode``
    and ``format`` (as :func:`read_header` gives them) to RGB holds at once
    (:func:`unicom.data.transforms.decode_image`): its pixels; their RGB copy when
    ``mode`` is not RGB, with what :func:`~unicom.data.transforms.to_rgb` holds meanwhile
    (16-bit samples: read out twice over, looked up to 8 bits, an L image; F goes through L);
    what the format's decoder holds beside them; :data:`DECODER_OVERHEAD`."""
    from unicom.data.transforms import sixteen_bit_samples

    per_pixel = pixel_bytes(mode) + _DECODER_BYTES.get(format, 0)
    if mode != "RGB":
        per_pixel += pixel_bytes("RGB")
        if sixteen_bit_samples(mode, format):
            # read out (twice over while Pillow joins its pieces), I's clipped and as 16 bits, 8 bits, L
            per_pixel += 2 * 4 + 4 + 2 + 1 + 1 if mode == "I" else 2 * 2 + 1 + 1
        elif mode == "F":
            per_pixel += pixel_bytes("L")
    return size[0] * size[1] * per_pixel + DECODER_OVERHEAD


def decode_for_model(data: bytes, name: str, prepare: "ModelInput", pixels: int):
    """Decode to RGB in full, then about the model's input size (:class:`ModelInput`)."""
    from unicom.data.transforms import DecodeError, check_resized_pixels, decode_image

    try:
        image = decode_image(data)[0]
        check_resized_pixels(prepare.short_side, image.size)
        small = prepare(image)
    except DecodeError as error:
        raise _error(415, f"{name}: {error}") from None
    finally:
        image = None
    return_free_memory(pixels)
    return small


def return_free_memory(pixels: int) -> None:
    """After an image of ``pixels`` pixels was decoded and dropped: when it was large
    (:data:`TRIM_PIXELS`), give freed heap memory back to the system (glibc's
    ``malloc_trim``; elsewhere nothing). Uploads and thumbnails of items call it.

    A large image is decoded in blocks that the C allocator keeps once freed, spread over
    the arenas of the threads that decoded; without this, a burst of large images leaves
    the process gigabytes larger than it needs to be.
    """
    if pixels < TRIM_PIXELS:
        return
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


class ModelInput:
    """The leading resize of a model's transform, run where an upload is decoded, so that a
    query waits for its batch at about the model's input size. The transform resizes again
    to the same size, which is a copy: the model sees the pixels it would have seen.

    When the transform is ``Resize(S) -> CenterCrop(c)`` (c <= S), the resized image is cut
    to a window of S x S or S x (S + 1) pixels around the centre crop, chosen so that the
    transform's resize is still a copy and its centre crop takes the same pixels: a thin
    image (20000 x 10 pixels becomes 336,000 x 168 at S = 168, 169 MB) waits as a square.
    """

    def __init__(self, transform: Callable):
        from unicom.data.transforms import _pair, leading_resize, short_side_size

        self.resize = leading_resize(transform)
        self.short_side = short_side_size(transform)
        steps = list(getattr(transform, "transforms", []))
        second = type(steps[1]).__name__ if len(steps) > 1 else None
        crop = _pair(steps[1].size) if second == "CenterCrop" else None
        fits = self.short_side is not None and crop is not None and max(crop) <= self.short_side
        self.crop = crop if fits else None  # (height, width) of the transform's centre crop

    def held_bytes(self, size: tuple[int, int], mode: str, format: str | None) -> int:
        """The most bytes that :func:`decode_for_model` holds for an image of ``size``,
        ``mode`` and ``format`` (:func:`probe_image`): its decoding and the leading resize
        (for a thin image, far more)."""
        return decoding_bytes(size, mode, format) + self.resized_bytes(size)

    def resized_bytes(self, size: tuple[int, int]) -> int:
        """Bytes that the leading resize holds for an RGB image of ``size`` (width, height):
        the resized image, Pillow's first pass (the new width by the old height: it resizes
        the rows first) and the window cut from the result; 0 when the transform does not
        begin by resizing the short side (a resize to a fixed size makes the model's small
        input)."""
        from unicom.data.transforms import resized_pixels

        if self.short_side is None:
            return 0
        width, height = size
        pixels = resized_pixels(self.short_side, size)
        new_width = pixels // self.short_side if width >= height else self.short_side
        window = self.short_side * (self.short_side + 1) if self.crop is not None else 0
        return pixel_bytes("RGB") * (pixels + new_width * height + window)

    def __call__(self, image):
        if self.resize is None:
            return image
        image = self.resize(image)
        return image if self.crop is None else self._window(image)

    def _window(self, image):
        """The part of ``image`` (resized, short side S) that the centre crop needs (see the class)."""
        side = self.short_side
        width, height = image.size
        wide = width >= height
        length, crop = (width, self.crop[1]) if wide else (height, self.crop[0])
        if min(width, height) != side:
            return image
        start = int(round((length - crop) / 2.0))  # where the transform's centre crop starts (torchvision's rounding)
        for window in (side, side + 1):
            first = start - int(round((window - crop) / 2.0))
            if window < length and 0 <= first <= length - window:
                box = (first, 0, first + window, height) if wide else (0, first, width, first + window)
                return image.crop(box)
        return image


BASE64_PIECE = 1 << 19  # characters of base64 decoded between two turns of the event loop (~2 ms here)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]")


async def take_base64(model, field: str) -> bytes:
    """The bytes of the base64 text in ``model.<field>`` (base64, or a base64 data URL; line
    breaks and spaces between characters allowed), a 400 naming ``field`` and what is wrong
    when it is not that.

    The field is set to None first, so that this call holds the text's last reference and
    drops it before the decoded pieces are joined: the text and its bytes are held at most
    1.75 times the text, as one call to :func:`binascii.a2b_base64` would hold them. The text
    is checked and decoded in pieces of :data:`BASE64_PIECE` characters, the event loop let in
    between (13 MB decoded at once kept other requests waiting 26 ms)."""
    import asyncio

    text = getattr(model, field)
    setattr(model, field, None)
    start = text.find(",") + 1 if text.startswith("data:") else 0  # data:image/png;base64,....
    if text.startswith("data:") and not start:
        raise _error(400, f"{field}: a data URL without its data; send data:<type>;base64,<base64>, or the base64 alone")
    pieces, carry, part, end = [], "", "", len(text)
    for at in range(start, end, BASE64_PIECE):
        last = at + BASE64_PIECE >= end
        part = carry + text[at:at + BASE64_PIECE]
        if _BASE64.fullmatch(part) is None:
            part = "".join(part.split())  # line breaks, as base64 tools wrap their output
            if _BASE64.fullmatch(part) is None:
                raise _error(400, _base64_fault(field, text, at))
        cut = len(part) if last else len(part) - len(part) % 4
        if not last and "=" in part:  # padding ends the text: only white space may follow it
            cut = part.index("=") // 4 * 4
        part, carry = part[:cut], part[cut:]
        try:
            pieces.append(binascii.a2b_base64(part))  # exact here: the characters checked, whole groups of four
        except binascii.Error as error:
            raise _error(400, f"{field}: not valid base64 ({error}); send standard base64 (A-Z, a-z, 0-9, + and /, "
                              "padded with =)") from None
        await asyncio.sleep(0)
    del text, part
    data = b"".join(pieces)
    if not data:
        raise _error(400, f"{field}: empty")
    return data


def _base64_fault(field: str, text: str, at: int) -> str:
    """What is wrong in the piece of ``text`` from ``at`` on, whose characters failed the check."""
    found = _NOT_BASE64.search(text, at, at + BASE64_PIECE)
    if found is None:
        what = "'=' before the end of the text (padding ends base64)"
    elif found.group() in "-_":
        what = f"{found.group()!r} at position {found.start():,}, of URL-safe base64"
    else:
        what = f"the character {found.group()!r} at position {found.start():,}"
    return f"{field}: not valid base64: {what}; send standard base64 (A-Z, a-z, 0-9, + and /, padded with =)"


@dataclass(frozen=True)
class FormFile:
    """A file of a multipart form: its name as the client gave it, its declared media type
    (lower case, "" when none) and its bytes."""

    filename: str
    content_type: str
    data: bytes


class Form:
    """The fields of a multipart body, in order: name -> text, or :class:`FormFile` for a file."""

    def __init__(self, items: list[tuple[str, str | FormFile]]):
        self.items = items

    def keys(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.items))

    def getlist(self, name: str) -> list[str | FormFile]:
        return [value for key, value in self.items if key == name]

    def get(self, name: str, default=None):
        return next((value for key, value in self.items if key == name), default)


MAX_FORM_FIELD = 1 << 20  # the longest text field of a form, in bytes


def parse_form(body: bytes, content_type: str, max_files: int = 1, max_fields: int = 16) -> Form:
    """The fields of the multipart/form-data ``body`` (whole, as received), its boundary from
    ``content_type`` (the request's header). A file's bytes are copied out of the body once
    (the body and the files are the most it holds). Malformed bodies, more than ``max_files``
    files or ``max_fields`` text fields, a text field over :data:`MAX_FORM_FIELD` bytes and
    text not in the form's charset (its ``charset`` parameter; UTF-8, as browsers send, when
    absent) answer 400."""
    import codecs

    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    def malformed(why: str) -> HTTPException:
        return _error(400, f"malformed multipart body: {why}")

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise malformed("the Content-Type header names no boundary")
    charset = options.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        raise _error(400, f"multipart body: unknown charset {charset!r}; send the form as UTF-8") from None

    def text(raw: bytes, what: str) -> str:
        try:
            return raw.decode(charset)
        except UnicodeDecodeError:
            raise _error(400, f"multipart body: {what} is not {charset} text") from None

    items: list[tuple[str, str | FormFile]] = []
    part: dict = {}
    header = [b"", b""]
    counts: dict[str, int] = {}
    ended = []

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, pieces=[], size=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header[0].lower()] = header[1]
        header[:] = [b"", b""]

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"name" not in disposition:
            raise malformed('a part has no name (its Content-Disposition must give name="...")')
        part["name"] = text(disposition[b"name"], "a field's name")
        part["filename"] = None if b"filename" not in disposition else text(disposition[b"filename"], "a file's name")
        kind, most = ("file", max_files) if part["filename"] is not None else ("text field", max_fields)
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] > most:
            raise malformed(f"more than {most} {kind}{'s' if most > 1 else ''}; send one query per request")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["size"] += end - start
        if part["filename"] is None and part["size"] > MAX_FORM_FIELD:
            raise malformed(f"the field {part['name']!r} is longer than {MAX_FORM_FIELD} bytes; send files with a filename")
        part["pieces"].append(memoryview(data)[start:end])  # a view: the file is copied once, as it ends

    def on_part_end() -> None:
        data = b"".join(part.pop("pieces"))
        if part["filename"] is None:
            items.append((part["name"], text(data, f"the field {part['name']!r}")))
        else:
            declared = part["headers"].get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            items.append((part["name"], FormFile(part["filename"], declared, data)))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_end": lambda: ended.append(True)})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise malformed(str(error) or type(error).__name__) from None
    if not ended:
        raise malformed("it ends before its closing boundary (--boundary--); send the whole form")
    return Form(items)


class _HttpRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most :data:`MAX_REDIRECTS` redirects, each to an http(s) URL (urllib's own
    handler follows ten, to ftp too)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise _error(400, f"image_url: {req.full_url} redirects to {newurl}; only http and https URLs are fetched")
        redirects = getattr(req, "redirects", 0) + 1
        if redirects > MAX_REDIRECTS:
            raise _error(400, f"image_url: more than {MAX_REDIRECTS} redirects (the last to {newurl}); give the image's "
                              "own URL")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.redirects = redirects
        return new


# a fetched file is held twice while it arrives (its chunks, then joined), once after
FETCH_COPIES = 2
FETCH_SECONDS = 60.0  # the most a fetched file may take to arrive, once its share is held
FETCH_CHUNK = 1 << 20
FETCH_THREADS = 8  # image_url fetches at once, in threads of their own: slow servers never hold up decoding
_fetchers: ThreadPoolExecutor | None = None


async def fetch_held(url: str, limit: int, budget, seconds: float = FETCH_SECONDS) -> tuple[bytes, int]:
    """GET an http(s) URL (:func:`open_url`), holding :data:`FETCH_COPIES` times its length
    in ``budget`` (a :class:`~unicom.search.batching.ByteBudget`; ``limit`` when the server
    gives no length) while its bytes arrive, and its length once they have: ``(bytes, held)``,
    ``held`` for the caller to give back once it no longer holds the bytes. The response's
    headers are read first, so a file longer than ``limit`` is answered 413 unread, and
    fetches beyond the budget wait with their bodies unread. A file that has not arrived
    ``seconds`` after its share was granted is answered 400. Fetches run in
    :data:`FETCH_THREADS` threads of their own, so that URLs whose servers are slow to answer
    never take the threads that decode images."""
    import asyncio

    global _fetchers
    if _fetchers is None:
        _fetchers = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="unicom-fetch")
    response = await asyncio.get_running_loop().run_in_executor(_fetchers, open_url, url)
    try:
        length = response.length  # None when the server gives none (chunked, or until it closes)
        if length is not None and length > limit:
            raise _error(413, f"image_url: {url} is {length} bytes, larger than the limit of {limit} bytes "
                              "(--max-upload-mb)")
        data, held = await budget.run(FETCH_COPIES * (limit if length is None else length), read_url, response, url,
                                      limit, seconds, kept=True, executor=_fetchers)
    finally:
        response.close()  # a read cut short by a cancelled caller ends here
    kept = min(held, len(data))
    await budget.release(held - kept)
    return data, kept


def open_url(url: str):
    """The response to a GET of an http(s) URL, its headers read: 10 s without data,
    :data:`MAX_REDIRECTS` redirects, each to an http(s) URL."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise _error(400, f"image_url: only http and https URLs are fetched, got {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "unicom-serve"})
    try:
        return urllib.request.build_opener(_HttpRedirects).open(request, timeout=10)
    except HTTPException:
        raise
    except Exception as error:  # urllib raises many types: refused, timeouts, HTTP errors
        raise _error(400, f"image_url: {url} could not be fetched ({error})") from None


def read_url(response, url: str, limit: int, seconds: float = FETCH_SECONDS) -> bytes:
    """The body of ``response`` (:func:`open_url`): 413 past ``limit`` bytes, 400 when it
    has not arrived within ``seconds``."""
    import time

    deadline = time.monotonic() + seconds
    chunks, size = [], 0
    try:
        while chunk := response.read1(FETCH_CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise _error(413, f"image_url: {url} is larger than the limit of {limit} bytes (--max-upload-mb)")
            if time.monotonic() > deadline:
                raise _error(400, f"image_url: {url} did not arrive within {seconds:g} s")
    except HTTPException:
        raise
    except Exception as error:  # the connection broke or stalled for 10 s
        raise _error(400, f"image_url: {url} could not be fetched ({error})") from None
    return b"".join(chunks)


_TRIM = None
