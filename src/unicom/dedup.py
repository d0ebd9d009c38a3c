"""Near duplicates of an embedding folder: within it, or of another folder's images.

:func:`find_duplicates` (``unicom dedup``) reads the folders that ``unicom embed`` writes,
finds every pair of rows whose cosine similarity reaches a threshold by an exact search
(:func:`unicom.evaluate.metrics.pairs_above`), and writes, as one set under ``out``:

* ``pairs.parquet``: ``key``, ``row``, ``match_key``, ``match_row``, ``similarity``, every
  pair found (within a folder each pair once, from its lower row);
* ``duplicates.parquet``: the rows to leave out, one each. Within a folder, rows joined by
  pairs (directly or through others) form a group, whose first row is kept and the others
  listed: ``key``, ``row``, ``kept_key``, ``kept_row`` (the group's first),
  ``match_key``, ``match_row``, ``similarity`` (the row's most similar other member). Against
  another folder (test-set decontamination), every row with a match there is listed, with its
  most similar match;
* ``summary.md`` and ``summary.json`` (written last: a set is whole when it is there): the
  counts, and how many rows would be left out at each threshold from the one given to 1.

The rows searched are held in memory as float32, as read and normalised (2 x N x D x 4
bytes); the search takes one block of similarities at a time (:func:`~unicom.evaluate.metrics.default_chunk_size`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def _folder(folder) -> tuple[np.ndarray, list[str], str | None]:
    """(embeddings float32 (N, D), the key of each row, the recorded weights digest) of an
    embedding folder, its rows checked to have a direction."""
    from unicom.formats.embeddings import WEIGHTS_CHECKSUM, read_config, read_embedding_folder, require_usable_rows, row_keys

    x, metadata = read_embedding_folder(folder)
    keys = row_keys(metadata, folder)
    require_usable_rows(x, keys, storage.text(folder))
    return x, keys, (read_config(folder) or {}).get(WEIGHTS_CHECKSUM)


def _groups(n: int, rows: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """The group of each of ``n`` rows joined by the pairs (``rows``, ``matches``): the first
    (lowest) row of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, matches)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    return first[component]


