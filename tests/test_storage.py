"""The I/O module: URLs read and written like local paths, against real servers on 127.0.0.1."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from storage_servers import FileServer

from unicom import files, storage
from unicom.data.shards import expand_shards
from unicom.errors import InputError


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "4")


def _payload(size: int) -> bytes:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_local_paths_are_plain_paths_and_urls_keep_their_scheme(tmp_path):
    assert storage.path(str(tmp_path)) == tmp_path and not storage.is_url(tmp_path)
    assert storage.path(f"file://{tmp_path}") == tmp_path
    assert storage.text(storage.join("s3://bucket/emb", "img_emb", "img_emb_3.npy")) == "s3://bucket/emb/img_emb/img_emb_3.npy"
    assert storage.is_url("pipe:cat x.tar") and storage.is_url("hf://datasets/a/b") and not storage.is_url("C://x")
    assert storage.name("https://host/a/00012.tar") == "00012.tar"


def test_a_stream_cut_mid_transfer_resumes_at_the_byte_it_stopped_at(tmp_path, fast_retries):
    data = _payload(700_000)
    (tmp_path / "a.tar").write_bytes(data)
    with FileServer(tmp_path) as server:
        fault = server.fault("a.tar", cut_after=150_000, cuts=2)
        with storage.open_stream(f"{server.url}/a.tar") as stream:
            assert stream.read() == data
        assert fault.cuts == 0 and fault.requests >= 3  # two cut responses, then the rest


def test_a_file_missing_at_first_is_read_after_retries(tmp_path, fast_retries):
    (tmp_path / "late.bin").write_bytes(b"here now")
    with FileServer(tmp_path) as server:
        server.fault("late.bin", missing=2)
        assert storage.read_bytes(f"{server.url}/late.bin") == b"here now"


def test_a_file_that_stays_missing_is_a_fetch_error_naming_the_url_and_the_attempts(tmp_path, fast_retries):
    with FileServer(tmp_path) as server:
        url = f"{server.url}/gone.tar"
        with pytest.raises(storage.FetchError) as error:
            with storage.open_stream(url) as stream:
                stream.read()
        assert error.value.location == url and error.value.attempts == 4
        assert url in str(error.value) and "after 4 attempts" in str(error.value)
        assert server.state.requests.count("HEAD gone.tar") + server.state.requests.count("GET gone.tar") >= 4


@pytest.mark.parametrize("status", [401, 403, 410])
def test_a_refused_request_is_one_error_at_once_not_retried(tmp_path, fast_retries, status):
    # an expired signed URL (403) will not pass when asked again: one request, one error line
    (tmp_path / "shard.tar").write_bytes(b"x" * 100)
    with FileServer(tmp_path) as server:
        url = f"{server.url}/shard.tar"
        fault = server.fault("shard.tar", status=status, statuses=100)
        with pytest.raises(storage.FetchError) as error:
            storage.read_bytes(url)
        assert fault.requests == 1 and error.value.reason.startswith(f"refused (HTTP {status} ")
        assert error.value.missing == (status == 410)  # Gone: the server has it no more, for good
        assert str(error.value).startswith(f"{url}: ") and "attempts" not in str(error.value)
        fault.requests = 0
        with pytest.raises(storage.FetchError) as error:
            with storage.open_stream(url) as stream:
                stream.read()
        # one attempt (fsspec's HTTP open asks for the size with a HEAD, then a GET)
        assert fault.requests <= 2 and error.value.reason.startswith(f"refused (HTTP {status} ")
        assert error.value.missing == (status == 410)  # streamed as read whole (serve's shard images: 404)


@pytest.mark.parametrize("status", [429, 503])
def test_too_many_requests_and_server_errors_are_retried(tmp_path, fast_retries, status):
    (tmp_path / "shard.tar").write_bytes(b"x" * 100)
    with FileServer(tmp_path) as server:
        fault = server.fault("shard.tar", status=status, statuses=2)
        assert storage.read_bytes(f"{server.url}/shard.tar") == b"x" * 100
        assert fault.requests == 3


@pytest.mark.parametrize("status, phrase", [(429, "Too Many Requests"), (503, "Service Unavailable")])
def test_a_stream_that_stays_busy_names_the_status_and_is_not_taken_for_a_missing_file(tmp_path, fast_retries,
                                                                                       status, phrase):
    """fsspec's HTTP files raise any failed request as a FileNotFoundError from it: a server
    that stays busy is reported with its answer (not 'FileNotFoundError'), and a reader for
    which a missing file is final (a picture the service shows) still retries it."""
    (tmp_path / "shard.tar").write_bytes(b"x" * 100)
    with FileServer(tmp_path) as server:
        url = f"{server.url}/shard.tar"
        server.fault("shard.tar", status=status, statuses=1000)
        with pytest.raises(storage.FetchError) as error:
            with storage.open_stream(url) as stream:
                stream.read()
        assert f"{status}" in error.value.reason and phrase in error.value.reason
        assert not error.value.missing and error.value.attempts == 4
        fault = server.fault("shard.tar", status=status, statuses=2)
        with storage.open_stream(url, missing_is_final=True) as stream:
            assert stream.read() == b"x" * 100
        assert fault.requests >= 3


def test_an_s3_store_that_refuses_the_credentials_is_one_error_naming_the_url(s3, monkeypatch):
    """s3fs raises a 403 as a bare PermissionError('Forbidden') from botocore's error (its
    status in a response dict): the CLI showed a traceback without the URL."""
    import moto.settings

    s3.bucket("refusing")
    s3.put("refusing", "shard.tar", b"x" * 100)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the credentials are checked: unknown
    with pytest.raises(storage.FetchError) as error:
        storage.read_bytes("s3://refusing/shard.tar")
    assert str(error.value) == "s3://refusing/shard.tar: refused (HTTP 403 Forbidden)" and not error.value.missing


def test_an_s3_bucket_name_that_is_not_valid_is_one_error_at_once_naming_the_url(s3):
    """botocore refuses to send a request for a bucket name S3 does not allow (its
    ParamValidationError): asking again gives the same answer, so it is not retried, and the
    report names the URL and the name, not a bare 'ParamValidationError' after 5 attempts."""
    url = "s3://Bad_Bucket!/x"
    reason = "the bucket name 'Bad_Bucket!' is not valid (S3 bucket names are lowercase letters, digits, dots and hyphens)"
    for question in (storage.read_bytes, storage.is_file, storage.is_dir, storage.list_files):
        with pytest.raises(storage.FetchError) as error:
            question(url)
        assert str(error.value) == f"{url}: {reason}" and error.value.attempts == 1 and not error.value.missing
    with pytest.raises(storage.FetchError) as error:
        with storage.open_stream(url) as stream:
            stream.read()
    assert str(error.value) == f"{url}: {reason}" and error.value.attempts == 1


def test_a_fetch_error_that_says_what_to_do_gets_no_generic_advice_on_the_command_line(s3, tmp_path, capsys, monkeypatch):
    import moto.settings

    from unicom.cli import main

    reason = "the bucket name 'Bad_Bucket!' is not valid (S3 bucket names are lowercase letters, digits, dots and hyphens)"
    assert main(["cluster", "--embeddings", "s3://Bad_Bucket!/emb", "--k", "2", "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err == f"unicom cluster: error: s3://Bad_Bucket!/emb: {reason}\n"
    s3.bucket("policy")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the credentials are checked: unknown
    assert main(["cluster", "--embeddings", "s3://policy/emb", "--k", "2", "--out", str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err
    assert "S3 refused the request: check the credentials (AWS_* variables, --storage-options)" in error
    assert "check the URL, the credentials (--storage-options) and the connection" not in error


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_existence_check_is_an_error_naming_the_status_not_a_missing_file(tmp_path, fast_retries, status):
    """fsspec's HTTP filesystem answers "no" to exists/is_file for any failed request: an
    expired signed URL was reported as a list or folder that is not there."""
    (tmp_path / "list.csv").write_text("path\na.jpg\n")
    with FileServer(tmp_path) as server:
        url = f"{server.url}/list.csv"
        server.fault("list.csv", status=status, statuses=100)
        for question in (storage.exists, storage.is_file):
            with pytest.raises(storage.FetchError) as error:
                question(url)
            assert str(error.value).startswith(f"{url}: refused (HTTP {status} ")
            assert "fresh signed URL" in str(error.value) and not error.value.missing
        assert not storage.is_file(f"{server.url}/absent.csv") and not storage.exists(f"{server.url}/absent.csv")


def test_an_existence_check_that_meets_only_server_errors_is_retried_then_an_error(tmp_path, fast_retries):
    (tmp_path / "list.csv").write_text("path\na.jpg\n")
    with FileServer(tmp_path) as server:
        url = f"{server.url}/list.csv"
        server.fault("list.csv", status=503, statuses=2)
        assert storage.is_file(url)  # busy twice, then there
        server.fault("list.csv", status=500, statuses=1000)
        with pytest.raises(storage.FetchError) as error:
            storage.is_file(url)
        assert "500" in error.value.reason and error.value.attempts == 4 and not error.value.missing


def test_an_existence_check_takes_the_stores_description_not_a_second_failing_request(fast_retries):
    """fsspec's HTTP filesystem reads a failed GET as "no": the file is there when the
    store describes it (HEAD), whatever the GET that follows would meet."""
    from storage_servers import QuietHandler, serve

    asked = []

    class BusyForDownloads(QuietHandler):  # HEADs answered (from a cache), the first GETs not
        def do_HEAD(self):
            asked.append("HEAD")
            self.send_response(200)
            self.send_header("Content-Length", "12")
            self.end_headers()

        def do_GET(self):
            asked.append("GET")
            self.send_response(503 if asked.count("GET") <= 2 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = serve(BusyForDownloads)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/list.csv"
        assert storage.is_file(url)
        assert asked == ["GET", "HEAD"]  # one question, then the description
    finally:
        server.shutdown()
        server.server_close()


def test_a_folder_over_http_that_the_server_will_not_list_says_to_use_the_stores_url(tmp_path, fast_retries):
    """S3 websites, CloudFront and most static sites answer 403 for a folder's page: the
    error says a folder is read from that page, not that a signed URL may have expired."""
    from storage_servers import QuietHandler, serve

    from unicom.formats.embeddings import EmbeddingFolders

    class NoListings(QuietHandler):
        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    server = serve(NoListings)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/emb"
        with pytest.raises(storage.FetchError) as error:
            storage.is_dir(url)
        assert str(error.value) == (
            f"{url}: refused (HTTP 403 Forbidden); a folder is read over HTTP from its page of links, which S3, "
            "CloudFront and most static sites refuse to give: use the store's own URL (s3://, gs://), a server that "
            "lists folders, or the credentials it needs (--storage-options)")
        with pytest.raises(storage.FetchError, match="a folder is read over HTTP from its page of links"):
            EmbeddingFolders.from_root(url)
    finally:
        server.shutdown()
        server.server_close()


def test_an_input_list_behind_an_expired_signed_url_is_reported_as_refused(tmp_path, capsys, fast_retries):
    from unicom.cli import main

    (tmp_path / "list.csv").write_text("path,label\na.jpg,0\n")
    with FileServer(tmp_path) as server:
        url = f"{server.url}/list.csv"
        server.fault("list.csv", status=403, statuses=100)
        code = main(["embed", "--input", url, "--out", str(tmp_path / "out"), "--model", "timm/test_vit"])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith(f"unicom embed: error: {url}: refused (HTTP 403 Forbidden); ")
    assert "not found" not in error


def test_an_s3_key_the_credentials_may_not_see_is_refused_not_missing(s3, monkeypatch):
    """S3 answers 403, not 404, for a missing key to credentials that may not list the
    bucket: the check says so instead of "not found"."""
    import moto.settings

    s3.bucket("policy")
    s3.put("policy", "emb/img_emb/img_emb_0.npy", b"x")
    assert not storage.is_file("s3://policy/emb/absent.csv") and not storage.exists("s3://policy/emb/absent.csv")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the credentials are checked: unknown
    for location, question in [("s3://policy/emb/absent.csv", storage.is_file), ("s3://policy/emb", storage.is_file),
                               ("s3://policy/emb", storage.exists), ("s3://policy", storage.exists)]:
        with pytest.raises(storage.FetchError) as error:
            question(location)
        assert str(error.value).startswith(f"{location}: refused (HTTP 403 Forbidden); S3 refused the request")
        assert "S3 answers 403 for a missing key" in str(error.value)


def test_a_url_that_stays_unreachable_is_one_error_line_not_a_traceback(tmp_path, capsys, fast_retries):
    from support import free_port

    from unicom.cli import main

    url = f"http://127.0.0.1:{free_port()}/emb"  # nothing listens there
    code = main(["cluster", "--embeddings", url, "--k", "2", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith(f"unicom cluster: error: {url}: ")
    assert "(after 4 attempts); check the URL, the credentials (--storage-options) and the connection" in error
    assert not (tmp_path / "out").exists()


def test_pipe_streams_the_command_output_and_a_failing_command_is_a_fetch_error(tmp_path, fast_retries):
    data = _payload(300_000)
    (tmp_path / "x.tar").write_bytes(data)
    with storage.open_stream(f"pipe:cat {tmp_path / 'x.tar'}") as stream:
        assert stream.read() == data
    with pytest.raises(storage.FetchError, match="exited with status 3"):
        with storage.open_stream("pipe:echo partial; exit 3") as stream:
            stream.read()


@pytest.mark.parametrize("make, status, said", [
    (lambda folder: "no_such_program_for_unicom", 127, "was not found"),
    (lambda folder: _not_executable(folder), 126, "cannot be executed"),
], ids=["not found", "not executable"])
def test_a_pipe_command_that_cannot_run_is_final_at_once_naming_it_and_what_the_shell_said(
        tmp_path, fast_retries, make, status, said):
    program = make(tmp_path)
    location = f"pipe:{program} s3://bucket/00001.tar"
    for read in (lambda: storage.open_stream(location).read(), lambda: storage.read_bytes(location)):
        with pytest.raises(storage.FetchError) as error:
            read()
        assert error.value.attempts == 1 and not error.value.missing
        assert str(error.value).startswith(f"{location}: the command {program!r} {said} (exit status {status}: ")
        assert f"{program}: " in error.value.reason  # the shell's own words
        assert error.value.reason.endswith("fix the command after pipe: (its path, its execute permission, the PATH)")


def _not_executable(folder) -> str:
    script = folder / "fetch.sh"
    script.write_text("#!/bin/sh\ncat \"$1\"\n")
    script.chmod(0o644)
    return str(script)


def test_a_pipe_command_that_fails_for_another_reason_is_tried_again(tmp_path, fast_retries):
    """A network copy (curl, aws s3 cp … -) that fails once may pass the next time."""
    (tmp_path / "x.tar").write_bytes(b"shard bytes")
    marker = tmp_path / "failed-once"
    command = f"pipe:if [ -e {marker} ]; then cat {tmp_path / 'x.tar'}; else touch {marker}; exit 1; fi"
    with storage.open_stream(command) as stream:
        assert stream.read() == b"shard bytes"


def test_remote_array_reads_rows_as_a_memory_map_would(s3, tmp_path):
    bucket = s3.bucket("arrays")
    array = np.random.default_rng(0).standard_normal((257, 7)).astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, array)
    s3.put("arrays", "a.npy", buffer.getvalue())
    remote = storage.load_npy(f"{bucket}/a.npy")
    assert remote.shape == (257, 7) and remote.dtype == np.float16 and len(remote) == 257
    np.testing.assert_array_equal(remote[10:20], array[10:20])
    np.testing.assert_array_equal(remote[[250, 3, 4, 5, 100]], array[[250, 3, 4, 5, 100]])
    np.testing.assert_array_equal(remote[-1], array[-1])
    np.testing.assert_array_equal(np.asarray(remote, dtype=np.float32), array.astype(np.float32))
    np.testing.assert_array_equal(storage.load_npy(f"{bucket}/a.npy", mmap=False), array)


def test_remote_array_reads_rows_from_a_server_that_ignores_ranges(tmp_path, caplog):
    """python -m http.server answers a ranged request with the whole file (200)."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    from storage_servers import QuietHandler, serve

    array = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    handler = type("Plain", (SimpleHTTPRequestHandler,), {"log_message": QuietHandler.log_message,
                                                           "protocol_version": "HTTP/1.0"})
    server = serve(functools.partial(handler, directory=str(tmp_path)))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.npy"
        remote = storage.load_npy(url)
        assert remote.shape == (300, 5)
        np.testing.assert_array_equal(remote[100:140], array[100:140])
        np.testing.assert_array_equal(remote[[299, 0, 7]], array[[299, 0, 7]])
        assert storage.read_range(url, 3, 9) == (tmp_path / "a.npy").read_bytes()[3:9]
        assert "ignores Range requests" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_atomic_writes_give_files_the_mode_a_plain_write_gives(tmp_path):
    """0o666 less the umask, as open() gives: not mkstemp's 0o600, which would hide the
    outputs from the other users of a shared folder."""
    previous = os.umask(0o027)
    try:
        files.save_npy_atomic(tmp_path / "a.npy", np.arange(3))
        files.write_json_atomic(tmp_path / "b.json", {})
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.npy": 0o640, "b.json": 0o640, "plain": 0o640}


