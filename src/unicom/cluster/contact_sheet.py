"""Contact sheets of pseudo-classes: sample images of clusters beside their nearest clusters.

What the paper's Figures 3 and 5 show: a few images of a cluster, and of the clusters whose
centroids are closest to it by cosine similarity, where inter-class conflicts show (two
clusters of one concept). :func:`build_contact_sheet` gathers them from the files of the
stages before it, and :func:`write_contact_sheet` draws them:

* the cluster folder (:mod:`unicom.formats.clusters`): centroids (memory-mapped, searched
  in blocks of rows), label files (read part by part; only the ``label`` column is kept,
  and only the samples drawn);
* the embedding folder's metadata (:mod:`unicom.formats.embeddings`), which says where each
  labelled sample came from: the ``shard`` it was read from (webdataset input) or its
  ``image_path`` (image folders and lists), and its ``caption``;
* the shards or image files themselves: only the members of the drawn samples are read
  from each shard (:func:`unicom.data.shards.read_shard_samples` with ``keys``), each image
  decoded at reduced size (JPEG draft, then a reducing resize) into a thumbnail.

The samples of a cluster are a seeded uniform draw: every labelled row gets a priority
from a generator seeded by ``(seed, part)`` and a cluster shows its rows of lowest
priority, so the draw is the same whatever the order the parts are read in, and memory
holds ``samples`` candidates per cluster.

Sheet geometry (pixels; T the thumbnail side, N the samples per row)::

    width  = LABEL_WIDTH + N * (T + GAP) + GAP
    height = GAP + sum over blocks of rows * (T + GAP) + BLOCK_GAP * (blocks - 1)

Block b holds its cluster's row, then one row per nearest cluster; the cell of row r,
sample j has its top-left corner at ``(LABEL_WIDTH + GAP + j * (T + GAP), GAP + top_b +
r * (T + GAP))``, ``top_b`` the height of the blocks above it (each followed by
BLOCK_GAP). Thumbnails are centred in their T x T cell.
"""

from __future__ import annotations

import html
import io
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from unicom import storage
from unicom.errors import InputError
from unicom.files import sweep_temporaries, write_bytes_atomic, write_text_atomic
from unicom.formats.clusters import ClusterFolder
from unicom.formats.embeddings import OCCURRENCE, EmbeddingFolders
from unicom.data.transforms import jpeg_data_uri, thumbnail_of
from unicom.progress import progress

LABEL_WIDTH = 160
GAP = 4
BLOCK_GAP = 12
MIN_THUMBNAIL = 24  # a row's label is two lines of Pillow's default font, drawn 2 pixels below the row's top
MAX_SHEET_PIXELS = 2 * 89_478_485  # Pillow refuses to open larger images (decompression bombs)
BACKGROUND = (255, 255, 255)
CENTROID_BLOCK_ROWS = 65_536  # centroids searched at once for the nearest clusters
SOURCE_COLUMNS = ("shard", "image_path")  # where the metadata says a sample was read from


@dataclass
class Sample:
    """One drawn sample: its label-file part and row, key, caption, where it was read from,
    and its thumbnail (None with ``problem`` when it could not be decoded). ``occurrence``:
    which sample of its key it is in its shard (the label file's ``occurrence``, see
    :mod:`unicom.formats.clusters`); for label files without that column, the label rows of
    the part before it with the same key (the n-th row of a key taken for the n-th sample).
    For labels keyed by another metadata column (``--key-column caption``), once described:
    the sample's own key and its occurrence (the metadata's, else among its rows)."""

    part: int
    row: int
    key: object
    occurrence: int = 0
    caption: str | None = None
    source: str = ""
    thumbnail: object = None
    problem: str | None = None


@dataclass
class ClusterRow:
    """A cluster as the sheet shows it; ``similarity``: the cosine of its centroid to the
    block's cluster (None for the block's own row)."""

    cluster: int
    size: int
    similarity: float | None = None
    samples: list[Sample] = field(default_factory=list)


@dataclass
class ContactSheet:
    """Blocks of rows: ``blocks[b][0]`` is a chosen cluster, the rest its nearest clusters."""

    blocks: list[list[ClusterRow]]
    samples_per_row: int
    thumbnail: int
    k: int
    title: str = ""


