"""Near duplicates of an embedding folder: within it, or of another folder's images.

:func:`find_duplicates` (``unicom dedup``) reads the folders that ``unicom embed`` writes and
finds every pair of rows whose cosine similarity reaches a threshold, in one of three ways:

* within a folder, exactly (:func:`unicom.evaluate.metrics.pairs_above`): every row against
  every other, the rows held in memory as float32, as read and normalised (2 x N x D x 4
  bytes), one block of similarities at a time, on this rank's GPU when there is one;
* within a folder, through an index of it (``index``: ``unicom index --emb`` the same folder):
  the folder is read a block of rows at a time and each block searched in the index for
  everything above the threshold (:meth:`unicom.search.index.Index.search_range`), so the
  memory holds the index, one block and the pairs. Exact for a flat index; an IVF or HNSW
  index misses the pairs its search misses, and a compressed one scores approximately. A pair
  is kept when either of its rows finds the other, with the higher of the two scores;
* against another folder (a test set, held in memory), exactly, the folder read a block of
  rows at a time.

It writes, as one set under ``out``:

* ``pairs.parquet``: ``key``, ``row``, ``match_key``, ``match_row``, ``similarity``, every
  pair found (within a folder each pair once, from its lower row);
* ``duplicates.parquet``: the rows to leave out, one each. Within a folder, rows joined by
  pairs (directly or through others) form a group, whose first row (or the one of the
  largest or smallest value of a metadata column, ``keep_by``) is kept and the others
  listed: ``key``, ``row``, ``kept_key``, ``kept_row`` (the row kept),
  ``match_key``, ``match_row``, ``similarity`` (the row's most similar other member). Against
  another folder (test-set decontamination), every row with a match there is listed, with its
  most similar match;
* ``summary.md`` and ``summary.json`` (written last: a set is whole when it is there): the
  counts, how the pairs were searched, and how many rows would be left out at each threshold
  from the one given to 1.

Only the rows in pairs are looked at after the search (their keys read from the metadata a
part at a time), so a web collection costs the index and its pairs, not its rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from unicom import storage
from unicom.errors import InputError

PAIRS_NAME = "pairs.parquet"
DUPLICATES_NAME = "duplicates.parquet"
SUMMARY_NAME = "summary.json"
MARKDOWN_NAME = "summary.md"
OUTPUT_NAMES = (SUMMARY_NAME, PAIRS_NAME, DUPLICATES_NAME, MARKDOWN_NAME)  # the first says a set is whole
THRESHOLD_STEPS = (0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0)  # the summary's table, from the threshold
DEFAULT_MAX_PAIRS = 50_000_000  # 600 MB of pairs
BLOCK_ROWS = 65_536  # rows read (and searched in an index) at once


class _Folder:
    """An embedding folder's complete parts (an unfinished one refused), read a part at a time:
    its rows of ``modality`` (``image`` or ``text``) in blocks, checked to have a direction,
    and the keys of given rows. ``digest``: the recorded digest of the weights that made those
    rows (the multilingual text model's for captions embedded with one), or None; ``flip``:
    whether each image row averages its image's mirror (``unicom embed --flip``); ``scales``:
    the scales it averages (``unicom embed --scales``; ``(1.0,)``: the model input alone)."""

    def __init__(self, root, modality: str = "image"):
        from unicom.formats.embeddings import FLIP, WEIGHTS_CHECKSUM, EmbeddingFolders, read_config, recorded_scales

        self.root = root
        self.modality = modality
        self.where = storage.text(root)
        folders = EmbeddingFolders.from_root(root)
        if modality not in folders.present():
            raise InputError(f"{self.where}: holds no {modality} embeddings (it has {', '.join(folders.present())}); "
                             f"embed them (`unicom embed --modalities image,text`) or choose another --modality")
        self.contents = folders.contents((modality,))
        if not self.contents.parts:
            raise InputError(f"{self.where}: no complete part to read")
        if "metadata" not in self.contents.kinds:
            raise InputError(f"{self.where}: no metadata/ folder, so rows have no keys to match images or labels with")
        self.dims = int(self.contents.dimensions[modality])
        self.num_rows = self.contents.num_rows
        self.starts = np.cumsum([0] + [part.rows for part in self.contents.parts])[:-1].astype(np.int64)
        config = read_config(root) or {}
        self.digest = config.get("text_model_sha256") if modality == "text" and config.get("text_model") else \
            config.get(WEIGHTS_CHECKSUM)
        self.flip = modality == "image" and bool(config.get(FLIP))
        self.scales = recorded_scales(config) if modality == "image" else (1.0,)

    def _part_values(self, index: int, local: np.ndarray | None = None, column: str | None = None, option: str = ""):
        """Part ``index``'s values of ``column`` (default: its keys, as text) at rows ``local``
        (default all): a ``pyarrow`` array, float64 for a column of numbers (``option`` names it)."""
        import pyarrow as pa

        from unicom.formats.embeddings import key_column

        number = self.contents.parts[index].number
        path = self.contents.path("metadata", number)
        names = self.contents.metadata_columns(number)
        if column is not None and column not in names:
            raise InputError(f"{path}: no column {column!r} for {option} (columns: {', '.join(names)}); choose one of these")
        values = self.contents.load("metadata", number, columns=[column or key_column(names, path)]).column(0)
        if local is not None:
            values = values.take(local)
        if column is None:
            return pa.array([str(value) for value in values.to_pylist()], pa.string())
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise InputError(f"{path}: column {column!r} holds {values.type}, not numbers; {option} compares numbers "
                             "(a size, a score): choose such a column")
        return values.cast(pa.float64()).combine_chunks()

    def _taken(self, rows: np.ndarray, column: str | None = None, option: str = ""):
        """The values of ``column`` (default: the keys, as text) at ``rows`` (int64, any order and
        repeats), in that order: only the parts holding them are read, that column alone."""
        import pyarrow as pa

        wanted, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        which = np.searchsorted(self.starts, wanted, side="right") - 1
        chunks = [self._part_values(int(index), wanted[which == index] - self.starts[index], column, option)
                  for index in np.unique(which)]
        values = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string() if column is None else pa.float64())
        return values.take(pa.array(inverse.reshape(-1)))

    def keys(self, *rows: np.ndarray) -> list:
        """The keys of each of the arrays ``rows`` (int64, any order and repeats), as ``pyarrow``
        string arrays in their order; each part's key column is read once for all of them."""
        lengths = [len(r) for r in rows]
        keys = self._taken(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))
        starts = np.cumsum([0] + lengths)
        return [keys.slice(int(start), length) for start, length in zip(starts, lengths)]

    def numbers(self, rows: np.ndarray, column: str, option: str) -> np.ndarray:
        """The values of the metadata ``column`` at ``rows``, float64; a row without one (null,
        NaN) is refused, naming its key, row and ``option``."""
        values = self._taken(rows, column, option).to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.flatnonzero(np.isnan(values))
        if len(missing):
            row = int(np.asarray(rows)[missing[0]])
            raise InputError(f"{self.where}: column {column!r} ({option}) has no value for {len(missing)} of the rows "
                             f"compared, e.g. {self.keys(np.array([row]))[0][0].as_py()!r} (row {row}); fill it in, or "
                             "choose another column")
        return values

    def _usable(self, vectors: np.ndarray, index: int, local: np.ndarray) -> np.ndarray:
        """``vectors`` (part ``index``'s rows ``local``, float32), or an error naming the key and
        row of one of NaN, infinite values or zeros (the keys read only then)."""
        from unicom.formats.embeddings import require_usable_rows

        if not (np.isfinite(vectors).all() and vectors.any(1).all()):
            require_usable_rows(vectors, self._part_values(index, local).to_pylist(), self.where,
                                rows=local + self.starts[index])
        return vectors

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 (B, D) rows as read) for consecutive blocks of :data:`BLOCK_ROWS`
        rows of every part, checked by :meth:`_usable`."""
        for index, (part, start) in enumerate(zip(self.contents.parts, self.starts)):
            array = self.contents.load(self.modality, part.number)
            for first in range(0, part.rows, BLOCK_ROWS):
                local = np.arange(first, min(first + BLOCK_ROWS, part.rows))
                yield int(start + first), self._usable(np.asarray(array[first:first + BLOCK_ROWS], dtype=np.float32),
                                                       index, local)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted int64), float32 (len(rows), D), checked by :meth:`_usable`;
        only the parts holding them are opened."""
        out = np.empty((len(rows), self.dims), dtype=np.float32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for index in np.unique(which):
            at = np.flatnonzero(which == index)
            local = rows[at] - self.starts[index]
            array = self.contents.load(self.modality, self.contents.parts[int(index)].number)
            out[at] = self._usable(np.asarray(array[local], dtype=np.float32), int(index), local)
        return out

    def rows(self) -> np.ndarray:
        """Every row, float32 (N, D), checked as :meth:`blocks` checks them."""
        out = np.empty((self.num_rows, self.dims), dtype=np.float32)
        for first, block in self.blocks():
            out[first:first + len(block)] = block
        return out


def _components(rows: np.ndarray, matches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the rows in any of the pairs (``rows``, ``matches``), sorted; the first (lowest) row of
    each one's group: the rows joined to it by pairs, directly or through others)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    members, inverse = np.unique(np.r_[rows, matches], return_inverse=True)
    m = len(members)
    if m == 0:
        return members, members
    inverse = inverse.reshape(-1)
    graph = coo_matrix((np.ones(len(rows), np.int8), (inverse[:len(rows)], inverse[len(rows):])), shape=(m, m))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, m, dtype=np.int64)
    np.minimum.at(first, component, np.arange(m))
    return members, members[first[component]]


def _kept(members: np.ndarray, first: np.ndarray, values: np.ndarray, largest: bool) -> np.ndarray:
    """The row each member's group keeps: the one of the largest (or smallest) value among
    ``values`` (one per member), equal values the lowest row; ``first`` names each group."""
    order = np.lexsort((members, -values if largest else values, first))  # by group, the one kept first
    heads = order[np.r_[True, first[order][1:] != first[order][:-1]]]
    _, inverse = np.unique(first, return_inverse=True)  # the heads come by group, in this order
    return members[heads][inverse.reshape(-1)]


def _best_match(rows: np.ndarray, matches: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, ...]:
    """(each row of the pairs, sorted; its most similar match (equal similarities: the lower
    match row); that similarity)."""
    order = np.lexsort((matches, -similarities.astype(np.float64), rows))  # by row, best first
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
    return rows[first], matches[first], similarities[first]


def _left_out(rows: np.ndarray, matches: np.ndarray, similarities: np.ndarray, within: bool, threshold: float) -> int:
    """How many rows the pairs of similarity ``threshold`` or more leave out."""
    kept = similarities >= threshold
    if not within:
        return int(len(np.unique(rows[kept])))
    members, first = _components(rows[kept], matches[kept])
    return int((first != members).sum())


def _too_many(max_pairs: int, threshold: float, done: int, total: int) -> InputError:
    return InputError(f"more than {max_pairs:,} pairs have a cosine similarity of {threshold:g} or more "
                      f"(after {done:,} of {total:,} rows): raise the threshold, or the most pairs allowed if the "
                      "memory holds them")


def _on(device, rows: np.ndarray, what: str):
    """``rows`` as a float32 tensor on ``device``; one that does not fit there is an error
    saying so and what to do."""
    import torch

    try:
        return torch.from_numpy(rows).to(device)
    except torch.cuda.OutOfMemoryError:
        raise InputError(f"{what} ({rows.nbytes / 2**30:.1f} GiB as float32) do not fit in the memory of {device}: "
                         "give --device cpu, or search through an index of them (--index)") from None


def _against(folder: _Folder, y, threshold: float, chunk_size: int | None,
             max_pairs: int | None) -> tuple[np.ndarray, ...]:
    """The pairs of ``folder``'s rows, read a block at a time, with the rows ``y`` (a tensor,
    on the device searched): exact."""
    from unicom.evaluate.metrics import pairs_above
    from unicom.progress import progress

    found, total = [], 0
    with progress(total=folder.num_rows, desc="near duplicates", unit="row") as bar:
        for first, block in folder.blocks():
            rows, matches, similarities = pairs_above(_on(y.device, block, "a block of rows"), y, threshold,
                                                      chunk_size=chunk_size)
            total += len(rows)
            if max_pairs is not None and total > max_pairs:
                raise _too_many(max_pairs, threshold, first + len(block), folder.num_rows)
            found.append((rows + first, matches, similarities))
            bar.update(len(block))
    return _joined(found)


def _joined(found: list) -> tuple[np.ndarray, ...]:
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([part[i] for part in found]) for i in range(3))


