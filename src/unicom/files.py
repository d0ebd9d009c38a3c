"""File helpers shared by every stage: atomic writes and numbered part files.

Every output of the pipeline is written under a temporary name in the same folder and
renamed into place, so a killed job never leaves a half-written file under a final name.
Destinations may be URLs (``s3://…``, see :mod:`unicom.storage`): the file is written
locally (in a staging folder of the system's temporary directory, where the next write
removes what killed writers left), uploaded under a temporary name beside the destination
and renamed there.
A writer that starts again removes its own temporaries first (:func:`sweep_temporaries`).
Part files (``img_emb_7.npy``, ``labels_00012.parquet``) are ordered by the number in
their name, parsed as an integer, so zero-padded and unpadded names sort alike.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import socket
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from unicom import storage
from unicom.errors import InputError


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on the local file ``lock_path`` (created if missing), across
    processes: one writer at a time; the lock goes with its process, killed or not. Yields
    True, or False where the system has no ``fcntl`` (not POSIX) and nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary local path; on success it becomes ``path``, whole.

    Locally the temporary file is beside ``path`` and renamed; for a URL it is uploaded
    with :func:`unicom.storage.upload_atomic`. Its name ends in ``.tmp``, not in ``path``'s
    suffix, so that readers listing ``*.npy`` or ``*.parquet`` (embedding-reader, autofaiss)
    never take a killed write's leftover for a part; write to it through an open file or a
    function that keeps the name as given (``np.save`` to a name adds ``.npy``). It is
    removed if the block raises.
    """
    if storage.is_url(path):
        storage.writable(path)
        target = storage.path(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}.{target.name}.", suffix=".tmp", dir=_staging_folder())
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            storage.upload_atomic(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _new_file_mode())  # mkstemp's 0o600 would hide the outputs from other users of a shared folder
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())  # again: a writer may have replaced the file (as safetensors' save_file does)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _staging_folder() -> Path:
    """Where writes to URLs are staged before their upload: a folder of the system's
    temporary directory, one per user and host (processes whose ids this one can check).
    A staged file is named ``{pid}.{name}.XXXXXXXX.tmp``; those of processes that are gone
    (killed during a write: a part of embeddings can be gigabytes) are removed here.
    Where that folder cannot be made, or is not this user's own (made by another user, a
    link, open to others' writes), files are staged in the temporary directory itself."""
    base = Path(tempfile.gettempdir())
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()  # no getuid: Windows
    folder = base / f"unicom-uploads-{user}-{socket.gethostname()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:  # a file of that name, a temporary directory that refuses folders
        return base
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()) or info.st_mode & 0o022:
        return base  # another's folder could swap a staged file before its upload
    for leftover in folder.glob("*.tmp"):
        pid = leftover.name.split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):  # removed by a concurrent writer, or not ours to remove
                leftover.unlink()
    return folder


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (another user's counts as running,
    and every process on Windows, where ``os.kill(pid, 0)`` would end it: it cannot tell)."""
    if sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or a system that cannot tell: keep its file
        return True
    return True


def remove_killed_writes(path) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` writes beside a local ``path``
    and a killed process left behind (``.NAME.XXXXXXXX.tmp``, as large as the file itself).

    Call it only where no other process may be writing ``path`` at the same time (under a
    lock, or in a folder that one writer owns). Returns the removed paths.
    """
    if storage.is_url(path):
        return []
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def save_torch(obj: Any, path) -> None:
    """``torch.save`` to a local ``path``; a write the disk refuses (full, a file-size limit),
    which torch's zip writer reports as a ``RuntimeError`` ("unexpected pos", "file write
    failed"), is an :class:`OSError` saying so."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as error:
        if "PytorchStreamWriter" not in str(error) and "inline_container" not in str(error):
            raise
        raise OSError(f"the write stopped short, as on a full disk ({str(error).splitlines()[0]})") from error


@contextlib.contextmanager
def refused_write(folder, what: str, rerun: str) -> Iterator[None]:
    """Writes of ``what`` under ``folder`` that the disk refuses (full, read-only, a file-size
    limit) end in an :class:`InputError` that says so and what to do, not a traceback;
    ``rerun``: what a run with room does (a failed fetch stays itself)."""
    try:
        yield
    except OSError as error:
        if isinstance(error, storage.FetchError):
            raise
        raise InputError(f"{storage.text(folder)}: {what} could not be written ({error}); free space there or write "
                         f"to another folder, then run again: {rerun}") from error


def save_safetensors(tensors, path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to a local ``path``, with the mode a plain write gives
    (``save_file`` replaces the file by one of mode 0o600, which would hide the weights
    from the other users of a shared folder)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as error:  # safetensors' own error type, also for a write the disk refuses
        if "I/O error" not in str(error):
            raise
        raise OSError(f"the write stopped short, as on a full disk ({error})") from error
    os.chmod(path, _new_file_mode())


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less this process's umask."""
    try:  # Linux says it without changing it
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_bytes_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to the local ``path`` and flush it to the disk (a temporary of
    :func:`atomic_path`, renamed by its caller)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_new_file_atomic(path: str | os.PathLike, head: bytes, rest=None) -> None:
    """Write ``head``, then what the open binary file ``rest`` holds from where it stands, to
    the local ``path``, whole or not at all, with as few system calls as a plain write: a
    temporary beside it (:func:`unicom.storage.temporary_name`, which :func:`sweep_temporaries`
    removes after a kill) created with the mode a plain ``open`` gives, then renamed. Not
    flushed to the disk: for many small files that a rerun writes again (copied images)."""
    import shutil

    path = os.fspath(path)
    folder, name = os.path.split(path)
    while True:
        tmp = os.path.join(folder, storage.temporary_name(name))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:  # another writer's temporary of the same name: draw another
            continue
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(head)
            if rest is not None:
                shutil.copyfileobj(rest, out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def json_text(obj: Any) -> str:
    """How every JSON file of the pipeline is written: indented, keys in their order."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        write_bytes_synced(tmp, data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))


def save_npy_atomic(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())


def write_parquet_atomic(path: str | os.PathLike, table, row_group_size: int | None = None) -> None:
    """Write a ``pyarrow.Table`` (or a pandas DataFrame) to parquet atomically; ``row_group_size``:
    the most rows per row group (default pyarrow's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


_NUMBER = re.compile(r"(\d+)")


def part_number(path: str | os.PathLike, prefix: str = "") -> int:
    """The integer in a part file's name: ``img_emb_0012.npy`` -> 12.

    With ``prefix``, the number must follow it directly (``prefix`` = ``"img_emb_"``).
    """
    name = storage.name(path)
    if prefix:
        if not name.startswith(prefix):
            raise InputError(f"{path}: expected a name starting with {prefix!r}")
        match = _NUMBER.match(name[len(prefix):])
    else:
        found = _NUMBER.findall(name)
        match = _NUMBER.match(found[-1]) if found else None
    if match is None:
        raise InputError(f"{path}: no part number in the file name (expected e.g. {prefix or 'part_'}0.npy)")
    return int(match.group(1))


def numbered_files(folder, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    """``(number, path)`` of every ``{prefix}{number}{suffix}`` in ``folder`` (a local
    folder or a URL, listed once), by number.

    Raises :class:`InputError` if the folder is missing or two files share a number
    (``x_7.npy`` and ``x_007.npy``).
    """
    entries = storage.list_files(folder)
    if not entries and not storage.is_dir(folder):
        raise InputError(f"{storage.text(folder)}: folder not found (expected files named {prefix}<N>{suffix})")
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    parts: dict[int, Path] = {}
    for name, entry in entries.items():
        match = pattern.match(name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in parts:
            raise InputError(
                f"{storage.text(folder)}: {parts[number].name} and {name} have the same part number {number}; keep one"
            )
        parts[number] = entry
    return sorted(parts.items())


def publish_together(out: Path, files: dict[str, Callable[[Path], None]], names: Sequence[str]) -> None:
    """Publish files under the local folder ``out`` as one set: ``files`` maps each file name
    to a function that writes its content to the path it is given; ``names`` are every name
    such a set may hold, its first the one that says a set is whole (written last).

    Every file is written under a temporary name first; then the earlier set's files are
    removed, ``names[0]`` first, and the new ones renamed into place, ``names[0]`` last. A run
    killed at any point leaves the earlier set whole, or files of this run alone (without
    ``names[0]`` until it is complete), never one run's file beside another's; the
    temporaries a killed run left are removed by the next.
    """
    out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out, names)  # what a killed run left
    with contextlib.ExitStack() as staged:
        # entered names[0] first, so that the stack, unwinding in reverse, renames it last;
        # a failed write or rename removes this run's temporaries as the stack unwinds
        order = sorted(files, key=lambda name: name != names[0])
        paths = {name: staged.enter_context(atomic_path(out / name)) for name in order}
        for name, path in paths.items():
            files[name](path)
        for name in names:  # the earlier set, names[0] first: it says a set is whole
            (out / name).unlink(missing_ok=True)


def sweep_temporaries(folder, names=None) -> list[str]:
    """Remove the temporaries that killed writers of ``names`` (final file names in
    ``folder``; None: any) left there, locally or at a URL; returns their names."""
    return storage.sweep_temporaries(folder, names)


def file_sha256(path: str | os.PathLike, chunk_size: int = 8 << 20) -> str:
    """The SHA-256 of a file's bytes, as lowercase hex, read in ``chunk_size`` pieces."""
    digest = hashlib.sha256()
    with storage.open_stream(path) as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