def test_an_atomic_write_to_s3_appears_whole_and_leaves_no_temporary(s3):
    bucket = s3.bucket("atomic")
    files.write_json_atomic(f"{bucket}/run/record.json", {"k": 3})
    files.save_npy_atomic(f"{bucket}/run/x.npy", np.arange(5))
    assert s3.keys("atomic") == ["run/record.json", "run/x.npy"]
    assert json.loads(s3.get("atomic", "run/record.json")) == {"k": 3}
    assert storage.is_file(f"{bucket}/run/x.npy") and storage.is_dir(f"{bucket}/run") and not storage.is_file(f"{bucket}/run/y")


def test_the_local_copy_of_a_killed_write_to_s3_is_removed_by_the_next_write(s3, tmp_path, monkeypatch):
    """A write to a URL is staged on the local disk first; a writer killed there (kill -9) left
    that copy, as large as the part, in the temporary directory for good. The next write to a
    URL removes it (its process is gone), and keeps those of live writers."""
    import tempfile

    bucket = s3.bucket("staged")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from unicom import files\n"
        f"with files.atomic_path({bucket + '/emb/img_emb_3.npy'!r}) as tmp:\n"
        "    tmp.write_bytes(b'half a part')\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        staged = Path(writer.stdout.readline().strip())
        assert tmp_path in staged.parents and staged.read_bytes() == b"half a part"
        files.write_json_atomic(f"{bucket}/emb/other.json", {})  # the writer still runs: its copy is kept
        assert staged.exists()
    finally:
        writer.kill()
        writer.wait()
    files.write_json_atomic(f"{bucket}/emb/other.json", {})
    assert list(tmp_path.rglob("*img_emb_3*")) == []
    assert s3.keys("staged") == ["emb/other.json"]