def _through_index(folder: _Folder, index, threshold: float, max_pairs: int | None, nprobe: int | None,
                   ef_search: int | None) -> tuple[np.ndarray, ...]:
    """The pairs within ``folder`` that searching each of its rows in ``index`` (of that
    folder) finds: each once, from its lower row, with the higher of its two scores."""
    from unicom.progress import progress

    found, entries = [], 0
    with progress(total=folder.num_rows, desc="near duplicates (index)", unit="row") as bar:
        for first, block in folder.blocks():
            results = index.search_range(block, threshold, modality=folder.modality, nprobe=nprobe, ef_search=ef_search)
            counts = np.array([len(ids) for _, ids in results], dtype=np.int64)
            rows = np.repeat(np.arange(first, first + len(block), dtype=np.int64), counts)
            matches = np.concatenate([ids for _, ids in results]) if len(rows) else np.zeros(0, np.int64)
            scores = np.concatenate([scores for scores, _ in results]) if len(rows) else np.zeros(0, np.float32)
            other = rows != matches
            rows, matches, scores = rows[other], matches[other], scores[other]
            entries += len(rows)
            # a pair is found from each of its rows at most: past twice the pairs allowed, there are too many
            if max_pairs is not None and entries > 2 * max_pairs:
                raise _too_many(max_pairs, threshold, first + len(block), folder.num_rows)
            found.append((np.minimum(rows, matches), np.maximum(rows, matches), scores))
            bar.update(len(block))
    low, high, scores = _joined(found)
    order = np.lexsort((-scores.astype(np.float64), high, low))  # each pair's higher score first
    low, high, scores = low[order], high[order], scores[order]
    first = np.r_[True, (low[1:] != low[:-1]) | (high[1:] != high[:-1])] if len(low) else np.zeros(0, bool)
    if max_pairs is not None and int(first.sum()) > max_pairs:
        raise _too_many(max_pairs, threshold, folder.num_rows, folder.num_rows)
    return low[first], high[first], scores[first].astype(np.float32, copy=False)


