"""Where data lives: local paths and fsspec URLs behind one set of calls.

Every stage reads and writes its files through this module, so a local path and a URL are
used alike: ``s3://bucket/shards/{00000..00099}.tar``, ``gs://…``, ``az://…``, ``hf://datasets/…``,
``http(s)://…`` (read only) and webdataset's ``pipe:COMMAND`` (a command whose standard
output is the file, read only). Local paths take the plain ``os``/``pathlib`` calls,
exactly as before; URLs go through `fsspec <https://filesystem-spec.readthedocs.io>`_
(``s3fs``, ``gcsfs`` and ``adlfs`` are the extras ``unicom[s3]``, ``unicom[gcs]`` and ``unicom[azure]``).

* :func:`path` turns a location into a ``pathlib.Path`` (local) or a
  ``upath.UPath`` (a URL), both with ``/``, ``.name``, ``.parent``, ``.is_file()``…
* Reading retries transient failures (a 404, a connection reset mid-stream, a timeout, a 5xx)
  with exponential backoff, then raises :class:`FetchError` naming the URL and the reason.
  :func:`open_stream` reads a file front to back while a thread downloads ahead, and
  resumes at the byte it stopped at after a failure.
* Writing is atomic remotely too (:func:`upload_atomic`): a temporary object beside the
  destination, then a rename (a server-side copy on object stores), so an output appears
  whole or not at all. :func:`sweep_temporaries` removes what a killed writer left.
* Credentials and endpoints come the standard way: the SDKs' environment variables
  (``AWS_*`` including ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``) and the
  JSON of ``--storage-options`` (:func:`configure`), passed to fsspec as they are.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import queue
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from unicom.errors import InputError

logger = logging.getLogger(__name__)

PIPE = "pipe:"
OPTIONS_ENV = "UNICOM_STORAGE_OPTIONS"  # the JSON of --storage-options, inherited by workers and ranks
ATTEMPTS_ENV = "UNICOM_IO_ATTEMPTS"
DELAY_ENV = "UNICOM_IO_RETRY_DELAY"
# seconds an http(s) read waits for the server's next bytes (not for the whole file: a shard streams for long)
READ_TIMEOUT_ENV = "UNICOM_HTTP_READ_TIMEOUT"
READ_TIMEOUT = 60.0
# protocol -> (package, extra) for the backends that are not installed with fsspec
BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
            "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}
READ_ONLY = ("http", "https")
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss")
_NO_SUFFIX_RANGES = ("az", "abfs", "abfss")  # stores whose API cannot ask for a file's last bytes alone
CHUNK = 1 << 20  # bytes per read of a stream
READ_AHEAD = 32 << 20  # bytes a stream downloads ahead of its reader
# the name of a temporary file beside its destination: tempfile.mkstemp's, and ours remotely
# (earlier versions ended it in the destination's suffix: `.tmp.npy`)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^./]*)?$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two letters at least: C:// is a drive

T = TypeVar("T")
_RANDOM = random.SystemRandom()  # jitter and temporary names: never the global generator that seeded runs use


class FetchError(OSError):
    """A remote file that could not be read after every retry; ``location`` and ``reason``;
    ``missing``: the store said it has no such file (the last attempt's answer; HTTP 410 Gone
    too, which says it for good); ``advised``:
    the reason says what to do already (a refusal's advice, a bucket name S3 does not allow)."""

    def __init__(self, location: str, reason: str, attempts: int = 1, missing: bool = False, advised: bool = False):
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{location}: {reason}{tries}")
        self.location, self.reason, self.attempts, self.missing, self.advised = location, reason, attempts, missing, advised

    def advice(self, what: str = "check the URL, the credentials (--storage-options) and the connection") -> str:
        """The error with ``what`` to do, unless its reason says what to do already (``advised``)."""
        return str(self) if self.advised else f"{self}; {what}"


# --------------------------------------------------------------------------- locations


def protocol(location) -> str | None:
    """The URL scheme of ``location`` (``"s3"``, ``"https"``, ``"pipe"``), None for a local path."""
    if isinstance(location, Path):
        return None
    if _is_upath(location):
        return location.protocol or None
    text = os.fspath(location) if isinstance(location, os.PathLike) else location
    if not isinstance(text, str):
        return None
    if text.startswith(PIPE):
        return "pipe"
    match = _SCHEME.match(text)
    if match is None or match.group(1).lower() in ("file", "local"):
        return None
    return match.group(1).lower()


def _is_upath(location) -> bool:
    return type(location).__module__.startswith("upath")


def is_url(location) -> bool:
    """Whether ``location`` is a URL (``s3://…``, ``pipe:…``) rather than a local path."""
    return protocol(location) is not None


def is_pipe(location) -> bool:
    return protocol(location) == "pipe"


def text(location) -> str:
    """``location`` as a string: ``s3://bucket/key`` for a URL, the path for a local file."""
    if isinstance(location, Path) or not is_url(location):
        return os.fspath(location)
    return str(location)


def absolute(location) -> str:
    """An absolute form for records (configs, indexes): a URL as it is, a local path made
    absolute, so the record means the same file from any working folder."""
    if is_url(location):
        return text(location)
    return os.path.abspath(os.fspath(_local(location)))


def recorded(value):
    """What a configuration record keeps of ``value``: a local file or folder that exists
    by its absolute path (the record then means the same from any working folder), any
    other value (a URL, a model name, None) as it is."""
    if isinstance(value, (str, os.PathLike)) and not is_url(value) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _local(location) -> Path:
    raw = os.fspath(location)
    return Path(raw[len("file://"):] if raw.startswith("file://") else raw)


def configure(options: str | dict | None) -> None:
    """Set the fsspec storage options of this process and of the processes it starts.

    ``options``: a JSON object (or its text) given to every URL's filesystem as it is
    (``{"anon": true}``), or keyed by protocol (``{"s3": {"endpoint_url": "…"}, "gs":
    {…}}``). None leaves the current options as they are.
    """
    if options is None:
        return
    if isinstance(options, str):
        options = _parsed_options(options, "--storage-options")
    if not isinstance(options, dict):
        raise InputError(f"--storage-options: expected a JSON object, got {type(options).__name__}")
    os.environ[OPTIONS_ENV] = json.dumps(options)


def _parsed_options(raw: str, where: str) -> dict:
    try:
        options = json.loads(raw)
    except ValueError as error:
        raise InputError(f"{where} {raw!r}: not valid JSON ({error})") from error
    if not isinstance(options, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(options).__name__}")
    return options


# filesystems that would otherwise keep listings: other processes write the same folders
_FRESH_LISTINGS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https")


def options_for(scheme: str) -> dict:
    """The storage options for URLs of ``scheme`` (see :func:`configure`); listings are
    not cached (``use_listings_cache=False``) unless the options say otherwise, and an
    http(s) read fails after :func:`read_timeout` seconds without a byte (aiohttp's own
    default waits 300 s for the whole answer) unless ``client_kwargs`` give a ``timeout``."""
    defaults = {"use_listings_cache": False} if scheme in _FRESH_LISTINGS else {}
    options = {**defaults, **_given_options(scheme)}
    if scheme in READ_ONLY:
        import aiohttp

        client = dict(options.get("client_kwargs", {}))
        if "timeout" not in client:
            # no total: a large file streams for as long as bytes keep coming
            client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout())
        else:
            client["timeout"] = _client_timeout(client["timeout"])
        options["client_kwargs"] = client
    return options


