"""``hf://datasets/org/name/…``: shards and embedding folders in a Hugging Face Hub dataset
repository, read through huggingface_hub's ``HfFileSystem``, equal to the same files on disk.

A Hub is served on 127.0.0.1 by the test, with the endpoints ``HfFileSystem`` reads
through: the repository at a revision (``/api/datasets/{repo}[/revision/{rev}]``), its tree
(``/api/datasets/{repo}/tree/{rev}/{path}``, ``recursive`` and ``expand``, in pages linked
by a ``Link: <…>; rel="next"`` header), ``/api/datasets/{repo}/paths-info/{rev}`` (POST),
and the files (``/datasets/{repo}/resolve/{rev}/{path}``, HEAD and GET with ``Range``);
LFS files redirect to a second server, the way the Hub sends them to its CDN. The unicom
commands run in child processes with ``HF_ENDPOINT`` pointing at it and ``HF_HOME`` in a
temporary folder (huggingface_hub reads both when it is imported); the library calls made
in this process name the endpoint in the storage options (``{"hf": {"endpoint": …}}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from storage_servers import QuietHandler, serve
from support import captioned_samples, write_separated_embeddings, write_tar_shard

from unicom import storage
from unicom.cli import main
from unicom.data.shards import expand_shards
from unicom.errors import InputError

REPO = "org/name"
ROOT = f"hf://datasets/{REPO}"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
DATE = "2024-05-01T12:00:00.000Z"
SHARDS = {0: 5, 1: 4}  # shard number -> samples
PARTS = {0: 40, 1: 35, 3: 25}  # embedding part number -> rows
LFS_SUFFIXES = (".tar", ".npy", ".parquet")  # stored with git LFS: the Hub redirects them to its CDN
CHUNK = storage.CHUNK  # bytes per ranged read of a stream


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class DatasetHub:
    """The Hub on 127.0.0.1 with one dataset repository, :data:`REPO` at :data:`COMMIT`
    (``main``); ``files``: path in the repository -> bytes.

    Faults: ``missing[(path, first_byte)]``: that many downloads of ``path`` asking from
    ``first_byte`` on answer 404 first; ``gone``: paths the tree lists whose downloads
    answer 404 (removed by a later commit); ``cuts[path]``: that many downloads from the
    CDN stop half-way through the body. Tree pages hold ``page_size`` entries
    (``expanded_page_size`` with ``expand``), so that the small repository takes several
    pages, as a large one does on the Hub (1000 and 50 entries a page). ``requests``:
    ``(method, path and query, Range header)`` of every request, the CDN's as ``CDN GET``.
    """

    page_size = 2
    expanded_page_size = 1

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.folders = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
        self.missing: dict[tuple[str, int], int] = {}
        self.gone: set[str] = set()
        self.cuts: dict[str, int] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.cdn = serve(self._cdn_handler())
        self.api = serve(self._hub_handler())
        self.endpoint = f"http://127.0.0.1:{self.api.server_address[1]}"

    def close(self) -> None:
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def downloads(self, path: str) -> list[str]:
        """The ``Range`` headers of the GETs of ``path`` (on the Hub, not the CDN), in order."""
        url = f"/datasets/{REPO}/resolve/main/{path}"
        return [asked for method, where, asked in self.requests if method == "GET" and where == url]

    def _count_down(self, table: dict, key) -> bool:
        with self.lock:
            if table.get(key, 0) > 0:
                table[key] -= 1
                return True
        return False

    def _entry(self, path: str, expand: bool) -> dict:
        """The tree's JSON of a file or folder (with its last commit and scan when ``expand``)."""
        if path in self.folders:
            entry = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
        else:
            data = self.files[path]
            entry = {"type": "file", "oid": _git_sha1(data), "size": len(data), "path": path}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        if expand:
            entry["lastCommit"] = {"id": COMMIT, "title": "Upload the collection", "date": DATE}
            if entry["type"] == "file":
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                               "pickleImportScan": None}
        return entry

    def _tree(self, folder: str, recursive: bool) -> list[str]:
        """Paths under ``folder`` (at any depth when ``recursive``), folders first."""
        prefix = folder + "/" if folder else ""
        below = [p for p in (*self.folders, *self.files) if p.startswith(prefix)]
        if not recursive:
            below = [p for p in below if "/" not in p[len(prefix):]]
        return sorted(below, key=lambda p: (p not in self.folders, p))

    def _hub_handler(self):
        hub = self
        api = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<route>revision|tree|paths-info)/(?P<rest>.*))?$")
        resolve = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")

        class Handler(QuietHandler):
            def do_HEAD(self):
                self._route()

            def do_GET(self):
                self._route()

            def do_POST(self):
                self._route()

            def _route(self):
                url = urlsplit(self.path)
                hub.requests.append((self.command, self.path, self.headers.get("Range", "")))
                if (match := resolve.match(url.path)) is not None:
                    if self._known(match["repo"], unquote(match["revision"])):
                        self._resolve(unquote(match["path"]))
                    return
                match = api.match(url.path)
                if match is None or self.command == "HEAD":
                    return self._error(404, "EntryNotFound")
                revision, _, path = (match["rest"] or "main").partition("/")
                if not self._known(match["repo"], unquote(revision)):
                    return
                route = match["route"]
                if route in (None, "revision"):
                    return self._json({"_id": "6630a1b2c3d4e5f6a7b8c9d0", "id": REPO, "author": REPO.split("/")[0],
                                       "sha": COMMIT, "private": False, "disabled": False, "gated": False,
                                       "lastModified": DATE, "createdAt": DATE, "tags": [], "downloads": 0, "likes": 0,
                                       "siblings": [{"rfilename": p} for p in sorted(hub.files)]})
                if route == "paths-info" and self.command == "POST":
                    form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                    expand = form.get("expand", ["false"])[-1].lower() == "true"
                    wanted = [p.strip("/") for p in form.get("paths", [])]
                    return self._json([hub._entry(p, expand) for p in wanted if p in hub.files or p in hub.folders])
                if route == "tree" and self.command == "GET":
                    return self._tree(unquote(path).strip("/"), {k: v[-1] for k, v in parse_qs(url.query).items()})
                self._error(404, "EntryNotFound")

            def _known(self, repo: str, revision: str) -> bool:
                if repo != REPO:  # the Hub answers a missing repository as it answers a private one
                    self._error(401, "RepoNotFound")
                    return False
                if revision not in ("main", COMMIT):
                    self._error(404, "RevisionNotFound")
                    return False
                return True

            def _tree(self, folder: str, query: dict):
                if folder and folder not in hub.folders:
                    return self._error(404, "EntryNotFound")
                expand = query.get("expand", "false").lower() == "true"
                paths = hub._tree(folder, query.get("recursive", "false").lower() == "true")
                start = int(query.get("cursor", 0))
                stop = start + (hub.expanded_page_size if expand else hub.page_size)
                headers = {}
                if stop < len(paths):
                    following = "&".join(f"{k}={quote(v)}" for k, v in {**query, "cursor": str(stop)}.items())
                    headers["Link"] = f'<{hub.endpoint}{urlsplit(self.path).path}?{following}>; rel="next"'
                self._json([hub._entry(p, expand) for p in paths[start:stop]], headers)

            def _resolve(self, path: str):
                first = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if (path not in hub.files or path in hub.gone
                        or hub._count_down(hub.missing, (path, int(first[1]) if first else 0))):
                    return self._error(404, "EntryNotFound")
                data = hub.files[path]
                if path.endswith(LFS_SUFFIXES):  # its bytes live on the CDN
                    sha256 = hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{hub.cdn.server_address[1]}/blobs/{sha256}")
                    for key, value in (("X-Repo-Commit", COMMIT), ("ETag", f'"{_git_sha1(data)}"'),
                                       ("X-Linked-Etag", f'"{sha256}"'), ("X-Linked-Size", str(len(data))),
                                       ("Content-Length", "0")):
                        self.send_header(key, value)
                    self.end_headers()
                    return
                _send_bytes(self, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{_git_sha1(data)}"'})

            def _json(self, value, headers: dict | None = None):
                payload = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, header in (headers or {}).items():
                    self.send_header(key, header)
                self.end_headers()
                self.wfile.write(payload)

            def _error(self, status: int, code: str):
                payload = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        return Handler

    def _cdn_handler(self):
        hub = self
        by_sha256 = {hashlib.sha256(data).hexdigest(): path for path, data in self.files.items()}

        class Handler(QuietHandler):
            def do_HEAD(self):
                self._blob()

            def do_GET(self):
                self._blob()

            def _blob(self):
                hub.requests.append((f"CDN {self.command}", self.path, self.headers.get("Range", "")))
                path = by_sha256.get(self.path.rsplit("/", 1)[-1])
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[path]
                cut = self.command == "GET" and hub._count_down(hub.cuts, path)
                _send_bytes(self, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, cut=cut)

        return Handler


def _send_bytes(handler, data: bytes, headers: dict, cut: bool = False) -> None:
    """``data``, or the bytes its ``Range`` header asks for, with ``headers`` (no body for
    HEAD); ``cut``: the connection closes half-way through the body."""
    start, stop, status = 0, len(data), 200
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range", ""))
    if match:
        start = int(match[1])
        stop = min(len(data), int(match[2]) + 1) if match[2] else len(data)
        status = 206
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Accept-Ranges", "bytes")
    handler.send_header("Content-Length", str(stop - start))
    if status == 206:
        handler.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
    handler.end_headers()
    if handler.command == "HEAD":
        return
    if cut:
        handler.wfile.write(data[start:start + (stop - start) // 2])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(2)
        return
    handler.wfile.write(data[start:stop])


# ---------------------------------------------------------------------------- the collection


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Shards (the first over 1 MiB, so it is read in two ranged requests), a checkpoint
    and an embedding folder on disk, with the local runs every ``hf://`` run must equal."""
    root = tmp_path_factory.mktemp("hf_datasets")
    for number, count in SHARDS.items():
        samples = captioned_samples(number, count)
        if number == 0:
            samples[0]["bin"] = np.random.default_rng(3).bytes(CHUNK + CHUNK // 4)
        write_tar_shard(root / "shards" / f"{number:05d}.tar", samples)
    torch.manual_seed(0)
    weights = root / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    embed = ["--model", "timm/test_vit", "--pretrained", str(weights), "--batch-size", "2", "--workers", "0"]
    assert main(["embed", "--input", str(root / "shards" / "{00000..00001}.tar"), "--out", str(root / "local_emb"), *embed]) == 0

    for number, count in SHARDS.items():  # the same images as a Hugging Face dataset's parquet files
        samples = captioned_samples(number, count)
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        (root / "data").mkdir(exist_ok=True)
        pq.write_table(pa.table({"image": pa.array([{"bytes": s["jpg"], "path": None} for s in samples], image),
                                 "text": [s["txt"] for s in samples]}),
                       root / "data" / f"train-{number:05d}-of-00002.parquet", row_group_size=2)
    assert main(["embed", "--input", str(root / "data"), "--out", str(root / "local_data_emb"), *embed]) == 0

    write_separated_embeddings(root / "emb", PARTS)
    cluster = ["--k", "4", "--fusion", "image+text", "--points-per-centroid", "20"]
    assert main(["cluster", "--embeddings", str(root / "emb"), "--out", str(root / "local_clusters"), *cluster]) == 0
    return {"root": root, "embed": embed, "cluster": cluster}


def _repository_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(local, monkeypatch):
    """The Hub holding the shards and the embedding folder; this process's ``hf://`` URLs
    reach it, with short retry delays."""
    files = {**_repository_files(local["root"] / "shards", "shards"), **_repository_files(local["root"] / "emb", "emb"),
             **_repository_files(local["root"] / "data", "data"),
             "README.md": b"---\nlicense: cc0-1.0\n---\n# A small collection\n"}
    server = DatasetHub(files)
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"hf": {"endpoint": server.endpoint, "token": False}}))
    monkeypatch.setenv(storage.DELAY_ENV, "0.01")
    yield server
    server.close()


def _unicom(hub: DatasetHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``unicom ARGS`` in a child process whose huggingface_hub reaches ``hub`` (``HF_ENDPOINT``)."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "UNICOM_IO_RETRY_DELAY": "0.01", "UNICOM_PROGRESS": "0", "PYTHONWARNINGS": "ignore",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for name in ("HF_HUB_OFFLINE", "UNICOM_OFFLINE", "HF_TOKEN", storage.OPTIONS_ENV, storage.ATTEMPTS_ENV,
                 "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "unicom.cli", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def _same_files(got: Path, expected: Path, names) -> None:
    for name in names:
        assert (got / name).read_bytes() == (expected / name).read_bytes(), f"{name} differs"


EMBED_FILES = {n: [f"img_emb/img_emb_{n}.npy", f"metadata/metadata_{n}.parquet"] for n in SHARDS}


# ---------------------------------------------------------------------------- tests


def test_embedding_shards_of_a_hub_dataset_equals_the_local_run_through_transient_faults(local, hub, tmp_path):
    hub.missing[("shards/00001.tar", 0)] = 2  # 404 twice, then there
    hub.missing[("shards/00000.tar", CHUNK)] = 1  # its second ranged read answers 404 once
    result = _unicom(hub, tmp_path, "embed", "--input", f"{ROOT}/shards/{{00000..00001}}.tar", "--out",
                     str(tmp_path / "emb"), *local["embed"])
    assert result.returncode == 0, result.stderr[-3000:]
    _same_files(tmp_path / "emb", local["root"] / "local_emb", EMBED_FILES[0] + EMBED_FILES[1])
    assert not (tmp_path / "emb" / "failures").exists()
    assert "embedded 9 samples into 2 parts" in result.stdout
    # the stream went on at the byte where it failed: nothing was read twice
    assert [int(re.match(r"bytes=(\d+)-", asked)[1]) for asked in hub.downloads("shards/00000.tar")] == [0, CHUNK, CHUNK]
    assert len(hub.downloads("shards/00001.tar")) == 3


def test_embedding_the_parquet_files_of_a_hub_dataset_equals_the_local_run(local, hub, tmp_path):
    hub.missing[("data/train-00001-of-00002.parquet", 0)] = 1  # a ranged read answers 404 once
    result = _unicom(hub, tmp_path, "embed", "--input", f"{ROOT}/data/train-*.parquet", "--out", str(tmp_path / "emb"),
                     *local["embed"])
    assert result.returncode == 0, result.stderr[-3000:]
    _same_files(tmp_path / "emb", local["root"] / "local_data_emb", EMBED_FILES[0] + EMBED_FILES[1])
    assert "embedded 9 samples into 2 parts" in result.stdout
    assert hub.missing[("data/train-00001-of-00002.parquet", 0)] == 0  # the fault was met, and retried
    # the footer, then each row group (two rows) in a request of its own: the files were never downloaded whole
    assert len(hub.downloads("data/train-00000-of-00002.parquet")) >= 1 + -(-SHARDS[0] // 2)


def test_clustering_an_embedding_folder_of_a_hub_dataset_equals_the_local_run(local, hub, tmp_path):
    result = _unicom(hub, tmp_path, "cluster", "--embeddings", f"{ROOT}/emb", "--out", str(tmp_path / "clusters"),
                     *local["cluster"])
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["centroids.npy", "cluster_sizes.npy", *(f"labels/labels_{n}.parquet" for n in PARTS)]
    _same_files(tmp_path / "clusters", local["root"] / "local_clusters", names)
    # part 3 is on the second page of each of its folders' listings
    assert any("/tree/main/emb%2Fimg_emb?" in path and "cursor=" in path for _, path, _ in hub.requests)
    # rows come in ranged reads, never a whole .npy file
    arrays = [asked for method, path, asked in hub.requests if method == "GET" and path.endswith(".npy")]
    assert arrays and all(asked.startswith("bytes=") for asked in arrays)


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_shard_that_cannot_be_fetched_is_reported_naming_its_url(local, hub, tmp_path):
    hub.gone.add("shards/00001.tar")  # listed by the tree, removed from the repository since
    result = _unicom(hub, tmp_path, "embed", "--input", f"{ROOT}/shards/{{00000..00001}}.tar", "--out",
                     str(tmp_path / "emb"), *local["embed"])
    assert result.returncode == 1, result.stderr[-3000:]
    url = f"{ROOT}/shards/00001.tar"
    assert "1 parts are not finished" in result.stderr and url in result.stderr
    report = pq.read_table(tmp_path / "emb" / "failures" / "failures_1.parquet").to_pylist()
    assert [(r["part"], r["index"], r["source"], r["reason"]) for r in report] == [
        (1, -1, url, "shard unreadable after 0 samples: fetch failed: not found (HTTP 404) (after 5 attempts)")]
    assert len(hub.downloads("shards/00001.tar")) == 5  # UNICOM_IO_ATTEMPTS, 0.01 s apart
    _same_files(tmp_path / "emb", local["root"] / "local_emb", EMBED_FILES[0])
    assert not any((tmp_path / "emb" / name).exists() for name in EMBED_FILES[1])
    # read in this process: the failure says the file is missing (unicom serve answers 404 for it, not 502)
    with pytest.raises(storage.FetchError) as caught, storage.open_stream(url) as stream:
        stream.read()
    assert caught.value.missing and caught.value.reason == "not found (HTTP 404)"


def test_a_shard_missing_from_the_repository_is_refused_before_anything_is_read(hub):
    with pytest.raises(InputError, match=re.escape(f"{ROOT}/shards/00002.tar: shard not found")):
        expand_shards(f"{ROOT}/shards/{{00000..00002}}.tar")
    assert not any("/resolve/" in path for _, path, _ in hub.requests)


def test_shards_of_a_repository_the_hub_will_not_show_name_the_repository_not_a_missing_shard(hub):
    with pytest.raises(storage.FetchError, match=re.escape(
            "hf://datasets/org/nmae/shards: refused (HTTP 401 Unauthorized); the Hub answers so for a repository")):
        expand_shards("hf://datasets/org/nmae/shards/{00000..00001}.tar")
    with pytest.raises(InputError, match=re.escape(
            f"{ROOT}/shars/00000.tar: shard not found (from the input '{ROOT}/shars/{{00000..00001}}.tar'); the folder "
            f"{ROOT}/shars/ holds no files; check the URL or the pattern")):
        expand_shards(f"{ROOT}/shars/{{00000..00001}}.tar")


@pytest.mark.parametrize("expand_info", [False, True], ids=["plain", "expanded"])
def test_listings_and_globs_of_a_hub_dataset_name_the_files_of_the_local_folder(local, hub, monkeypatch, expand_info):
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"hf": {"endpoint": hub.endpoint, "token": False,
                                                               "expand_info": expand_info}}))
    emb = local["root"] / "emb"
    found = [storage.text(p)[len(f"{ROOT}/emb/"):] for p in storage.find_files(f"{ROOT}/emb")]
    assert found == [p.relative_to(emb).as_posix() for p in storage.find_files(emb)]
    assert sorted(storage.list_files(f"{ROOT}/emb/img_emb")) == sorted(storage.list_files(emb / "img_emb"))
    assert storage.glob(f"{ROOT}/emb/*/*_3.*") == [f"{ROOT}/emb/{p.relative_to(emb).as_posix()}"
                                                   for p in map(Path, storage.glob(str(emb / "*" / "*_3.*")))]
    assert expand_shards(f"{ROOT}/shards/*.tar") == [f"{ROOT}/shards/00000.tar", f"{ROOT}/shards/00001.tar"]
    assert storage.size(f"{ROOT}/emb/img_emb/img_emb_3.npy") == (emb / "img_emb" / "img_emb_3.npy").stat().st_size
    trees = [path for _, path, _ in hub.requests if "/tree/" in path]
    assert all(f"expand={str(expand_info).lower()}" in path for path in trees) and any("cursor=" in path for path in trees)