def _best_match(n: int, rows: np.ndarray, matches: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` rows, its most similar match among the pairs (equal similarities:
    the lower match row), and that similarity; -1 and NaN for a row in no pair."""
    order = np.lexsort((matches, -similarities.astype(np.float64), rows))  # by row, best first
    best, similarity = np.full(n, -1, np.int64), np.full(n, np.nan, np.float32)
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
    best[rows[first]], similarity[rows[first]] = matches[first], similarities[first]
    return best, similarity


def _left_out(n: int, rows: np.ndarray, matches: np.ndarray, similarities: np.ndarray, within: bool,
              threshold: float) -> int:
    """How many rows the pairs of similarity ``threshold`` or more leave out."""
    kept = similarities >= threshold
    if not within:
        return int(len(np.unique(rows[kept])))
    return int((_groups(n, rows[kept], matches[kept]) != np.arange(n)).sum())


def find_duplicates(emb, out, *, against=None, threshold: float = 0.95, max_pairs: int | None = DEFAULT_MAX_PAIRS,
                    chunk_size: int | None = None) -> dict[str, Any]:
    """Near duplicates within the embedding folder ``emb`` or, with ``against``, of its rows
    in that folder; written under the local folder ``out`` (the module's docstring). Returns
    the summary (``summary.json``)."""
    import pyarrow as pa

    from unicom.evaluate.metrics import pairs_above
    from unicom.files import json_text, publish_together, write_bytes_synced
    from unicom.models.export import local_output

    if not -1.0 <= threshold <= 1.0:
        raise InputError(f"threshold {threshold!r}: a cosine similarity, between -1 and 1 (near duplicates: 0.9 to 0.99)")
    out = local_output(out, "the list of near duplicates")
    x, keys, digest = _folder(emb)
    within = against is None
    y, other_keys = x, keys
    if not within:
        if os.path.realpath(storage.text(against)) == os.path.realpath(storage.text(emb)):
            raise InputError(f"--against {storage.text(against)} is --emb itself: leave --against out to find the "
                             "near duplicates within a folder")
        y, other_keys, other_digest = _folder(against)
        if y.shape[1] != x.shape[1]:
            raise InputError(f"{storage.text(against)} (--against) holds {y.shape[1]}-dimensional embeddings and "
                             f"{storage.text(emb)} {x.shape[1]}-dimensional ones: they were made by different models; "
                             "embed both with the same model")
        if digest is not None and other_digest is not None and digest != other_digest:
            raise InputError(f"{storage.text(against)} (--against) was embedded by other weights than "
                             f"{storage.text(emb)} (weights_sha256 {other_digest[:12]}… against {digest[:12]}…): "
                             "similarities between them mean nothing; embed both with the same model")
    rows, matches, similarities = pairs_above(x, None if within else y, threshold, chunk_size=chunk_size,
                                              max_pairs=max_pairs, desc="near duplicates")
    n = len(x)
    if within:  # a pair joins both of its rows
        best, best_similarity = _best_match(n, np.r_[rows, matches], np.r_[matches, rows], np.r_[similarities, similarities])
        group = _groups(n, rows, matches)
        listed = np.flatnonzero(group != np.arange(n))
    else:
        best, best_similarity = _best_match(n, rows, matches, similarities)
        listed = np.flatnonzero(best >= 0)
    pairs = pa.table({"key": pa.array([keys[i] for i in rows], pa.string()), "row": rows,
                      "match_key": pa.array([other_keys[i] for i in matches], pa.string()), "match_row": matches,
                      "similarity": similarities})
    columns = {"key": pa.array([keys[i] for i in listed], pa.string()), "row": listed}
    if within:
        columns |= {"kept_key": pa.array([keys[i] for i in group[listed]], pa.string()), "kept_row": group[listed]}
    columns |= {"match_key": pa.array([other_keys[i] for i in best[listed]], pa.string()), "match_row": best[listed],
                "similarity": best_similarity[listed]}
    in_pairs = np.zeros(n, dtype=bool)
    in_pairs[rows] = True
    steps = sorted({float(threshold), *(t for t in THRESHOLD_STEPS if t > threshold)})
    summary = {
        "embeddings": storage.absolute(emb),
        "against": None if within else storage.absolute(against),
        "threshold": float(threshold),
        "rows": n,
        "against_rows": None if within else len(y),
        "pairs": int(len(rows)),
        "left_out": int(len(listed)),
        "kept": int(n - len(listed)),
        "groups": int(len(np.unique(group[in_pairs]))) if within else None,
        "by_threshold": [{"threshold": t, "pairs": int((similarities >= t).sum()),
                          "left_out": _left_out(n, rows, matches, similarities, within, t)} for t in steps],
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


def duplicates_markdown(summary: dict) -> str:
    """The summary as markdown: what was searched, what is left out, and at which threshold."""
    if summary["against"] is None:
        searched = f"{summary['rows']:,} embeddings of {summary['embeddings']}, each pair once"
        found = (f"{summary['pairs']:,} pairs join {summary['groups']:,} groups of near duplicates; the first row of "
                 f"each group is kept and the other {summary['left_out']:,} are listed in {DUPLICATES_NAME} "
                 f"({summary['kept']:,} rows kept).")
    else:
        searched = (f"{summary['rows']:,} embeddings of {summary['embeddings']} against the {summary['against_rows']:,} "
                    f"of {summary['against']}")
        found = (f"{summary['pairs']:,} pairs; {summary['left_out']:,} rows have a near duplicate there and are listed "
                 f"in {DUPLICATES_NAME} ({summary['kept']:,} rows kept).")
    lines = ["# Near duplicates", "", f"Cosine similarity {summary['threshold']:g} or more, {searched}.", "", found, "",
             "| threshold | pairs | rows left out |", "|---|---|---|"]
    lines += [f"| {row['threshold']:g} | {row['pairs']:,} | {row['left_out']:,} |" for row in summary["by_threshold"]]
    return "\n".join(lines) + "\n"
