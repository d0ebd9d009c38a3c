"""Shards, as img2dataset writes them: webdataset tars (``{key}.jpg``, ``{key}.txt``,
``{key}.json``) or parquet files that hold the images (:mod:`unicom.data.parquet_shards`).

A tar shard is a tar file; consecutive members that share a *key* (the member path up to the
first dot of its file name, ``000012345.jpg`` -> ``000012345``) form one sample, and the
rest of the name is the member's *extension* (``jpg``, ``txt``, ``json``). Shard lists are
given as paths, brace patterns (``shards/{00000..00099}.tar``), globs or a folder, local or
URLs (``s3://bucket/{00000..00099}.tar``, ``https://…``, ``pipe:COMMAND``; see
:mod:`unicom.storage`), and are ordered by the number in the file name, so ``9.tar``
comes before ``10.tar``. A remote shard is decoded while it downloads.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from unicom import storage
from unicom.data.parquet_shards import DEFAULT_COLUMNS, PARQUET_SUFFIX
from unicom.data.transforms import MAX_IMAGE_BYTES, DecodeError, ImageTooLarge
from unicom.errors import InputError
from unicom.files import part_number

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_SUFFIXES = (*TAR_SUFFIXES, PARQUET_SUFFIX)
_MEMBER = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a webdataset member name (``"dir/000123.jpg"`` ->
    ``("dir/000123", "jpg")``): the key ends at the first dot of the file name, the
    extension (lower-cased) is everything after it; None for names without one.

    A name that is not UTF-8 (tarfile hands such bytes over as surrogate escapes, which no
    parquet file can hold) keeps those bytes as ``\\xNN`` escapes: ``caf\\xe9``.
    """
    if not name.isascii():
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    match = _MEMBER.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def shard_name(shard) -> str:
    """The file name of a shard location, which carries its number: the path's last
    component (without an http query), or for ``pipe:COMMAND`` that of the command's last
    word ending in a shard suffix (``pipe:curl -s https://host/00012.tar`` -> ``00012.tar``).
    The name in an http(s) URL is unquoted, as the server reads it (``shard%2000012.tar`` ->
    ``shard 00012.tar``, part 12, not 2000012); object store keys are taken as written."""
    if storage.is_pipe(shard):  # a quoted URL ('https://host/00012.tar') is the word inside the quotes
        words = [w.strip("'\"") for w in storage.text(shard)[len(storage.PIPE):].split()]
        named = [w for w in words if w.split("?", 1)[0].endswith(SHARD_SUFFIXES)] or words[-1:] or [""]
        word = named[-1].split("?", 1)[0]
        return _unquoted(word, word.rstrip("/").rsplit("/", 1)[-1])
    if storage.is_url(shard):
        location = storage.text(shard).split("?", 1)[0]
        return _unquoted(location, storage.name(location))
    return Path(shard).name


def written_name(shard) -> str:
    """A shard's file name as its location writes it: an http(s) name not unquoted (what the
    ``shard`` column of folders embedded before :func:`shard_name` unquoted names holds);
    otherwise :func:`shard_name`."""
    if storage.is_url(shard) and not storage.is_pipe(shard):
        return storage.name(storage.text(shard).split("?", 1)[0])
    return shard_name(shard)


_OF_TOTAL = re.compile(r"(?<=\d)-of-\d+(?=\.)")  # "train-00012-of-00100.tar": Hugging Face's "shard i of n" numbering


def shard_number(shard) -> int:
    """The part number of a shard: the last number in its name (:func:`shard_name`;
    ``laion-00012.tar`` -> 12), not counting a total after ``-of-`` (``train-00012-of-00100.tar``
    -> 12, not 100, which every shard of the set carries)."""
    name = shard_name(shard)
    try:
        return part_number(_OF_TOTAL.sub("", name))
    except InputError:
        raise InputError(f"{storage.text(shard)}: no number in the shard's name {name!r}; each shard is the output "
                         "part of the number in its name: rename the shards with their numbers (00000.tar, "
                         "00001.tar, ...)") from None