def _sampled_check(folder: _Folder, dims: int, low: np.ndarray, high: np.ndarray, threshold: float, sample: int,
                   chunk_size: int | None, seed: int = 0) -> dict:
    """How many of the pairs of ``sample`` rows of ``folder`` (a seeded draw) that an exact
    search finds, in the first ``dims`` dimensions as an index searches them, are among the
    pairs (``low``, ``high``) found through it; and how many of those pairs of the sampled rows
    the exact search does not find (the index's scores put them above the threshold)."""
    from unicom.evaluate.metrics import pairs_above
    from unicom.progress import progress
    from unicom.search.collection import first_dims

    n = folder.num_rows
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)).astype(np.int64)
    x = first_dims(folder.gather(chosen), dims, folder.where, chosen)
    exact = []
    with progress(total=n, desc="exact check of a sample", unit="row") as bar:
        for first, block in folder.blocks():
            at, column, _ = pairs_above(x, first_dims(block, dims, folder.where, first), threshold, chunk_size=chunk_size)
            mine, theirs = chosen[at], column + first
            other = mine != theirs
            exact.append(np.minimum(mine, theirs)[other] * n + np.maximum(mine, theirs)[other])
            bar.update(len(block))
    exact_keys = np.unique(np.concatenate(exact)) if exact else np.zeros(0, np.int64)
    touching = np.isin(low, chosen) | np.isin(high, chosen)
    found_keys = np.unique(low[touching] * n + high[touching])
    found = int(np.isin(exact_keys, found_keys).sum())
    return {"rows": int(len(chosen)), "seed": seed, "exact_pairs": int(len(exact_keys)), "found": found,
            "recall": found / len(exact_keys) if len(exact_keys) else None,
            "extra": int(len(found_keys) - found)}