def _client_timeout(given):
    """aiohttp's ``ClientTimeout`` of a ``timeout`` in ``client_kwargs`` as JSON gives it: a
    number (seconds for the whole answer, aiohttp's ``total``) or an object of its fields
    (``{"sock_read": 120}``)."""
    import aiohttp

    fields = ("total", "connect", "sock_read", "sock_connect")
    if isinstance(given, aiohttp.ClientTimeout):
        return given
    if isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0:
        return aiohttp.ClientTimeout(total=given)
    if isinstance(given, dict) and given and all(
            key in fields and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0))
            for key, value in given.items()):
        return aiohttp.ClientTimeout(**given)
    raise InputError(f"--storage-options: client_kwargs timeout {json.dumps(given, default=str)}: give seconds for the "
                     f"whole answer (a number above 0) or an object of {', '.join(fields)} in seconds (or null), "
                     f"such as {{\"sock_read\": 120}}")


def read_timeout() -> float:
    """Seconds an http(s) read waits for the server's next bytes before it fails (and is
    tried again): ``UNICOM_HTTP_READ_TIMEOUT``, else :data:`READ_TIMEOUT`."""
    raw = os.environ.get(READ_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else READ_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"{READ_TIMEOUT_ENV}={raw!r}: expected seconds above 0 (default {READ_TIMEOUT:g})")
    return seconds


def _given_options(scheme: str) -> dict:
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return {}
    options = _parsed_options(raw, OPTIONS_ENV)
    if options and all(isinstance(value, dict) and _known_protocol(key) for key, value in options.items()):
        return dict(options.get(scheme, {}))
    return dict(options)


def _known_protocol(name: str) -> bool:
    from fsspec.registry import known_implementations, registry

    return name in known_implementations or name in registry