# --------------------------------------------------------------------------- which clusters


def choose_clusters(k: int, clusters: Sequence[int] | None = None, random: int | None = None, sizes=None,
                    seed: int = 0, where: str = "") -> list[int]:
    """The chosen cluster ids: ``clusters`` checked against k, or ``random`` non-empty
    clusters (by ``sizes``) drawn with ``seed``, in increasing order."""
    if (clusters is None) == (random is None):
        raise InputError("choose the clusters to show: --clusters 3,17 or --random N")
    if clusters is not None:
        if not clusters:
            raise InputError("--clusters names no cluster id; give the ids to show, e.g. --clusters 3,17, or "
                             "--random N")
        missing = [c for c in clusters if not 0 <= c < k]
        if missing:
            raise InputError(f"{where}: no cluster {', '.join(map(str, missing))}; the run has k = {k:,} clusters "
                             f"(ids 0..{k - 1})")
        return list(dict.fromkeys(int(c) for c in clusters))
    if random < 1:
        raise InputError(f"--random {random}: give a positive number of clusters")
    candidates = np.flatnonzero(np.asarray(sizes) > 0)
    if len(candidates) == 0:
        raise InputError(f"{where}: every cluster is empty")
    chosen = np.random.default_rng([seed]).choice(candidates, min(random, len(candidates)), replace=False)
    return sorted(int(c) for c in chosen)