def _open_index(index_location, folder: _Folder):
    """The index at ``index_location``, checked to hold ``folder``'s rows: the same parts, in
    the same order, embedded by the same weights, with an index of its modality."""
    from unicom.formats.embeddings import WEIGHTS_CHECKSUM
    from unicom.search.index import Index

    index = Index.load(index_location)
    where = storage.text(index_location)
    if folder.modality not in index.modalities:
        raise InputError(f"--index {where}: holds no index of {folder.modality} embeddings (only of "
                         f"{', '.join(index.modalities)}); build one (`unicom index --layout clip-retrieval` indexes the "
                         "captions' embeddings too)")
    ours = [(part.number, part.rows) for part in folder.contents.parts]
    theirs = [(part.number, part.rows) for part in index.parts]
    if ours != theirs or [part.first_id for part in index.parts] != folder.starts.tolist():
        missing = [number for number, _ in ours if number not in {n for n, _ in theirs}]
        said = (f"it lacks parts {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''} of --emb"
                if missing and set(theirs) <= set(ours) else
                f"its parts (number, rows) {theirs[:3]}{' ...' if len(theirs) > 3 else ''} are not those of --emb "
                f"{ours[:3]}{' ...' if len(ours) > 3 else ''}")
        raise InputError(f"--index {where} was not built from --emb {folder.where} as it is now: {said}; "
                         f"build it with `unicom index --emb {folder.where} --out {where}` (which adds new parts to "
                         "an index, or --rebuild)")
    model = index.config.get("text_model") if folder.modality == "text" and index.config.get("text_model") else \
        index.config.get("model")
    recorded = (model or {}).get(WEIGHTS_CHECKSUM)
    if recorded is not None and folder.digest is not None and recorded != folder.digest:
        raise InputError(f"--index {where} holds embeddings of other weights than --emb {folder.where} "
                         f"(weights_sha256 {recorded[:12]}… against {folder.digest[:12]}…); build it from --emb")
    return index