def _check_backend(scheme: str, location) -> None:
    """An :class:`InputError` naming the extra to install when ``scheme`` has no backend."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        package, extra = BACKENDS.get(scheme, (None, None))
        if package is not None:
            raise InputError(
                f"{text(location)}: {scheme}:// URLs need the {package} package: pip install 'unicom[{extra}]'"
            ) from error
        raise InputError(f"{text(location)}: {scheme}:// URLs need a package that is missing ({error})") from error
    except ValueError as error:
        raise InputError(f"{text(location)}: no filesystem knows the protocol {scheme}:// ({error})") from error


def path(location):
    """``location`` as a path object: ``pathlib.Path`` when local (``file://`` included),
    ``upath.UPath`` for a URL, carrying the storage options of :func:`configure`."""
    if isinstance(location, Path):
        return location
    scheme = protocol(location)
    if scheme is None:
        return _local(location)
    if scheme == "pipe":
        raise InputError(f"{text(location)}: a pipe: command can only be read as a stream (webdataset shards)")
    if _is_upath(location):
        return location
    _check_backend(scheme, location)
    from upath import UPath

    return UPath(text(location), **options_for(scheme))


def name(location) -> str:
    """The last component of a path or URL: ``s3://b/emb/img_emb_3.npy`` -> ``img_emb_3.npy``."""
    if isinstance(location, Path) or _is_upath(location):
        return location.name
    return text(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def join(base, *names: str):
    """``base / name / …`` as a path object (see :func:`path`)."""
    result = path(base)
    for name in names:
        result = result / name
    return result


def parent(location):
    """The folder holding ``location``: a ``Path``, or a URL string."""
    if is_url(location):
        return text(location).rstrip("/").rsplit("/", 1)[0]
    return _local(location).parent


def resolve(base, written: str) -> str:
    """A path as written in a list, resolved against the folder ``base`` (a path or URL):
    absolute paths and URLs are kept as they are; a local result is absolute (outputs
    record it, and are read from other working folders)."""
    if os.path.isabs(written) or is_url(written):
        return written
    if is_url(base):
        return f"{text(base).rstrip('/')}/{written}"
    return str(Path(base).absolute() / written)


def same_file(path: str) -> str:
    """A path as :func:`resolve` gives it, in one spelling per file, to compare images by: a local
    path normalised (``a/./b.jpg``, ``a/c/../b.jpg``: ``a/b.jpg``), a URL as it is."""
    return path if is_url(path) else os.path.normpath(path)


def writable(location) -> None:
    """An :class:`InputError` when ``location`` cannot be written (http(s), pipe:)."""
    scheme = protocol(location)
    if scheme in READ_ONLY or scheme == "pipe":
        raise InputError(f"{text(location)}: {scheme} URLs are read only; write outputs to a local folder or object storage")


def writable_folder(location) -> None:
    """:func:`writable`, for an output folder: also an :class:`InputError` when a local
    ``location`` is a file, or when the bucket of an object-store URL does not exist (checked
    before any work: its first write would fail only after the retries, as a file "not found")."""
    writable(location)
    if not is_url(location) and _local(location).exists() and not _local(location).is_dir():
        raise InputError(f"{text(location)}: a file, not a folder; give a folder (new or earlier output) for the outputs")
    bucket = missing_bucket(location)
    if bucket is not None:
        raise InputError(f"{text(location)}: the bucket {bucket} does not exist (or these credentials cannot see it): "
                         "create it, or check its name and the credentials")


def filesystem(location) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL."""
    target = path(location)
    return target.fs, target.path


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class Retries:
    """How transient failures are retried: ``attempts`` in all, waiting ``delay`` seconds
    before the second, twice that before the third, … at most ``max_delay`` (with jitter)."""

    attempts: int = 5
    delay: float = 1.0
    max_delay: float = 30.0

    def wait(self, failures: int) -> float:
        return min(self.max_delay, self.delay * 2 ** (failures - 1)) * _RANDOM.uniform(0.8, 1.2)


def retries() -> Retries:
    """The retry policy: :class:`Retries` defaults, or ``UNICOM_IO_ATTEMPTS`` /
    ``UNICOM_IO_RETRY_DELAY`` (seconds) from the environment."""
    try:
        attempts = int(os.environ.get(ATTEMPTS_ENV, Retries.attempts))
        delay = float(os.environ.get(DELAY_ENV, Retries.delay))
    except ValueError as error:
        raise InputError(f"{ATTEMPTS_ENV}/{DELAY_ENV}: expected numbers ({error})") from error
    return Retries(max(1, attempts), max(0.0, delay))


# packages whose errors are network failures though not OSErrors; huggingface_hub (hf://) does its HTTP
# through httpx (httpx2 in its recent versions)
_NETWORK_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "httpx", "httpx2", "google", "http",
                    "ssl", "fsspec", "azure")


# answers that will not change when asked again: unauthorised, forbidden (an expired signed URL), proxy
# authentication required, gone, unavailable for legal reasons (a 404 may be a file not there yet, and other
# client errors have been seen to pass, e.g. a 400 on a connection the server had cut)
_REFUSALS = (401, 403, 407, 410, 451)


def http_status(error: BaseException) -> int | None:
    """The HTTP status an error of a store's client carries, if any (aiohttp's ``status``,
    requests'/httpx' ``response.status_code``, botocore's ``response`` dict, gcsfs' ``code``),
    or the error it was raised from (fsspec's HTTP files raise any failed request as a
    ``FileNotFoundError`` from it, s3fs a refused one as a ``PermissionError``)."""
    for _ in range(4):
        status = getattr(error, "status", None)
        response = getattr(error, "response", None)
        if not isinstance(status, int) and isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not isinstance(status, int):
            status = getattr(response, "status_code", None)
        if not isinstance(status, int):  # looked at last: aiohttp warns when its deprecated ``code`` is read
            status = getattr(error, "code", None)
        if isinstance(status, int) and 100 <= status <= 599:
            return status
        if error.__cause__ is None:
            return None
        error = error.__cause__
    return None


def _refused(error: BaseException) -> bool:
    """Whether the store refused the request for good (:data:`_REFUSALS`)."""
    return http_status(error) in _REFUSALS


# botocore's refusals of a request as written, before it is sent (a bucket name S3 does not allow): final
_INVALID_REQUESTS = ("ParamValidationError", "ValidationError", "MissingParametersError")


def _invalid_request(error: BaseException) -> bool:
    """Whether the store's client refused to send the request as written (:data:`_INVALID_REQUESTS`)."""
    return any(cls.__module__.split(".")[0] == "botocore" and cls.__name__ in _INVALID_REQUESTS
               for cls in type(error).__mro__)


def transient(error: BaseException) -> bool:
    """Whether ``error`` may pass when tried again: network errors, timeouts, a file not
    found (yet), a server error or too many requests; not a refused permission (HTTP 401,
    403, 410, …), a request the client will not send (an S3 bucket name that is not
    valid), a wrong kind of file or a missing package."""
    if isinstance(error, (PermissionError, IsADirectoryError, NotADirectoryError, InputError, ImportError,
                          NotImplementedError, FetchError, PipeCommandError)):
        return False
    if _refused(error) or _invalid_request(error):
        return False
    if isinstance(error, (OSError, TimeoutError, EOFError)):
        return True
    return any(cls.__module__.split(".")[0] in _NETWORK_MODULES for cls in type(error).__mro__[:-2])


def _not_found(error: BaseException) -> bool:
    """Whether ``error`` says the store has no such file: a ``FileNotFoundError``, or an
    HTTP 404 raised as another type (huggingface_hub's ``EntryNotFoundError`` for an hf:// file)."""
    status = http_status(error)
    return status == 404 or (isinstance(error, FileNotFoundError) and status is None)


def _gone(error: BaseException) -> bool:
    """Whether the store said the file is gone for good (HTTP 410 Gone): missing, as a 404."""
    return http_status(error) == 410


def describe(error: BaseException, location=None) -> str:
    """A one-line reason for a failure report: the error's type and message (without
    the location, which the report names already)."""
    if _not_found(error):
        if isinstance(error, FileNotFoundError) and http_status(error) is None and protocol(location) not in READ_ONLY:
            return "not found"
        return "not found (HTTP 404)"
    if _refused(error):
        import http

        status = http_status(error)
        phrase = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else ""
        return f"refused (HTTP {status} {phrase})".replace(" )", ")")
    cause = error.__cause__
    if isinstance(error, FileNotFoundError) and cause is not None and http_status(cause) is not None:
        return describe(cause, location)  # fsspec's wrapper of a failed request: say the answer
    if isinstance(error, PipeCommandError):
        return str(error)  # what the shell said may take several lines
    if _invalid_request(error):
        return _invalid_request_reason(error)
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if location is not None:
        message = message.replace(text(location), "").strip(" :")
    name = type(error).__name__
    return f"{name}: {message}" if message else name


_INVALID_BUCKET = re.compile(r'Invalid bucket name "(?P<name>[^"]*)"')


def _invalid_request_reason(error: BaseException) -> str:
    """What botocore's refusal to send a request says, without its regular expressions."""
    bucket = _INVALID_BUCKET.search(str(error))
    if bucket is not None:
        return (f"the bucket name {bucket.group('name')!r} is not valid (S3 bucket names are lowercase letters, "
                "digits, dots and hyphens)")
    return f"{type(error).__name__}: " + "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def retrying(location, call: Callable[[], T], *, policy: Retries | None = None, missing_is_final: bool = False) -> T:
    """``call()``, tried again after transient failures; :class:`FetchError` when every
    attempt failed. ``missing_is_final``: a ``FileNotFoundError`` is raised at once (not
    fsspec's one raised from a 5xx or 429, which is retried), and a 404 of another type (an
    hf:// file's) at once as a :class:`FetchError` (``missing``)."""
    policy = policy or retries()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as error:
            missing = isinstance(error, FileNotFoundError) and _not_found(error)
            if (missing_is_final and missing) or not transient(error):
                if _refused(error) or _invalid_request(error):  # one error line, whatever type the client raised
                    raise FetchError(text(location), describe(error, location), attempt, _gone(error),
                                     advised=_invalid_request(error) and _INVALID_BUCKET.search(str(error)) is not None) from error
                raise
            if missing_is_final and _not_found(error):
                raise FetchError(text(location), describe(error, location), attempt, True) from error
            if attempt == policy.attempts:
                raise FetchError(text(location), describe(error, location), attempt, _not_found(error)) from error
            time.sleep(policy.wait(attempt))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- reading


def _ask(location, question: str, optional: bool = False) -> bool:
    """``exists``, ``is_file`` or ``is_dir`` of ``location``: pathlib's for a local path,
    the filesystem's (retried) for a URL, a :class:`FetchError` when the store refused to
    answer (HTTP 401, 403, …) or kept failing (a 5xx), not False. ``optional``: a refusal
    is False, as S3 (and a CDN or static site in front of a bucket) answers 403 for a key
    that is not there to whoever may not list the bucket; a store that keeps failing is
    still an error."""
    if not is_url(location):
        return getattr(_local(location), question)()
    try:
        if retrying(location, getattr(path(location), question)):
            return True
        # "no" may have been a failed request: the store's description of what is there decides
        # (asking again could meet the same failure)
        found = _there(location)
        return found is not None and (question == "exists" or found.get("type") == _KINDS[question])
    except FetchError as error:
        if error.__cause__ is not None and _refused(error.__cause__):
            if optional:
                logger.debug("%s: %s, taken as not there", text(location), error.reason)
                return False
            raise FetchError(error.location, f"{error.reason}; {_refusal_advice(location, question)}",
                             advised=True) from error.__cause__
        raise


# fsspec's ``info()["type"]`` of what ``is_file`` and ``is_dir`` ask about (HTTP's is always "file")
_KINDS = {"is_file": "file", "is_dir": "directory"}


def _there(location) -> dict | None:
    """What the store has at ``location`` (fsspec's ``info``), None when it says it has
    nothing there; a :class:`FetchError` when it refused to say or kept failing. fsspec's
    HTTP and S3 filesystems answer "no" to ``exists``/``is_file`` for any failed request: an
    expired signed URL, a bucket policy that refuses or a server error must not read as a
    missing file."""
    target = path(location)
    try:
        return retrying(location, lambda: target.fs.info(target.path), missing_is_final=True)
    except FetchError as error:
        if not error.missing:
            raise
        return None
    except Exception:  # FileNotFoundError (not there), or a question the store cannot answer: the "no" stands
        return None


def _refusal_advice(location, question: str) -> str:
    """What to do about a store that refused to say whether ``location`` exists (``question``:
    ``exists``, ``is_file`` or ``is_dir``)."""
    scheme = protocol(location)
    if scheme in READ_ONLY and question == "is_dir":
        return ("a folder is read over HTTP from its page of links, which S3, CloudFront and most static sites refuse "
                "to give: use the store's own URL (s3://, gs://), a server that lists folders, or the credentials it "
                "needs (--storage-options)")
    if scheme in READ_ONLY:
        return ("the server refused the request: give a fresh signed URL if this one has expired, or the credentials "
                "it needs (--storage-options, e.g. '{\"headers\": {\"Authorization\": \"…\"}}')")
    if scheme in ("s3", "s3a"):
        return ("S3 refused the request: check the credentials (AWS_* variables, --storage-options) and the bucket "
                "policy, and that the key exists (S3 answers 403 for a missing key to credentials that may not list "
                "the bucket)")
    if scheme in ("az", "abfs", "abfss"):
        return ("Azure refused the request: check the credentials (AZURE_STORAGE_CONNECTION_STRING, or "
                "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or "
                "--storage-options) and that the SAS token or role allows this container")
    if scheme == "hf":
        return ("the Hub answers so for a repository that does not exist, or one that is private or gated: check the "
                "repository's name, and log in (`hf auth login`, or HF_TOKEN) with access to it")
    return "the store refused the request: check the credentials (--storage-options) and that the location exists"


def exists(location) -> bool:
    return _ask(location, "exists")


def is_file(location, *, optional: bool = False) -> bool:
    """Whether ``location`` is a file; ``optional``: for a file that a folder may lack, a
    store's refusal to say reads as "not there" (see :func:`_ask`)."""
    return _ask(location, "is_file", optional)


def is_dir(location) -> bool:
    """A folder (locally), or a prefix with objects under it (object stores)."""
    return _ask(location, "is_dir")


def missing_bucket(location) -> str | None:
    """The bucket of an object-store URL (``s3://name``) when the store says it has no such
    bucket (a misspelt name, or one these credentials cannot see), else None: for saying why
    a folder in it is empty. None too when the store refuses to say: credentials may list a
    folder of a bucket and not ask about the bucket itself (a policy on a prefix)."""
    scheme = protocol(location)
    if scheme not in _OBJECT_STORES or _is_upath(location):
        return None
    bucket = text(location)[len(scheme) + 3:].split("/", 1)[0]
    root = f"{scheme}://{bucket}"
    try:
        return None if not bucket or exists(root) else root
    except FetchError:
        return None


class TooLarge(ValueError):
    """A file longer than the caller's ``max_bytes`` (:func:`read_bytes`); ``size`` is its
    length, or None when only more than ``max_bytes`` was read."""

    def __init__(self, location: str, max_bytes: int, size: int | None = None):
        length = f"{size:,} bytes" if size is not None else f"more than {max_bytes:,} bytes"
        super().__init__(f"{location}: {length}, over the limit of {max_bytes:,}")
        self.location, self.max_bytes, self.size = location, max_bytes, size


def read_bytes(location, max_bytes: int | None = None, *, missing_is_final: bool = False) -> bytes:
    """The whole file; a URL is fetched with retries (a ``pipe:`` command's output too).

    ``max_bytes``: read at most one byte more than this, and raise :class:`TooLarge` when
    the file is longer (a remote file is asked for that many bytes only).
    ``missing_is_final``: a file the store does not have is a ``FileNotFoundError`` at once,
    not retried (for a reader that answers someone waiting, such as a web page).
    """
    if max_bytes is not None:
        if is_pipe(location):
            with open_stream(location) as stream:
                data = stream.read(max_bytes + 1)
        elif not is_url(location):
            size = _local(location).stat().st_size
            if size > max_bytes:
                raise TooLarge(text(location), max_bytes, size)
            data = _local(location).read_bytes()
        else:
            data = read_range(location, 0, max_bytes + 1, exact=False, missing_is_final=missing_is_final)
        if len(data) > max_bytes:
            raise TooLarge(text(location), max_bytes)
        return data
    if is_pipe(location):
        with open_stream(location) as stream:
            return stream.read()
    if not is_url(location):
        return _local(location).read_bytes()
    fs, inner = filesystem(location)
    return retrying(location, lambda: fs.cat_file(inner), missing_is_final=missing_is_final)


def read_text(location) -> str:
    return read_bytes(location).decode("utf-8")


def read_range(location, start: int, stop: int, *, exact: bool = True, missing_is_final: bool = False) -> bytes:
    """Bytes ``start:stop`` of a file (a ranged request for a URL); fewer at the end of
    the file when not ``exact``. ``missing_is_final``: as :func:`read_bytes`'s."""
    if not is_url(location):
        with open(_local(location), "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
    elif stop <= start:  # no request: some stores refuse an empty range (Azure)
        data = b""
    elif protocol(location) in READ_ONLY:
        fs, inner = filesystem(location)
        data, whole = retrying(location, lambda: _http_range(fs, inner, start, stop), missing_is_final=missing_is_final)
        if whole:
            _warn_whole_files(location)
    else:
        fs, inner = filesystem(location)
        data = retrying(location, lambda: fs.cat_file(inner, start=start, end=stop), missing_is_final=missing_is_final)
    if exact and len(data) != stop - start:
        raise FetchError(text(location), f"asked for bytes {start}-{stop - 1}, received {len(data)} bytes")
    return data


def _http_range(fs, inner: str, start: int, stop: int | None) -> tuple[bytes, bool]:
    """(bytes ``start:stop`` of an http(s) file, or its last ``-start`` bytes when ``stop`` is
    None; whether the server sent a whole longer file): one ranged GET, its answer read as it
    comes. A server that ignores ``Range`` (``python -m http.server``) answers with the whole
    file: it is read up to ``stop`` only and the connection closed (or, for the last bytes,
    read through keeping those only), so a few bytes of a large file never hold all of it."""
    from fsspec.asyn import sync

    suffix = stop is None
    wanted = -start if suffix else stop - start

    async def get() -> tuple[bytes, bool]:
        if wanted <= 0:
            return b"", False
        arguments = dict(fs.kwargs)
        asked = f"bytes=-{wanted}" if suffix else f"bytes={start}-{stop - 1}"
        arguments["headers"] = {**arguments.get("headers", {}), "Range": asked}
        session = await fs.set_session()
        async with session.get(fs.encode_url(inner), **arguments) as response:
            fs._raise_not_found_for_status(response, inner)
            whole = response.status != 206
            skip = start if whole and not suffix else 0
            data, read = bytearray(), 0
            while suffix and whole or len(data) < wanted:  # leaving unread bytes closes the connection
                chunk = await response.content.read(CHUNK if suffix else min(CHUNK, skip + wanted - len(data)))
                if not chunk:
                    break
                read += len(chunk)
                dropped = min(skip, len(chunk))
                skip -= dropped
                data += chunk[dropped:]
                if suffix and len(data) > wanted:
                    del data[:len(data) - wanted]
            # a 200 for all of a file no longer than asked is not a server that ignores Range
            longer = read > wanted if suffix else start > 0 or (len(data) == wanted and not response.content.at_eof())
            return bytes(data), whole and longer

    return sync(fs.loop, get)


def read_tail(location, count: int) -> bytes:
    """The last ``count`` bytes of a file (the whole file when it is shorter): one suffix
    request for a URL (``Range: bytes=-count``), no request for its size; on Azure, whose
    API has no suffix ranges, its size and then a range."""
    if not is_url(location):
        with open(_local(location), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - count))
            return f.read()
    fs, inner = filesystem(location)
    if protocol(location) in READ_ONLY:
        data, whole = retrying(location, lambda: _http_range(fs, inner, -count, None))
        if whole:
            _warn_whole_files(location)
        return data
    if protocol(location) in _NO_SUFFIX_RANGES:  # the size first, then a range
        size = retrying(location, lambda: fs.size(inner))
        return read_range(location, max(0, size - count), size)
    return retrying(location, lambda: fs.cat_file(inner, start=-count))


_WHOLE_FILE_HOSTS: set[str] = set()


def _host(location) -> str:
    return text(location).split("/")[2] if "://" in text(location) else text(location)


def serves_ranges(location) -> bool:
    """False once a ranged read of ``location``'s server brought the whole file (a server
    that ignores ``Range``): a reader of parts of its files had better fetch each once, whole."""
    return _host(location) not in _WHOLE_FILE_HOSTS


def _warn_whole_files(location) -> None:
    """Say once per server that it sends whole files where a range was asked for."""
    host = _host(location)
    if host not in _WHOLE_FILE_HOSTS:
        _WHOLE_FILE_HOSTS.add(host)
        logger.warning("%s ignores Range requests and sends whole files: every read of a part of %s downloads all of "
                       "it (serve the files with a server that supports ranges to read only the rows needed)",
                       host, text(location))


def file_version(location) -> tuple[int, str | None]:
    """(size in bytes, version) of a file: for a URL the store's ETag, content hash or
    modification time where it gives one (retried, a file not found too), for a local file
    its modification time in ns."""
    if not is_url(location):
        stat = _local(location).stat()
        return stat.st_size, str(stat.st_mtime_ns)
    fs, inner = filesystem(location)
    size, version = _signature(retrying(location, lambda: fs.info(inner)))
    return size, version


class RangedFile(io.RawIOBase):
    """A remote file read like a local one (seek, tell, read), for readers that jump to the
    parts they need (pyarrow reading a parquet footer and one row group): each read is one
    ranged request for the bytes asked (:func:`read_range`, retried), nothing is read ahead.
    ``size``: the file's length, from :func:`file_version`."""

    def __init__(self, location, size: int):
        super().__init__()
        self.location, self.size, self._position = location, int(size), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:  # as a local file's seek does
            raise OSError(errno.EINVAL, f"negative seek position {base + offset}", text(self.location))
        self._position = base + offset
        return self._position

    def read(self, count: int = -1) -> bytes:
        self._checkClosed()
        stop = self.size if count is None or count < 0 else min(self.size, self._position + count)
        if stop <= self._position:
            return b""
        data = read_range(self.location, self._position, stop)
        self._position = stop
        return data

    def readall(self) -> bytes:
        """The rest of the file in one request (io.RawIOBase's would ask 8 KiB at a time)."""
        return self.read(-1)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)