def nearest_clusters(centroids, clusters: Sequence[int], count: int,
                     block_rows: int = CENTROID_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` clusters whose centroids are nearest to each of ``clusters``' by cosine.

    centroids: (k, d), memory-mapped or not, read ``block_rows`` rows at a time. Returns
    (similarities float32 (len(clusters), count), ids int64 (len(clusters), count)), best
    first, equal similarities by lower id, a cluster never its own neighbour; ``count`` is
    cut to k - 1.
    """
    from unicom.evaluate.metrics import knn_search

    k = len(centroids)
    count = min(count, k - 1)
    clusters = np.asarray(clusters, dtype=np.int64)
    if count < 1:
        return np.zeros((len(clusters), 0), np.float32), np.zeros((len(clusters), 0), np.int64)
    query = np.array(centroids[clusters], dtype=np.float32)
    found_sims, found_ids = [], []
    for start in range(0, k, block_rows):
        block = np.array(centroids[start:start + block_rows], dtype=np.float32)
        sims, ids = knn_search(query, block, min(count + 1, len(block)))
        found_sims.append(sims)
        found_ids.append(ids + start)
    sims, ids = np.concatenate(found_sims, axis=1), np.concatenate(found_ids, axis=1)
    best_sims, best_ids = [], []
    for q, cluster in enumerate(clusters):
        keep = ids[q] != cluster
        s, i = sims[q][keep], ids[q][keep]
        order = np.lexsort((i, -s))[:count]
        best_sims.append(s[order])
        best_ids.append(i[order])
    return np.stack(best_sims).astype(np.float32), np.stack(best_ids).astype(np.int64)


# --------------------------------------------------------------------------- which samples


def _lowest_per_cluster(labels: np.ndarray, priority: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` lowest priorities of each label, by label then priority."""
    order = np.lexsort((priority, labels))
    ordered = labels[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return order[rank < count]


def draw_samples(folder: ClusterFolder, clusters: Sequence[int], count: int, seed: int = 0):
    """Up to ``count`` samples of each of ``clusters``, a seeded uniform draw over the label files.

    Returns ``({cluster: [(part, row), ...]}`` in draw order, ``{cluster: labelled
    samples}``); memory holds ``count`` candidates per cluster besides one label file.
    """
    numbers = sorted(folder.labelled_parts())
    if not numbers:
        raise InputError(f"{folder.labels}: no labels_<N>.parquet files; run `unicom cluster` (or `assign`) first")
    wanted = np.asarray(sorted(set(int(c) for c in clusters)), dtype=np.int64)
    sizes = dict.fromkeys(wanted.tolist(), 0)
    kept = {name: np.zeros(0, dtype) for name, dtype in
            (("label", np.int64), ("priority", np.float64), ("part", np.int64), ("row", np.int64))}
    for number in progress(numbers, desc="labels", unit="part"):
        labels = folder.read_labels(number, ["label"]).column("label").to_numpy()
        priority = np.random.default_rng([seed, number]).random(len(labels))
        rows = np.flatnonzero(np.isin(labels, wanted))
        found, counts = np.unique(labels[rows], return_counts=True)
        for cluster, n in zip(found.tolist(), counts.tolist()):
            sizes[cluster] += n
        new = {"label": labels[rows], "priority": priority[rows], "part": np.full(len(rows), number), "row": rows}
        kept = {name: np.concatenate([kept[name], new[name]]) for name in kept}
        keep = _lowest_per_cluster(kept["label"], kept["priority"], count)
        kept = {name: values[keep] for name, values in kept.items()}
    drawn = {cluster: [] for cluster in sizes}
    for label, part, row in zip(kept["label"].tolist(), kept["part"].tolist(), kept["row"].tolist()):
        drawn[label].append((part, row))
    return drawn, sizes


# --------------------------------------------------------------------------- where they came from


def _describe(samples: list[Sample], folders: EmbeddingFolders, number: int, key_column: str,
              exact: bool = False) -> None:
    """Fill key-matched caption and source of ``samples`` (all of part ``number``) from its
    metadata; ``exact``: the samples' occurrences are their label rows' (the metadata's own)."""
    table = folders.load("metadata", number)
    path = folders.path("metadata", number)
    if key_column not in table.column_names:
        raise InputError(f"{path}: no {key_column!r} column, which the labels were keyed by; give the embedding "
                         "folder the clusters were made from")
    source = next((name for name in SOURCE_COLUMNS if name in table.column_names), None)
    if source is None:
        raise InputError(f"{path}: neither a shard nor an image_path column, so where the samples came from is "
                         "unknown; `unicom embed` writes them")
    occurrences = table.column(OCCURRENCE).to_pylist() if OCCURRENCE in table.column_names else None
    exact = exact and occurrences is not None
    rows: dict = {}
    for i, key in enumerate(table.column(key_column).to_pylist()):
        of_key = rows.setdefault(key, {})  # occurrence -> row (without exact ones: the n-th row of the key)
        of_key[occurrences[i] if exact else len(of_key)] = i
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else None
    sources = table.column(source).to_pylist()
    for sample in samples:
        row = rows.get(sample.key, {}).get(sample.occurrence)
        if row is None:
            raise InputError(f"{path}: no row with {key_column} {sample.key!r} (labels_{number}.parquet row "
                             f"{sample.row}); the labels were made from other embeddings: give those with --embeddings")
        sample.caption = None if captions is None else captions[row]
        sample.source = f"{source}:{sources[row]}"
    if key_column != "key" and "key" in table.column_names:
        # labels keyed by a caption or URL: the shard member (or file) is found by the sample's own key
        own = table.column("key").to_pylist()
        at = {rows[sample.key][sample.occurrence]: sample for sample in samples}
        met: dict = {}
        for i, key in enumerate(own[: max(at) + 1]):
            met[key] = met.get(key, -1) + 1
            if i in at:
                at[i].key, at[i].occurrence = key, met[key] if occurrences is None else occurrences[i]


def _shard_locations(inputs: Sequence[str] | None, needed: set[str]) -> dict[str, object]:
    """``{shard name: location}`` for the shards ``needed``, from ``inputs`` (shard paths,
    patterns or folders, as ``unicom embed`` took them)."""
    from unicom.data.shards import expand_shards, shard_name, written_name

    shown = ", ".join(sorted(needed)[:5]) + (" ..." if len(needed) > 5 else "")
    if not inputs:
        raise InputError(f"the samples come from the shards {shown} (metadata column shard); give --input with the "
                         "shards `unicom embed` read (paths, patterns or URLs)")
    shards = expand_shards(inputs)
    located = {}
    for location in shards:  # by name, and by the name as written (http names: folders embedded before
        located[shard_name(location)] = location  # names were unquoted)
        located.setdefault(written_name(location), location)
    missing = sorted(needed - set(located))
    if missing:
        raise InputError(f"shards {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are not among --input "
                         f"({len(shards)} shards found); give the shards the embeddings were made from")
    return located


def shard_columns(folders: EmbeddingFolders):
    """The columns of parquet shards that the embeddings were read by (``unicom embed
    --image-column`` ..., recorded in the folder's configuration), as a
    :class:`unicom.data.parquet_shards.ShardColumns`; the usual names for folders given
    one by one, which carry no configuration."""
    from unicom.data.parquet_shards import ShardColumns
    from unicom.formats.embeddings import CONFIG_FILE, SHARD_COLUMNS, read_config

    if folders.root is None:
        return ShardColumns()
    config = read_config(folders.root) or {}
    return ShardColumns.from_named(config.get(SHARD_COLUMNS), storage.text(storage.join(folders.root, CONFIG_FILE)))


def _read_from_shard(location, samples: list[Sample], side: int, columns=None) -> None:
    from unicom.data.shards import ShardReadError, read_shard_samples

    wanted = {(str(sample.key), sample.occurrence): sample for sample in samples}
    # keys read only the first sample of each key: a later sample of a repeated key needs the whole shard
    keys = None if any(n for _, n in wanted) else {key for key, _ in wanted}
    met: dict[str, int] = {}
    try:
        for found in read_shard_samples(location, keys=keys, columns=columns):
            n = met[found.key] = met.get(found.key, -1) + 1
            sample = wanted.pop((found.key, n), None)
            if sample is not None:
                _decode_into(sample, found.image_bytes(), side)
            if not wanted:
                break
    except ShardReadError as error:
        raise InputError(f"{storage.text(location)}: the shard cannot be read ({error.reason}); restore it, or give "
                         "--input where it is now") from error
    if wanted:
        keys = ", ".join(key for key, _ in list(wanted)[:3])
        raise InputError(f"{storage.text(location)}: no sample with key {keys}; the shard is not the one the "
                         "embeddings were made from: give the right ones with --input")


def _decode_into(sample: Sample, source, side: int) -> None:
    from unicom.data.transforms import DecodeError

    if source is None:
        sample.problem = "no image in the sample"
        return
    try:
        sample.thumbnail = thumbnail_of(source, side)
    except DecodeError as error:
        sample.problem = str(error)


def _read_file(sample: Sample, path: str, side: int) -> None:
    try:
        present = storage.is_file(path)
    except storage.FetchError as error:
        raise InputError(error.advice("check the URL and the credentials (--storage-options)")) from error
    if not present:
        raise InputError(f"{path}: image not found (key {sample.key!r}, part {sample.part}); give --input with the "
                         "folder the images are in now")
    try:
        _decode_into(sample, path, side)
    except storage.FetchError as error:
        raise InputError(error.advice("check the URL and the credentials (--storage-options)")) from error


def read_thumbnails(samples: list[Sample], inputs: Sequence[str] | None, side: int, columns=None) -> None:
    """Decode the thumbnail of every sample: shard members one shard at a time, files one by one.

    ``inputs``: where the shards are (required for samples read from shards), or the
    folder that now holds an image folder's images (keys are paths relative to it).
    ``columns``: the columns of parquet shards (:func:`shard_columns`).
    """
    from_shards: dict[str, list[Sample]] = {}
    files = []
    for sample in samples:
        kind, _, value = sample.source.partition(":")
        if kind == "shard":
            from_shards.setdefault(value, []).append(sample)
        else:
            files.append((sample, value))
    bar = progress(total=len(samples), desc="thumbnails", unit="img")
    if from_shards:
        located = _shard_locations(inputs, set(from_shards))
        for name, group in sorted(from_shards.items()):
            _read_from_shard(located[name], group, side, columns)
            bar.update(len(group))
    for sample, path in files:
        if inputs:
            if len(inputs) != 1:
                raise InputError("these samples were read from image files: give --input once, the folder they are in")
            path = storage.text(storage.join(inputs[0], str(sample.key)))
        _read_file(sample, path, side)
        bar.update(1)
    bar.close()


# --------------------------------------------------------------------------- the sheet


def build_contact_sheet(
    out: str | os.PathLike,
    folders: EmbeddingFolders,
    *,
    clusters: Sequence[int] | None = None,
    random: int | None = None,
    samples: int = 8,
    neighbours: int = 4,
    seed: int = 0,
    inputs: Sequence[str] | None = None,
    thumbnail: int = 128,
) -> ContactSheet:
    """The sheet of ``clusters`` (or ``random`` clusters) of the run in ``out``, each with
    its ``neighbours`` nearest clusters, ``samples`` images each, read from ``inputs``."""
    if samples < 1 or neighbours < 0 or thumbnail < MIN_THUMBNAIL or seed < 0:
        raise InputError(f"need samples >= 1, neighbours >= 0, a thumbnail of at least {MIN_THUMBNAIL} pixels (the "
                         f"height of a row's two-line label) and a seed >= 0 (got {samples}, {neighbours}, {thumbnail}, "
                         f"{seed})")
    folder = ClusterFolder(out)
    centroids, record = folder.read_centroids(mmap=True)
    folder.check_recorded_digests()
    k = record["k"]
    sizes = None
    if random is not None:  # clusters left without samples by --min-cluster-size are not drawn
        sizes = folder.read_sizes()
        sizes = np.where(sizes >= int(folder.read_assignment().get("dropped_below", 0)), sizes, 0)
    chosen = choose_clusters(k, clusters, random, sizes, seed, str(folder.root))
    sims, ids = nearest_clusters(centroids, chosen, neighbours)
    width, height = sheet_size(ContactSheet([[None] * (1 + ids.shape[1])] * len(chosen), samples, thumbnail, k))
    if width * height > MAX_SHEET_PIXELS:  # said before any shard is read
        raise InputError(f"the sheet would be {width:,} x {height:,} pixels, more than Pillow opens "
                         f"({MAX_SHEET_PIXELS:,}); show fewer clusters, --samples or --neighbours, or a smaller --thumbnail")
    shown = sorted(set(chosen) | set(ids.ravel().tolist()))
    drawn, counts = draw_samples(folder, shown, samples, seed)

    by_part: dict[int, list[Sample]] = {}
    rows_of = {cluster: [Sample(part, row, None) for part, row in drawn[cluster]] for cluster in shown}
    for cluster_samples in rows_of.values():
        for sample in cluster_samples:
            by_part.setdefault(sample.part, []).append(sample)
    for number, part_samples in sorted(by_part.items()):
        table = folder.read_labels(number)
        keys = table.column("key").to_pylist()
        exact = OCCURRENCE in table.column_names
        if exact:  # each row names its sample's occurrence of the key
            occurrence = table.column(OCCURRENCE).to_pylist()
        else:
            drawn_rows = {sample.row for sample in part_samples}
            drawn_keys = {keys[row] for row in drawn_rows}
            met, occurrence = {}, {}
            for row, key in enumerate(keys):  # how many rows before each drawn one share its key
                if key in drawn_keys:
                    met[key] = met.get(key, -1) + 1
                    if row in drawn_rows:
                        occurrence[row] = met[key]
        for sample in part_samples:
            sample.key, sample.occurrence = keys[sample.row], occurrence[sample.row]
        _describe(part_samples, folders, number, folder.label_facts(number)["key_column"], exact)
    read_thumbnails([s for group in rows_of.values() for s in group], inputs, thumbnail, shard_columns(folders))

    blocks = []
    for q, cluster in enumerate(chosen):
        block = [ClusterRow(cluster, counts[cluster], None, rows_of[cluster])]
        block += [ClusterRow(int(c), counts[int(c)], float(s), rows_of[int(c)]) for s, c in zip(sims[q], ids[q])]
        blocks.append(block)
    title = f"{storage.text(folder.root)}: {len(chosen)} of {k:,} clusters, {record.get('fusion', '')} k-means"
    return ContactSheet(blocks, samples, thumbnail, k, title)


def sheet_size(sheet: ContactSheet) -> tuple[int, int]:
    """(width, height) of the PNG (see the module docstring)."""
    cell = sheet.thumbnail + GAP
    rows = sum(len(block) for block in sheet.blocks)
    return LABEL_WIDTH + sheet.samples_per_row * cell + GAP, GAP + rows * cell + BLOCK_GAP * (len(sheet.blocks) - 1)


def _row_text(row: ClusterRow) -> str:
    if row.similarity is None:
        return f"cluster {row.cluster}\n{row.size:,} images"
    return f"  near {row.cluster}, cos {row.similarity:.3f}\n  {row.size:,} images"


def render_png(sheet: ContactSheet) -> bytes:
    """The sheet as PNG bytes: one row of thumbnails per cluster, labelled on the left."""
    from PIL import Image, ImageDraw

    side, cell = sheet.thumbnail, sheet.thumbnail + GAP
    canvas = Image.new("RGB", sheet_size(sheet), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    top = GAP
    for block in sheet.blocks:
        for r, row in enumerate(block):
            y = top + r * cell
            draw.multiline_text((GAP, y + 2), _row_text(row), fill=(0, 0, 0) if r == 0 else (90, 90, 90))
            for j, sample in enumerate(row.samples[: sheet.samples_per_row]):
                x = LABEL_WIDTH + GAP + j * cell
                if sample.thumbnail is None:
                    draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(200, 0, 0))
                    continue
                w, h = sample.thumbnail.size
                canvas.paste(sample.thumbnail, (x + (side - w) // 2, y + (side - h) // 2))
        top += len(block) * cell + BLOCK_GAP
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def render_html(sheet: ContactSheet) -> str:
    """The sheet as one self-contained HTML page (thumbnails inline), each sample captioned
    with its key, its caption and where it was read from."""
    e = html.escape
    side = sheet.thumbnail
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(sheet.title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}section{margin-bottom:2em}"
        ".row{display:flex;align-items:flex-start;gap:6px;margin:4px 0}.label{width:11em;flex:none}"
        f"figure{{margin:0;width:{side}px}}figcaption{{font-size:11px;overflow-wrap:anywhere}}"
        ".problem{color:#b00}.neighbour .label{color:#555}</style></head><body>",
        f"<h1>{e(sheet.title)}</h1>",
        "<p>Each section shows a cluster, then the clusters whose centroids are nearest to it by cosine "
        "similarity.</p>",
    ]
    for block in sheet.blocks:
        parts.append(f'<section data-cluster="{block[0].cluster}"><h2>cluster {block[0].cluster}</h2>')
        for r, row in enumerate(block):
            role = "cluster" if r == 0 else "neighbour"
            similarity = "" if row.similarity is None else f' data-similarity="{row.similarity:.6f}"'
            label = e(_row_text(row).strip()).replace("\n", "<br>")
            parts.append(f'<div class="row {role}" data-cluster="{row.cluster}"{similarity}>'
                         f'<div class="label">{label}</div>')
            for sample in row.samples[: sheet.samples_per_row]:
                image = (f'<img src="{jpeg_data_uri(sample.thumbnail)}" alt="{e(str(sample.key))}">'
                         if sample.thumbnail is not None else f'<div class="problem">{e(sample.problem or "")}</div>')
                caption = f"<br>{e(sample.caption)}" if sample.caption else ""
                parts.append(f'<figure data-key="{e(str(sample.key))}" data-part="{sample.part}">{image}'
                             f'<figcaption><b>{e(str(sample.key))}</b>{caption}<br><small>{e(sample.source)}</small>'
                             "</figcaption></figure>")
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def sheet_paths(png_path) -> tuple[object, object]:
    """Where a sheet asked for at ``png_path`` goes: (the PNG, the HTML page beside it); an
    error for a path that does not end in ``.png``. Cheap: check it before reading any image."""
    png_path = storage.path(png_path)
    if not storage.name(png_path).lower().endswith(".png"):
        raise InputError(f"{png_path}: the contact sheet is a PNG; give a path ending in .png")
    return png_path, png_path.with_suffix(".html")


def write_contact_sheet(sheet: ContactSheet, png_path) -> tuple[object, object]:
    """Write the sheet's PNG at ``png_path`` and its HTML page beside it (``.html``), each
    whole or not at all; returns both locations."""
    png_path, html_path = sheet_paths(png_path)
    sweep_temporaries(png_path.parent, [storage.name(png_path), storage.name(html_path)])
    write_bytes_atomic(png_path, render_png(sheet))
    write_text_atomic(html_path, render_html(sheet))
    return png_path, html_path


__all__ = [
    "ClusterRow",
    "ContactSheet",
    "Sample",
    "build_contact_sheet",
    "choose_clusters",
    "draw_samples",
    "nearest_clusters",
    "read_thumbnails",
    "render_html",
    "render_png",
    "sheet_paths",
    "sheet_size",
    "write_contact_sheet",
]