def _unquoted(location: str, name: str) -> str:
    """``name``, the last component of ``location``, percent-decoded when ``location`` is an http(s) URL."""
    return urllib.parse.unquote(name) if storage.protocol(location) in storage.READ_ONLY else name


def in_folder(names) -> list:
    """The shards among a folder's file ``names``: its tars, or when it has none its parquet
    files (img2dataset writes a parquet of metadata beside each tar, which holds no images)."""
    tars = [name for name in names if name.endswith(TAR_SUFFIXES)]
    return tars or [name for name in names if name.endswith(PARQUET_SUFFIX)]


def _folder_shards(folder) -> list:
    listed = storage.list_files(folder)
    return [listed[name] for name in in_folder(sorted(listed))]


def _no_bucket(location) -> str:
    """"; the bucket … does not exist" when the store says so, else ""."""
    bucket = storage.missing_bucket(location)
    return f"; the bucket {bucket} does not exist (or these credentials cannot see it): check its name" if bucket else ""


def _expand_one(pattern: str) -> list:
    found: list = []
    listings: dict[str, set[str]] = {}  # remote folder -> its file names, listed once
    for path in storage.braces(pattern):
        if storage.is_pipe(path):  # a command: its output is the shard
            found.append(path)
        elif storage.has_magic(path):
            matches = storage.glob(path)
            if not matches:
                raise InputError(f"{path}: no file matches this pattern")
            found.extend(m if storage.is_url(m) else Path(m) for m in matches)
        elif storage.is_url(path):
            name = shard_name(path)
            if not name.endswith(SHARD_SUFFIXES):  # a folder of shards
                inside = _folder_shards(path)
                if not inside:
                    images = ("; over http(s) a folder is read as a folder of shards only: give the images as a CSV list "
                              "of their URLs") if storage.protocol(path) in storage.READ_ONLY else ""
                    raise InputError(f"{path}: no {'/'.join(SHARD_SUFFIXES)} shards in this folder (or it does not exist)"
                                     + _no_bucket(path) + images)
                found.extend(storage.text(entry) for entry in inside)
                continue
            if storage.protocol(path) not in storage.READ_ONLY:  # listable: check, one listing per folder
                folder = path[: -len(name)]
                if folder not in listings:
                    listings[folder] = set(storage.list_files(folder))
                if name not in listings[folder]:
                    # nothing listed: the folder itself may be refused (a misspelt or private repository, a
                    # bucket policy), which the existence check names with what to check
                    absent = not listings[folder] and not storage.is_dir(folder.rstrip("/"))
                    where = (_no_bucket(folder) or f"; the folder {folder} holds no files") if absent else ""
                    raise InputError(f"{path}: shard not found (from the input {pattern!r}){where}; check the URL or the pattern")
            found.append(path)  # http(s): fetched (and retried) when its part is read
        elif os.path.isdir(path):
            inside = [Path(path) / name for name in in_folder(sorted(p.name for p in Path(path).iterdir() if p.is_file()))]
            if not inside:
                raise InputError(f"{path}: the folder holds no {'/'.join(SHARD_SUFFIXES)} shards")
            found.extend(inside)
        elif os.path.isfile(path):
            found.append(Path(path))
        else:
            raise InputError(f"{path}: shard not found (from the input {pattern!r}); check the path or the pattern")
    return found


