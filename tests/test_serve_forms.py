"""The multipart forms of `unicom serve` (`uploads.parse_form`): read as Starlette's own parser
reads them, the file copied out of the body once, malformed forms refused with what to do."""

from __future__ import annotations

import asyncio
import os
import tracemalloc

import httpx
import pytest
from fastapi import HTTPException
from starlette.datastructures import UploadFile
from starlette.requests import Request

from unicom.search.uploads import MAX_FORM_FIELD, FormFile, parse_form

BOUNDARY = "b0undary-7c1e"


def _starlette_form(body: bytes, content_type: str) -> list[tuple[str, object]]:
    """Starlette's reading of the form: (name, text) or (name, (filename, media type, bytes))."""

    async def read():
        sent = []

        async def receive():
            if sent:
                return {"type": "http.disconnect"}
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", content_type.encode("latin-1"))]}
        form = await Request(scope, receive).form(max_files=1, max_fields=16)
        items = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                declared = (value.content_type or "").split(";")[0].strip().lower()
                value = (value.filename, declared, await value.read())
            items.append((name, value))
        return items

    return asyncio.run(read())


def _ours(body: bytes, content_type: str) -> list[tuple[str, object]]:
    return [(name, (value.filename, value.content_type, value.data) if isinstance(value, FormFile) else value)
            for name, value in parse_form(body, content_type).items]


def _by_httpx(files: dict, data: dict) -> tuple[bytes, str]:
    sent = httpx.Request("POST", "http://served/search", files=files, data=data)
    return sent.read(), sent.headers["content-type"]


def _by_hand(parts: list[tuple[str, bytes]], boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """A body of ``parts`` (their header lines, their bytes), as a browser writes it."""
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + headers.encode() + b"\r\n\r\n" + data + b"\r\n"
                    for headers, data in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


# bytes that look like the start of a boundary without being one, so that the parser gives
# the file in several pieces
ALMOST = b"\r\n--" + BOUNDARY[:6].encode() + b"\r\n-" + b"\r\r\n--" + BOUNDARY.encode()[:-1] + b"X"

FORMS = {
    "an image and fields (httpx)": lambda: _by_httpx({"image": ("q.png", os.urandom(300_000), "image/png")},
                                                     {"k": "3", "text": "un café rouge ☕", "deduplicate": "true"}),
    "fields only, as curl -F sends them": lambda: _by_hand([('Content-Disposition: form-data; name="text"', b"a red car"),
                                                           ('Content-Disposition: form-data; name="k"', b"")]),
    "a file holding near-boundaries": lambda: _by_hand([
        ('Content-Disposition: form-data; name="image"; filename="near.bin"\r\nContent-Type: application/octet-stream',
         os.urandom(5000) + ALMOST * 40 + os.urandom(70_000) + ALMOST)]),
    "a file without a media type, an empty field": lambda: _by_hand([
        ('Content-Disposition: form-data; name="image"; filename="x.jpg"', os.urandom(1000)),
        ('Content-Disposition: form-data; name="like"', b"")]),
    "a file's name in UTF-8, a media type with parameters": lambda: _by_hand([
        ('Content-Disposition: form-data; name="image"; filename="ph\u00f6to \u732b.jpg"'.encode().decode("latin-1")
         + '\r\nContent-Type: Image/JPEG; q=1', os.urandom(2000))]),
    "an empty file": lambda: _by_httpx({"image": ("empty.png", b"", "image/png")}, {}),
}


@pytest.mark.parametrize("form", FORMS)
def test_a_form_is_read_as_starlette_reads_it(form):
    body, content_type = FORMS[form]()
    assert _ours(body, content_type) == _starlette_form(body, content_type)


def test_a_file_is_copied_out_of_the_body_once():
    """Parsing a body of 8 MB holds the file's bytes once beside it (Starlette's parser held a
    spooled copy on disk and a second in memory as it was read)."""
    data = os.urandom(8 << 20)
    body, content_type = _by_httpx({"image": ("big.bin", data, "application/octet-stream")}, {"k": "5"})
    tracemalloc.start()
    try:
        form = parse_form(body, content_type)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert form.get("image").data == data and form.get("k") == "5"
    assert len(data) <= peak < len(data) + (1 << 20), peak


def _refused(body: bytes, content_type: str) -> str:
    with pytest.raises(HTTPException) as caught:
        parse_form(body, content_type)
    assert caught.value.status_code == 400
    return caught.value.detail


def test_a_body_cut_short_is_refused_naming_its_closing_boundary():
    body, content_type = _by_httpx({"image": ("q.png", os.urandom(50_000), "image/png")}, {"k": "3"})
    detail = _refused(body[:30_000], content_type)
    assert "ends before its closing boundary" in detail and "send the whole form" in detail


@pytest.mark.parametrize("content_type, why", [
    ("multipart/form-data", "names no boundary"),
    ("multipart/form-data; boundary=x; charset=klingon", "unknown charset 'klingon'"),
])
def test_a_form_whose_header_cannot_be_read_is_refused(content_type, why):
    assert why in _refused(b"--x\r\n", content_type)


@pytest.mark.parametrize("parts, why", [
    ([('Content-Disposition: form-data; name="image"; filename="a.jpg"', b"1"),
      ('Content-Disposition: form-data; name="image"; filename="b.jpg"', b"2")], "more than 1 file;"),
    ([(f'Content-Disposition: form-data; name="f{i}"', b"v") for i in range(17)], "more than 16 text fields"),
    ([('Content-Disposition: form-data; name="text"', b"x" * (MAX_FORM_FIELD + 1))],
     f"the field 'text' is longer than {MAX_FORM_FIELD} bytes"),
    ([('Content-Disposition: form-data; name="text"', "caf\u00e9".encode("latin-1"))], "the field 'text' is not utf-8 text"),
    ([('Content-Disposition: form-data; filename="a.jpg"', b"1")], 'a part has no name'),
])
def test_a_malformed_form_is_refused_saying_what_is_wrong(parts, why):
    assert why in _refused(*_by_hand(parts))


def test_a_form_in_another_charset_is_read_in_it():
    body, _ = _by_hand([('Content-Disposition: form-data; name="text"', "caf\u00e9".encode("latin-1"))])
    assert parse_form(body, f"multipart/form-data; boundary={BOUNDARY}; charset=latin-1").get("text") == "caf\u00e9"
