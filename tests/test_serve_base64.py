"""The base64 images of `unicom serve`'s JSON bodies (`uploads.take_base64`): decoded as the
standard library decodes them, in pieces with the event loop let in between, the text dropped
before the pieces are joined, anything but base64 refused with where it goes wrong."""

from __future__ import annotations

import asyncio
import base64
import os
import tracemalloc
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from unicom.search import uploads


def _take(text: str) -> bytes:
    holder = SimpleNamespace(image=text)
    del text
    data = asyncio.run(uploads.take_base64(holder, "image"))
    assert holder.image is None  # taken: the request no longer holds the text
    return data


def _refusal(text: str) -> str:
    with pytest.raises(HTTPException) as caught:
        _take(text)
    assert caught.value.status_code == 400
    return caught.value.detail


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(uploads, "BASE64_PIECE", 16)  # many pieces, so that every boundary case occurs


def test_every_length_decodes_as_the_standard_library_decodes_it(small_pieces):
    for length in range(1, 80):
        data = os.urandom(length)
        text = base64.b64encode(data).decode()
        assert _take(text) == base64.b64decode(text, validate=True) == data, length


def test_line_breaks_and_spaces_are_allowed_wherever_they_fall(small_pieces):
    for length in range(1, 80):
        data = os.urandom(length)
        text = base64.b64encode(data).decode()
        wrapped = base64.encodebytes(data).decode()  # lines of 76 characters, as base64 tools write
        every_five = "\n".join(text[i:i + 5] for i in range(0, len(text), 5)) + "\r\n"
        for spaced in (wrapped, every_five, f"  {text} \n\n\n", text + " " * 40):
            assert _take(spaced) == base64.b64decode(spaced) == data, (length, spaced)


def test_a_data_url_gives_the_bytes_after_its_comma(small_pieces):
    data = os.urandom(50)
    assert _take("data:image/png;base64," + base64.b64encode(data).decode()) == data


def test_the_event_loop_runs_between_pieces(small_pieces):
    text = base64.b64encode(os.urandom(300)).decode()  # 400 characters: 25 pieces of 16

    async def main():
        turns = 0

        async def count():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.ensure_future(count())
        await asyncio.sleep(0)
        before = turns
        data = await uploads.take_base64(SimpleNamespace(image=text), "image")
        counter.cancel()
        return data, turns - before

    data, turns = asyncio.run(main())
    assert data == base64.b64decode(text)
    assert turns >= 24  # one turn of the other task after each piece but (at least) the last


def test_the_text_is_dropped_before_its_pieces_are_joined():
    """Holding the text beside the pieces and the joined bytes would be 2.5 times the text;
    taken from its holder, the text and its bytes are at most 1.75 times the text."""
    loop = asyncio.new_event_loop()  # made before tracing starts: only the decoding is measured
    tracemalloc.start()
    try:
        holder = SimpleNamespace(image=base64.b64encode(os.urandom(6 << 20)).decode())  # 8 MiB of text
        length = len(holder.image)
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        data = loop.run_until_complete(uploads.take_base64(holder, "image"))
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
        loop.close()
    assert len(data) == 6 << 20
    assert peak < 0.8 * length + (1 << 20)  # the bytes (0.75 of the text), beyond the text already held


@pytest.mark.parametrize("text, expected", [
    ("QUJD!QUJD", "the character '!' at position 4"),
    ("QUJDQUJD\tQUJDQUJD" * 3 + "é", "the character 'é' at position 51"),
    ("QUJD-_JD", "'-' at position 4, of URL-safe base64"),
    ("QQ==QUJD", "'=' before the end of the text"),
    ("QUJDQUJDQUJDQUJDQQ==\n\n\nQUJD", "'=' before the end of the text"),
    ("QUI", "not valid base64 (Incorrect padding)"),
])
def test_what_is_not_base64_is_refused_naming_where(small_pieces, text, expected):
    detail = _refusal(text)
    assert detail.startswith("image: not valid base64") and expected in detail
    assert "send standard base64" in detail


def test_padding_followed_by_white_space_only_ends_the_text(small_pieces):
    text = base64.b64encode(b"ABCABCABCABCABCABCABCABCA").decode()  # ends in ==, at the end of a piece of 16
    assert _take(text + "\n  \n" + " " * 30) == b"ABCABCABCABCABCABCABCABCA"


def test_empty_texts_and_data_urls_without_data_are_refused():
    assert _refusal("") == "image: empty"
    assert _refusal("data:image/png;base64,") == "image: empty"
    assert _refusal("data:image/png").startswith("image: a data URL without its data")