@pytest.mark.parametrize("made_by", ["another user", "anyone's writes", "a file"])
def test_a_staging_folder_that_is_not_the_users_own_is_not_used_and_the_write_still_goes_through(s3, tmp_path,
                                                                                                   monkeypatch, made_by):
    """The staging folder's name is known in advance: one made by another user (or open to
    everyone's writes) would let them swap a staged part before its upload, and a file under
    that name left no folder to make. The copy is then staged in the temporary directory
    itself, as private as mkstemp makes it, and the write succeeds leaving nothing."""
    import socket
    import tempfile

    bucket = s3.bucket("guarded")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"unicom-uploads-{os.getuid()}-{socket.gethostname()}"
    if made_by == "a file":
        folder.write_bytes(b"")
    else:
        folder.mkdir()
        if made_by == "another user":
            if os.getuid() != 0:
                pytest.skip("making a folder of another user takes root")
            os.chown(folder, os.getuid() + 4321, -1)
        else:
            folder.chmod(0o777)
    staged = []
    with files.atomic_path(f"{bucket}/emb/img_emb_0.npy") as tmp:
        staged.append(tmp)
        tmp.write_bytes(b"part")
    assert staged[0].parent == tmp_path and not staged[0].exists()
    assert s3.keys("guarded") == ["emb/img_emb_0.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_process_alive_never_signals_on_windows(monkeypatch):
    """os.kill(pid, 0) ends process pid on Windows (signal 0 is CTRL_C_EVENT there): a live
    writer's staged copy must not be checked that way; it is kept as a running one's."""
    sent = []
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert files.process_alive(os.getpid()) and sent == []


def test_sweeping_removes_only_the_writers_own_temporaries_locally_and_on_s3(s3, tmp_path):
    names = [".img_emb_0.npy.abcd1234.tmp.npy", ".img_emb_9.npy.x1y2z3w4.tmp.npy", ".notes.txt.abcd1234.tmp.txt",
             "img_emb_0.npy", ".img_emb_0.npy.keep"]
    s3.bucket("sweep")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        s3.put("sweep", f"emb/{name}", b"x")
    for folder in (tmp_path, "s3://sweep/emb"):
        assert files.sweep_temporaries(folder, ["img_emb_0.npy"]) == [".img_emb_0.npy.abcd1234.tmp.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert s3.keys("sweep") == sorted(f"emb/{name}" for name in names[1:])


def test_a_killed_write_leaves_nothing_a_reader_of_npy_or_parquet_parts_would_list(tmp_path):
    # embedding-reader and autofaiss list img_emb/*.npy and metadata/*.parquet
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from unicom import files\n"
        f"with files.atomic_path({str(tmp_path / 'img_emb_3.npy')!r}) as tmp:\n"
        "    tmp.write_bytes(b'half a part')\n"
        "    print(tmp.name, flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        temporary = writer.stdout.readline().strip()
    finally:
        writer.kill()
        writer.wait()
    assert [p.name for p in tmp_path.iterdir()] == [temporary]
    assert list(tmp_path.glob("*.npy")) == [] and temporary.endswith(".tmp")
    assert files.sweep_temporaries(tmp_path, ["img_emb_3.npy"]) == [temporary]
    assert list(tmp_path.iterdir()) == []


def test_http_brace_patterns_expand_without_a_request_in_numeric_order(tmp_path):
    with FileServer(tmp_path) as server:
        shards = expand_shards([f"{server.url}/{{9..11}}.tar", f"{server.url}/{{00001..00002}}.tar"])
        assert shards == [f"{server.url}/{name}.tar" for name in ("00001", "00002", "9", "10", "11")]
        assert server.state.requests == []


def test_an_http_folder_of_images_is_told_to_come_as_a_list(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    with FileServer(tmp_path) as server:
        with pytest.raises(InputError, match=r"photos: no .tar/.tar.gz/.tgz/.parquet shards in this folder .*; over http\(s\) a "
                                             r"folder is read as a folder of shards only: give the images as a CSV list"):
            expand_shards(f"{server.url}/photos")


def test_s3_shards_expand_from_patterns_globs_and_folders_and_a_missing_one_is_named(s3):
    s3.bucket("shards")
    for number in (0, 1, 2, 10):
        s3.put("shards", f"laion/{number:05d}.tar", b"")
    s3.put("shards", "laion/notes.txt", b"")
    expected = [f"s3://shards/laion/{n:05d}.tar" for n in (0, 1, 2, 10)]
    assert expand_shards("s3://shards/laion/*.tar") == expected
    assert expand_shards("s3://shards/laion") == expected
    assert expand_shards("s3://shards/laion/{00000..00002}.tar") == expected[:3]
    with pytest.raises(InputError, match=r"s3://shards/laion/00003.tar: shard not found"):
        expand_shards("s3://shards/laion/{00000..00003}.tar")


def test_shards_in_a_bucket_that_does_not_exist_name_the_bucket_not_an_empty_folder(s3):
    s3.bucket("tarballs")  # the bucket that exists, misspelt below
    with pytest.raises(InputError, match=r"shard not found .*; the bucket s3://tarball does not exist .*check its name"):
        expand_shards("s3://tarball/laion/{00000..00001}.tar")
    with pytest.raises(InputError, match=r"s3://tarball/laion: no .* shards in this folder .*; the bucket s3://tarball does not exist"):
        expand_shards("s3://tarball/laion")
    with pytest.raises(InputError, match=r"00000.tar: shard not found .*; the folder s3://tarballs/laion/ holds no files") as error:
        expand_shards("s3://tarballs/laion/00000.tar")
    assert "bucket" not in str(error.value)
    with pytest.raises(InputError) as error:
        expand_shards("s3://tarballs/laion")
    assert "bucket" not in str(error.value)


def test_a_bucket_the_credentials_may_list_but_not_ask_about_leaves_the_missing_folder_message(s3, monkeypatch):
    """Credentials with a policy on the bucket's objects (or a prefix of them) may list a folder
    and not ask about the bucket itself: its refusal must not replace "no shards here"."""
    import boto3
    import moto.settings

    s3.bucket("listed")
    s3.put("listed", "laion/00000.tar", b"x")
    iam = boto3.client("iam", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                       region_name="us-east-1")
    iam.create_user(UserName="lister")
    # AWS authorises ListObjectsV2 as s3:ListBucket and HeadObject as s3:GetObject; moto 5.2.6 and
    # later ask for the operations' own names. HeadBucket is allowed under neither.
    actions = ["s3:ListBucket", "s3:GetObject", "s3:ListObjectsV2", "s3:HeadObject"]
    iam.put_user_policy(UserName="lister", PolicyName="list-and-read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions,
                                                "Resource": ["arn:aws:s3:::listed", "arn:aws:s3:::listed/*"]}]}))
    key = iam.create_access_key(UserName="lister")["AccessKey"]
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"s3": {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}}))
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the policy is enforced
    assert expand_shards("s3://listed/laion/00000.tar") == ["s3://listed/laion/00000.tar"]
    with pytest.raises(storage.FetchError, match="s3://listed: refused"):
        storage.exists("s3://listed")  # the bucket itself may not be asked about
    assert storage.missing_bucket("s3://listed/other") is None  # the store did not say the bucket is missing
    with pytest.raises(InputError, match=r"^s3://listed/other: no .* shards in this folder \(or it does not exist\)$"):
        expand_shards("s3://listed/other")
    with pytest.raises(InputError, match=r"^s3://listed/other/0.tar: shard not found .*; the folder s3://listed/other/ "
                                         "holds no files; check the URL or the pattern$"):
        expand_shards("s3://listed/other/{0..1}.tar")


