"""``hf-hub:org/repo``: model folders on the Hugging Face Hub, through huggingface_hub.

A Hub is served on 127.0.0.1 by the test: ``/{repo}/resolve/{revision}/{file}`` answers
HEAD and GET with the Hub's headers (``X-Repo-Commit``, ``ETag``, ``Content-Length``), and
large files redirect to a second server, the way the Hub sends LFS files to its CDN
(``X-Linked-Etag``, ``X-Linked-Size``). Loading runs in child processes with
``HF_ENDPOINT`` pointing at it and ``HF_HOME`` in a temporary folder (huggingface_hub
reads both when it is imported); nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from storage_servers import QuietHandler, serve

from unicom.models import export
from unicom.models.registry import clip_preprocess
from unicom.models.vit import ClipViT, ClipViTSettings

SMALL = ClipViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=2, embedding_dim=24)
# a small open_clip CLIP, published in open_clip's own Hub format
OPEN_CLIP_CFG = {"embed_dim": 48, "vision_cfg": {"layers": 2, "width": 128, "patch_size": 8, "image_size": 32, "head_width": 64},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """``repos``: repo id -> {file name: bytes}, all at commit :data:`COMMIT`."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.cdn_requests: list[str] = []
        blobs = {hashlib.sha256(data).hexdigest(): data for files in repos.values() for data in files.values()}
        self.cdn = serve(self._cdn_handler(blobs))
        self.api = serve(self._hub_handler())
        self.endpoint = f"http://127.0.0.1:{self.api.server_address[1]}"

    def close(self):
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def _hub_handler(self):
        hub = self

        class Handler(QuietHandler):
            def do_HEAD(self):
                self._resolve(body=False)

            def do_GET(self):
                self._resolve(body=True)

            def _resolve(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("/")  # /org/name/resolve/revision/file, the file maybe in a folder
                if len(parts) < 6 or parts[3] != "resolve":
                    return self._error(404, "EntryNotFound")
                repo, revision, name = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
                if repo not in hub.repos:
                    return self._error(401, "RepoNotFound")
                if revision not in ("main", COMMIT):
                    return self._error(404, "RevisionNotFound")
                data = hub.repos[repo].get(name)
                if data is None:
                    return self._error(404, "EntryNotFound")
                if name.endswith(".safetensors"):  # an LFS file: its bytes live on the CDN
                    sha256 = hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{hub.cdn.server_address[1]}/blobs/{sha256}")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{git_sha1}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler

    def _cdn_handler(self, blobs: dict[str, bytes]):
        hub = self

        class Handler(QuietHandler):
            def do_GET(self):
                hub.cdn_requests.append(self.path)
                data = blobs.get(self.path.rsplit("/", 1)[-1])
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def hub_environment(hub: Hub, home: Path) -> dict[str, str]:
    """The environment of a child process that loads from ``hub`` into a Hugging Face cache
    under ``home``, with no proxy and downloads on."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for name in ("UNICOM_OFFLINE", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return env


def online_then_offline(repos: dict[str, dict[str, bytes]], script: str, args: list[str], folder: Path):
    """Run ``script`` with ``args`` and then the path of the ``.npy`` file it writes, in a child
    process, against a Hub of ``repos`` served here; then again with the Hub gone and downloads
    off (the cache of the first run). Returns the Hub (its requests) and each run's (array, what
    it printed)."""
    import numpy as np

    hub = Hub(repos)
    env = hub_environment(hub, folder / "hf")

    def run(name: str, env: dict) -> tuple:
        result = subprocess.run([sys.executable, "-c", script, *args, str(folder / name)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return np.load(folder / name), result.stdout

    try:
        online = run("online.npy", env)
    finally:
        hub.close()
    return hub, [online, run("offline.npy", {**env, "UNICOM_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})]


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _run(mode: str, env: dict[str, str], cwd: Path) -> dict:
    """Run :data:`LOAD` as ``mode`` (``online`` or ``offline``); returns what it printed."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD), mode], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOAD = """
    import json, sys, torch, timm, unicom
    from unicom.errors import InputError
    from unicom.models.encoders import load_encoder

    mode = sys.argv[-1]
    x = torch.load("images.pt")
    out = {}
    with torch.no_grad():
        model, _ = unicom.load("hf-hub:org/clip-vit")
        torch.save(model(x), f"{mode}_unicom.pt")
        encoder = load_encoder("hf-hub:org/clip-vit@%s")
        out["encoder"] = encoder.name
        torch.save(encoder.encode_image(x), f"{mode}_encoder.pt")
        if mode == "online":
            torch.save(timm.create_model("hf-hub:org/clip-vit", pretrained=True).eval()(x), "online_timm.pt")
        other = load_encoder("hf-hub:org/open-clip")  # no unicom_model.json: open_clip's hf-hub: spec
        out["open_clip"] = type(other).__name__
        torch.save(other.encode_image(x), f"{mode}_open_clip.pt")
    for spec in ("hf-hub:org/missing", "hf-hub:org/no-model", "hf-hub:org/clip-vit@v9", "hf-hub:org/weightless"):
        try:
            unicom.load(spec)
        except InputError as error:
            out[spec] = str(error)
    try:
        load_encoder("hf-hub:org/remote-code")
    except InputError as error:
        out["hf-hub:org/remote-code"] = str(error)
    print(json.dumps(out))
