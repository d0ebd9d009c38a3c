"""Downloading released checkpoints: checksums, cache, mirrors, offline use.

A real HTTP server on 127.0.0.1 (a thread) serves the files; the model registry gets a
test entry pointing at it.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
import torch
from support import random_unicom_vit

import unicom
from unicom.errors import InputError
from unicom.models import hub
from unicom.models.registry import MODELS, ModelCfg, clip_preprocess
from unicom.models.unicom_vit import ViTSettings

TINY = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=128, embedding_dim=16)
FILE = "FP16-ViT-tiny.pt"


def tiny_release(url: str, sha256: str) -> ModelCfg:
    """A registry entry like the four releases, for the tiny model at ``url``."""
    return ModelCfg("tiny", "unicom_vit", TINY.to_dict(), clip_preprocess(32), url, sha256)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """``(folder, base_url, requests)``: files put in ``folder`` are served at ``base_url/<name>``."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests = []

    class Handler(_QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def published(server, monkeypatch):
    """A tiny checkpoint served over HTTP and listed as release ``tiny``; returns its SHA-256 and module."""
    folder, base_url, _ = server
    model = random_unicom_vit(TINY, seed=3)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, folder / FILE)
    sha256 = hashlib.sha256((folder / FILE).read_bytes()).hexdigest()
    monkeypatch.setitem(MODELS, "tiny", tiny_release(f"{base_url}/{FILE}", sha256))
    monkeypatch.delenv("UNICOM_BASE_URL", raising=False)
    monkeypatch.delenv("UNICOM_OFFLINE", raising=False)
    return sha256, model


def test_right_checksum_is_accepted_and_cached(published, server, tmp_path):
    sha256, model = published
    cache = tmp_path / "cache"
    loaded, _ = unicom.load("tiny", download_root=cache)
    assert hashlib.sha256((cache / FILE).read_bytes()).hexdigest() == sha256
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    unicom.load("tiny", download_root=cache)
    assert server[2] == [f"/{FILE}"]  # the second load used the cache


def test_wrong_checksum_is_rejected_and_nothing_is_kept(published, monkeypatch, tmp_path):
    monkeypatch.setitem(MODELS, "tiny", tiny_release(MODELS["tiny"].url, "0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=f"SHA-256 {published[0]}, expected {'0' * 64}; it was not kept"):
        unicom.load("tiny", download_root=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_cached_file_with_a_wrong_checksum_is_downloaded_again(published, server, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / FILE).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="downloading it again"):
        unicom.load("tiny", download_root=cache)
    assert hashlib.sha256((cache / FILE).read_bytes()).hexdigest() == published[0]


def test_offline_a_cached_file_loads(published, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    unicom.load("tiny", download_root=cache)
    monkeypatch.setenv("UNICOM_OFFLINE", "1")
    monkeypatch.setitem(MODELS, "tiny", tiny_release("http://127.0.0.1:9/gone/" + FILE, published[0]))
    model, _ = unicom.load("tiny", download_root=cache)
    assert model.embedding_dim == 16


def test_offline_a_missing_file_says_where_to_put_it(published, monkeypatch, tmp_path):
    monkeypatch.setenv("UNICOM_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as error:
        unicom.load("tiny", download_root=cache)
    assert f"put the file (SHA-256 {published[0]}) at {cache / FILE}" in str(error.value)


def test_unreachable_server_says_where_to_put_the_file(published, server, monkeypatch, tmp_path):
    base_url = server[1]
    monkeypatch.setitem(MODELS, "tiny", tiny_release(f"{base_url}/missing/{FILE}", published[0]))
    with pytest.raises(InputError, match=f"could not download {base_url}/missing/{FILE} .*put the file"):
        unicom.load("tiny", download_root=tmp_path / "cache")


def test_mirror_from_the_environment_replaces_the_release_host(published, server, monkeypatch, tmp_path):
    monkeypatch.setitem(MODELS, "tiny", tiny_release(f"https://invalid.example/tiny/{FILE}", published[0]))
    monkeypatch.setenv("UNICOM_BASE_URL", server[1] + "/")
    unicom.load("tiny", download_root=tmp_path / "cache")
    assert server[2] == [f"/{FILE}"]


@pytest.mark.parametrize("form", ["folder", "file:///", "file:/"])
def test_a_mirror_on_a_shared_disk_is_given_as_its_folder_or_file_url(published, server, monkeypatch, tmp_path, form):
    monkeypatch.setitem(MODELS, "tiny", tiny_release(f"https://invalid.example/tiny/{FILE}", published[0]))
    mirror = server[0]
    # file:/shared (one slash, as urllib reads it too) is a URL, not a folder named 'file:'
    given = {"folder": str(mirror), "file:///": mirror.as_uri(), "file:/": f"file:{mirror}"}[form]
    monkeypatch.setenv("UNICOM_BASE_URL", given)
    unicom.load("tiny", download_root=tmp_path / "cache")
    assert (tmp_path / "cache" / FILE).read_bytes() == (mirror / FILE).read_bytes()
    assert server[2] == []  # read from the disk, not over HTTP


def test_release_urls_default_to_the_official_host(monkeypatch):
    monkeypatch.delenv("UNICOM_BASE_URL", raising=False)
    assert hub.weights_url("ViT-L/14@336px") == (
        "https://github.com/deepglint/unicom/releases/download/l14_336px/FP16-ViT-L-14-336px.pt"
    )
    assert hub.weights_url("ViT-B/32", base_url="file:///mnt/models") == "file:///mnt/models/FP16-ViT-B-32.pt"


def test_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "models"))
    assert hub.cache_dir() == tmp_path / "models"
    assert hub.cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("UNICOM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "unicom"


def test_a_download_killed_midway_leaves_nothing_behind_once_rerun(published, server, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder, base_url, _ = server
    data = (folder / FILE).read_bytes()
    requested, release = threading.Event(), threading.Event()

    class Stalling(_QuietHandler):
        def do_GET(self):  # half of the file, then nothing until the test ends
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            requested.set()
            release.wait(60)

    stalling = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=stalling.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{stalling.server_address[1]}/{FILE}"
    child = subprocess.Popen([sys.executable, "-c", f"from unicom.models import hub; hub.download({url!r}, {published[0]!r}, {str(cache)!r})"])
    try:
        for _ in range(600):  # until the download is under way (at most a minute)
            if requested.is_set() and any(p.name.endswith(".tmp") for p in cache.glob(".*")):
                break
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        release.set()
        stalling.shutdown()
        stalling.server_close()
    assert any(p.name.endswith(".tmp") for p in cache.iterdir())  # the killed download's part

    hub.download(f"{base_url}/{FILE}", published[0], cache)
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [FILE]
