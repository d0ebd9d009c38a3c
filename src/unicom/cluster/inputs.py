"""What k-means reads: embedding shards checked, fused into unit rows, streamed in chunks.

Shards are memory-mapped one row chunk at a time and the mapping is dropped after each
chunk, so the resident memory of a pass is one chunk, whatever the number of samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from unicom.errors import InputError
from unicom.formats.embeddings import KINDS, OCCURRENCE, EmbeddingFolders, key_column
from unicom.progress import progress

# fusion -> the embedding kinds it reads
FUSIONS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "text": ("text",),
    "image+text": ("image", "text"),
}
DEFAULT_CHUNK_ROWS = 65536


def _unit_rows(rows: np.ndarray, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise ``rows`` (n, d) as float32 (in place when ``copy`` is False and they are
    float32 already); rows that cannot be normalised are zeroed.

    Returns ``(unit, valid)``: ``valid[i]`` is False for rows holding NaN/Inf values or of
    zero length (or a length that overflows float32).
    """
    unit = np.array(rows, dtype=np.float32, copy=copy or rows.dtype != np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", unit, unit))
    valid = np.isfinite(norms) & (norms > 0)
    unit /= np.where(valid, norms, 1.0)[:, None]
    if not valid.all():
        unit[~valid] = 0.0
    return unit, valid


def fuse(image: np.ndarray | None = None, text: np.ndarray | None = None, fusion: str = "image+text") -> tuple[np.ndarray, np.ndarray]:
    """The fused representation Φ of each sample, as unit rows.

    ``image`` and ``text`` are (n, d) arrays of any float dtype (rows aligned). ``image``
    and ``text`` fusions L2-normalise one of them; ``image+text`` averages the normalised
    image and text rows and normalises the mean again (the paper's joint embedding; the
    factor ½ vanishes in the normalisation). Returns ``(rows, valid)``: (n, d) float32
    unit rows and a (n,) bool mask, False where a row had NaN/Inf values or zero length
    (those rows are zeros).
    """
    if fusion not in FUSIONS:
        raise InputError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    given = {"image": image, "text": text}
    for kind in FUSIONS[fusion]:
        if given[kind] is None:
            raise InputError(f"fusion {fusion!r} needs {kind} embeddings")
    if fusion != "image+text":
        return _unit_rows(given[fusion])
    if image.shape != text.shape:
        raise InputError(f"image rows {image.shape} and text rows {text.shape} differ; image+text needs equal shapes")
    image_unit, image_valid = _unit_rows(image)
    text_unit, text_valid = _unit_rows(text)
    image_unit += text_unit
    del text_unit
    fused, fused_valid = _unit_rows(image_unit, copy=False)
    return fused, image_valid & text_valid & fused_valid


@dataclass(frozen=True)
class Shard:
    """One part of the collection: its number (from the file names) and its row count."""

    number: int
    rows: int


@dataclass
class ClusterInputs:
    """The shards to cluster, checked before anything is computed or written.

    ``folders`` must hold the embeddings that ``fusion`` reads and the metadata (whose
    ``key_column`` names each sample in the labels). ``key_column=None`` takes the first of
    ``key``, ``image_path``, ``url`` that the metadata has. Checks: every part complete and
    sound (:meth:`~unicom.formats.embeddings.EmbeddingFolders.contents`: files, row counts,
    float embeddings of one dimension), image and text of one dimension for
    ``image+text``, the key column in every metadata file. Rows themselves are checked by
    :func:`scan`. ``exclude``: keys whose samples are left out of the k-means sample and of
    the labels (``unicom dedup``'s near duplicates), every sample of such a key.
    """

    folders: EmbeddingFolders
    fusion: str = "image+text"
    key_column: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    exclude: frozenset[str] | None = None
    shards: list[Shard] = field(init=False)
    dimension: int = field(init=False)
    dtypes: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise InputError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.chunk_rows < 1:
            raise InputError(f"chunk_rows must be positive, got {self.chunk_rows}")
        self.kinds = FUSIONS[self.fusion]
        for kind in (*self.kinds, "metadata"):
            if getattr(self.folders, kind) is None and self.folders.root is not None and kind != "metadata":
                other = "image" if kind == "text" else "text"
                raise InputError(
                    f"{self.folders.root}: no {KINDS[kind][0]}/ folder inside, and fusion {self.fusion!r}"
                    f"{' (the default)' if self.fusion == 'image+text' else ''} reads it: cluster the {other}s alone "
                    f"with --fusion {other}, or embed the {'captions' if kind == 'text' else 'images'} too "
                    f"(unicom embed --modalities image,text)"
                )
            if getattr(self.folders, kind) is None and self.folders.root is not None:  # kind is metadata here
                raise InputError(
                    f"{self.folders.root}: no metadata/ folder inside; the keys of the labels come from it: give the "
                    "folder that `unicom embed` wrote (img_emb/, text_emb/ and metadata/), or add --metadata DIR"
                )
            if getattr(self.folders, kind) is None:
                flag = {"image": "--image-emb", "text": "--text-emb", "metadata": "--metadata"}[kind]
                why = "the keys of the labels come from it" if kind == "metadata" else f"fusion {self.fusion!r} reads it"
                if kind != "metadata" and self.fusion == "image+text":  # one modality may be all there is
                    other = "image" if kind == "text" else "text"
                    why += f": give {flag}, or cluster the {other}s alone with --fusion {other}"
                raise InputError(f"no {kind} folder was given ({flag}); {why}")
        contents = self.folders.contents(self.kinds, metadata=True)
        self._contents = contents
        self._with_occurrence = set()  # parts whose metadata has the occurrence column
        for number in contents.numbers:
            columns = contents.metadata_columns(number)
            if OCCURRENCE in columns:
                self._with_occurrence.add(number)
            self.key_column = key_column(columns, contents.path("metadata", number), self.key_column, "--key-column")
        self.shards = [Shard(part.number, part.rows) for part in contents.parts]
        dimensions = {kind: (contents.dimensions[kind], contents.path(kind, contents.numbers[0])) for kind in self.kinds}
        if self.fusion == "image+text" and dimensions["image"][0] != dimensions["text"][0]:
            raise InputError(
                f"image embeddings are {dimensions['image'][0]}-d ({dimensions['image'][1]}) and text embeddings "
                f"{dimensions['text'][0]}-d ({dimensions['text'][1]}); image+text averages them, so both must come "
                "from the same CLIP model (or choose --fusion image or --fusion text)"
            )
        self.dimension = dimensions[self.kinds[0]][0]
        self.dtypes = contents.dtypes
        if self.num_rows == 0:
            raise InputError(f"{self.folders.folder(self.kinds[0])}: the shards hold no samples")
        if self.exclude:
            import pyarrow as pa

            self._excluded = pa.array(sorted(self.exclude), pa.string())  # the value set each shard's keys meet

    @property
    def num_rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    def shard(self, number: int) -> Shard:
        for shard in self.shards:
            if shard.number == number:
                return shard
        raise InputError(f"no part {number} in {self.folders.folder(self.kinds[0])}")

    def path(self, kind: str, number: int) -> Path:
        return self._contents.path(kind, number)

    def fingerprint(self) -> dict:
        """What identifies these inputs in an output folder's records (paths excluded, so
        that nodes mounting the data elsewhere agree); the keys left out, by count and digest."""
        fingerprint = {
            "fusion": self.fusion,
            "key_column": self.key_column,
            "dimension": self.dimension,
            "shards": {str(shard.number): shard.rows for shard in self.shards},
        }
        if self.exclude:
            digest = hashlib.sha256("\n".join(sorted(self.exclude)).encode()).hexdigest()[:16]
            fingerprint["excluded_keys"] = {"count": len(self.exclude), "sha256": digest}
        return fingerprint

    def excluded_rows(self, shard: Shard, keys=None) -> np.ndarray:
        """The sorted rows of ``shard`` whose key (as text) is in ``exclude``; ``keys``: its key
        column, when read already (:meth:`keys`)."""
        if not self.exclude:
            return np.empty(0, dtype=np.int64)
        import pyarrow as pa
        import pyarrow.compute as pc

        keys = self.keys(shard) if keys is None else keys
        if not pa.types.is_string(keys.type):
            keys = pc.cast(keys, pa.string())  # whole-number keys, as the label files give them to training
        hit = pc.is_in(keys, value_set=self._excluded).fill_null(False)
        return np.flatnonzero(hit.to_numpy(zero_copy_only=False)).astype(np.int64)

    def _rows(self, kind: str, number: int, start: int, stop: int) -> np.ndarray:
        # A fresh mapping per chunk (fusion copies the rows out of it): once the chunk is
        # dropped, its pages leave the resident set, so RSS stays one chunk whatever N is.
        return self._contents.load(kind, number)[start:stop]

    def chunks(self, shard: Shard) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start, rows, valid)`` per chunk of ``shard``: fused (n, d) float32 unit rows of
        samples ``start .. start + n`` and their validity mask (see :func:`fuse`)."""
        for start in range(0, shard.rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, shard.rows)
            arrays = {kind: self._rows(kind, shard.number, start, stop) for kind in self.kinds}
            rows, valid = fuse(fusion=self.fusion, **arrays)
            del arrays
            yield start, rows, valid

    def keys(self, shard: Shard):
        """The key column of ``shard``'s metadata, a ``pyarrow.Array`` in row order."""
        return self._contents.load("metadata", shard.number, columns=[self.key_column]).column(0).combine_chunks()

    def occurrences(self, shard: Shard):
        """The ``occurrence`` column of ``shard``'s metadata (which sample of its key each row
        is, see :mod:`unicom.formats.embeddings`), a ``pyarrow.Array`` in row order; None when
        the samples are keyed by another column, or the metadata was written without it."""
        if self.key_column != "key" or shard.number not in self._with_occurrence:
            return None
        return self._contents.load("metadata", shard.number, columns=[OCCURRENCE]).column(0).combine_chunks()

    def explain_invalid(self, shard: Shard, rows: np.ndarray, null_keys: np.ndarray) -> str:
        """Which file holds the bad ``rows`` of ``shard``, and what is wrong with them."""
        problems = []
        if len(null_keys):
            problems.append(
                f"{self.path('metadata', shard.number)}: no {self.key_column!r} (null) at {_rows_text(null_keys)}; "
                "every sample needs a key to be joined with its label"
            )
        vector_rows = np.setdiff1d(rows, null_keys)
        found = False
        for kind in self.kinds:
            bad = []
            for start in range(0, len(vector_rows), self.chunk_rows):
                batch = vector_rows[start:start + self.chunk_rows]
                array = self._contents.load(kind, shard.number)
                _, valid = _unit_rows(array[batch])
                bad.extend(batch[~valid].tolist())
            if bad:
                found = True
                problems.append(f"{self.path(kind, shard.number)}: NaN/Inf values or an all-zero vector at {_rows_text(np.asarray(bad))}")
        if len(vector_rows) and not found:  # each row is fine alone, but image and text cancel out
            problems.append(f"part {shard.number}: image and text embeddings that cancel out (sum to zero) at {_rows_text(vector_rows)}")
        return "; ".join(problems)