def size(location) -> int:
    if not is_url(location):
        return _local(location).stat().st_size
    fs, inner = filesystem(location)
    return int(retrying(location, lambda: fs.size(inner)))


def list_files(folder) -> dict[str, Any]:
    """``{name: path}`` of the files directly in ``folder`` (one listing call for a URL);
    empty when the folder does not exist."""
    if not is_url(folder):
        folder = _local(folder)
        try:
            with os.scandir(folder) as entries:
                return {entry.name: folder / entry.name for entry in entries if entry.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return {}
    base = path(folder)
    fs = base.fs

    def listing():
        try:
            return fs.ls(base.path, detail=True, refresh=True)
        except FileNotFoundError:
            return []

    found = {}
    for info in retrying(folder, listing):
        if info.get("type") == "file":
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            found[name] = base / name
    return found


def list_folders(folder) -> list[str]:
    """Names of the sub-folders directly in ``folder``, sorted."""
    if not is_url(folder):
        folder = _local(folder)
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    base = path(folder)
    infos = retrying(folder, lambda: base.fs.ls(base.path, detail=True, refresh=True))
    return sorted(info["name"].rstrip("/").rsplit("/", 1)[-1] for info in infos if info.get("type") == "directory")


def find_files(folder) -> list[Any]:
    """Every file under ``folder``, at any depth, sorted by path."""
    if not is_url(folder):
        return sorted(p for p in _local(folder).rglob("*") if p.is_file())
    base = path(folder)
    prefix = base.path.rstrip("/") + "/"
    found = retrying(folder, lambda: base.fs.find(base.path))
    return [base / name[len(prefix):] for name in sorted(found) if name.startswith(prefix)]


def gather(call: Callable[[Any], T], locations: Iterable[Any], threads: int = 16) -> list[T]:
    """``[call(location) for location in locations]``, in order; for URLs the calls run in
    ``threads`` threads so that their requests overlap (the first error, in order, is raised)."""
    locations = list(locations)
    if len(locations) < 2 or not any(is_url(location) for location in locations):
        return [call(location) for location in locations]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(locations)), thread_name_prefix="unicom-gather") as pool:
        return list(pool.map(call, locations))