def test_storage_options_reach_the_filesystem(s3, monkeypatch):
    s3.bucket("options")
    s3.put("options", "a.txt", b"configured")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure(json.dumps({"s3": {"endpoint_url": s3.endpoint}, "gs": {"token": "anon"}}))
    assert storage.options_for("s3") == {"use_listings_cache": False, "endpoint_url": s3.endpoint}
    assert storage.read_text("s3://options/a.txt") == "configured"
    with pytest.raises(InputError, match="not valid JSON"):
        storage.configure("{endpoint")


@pytest.mark.parametrize("scheme, package, extra", [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs"),
                                                     ("az", "adlfs", "azure"), ("abfs", "adlfs", "azure")])
def test_a_missing_backend_names_the_extra_to_install(tmp_path, scheme, package, extra):
    script = ("import sys; sys.modules['s3fs'] = None; sys.modules['gcsfs'] = None; sys.modules['adlfs'] = None\n"
              "from unicom.cli import main\n"
              f"sys.exit(main(['cluster', '--embeddings', '{scheme}://bucket/emb', '--k', '2', '--out', str(sys.argv[1])]))")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                            env=dict(os.environ), timeout=120)
    assert result.returncode == 2
    assert (f"{scheme}://bucket/emb: {scheme}:// URLs need the {package} package: pip install 'unicom[{extra}]'"
            in result.stderr)


