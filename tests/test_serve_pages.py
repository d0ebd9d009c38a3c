"""Pages in a headless Chromium against a real `unicom serve` on loopback: our page's text,
"more like this" and letterboxed results, and clip-retrieval's own front end (from its
released package) pointed at our server."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unicom.models.encoders import load_encoder
from unicom.search.service import create_app

from support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    LiveServer,
    brute_force,
    browser_or_skip,
    free_port,
    open_clip_reference,
    stored_embeddings,
    tiny_open_clip,
    wait_until,
    write_class_folder,
)

REPOSITORY = Path(__file__).resolve().parents[1]
CLIP_RETRIEVAL_VERSION = "2.45.0"
CLIP_FRONT = REPOSITORY / ".cache" / "clip-retrieval-front" / CLIP_RETRIEVAL_VERSION


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the tests of this module."""
    sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    """A fresh page whose requests may only go to 127.0.0.1; ``page.blocked`` lists those it
    tried elsewhere (aborted) and ``page.errors`` its JavaScript errors."""
    context = chromium.new_context()
    page = context.new_page()
    page.blocked = _only_loopback(page)
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`unicom serve`'s app over a tiny CLIP's index of 24 class images and one wide image."""
    from unicom.embed import embed_to_folder
    from unicom.search.index import Index

    root = tmp_path_factory.mktemp("pages")
    spec = tiny_open_clip(root / "clip")
    images = write_class_folder(root / "images", [0, 1, 2, 3], 6)
    wide = root / "images" / "class_004" / "wide.png"
    wide.parent.mkdir()
    Image.fromarray(np.tile(np.linspace(0, 255, 240, dtype=np.uint8)[None, :, None], (60, 1, 3))).save(wide)
    images.append(wide)
    embed_to_folder([str(root / "images")], root / "emb", spec, rows_per_part=8, num_workers=0, dtype="float32")
    index = Index.build(root / "emb", root / "index")
    front_port, port = free_port(), free_port()
    app = create_app({"photos": index}, load_encoder(spec), cors_origins=[f"http://127.0.0.1:{front_port}"])
    with LiveServer(app, port) as url:
        yield {"url": url, "front_port": front_port, "spec": spec, "images": images,
               "stored": stored_embeddings(root / "emb"), "index": index}


def _text_embedding(spec: str, text: str) -> np.ndarray:
    model, _, tokenizer = open_clip_reference(spec)
    with torch.no_grad():
        return model.encode_text(tokenizer([text]))[0].numpy()


def _only_loopback(page) -> list[str]:
    """Abort every request that would leave this machine; return the list of those aborted."""
    blocked: list[str] = []

    def route(request_route):
        host = request_route.request.url.split("/")[2] if "://" in request_route.request.url else ""
        if request_route.request.url.startswith("data:") or host.startswith("127.0.0.1"):
            request_route.continue_()
        else:
            blocked.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    return blocked


@pytest.mark.browser
def test_our_page_searches_a_text_and_shows_more_like_a_result(live, page):
    text = "stripes on red"
    scores, ids = brute_force(live["stored"], _text_embedding(live["spec"], text), 5)
    page.goto(live["url"] + "/")
    wait_until(page, "document.getElementById('status').textContent.includes('25 items')", 15)
    page.fill("#k", "5")
    page.fill("#text", text)
    page.press("#text", "Enter")
    page.wait_for_selector("#results .result >> nth=4", timeout=30_000)
    cards = page.locator("#results .result")
    assert [int(cards.nth(i).get_attribute("data-id")) for i in range(5)] == ids.tolist()
    shown = [cards.nth(i).locator(".score").inner_text() for i in range(5)]
    assert [float(value) for value in shown] == pytest.approx(scores.tolist(), abs=1e-3)
    assert len(set(shown)) == len(set(scores.tolist()))  # as many decimals as tell them apart
    # "more like this" on the third result: that item comes first, with score 1
    third = int(cards.nth(2).get_attribute("data-id"))
    page.fill("#text", "")
    cards.nth(2).locator(".like").click()
    wait_until(page, f"document.querySelector('#results .result').dataset.id === '{third}'", 30)
    assert float(page.locator("#results .result .score").first.inner_text()) == pytest.approx(1.0, abs=1e-3)
    assert page.locator("#source-text").inner_text().startswith("More like ")
    assert page.blocked == []


@pytest.mark.browser
def test_our_page_letterboxes_thumbnails_and_links_the_full_image(live, page):
    wide_id = len(live["images"]) - 1
    page.goto(live["url"] + "/")
    wait_until(page, "document.getElementById('status').textContent.includes('25 items')", 15)
    page.fill("#k", "1")
    page.set_input_files("#file", str(live["images"][wide_id]))
    page.wait_for_selector(f"#results .result[data-id='{wide_id}'] img", timeout=30_000)
    card = page.locator("#results .result").first
    wait_until(page, "document.querySelector('#results .result img').naturalWidth > 0", 10)
    box = card.locator(".thumb").bounding_box()
    geometry = card.locator("img").evaluate(
        "img => ({fit: getComputedStyle(img).objectFit, w: img.naturalWidth, h: img.naturalHeight})")
    # the whole 4:1 image is shown in the square, not a cropped part of it
    assert geometry["fit"] == "contain" and geometry["w"] / geometry["h"] == pytest.approx(4.0, rel=0.02)
    assert box["width"] == pytest.approx(box["height"], rel=0.02)
    assert card.locator(".thumb").evaluate("link => link.href") == f"{live['url']}/image/{wide_id}"
    page.screenshot(path=str(Path(os.environ.get("UNICOM_SCREENSHOTS", "/tmp")) / "unicom-page-wide.png"))
    assert page.errors == [] and page.blocked == []


def _open_page(page, url: str) -> None:
    page.goto(url + "/")
    wait_until(page, "document.getElementById('status').textContent.includes('25 items')", 15)


def _search_text(page, text: str, k: int) -> None:
    """Ask the page for the ``k`` best results of ``text``."""
    page.fill("#k", str(k))
    page.fill("#text", text)
    page.press("#text", "Enter")


def _wait_for_ids(page, ids) -> None:
    """Wait until the page shows the results ``ids``, in that order."""
    shown = ",".join(str(int(i)) for i in ids)
    wait_until(page, "Array.from(document.querySelectorAll('#results .result')).map(c => c.dataset.id).join() "
                     f"=== '{shown}'", 30)


def _shown_ids(page) -> list[int]:
    return page.evaluate("Array.from(document.querySelectorAll('#results .result')).map(card => Number(card.dataset.id))")


@pytest.mark.browser
def test_our_page_fits_a_narrow_window_and_works_from_the_keyboard(live, page):
    page.set_viewport_size({"width": 320, "height": 640})
    _open_page(page, live["url"])
    page.press("#text", "Enter")  # nothing typed yet: say so rather than do nothing
    assert page.locator("#error").inner_text() == "Type what you are looking for, or choose an image."
    # a cleared "Results" field searches the server's default k (it was sent as k=0: an error)
    page.fill("#k", "")
    page.fill("#text", "stripes")
    page.press("#text", "Enter")
    page.wait_for_selector("#results .result >> nth=9", timeout=30_000)
    assert len(_shown_ids(page)) == 10 and page.locator("#error").is_hidden()
    # nothing wider than the window (the drop zone and the long model name in the header were)
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    # the image chooser is one tab stop (the label), not two with an invisible file input
    page.focus("#drop")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "k"
    # each "More like this" button says which item; pressed from the keyboard, the focus stays by the results
    second = page.locator("#results .result").nth(1)
    key = second.locator(".key").inner_text()
    assert second.locator(".like").get_attribute("aria-label") == f"More like {key}"
    page.fill("#text", "")
    second.locator(".like").focus()
    page.keyboard.press("Enter")
    liked = int(second.get_attribute("data-id"))
    wait_until(page, f"document.querySelector('#results .result').dataset.id === '{liked}'", 30)
    assert page.evaluate("document.activeElement.id") == "summary"
    # screen readers hear the summary of a new search, not every card of the list
    assert page.get_attribute("#summary", "aria-live") == "polite"
    assert page.locator("[aria-live]").count() == 1
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_shows_the_newest_search_when_an_older_answer_comes_late(live, page):
    from playwright.sync_api import Error as PlaywrightError

    text = "stripes on red"
    _, ids = brute_force(live["stored"], _text_embedding(live["spec"], text), 3)
    held = []

    def hold_the_first_search(route):  # a slow server: the first answer comes after the second
        if held:
            route.continue_()
        else:
            held.append(route)

    _open_page(page, live["url"])
    page.route("**/search", hold_the_first_search)
    page.fill("#k", "2")
    page.fill("#text", text)
    page.press("#text", "Enter")
    wait_until(page, "document.getElementById('summary').textContent === 'Searching…'", 10)
    page.fill("#k", "3")
    page.press("#text", "Enter")
    page.wait_for_selector("#results .result >> nth=2", timeout=30_000)
    with contextlib.suppress(PlaywrightError):  # the page may have cancelled it already
        held[0].continue_()  # the first search, for 2 results, answers now
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert _shown_ids(page) == ids.tolist()
        time.sleep(0.05)
    assert page.errors == []


@pytest.mark.browser
def test_our_page_says_what_went_wrong_when_a_gateway_answers_an_error(live, page):
    """unicom serve behind a proxy that answers a search with its own HTML error page."""
    origin = live["url"]

    class Gateway(http.server.BaseHTTPRequestHandler):
        broken = ""  # a GET route the gateway answers with its error page

        def do_GET(self):
            if self.path == self.broken:
                return self.do_POST()
            with urllib.request.urlopen(origin + self.path) as answer:
                body, kind = answer.read(), answer.headers["content-type"]
            self._send(200, kind, body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self._send(502, "text/html", b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>")

        def _send(self, status, kind, body):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Gateway) as gateway:
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        try:
            _open_page(page, f"http://127.0.0.1:{gateway.server_address[1]}")
            page.fill("#text", "stripes")
            page.press("#text", "Enter")
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            assert page.locator("#error").inner_text() == "The server answered 502 Bad Gateway."
            assert page.locator("#summary").inner_text() == ""
            Gateway.broken = "/healthz"  # the page's first question: the status line says what came back
            page.reload()
            wait_until(page, "document.getElementById('status').textContent !== 'Connecting…'", 15)
            assert page.locator("#status").inner_text() == "The server answered 502 Bad Gateway."
        finally:
            gateway.shutdown()
    assert page.errors == []


@pytest.mark.browser
def test_our_page_searches_with_a_pasted_image_and_says_when_a_drop_holds_no_file(live, page):
    wide_id = len(live["images"]) - 1
    _open_page(page, live["url"])
    page.fill("#k", "1")
    data = base64.b64encode(live["images"][wide_id].read_bytes()).decode()
    page.evaluate("""([data, name]) => {
        const file = new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, {type: "image/png"});
        const clipboard = new DataTransfer();
        clipboard.items.add(file);
        document.getElementById("text").dispatchEvent(new ClipboardEvent("paste", {clipboardData: clipboard, bubbles: true}));
    }""", [data, "image.png"])
    page.wait_for_selector(f"#results .result[data-id='{wide_id}']", timeout=30_000)
    assert page.locator("#source-text").inner_text() == "Image: image.png"
    # the next image frees the page's copy of this one
    first_copy = page.get_attribute("#preview", "src")
    page.set_input_files("#file", str(live["images"][0]))
    wait_until(page, f"document.getElementById('preview').src !== {json.dumps(first_copy)}", 10)
    loads = "(url) => new Promise((done) => { const img = new Image(); img.onload = () => done('kept'); " \
            "img.onerror = () => done('freed'); img.src = url; })"
    assert page.evaluate(loads, page.get_attribute("#preview", "src")) == "kept"
    assert page.evaluate(loads, first_copy) == "freed"
    # a picture dragged from another page brings its address, not a file
    page.evaluate("""() => {
        const dragged = new DataTransfer();
        dragged.setData("text/uri-list", "https://example.com/cat.jpg");
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dragged, bubbles: true, cancelable: true}));
    }""")
    assert page.locator("#error").inner_text() == (
        "Only image files can be dropped here: save the picture, then drop or choose the file.")
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_asks_for_the_servers_default_k(live, page):
    with LiveServer(create_app({"photos": live["index"]}, load_encoder(live["spec"]), default_k=4, max_k=6)) as url:
        _open_page(page, url)
        assert page.input_value("#k") == "4" and page.get_attribute("#k", "max") == "6"
        page.fill("#text", "stripes")
        page.press("#text", "Enter")
        page.wait_for_selector("#results .result", timeout=30_000)
        assert len(_shown_ids(page)) == 4
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_shows_only_the_results_that_reach_its_min_score(live, page):
    text = "stripes on red"
    scores, ids = brute_force(live["stored"], _text_embedding(live["spec"], text), len(live["stored"]))
    floor = round(float(scores[2:4].mean()), 6)  # three results reach it
    _open_page(page, live["url"])
    page.fill("#k", "10")
    page.fill("#text", text)
    page.press("#text", "Enter")
    page.wait_for_selector("#results .result >> nth=9", timeout=30_000)
    page.fill("#min-score", repr(floor))
    page.press("#min-score", "Enter")  # a change of the field searches again
    wait_until(page, "document.querySelectorAll('#results .result').length === 3", 30)
    assert _shown_ids(page) == ids[:3].tolist()
    assert page.inner_text("#summary").startswith(f"3 results scoring at least {floor:g} in")
    page.fill("#min-score", "")
    page.press("#min-score", "Enter")
    wait_until(page, "document.querySelectorAll('#results .result').length === 10", 30)
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_offers_safe_mode_where_the_server_filters_and_leaves_out_what_it_marks(live, page):
    text = "stripes on red"
    _, ids = brute_force(live["stored"], _text_embedding(live["spec"], text), len(live["stored"]))
    stored = live["stored"] / np.linalg.norm(live["stored"], axis=1, keepdims=True)
    # prompt 1 the second result, prompt 0 the last: the items nearer the second are marked
    prompts = np.stack([stored[ids[-1]], stored[ids[1]]]).astype(np.float32)
    marked = np.argmax(stored @ prompts.T, axis=1) == 1
    safe_ids = [int(i) for i in ids if not marked[i]][:5]
    assert marked[ids[:5]].any() and safe_ids
    _open_page(page, live["url"])
    assert not page.is_visible("#safe")  # a server without a filter offers none
    with LiveServer(create_app({"photos": live["index"]}, load_encoder(live["spec"]), violence_prompts=prompts)) as url:
        _open_page(page, url)
        assert page.is_visible("#safe") and page.is_checked("#safe")  # on by default
        page.fill("#k", "5")
        page.fill("#text", text)
        page.press("#text", "Enter")
        wait_until(page, f"document.querySelectorAll('#results .result').length === {len(safe_ids)}", 30)
        assert _shown_ids(page) == safe_ids
        page.uncheck("#safe")
        _wait_for_ids(page, ids[:5])
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_searches_the_captions_where_the_index_holds_their_embeddings(live, page, tmp_path):
    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    text = "stripes on red"
    count = len(live["stored"])
    captions = [f"a {('red', 'blue', 'green', 'grey', 'striped')[i % 5]} picture, number {i}" for i in range(count)]
    model, _, tokenizer = open_clip_reference(live["spec"])
    with torch.no_grad():
        caption_vectors = model.encode_text(tokenizer(captions)).numpy()
    write_part(tmp_path / "emb", 0, image=live["stored"], text=caption_vectors,
               metadata=live["index"].metadata_table(np.arange(count)).append_column("caption", [captions]))
    both = Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval", index_type="flat")
    query = _text_embedding(live["spec"], text)
    by_image, by_caption = brute_force(live["stored"], query, 5)[1].tolist(), brute_force(caption_vectors, query, 5)[1].tolist()
    assert by_image != by_caption
    _open_page(page, live["url"])
    assert not page.is_visible("#modality")  # an index of images alone offers no choice
    with LiveServer(create_app({"photos": both}, load_encoder(live["spec"]))) as url:
        _open_page(page, url)
        assert page.is_visible("#modality") and page.input_value("#modality") == "image"
        assert page.eval_on_selector_all("#modality option", "options => options.map(o => o.textContent)") == \
            ["Images", "Captions"]
        _search_text(page, text, 5)
        _wait_for_ids(page, by_image)
        page.select_option("#modality", "text")  # a change searches again, over the captions
        _wait_for_ids(page, by_caption)
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_hides_results_whose_url_repeats_a_better_one_s_where_the_metadata_has_urls(live, page, tmp_path):
    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    text = "stripes on red"
    count = len(live["stored"])
    urls = [f"https://example.org/{i // 3}.jpg" for i in range(count)]  # each picture at three rows
    write_part(tmp_path / "emb", 0, image=live["stored"],
               metadata=live["index"].metadata_table(np.arange(count)).append_column("url", [urls]))
    with_urls = Index.build(tmp_path / "emb", tmp_path / "index", index_type="flat")
    order = brute_force(live["stored"], _text_embedding(live["spec"], text), count)[1].tolist()
    first_of_each = [i for position, i in enumerate(order) if urls[i] not in {urls[j] for j in order[:position]}]
    assert order[:5] != first_of_each[:5]  # the plain results repeat a url
    _open_page(page, live["url"])
    assert not page.is_visible("#distinct-urls")  # an index without urls offers no box
    with LiveServer(create_app({"photos": with_urls}, load_encoder(live["spec"]))) as url:
        _open_page(page, url)
        assert page.is_visible("#distinct-urls") and page.is_checked("#distinct-urls")  # on by default, as clip-front
        _search_text(page, text, 5)
        _wait_for_ids(page, first_of_each[:5])
        page.uncheck("#distinct-urls")  # a change searches again
        _wait_for_ids(page, order[:5])
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_moves_the_query_towards_an_aesthetic_rating_where_the_server_has_them(live, page):
    text = "stripes on red"
    stored = live["stored"] / np.linalg.norm(live["stored"], axis=1, keepdims=True)
    ratings = np.random.default_rng(0).normal(size=(10, stored.shape[1])).astype(np.float32)
    ratings /= np.linalg.norm(ratings, axis=1, keepdims=True)
    query = _text_embedding(live["spec"], text)
    moved = query / np.linalg.norm(query) + 1.5 * ratings[3]
    plain, toward = brute_force(stored, query, 5)[1].tolist(), brute_force(stored, moved, 5)[1].tolist()
    assert plain != toward
    _open_page(page, live["url"])
    assert not page.is_visible("#aesthetic")  # a server without the embeddings offers none
    with LiveServer(create_app({"photos": live["index"]}, load_encoder(live["spec"]), aesthetic_embeddings=ratings)) as url:
        _open_page(page, url)
        assert page.is_visible("#aesthetic") and page.input_value("#aesthetic") == ""
        assert page.input_value("#aesthetic-weight") == "0.5"  # clip-retrieval's front end's default
        _search_text(page, text, 5)
        _wait_for_ids(page, plain)
        page.fill("#aesthetic-weight", "1.5")
        page.select_option("#aesthetic", "3")  # a change searches again, the query moved
        _wait_for_ids(page, toward)
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_downloads_the_results_it_shows_as_csv(live, page):
    text = "stripes on red"
    _open_page(page, live["url"])
    assert not page.is_visible("#download")  # nothing to download yet
    page.fill("#k", "6")
    page.fill("#text", text)
    page.press("#text", "Enter")
    page.wait_for_selector("#results .result >> nth=5", timeout=30_000)
    with page.expect_download() as info:
        page.click("#download")
    assert info.value.suggested_filename == "results.csv"
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text(), newline="")))
    request = urllib.request.Request(live["url"] + "/search", data=json.dumps({"text": text, "k": 6}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        hits = json.loads(response.read())["results"]
    assert [int(row["id"]) for row in rows] == [hit["id"] for hit in hits] == _shown_ids(page)
    for row, hit in zip(rows, hits):
        assert float(row["score"]) == hit["score"] and int(row["rank"]) == hit["rank"]
        assert row["image_path"] == hit["image_path"] and row["thumbnail"] == hit["thumbnail"]
    # quoting as RFC 4180 says, and a text a spreadsheet would run as a formula kept as text
    cells = page.evaluate("[csvCell('a, \"b\"'), csvCell('=HYPERLINK(1)'), csvCell(-0.25), csvCell(null), "
                          "csvCell('two\\nlines')]")
    assert cells == ['"a, ""b"""', "'=HYPERLINK(1)", "-0.25", "", '"two\nlines"']
    assert next(csv.reader(io.StringIO(",".join(cells[:2]) + "\r\n"))) == ['a, "b"', "'=HYPERLINK(1)"]
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_our_page_over_an_index_without_a_model_takes_no_image(live, page):
    searches = []
    page.on("request", lambda request: searches.append(request.url) if request.url.endswith("/search") else None)
    with LiveServer(create_app({"photos": live["index"]})) as url:
        _open_page(page, url)
        assert page.locator("#drop-text").inner_text() == "This index has no model: image search is off"
        assert page.locator("#file").is_disabled() and page.get_attribute("#drop", "aria-disabled") == "true"
        page.evaluate("""() => {
            const clipboard = new DataTransfer();
            clipboard.items.add(new File([new Uint8Array([137, 80, 78, 71])], "image.png", {type: "image/png"}));
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: clipboard, bubbles: true}));
        }""")
        assert page.locator("#error").inner_text() == "This index has no model, so it cannot be searched with an image."
    assert searches == [] and page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_the_api_docs_page_renders_offline(live, page):
    page.goto(live["url"] + "/docs")
    page.wait_for_selector(".opblock-summary-path >> text=/knn-service", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/search", "/knn-service", "/indices-list", "/metadata"} <= {path.strip() for path in paths}
    assert page.errors == [] and page.blocked == []


# --------------------------------------------------------------------------- clip-retrieval's front end


@pytest.fixture(scope="module")
def multilingual(live, tmp_path_factory):
    """An M-CLIP model into the tiny CLIP's 32-d space, a text whose best items it ranks
    otherwise than the CLIP's own text tower, and both rankings."""
    from support import MULTILINGUAL_CAPTIONS, tiny_mclip

    from unicom.models.multilingual import load_multilingual

    folder = tmp_path_factory.mktemp("mclip") / "model"
    reference, tokenizer = tiny_mclip(folder, dims=32)
    stored = live["stored"] / np.linalg.norm(live["stored"], axis=1, keepdims=True)
    for text in MULTILINGUAL_CAPTIONS:
        with torch.no_grad():
            translated = reference.forward([text], tokenizer)[0].numpy()
        own, other = brute_force(stored, _text_embedding(live["spec"], text), 5)[1], brute_force(stored, translated, 5)[1]
        if own[0] != other[0]:
            return {"model": load_multilingual(folder), "text": text, "own": own.tolist(), "multilingual": other.tolist()}
    pytest.fail("the tiny CLIP and the tiny M-CLIP rank every caption's items alike")


@pytest.mark.browser
def test_our_page_embeds_the_text_with_the_multilingual_model_where_the_index_has_one(live, page, multilingual):
    _open_page(page, live["url"])
    assert not page.is_visible("#multilingual")  # a server without one offers none
    with LiveServer(create_app({"photos": live["index"]}, load_encoder(live["spec"]), multilingual=multilingual["model"])) as url:
        _open_page(page, url)
        assert page.is_visible("#multilingual") and not page.is_checked("#multilingual")
        assert multilingual["model"].name in page.get_attribute("#multilingual-row", "title")  # which model, said
        _search_text(page, multilingual["text"], 5)
        _wait_for_ids(page, multilingual["own"])
        page.check("#multilingual")  # a change searches again, the text embedded by the multilingual model
        _wait_for_ids(page, multilingual["multilingual"])
    assert page.errors == [] and page.blocked == []


def _clip_front_or_skip() -> Path:
    if not (CLIP_FRONT / "index.html").is_file():
        script = REPOSITORY / "scripts" / "install-clip-front.sh"
        subprocess.run(["bash", str(script)], env={**os.environ, "PYTHON": sys.executable,
                                                   "CLIP_RETRIEVAL_VERSION": CLIP_RETRIEVAL_VERSION},
                       check=False, timeout=300)
    if not (CLIP_FRONT / "index.html").is_file():
        pytest.skip(f"clip-retrieval's front end is not in {CLIP_FRONT}: run scripts/install-clip-front.sh")
    return CLIP_FRONT


@contextlib.contextmanager
def clip_front(backend: str, port: int):
    """clip-retrieval's released front end served on 127.0.0.1:``port``, its back end ``backend``:
    ``with clip_front(backend, port) as url: ...`` (skips when the front end is not installed)."""
    front = _clip_front_or_skip()
    config = json.dumps({"defaultBackend": backend, "defaultIndex": "photos", "urlColumn": "url"}).encode()

    class FrontHandler(http.server.SimpleHTTPRequestHandler):
        """The released front end as files, with the configuration clip-retrieval's own server writes."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(front), **kwargs)

        def do_GET(self):
            if self.path.split("?")[0] == "/config.json":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(config)))
                self.end_headers()
                self.wfile.write(config)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", port), FrontHandler) as static:
        threading.Thread(target=static.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{port}/?back={backend}&index=photos"
        finally:
            static.shutdown()


def search_in_clip_front(page, front: str, text: str) -> None:
    """Open clip-retrieval's front end at ``front`` (our index "photos" listed), search ``text``, wait for pictures."""
    page.goto(front)
    page.wait_for_selector("clip-front >> #searchBar", timeout=30_000)
    # the front end fills its index list (its first select; the others, modality and aesthetic score, have their
    # options from the start) from /indices-list after it draws the search bar
    wait_until(page, "document.querySelector('clip-front').shadowRoot.querySelector('select').options.length > 0")
    assert page.locator("clip-front >> select").first.locator("option").all_inner_texts() == ["photos"]
    page.fill("clip-front >> #searchBar", text)
    page.press("clip-front >> #searchBar", "Enter")
    page.wait_for_selector("clip-front >> figure img.pic", timeout=30_000)


@pytest.mark.browser
def test_clip_retrievals_front_end_shows_results_from_unicom_serve(live, page):
    text = "stripes"
    _, ranking = brute_force(live["stored"], _text_embedding(live["spec"], text), len(live["stored"]))
    item_of = {base64.b64encode(_thumbnail(live["url"], item)).decode(): item for item in range(len(live["stored"]))}
    unit = live["stored"] / np.linalg.norm(live["stored"], axis=1, keepdims=True)
    shown_items = (
        "Array.from(document.querySelector('clip-front').shadowRoot.querySelectorAll('figure img.pic'))"
        ".map(img => img.getAttribute('src'))"
    )
    with clip_front(live["url"], live["front_port"]) as front:
        search_in_clip_front(page, front, text)
        wait_until(page, "document.querySelector('clip-front').shadowRoot.querySelector('img.pic').naturalWidth > 0", 10)
        # near duplicates hidden (the front end's default): in ranking order, none repeats another
        unique = [item_of[src.split("base64,")[1].strip()] for src in page.evaluate(shown_items)]
        assert 1 < len(unique) < len(ranking)
        assert unique == [item for item in ranking.tolist() if item in unique]
        similarities = unit[unique] @ unit[unique].T
        assert (similarities[np.triu_indices(len(unique), 1)] < 0.94).all()
        # with duplicates shown, every item in the brute-force order
        page.locator("clip-front >> label", has_text="Hide (near) duplicate images").locator("input").click()
        wait_until(page, f"({shown_items}).length === {len(ranking)}", 30)
        everything = [item_of[src.split("base64,")[1].strip()] for src in page.evaluate(shown_items)]
        assert everything == ranking.tolist()
        page.screenshot(path=str(Path(os.environ.get("UNICOM_SCREENSHOTS", "/tmp")) / "clip-front-on-unicom.png"))
        assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_clip_retrievals_multilingual_box_searches_with_unicom_serves_multilingual_model(live, page, multilingual):
    port = free_port()
    app = create_app({"photos": live["index"]}, load_encoder(live["spec"]), multilingual=multilingual["model"],
                     cors_origins=[f"http://127.0.0.1:{port}"])
    first_shown = "document.querySelector('clip-front').shadowRoot.querySelector('figure img.pic').getAttribute('src')"
    with LiveServer(app) as url, clip_front(url, port) as front:
        thumbnail = {item: base64.b64encode(_thumbnail(url, item)).decode() for item in range(len(live["stored"]))}
        search_in_clip_front(page, front, multilingual["text"])
        assert page.evaluate(first_shown).endswith(thumbnail[multilingual["own"][0]])
        page.locator("clip-front >> label", has_text="Search with multilingual clip").locator("input").click()
        wait_until(page, f"({first_shown}).endsWith({json.dumps(thumbnail[multilingual['multilingual'][0]])})", 30)
        assert page.errors == [] and page.blocked == []


def _thumbnail(url: str, item: int) -> bytes:
    import httpx

    response = httpx.get(f"{url}/thumbnail/{item}")
    assert response.status_code == 200
    return response.content