def _rows_text(rows: np.ndarray, show: int = 5) -> str:
    listed = ", ".join(str(int(r)) for r in rows[:show])
    more = f" and {len(rows) - show} more" if len(rows) > show else ""
    return f"row{'s' if len(rows) > 1 else ''} {listed}{more}"


def plan_sample(rows: list[int], size: int, seed) -> list[np.ndarray]:
    """A uniform sample without replacement of ``size`` rows from shards of ``rows`` rows.

    Returns, per shard, the sorted row numbers drawn (all rows when ``size`` is at least
    the total). Memory is that of the largest shard, not of the whole collection.
    """
    total = int(sum(rows))
    if size >= total:
        return [np.arange(n, dtype=np.int64) for n in rows]
    rng = np.random.default_rng(seed)
    counts = rng.multivariate_hypergeometric(np.asarray(rows, dtype=np.int64), size, method="marginals")
    return [np.sort(rng.choice(n, c, replace=False)).astype(np.int64) for n, c in zip(rows, counts)]


@dataclass
class ScanResult:
    """What one pass over the shards found.

    ``invalid`` maps a shard number to its sorted invalid rows (NaN/Inf, zero length, or a
    null key); ``sample`` is the (n, d) float32 training sample of valid unit rows, or None.
    ``planned`` is the sample size drawn before invalid rows were left out; ``excluded`` the
    rows whose key :attr:`ClusterInputs.exclude` lists (none of them is in ``invalid``).
    """

    invalid: dict[int, np.ndarray]
    sample: np.ndarray | None = None
    planned: int = 0
    excluded: int = 0

    @property
    def num_invalid(self) -> int:
        return int(sum(len(rows) for rows in self.invalid.values()))


