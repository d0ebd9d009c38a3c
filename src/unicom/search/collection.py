"""The collection an index is built from: an embedding folder's embeddings as rows.

Rows are the image (or text) embeddings of the complete parts of an embedding folder
(:mod:`unicom.formats.embeddings`, which lists and checks the parts), in part order.
Ids are row numbers in that order: part ``i``'s row ``r`` has id ``first_id(i) + r``.
Every row is read as its first ``dims`` dimensions re-normalised to unit length
(:func:`first_dims`), in blocks of :data:`BLOCK_ROWS` rows.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError
from unicom.formats.embeddings import EmbeddingFolders
from unicom.progress import progress

BLOCK_ROWS = 65536  # rows read, normalised and added at once


PART_FIX = "re-embed that part or drop the row"
QUERY_FIX = "a query needs finite numbers, not all zero, in the dimensions the index searches"


def first_dims(embeddings: np.ndarray, dims: int, where: str = "embeddings", rows=0, fix: str = PART_FIX) -> np.ndarray:
    """The first ``dims`` columns of (N, D) ``embeddings``, rows re-normalised: float32 (N, dims).

    Raises :class:`InputError` naming ``where`` and the row, and saying ``fix``, for non-finite
    values (after the conversion to float32) or rows whose first ``dims`` values are all zero;
    ``rows`` gives the row numbers to name (an offset, or one number per row). Rows whose
    squares overflow or underflow float32 (values near 1e20, or 1e-25) are normalised in float64.
    """
    x = np.array(embeddings[:, :dims], dtype=np.float32, copy=True, order="C")
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(x, axis=1)
    odd = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(odd):
        wide = x[odd].astype(np.float64)
        wide_norms = np.linalg.norm(wide, axis=1)
        bad = ~np.isfinite(wide_norms) | (wide_norms == 0)
        if bad.any():
            position = int(odd[np.flatnonzero(bad)[0]])
            row = int(rows[position]) if np.ndim(rows) else int(rows) + position
            problem = "holds NaN or infinite values" if not np.isfinite(norms[position]) else (
                f"is zero in its first {dims} dimensions and cannot be normalised")
            raise InputError(f"{where}: row {row} {problem}; {fix}")
        x[odd] = wide / wide_norms[:, None]
        norms[odd] = 1.0
    x /= norms[:, None]
    return x


@dataclass
class Part:
    """One part of the collection in the index: its number, rows and the id of its first row;
    ``file``: its metadata file in the index folder, when the layout does not derive it from the number."""

    number: int
    rows: int
    first_id: int
    file: str | None = None

    def as_dict(self) -> dict:
        shown = {"number": self.number, "rows": self.rows, "first_id": self.first_id}
        return shown if self.file is None else {**shown, "file": self.file}


class Collection:
    """The complete parts of an embedding folder, in part order, with their row ids.

    Parts are listed and checked by :meth:`~unicom.formats.embeddings.EmbeddingFolders.contents`:
    unfinished parts (embeddings without their metadata file yet) are left out with a
    warning, so an index can be built while ``unicom embed`` runs and grow later; damaged
    parts are an error. Without a metadata folder every image part counts. ``skip``: part
    numbers to leave out (those an index holds already); ids start at ``first_id``.
    ``modalities``: the embedding kinds read (``image``, ``text``; every part needs each);
    rows are those of ``modality`` (the first), :meth:`with_modality` gives the others.
    """

    def __init__(self, root: str | os.PathLike, first_id: int = 0, skip: Sequence[int] = (),
                 modalities: Sequence[str] = ("image",)):
        self.root = storage.path(root)
        self.folders = EmbeddingFolders.from_root(root)
        self.modalities = tuple(modalities)
        self.modality = self.modalities[0]
        self.contents = self.folders.contents(self.modalities, allow_unfinished=True)
        self.has_metadata = "metadata" in self.contents.kinds
        self.dim: int | None = self.contents.dimensions.get(self.modality)
        skipped = set(skip)
        self.parts: list[Part] = []
        next_id = first_id
        for part in self.contents.parts:
            if part.number not in skipped:
                self.parts.append(Part(part.number, part.rows, next_id))
                next_id += part.rows

    @property
    def num_rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def with_modality(self, modality: str) -> "Collection":
        """The same parts and ids, with the rows of ``modality`` (one of :attr:`modalities`)."""
        if modality not in self.modalities:
            raise InputError(f"{self.root}: {modality} embeddings were not read; list them in modalities")
        other = copy.copy(self)
        other.modality = modality
        other.dim = self.contents.dimensions.get(modality)
        return other

    def where(self, number: int) -> str:
        return str(self.contents.path(self.modality, number))

    def blocks(self, dims: int, desc: str = "") -> Iterator[tuple[int, np.ndarray]]:
        """(first id, float32 (B, dims) unit rows) for consecutive blocks of every part."""
        bar = progress(total=self.num_rows, desc=desc, unit="vec") if desc else None
        for part in self.parts:
            array = self.contents.load(self.modality, part.number)
            for start in range(0, part.rows, BLOCK_ROWS):
                block = first_dims(array[start:start + BLOCK_ROWS], dims, self.where(part.number), start)
                yield part.first_id + start, block
                if bar is not None:
                    bar.update(len(block))
        if bar is not None:
            bar.close()

    def gather(self, ids: np.ndarray, dims: int) -> np.ndarray:
        """Rows ``ids`` (sorted int64) as float32 (len(ids), dims) unit vectors."""
        out = np.empty((len(ids), dims), dtype=np.float32)
        starts = np.array([part.first_id for part in self.parts], dtype=np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        for index in np.unique(which):
            part = self.parts[int(index)]
            selected = np.flatnonzero(which == index)
            local = ids[selected] - part.first_id
            array = self.contents.load(self.modality, part.number)
            out[selected] = first_dims(array[local], dims, self.where(part.number), local)
        return out

    def metadata(self, part: Part):
        """Part's metadata as a ``pyarrow.Table``, or None when the collection has none."""
        return self.contents.load("metadata", part.number) if self.has_metadata else None


def exact_neighbours(collection: Collection, queries: np.ndarray, k: int, dims: int, exclude: np.ndarray) -> np.ndarray:
    """The exact k nearest neighbours (inner product) of each query among the collection's
    rows, leaving out the ids ``exclude`` (sorted int64: the held-out rows, queries included).

    Returns int64 (Q, k) ids, -1 where fewer rows remain. One pass over the collection: each
    block's top k is merged into the running top k, equal scores ranking the lower id first.
    """
    import torch

    from unicom.evaluate.metrics import knn_search, ranked_top_k

    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for first_id, block in collection.blocks(dims, desc="exact search"):
        ids = np.arange(first_id, first_id + len(block), dtype=np.int64)
        kept = ~np.isin(ids, exclude, assume_unique=True)
        if not kept.any():
            continue
        block, ids = block[kept], ids[kept]
        scores, local = knn_search(queries, block, min(k, len(block)))
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids[local]], axis=1)
        # earlier columns hold lower ids, so ranked_top_k's tie rule ranks lower ids first
        best_scores, order = (t.numpy() for t in ranked_top_k(torch.from_numpy(scores), k))
        best_ids = np.take_along_axis(ids, order, axis=1)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    out[:, : best_ids.shape[1]] = best_ids
    return out

