"""`unicom serve` behind a reverse proxy that serves it under a path prefix and strips it
(nginx's ``location /unicom/ { proxy_pass http://127.0.0.1:8000/; }``): the page in a headless
Chromium, and the API's image paths with ``--root-path``."""

from __future__ import annotations

import base64
import http.client
import subprocess
import sys
import time
import urllib.parse

import httpx
import pytest

from unicom.commands.serve import root_path_of
from unicom.errors import InputError

from storage_servers import QuietHandler, serve
from support import LiveServer, brute_force, free_port, wait_until
from test_serve_pages import (  # noqa: F401 (chromium, live and page are fixtures)
    _text_embedding, _thumbnail, chromium, clip_front, live, page, search_in_clip_front)

PREFIX = "/unicom"


class PrefixProxy:
    """A reverse proxy on 127.0.0.1 that forwards ``PREFIX/...`` to ``origin/...`` (the prefix
    stripped, as nginx's ``proxy_pass http://origin/;`` does), answers 404 to every other path,
    and lists the paths it was asked for: ``with PrefixProxy(origin) as url: ...``. With
    ``bare=True`` it also forwards ``PREFIX`` itself to ``origin/`` instead of redirecting
    (Traefik's StripPrefix, nginx's ``location /unicom``)."""

    def __init__(self, origin: str, prefix: str = PREFIX, bare: bool = False):
        self.origin, self.prefix, self.asked, self.bare = urllib.parse.urlsplit(origin), prefix, [], bare

    def __enter__(self) -> str:
        proxy = self

        class Handler(QuietHandler):
            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward()

            def do_OPTIONS(self):
                self._forward()

            def _forward(self):
                proxy.asked.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path[len(proxy.prefix):]
                if proxy.bare and urllib.parse.urlsplit(path).path == "":
                    path = "/" + path
                elif not self.path.startswith(proxy.prefix + "/"):
                    return self._answer(404, [("Content-Type", "text/plain")], b"not under the prefix")
                headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "connection")}
                upstream = http.client.HTTPConnection(proxy.origin.hostname, proxy.origin.port, timeout=60)
                try:
                    upstream.request(self.command, path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    kept = [(key, value) for key, value in answer.getheaders()
                            if key.lower() not in ("content-length", "transfer-encoding", "connection")]
                    self._answer(answer.status, kept, data)
                finally:
                    upstream.close()

            def _answer(self, status, headers, data):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = serve(Handler)
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.prefix}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _watch_requests(page) -> dict:
    """Every URL the page asks for, and those that failed or were answered an error."""
    seen = {"asked": [], "failed": []}
    page.on("request", lambda request: seen["asked"].append(request.url))
    page.on("requestfailed", lambda request: seen["failed"].append(request.url))
    page.on("response", lambda response: seen["failed"].append(response.url) if response.status >= 400 else None)
    return seen


