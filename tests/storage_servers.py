"""Real servers on 127.0.0.1 for the remote-storage tests: S3 (moto's server mode), GCS
(gcp-storage-emulator), a file server over HTTP that can be told to fail, and a TCP relay
that can stop a client mid-request.

* :class:`S3` starts ``moto``'s S3 server in this process; the AWS environment variables
  (``AWS_ENDPOINT_URL`` …) point every client, ours and the processes we start, at it.
* :class:`GCS` starts ``gcp-storage-emulator`` (the GCS JSON API, in memory) in this
  process; ``STORAGE_EMULATOR_HOST`` points gcsfs and Google's client at it.
* :class:`Azure` starts Azurite's blob service (Microsoft's Azure Storage emulator, installed
  from npm by ``scripts/install-azurite.sh``) as a process, its telemetry off;
  ``AZURE_STORAGE_CONNECTION_STRING`` points adlfs and Azure's client at it.
* :class:`FileServer` serves a folder with ``Range`` support and injected faults per file:
  ``404`` for the first N requests, a connection cut after N bytes, a latency per request
  and a bandwidth cap.
* :class:`ChunkedFileServer` serves a folder as a server that gives no file size does:
  every answer in chunks, without ``Content-Length``, ``Range`` ignored, an ETag per file.
* :class:`Relay` forwards TCP to another server and calls a hook when a response to a
  request matching a pattern comes back, before forwarding it (``kill -9`` a client there).
* :class:`QuietHandler` and :func:`serve`: the base of a test's own HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from support import free_port


def _wait_until_listening(port: int, process, name: str, seconds: float = 60) -> None:
    """Return once a server ``process`` accepts connections on 127.0.0.1:``port``; stop it and
    raise when it exits or ``seconds`` pass first."""
    deadline = time.time() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.terminate()
                process.wait()
                raise RuntimeError(f"{name} did not start on 127.0.0.1:{port}")
            time.sleep(0.2)


class _ObjectStore:
    """What the tests do with a bucket of any store: ``put`` an object, and this."""

    scheme: str

    def put(self, bucket: str, key: str, data: bytes) -> None:
        raise NotImplementedError

    def as_storage_options(self, monkeypatch) -> dict:
        """Point this process's settings elsewhere (``monkeypatch``) and return the storage
        options (``--storage-options``) that reach this server instead."""
        raise NotImplementedError

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Copy every file under ``folder`` to ``{scheme}://bucket/prefix/…``; returns that URL."""
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                self.put(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return f"{self.scheme}://{bucket}/{prefix}"


class S3(_ObjectStore):
    """moto's S3 server on 127.0.0.1: a thread of this process, or its own process
    (``process=True``, so that it does not share this process's interpreter lock)."""

    scheme = "s3"

    def __init__(self, process: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        if process:
            import subprocess

            self.server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_until_listening(self.port, self.server, "moto's S3 server")
        else:
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def stop(self) -> None:
        if hasattr(self.server, "terminate"):
            self.server.terminate()
            self.server.wait()
        else:
            self.server.stop()


class GCS(_ObjectStore):
    """gcp-storage-emulator's server on 127.0.0.1, a thread of this process, its objects in
    memory. ``env`` points gcsfs at it: the emulator's address, anonymous access, and none of
    gcsfs's look-ups of a bucket's layout (a gRPC API that the emulator does not have; they
    fall back to the JSON API after a time-out). The helpers below use Google's own client,
    not gcsfs, so that what a test reads back is independent of what wrote it."""

    scheme = "gs"

    def __init__(self):
        from gcp_storage_emulator.server import create_server

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = create_server("127.0.0.1", self.port, in_memory=True)
        self.server.start()
        _quiet_when_clients_hang_up(self.server._api._httpd)
        anonymous = {"token": "anon"}
        self.env = {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # read when gcsfs is imported
            "NO_GCE_CHECK": "true",
            "UNICOM_STORAGE_OPTIONS": json.dumps({"gs": anonymous, "gcs": anonymous}),
        }
        self._client = None

    def client(self):
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                          client_options={"api_endpoint": self.endpoint})
        return self._client

    def as_storage_options(self, monkeypatch) -> dict:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        return {"gs": {"endpoint_url": self.endpoint, "token": "anon"}}

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``gs://name``."""
        self.client().create_bucket(name)
        return f"gs://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(blob.name for blob in self.client().list_blobs(bucket, prefix=prefix or None))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().bucket(bucket).blob(key).download_as_bytes()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().bucket(bucket).blob(key).upload_from_string(data)

    def stop(self) -> None:
        self.server.stop()


AZURITE_VERSION = "3.35.0"
# Azurite's well-known development account (its documentation publishes the name and key)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_blob() -> Path | None:
    """Azurite's blob service command, installed by ``scripts/install-azurite.sh`` (run here
    when it is absent), or None when it could not be installed."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    command = root / ".cache" / "azurite" / AZURITE_VERSION / "node_modules" / ".bin" / "azurite-blob"
    if not command.exists():
        subprocess.run(["bash", str(root / "scripts" / "install-azurite.sh")], env={**os.environ,
                       "AZURITE_VERSION": AZURITE_VERSION}, stdout=subprocess.DEVNULL, check=False, timeout=600)
    return command if command.exists() else None


class Azure(_ObjectStore):
    """Azurite's blob service on 127.0.0.1, its own process, its blobs in memory. ``env`` points
    adlfs (and the processes we start) at it with the emulator's connection string; the helpers
    below use Azure's own client (azure-storage-blob), not adlfs, so that what a test reads back
    is independent of what wrote it."""

    scheme = "az"

    def __init__(self, command: Path):
        import subprocess

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.server = subprocess.Popen(
            [str(command), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
             "--disableTelemetry", "--silent", "--skipApiVersionCheck"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until_listening(self.port, self.server, "Azurite")
        self.connection_string = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                                  f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint};")
        self.env = {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}
        self._client = None

    def client(self):
        if self._client is None:
            from azure.storage.blob import BlobServiceClient

            self._client = BlobServiceClient.from_connection_string(self.connection_string)
        return self._client

    def connection_to(self, endpoint: str) -> dict:
        """The environment that sends adlfs to ``endpoint`` (a :class:`Relay` in front of this server)."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string.replace(
            f"BlobEndpoint={self.endpoint};", f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")}

    def as_storage_options(self, monkeypatch) -> dict:
        monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
        return {"az": {"connection_string": self.connection_string}}

    def bucket(self, name: str) -> str:
        """Create container ``name``; returns ``az://name``."""
        self.client().create_container(name)
        return f"az://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(blob.name for blob in self.client().get_container_client(bucket).list_blobs(
            name_starts_with=prefix or None))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_blob_client(bucket, key).download_blob().readall()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().get_blob_client(bucket, key).upload_blob(data, overwrite=True)

    def stop(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(timeout=30)
        except Exception:
            self.server.kill()
            self.server.wait()


def _quiet_when_clients_hang_up(server) -> None:
    """No traceback on standard error when a client closes its connection before the answer
    (gcsfs asks for an object and for the folder of that name at once, and drops the answer
    it no longer needs); other errors are printed as before."""
    default = server.handle_error

    def handle_error(request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            default(request, client_address)

    server.handle_error = handle_error


@dataclass
class Faults:
    """What the file server does to one file's requests."""

    missing: int = 0  # answer 404 to this many requests first
    status: int | None = None  # answer this HTTP status (403: an expired signed URL, 429: slow down)…
    statuses: int = 0  # …to this many requests first
    cut_after: int | None = None  # close the connection after this many bytes of the body…
    cuts: int = 0  # …for this many requests
    requests: int = 0  # requests seen


@dataclass
class FileServerState:
    root: Path
    latency: float = 0.0  # seconds added to every request
    bandwidth: float | None = None  # bytes per second, per response
    faults: dict[str, Faults] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)  # "METHOD name Range", every request
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FileServerState

    def log_message(self, *args) -> None:  # quiet
        pass

    def translate_path(self, path: str) -> str:
        relative = path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
        return str(self.state.root / urllib.parse.unquote(relative))  # as http.server does: %20 is a space

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        state = self.state
        name = self.path.split("?", 1)[0].lstrip("/")
        with state.lock:
            state.requests.append(f"{self.command} {name}")
            state.asked.append(f"{self.command} {name} {self.headers.get('Range', '')}")
            fault = state.faults.get(name)
            if fault is not None:
                fault.requests += 1
        if state.latency:
            time.sleep(state.latency)
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            return self._listing(path, body)
        if fault is not None and fault.missing > 0:
            with state.lock:
                fault.missing -= 1
            return self._plain(404, b"not found (injected)", body)
        if fault is not None and fault.status is not None and fault.statuses > 0:
            with state.lock:
                fault.statuses -= 1
            return self._plain(fault.status, b"refused (injected)", body)
        if not path.is_file():
            return self._plain(404, b"not found", body)
        data = path.read_bytes()
        start, stop, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and match.group(1):
            start = int(match.group(1))
            stop = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
            if start >= len(data):  # as real servers answer a range past the end
                return self._plain(416, b"range not satisfiable", body)
        elif match and match.group(2):  # a suffix: the last N bytes
            start, status = max(0, len(data) - int(match.group(2))), 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = None
        if fault is not None and fault.cuts > 0 and fault.cut_after is not None:
            with state.lock:
                fault.cuts -= 1
            cut = start + fault.cut_after
        position, chunk = start, 64 << 10
        while position < stop:
            end = min(stop, position + chunk, cut if cut is not None and cut > position else stop)
            if cut is not None and position >= cut:
                # reset the connection mid-stream
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True
                return
            self.wfile.write(data[position:end])
            if state.bandwidth:
                time.sleep((end - position) / state.bandwidth)
            position = end

    def _listing(self, folder: Path, body: bool) -> None:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        page = "".join(f'<a href="{name}">{name}</a>\n' for name in names).encode()
        self._plain(200, page, body, "text/html")

    def _plain(self, status: int, payload: bytes, body: bool, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)


class QuietHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 request handler that logs nothing: the base of the servers a test writes
    for itself (the Hugging Face Hub of ``test_hf_hub`` and ``test_hf_datasets``)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """``handler`` on 127.0.0.1 at a free port, answered by a thread; ``shutdown()`` then
    ``server_close()`` stop it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    _quiet_when_clients_hang_up(server)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


class FileServer:
    """A folder over HTTP on 127.0.0.1 (see the module docstring)."""

    def __init__(self, root: Path, latency: float = 0.0, bandwidth: float | None = None):
        self.state = FileServerState(Path(root), latency, bandwidth)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        _quiet_when_clients_hang_up(self.server)  # its traceback would land in the output a test reads
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault(self, name: str, **settings) -> Faults:
        faults = Faults(**settings)
        self.state.faults[name] = faults
        return faults

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FileServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ChunkedFileServer:
    """A folder over HTTP on 127.0.0.1 from a server that gives no file size (a dynamic one):
    ``Transfer-Encoding: chunked``, no ``Content-Length``, ``Range`` ignored, the ETag the
    file's modification time; a folder answers a page of links to its entries.
    ``requests``: ``"METHOD path"`` of every request."""

    def __init__(self, root: Path):
        self.root, self.requests = Path(root), []
        server = self

        class Handler(QuietHandler):
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                server.requests.append(f"{self.command} {self.path}")
                path = server.root / self.path.split("?", 1)[0].lstrip("/")
                if path.is_dir():
                    data = "".join(f'<a href="{p.name}{"/" if p.is_dir() else ""}">{p.name}</a>\n'
                                   for p in sorted(path.iterdir())).encode()
                elif path.is_file():
                    data = path.read_bytes()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("ETag", f'"{path.stat().st_mtime_ns}"')
                self.end_headers()
                if not body:
                    return
                try:
                    for start in range(0, len(data), 4096):
                        piece = data[start:start + 4096]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):  # a client that read the headers only
                    pass

        self.server = serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "ChunkedFileServer":
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class Relay:
    """TCP from 127.0.0.1:``port`` to ``target`` port; ``on_response(request_line)`` runs
    when the first bytes of the response to a request whose line matches ``pattern`` come
    back, before they are forwarded (once)."""

    def __init__(self, target_port: int, pattern: bytes, on_response: Callable[[bytes], None]):
        self.target_port = target_port
        self.pattern = re.compile(pattern)
        self.on_response = on_response
        self.fired = threading.Event()
        self.seen: list[bytes] = []  # the start of what the client sent, chunk by chunk (for failure messages)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.target_port))
        armed: bytes | None = None
        try:
            while not self.stopped.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client:
                        self.seen.append(data[:160])
                        match = self.pattern.search(data)
                        if match and not self.fired.is_set():
                            line_end = data.find(b"\r\n", match.start())
                            armed = data[data.rfind(b"\r\n", 0, match.start()) + 2 if data.rfind(b"\r\n", 0, match.start()) >= 0 else 0:line_end]
                        server.sendall(data)
                    else:
                        if armed is not None and not data.startswith(b"HTTP/1.1 100"):
                            self.fired.set()
                            self.on_response(armed)
                            armed = None
                            return  # the client is gone: drop the response
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


def environment(**extra: str) -> dict:
    """``os.environ`` with ``extra``, for subprocesses."""
    return dict(os.environ, **extra)


def kill_at_s3_response(s3: "S3", command: list[str], env: dict, pattern: bytes, timeout: float = 300) -> None:
    """Run ``command`` against ``s3`` through a :class:`Relay` and ``kill -9`` it when S3
    answers the first request whose line matches ``pattern``; checks that it died so."""
    kill_at_response(s3.port, lambda endpoint: {"AWS_ENDPOINT_URL": endpoint}, command, env, pattern, timeout)


def kill_at_response(port: int, pointed_at, command: list[str], env: dict, pattern: bytes, timeout: float = 300) -> None:
    """Run ``command`` against the store on ``port`` through a :class:`Relay` (``pointed_at(its
    endpoint)``: the environment variables that send the command there) and ``kill -9`` it when
    the store answers the first request whose line matches ``pattern``; checks that it died so."""
    import signal
    import subprocess

    process = None

    def kill(request_line: bytes) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait()

    relay = Relay(port, pattern, kill)
    try:
        process = subprocess.Popen(command, env=dict(env, **pointed_at(relay.endpoint)),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        process.wait(timeout=timeout)
        stderr = process.stderr.read().decode(errors="replace")[-3000:]
        assert relay.fired.is_set() and process.returncode == -signal.SIGKILL, (
            f"fired={relay.fired.is_set()} returncode={process.returncode} seen={relay.seen[-12:]}\n{stderr}")
    finally:
        relay.stop()
