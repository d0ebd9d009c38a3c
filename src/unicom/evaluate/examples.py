"""Retrieval examples: queries beside their first results, each result marked relevant or not.

What torchreid's ``visrank`` and fast-reid's visualiser draw, for every retrieval protocol
here: a seeded draw of queries (or of those whose first result is wrong), each with its
first k results of the evaluated search (re-ranked when the evaluation re-ranks), marked
relevant (green), not relevant (red) or ignored by the protocol (grey: the Revisited
setups' junk images, which their metrics remove from the ranking). :func:`rank_examples`
chooses and ranks them; :func:`render_png` and :func:`render_html` draw them, the page
self-contained (thumbnails inline), each figure with its key and score.

Layout of the PNG (pixels; T the thumbnail side, k the results)::

    width  = LABEL_WIDTH + (k + 1) * (T + GAP) + QUERY_GAP + GAP
    height = GAP + rows * (T + CAPTION + GAP)

Row r holds the query's thumbnail at ``x = LABEL_WIDTH + GAP`` and result j (0-based) at
``x = LABEL_WIDTH + GAP + QUERY_GAP + (j + 1) * (T + GAP)``, each framed by a BORDER-pixel
band of its mark's colour, with its rank and score in the CAPTION band below.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from unicom.errors import InputError
from unicom.evaluate.metrics import _blocks, as_embeddings, default_chunk_size, ranked_top_k

DEFAULT_K = 8
LABEL_WIDTH = 180
GAP = 6
QUERY_GAP = 12
CAPTION = 14
BORDER = 3
THUMBNAIL = 96
RELEVANT, NOT_RELEVANT, IGNORED = 1, 0, -1
COLOURS = {RELEVANT: (20, 150, 40), NOT_RELEVANT: (210, 30, 30), IGNORED: (150, 150, 150)}
QUERY_COLOUR = (30, 80, 200)
MARK_NAMES = {RELEVANT: "relevant", NOT_RELEVANT: "not relevant", IGNORED: "ignored"}


@dataclass(frozen=True)
class Examples:
    """Which examples to draw: ``count`` queries drawn at random (a generator seeded by
    ``seed``), among those whose first result is not relevant when ``failures``, each with
    its first ``k`` results; ``thumbnail`` the side of the drawn images in pixels."""

    count: int
    k: int = DEFAULT_K
    failures: bool = False
    seed: int = 0
    thumbnail: int = THUMBNAIL

    def __post_init__(self):
        for name, low in (("count", 1), ("k", 1), ("thumbnail", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"examples: {name} is a whole number of at least {low}; got {value!r}")

    def describe(self) -> dict:
        return {"count": int(self.count), "k": int(self.k), "failures": bool(self.failures), "seed": int(self.seed),
                "thumbnail": int(self.thumbnail)}


@dataclass
class Item:
    """An image as the examples show it: its ``key`` and ``source`` (a path or URL, or what
    :func:`unicom.data.transforms.decode_image` takes, such as a query crop; None where the
    image is not known here)."""

    key: str
    source: Any = None


@dataclass(frozen=True)
class ShardSample:
    """An image inside a webdataset shard (a tar, or a parquet file holding the images): the
    ``occurrence``-th sample with ``key`` (None: the key's first with an image) in the shard
    file ``shard`` of ``images``, a :class:`unicom.search.item_images.ShardImages` over the
    folder of the shards (local or a URL), as an embedding folder made from shards names it
    (its metadata's ``shard``, ``key`` and ``occurrence``)."""

    images: Any
    shard: str
    key: str
    occurrence: int | None = None

    def read(self) -> bytes:
        """The image's bytes; FileNotFoundError naming the shard when it or the sample is not there."""
        from unicom import storage

        where = storage.text(self.images.location(self.shard)) if self.shard else storage.text(self.images.root)
        try:
            data = self.images.read(self.shard, self.key, occurrence=self.occurrence)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {where}") from None
        if data is None:
            raise FileNotFoundError(f"no image of the sample {self.key} in {where}")
        return data


@dataclass
class Shown:
    """One drawn image: its key, rank (0 for the query), score, mark and thumbnail (None
    with ``problem`` when it could not be read)."""

    key: str
    rank: int = 0
    score: float | None = None
    mark: int | None = None
    thumbnail: Any = None
    problem: str | None = None


@dataclass
class ExampleRow:
    """A query (its row among the queries scored) and its first results (``ids``: their
    gallery rows)."""

    row: int
    query: Shown
    results: list[Shown] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


class Marks:
    """What a protocol calls relevant: ``marks(row, ids)`` gives, for query ``row`` and gallery
    rows ``ids`` (k,), :data:`RELEVANT`, :data:`NOT_RELEVANT` or :data:`IGNORED` each.

    One of: ``query_labels`` (with ``gallery_labels``, or None for leave-one-out: a result
    of the query's class is relevant), ``relevant`` (per query, the relevant gallery rows),
    or ``setup`` (positives, ignored) lists per query (a Revisited setup)."""

    def __init__(self, query_labels=None, gallery_labels=None, relevant=None, setup=None):
        self.query_labels = None if query_labels is None else np.asarray(query_labels)
        self.gallery_labels = self.query_labels if gallery_labels is None else np.asarray(gallery_labels)
        self.relevant, self.setup = relevant, setup

    def __call__(self, row: int, ids: np.ndarray) -> np.ndarray:
        if self.setup is not None:
            positives, ignored = self.setup
            marks = np.where(np.isin(ids, np.asarray(ignored[row])), IGNORED, NOT_RELEVANT)
            return np.where(np.isin(ids, np.asarray(positives[row])), RELEVANT, marks)
        if self.relevant is not None:
            return np.where(np.isin(ids, np.asarray(self.relevant[row])), RELEVANT, NOT_RELEVANT)
        return np.where(self.gallery_labels[ids] == self.query_labels[row], RELEVANT, NOT_RELEVANT)


def setup_shown(setups: dict, metric: str) -> str:
    """The Revisited setup whose marks the examples show: the headline metric's
    (``map_medium`` -> ``medium``), else the first."""
    name = metric.split("_", 1)[1] if metric.startswith(("map_", "mp@")) and "_" in metric else ""
    return name if name in setups else next(iter(setups))


def ranked(query, gallery, rows: np.ndarray, k: int, *, rescore=None, chunk_size: int | None = None):
    """The first ``k`` results of query ``rows`` as the evaluation searches: (scores float32
    (n, k), gallery rows int64 (n, k)), best first, equal scores by lower row; with
    ``gallery=None`` leave-one-out (a query's own row left out); ``rescore``: the re-scoring of a
    re-ranked search (:func:`unicom.evaluate.dims.score`'s)."""
    q = as_embeddings(query, "query")
    g = q if gallery is None else as_embeddings(gallery, "gallery", q.device)
    k = min(k, g.shape[0] - int(gallery is None))
    chunk_size = chunk_size or default_chunk_size(g.shape[0])
    scores = np.empty((len(rows), k), dtype=np.float32)
    ids = np.empty((len(rows), k), dtype=np.int64)
    at = 0
    for block_rows, block in _blocks(q, g, torch.as_tensor(rows, dtype=torch.int64, device=q.device), chunk_size,
                                     gallery is None, rescore):
        values, indices = ranked_top_k(block, k)
        scores[at:at + len(block_rows)] = values.cpu().numpy()
        ids[at:at + len(block_rows)] = indices.cpu().numpy()
        at += len(block_rows)
    return scores, ids


def rank_examples(query, gallery, marks: Marks, choice: Examples, query_items: Sequence[Item],
                  gallery_items: Sequence[Item], *, rescore=None, chunk_size: int | None = None) -> list[ExampleRow]:
    """Choose the queries ``choice`` asks for and rank their first results (:func:`ranked`),
    each marked by ``marks``; ``query_items``/``gallery_items`` (for leave-one-out the queries'
    again) name each row. With ``choice.failures`` every query is ranked to find those whose
    first result that the protocol does not ignore is not relevant (a search of them all);
    fewer rows than ``choice.count`` come back when fewer queries qualify."""
    n = len(query_items)
    generator = np.random.default_rng(choice.seed)
    if choice.failures:
        all_scores, all_ids = ranked(query, gallery, np.arange(n), choice.k, rescore=rescore, chunk_size=chunk_size)
        failing = [row for row in range(n) if _first_counted(marks(row, all_ids[row])) != RELEVANT]
        rows = np.sort(generator.choice(failing, min(choice.count, len(failing)), replace=False)) if failing else []
        scores, ids = all_scores[rows], all_ids[rows]
    else:
        rows = np.sort(generator.choice(n, min(choice.count, n), replace=False))
        scores, ids = ranked(query, gallery, rows, choice.k, rescore=rescore, chunk_size=chunk_size)
    examples = []
    for row, row_scores, row_ids in zip(rows, scores, ids):
        row = int(row)
        shown = [Shown(gallery_items[int(i)].key, rank + 1, float(s), int(m))
                 for rank, (i, s, m) in enumerate(zip(row_ids, row_scores, marks(row, row_ids)))]
        examples.append(ExampleRow(row, Shown(query_items[row].key), shown, [int(i) for i in row_ids]))
    return examples


def _first_counted(marks: np.ndarray) -> int | None:
    """The mark of the first result the protocol counts (not ignored); None when all are ignored."""
    counted = marks[marks != IGNORED]
    return int(counted[0]) if len(counted) else None


def read_example_thumbnails(examples: list[ExampleRow], query_items: Sequence[Item], gallery_items: Sequence[Item],
                            side: int) -> None:
    """Decode the thumbnail of every image shown; an image that cannot be read here is shown
    as its problem (the embeddings of a benchmark may be scored without its images)."""
    from unicom.data.transforms import DecodeError, thumbnail_of
    from unicom.progress import progress

    pairs = [(shown, item) for example in examples
             for shown, item in zip([example.query, *example.results],
                                    [query_items[example.row], *(gallery_items[i] for i in example.ids)])]
    # images in shards are read a shard at a time (a shard is listed once, a remote tar by streaming it)
    pairs.sort(key=lambda pair: (pair[1].source.shard,) if isinstance(pair[1].source, ShardSample) else ("",))
    bar = progress(total=len(pairs), desc="example thumbnails", unit="img")
    try:
        for shown, item in pairs:
            if item.source is None:
                shown.problem = "no image known for this row"
            else:
                try:
                    source = item.source.read() if isinstance(item.source, ShardSample) else item.source
                    shown.thumbnail = thumbnail_of(source, side)
                except (DecodeError, OSError) as error:
                    shown.problem = str(error)
            bar.update(1)
    finally:
        bar.close()


def examples_record(examples: list[ExampleRow], choice: Examples, setup: str | None = None) -> dict:
    """The examples as ``metrics.json`` keeps them: the choice, and per query its key and
    its results' keys, scores and marks."""
    record = {**choice.describe(), "queries": [
        {"query": e.query.key, "results": [{"key": r.key, "score": r.score, "mark": MARK_NAMES[r.mark]}
                                           for r in e.results]} for e in examples]}
    if setup is not None:
        record["setup"] = setup
    return record


def _label(example: ExampleRow) -> str:
    first = next((r.rank for r in example.results if r.mark == RELEVANT), None)
    found = f"first relevant: {first}" if first is not None else f"none relevant in {len(example.results)}"
    return f"{example.query.key}\n{found}"


def image_size(examples: list[ExampleRow], side: int) -> tuple[int, int]:
    """(width, height) of the PNG (see the module docstring)."""
    k = max((len(e.results) for e in examples), default=0)
    return (LABEL_WIDTH + (k + 1) * (side + GAP) + QUERY_GAP + GAP,
            GAP + max(1, len(examples)) * (side + CAPTION + GAP))


def render_png(examples: list[ExampleRow], side: int) -> bytes:
    """The examples as PNG bytes: a row per query, the query framed in blue, each result in
    the colour of its mark, with its rank and score below."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", image_size(examples, side), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, example in enumerate(examples):
        y = GAP + r * (side + CAPTION + GAP)
        label = _label(example)
        draw.multiline_text((GAP, y + 2), "\n".join(_wrapped(line, 26) for line in label.split("\n")), fill=(0, 0, 0))
        cells = [(LABEL_WIDTH + GAP, example.query, QUERY_COLOUR, "query")]
        cells += [(LABEL_WIDTH + GAP + QUERY_GAP + (j + 1) * (side + GAP), shown, COLOURS[shown.mark],
                   f"{shown.rank}  {shown.score:.3f}") for j, shown in enumerate(example.results)]
        for x, shown, colour, caption in cells:
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
            inner = side - 2 * BORDER
            draw.rectangle((x + BORDER, y + BORDER, x + side - 1 - BORDER, y + side - 1 - BORDER), fill=(255, 255, 255))
            if shown.thumbnail is not None:
                image = shown.thumbnail.copy()
                image.thumbnail((inner, inner))
                w, h = image.size
                canvas.paste(image, (x + BORDER + (inner - w) // 2, y + BORDER + (inner - h) // 2))
            else:
                draw.line((x + BORDER, y + BORDER, x + side - 1 - BORDER, y + side - 1 - BORDER), fill=colour)
            draw.text((x, y + side + 1), caption, fill=(0, 0, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _wrapped(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width)) or text


def render_html(examples: list[ExampleRow], side: int, title: str, note: str = "") -> str:
    """The examples as one self-contained HTML page (thumbnails inline): a row per query,
    each result captioned with its rank, score, mark and key."""
    from unicom.data.transforms import jpeg_data_uri

    e = html.escape
    css = {RELEVANT: "relevant", NOT_RELEVANT: "wrong", IGNORED: "ignored"}
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}.row{display:flex;align-items:flex-start;gap:6px;margin:8px 0}"
        ".label{width:13em;flex:none;overflow-wrap:anywhere;font-size:13px}"
        f"figure{{margin:0;width:{side}px}}figure img,figure .problem{{box-sizing:border-box;width:{side}px;"
        f"height:{side}px;object-fit:contain;border:{BORDER}px solid}}"
        "figcaption{font-size:11px;overflow-wrap:anywhere}.query img,.query .problem{border-color:#1e50c8}"
        ".relevant img,.relevant .problem{border-color:#149628}.wrong img,.wrong .problem{border-color:#d21e1e}"
        ".ignored img,.ignored .problem{border-color:#969696}.problem{font-size:10px;color:#b00;overflow:hidden}"
        ".query{margin-right:12px}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p>Each row: a query (blue), then its first results, best first, framed green where relevant, red where "
        f"not, grey where the protocol ignores them.{(' ' + e(note)) if note else ''}</p>",
    ]
    for example in examples:
        label = e(_label(example)).replace("\n", "<br>")
        parts.append(f'<div class="row" data-query="{e(example.query.key)}" data-row="{example.row}">'
                     f'<div class="label">{label}</div>')
        for shown in [example.query, *example.results]:
            kind = "query" if shown.mark is None else css[shown.mark]
            image = (f'<img src="{jpeg_data_uri(shown.thumbnail)}" alt="{e(shown.key)}">' if shown.thumbnail is not None
                     else f'<div class="problem">{e(shown.problem or "")}</div>')
            said = "query" if shown.mark is None else f"{shown.rank} · {shown.score:.4f} · {MARK_NAMES[shown.mark]}"
            extra = "" if shown.mark is None else \
                f' data-rank="{shown.rank}" data-score="{shown.score:.6f}" data-mark="{MARK_NAMES[shown.mark]}"'
            parts.append(f'<figure class="{kind}" data-key="{e(shown.key)}"{extra}>{image}'
                         f"<figcaption>{e(said)}<br><b>{e(shown.key)}</b></figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


__all__ = [
    "Examples",
    "ExampleRow",
    "Item",
    "Marks",
    "Shown",
    "examples_record",
    "rank_examples",
    "ranked",
    "read_example_thumbnails",
    "render_html",
    "render_png",
    "setup_shown",
]