def braces(pattern: str) -> list[str]:
    """The brace expansion of ``pattern``: ``a/{0..2}.tar`` -> ``a/0.tar``, ``a/1.tar``, ``a/2.tar``."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def has_magic(pattern: str) -> bool:
    """Whether ``pattern`` holds glob characters (``*``, ``?``, ``[``); an http(s) URL's
    query (a signed URL's ``?X-Amz-Signature=…``) is not a pattern."""
    import glob

    body = pattern.split("://", 1)[-1] if is_url(pattern) else pattern
    if protocol(pattern) in READ_ONLY:
        body = body.split("?", 1)[0]
    return glob.has_magic(body)


def glob(pattern: str) -> list[str]:
    """The files matching a glob pattern, sorted, as locations (URLs keep their scheme)."""
    if not is_url(pattern):
        import glob as local_glob

        return sorted(local_glob.glob(pattern))
    target = path(pattern.split("?", 1)[0] if protocol(pattern) in READ_ONLY else pattern)
    scheme = protocol(pattern)
    found = retrying(pattern, lambda: target.fs.glob(target.path))
    return sorted(name if "://" in name else f"{scheme}://{name}" for name in found)


def load_npy(location, mmap: bool = True):
    """A .npy file: memory-mapped (``mmap``) or read; a URL gives a :class:`RemoteArray`
    (rows fetched on demand) when ``mmap``, else the array fetched whole."""
    import numpy as np

    if not is_url(location):
        return np.load(_local(location), mmap_mode="r" if mmap else None, allow_pickle=False)
    if mmap:
        return RemoteArray(location)
    return np.load(io.BytesIO(read_bytes(location)), allow_pickle=False)


class RemoteArray:
    """A .npy file at a URL, read like a memory map: indexing fetches only the bytes of
    the rows asked for (one ranged request per contiguous run of rows).

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, ``np.asarray``, and indexing by
    an int, a slice of step 1 or an integer array (optionally followed by column indexes).
    """

    HEADER_BYTES = 4096

    def __init__(self, location):
        import numpy as np

        self.location = location
        head = read_range(location, 0, self.HEADER_BYTES, exact=False)
        stream = io.BytesIO(head)
        try:
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(stream)
        except ValueError as error:
            raise ValueError(f"{text(location)}: not a .npy file ({error})") from error
        if fortran and len(shape) > 1:
            raise ValueError(f"{text(location)}: Fortran-ordered arrays are not supported remotely")
        if dtype.hasobject:
            raise ValueError(f"{text(location)}: object arrays cannot be loaded")
        self.shape, self.dtype, self.offset = tuple(shape), dtype, stream.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, start: int, stop: int):
        import numpy as np

        if stop <= start:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        data = read_range(self.location, self.offset + start * self.row_bytes, self.offset + stop * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])

    def __getitem__(self, index):
        import numpy as np

        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                rows = self._rows(start, stop)[::step]
            else:
                rows = self._rows(start, stop)
        elif isinstance(index, (int, np.integer)):
            position = int(index) + (self.shape[0] if index < 0 else 0)
            if not 0 <= position < self.shape[0]:
                raise IndexError(f"index {index} is out of bounds for {self.shape[0]} rows")
            rows = self._rows(position, position + 1)[0]
        else:
            wanted = np.asarray(index)
            if wanted.dtype == bool:
                wanted = np.flatnonzero(wanted)
            wanted = np.where(wanted < 0, wanted + self.shape[0], wanted).astype(np.int64)
            rows = np.empty((len(wanted), *self.shape[1:]), dtype=self.dtype)
            order = np.argsort(wanted, kind="stable")
            ordered = wanted[order]
            # contiguous runs of wanted rows, one request each
            breaks = np.flatnonzero(np.diff(ordered) > 1) + 1
            for run in np.split(np.arange(len(ordered)), breaks):
                if len(run):
                    block = self._rows(int(ordered[run[0]]), int(ordered[run[-1]]) + 1)
                    rows[order[run]] = block[ordered[run] - ordered[run[0]]]
        return rows[(slice(None), *rest)] if rest else rows

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        rows = self._rows(0, self.shape[0]) if self.shape else self._rows(0, 1)
        return rows.astype(dtype) if dtype is not None else np.array(rows)