def test_http_urls_are_read_only(tmp_path):
    with pytest.raises(InputError, match="read only"):
        files.write_text_atomic("https://example.invalid/out/x.txt", "x")


def test_read_bytes_with_a_limit_reads_no_more_than_one_byte_past_it(tmp_path, fast_retries):
    data = _payload(70_000)
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "small.bin").write_bytes(data[:500])
    sources = {"local": str(tmp_path / "{}"), "pipe": f"pipe:cat {tmp_path}/{{}}"}
    with FileServer(tmp_path) as server:
        sources["http"] = f"{server.url}/{{}}"
        for kind, source in sources.items():
            assert storage.read_bytes(source.format("small.bin"), max_bytes=500) == data[:500], kind
            with pytest.raises(storage.TooLarge) as error:
                storage.read_bytes(source.format("big.bin"), max_bytes=1000)
            expected = "70,000 bytes" if kind == "local" else "more than 1,000 bytes"
            assert str(error.value) == f"{source.format('big.bin')}: {expected}, over the limit of 1,000", kind


def test_a_ranged_file_reads_as_a_local_binary_file_does(tmp_path):
    """storage.RangedFile against io.FileIO on the same bytes: read(-1) and readall() in one
    request, readinto a memoryview of any item size, a seek past the end, a negative seek and
    a read after close refused."""
    data = bytes(range(256)) * 400
    (tmp_path / "f.bin").write_bytes(data)
    with FileServer(tmp_path) as server, open(tmp_path / "f.bin", "rb", buffering=0) as local:
        remote = storage.RangedFile(f"{server.url}/f.bin", len(data))
        for f in (remote, local):
            asked = len(server.state.asked)
            assert f.readall() == data and f.tell() == len(data)
            f.seek(100)
            assert f.read() == data[100:]
            assert len(server.state.asked) - asked == (2 if f is remote else 0)
            f.seek(3)
            into = memoryview(bytearray(16)).cast("I")  # 4 items of 4 bytes
            assert f.readinto(into) == 16 and into.tobytes() == data[3:19]
            assert f.seek(len(data) + 10) == len(data) + 10 and f.read(5) == b"" and f.tell() == len(data) + 10
            assert f.seek(-4, io.SEEK_END) == len(data) - 4 and f.read() == data[-4:]
            with pytest.raises(OSError) as refused:
                f.seek(-1)
            assert refused.value.errno == errno.EINVAL
            f.close()
            with pytest.raises(ValueError):
                f.read(1)


