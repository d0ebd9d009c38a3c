"""Webdataset tar shards, as written by img2dataset: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``.

A shard is a tar file; consecutive members that share a *key* (the member path up to the
first dot of its file name, ``000012345.jpg`` -> ``000012345``) form one sample, and the
rest of the name is the member's *extension* (``jpg``, ``txt``, ``json``). Shard lists are
given as paths, brace patterns (``shards/{00000..00099}.tar``), globs or a folder, and are
ordered by the number in the file name, so ``9.tar`` comes before ``10.tar``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from unicom.errors import InputError
from unicom.files import part_number

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MEMBER = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a webdataset member name (``"dir/000123.jpg"`` ->
    ``("dir/000123", "jpg")``): the key ends at the first dot of the file name, the
    extension (lower-cased) is everything after it; None for names without one."""
    match = _MEMBER.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def _expand_one(pattern: str) -> list[Path]:
    from braceexpand import braceexpand

    found: list[Path] = []
    for path in braceexpand(pattern):
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise InputError(f"{path}: no file matches this pattern")
            found.extend(Path(m) for m in matches)
        elif os.path.isdir(path):
            inside = sorted(p for p in Path(path).iterdir() if p.name.endswith(SHARD_SUFFIXES))
            if not inside:
                raise InputError(f"{path}: the folder holds no {'/'.join(SHARD_SUFFIXES)} shards")
            found.extend(inside)
        elif os.path.isfile(path):
            found.append(Path(path))
        else:
            raise InputError(f"{path}: shard not found (from the input {pattern!r}); check the path or the pattern")
    return found


def expand_shards(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths from paths, brace patterns, globs or folders, in numeric order.

    Every listed file must exist; duplicates are dropped. Raises :class:`InputError` for a
    missing shard, an empty pattern, or two shards whose names carry the same number (their
    output parts would collide).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: dict[str, Path] = {}
    for pattern in patterns:
        for path in _expand_one(os.fspath(pattern)):
            paths.setdefault(os.path.realpath(path), path)
    if not paths:
        raise InputError("no shards were given")
    numbered: dict[int, Path] = {}
    for path in paths.values():
        number = part_number(path)
        if number in numbered:
            raise InputError(
                f"{numbered[number]} and {path} carry the same number {number}; every shard becomes the output part "
                "of its number, so give shards with distinct numbers in their names"
            )
        numbered[number] = path
    return [numbered[n] for n in sorted(numbered)]


@dataclass
class TarSample:
    """The members of one sample: ``files`` maps extension (lower case) -> bytes."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    def image_bytes(self) -> bytes | None:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.files:
                return self.files[ext]
        return None

    def caption(self) -> str | None:
        data = self.files.get("txt")
        return None if data is None else data.decode("utf-8", errors="replace").strip()

    def json(self) -> dict:
        """The parsed ``{key}.json``, or ``{}`` when absent or unreadable."""
        data = self.files.get("json")
        if data is None:
            return {}
        try:
            value = json.loads(data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class ShardReadError(Exception):
    """The tar file broke off or is not a tar; ``samples`` were read before that."""

    def __init__(self, path: Path, samples: int, reason: str):
        super().__init__(f"{path}: unreadable after {samples} samples ({reason})")
        self.path, self.samples, self.reason = path, samples, reason


def read_tar_samples(path: str | os.PathLike) -> Iterator[TarSample]:
    """Samples of a webdataset shard, in tar order (streamed, compressed tars included).

    Members without an extension, and directories, are skipped. A damaged tar yields the
    samples before the damage, then raises :class:`ShardReadError`.
    """
    path = Path(path)
    current: TarSample | None = None
    count = 0
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = split_member_name(member.name)
                if split is None:
                    continue
                key, ext = split
                if current is not None and key != current.key:
                    yield current
                    count += 1
                    current = None
                if current is None:
                    current = TarSample(key)
                handle = tar.extractfile(member)
                current.files[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        if current is not None and current.files:  # the members read completely before the damage
            yield current
            count += 1
        raise ShardReadError(path, count, f"{type(error).__name__}: {error}") from error
    if current is not None:
        yield current