@pytest.mark.browser
def test_the_page_searches_and_loads_every_image_through_a_proxy_prefix(live, page):
    text = "stripes on red"
    _, ids = brute_force(live["stored"], _text_embedding(live["spec"], text), 5)
    wide_id = len(live["images"]) - 1
    with PrefixProxy(live["url"]) as url:
        seen = _watch_requests(page)
        page.goto(url + "/")
        wait_until(page, "document.getElementById('status').textContent.includes('25 items')", 15)
        # a text search: the results of the brute-force ranking, each thumbnail loaded through the prefix
        page.fill("#k", "5")
        page.fill("#text", text)
        page.press("#text", "Enter")
        page.wait_for_selector("#results .result >> nth=4", timeout=30_000)
        assert [int(card) for card in page.eval_on_selector_all("#results .result", "cards => cards.map(c => c.dataset.id)")] \
            == ids.tolist()
        wait_until(page, "Array.from(document.querySelectorAll('#results .result img')).every(img => img.naturalWidth > 0)", 15)
        # the full image behind the first result, through the prefix: the server's file
        first = int(ids[0])
        href = page.eval_on_selector("#results .result .thumb", "link => link.href")
        assert href == f"{url}/image/{first}"
        assert httpx.get(href).content == httpx.get(f"{live['url']}/image/{first}").content
        # an uploaded image finds itself
        page.fill("#text", "")
        page.fill("#k", "1")
        page.set_input_files("#file", str(live["images"][wide_id]))
        page.wait_for_selector(f"#results .result[data-id='{wide_id}']", timeout=30_000)
        wait_until(page, "document.querySelector('#results .result img').naturalWidth > 0", 10)
        # the API docs under the prefix: Swagger UI, its assets and the schema
        page.goto(url + "/docs")
        page.wait_for_selector(".opblock-summary-path >> text=/knn-service", timeout=30_000)
    outside = [asked for asked in seen["asked"] if not asked.startswith(url + "/") and not asked.startswith(("data:", "blob:"))]
    assert outside == [] and seen["failed"] == []
    assert any(path.startswith(f"{PREFIX}/thumbnail/") for path in [urllib.parse.urlsplit(a).path for a in seen["asked"]])
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_the_page_opened_without_its_trailing_slash_reloads_itself_under_the_prefix(live, page):
    # a proxy that answers /unicom with the page itself (no redirect): its relative URLs would
    # resolve against / and miss the prefix
    # (before it reloads, the browser's preload scanner may ask for its script and style there)
    with PrefixProxy(live["url"], bare=True) as url:
        page.goto(url + "?k=3")
        wait_until(page, "document.getElementById('status').textContent.includes('25 items')", 15)
        assert page.url == url + "/?k=3"
        assert page.evaluate("getComputedStyle(document.querySelector('header')).display") == "flex"
        seen = _watch_requests(page)
        page.fill("#text", "stripes on red")
        page.press("#text", "Enter")
        page.wait_for_selector("#results .result", timeout=30_000)
    outside = [asked for asked in seen["asked"] if not asked.startswith(url) and not asked.startswith(("data:", "blob:"))]
    assert outside == [] and seen["failed"] == []
    assert page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_the_page_asks_for_the_images_of_the_chosen_index_through_a_proxy_prefix(live, page):
    from unicom.models.encoders import load_encoder
    from unicom.search.service import create_app

    app = create_app({"photos": live["index"], "again": live["index"]}, load_encoder(live["spec"]))
    with LiveServer(app) as origin, PrefixProxy(origin) as url:
        seen = _watch_requests(page)
        page.goto(url + "/")
        wait_until(page, "document.getElementById('status').textContent.includes('25 items')", 15)
        page.select_option("#index", "again")
        page.fill("#k", "2")
        page.fill("#text", "stripes")
        page.press("#text", "Enter")
        page.wait_for_selector("#results .result >> nth=1", timeout=30_000)
        wait_until(page, "Array.from(document.querySelectorAll('#results .result img')).every(img => img.naturalWidth > 0)", 15)
        shown = page.eval_on_selector_all("#results .result", "cards => cards.map(c => [c.dataset.id, "
                                          "c.querySelector('img').src, c.querySelector('.thumb').href])")
    assert shown == [[item, f"{url}/thumbnail/{item}?index=again", f"{url}/image/{item}?index=again"] for item, _, _ in shown]
    assert seen["failed"] == [] and page.errors == [] and page.blocked == []


@pytest.mark.browser
def test_clip_retrievals_front_end_searches_through_a_proxy_prefix(live, page):
    text = "stripes"
    _, ranking = brute_force(live["stored"], _text_embedding(live["spec"], text), 3)
    proxy = PrefixProxy(live["url"])
    with proxy as url, clip_front(url, live["front_port"]) as front:
        search_in_clip_front(page, front, text)
        first = page.evaluate("document.querySelector('clip-front').shadowRoot.querySelector('figure img.pic').getAttribute('src')")
    assert first.split("base64,")[1].strip() == base64.b64encode(_thumbnail(live["url"], int(ranking[0]))).decode()
    assert {f"{PREFIX}/indices-list", f"{PREFIX}/knn-service"} <= set(proxy.asked)
    assert page.errors == [] and page.blocked == []


def test_root_path_puts_the_prefix_in_the_image_paths_of_search_results(live):
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "unicom", "serve", "--index", f"photos={live['index'].path}", "--port", str(port),
               "--root-path", "unicom/"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{origin}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"unicom serve did not start:\n{process.stdout.read()}")
                time.sleep(0.2)
        query = live["images"][3].read_bytes()
        with PrefixProxy(origin) as url:
            hits = httpx.post(f"{url}/search", files={"image": ("q.jpg", query)}, data={"k": "2"}).json()["results"]
            assert [(hit["thumbnail"], hit["link"]) for hit in hits] == \
                [(f"{PREFIX}/thumbnail/{hit['id']}", f"{PREFIX}/image/{hit['id']}") for hit in hits]
            host = url[: -len(PREFIX)]
            for hit in hits:  # the paths work through the proxy, and are the server's own images
                for key, route in (("thumbnail", "thumbnail"), ("link", "image")):
                    proxied = httpx.get(host + hit[key])
                    assert proxied.status_code == 200
                    assert proxied.content == httpx.get(f"{live['url']}/{route}/{hit['id']}").content
            assert httpx.get(f"{url}/openapi.json").json()["servers"] == [{"url": PREFIX}]
        # asked directly, the server still answers at its own root
        assert httpx.get(f"{origin}/healthz").json()["count"] == 25
        assert httpx.get(f"{origin}/thumbnail/{hits[0]['id']}").status_code == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert f"unicom search on {origin}/ (25 items, served by the proxy under {PREFIX}/)" in output


def test_root_path_is_a_path_without_trailing_slash():
    assert [root_path_of(value) for value in ("", "/", "unicom", "/unicom/", "/a/b/")] == ["", "", "/unicom", "/unicom", "/a/b"]
    with pytest.raises(InputError, match="--root-path https://host/unicom: give the path only"):
        root_path_of("https://host/unicom")