def expand_shards(patterns, instead: str = "") -> list:
    """Shard locations from paths, brace patterns, globs or folders, in numeric order:
    a ``Path`` for a local shard, the URL (a ``str``) for a remote one.

    Every listed local file must exist (remote ones on a listable store too); duplicates
    are dropped. Raises :class:`InputError` for a missing shard, an empty pattern, a file
    that is not a shard (``instead``: what else the caller takes, for the message), or two
    shards whose names carry the same number (their output parts would collide).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: dict[str, object] = {}
    for pattern in patterns:
        for path in _expand_one(os.fspath(pattern)):
            paths.setdefault(storage.text(path) if storage.is_url(path) else os.path.realpath(path), path)
    if not paths:
        raise InputError("no shards were given")
    foreign = [path for path in paths.values() if not storage.is_pipe(path) and not shard_name(path).endswith(SHARD_SUFFIXES)]
    if foreign:
        raise InputError(f"{storage.text(foreign[0])}: not a shard ({'/'.join(SHARD_SUFFIXES)}){instead}")
    numbered: dict[int, object] = {}
    for path in paths.values():
        number = shard_number(path)
        if number in numbered:
            beside = ("; img2dataset writes a parquet of metadata beside each tar: give the tars alone (*.tar)"
                      if is_parquet(path) != is_parquet(numbered[number]) else "")
            raise InputError(
                f"{numbered[number]} and {path} carry the same number {number}; every shard becomes the output part "
                f"of its number, so give shards with distinct numbers in their names{beside}"
            )
        numbered[number] = path
    return [numbered[n] for n in sorted(numbered)]


@dataclass
class TarSample:
    """The members of one sample: ``files`` maps extension (lower case) -> bytes, or to a
    :class:`unicom.data.transforms.DecodeError` for a member longer than
    :data:`unicom.data.transforms.MAX_IMAGE_BYTES`, which is not read (its image fails with
    that reason; its caption or JSON counts as absent). ``image_ext``: the extension of the
    image member (``--image-column``; None: the first of :data:`IMAGE_EXTENSIONS` there is);
    ``caption_ext``: that of the caption (``--caption-column``; ``txt``)."""

    key: str
    files: dict[str, bytes | DecodeError] = field(default_factory=dict)
    image_ext: str | None = None
    caption_ext: str = "txt"

    def image_bytes(self) -> bytes | DecodeError | None:
        if self.image_ext is not None:
            return self.files.get(self.image_ext)
        for ext in IMAGE_EXTENSIONS:
            if ext in self.files:
                return self.files[ext]
        return None

    def _text(self, ext: str) -> bytes | None:
        data = self.files.get(ext)
        return data if isinstance(data, bytes) else None

    def caption(self) -> str | None:
        data = self._text(self.caption_ext)
        return None if data is None else data.decode("utf-8", errors="replace").strip()

    def json(self) -> dict:
        """The parsed ``{key}.json``, or ``{}`` when absent or unreadable."""
        data = self._text("json")
        if data is None:
            return {}
        try:
            value = json.loads(data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def member_extension(name: str, option: str) -> str:
    """A tar member's extension as ``--image-column`` / ``--caption-column`` name it for tar
    shards (``webp``, ``.caption.txt``): without a leading dot, in lower case (as
    :func:`split_member_name` gives them); an :class:`InputError` naming ``option`` for one
    that no member name can end in."""
    ext = name[1:] if name.startswith(".") else name
    if not ext or "/" in ext or ext.startswith("."):
        raise InputError(f"{option} {name!r}: for tar shards, the extension of the samples' members that hold it "
                         "(webp, caption.txt: 000123.webp, 000123.caption.txt)")
    return ext.lower()


class ShardReadError(Exception):
    """The tar file broke off, is not a tar, or could not be fetched (``fetch``, after the
    retries of :mod:`unicom.storage`); ``samples`` were read before that."""

    def __init__(self, path, samples: int, reason: str, fetch: bool = False):
        super().__init__(f"{path}: unreadable after {samples} samples ({reason})")
        self.path, self.samples, self.reason, self.fetch = path, samples, reason, fetch


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: what tarfile's "r|*" opens


def not_a_tar(path) -> str | None:
    """Why the local shard ``path`` cannot be read as a tar, seen from its first 512 bytes (a
    tar header, or the start of a gzip/bzip2/xz stream), or None when it may be one. A tar
    damaged further on (a truncated download) passes: that shows only when it is read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(tarfile.BLOCKSIZE)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return _not_a_tar_head(head, os.path.getsize(path))