def test_a_connection_the_hub_keeps_cutting_is_a_fetch_failure_naming_the_url(hub):
    """huggingface_hub's HTTP client (httpx) raises its own errors, not OSErrors; after its
    own retries they are retried as any network failure, then reported with the URL."""
    from huggingface_hub.utils import get_session

    hub.cuts["shards/00001.tar"] = 100
    url = f"{ROOT}/shards/00001.tar"
    with pytest.raises(storage.FetchError) as caught:
        storage.retrying(url, lambda: get_session().get(f"{hub.endpoint}/datasets/{REPO}/resolve/main/shards/00001.tar"))
    assert caught.value.location == url and caught.value.attempts == 5 and not caught.value.missing
    assert hub.cuts["shards/00001.tar"] == 95


def test_a_repository_the_hub_will_not_show_is_named_with_what_to_check(hub):
    """The Hub answers 401 for a misspelt repository as for a private or gated one: a
    check of a folder in it says both, and how to log in, not to pass --storage-options."""
    with pytest.raises(storage.FetchError) as error:
        storage.is_dir("hf://datasets/org/nmae/emb")
    assert str(error.value) == (
        "hf://datasets/org/nmae/emb: refused (HTTP 401 Unauthorized); the Hub answers so for a repository that does "
        "not exist, or one that is private or gated: check the repository's name, and log in (`hf auth login`, or "
        "HF_TOKEN) with access to it")
    assert storage.is_dir("hf://datasets/org/name/emb") and not storage.is_file("hf://datasets/org/name/nope.json")
