"""The embedding folder layout that stages hand to each other (clip-retrieval's, with keys).

::

    ROOT/img_emb/img_emb_{i}.npy          (N_i, D) float16 or float32, one row per sample
    ROOT/text_emb/text_emb_{i}.npy        (N_i, D') the same samples, from the text tower
    ROOT/metadata/metadata_{i}.parquet    N_i rows: key, caption, path or url, width, height

Row ``r`` of every file of part ``i`` describes the same sample; the ``key`` column keeps
that link explicit so embeddings, metadata and pseudo-labels stay aligned. Part numbers are
integers parsed from the names (``img_emb_9`` before ``img_emb_10``). ``unicom embed``
writes this layout; ``cluster``, ``index`` and the UniFEx feature cache read it, and so
does anything that reads LAION's published embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unicom.errors import InputError
from unicom.files import numbered_files, save_npy_atomic, write_parquet_atomic

# kind -> (sub-folder, file prefix, suffix)
KINDS: dict[str, tuple[str, str, str]] = {
    "image": ("img_emb", "img_emb_", ".npy"),
    "text": ("text_emb", "text_emb_", ".npy"),
    "metadata": ("metadata", "metadata_", ".parquet"),
}
KEY_COLUMNS = ("key", "image_path", "url")


def part_path(folder: str | os.PathLike, kind: str, number: int) -> Path:
    """Path of part ``number`` of ``kind`` inside ``folder`` (the kind's own folder)."""
    _, prefix, suffix = KINDS[kind]
    return Path(folder) / f"{prefix}{number}{suffix}"


@dataclass
class EmbeddingFolders:
    """The folders of one collection: any of image, text and metadata may be absent."""

    image: Path | None = None
    text: Path | None = None
    metadata: Path | None = None

    @classmethod
    def from_root(cls, root: str | os.PathLike) -> "EmbeddingFolders":
        """The sub-folders ``img_emb``, ``text_emb`` and ``metadata`` of ``root`` that exist."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: folder not found (expected img_emb/, text_emb/ and metadata/ inside)")
        found = {kind: root / sub for kind, (sub, _, _) in KINDS.items() if (root / sub).is_dir()}
        if not found:
            raise InputError(f"{root}: none of img_emb/, text_emb/, metadata/ is inside; is this an embedding folder?")
        return cls(**found)

    def folder(self, kind: str) -> Path:
        folder = getattr(self, kind)
        if folder is None:
            raise InputError(f"no {KINDS[kind][0]} folder was given")
        return Path(folder)

    def present(self) -> list[str]:
        return [kind for kind in KINDS if getattr(self, kind) is not None]

    def files(self, kind: str) -> dict[int, Path]:
        folder = self.folder(kind)
        _, prefix, suffix = KINDS[kind]
        parts = dict(numbered_files(folder, prefix, suffix))
        if not parts:
            raise InputError(f"{folder}: no {prefix}<N>{suffix} files in this folder")
        return parts

    def numbers(self, kinds: list[str] | None = None) -> list[int]:
        """Part numbers, checked to be the same in every folder of ``kinds``."""
        kinds = kinds or self.present()
        listing = {kind: self.files(kind) for kind in kinds}
        reference_kind = kinds[0]
        reference = set(listing[reference_kind])
        for kind in kinds[1:]:
            other = set(listing[kind])
            if other != reference:
                missing = sorted(reference - other)[:5]
                extra = sorted(other - reference)[:5]
                raise InputError(
                    f"{self.folder(kind)} and {self.folder(reference_kind)} hold different parts: "
                    f"missing {missing}, extra {extra}; every part needs all of {kinds}"
                )
        return sorted(reference)

    def path(self, kind: str, number: int) -> Path:
        """The file of part ``number`` of ``kind``, its number zero-padded or not."""
        path = part_path(self.folder(kind), kind, number)
        if path.is_file():
            return path
        return self.files(kind).get(number, path)

    def load(self, kind: str, number: int, mmap: bool = True):
        """Part ``number`` of ``kind``: a (memory-mapped) array, or a ``pyarrow.Table``."""
        path = self.path(kind, number)
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        if kind == "metadata":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path)
            except Exception as error:  # pyarrow raises several types for damaged files
                raise InputError(f"{path}: not a readable parquet file ({error})") from error
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as error:
            raise InputError(f"{path}: not a readable .npy file ({error})") from error
        if array.ndim != 2:
            raise InputError(f"{path}: expected a 2-D array (rows, dimension), found shape {array.shape}")
        return array

    def num_rows(self, kind: str, number: int) -> int:
        if kind == "metadata":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path(kind, number)).metadata.num_rows
        return int(self.load(kind, number).shape[0])


def write_part(
    root: str | os.PathLike,
    number: int,
    *,
    image: np.ndarray | None = None,
    text: np.ndarray | None = None,
    metadata=None,
) -> None:
    """Write part ``number`` under ``root`` atomically, metadata last.

    The metadata file marks a finished part: a reader (or a resumed job) that sees it can
    rely on the embedding files beside it.
    """
    root = Path(root)
    for kind, array in (("image", image), ("text", text)):
        if array is not None:
            save_npy_atomic(part_path(root / KINDS[kind][0], kind, number), array)
    if metadata is not None:
        write_parquet_atomic(part_path(root / KINDS["metadata"][0], "metadata", number), metadata)


def part_complete(root: str | os.PathLike, number: int, kinds: list[str]) -> bool:
    root = Path(root)
    return all(part_path(root / KINDS[kind][0], kind, number).is_file() for kind in kinds)