def _not_a_tar_head(head: bytes, size: int | None = None) -> str | None:
    """Why a file whose first 512 bytes are ``head`` (``size`` bytes in all, when known) is
    not a tar, or None when it may be one."""
    if head.startswith(_COMPRESSED_MAGIC[0]):  # gzip: what the stream starts with (an error page served compressed)
        inner = _gunzipped_head(head)
        if inner is None:
            return None
        why = _not_a_tar_head(inner)
        return None if why is None else why.replace("not a tar file: it", "not a tar file: it is gzip-compressed and", 1)
    if head.startswith(_COMPRESSED_MAGIC):
        return None
    if not head:
        return "not a tar file: the file is empty"
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:  # a block of zeros: an empty tar
        return None
    except tarfile.HeaderError:
        shown = head[:40].decode("ascii", "replace")
        length = f"is {size:,} bytes and " if size is not None else ""
        return f"not a tar file: it {length}does not start with a tar header but with {shown!r}"
    return None


def _gunzipped_head(head: bytes) -> bytes | None:
    """The first 512 bytes that the gzip stream starting with ``head`` holds, or None when
    ``head`` does not give a whole block (nothing is judged from less)."""
    import zlib

    try:
        inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, tarfile.BLOCKSIZE)
    except zlib.error:
        return None  # a damaged stream: tarfile names it when the shard is read
    return inner if len(inner) == tarfile.BLOCKSIZE else None


class _HeadKept:
    """A stream that keeps the first 512 bytes read from it (to say why it is not a tar)."""

    def __init__(self, raw):
        self.raw, self.head = raw, b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < tarfile.BLOCKSIZE:
            self.head += data[: tarfile.BLOCKSIZE - len(self.head)]
        return data


def _fetch_error(error: BaseException | None) -> storage.FetchError | None:
    """The download failure behind ``error`` (tarfile may wrap it), if any."""
    while error is not None:
        if isinstance(error, storage.FetchError):
            return error
        error = error.__cause__ or error.__context__
    return None


class TruncatedTarError(tarfile.ReadError):
    """The tar stream ended where a member header belongs, without the end-of-archive blocks."""


class _EndCheckingTarInfo(tarfile.TarInfo):
    """A tar header that tells the end of the archive (a block of zeros) from the end of the
    file: tarfile takes a file that stops at, or inside, a member header for a complete tar,
    and the samples after the cut of a truncated download would be lost without a word."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise TruncatedTarError("the file ends without the end-of-archive blocks, at or inside a member header "
                                "(a truncated download?)") from None

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except TruncatedTarError:
            if tar.fileobj.tell() == 0:  # not one byte came
                raise TruncatedTarError("the file is empty (a download that stopped before its first byte?)") from None
            raise


def is_parquet(shard) -> bool:
    """Whether ``shard`` is a parquet shard (by its name), not a tar."""
    return not storage.is_pipe(shard) and shard_name(shard).endswith(PARQUET_SUFFIX)


def read_shard_samples(path, keys=None, columns=None) -> Iterator[TarSample]:
    """Samples of a shard, a tar (:func:`read_tar_samples`) or a parquet file that holds the
    images (:func:`unicom.data.parquet_shards.read_parquet_samples`), with the same ``keys``
    and the same :class:`ShardReadError` after the samples read before damage. ``columns``
    (:class:`unicom.data.parquet_shards.ShardColumns`, None for the usual names): the
    columns of a parquet shard, or the extensions of a tar's image and caption members; a
    tar with a key column named is an :class:`InputError` (:func:`check_shard_columns`)."""
    if is_parquet(path):
        from unicom.data.parquet_shards import read_parquet_samples

        return read_parquet_samples(path, keys, columns or DEFAULT_COLUMNS)
    check_shard_columns([path], columns)
    return read_tar_samples(path, keys, columns)


def check_shard_columns(paths: Sequence[Any], columns) -> None:
    """Refuse a key column named in ``columns`` (a :class:`unicom.data.parquet_shards.ShardColumns`)
    for shards of which one is a tar, whose samples' keys are its members' names; the image and
    caption columns of a tar are its members' extensions (:func:`member_extension`), checked."""
    tar = next((path for path in paths if not is_parquet(path)), None)
    if tar is None or columns is None:
        return
    if columns.key is not None:
        raise InputError(f"{storage.text(tar)}: a tar shard, whose samples' keys are its members' names (000123 of "
                         f"000123.jpg); the key column named ({columns.key!r}) is a column of parquet shards: leave it out")
    for option, name in (("--image-column", columns.image), ("--caption-column", columns.caption)):
        if name is not None:
            member_extension(name, option)


