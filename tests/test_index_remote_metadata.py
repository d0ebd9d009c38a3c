"""An index folder at a URL: its faiss files are copied into the local cache, its metadata
files are read in place (the footer and the row groups a lookup needs, by ranged requests),
and a clip-retrieval metadata file in coarse row groups is copied once, straight into small
row groups. Real servers on 127.0.0.1: moto's S3 and a file server over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from storage_servers import ChunkedFileServer, FileServer
from test_index_clip_retrieval import unit_rows, write_autofaiss_folder, write_collection

from unicom import storage
from unicom.errors import InputError
from unicom.formats.embeddings import write_part
from unicom.search import index as index_module
from unicom.search import metadata_rows
from unicom.search.index import Index
from unicom.search.metadata_rows import with_build


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def parquet_files(folder) -> list:
    return sorted(folder.rglob("*.parquet"))


def small_row_groups(monkeypatch, rows: int) -> None:
    """`unicom index` writes its metadata in row groups of ``rows`` (16384 otherwise)."""
    monkeypatch.setattr(index_module, "ROW_GROUP_ROWS", rows)


def captioned_collection(root, rows: int, seed: int = 0, prefix: str = "caption") -> list[str]:
    """One part of ``rows`` unit vectors, with a caption of 40 random hex digits per row."""
    rng = np.random.default_rng(seed)
    captions = [f"{prefix} {value}" for value in rng.bytes(20 * rows).hex(" ", 20).split()]
    write_part(root, 0, image=unit_rows(rows, 16, seed), metadata=pa.table({"caption": captions}))
    return captions


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_remote_index_answers_as_the_local_one_with_no_metadata_file_on_local_disk(store, request, tmp_path, cache,
                                                                                    monkeypatch):
    server = request.getfixturevalue(store)
    small_row_groups(monkeypatch, 16)
    write_collection(tmp_path / "emb", {0: 70, 1: 50, 2: 40}, text=False)
    local = Index.build(tmp_path / "emb", tmp_path / "index")
    server.bucket("remote-meta-a")
    url = server.upload_folder(tmp_path / "index", "remote-meta-a", "index")
    # an earlier version copied the metadata whole into the cache: that copy is no longer used, and goes
    stale = storage.cache_folder(url) / "metadata" / "metadata_0.parquet"
    stale.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "index" / "metadata" / "metadata_0.parquet", stale)

    remote = Index.load(url)
    queries = unit_rows(6, 32, seed=5)
    scores, ids = remote.search(queries, 9)
    np.testing.assert_array_equal(ids, local.search(queries, 9)[1])
    assert remote.metadata(ids) == local.metadata(ids)
    assert remote.metadata(np.arange(len(local))) == local.metadata(np.arange(len(local)))
    assert remote.metadata_rows.read_from(1) == f"{url}/metadata/metadata_1.parquet"
    assert parquet_files(cache) == []
    assert sorted(path.name for path in remote.path.rglob("*") if path.is_file()) == [
        ".signatures.json", "SOURCE", "heldout_ids.npy", "index.json", local.config["file"]]


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_remote_embedding_folder_given_as_an_index_says_to_build_an_index_of_it(store, request, tmp_path, cache):
    server = request.getfixturevalue(store)
    write_collection(tmp_path / "emb", {0: 10}, text=False)
    server.bucket("given-embeddings")
    url = server.upload_folder(tmp_path / "emb", "given-embeddings", "emb")
    # not `--out` the embedding folder itself, which `unicom index` refuses
    with pytest.raises(InputError, match=re.escape(f"{url}: an embedding folder, not an index; build an index of it with "
                                                   f"`unicom index --emb {url} --out INDEX/` and search that")):
        Index.load(url)
    with pytest.raises(InputError, match=re.escape(f"{url}/img_emb: no index.json inside")):
        Index.load(f"{url}/img_emb")


def test_a_missing_index_on_a_server_that_refuses_folder_pages_is_named_as_not_an_index(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    with FileServer(tmp_path) as server:
        for name in ("index/img_emb", "index/img_emb/"):  # as S3 behind CloudFront answers for a missing key
            server.fault(name, status=403, statuses=100)
        with pytest.raises(InputError, match=re.escape(f"{server.url}/index: no index.json inside")):
            Index.load(f"{server.url}/index")


def test_a_remote_clip_retrieval_index_in_coarse_row_groups_is_copied_once_into_small_ones(s3, tmp_path, cache,
                                                                                          monkeypatch):
    monkeypatch.setattr(metadata_rows, "RECHUNK_ABOVE", 256)
    monkeypatch.setattr(metadata_rows, "ROW_GROUP_ROWS", 64)
    sizes = {0: 300, 1: 410, 2: 350}
    parts = write_collection(tmp_path / "emb", sizes)
    write_autofaiss_folder(tmp_path / "index", tmp_path / "emb", parts, "Flat", "Flat", {"image": "", "text": ""})
    originals = [tmp_path / "index" / "metadata" / f"metadata_{number}.parquet" for number in sizes]
    assert {pq.ParquetFile(file).metadata.num_row_groups for file in originals} == {1}
    s3.bucket("remote-meta-b")
    url = s3.upload_folder(tmp_path / "index", "remote-meta-b", "index")

    remote = Index.load(url)
    whole = pa.concat_tables([pq.read_table(file) for file in originals]).to_pylist()
    ids = np.random.default_rng(0).integers(0, len(remote), size=(5, 8))
    assert remote.metadata(ids) == [[{"id": i, **whole[i]} for i in query] for query in ids.tolist()]
    remote.metadata(np.arange(len(remote)))  # every file opened
    copies = [remote.metadata_rows.read_from(file) for file in range(len(sizes))]
    assert parquet_files(cache) == sorted(copies) and all(copy.parent == cache / "metadata" for copy in copies)
    for copy, original in zip(copies, originals):
        assert pq.read_table(copy).equals(pq.read_table(original))
        assert pq.ParquetFile(copy).metadata.num_row_groups == -(-pq.ParquetFile(copy).metadata.num_rows // 64)
    stamps = [copy.stat().st_mtime_ns for copy in copies]
    again = Index.load(url)
    assert again.metadata(ids) == remote.metadata(ids)
    assert [again.metadata_rows.read_from(file).stat().st_mtime_ns for file in range(len(sizes))] == stamps


def test_a_remote_metadata_file_replaced_between_two_loads_gives_its_new_rows(s3, tmp_path, cache, monkeypatch):
    small_row_groups(monkeypatch, 16)
    monkeypatch.setattr(metadata_rows, "RECHUNK_ABOVE", 32)  # clip-retrieval's layout: a copy in small row groups
    monkeypatch.setattr(metadata_rows, "ROW_GROUP_ROWS", 16)
    s3.bucket("remote-meta-c")
    for layout in ("unicom", "clip-retrieval"):
        emb = tmp_path / layout / "emb"
        captioned_collection(emb, 100)
        Index.build(emb, tmp_path / layout / "index", layout=layout)
        metadata = next((tmp_path / layout / "index" / "metadata").glob("*.parquet"))
        if layout == "clip-retrieval":  # as clip-retrieval writes it: every row in one row group
            pq.write_table(pq.read_table(metadata), metadata)
        url = s3.upload_folder(tmp_path / layout / "index", "remote-meta-c", layout)
        before = Index.load(url)
        assert before.metadata(70)["caption"] == pq.read_table(metadata).column("caption")[70].as_py()

        table = pq.read_table(metadata)
        renamed = table.set_column(table.column_names.index("caption"), "caption",
                                   pa.array([f"new {c}" for c in table.column("caption").to_pylist()]))
        pq.write_table(renamed, metadata, row_group_size=16)
        s3.upload_folder(tmp_path / layout / "index", "remote-meta-c", layout)
        after = Index.load(url)
        assert after.metadata(70)["caption"] == "new " + before.metadata(70)["caption"], layout
        assert after.metadata(3)["caption"].startswith("new caption "), layout


def test_a_remote_metadata_file_replaced_while_loaded_is_named_not_misread(s3, tmp_path, cache, monkeypatch):
    small_row_groups(monkeypatch, 16)
    captioned_collection(tmp_path / "emb", 100)
    Index.build(tmp_path / "emb", tmp_path / "index")
    s3.bucket("remote-meta-d")
    url = s3.upload_folder(tmp_path / "index", "remote-meta-d", "index")
    loaded = Index.load(url)
    loaded.metadata(0)  # the footer is read, and row group 0
    captions = captioned_collection(tmp_path / "other", 100, seed=1, prefix="a much longer caption, elsewhere in the file")
    Index.build(tmp_path / "other", tmp_path / "replaced")
    file = tmp_path / "replaced" / "metadata" / "metadata_0.parquet"
    # a file of the same build, written again (a file of another build is refused as such)
    pq.write_table(with_build(pq.read_table(file), loaded.config["build"]), file, row_group_size=16)
    s3.put("remote-meta-d", "index/metadata/metadata_0.parquet", file.read_bytes())
    changed = r"metadata_0\.parquet: changed since the index was loaded .*load the index again"
    with pytest.raises(InputError, match=changed):
        loaded.metadata(90)
    assert Index.load(url).metadata(90)["caption"] == captions[90]


def served_bytes(asked: list[str], name: str, size: int) -> int:
    """Bytes the file server sent of file ``name`` (``size`` bytes), from its request log."""
    total = 0
    for line in asked:
        method, path, *ranges = line.split(" ")
        if method != "GET" or path != name:
            continue
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", ranges[0] if ranges else "")
        if match is None:
            total += size
        elif not match.group(1):
            total += min(size, int(match.group(2)))
        else:
            stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
            total += stop - int(match.group(1))
    return total


def test_a_lookup_in_a_remote_index_reads_the_footer_and_one_row_group_not_the_file(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    small_row_groups(monkeypatch, 1000)
    captions = captioned_collection(tmp_path / "emb", 20000)
    Index.build(tmp_path / "emb", tmp_path / "index")
    metadata = tmp_path / "index" / "metadata" / "metadata_0.parquet"
    assert pq.ParquetFile(metadata).metadata.num_row_groups == 20
    size = metadata.stat().st_size
    with FileServer(tmp_path / "index") as http:
        index = Index.load(f"{http.url}/")
        assert index.metadata(12345)["caption"] == captions[12345]
        read = served_bytes(http.state.asked, "metadata/metadata_0.parquet", size)
    assert 0 < read < size / 8  # its footer and row group 12 (of 20): not the file
    assert parquet_files(cache) == []


@contextlib.contextmanager
def python_http_server(folder, requests: list | None = None):
    """python's own http.server for ``folder`` (it ignores Range, sends Last-Modified and no
    ETag); its request lines are appended to ``requests``. Yields its URL."""
    from http.server import SimpleHTTPRequestHandler

    from storage_servers import serve

    class WholeFiles(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format, *args):
            if requests is not None:
                requests.append(self.requestline)

    server = serve(WholeFiles)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_ignores_range_sends_each_metadata_file_once(tmp_path, cache, monkeypatch):
    """python's own http.server answers a ranged request with the whole file: a lookup per row
    group would download the file each time, so it is fetched once, whole, into the cache."""
    small_row_groups(monkeypatch, 1000)
    captions = captioned_collection(tmp_path / "emb", 20000)
    Index.build(tmp_path / "emb", tmp_path / "index")
    metadata = tmp_path / "index" / "metadata" / "metadata_0.parquet"
    requests = []
    with python_http_server(tmp_path / "index", requests) as url:
        index = Index.load(url)
        ids = np.arange(500, 20000, 1000)  # one row of each row group
        assert [row["caption"] for row in index.metadata(ids)] == [captions[i] for i in ids]
        assert index.metadata(ids) == index.metadata(ids)
    gets = [line for line in requests if line.startswith("GET /metadata/metadata_0.parquet")]
    assert len(gets) == 2  # the footer's request, answered whole, then the copy
    assert [path.stat().st_size for path in parquet_files(cache)] == [metadata.stat().st_size]


def test_a_server_that_gives_no_file_size_has_each_metadata_file_fetched_whole_once(tmp_path, cache, monkeypatch):
    """A server that answers in chunks, with no Content-Length (nor Range): no ranged read can
    find a parquet footer, so the file is fetched whole into the cache, once, and read there."""
    small_row_groups(monkeypatch, 1000)
    captions = captioned_collection(tmp_path / "emb", 20000)
    Index.build(tmp_path / "emb", tmp_path / "index")
    metadata = tmp_path / "index" / "metadata" / "metadata_0.parquet"
    ids = np.arange(500, 20000, 1000)  # one row of each row group
    with ChunkedFileServer(tmp_path / "index") as http:
        assert storage.file_version(f"{http.url}/metadata/metadata_0.parquet")[0] == 0  # what the store knows of its size
        http.requests.clear()
        assert [row["caption"] for row in Index.load(f"{http.url}/").metadata(ids)] == [captions[i] for i in ids]
        # the size asked for (a HEAD, then a GET whose answer has none either), then the one fetch: not one per row group
        assert http.requests.count("GET /metadata/metadata_0.parquet") == 2
        (copy,) = parquet_files(cache / "metadata")
        stamp = copy.stat().st_mtime_ns
        again = Index.load(f"{http.url}/")  # a second load of the same version (ETag): the copy is used
        assert [row["caption"] for row in again.metadata(ids[::-1])] == [captions[i] for i in ids[::-1]]
    assert parquet_files(cache / "metadata") == [copy] and copy.stat().st_mtime_ns == stamp
    assert pq.read_table(copy).equals(pq.read_table(metadata))


def test_a_clip_retrieval_index_on_a_server_that_gives_no_file_size_is_read_from_small_copies(tmp_path, cache,
                                                                                              monkeypatch):
    """Its files are numbered at load (every footer read): each is fetched once, straight into
    the copy in small row groups that its lookups read."""
    monkeypatch.setattr(metadata_rows, "RECHUNK_ABOVE", 256)
    monkeypatch.setattr(metadata_rows, "ROW_GROUP_ROWS", 64)
    sizes = {0: 300, 1: 410}
    parts = write_collection(tmp_path / "emb", sizes)
    write_autofaiss_folder(tmp_path / "index", tmp_path / "emb", parts, "Flat", "Flat", {"image": "", "text": ""})
    originals = [tmp_path / "index" / "metadata" / f"metadata_{number}.parquet" for number in sizes]
    whole = pa.concat_tables([pq.read_table(file) for file in originals]).to_pylist()
    with ChunkedFileServer(tmp_path / "index") as http:
        remote = Index.load(f"{http.url}/")
        assert remote.metadata(np.arange(len(remote))) == [{"id": i, **row} for i, row in enumerate(whole)]
    for number in sizes:  # its size asked for at load (HEAD, GET) and at the first lookup (HEAD, GET), one fetch
        assert http.requests.count(f"GET /metadata/metadata_{number}.parquet") == 3
    copies = [remote.metadata_rows.read_from(file) for file in range(len(sizes))]
    assert parquet_files(cache / "metadata") == sorted(copies)
    assert [pq.ParquetFile(copy).metadata.num_row_groups for copy in copies] == [5, 7]


def test_a_metadata_file_rewritten_at_its_size_on_a_server_without_etags_gives_its_new_rows(tmp_path, cache,
                                                                                            monkeypatch):
    """The whole-file copy of a server that sends no ETag belongs to the file's Last-Modified
    too: a file written again with the same number of bytes is fetched again, not read from
    the copy of its former content."""
    small_row_groups(monkeypatch, 1000)
    captions = captioned_collection(tmp_path / "emb", 3000)
    Index.build(tmp_path / "emb", tmp_path / "index")
    metadata = tmp_path / "index" / "metadata" / "metadata_0.parquet"
    # the same captions with their hex digits permuted: another content in exactly as many bytes
    new_captions = [caption.translate(str.maketrans("0123456789abcdef", "fedcba9876543210")) for caption in captions]
    table = pq.read_table(metadata)
    pq.write_table(table, metadata, row_group_size=1000, compression="none")
    rewritten = tmp_path / "rewritten.parquet"
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", pa.array(new_captions)), rewritten,
                   row_group_size=1000, compression="none")
    assert rewritten.stat().st_size == metadata.stat().st_size
    with python_http_server(tmp_path / "index") as url:
        assert Index.load(url).metadata(2500)["caption"] != new_captions[2500]
        shutil.copy(rewritten, metadata)
        os.utime(metadata, (time.time() + 10, time.time() + 10))  # Last-Modified counts whole seconds
        assert Index.load(url).metadata(2500)["caption"] == new_captions[2500]


def test_unicom_serve_of_a_remote_index_answers_as_for_the_local_one(s3, tmp_path, cache, monkeypatch):
    from fastapi.testclient import TestClient

    from unicom.search.service import create_app

    small_row_groups(monkeypatch, 16)
    write_collection(tmp_path / "emb", {0: 60, 1: 45}, text=False)
    local = Index.build(tmp_path / "emb", tmp_path / "index")
    s3.bucket("remote-meta-serve")
    remote = Index.load(s3.upload_folder(tmp_path / "index", "remote-meta-serve", "index"))
    query = unit_rows(1, 32, seed=3)[0].tolist()
    answers = []
    for index in (local, remote):
        with TestClient(create_app({"photos": index})) as client:
            search = client.post("/search", json={"embedding": query, "k": 6}).json()
            knn = client.post("/knn-service", json={"embedding_input": query, "modality": "image", "num_images": 6,
                                                    "indice_name": "photos"}).json()
            metadata = client.post("/metadata", json={"ids": [3, 70, 104], "indice_name": "photos"}).json()
        answers.append((search["results"], knn, metadata))
    assert answers[1] == answers[0]
    assert [row["metadata"]["key"] for row in answers[1][2]] == ["p0-r3", "p1-r10", "p1-r44"]
    assert parquet_files(cache) == []


def indexed_captions(tmp_path, monkeypatch) -> list[str]:
    """An index in ``tmp_path / "index"`` of 5000 captioned rows in row groups of 1000, read with
    retries 0.01 s apart; returns the captions."""
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    small_row_groups(monkeypatch, 1000)
    captions = captioned_collection(tmp_path / "emb", 5000)
    Index.build(tmp_path / "emb", tmp_path / "index")
    return captions


def test_reads_of_a_remote_metadata_file_that_fail_for_a_while_are_retried(tmp_path, cache, monkeypatch):
    captions = indexed_captions(tmp_path, monkeypatch)
    with FileServer(tmp_path / "index") as http:
        index = Index.load(f"{http.url}/")
        absent = http.fault("metadata/metadata_0.parquet", missing=2)  # not there yet, twice
        assert index.metadata(1500)["caption"] == captions[1500]
        cut = http.fault("metadata/metadata_0.parquet", cuts=1, cut_after=2000)  # a connection reset mid-body
        assert index.metadata(4500)["caption"] == captions[4500]
        assert absent.requests > 2 and cut.requests > 1
        shutil.rmtree(tmp_path / "index" / "metadata")
        monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "2")
        with pytest.raises(InputError, match=r"metadata/metadata_0\.parquet: file not found; the index folder is "
                                             "incomplete, rebuild it"):
            Index.load(f"{http.url}/").metadata(0)


def test_a_remote_index_of_embeddings_without_metadata_gives_the_ids_of_its_results(s3, tmp_path, cache):
    """`unicom index` writes a metadata file of ids for every part, metadata or not: it is uploaded and read."""
    vectors = unit_rows(50, 8, seed=0)
    write_part(tmp_path / "emb", 0, image=vectors)
    s3.bucket("remote-meta-ids")
    built = Index.build(tmp_path / "emb", "s3://remote-meta-ids/built")
    assert built.config["has_metadata"] is False
    assert "built/metadata/metadata_0.parquet" in s3.keys("remote-meta-ids", "built/")
    Index.build(tmp_path / "emb", tmp_path / "index")
    uploaded = s3.upload_folder(tmp_path / "index", "remote-meta-ids", "uploaded")
    for url in ("s3://remote-meta-ids/built", uploaded):
        index = Index.load(url)
        _, ids = index.search(vectors[[7]], 3)
        assert index.metadata(ids[0]) == [{"id": int(i)} for i in ids[0]] and ids[0][0] == 7


def test_a_remote_metadata_file_removed_while_loaded_is_named_missing_after_one_round_of_retries(tmp_path, cache,
                                                                                                monkeypatch):
    monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "3")
    captions = indexed_captions(tmp_path, monkeypatch)
    with FileServer(tmp_path / "index") as http:
        index = Index.load(f"{http.url}/")
        assert index.metadata(10)["caption"] == captions[10]
        (tmp_path / "index" / "metadata" / "metadata_0.parquet").unlink()
        asked = len(http.state.asked)
        with pytest.raises(InputError, match=r"metadata/metadata_0\.parquet: no longer in the store \(removed since "
                                             r"the index was loaded\); .*put the file back or rebuild the index"):
            index.metadata(4500)
        assert len(http.state.asked) - asked == 3  # the row group's request, 3 times; its version not asked again


COARSE_ROWS = 100_000


def coarse_file(folder) -> list[str]:
    """``folder / "m.parquet"``: 100,000 captions in one row group (as clip-retrieval writes);
    returns the captions."""
    captions = np.random.default_rng(0).bytes(20 * COARSE_ROWS).hex(" ", 20).split()
    pq.write_table(pa.table({"caption": captions}), folder / "m.parquet", row_group_size=COARSE_ROWS)
    return captions


def copying_process(url, copies):
    """Another process that opens the coarse file at ``url``, copying it into ``copies`` in
    row groups of 1000 rows."""
    import subprocess
    import sys

    child = ("import sys; from unicom.search import metadata_rows as m; m.RECHUNK_ABOVE, m.ROW_GROUP_ROWS = 2000, 1000; "
             f"m.MetadataRows([(sys.argv[1], {COARSE_ROWS})], copies=sys.argv[2]).read_from(0)")
    return subprocess.Popen([sys.executable, "-c", child, url, str(copies)])


def test_processes_that_need_the_same_coarse_copy_at_once_make_it_once(tmp_path):
    captions = coarse_file(tmp_path)
    size = (tmp_path / "m.parquet").stat().st_size
    with FileServer(tmp_path, bandwidth=2_000_000) as slow:
        workers = [copying_process(f"{slow.url}/m.parquet", tmp_path / "copies") for _ in range(3)]
        assert [worker.wait(timeout=120) for worker in workers] == [0, 0, 0]
        sent = served_bytes(slow.state.asked, "m.parquet", size)
    assert size < sent < 1.5 * size  # the file once, and a footer for each
    [copy] = (tmp_path / "copies").glob("*.parquet")
    assert pq.read_table(copy).column("caption").to_pylist() == captions


def test_a_coarse_copy_killed_halfway_leaves_no_temporary_once_the_file_is_copied_again(tmp_path, monkeypatch):
    """kill -9 while a remote file in one large row group is copied, then the next process to
    need it: it copies the file whole, reads its rows from that copy, and removes the killed
    copy's temporary (before, it stayed for an hour, as large as what was written of it)."""
    import signal

    rows = COARSE_ROWS
    captions = coarse_file(tmp_path)
    copies = tmp_path / "copies"
    with FileServer(tmp_path, bandwidth=500_000) as slow:  # a few seconds per copy
        copying = copying_process(f"{slow.url}/m.parquet", copies)
        try:
            for _ in range(600):
                if any(storage.is_temporary(entry.name) for entry in copies.glob(".*")) or copying.poll() is not None:
                    break
                time.sleep(0.05)
            assert copying.poll() is None, "the copy ended before it could be killed"
        finally:
            copying.send_signal(signal.SIGKILL)
            copying.wait()
        killed = [entry.name for entry in copies.iterdir() if storage.is_temporary(entry.name)]
        assert killed and not list(copies.glob("*.parquet"))

        monkeypatch.setattr(metadata_rows, "RECHUNK_ABOVE", 2000)
        monkeypatch.setattr(metadata_rows, "ROW_GROUP_ROWS", 1000)
        slow.state.bandwidth = None
        again = metadata_rows.MetadataRows([(f"{slow.url}/m.parquet", rows)], copies=copies)
        assert again.take(0, np.array([0, 54321, rows - 1])) == [{"caption": captions[i]} for i in (0, 54321, rows - 1)]
    copy = again.read_from(0)
    assert pq.read_table(copy).column("caption").to_pylist() == captions
    assert sorted(entry.name for entry in copies.iterdir()) == sorted([copy.name, f".{copy.name}.lock"])