def test_a_404_that_is_no_file_not_found_error_is_final_when_asked(monkeypatch):
    """huggingface_hub answers a ranged read of an hf:// file gone from its repository with its
    own HTTP error (status 404), not a FileNotFoundError: missing_is_final stops at it too."""
    httpx = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP client")
    errors = pytest.importorskip("huggingface_hub.errors")
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    url = "hf://datasets/someone/photos/0.jpg"
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/datasets/someone/photos"))
    calls = []

    def gone():
        calls.append(1)
        raise errors.RemoteEntryNotFoundError("404 Client Error. Entry Not Found", response=response)

    with pytest.raises(storage.FetchError) as final:
        storage.retrying(url, gone, missing_is_final=True)
    assert final.value.missing and "not found (HTTP 404)" in str(final.value) and len(calls) == 1
    with pytest.raises(storage.FetchError) as retried:
        storage.retrying(url, gone)
    assert retried.value.missing and len(calls) == 1 + storage.retries().attempts


def test_a_cache_folder_that_cannot_be_written_is_named_with_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text("{}")
    (tmp_path / "not-a-folder").write_text("a file where the cache would be")
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "not-a-folder"))
    with FileServer(tmp_path / "index") as server:
        with pytest.raises(InputError, match=r"not-a-folder/remote/[0-9a-f]{16}: the cache folder cannot be written "
                                             r"\(NotADirectoryError.*\) to keep a copy of http://127\.0\.0\.1:\d+/; "
                                             "set UNICOM_CACHE to a folder that can be"):
            storage.cached_copy(f"{server.url}/", ["index.json"])