def readable(location):
    """What pyarrow readers take for ``location``: the local path, or the fetched bytes of
    a URL (a ``pyarrow.Buffer``, which can be read more than once)."""
    if not is_url(location):
        return os.fspath(_local(location))
    import pyarrow as pa

    return pa.py_buffer(read_bytes(location))


# --------------------------------------------------------------------------- streams


_PREFETCHED: dict[str, Any] = {}  # URL -> a stream opened ahead of its reader (this process)


def prefetch(location) -> None:
    """Start downloading ``location`` now, for the :func:`open_stream` call that will read
    it next (the next shard while this one is decoded); nothing for a local file."""
    if location is None or not is_url(location) or text(location) in _PREFETCHED:
        return
    _PREFETCHED[text(location)] = open_stream(location)


def drop_prefetched() -> None:
    """Close the streams that were prefetched but never read (their threads stop)."""
    while _PREFETCHED:
        _PREFETCHED.popitem()[1].close()


def open_stream(location, *, read_ahead: int = READ_AHEAD, missing_is_final: bool = False):
    """A binary file object that reads ``location`` front to back.

    A local file is opened as it is. A URL is downloaded by a thread up to ``read_ahead``
    bytes ahead of the reader (a shard is decoded while it downloads) and is resumed at the
    byte it stopped at after a transient failure; ``pipe:COMMAND`` runs the command and
    reads its output. A failure that outlasts the retries is a :class:`FetchError`. A
    stream started by :func:`prefetch` is handed over as it is. ``missing_is_final``: a file
    the store does not have is a :class:`FetchError` (``missing``) at once, not retried.
    """
    if not is_url(location):
        return open(_local(location), "rb")
    early = _PREFETCHED.pop(text(location), None)
    if early is not None:
        return early
    if is_pipe(location):
        raw = _ResumingStream(location, _pipe_opener(text(location)[len(PIPE):]), read_ahead)
    else:
        raw = _ResumingStream(location, _url_opener(location), read_ahead, missing_is_final)
    return io.BufferedReader(raw, buffer_size=CHUNK)