@pytest.mark.parametrize("damage", ["truncated", "a footer longer than the file"])
def test_a_damaged_metadata_file_is_named_local_or_remote(tmp_path, cache, monkeypatch, damage):
    import struct

    small_row_groups(monkeypatch, 1000)
    captioned_collection(tmp_path / "emb", 3000)
    Index.build(tmp_path / "emb", tmp_path / "index")
    metadata = tmp_path / "index" / "metadata" / "metadata_0.parquet"
    data = metadata.read_bytes()
    metadata.write_bytes(data[:len(data) // 2] if damage == "truncated" else
                         data[:-8] + struct.pack("<i", 2**31 - 1) + b"PAR1")  # no 2 GiB is read for it
    with FileServer(tmp_path / "index") as http:
        for location in (tmp_path / "index", f"{http.url}/"):
            with pytest.raises(InputError, match=r"metadata/metadata_0\.parquet: not a readable parquet file \(.*\); "
                                                 "the index folder is damaged: copy its metadata folder again, or "
                                                 "rebuild it"):
                Index.load(location).metadata(5)


def test_a_remote_metadata_file_replaced_by_a_shorter_one_while_loaded_is_named_changed(tmp_path, cache, monkeypatch):
    captions = indexed_captions(tmp_path, monkeypatch)
    with FileServer(tmp_path / "index") as http:
        index = Index.load(f"{http.url}/")
        assert index.metadata(10)["caption"] == captions[10]
        metadata = tmp_path / "index" / "metadata" / "metadata_0.parquet"
        pq.write_table(pq.read_table(metadata).slice(0, 100), metadata)  # its row group 4 is past the new end
        with pytest.raises(InputError, match=r"metadata_0\.parquet: changed since the index was loaded .*load the "
                                             "index again"):
            index.metadata(4500)


def test_a_remote_index_published_without_its_held_out_ids_loads_from_a_server_that_refuses_absent_keys(
        tmp_path, cache, monkeypatch):
    """S3, and a CDN or static site in front of a bucket, answers 403 (not 404) for a key that
    is not there to whoever may not list the bucket: the held-out ids, which a search does
    not need, are then taken as absent, not as a refused request."""
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    captions = captioned_collection(tmp_path / "emb", 60)
    local = Index.build(tmp_path / "emb", tmp_path / "index")
    (tmp_path / "index" / "heldout_ids.npy").unlink()
    with FileServer(tmp_path / "index") as http:
        http.fault("heldout_ids.npy", status=403, statuses=1000)
        remote = Index.load(f"{http.url}/")
        queries = unit_rows(4, 16, seed=3)
        np.testing.assert_array_equal(remote.search(queries, 5)[1], local.search(queries, 5)[1])
        assert remote.metadata(7)["caption"] == captions[7]
        http.fault("index.json", status=403, statuses=1000)  # a file it needs: refused is an error
        with pytest.raises(storage.FetchError, match=r"index.json: refused \(HTTP 403 Forbidden\)"):
            Index.load(f"{http.url}/")


def test_a_remote_index_rebuilt_with_the_same_row_counts_since_it_was_loaded_is_refused(s3, tmp_path, cache):
    captioned_collection(tmp_path / "emb", 100)
    s3.bucket("remote-meta-rebuilt")
    url = s3.upload_folder(Index.build(tmp_path / "emb", tmp_path / "index").path, "remote-meta-rebuilt", "index")
    loaded = Index.load(url)
    captioned_collection(tmp_path / "emb", 100, seed=1, prefix="rebuilt")
    Index.build(tmp_path / "emb", url, overwrite=True)
    with pytest.raises(InputError, match=r"metadata_0\.parquet: written by another build of the index .* the index was "
                                         r"rebuilt since it was loaded: load it again \(restart `unicom serve`\)"):
        loaded.metadata(3)
    assert Index.load(url).metadata(3)["caption"].startswith("rebuilt")