def _search_record(index, index_location, nprobe: int | None, ef_search: int | None, device=None,
                   modality: str = "image") -> dict:
    """How the pairs were searched, for the summary: ``{"method": "exact", "device"}`` or the
    index's location, type, dimensions and search parameter."""
    if index is None:
        return {"method": "exact", "device": str(device)}
    kind = index.modality_type(modality)
    record = {"method": "index", "index": storage.absolute(index_location), "type": kind,
              "dims": int(index.modality_dims(modality))}
    stored = index.modality_search(modality)
    if kind == "hnsw":
        record["efSearch"] = ef_search if ef_search is not None else stored.get("efSearch")
    elif "nprobe" in stored or nprobe is not None:
        record["nprobe"] = nprobe if nprobe is not None else stored["nprobe"]
    return record


def find_duplicates(emb, out, *, against=None, index=None, threshold: float = 0.95,
                    max_pairs: int | None = DEFAULT_MAX_PAIRS, chunk_size: int | None = None,
                    nprobe: int | None = None, ef_search: int | None = None, keep_by: str | None = None,
                    keep_largest: bool = True, device: str | None = None, modality: str = "image",
                    check_sample: int = 0) -> dict[str, Any]:
    """Near duplicates within the embedding folder ``emb`` (exactly, or through ``index``, an
    index of it) or, with ``against``, of its rows in that folder; written under the local
    folder ``out`` (the module's docstring). ``nprobe`` / ``ef_search`` override the index's
    search parameter. ``keep_by``: a metadata column of numbers (a size, a score) whose
    largest value (smallest without ``keep_largest``) picks the row each group keeps, equal
    values the first; default the group's first row. ``device``: where the exact search runs
    (``cuda``, ``cpu``; default this rank's GPU, else the CPU), in exact float32; an index is
    searched by faiss on the CPU. ``modality``: the embeddings compared, ``image`` or ``text``
    (the captions'). ``check_sample``: with ``index``, so many rows (a seeded draw) searched
    exactly as well, to measure the share of their pairs the index found (``sample_check``).
    Returns the summary (``summary.json``)."""
    import pyarrow as pa

    from unicom.evaluate.metrics import pairs_above
    from unicom.files import json_text, publish_together, write_bytes_synced
    from unicom.models.export import local_output

    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold {threshold!r}: a cosine similarity, between -1 and 1 (near duplicates: 0.9 to 0.99)")
    if index is not None and against is not None:
        raise InputError("--index searches within --emb; with --against the search is exact, --emb read a block of "
                         "rows at a time and --against held in memory: leave --index out")
    option = f"--keep-{'largest' if keep_largest else 'smallest'} {keep_by}"
    if keep_by is not None and against is not None:
        raise InputError(f"{option} picks the row a group of near duplicates keeps; with --against every row with a "
                         "match is listed: leave it out")
    if index is not None and device is not None:
        raise InputError("--device places the exact search; an index (--index) is searched by faiss on the CPU: leave "
                         "--device out")
    if check_sample and index is None:
        raise InputError("--check-sample measures how many pairs an index finds; the exact search (without --index) "
                         "finds them all: leave it out, or give --index")
    if check_sample < 0:
        raise InputError(f"--check-sample {check_sample}: a number of rows, 0 (no check) or more")
    if index is None and (nprobe is not None or ef_search is not None):
        raise InputError("--nprobe and --ef-search set the search of an index: give --index INDEX, or leave them out")
    out = local_output(out, "the list of near duplicates")
    from unicom.engine.device import resolve_device

    searched_on = None if index is not None else resolve_device(device or "auto", key="--device")
    if modality not in ("image", "text"):
        raise InputError(f"--modality {modality!r}: image or text (the captions' embeddings)")
    folder = _Folder(emb, modality)
    within = against is None
    other = folder
    opened = None
    if within and index is None:
        rows, matches, similarities = pairs_above(_on(searched_on, folder.rows(), f"the {folder.num_rows:,} rows"),
                                                  None, threshold, chunk_size=chunk_size, max_pairs=max_pairs,
                                                  desc="near duplicates")
    elif within:
        opened = _open_index(index, folder)
        rows, matches, similarities = _through_index(folder, opened, threshold, max_pairs, nprobe, ef_search)
        if check_sample:
            checked = _sampled_check(folder, opened.modality_dims(modality), rows, matches, threshold, check_sample,
                                     chunk_size)
    else:
        if os.path.realpath(storage.text(against)) == os.path.realpath(storage.text(emb)):
            raise InputError(f"--against {storage.text(against)} is --emb itself: leave --against out to find the "
                             "near duplicates within a folder")
        other = _Folder(against, modality)
        if other.dims != folder.dims:
            raise InputError(f"{other.where} (--against) holds {other.dims}-dimensional embeddings and "
                             f"{folder.where} {folder.dims}-dimensional ones: they were made by different models; "
                             "embed both with the same model")
        if folder.digest is not None and other.digest is not None and folder.digest != other.digest:
            raise InputError(f"{other.where} (--against) was embedded by other weights than "
                             f"{folder.where} (weights_sha256 {other.digest[:12]}… against {folder.digest[:12]}…): "
                             "similarities between them mean nothing; embed both with the same model")
        if (folder.flip, folder.scales) != (other.flip, other.scales):
            from unicom.formats.embeddings import describe_views

            raise InputError(f"{folder.where} was embedded with {describe_views(folder.flip, folder.scales)} and "
                             f"{other.where} (--against) with {describe_views(other.flip, other.scales)}: a copy in "
                             "both would not score as one; embed both the same way")
        rows, matches, similarities = _against(folder, _on(searched_on, other.rows(), f"the {other.num_rows:,} rows "
                                                           "of --against"), threshold, chunk_size, max_pairs)
    if within:  # a pair joins both of its rows
        members, first = _components(rows, matches)
        _, best, best_similarity = _best_match(np.r_[rows, matches], np.r_[matches, rows], np.r_[similarities, similarities])
        if keep_by is not None:
            kept = _kept(members, first, folder.numbers(members, keep_by, option), keep_largest)
        else:
            kept = first
        listed_mask = kept != members
        listed, kept, best, best_similarity = members[listed_mask], kept[listed_mask], best[listed_mask], \
            best_similarity[listed_mask]
    else:
        listed, best, best_similarity = _best_match(rows, matches, similarities)
    if within:  # every row named is one of --emb's: their keys read in one pass
        row_keys, match_keys, listed_keys, kept_keys, best_keys = folder.keys(rows, matches, listed, kept, best)
    else:
        row_keys, listed_keys = folder.keys(rows, listed)
        match_keys, best_keys = other.keys(matches, best)
    pairs = pa.table({"key": row_keys, "row": rows, "match_key": match_keys, "match_row": matches,
                      "similarity": similarities})
    columns = {"key": listed_keys, "row": listed}
    if within:
        columns |= {"kept_key": kept_keys, "kept_row": kept}
    columns |= {"match_key": best_keys, "match_row": best, "similarity": best_similarity}
    n = folder.num_rows
    steps = sorted({float(threshold), *(t for t in THRESHOLD_STEPS if t > threshold)})
    summary = {
        "embeddings": storage.absolute(emb),
        "against": None if within else storage.absolute(against),
        "modality": modality,
        "search": _search_record(opened, index, nprobe, ef_search, searched_on, modality),
        "sample_check": checked if check_sample else None,
        "threshold": float(threshold),
        "keep": None if not within else (
            {"by": "first row"} if keep_by is None else {"by": keep_by, "largest": bool(keep_largest)}),
        "rows": n,
        "against_rows": None if within else other.num_rows,
        "pairs": int(len(rows)),
        "left_out": int(len(listed)),
        "kept": int(n - len(listed)),
        "groups": int(len(np.unique(first))) if within else None,
        "by_threshold": [{"threshold": t, "pairs": int((similarities >= t).sum()),
                          "left_out": _left_out(rows, matches, similarities, within, t)} for t in steps],
    }
    publish_together(out, {
        PAIRS_NAME: lambda path: _write_parquet(path, pairs),
        DUPLICATES_NAME: lambda path: _write_parquet(path, pa.table(columns)),
        MARKDOWN_NAME: lambda path: write_bytes_synced(path, duplicates_markdown(summary).encode()),
        SUMMARY_NAME: lambda path: write_bytes_synced(path, json_text(summary).encode()),
    }, OUTPUT_NAMES)
    return summary