# the shell's exit statuses for a command that cannot run at all: asking again gives the same answer
_CANNOT_RUN = {126: "cannot be executed", 127: "was not found"}


class PipeCommandError(OSError):
    """A ``pipe:`` command that cannot run (the shell's exit status 126 or 127): final, not
    retried as the other non-zero exits of a network copy (``curl``, ``aws s3 cp … -``) are."""


class _PipeProcess:
    """A running ``pipe:`` command: its output as a file; a non-zero exit is an error at the end
    (:class:`PipeCommandError` for a command that cannot run)."""

    def __init__(self, command: str):
        self.command = command
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.errors)

    def read(self, n: int) -> bytes:
        data = self.process.stdout.read(n)
        if not data:
            code = self.process.wait()
            if code != 0:
                self.errors.seek(0)
                tail = self.errors.read()[-500:].decode("utf-8", "replace").strip()
                said = f": {tail}" if tail else ""
                if code in _CANNOT_RUN:
                    program = self.command.split(maxsplit=1)[0] if self.command.strip() else self.command
                    raise PipeCommandError(f"the command {program!r} {_CANNOT_RUN[code]} (exit status {code}{said}); "
                                           "fix the command after pipe: (its path, its execute permission, the PATH)")
                raise OSError(f"the command exited with status {code}" + said)
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.stdout.close()
        self.process.wait()
        self.errors.close()


def _pipe_opener(command: str) -> Callable[[int], Any]:
    def open_at(offset: int):
        process = _PipeProcess(command)
        _skip(process, offset)
        return process

    return open_at


def _url_opener(location) -> Callable[[int], Any]:
    target = path(location)
    fs, inner = target.fs, target.path
    scheme = protocol(location)

    def open_at(offset: int):
        if scheme in READ_ONLY:
            # one streamed GET; a resumed one asks for the rest only (Range), and skips
            # what it has already when the server sends the whole file again
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            handle = fs.open(inner, "rb", block_size=0, headers=headers) if headers else fs.open(inner, "rb", block_size=0)
            status = getattr(getattr(handle, "r", None), "status", 200)
            if offset and status != 206:
                _skip(handle, offset)
            return handle
        handle = fs.open(inner, "rb", block_size=CHUNK, cache_type="none")
        if offset:
            handle.seek(offset)
        return handle

    return open_at


def _skip(handle, count: int) -> None:
    while count > 0:
        data = handle.read(min(count, CHUNK))
        if not data:
            raise EOFError(f"the file ended after {count} bytes fewer than were read before")
        count -= len(data)


_END = object()