def test_a_server_that_stalls_fails_the_read_after_the_read_timeout_naming_the_file(tmp_path, monkeypatch):
    """A server that takes the request and then sends nothing: each attempt gives up after
    UNICOM_HTTP_READ_TIMEOUT seconds without a byte (aiohttp alone would wait 300 s), and the
    error names the file after the attempts."""
    monkeypatch.setenv("UNICOM_HTTP_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "2")
    (tmp_path / "stalled.tar").write_bytes(b"x" * 1000)
    with FileServer(tmp_path, latency=30) as server:  # every answer 30 s late
        url = f"{server.url}/stalled.tar"

        def streamed() -> bytes:
            with storage.open_stream(url) as stream:
                return stream.read()

        for read in (lambda: storage.read_bytes(url), streamed):
            with pytest.raises(storage.FetchError) as error:
                read()
            assert error.value.location == url and error.value.attempts == 2
            assert url in str(error.value) and "after 2 attempts" in str(error.value)


def test_the_http_read_timeout_must_be_seconds_above_zero(monkeypatch):
    monkeypatch.setenv("UNICOM_HTTP_READ_TIMEOUT", "soon")
    with pytest.raises(InputError, match=r"^UNICOM_HTTP_READ_TIMEOUT='soon': expected seconds above 0 \(default 60\)$"):
        storage.read_timeout()
    monkeypatch.setenv("UNICOM_HTTP_READ_TIMEOUT", "0")
    with pytest.raises(InputError, match="expected seconds above 0"):
        storage.read_timeout()
    monkeypatch.setenv("UNICOM_HTTP_READ_TIMEOUT", "2.5")
    assert storage.read_timeout() == 2.5


def test_a_file_that_keeps_streaming_is_read_whole_past_the_read_timeout(tmp_path, monkeypatch):
    """The read timeout is the longest wait for the next bytes, not for the whole file: a
    file sent slowly but steadily (a 64 KiB piece every 0.2 s, 1.2 s in all) is read whole
    with UNICOM_HTTP_READ_TIMEOUT=0.5, as a stream and at once, with no attempt given up."""
    monkeypatch.setenv("UNICOM_HTTP_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "1")
    data = np.random.default_rng(0).bytes(6 * (64 << 10))
    (tmp_path / "slow.tar").write_bytes(data)
    with FileServer(tmp_path, bandwidth=(64 << 10) / 0.2) as server:
        url = f"{server.url}/slow.tar"
        assert storage.read_bytes(url) == data
        with storage.open_stream(url) as stream:
            assert stream.read() == data


def test_a_timeout_in_the_storage_options_client_kwargs_is_aiohttps_and_the_other_client_kwargs_are_kept(tmp_path,
                                                                                                        monkeypatch):
    """--storage-options is JSON: a client_kwargs timeout is a number (aiohttp's total, in
    seconds) or an object of aiohttp's ClientTimeout fields; it replaces the read timeout,
    other client_kwargs stay, and a file is read with it (aiohttp refuses a bare number)."""
    import aiohttp

    (tmp_path / "a.bin").write_bytes(b"abc" * 100)
    with FileServer(tmp_path) as server:
        monkeypatch.setenv("UNICOM_STORAGE_OPTIONS", json.dumps({"client_kwargs": {"timeout": 30, "trust_env": True}}))
        assert storage.options_for("http")["client_kwargs"] == {"timeout": aiohttp.ClientTimeout(total=30),
                                                                "trust_env": True}
        assert storage.read_bytes(f"{server.url}/a.bin") == b"abc" * 100
        monkeypatch.setenv("UNICOM_STORAGE_OPTIONS",
                           json.dumps({"https": {"client_kwargs": {"timeout": {"sock_read": 120, "total": None}}}}))
        assert storage.options_for("https")["client_kwargs"] == {"timeout": aiohttp.ClientTimeout(sock_read=120)}
        monkeypatch.setenv("UNICOM_STORAGE_OPTIONS", json.dumps({"http": {"client_kwargs": {"timeout": {"sok_read": 5}}}}))
        with pytest.raises(InputError, match=r'^--storage-options: client_kwargs timeout \{"sok_read": 5\}: give seconds '
                                             r"for the whole answer \(a number above 0\) or an object of total, connect, "
                                             r"sock_read, sock_connect"):
            storage.read_bytes(f"{server.url}/a.bin")


def test_a_few_bytes_from_a_server_that_ignores_range_never_hold_the_whole_file():
    """A server that answers a ranged request with the whole file (200): the bytes asked for
    are read off the front of the answer and the connection closed (the last bytes: read
    through, keeping those only), so reading 1 KB of a 32 MiB file (a thumbnail's header, a
    file's length check, a parquet footer) holds about that much, not the file; the bytes
    are those of the range."""
    import tracemalloc

    from storage_servers import QuietHandler, serve

    size = 32 << 20
    piece = bytes(range(256)) * 256  # 64 KiB; byte i of the file is i % 256

    class WholeFile(QuietHandler):
        def do_GET(self):
            self.send_response(200)  # Range ignored
            self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                for _ in range(size // len(piece)):
                    self.wfile.write(piece)
            except (BrokenPipeError, ConnectionResetError):  # the client read what it wanted
                pass

    server = serve(WholeFile)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/big.bin"
        assert storage.read_range(url, 0, 16) == bytes(range(16))  # the client's modules are loaded
        tracemalloc.start()
        try:
            assert storage.read_range(url, 1000, 2000) == (bytes(range(256)) * 8)[1000 % 256:][:1000]
            with pytest.raises(storage.TooLarge, match="more than 1,000 bytes, over the limit of 1,000"):
                storage.read_bytes(url, max_bytes=1000)
            assert storage.read_tail(url, 1000) == (bytes(range(256)) * 8)[(size - 1000) % 256:][:1000]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20
    finally:
        server.shutdown()
        server.server_close()