def _write_parquet(path: Path, table) -> None:
    """``table`` as parquet at ``path`` (a temporary of :func:`~unicom.files.publish_together`), synced."""
    import pyarrow.parquet as pq

    with open(path, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())


def _searched(search: dict) -> str:
    """How the pairs were searched, in words."""
    if search.get("method", "exact") == "exact":
        return f"Searched exactly{' on ' + search['device'] if search.get('device') else ''}."
    parameter = next((f", {name} {search[name]}" for name in ("nprobe", "efSearch") if search.get(name) is not None), "")
    caveat = ("exact" if search["type"] == "flat" else
              "a pair is found when the index's search finds it, with the index's score")
    return f"Searched through the {search['type']} index {search['index']} ({search['dims']} dimensions{parameter}): {caveat}."


def duplicates_markdown(summary: dict) -> str:
    """The summary as markdown: what was searched, and how, what is left out, and at which threshold."""
    what = {"image": "image", "text": "caption"}[summary.get("modality", "image")]
    if summary["against"] is None:
        searched = f"{summary['rows']:,} {what} embeddings of {summary['embeddings']}, each pair once"
        keep = summary.get("keep") or {"by": "first row"}
        kept = ("the first row of each group is kept" if keep["by"] == "first row" else
                f"the row of each group with the {'largest' if keep['largest'] else 'smallest'} {keep['by']} is kept "
                "(equal values: the first)")
        found = (f"{summary['pairs']:,} pairs join {summary['groups']:,} groups of near duplicates; {kept} and the other "
                 f"{summary['left_out']:,} are listed in {DUPLICATES_NAME} ({summary['kept']:,} rows kept).")
    else:
        searched = (f"{summary['rows']:,} {what} embeddings of {summary['embeddings']} against the "
                    f"{summary['against_rows']:,} of {summary['against']}")
        found = (f"{summary['pairs']:,} pairs; {summary['left_out']:,} rows have a near duplicate there and are listed "
                 f"in {DUPLICATES_NAME} ({summary['kept']:,} rows kept).")
    check = summary.get("sample_check")
    checked = "" if not check else (
        f" Checked exactly on {check['rows']:,} sampled rows: the index found {check['found']:,} of their "
        f"{check['exact_pairs']:,} pairs" + (f" ({check['recall']:.1%})" if check["recall"] is not None else "")
        + f", and {check['extra']:,} more.")
    lines = ["# Near duplicates", "", f"Cosine similarity {summary['threshold']:g} or more, {searched}. "
             f"{_searched(summary.get('search', {}))}{checked}", "", found, "",
             "| threshold | pairs | rows left out |", "|---|---|---|"]
    lines += [f"| {row['threshold']:g} | {row['pairs']:,} | {row['left_out']:,} |" for row in summary["by_threshold"]]
    return "\n".join(lines) + "\n"