class _ResumingStream(io.RawIOBase):
    """A front-to-back reader fed by a download thread (see :func:`open_stream`)."""

    def __init__(self, location, open_at: Callable[[int], Any], read_ahead: int, missing_is_final: bool = False):
        super().__init__()
        self.location = location
        self.open_at = open_at
        self.policy = retries()
        self.missing_is_final = missing_is_final
        self.chunks: queue.Queue = queue.Queue(maxsize=max(2, read_ahead // CHUNK))
        self.stop = threading.Event()
        self.pending = b""
        self.finished = False
        self.thread = threading.Thread(target=self._download, name=f"unicom-read {text(location)[-40:]}", daemon=True)
        self.thread.start()

    def readable(self) -> bool:
        return True

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _download(self) -> None:
        offset, failures, handle = 0, 0, None
        try:
            while not self.stop.is_set():
                try:
                    if handle is None:
                        handle = self.open_at(offset)
                    data = handle.read(CHUNK)
                except Exception as error:
                    _close_quietly(handle)
                    handle = None
                    failures += 1
                    if not transient(error) or failures >= self.policy.attempts or (
                            self.missing_is_final and _not_found(error)):
                        reason = describe(error, self.location)
                        if offset:
                            reason += f" (after {offset} bytes)"
                        self._put(FetchError(text(self.location), reason, failures, _not_found(error) or _gone(error)))
                        return
                    if self.stop.wait(self.policy.wait(failures)):
                        return
                    continue
                if not data:
                    self._put(_END)
                    return
                failures = 0
                offset += len(data)
                if not self._put(data):
                    return
        finally:
            _close_quietly(handle)

    def readinto(self, buffer) -> int:
        if not self.pending:
            if self.finished:
                return 0
            item = self.chunks.get()
            if item is _END:
                self.finished = True
                return 0
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.pending = item
        count = min(len(buffer), len(self.pending))
        buffer[:count] = self.pending[:count]
        self.pending = self.pending[count:]
        return count

    def close(self) -> None:
        if not self.closed:
            self.stop.set()
            self.thread.join(timeout=30)
        super().close()


def _close_quietly(handle) -> None:
    if handle is not None:
        try:
            handle.close()
        except Exception:  # a connection that broke already
            pass


# --------------------------------------------------------------------------- writing


def temporary_name(name: str) -> str:
    """A temporary name beside ``name``: ``.{name}.{8 random characters}.tmp``, the pattern
    of ``tempfile.mkstemp`` that :func:`sweep_temporaries` recognises (and no reader's
    ``*.npy`` / ``*.parquet``)."""
    token = "".join(_RANDOM.choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=8))
    return f".{name}.{token}.tmp"


def upload_atomic(local_file: str | os.PathLike, destination) -> None:
    """Put ``local_file`` at the URL ``destination`` whole or not at all: upload it under
    a temporary name beside the destination, then rename it (a server-side copy and a
    delete on object stores). Transient failures are retried; the temporary object is
    removed when the upload fails."""
    writable(destination)
    target = path(destination)
    fs = target.fs
    temporary = target.parent / temporary_name(target.name)
    try:
        retrying(destination, lambda: fs.put_file(os.fspath(local_file), temporary.path))
        if protocol(destination) in _OBJECT_STORES:  # no rename: a server-side copy, then the delete
            retrying(destination, lambda: fs.cp_file(temporary.path, target.path))
            retrying(destination, lambda: fs.rm_file(temporary.path), missing_is_final=True)
        else:
            retrying(destination, lambda: fs.mv(temporary.path, target.path))
    except BaseException:
        try:
            fs.rm_file(temporary.path)
        except Exception:  # never written, or the connection is gone: a later sweep removes it
            pass
        raise
    fs.invalidate_cache(target.parent.path)


def make_folder(location) -> None:
    """Create a local folder (and its parents); nothing for object stores, which have no folders."""
    if not is_url(location):
        _local(location).mkdir(parents=True, exist_ok=True)
        return
    writable(location)
    target = path(location)
    if protocol(location) in BACKENDS:
        return
    retrying(location, lambda: target.fs.makedirs(target.path, exist_ok=True))


def remove(location) -> bool:
    """Delete a file; False when there was none."""
    if not is_url(location):
        try:
            _local(location).unlink()
            return True
        except FileNotFoundError:
            return False
    target = path(location)
    try:
        retrying(location, lambda: target.fs.rm_file(target.path), missing_is_final=True)
    except FileNotFoundError:
        return False
    return True


def remove_tree(location) -> None:
    """Delete a folder and everything under it (nothing when it does not exist)."""
    if not is_url(location):
        shutil.rmtree(_local(location), ignore_errors=True)
        return
    target = path(location)
    if retrying(location, target.exists):
        retrying(location, lambda: target.fs.rm(target.path, recursive=True))


def sweep_temporaries(folder, names: Iterable[str] | None = None) -> list[str]:
    """Remove the temporary files that killed writers left in ``folder``.

    Only temporaries of ``names`` (the final file names this writer owns) are touched,
    so a writer never removes another's work in progress; ``names=None`` takes every
    temporary in ``folder``. Returns the names removed.
    """
    wanted = None if names is None else set(names)
    removed = []
    for name, entry in list_files(folder).items():
        match = _TEMPORARY.match(name)
        if match is None or (wanted is not None and match.group("name") not in wanted):
            continue
        if remove(entry):
            removed.append(name)
    return removed


def is_temporary(name: str) -> bool:
    return _TEMPORARY.match(name) is not None


def temporary_target(name: str) -> str | None:
    """The file name a temporary named ``name`` was becoming (:func:`temporary_name`), or None."""
    match = _TEMPORARY.match(name)
    return None if match is None else match.group("name")


SOURCE_FILE = "SOURCE"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """Where unicom keeps what it downloads or derives: ``cache``, else ``$UNICOM_CACHE``,
    else ``$XDG_CACHE_HOME/unicom``, else ``~/.cache/unicom``."""
    if cache:
        return Path(cache).expanduser()
    if os.environ.get("UNICOM_CACHE"):
        return Path(os.environ["UNICOM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "unicom"
    return Path("~/.cache/unicom").expanduser()


def cache_folder(folder, cache: str | os.PathLike | None = None) -> Path:
    """The local folder that keeps a copy of the remote ``folder`` (created, with a
    ``SOURCE`` file naming the URL): under :func:`cache_root`, in ``remote/``."""
    import hashlib

    root = cache_root(cache) / "remote"
    local = root / hashlib.sha256(text(folder).encode()).hexdigest()[:16]
    try:
        local.mkdir(parents=True, exist_ok=True)
        (local / SOURCE_FILE).write_text(text(folder) + "\n")
    except OSError as error:
        raise InputError(f"{local}: the cache folder cannot be written ({describe(error)}) to keep a copy of "
                         f"{text(folder)}; set UNICOM_CACHE to a folder that can be") from error
    return local


# keys of fsspec's file information that change when a file is written again, by store (an HTTP server without
# ETags, such as python -m http.server, still sends Last-Modified)
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "blob_id", "LastModified", "last_modified", "updated", "mtime", "created",
                 "Last-Modified")
_SIGNATURES = ".signatures.json"


def _signature(info: dict) -> list:
    """Size and version of a remote file (its ETag, hash or modification time, where the store gives one)."""
    version = next((info[key] for key in _VERSION_KEYS if info.get(key) is not None), None)
    return [int(info.get("size") or 0), str(version) if version is not None else None]


def download(location, local: str | os.PathLike) -> None:
    """The file at the URL ``location`` written to the local path ``local`` (retried)."""
    fs, inner = filesystem(location)
    retrying(location, lambda: fs.get_file(inner, os.fspath(local)))


def cached_copy(folder, names: Iterable[str], cache: str | os.PathLike | None = None, refresh: Iterable[str] = ()) -> Path:
    """A local copy of the files ``names`` of the remote ``folder``, kept in a cache
    folder (default :func:`cache_root`, under ``remote/``) and
    fetched again when the file changed: its size, or its version where the store gives one
    (ETag, content hash or modification time; recorded beside the copies). ``refresh``: always
    fetched. Returns the local folder."""
    local = cache_folder(folder, cache)
    base = path(folder)
    refresh = set(refresh)
    record = local / _SIGNATURES
    try:
        signatures = json.loads(record.read_text())
    except (OSError, ValueError):
        signatures = {}
    for name in names:
        source, target = base / name, local / name
        if name not in refresh:
            signature = _signature(retrying(source, lambda: source.fs.info(source.path)))
            if target.is_file() and target.stat().st_size == signature[0] and signatures.get(name) == signature:
                continue
        else:
            signature = None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            download(source, temporary)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        if signature is not None:
            signatures[name] = signature
    temporary = local / f"{_SIGNATURES}.tmp"  # one name: a killed write leaves nothing that piles up
    temporary.write_text(json.dumps(signatures))
    os.replace(temporary, record)
    return local


__all__ = [
    "FetchError",
    "TooLarge",
    "Retries",
    "RemoteArray",
    "RangedFile",
    "absolute",
    "braces",
    "cache_folder",
    "cache_root",
    "cached_copy",
    "configure",
    "exists",
    "filesystem",
    "file_version",
    "find_files",
    "gather",
    "glob",
    "has_magic",
    "is_dir",
    "is_file",
    "is_pipe",
    "is_url",
    "join",
    "name",
    "list_files",
    "list_folders",
    "load_npy",
    "make_folder",
    "open_stream",
    "parent",
    "resolve",
    "options_for",
    "path",
    "prefetch",
    "drop_prefetched",
    "download",
    "protocol",
    "read_bytes",
    "read_range",
    "read_text",
    "readable",
    "recorded",
    "remove",
    "remove_tree",
    "retries",
    "retrying",
    "serves_ranges",
    "size",
    "sweep_temporaries",
    "temporary_name",
    "text",
    "transient",
    "upload_atomic",
    "writable",
]