def scan(
    inputs: ClusterInputs,
    shards: list[Shard],
    *,
    skip_invalid: bool = False,
    sample_size: int = 0,
    seed=0,
    desc: str = "check",
) -> ScanResult:
    """Read ``shards`` once: check every row and key, and draw the training sample.

    Raises :class:`InputError` at the first shard with an invalid row unless
    ``skip_invalid``, in which case invalid rows are counted and left out. With
    ``sample_size`` > 0, a uniform random sample of that many rows (``seed``) is gathered
    as unit rows while the shards stream by.
    """
    plan = plan_sample([s.rows for s in shards], sample_size, seed) if sample_size > 0 else None
    planned = sum(len(p) for p in plan) if plan is not None else 0
    sample = np.empty((planned, inputs.dimension), dtype=np.float32) if plan is not None else None
    filled = excluded = 0
    invalid: dict[int, np.ndarray] = {}
    bar = progress(total=sum(s.rows for s in shards), desc=desc, unit="sample")
    try:
        for position, shard in enumerate(shards):
            keys = inputs.keys(shard)
            key_valid = ~np.asarray(keys.is_null(), dtype=bool)
            null_keys = np.flatnonzero(~key_valid)
            left_out = inputs.excluded_rows(shard, keys)  # neither sampled nor checked: they are not used
            key_valid[left_out] = False
            excluded += len(left_out)
            if len(null_keys) and not skip_invalid:
                raise InputError(inputs.explain_invalid(shard, np.empty(0, np.int64), null_keys) + _INVALID_HINT)
            wanted = plan[position] if plan is not None else None
            bad = [null_keys]
            for start, rows, valid in inputs.chunks(shard):
                stop = start + len(rows)
                if not valid.all():
                    bad.append(start + np.flatnonzero(~valid))
                if wanted is not None:
                    lo, hi = np.searchsorted(wanted, [start, stop])
                    picked = wanted[lo:hi] - start
                    picked = picked[valid[picked] & key_valid[start + picked]]
                    sample[filled:filled + len(picked)] = rows[picked]
                    filled += len(picked)
                bar.update(len(rows))
            bad_rows = np.setdiff1d(np.concatenate(bad), left_out).astype(np.int64)
            if len(bad_rows) and not skip_invalid:
                raise InputError(inputs.explain_invalid(shard, bad_rows, null_keys) + _INVALID_HINT)
            if len(bad_rows):
                invalid[shard.number] = bad_rows
    finally:
        bar.close()
    return ScanResult(invalid, None if sample is None else sample[:filled], planned, excluded)


_INVALID_HINT = "; fix or remove these rows, or pass --skip-invalid to leave them out (they are counted and reported)"