def prefetch_shard(path, columns=None) -> None:
    """Start reading the remote shard ``path`` now (a tar's download, a parquet file's footer
    and first row groups), for the :func:`read_shard_samples` call that reads it next, whole,
    with the same ``columns``; nothing for a local shard or None."""
    if path is not None and is_parquet(path):
        from unicom.data.parquet_shards import prefetch

        prefetch(path, columns or DEFAULT_COLUMNS)
    else:
        storage.prefetch(path)


def drop_prefetched() -> None:
    """Stop the shards started by :func:`prefetch_shard` and never read (this process)."""
    from unicom.data import parquet_shards

    storage.drop_prefetched()
    parquet_shards.drop_prefetched()


def not_a_shard(path) -> str | None:
    """Why the local shard ``path`` cannot be read (:func:`not_a_tar`, or for a parquet shard
    :func:`unicom.data.parquet_shards.not_a_parquet`), or None when it may be one."""
    if is_parquet(path):
        from unicom.data.parquet_shards import not_a_parquet

        return not_a_parquet(path)
    return not_a_tar(path)


def read_tar_samples(path, keys=None, columns=None) -> Iterator[TarSample]:
    """Samples of a webdataset shard, in tar order (streamed, compressed tars included);
    ``path`` is a local path, a URL or ``pipe:COMMAND`` (read while it downloads).

    Members without an extension, and directories, are skipped; a member whose key and
    extension the sample already has begins a new sample with that key. ``keys``: read only the
    samples with these keys (the data of other members is skipped, not kept) and stop
    once all of them are read. ``columns`` (:class:`unicom.data.parquet_shards.ShardColumns`):
    its image and caption name the extensions of the members that hold them (:class:`TarSample`).
    A damaged tar, or one whose download failed for good, yields the samples before the
    damage, then raises :class:`ShardReadError`.
    """
    path = path if storage.is_url(path) else Path(path)
    image_ext = None if columns is None or columns.image is None else member_extension(columns.image, "--image-column")
    caption_ext = "txt" if columns is None or columns.caption is None else member_extension(columns.caption,
                                                                                            "--caption-column")
    remaining = None if keys is None else set(keys)
    current: TarSample | None = None
    count, kept = 0, None
    try:
        with storage.open_stream(path) as raw, tarfile.open(fileobj=(kept := _HeadKept(raw)), mode="r|*",
                                                             tarinfo=_EndCheckingTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = split_member_name(member.name)
                if split is None:
                    continue
                key, ext = split
                # a member the sample already has (a file added to the tar twice) begins another
                # sample of the same key, as a key met again later does: neither file is dropped
                if current is not None and (key != current.key or ext in current.files):
                    yield current
                    count += 1
                    current = None
                    if remaining is not None and not remaining:
                        return
                if current is None and remaining is not None and key not in remaining:
                    continue  # tarfile skips the member's data
                if current is None:
                    current = TarSample(key, image_ext=image_ext, caption_ext=caption_ext)
                    if remaining is not None:
                        remaining.discard(key)
                if member.size > MAX_IMAGE_BYTES:  # not read: tarfile skips its data
                    current.files[ext] = ImageTooLarge(f"shard member {member.name} of {member.size:,} bytes, longer than "
                                                     f"the {MAX_IMAGE_BYTES:,} bytes a sample's file may have")
                    continue
                handle = tar.extractfile(member)
                current.files[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        if current is not None and current.files:  # the members read completely before the damage
            yield current
            count += 1
        fetch = _fetch_error(error)
        if fetch is not None:
            tries = f" (after {fetch.attempts} attempts)" if fetch.attempts > 1 else ""
            raise ShardReadError(path, count, f"fetch failed: {fetch.reason}{tries}", True) from error
        # nothing read: an error page or another file under the shard's name says so in its first bytes
        why = _not_a_tar_head(kept.head) if count == 0 and kept is not None and kept.head else None
        raise ShardReadError(path, count, why or f"{type(error).__name__}: {error}") from error
    if current is not None:
        yield current