""" % COMMIT


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory):
    """Two child processes: the first loads from the Hub, the second (the Hub gone,
    ``UNICOM_OFFLINE=1``) from the cache the first filled."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = ClipViT(SMALL).eval()
    export.save_model(root / "clip-vit", model, "clip_vit", SMALL, clip_preprocess(32))
    files = _folder_files(root / "clip-vit")
    open_clip_model = _open_clip_model()
    hub = Hub({
        "org/clip-vit": files,
        "org/open-clip": {"open_clip_config.json": json.dumps({"model_cfg": OPEN_CLIP_CFG}).encode(),
                          "open_clip_model.safetensors": _safetensors(open_clip_model.state_dict())},
        "org/no-model": {"open_clip_config.json": b"{}"},
        "org/remote-code": {"config.json": json.dumps({"model_type": "jina_clip", "architectures": ["JinaCLIPModel"],
                                                       "auto_map": {"AutoModel": "modeling_clip.JinaCLIPModel"}}).encode()},
        "org/weightless": {"unicom_model.json": files["unicom_model.json"]},
    })
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, root / "images.pt")
    env = hub_environment(hub, root / "hf")
    try:
        online = _run("online", env, root)
    finally:
        hub.close()
    offline = _run("offline", {**env, "UNICOM_OFFLINE": "1"}, root)
    with torch.no_grad():
        expected, expected_open_clip = model(x), open_clip_model.encode_image(x)
    return {"root": root, "expected": expected, "expected_open_clip": expected_open_clip,
            "online": online, "offline": offline, "hub": hub}


def _open_clip_model():
    from open_clip.model import CLIP

    torch.manual_seed(2)
    return CLIP(**OPEN_CLIP_CFG).eval()


def _safetensors(state_dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()})


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_model_folder_on_the_hub_loads_with_the_same_embeddings(hub_runs):
    for name in ("online_unicom.pt", "online_encoder.pt"):
        torch.testing.assert_close(torch.load(hub_runs["root"] / name), hub_runs["expected"], rtol=0, atol=1e-6)
    assert hub_runs["online"]["encoder"].endswith(f"(hf-hub:org/clip-vit@{COMMIT})")


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_timm_loads_the_same_hub_repository(hub_runs):
    torch.testing.assert_close(torch.load(hub_runs["root"] / "online_timm.pt"), hub_runs["expected"], rtol=0, atol=1e-6)


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_the_weights_come_from_the_cdn_once_and_then_from_the_cache(hub_runs):
    hub = hub_runs["hub"]
    weights = hashlib.sha256((hub_runs["root"] / "clip-vit" / "model.safetensors").read_bytes()).hexdigest()
    assert hub.cdn_requests.count(f"/blobs/{weights}") == 1  # unicom.load fetched it; load_encoder and timm reused it
    gets = [path for method, path in hub.requests if method == "GET"]
    assert gets.count("/org/clip-vit/resolve/main/unicom_model.json") == 1
    assert not any(path.endswith("model.safetensors") for path in gets)


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_offline_the_cache_serves_the_same_model(hub_runs):
    # the second process ran with the Hub shut down: every file came from HF_HOME
    for name in ("offline_unicom.pt", "offline_encoder.pt"):
        torch.testing.assert_close(torch.load(hub_runs["root"] / name), hub_runs["expected"], rtol=0, atol=1e-6)
    assert "org/missing" in hub_runs["offline"]["hf-hub:org/missing"]
    assert "is not in the Hugging Face cache" in hub_runs["offline"]["hf-hub:org/missing"]
    assert "downloads are off (UNICOM_OFFLINE" in hub_runs["offline"]["hf-hub:org/missing"]


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_repository_of_open_clip_still_goes_to_open_clip_online_and_offline(hub_runs):
    assert hub_runs["online"]["open_clip"] == hub_runs["offline"]["open_clip"] == "OpenClipEncoder"
    for mode in ("online", "offline"):
        got = torch.load(hub_runs["root"] / f"{mode}_open_clip.pt")
        torch.testing.assert_close(got, hub_runs["expected_open_clip"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_missing_repository_is_named_with_what_to_do(hub_runs):
    message = hub_runs["online"]["hf-hub:org/missing"]
    assert "no repository org/missing on http://127.0.0.1:" in message and "HF_TOKEN" in message


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_repository_without_a_model_folder_says_so(hub_runs):
    assert hub_runs["online"]["hf-hub:org/no-model"] == "hf-hub:org/no-model: the repository has no unicom_model.json"
    assert "has unicom_model.json but no model.safetensors" in hub_runs["online"]["hf-hub:org/weightless"]


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_repository_of_a_model_whose_code_is_its_own_is_named(hub_runs):
    message = hub_runs["online"]["hf-hub:org/remote-code"]
    assert message.startswith("hf-hub:org/remote-code: the repository holds a transformers model of type 'jina_clip', "
                              "whose code is in its repository (auto_map; transformers' trust_remote_code, which "
                              "unicom does not run); the types read are clip, siglip, ")


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_an_unknown_revision_is_named(hub_runs):
    assert "revision 'v9' does not exist in org/clip-vit" in hub_runs["online"]["hf-hub:org/clip-vit@v9"]
