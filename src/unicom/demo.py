"""The whole pipeline on a laptop CPU in a few minutes: ``python -m unicom.demo --out runs/demo``.

Data: letters and digits rendered from the TrueType fonts that matplotlib ships
(``matplotlib/mpl-data/fonts/ttf``: DejaVu Sans, Sans Mono and Serif, STIX General, each
in four weights and slants, and five Computer Modern faces for ASCII), no download. A
class is a character (Latin, Greek, Cyrillic and IPA letters, digits; about 290 after
dropping those that render like another); its instances are the fonts that have it. Each
glyph is drawn at one size, its ink centred in a 32x32 image. A seeded two thirds of the
characters are the training collection, written as webdataset shards *without* their
labels; the other third is held out for evaluation only. The stages are the real ones,
meeting through their files:

1. clustering features in the embedding layout (``img_emb/`` + ``metadata/``): with no
   pretrained network available offline, the pixels (16x16 grey levels, centred,
   L2-normalised) play CLIP's part;
2. ``unicom cluster``: k-means pseudo-labels of the training glyphs, and ``unicom cluster
   show``: a contact sheet of a few pseudo-classes beside their nearest clusters;
3. ``unicom train`` (the shipped recipe ``demo``): a small CLIP-shaped ViT trained from scratch
   on the pseudo-labels with PartialFC (ArcFace, sample_rate < 1) and random resized crops
   (the glyph moved and scaled a little); then a shorter compact epoch from that run with
   feature_rate 0.5;
4. ``unicom evaluate`` on the held-out characters (classes never seen in training): the
   fonts are split in two, one half the gallery (clean glyphs), the other half the
   queries, once clean and once varied (each query glyph shifted, scaled, rotated and
   drawn with a random stroke width). Recall@1 at several embedding dimensions, for the
   clustering features, the network at its random initialisation (``unicom train`` of the
   same recipe with ``train.steps=0``), the trained network, and the trained network after
   the compact epoch.

Writes ``OUT/report.md``, ``OUT/metrics.json`` and plots (``queries.png``, ``loss.png``,
``recall_vs_dimension.png``, the clustering's ``cluster_sizes.png``, the contact sheet
``clusters.png`` with its captioned ``clusters.html``, and the trained network's mistakes,
``evaluate/<protocol>/trained_network/examples.png`` and ``examples.html``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The instances: matplotlib's text faces (its STIX size variants and symbol faces hold no letters).
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
COMPUTER_MODERN = ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf")  # ASCII letters and digits only
PROBE_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf")  # characters drawn alike in these are one class
SAME_GLYPH = 4.0  # mean absolute difference (grey levels of 255) under which two characters draw alike
IMAGE_SIZE = 32
SUPERSAMPLE = 4  # glyphs are drawn at 4x and reduced by box filtering (anti-aliased edges)
EM = 26  # font size in pixels: capitals about 19 pixels high
MAX_INK = 28  # the rare glyph whose ink is larger than this is shrunk to fit
HELD_OUT_SHARE = 3  # one character in three is held out
SHARDS = 4
PIXEL_SIDE = 16  # clustering features: 16x16 grey levels
COMPACT_FRACTION = 8  # the compact epoch runs an eighth of the main run's steps
DIMENSIONS = (8, 16, 32, 64)
PROTOCOLS = ("clean", "varied")
SHOWN_CLUSTERS = 6  # pseudo-classes drawn on the contact sheet
SHOWN_MISTAKES = 8  # the trained network's failed queries drawn with their first results (examples.png)


@dataclass(frozen=True)
class Variation:
    """How a query glyph is drawn differently from the gallery: a size factor, a rotation
    (degrees, counter-clockwise), a shift of the centre (pixels) and extra stroke width
    (pixels on each side of every stroke)."""

    scale: float = 1.0
    angle: float = 0.0
    shift: tuple[int, int] = (0, 0)
    stroke: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Variation":
        """A random variation: size x0.8-1.1, rotation within 12 degrees, shift within 3 pixels, stroke 0 or 1."""
        return cls(scale=float(rng.uniform(0.8, 1.1)), angle=float(rng.uniform(-12, 12)),
                   shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), stroke=int(rng.integers(0, 2)))


def demo_recipe() -> Path:
    """The shipped recipe ``demo`` (``unicom/configs/demo.yaml``)."""
    from unicom.engine.recipe import recipe_file

    return recipe_file("demo")


def font_folder() -> Path:
    """matplotlib's folder of TrueType fonts; every font of :data:`FONTS` must be there."""
    import matplotlib

    from unicom.errors import InputError

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [name for name in FONTS if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: fonts {missing} are missing; reinstall matplotlib (pip install --force-reinstall matplotlib)")
    return folder


class GlyphRenderer:
    """Draws characters of the demo's fonts as 32x32 RGB images, dark ink on white."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or font_folder()
        self._fonts: dict = {}
        self._charmaps: dict[str, frozenset[int]] = {}

    def covers(self, font: str, char: str) -> bool:
        """Whether ``font`` has a glyph of its own for ``char`` (its character map lists it)."""
        if font not in self._charmaps:
            from matplotlib import ft2font

            self._charmaps[font] = frozenset(ft2font.FT2Font(str(self.folder / font)).get_charmap())
        return ord(char) in self._charmaps[font]

    def fonts_of(self, char: str) -> list[str]:
        return [font for font in FONTS if self.covers(font, char)]

    def render(self, char: str, font: str, variation: Variation = Variation()):
        """The glyph, its ink centred (then shifted), at the common font size times ``variation.scale``."""
        from PIL import Image, ImageChops, ImageDraw, ImageFont

        if font not in self._fonts:
            self._fonts[font] = ImageFont.truetype(str(self.folder / font), EM * SUPERSAMPLE)
        big = EM * SUPERSAMPLE
        canvas = Image.new("L", (3 * big, 3 * big), 0)
        stroke = variation.stroke * SUPERSAMPLE
        ImageDraw.Draw(canvas).text((big, big), char, font=self._fonts[font], fill=255, stroke_width=stroke, stroke_fill=255)
        box = canvas.getbbox()
        if box is None:
            from unicom.errors import InputError

            raise InputError(f"{self.folder / font}: {char!r} (U+{ord(char):04X}) draws no ink; drop it from the demo's characters")
        ink = canvas.crop(box)
        factor = min(1.0, MAX_INK * SUPERSAMPLE / max(ink.size)) * variation.scale
        if factor != 1.0:
            ink = ink.resize((max(1, round(ink.width * factor)), max(1, round(ink.height * factor))), Image.LANCZOS)
        if variation.angle:
            ink = ink.rotate(variation.angle, resample=Image.BICUBIC, expand=True, fillcolor=0)
        side = IMAGE_SIZE * SUPERSAMPLE
        image = Image.new("L", (side, side), 0)
        image.paste(ink, ((side - ink.width) // 2 + variation.shift[0] * SUPERSAMPLE,
                          (side - ink.height) // 2 + variation.shift[1] * SUPERSAMPLE))
        return ImageChops.invert(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)).convert("RGB")


def glyph_classes(renderer: GlyphRenderer) -> list[str]:
    """The demo's classes: letters and digits below U+2000 without a decomposition (no accented
    forms) that every font but Computer Modern has, keeping the first of characters drawn alike
    (Latin A, Greek Alpha and Cyrillic A are one shape)."""
    import unicodedata

    wide = [font for font in FONTS if font not in COMPUTER_MODERN]
    candidates = [chr(c) for c in range(0x21, 0x2000)
                  if unicodedata.category(chr(c))[0] in "LN" and not unicodedata.decomposition(chr(c))
                  and all(renderer.covers(font, chr(c)) for font in wide)]
    kept: list[str] = []
    drawn: list[np.ndarray] = []
    for char in candidates:
        pixels = np.concatenate([np.asarray(renderer.render(char, font).convert("L"), np.float32).ravel()
                                 for font in PROBE_FONTS])
        if all(np.abs(pixels - other).mean() > SAME_GLYPH for other in drawn):
            kept.append(char)
            drawn.append(pixels)
    return kept


def split_classes(chars: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """(training characters, held-out characters): a seeded third held out, both in code-point order."""
    order = np.random.default_rng(seed).permutation(len(chars))
    held = set(order[: len(chars) // HELD_OUT_SHARE].tolist())
    return ([c for i, c in enumerate(chars) if i not in held], [c for i, c in enumerate(chars) if i in held])


def is_query_font(font: str) -> bool:
    """Every other font of :data:`FONTS` draws the queries; the rest are the gallery."""
    return FONTS.index(font) % 2 == 1


def class_name(char: str) -> str:
    return f"U+{ord(char):04X}"


def write_dataset(root: Path, seed: int = 0) -> dict:
    """``root/shards/{00000..}.tar`` (training glyphs, no labels inside) and ``root/held_out/``:
    ``clean/`` and ``varied/`` images and the lists ``clean.csv`` and ``varied.csv``
    (path,label,split: the query fonts' glyphs against the gallery fonts' clean glyphs)."""
    import csv
    import tarfile

    renderer = GlyphRenderer()
    chars = glyph_classes(renderer)
    seen, held = split_classes(chars, seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    samples = [(char, font) for char in seen for font in renderer.fonts_of(char)]
    samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]
    truth = {}
    for shard in range(SHARDS):
        with tarfile.open(root / "shards" / f"{shard:05d}.tar", "w") as tar:
            for char, font in samples[shard::SHARDS]:
                key = f"u{ord(char):04x}_{Path(font).stem}"
                buffer = io.BytesIO()
                renderer.render(char, font).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{key}.png")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
                truth[key] = ord(char)
    (root / "train_glyphs.json").write_text(json.dumps(truth))  # for the report's cluster purity only
    rng = np.random.default_rng(seed + 1)
    rows = {protocol: [] for protocol in PROTOCOLS}
    held_out = root / "held_out"
    for char in held:
        for font in renderer.fonts_of(char):
            name = f"{class_name(char)}/{Path(font).stem}.png"
            query = is_query_font(font)
            drawings = {"clean": Variation(), "varied": Variation.draw(rng)} if query else {"clean": Variation()}
            for protocol, variation in drawings.items():
                (held_out / protocol / class_name(char)).mkdir(parents=True, exist_ok=True)
                renderer.render(char, font, variation).save(held_out / protocol / name)
            for protocol in PROTOCOLS:
                folder = protocol if query else "clean"
                rows[protocol].append((f"{folder}/{name}", ord(char), "query" if query else "gallery"))
    for protocol, table in rows.items():
        with open(held_out / f"{protocol}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split"])
            writer.writerows(table)
    queries = sum(split == "query" for _, _, split in rows["clean"])
    return {"classes": len(chars), "train_classes": len(seen), "held_out_classes": len(held),
            "train_images": len(samples), "queries": queries, "gallery": len(rows["clean"]) - queries,
            "train_characters": "".join(seen), "held_out_characters": "".join(held)}


def pixel_features(images) -> np.ndarray:
    """(N, 256) float32: each image as 16x16 grey levels, mean removed, L2-normalised."""
    from PIL import Image

    rows = np.stack([np.asarray(image.convert("L").resize((PIXEL_SIDE, PIXEL_SIDE), Image.BOX), dtype=np.float32).ravel()
                     for image in images])
    rows -= rows.mean(axis=1, keepdims=True)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)
    return rows


def write_clustering_features(shards: Path, out: Path) -> int:
    """The pixel features of every shard in the embedding layout (one part per shard)."""
    import pyarrow as pa
    from PIL import Image

    from unicom.data.shards import expand_shards, read_tar_samples, shard_name
    from unicom.files import part_number
    from unicom.formats.embeddings import write_part

    rows = 0
    for path in expand_shards(str(shards)):
        samples = list(read_tar_samples(path))
        images = [Image.open(io.BytesIO(sample.image_bytes())) for sample in samples]
        keys = [sample.key for sample in samples]
        # key and shard, as `unicom embed` writes them: `unicom cluster show` finds the images through them
        metadata = pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array([shard_name(path)] * len(keys), pa.string())})
        write_part(out, part_number(path), image=pixel_features(images).astype(np.float16), metadata=metadata)
        rows += len(keys)
    return rows


def cluster_purity(labels_folder: Path, truth: dict) -> float:
    """Fraction of training images whose pseudo-class's majority class is their own class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p, columns=["key", "label"]) for p in sorted(labels_folder.glob("labels_*.parquet"))])
    pseudo = np.asarray(table.column("label").to_pylist())
    _, actual = np.unique([truth[k] for k in table.column("key").to_pylist()], return_inverse=True)
    agree = sum(np.bincount(actual[pseudo == c]).max() for c in np.unique(pseudo))
    return float(agree / len(pseudo))


def write_pixel_layouts(table: Path, root: Path) -> dict[str, Path]:
    """The pixel features of a held-out list's query and gallery rows as two embedding folders
    (``root/query``, ``root/gallery``) with a label column."""
    import pyarrow as pa
    from PIL import Image

    from unicom.data.benchmarks.retrieval import read_csv
    from unicom.formats.embeddings import write_part

    splits = read_csv(table)
    folders = {}
    for name, images in (("query", splits.query), ("gallery", splits.gallery)):
        features = pixel_features([Image.open(path) for path in images.paths])
        metadata = pa.table({"key": pa.array(images.keys, pa.string()), "label": pa.array(images.labels, pa.int64())})
        write_part(root / name, 0, image=features, metadata=metadata)
        folders[name] = root / name
    return folders


def query_sheet(held_out: Path, out: Path, columns: int = 16) -> None:
    """A PNG of held-out queries: gallery glyph, clean query and varied query of the same character, per column."""
    import csv

    from PIL import Image

    with open(held_out / "varied.csv", newline="") as handle:
        queries = [row["path"] for row in csv.DictReader(handle) if row["split"] == "query"]
    picked = [queries[i] for i in np.linspace(0, len(queries) - 1, columns).round().astype(int)]
    sheet = Image.new("RGB", (columns * IMAGE_SIZE, 2 * IMAGE_SIZE), "white")
    for column, path in enumerate(picked):
        sheet.paste(Image.open(held_out / path.replace("varied/", "clean/", 1)), (column * IMAGE_SIZE, 0))
        sheet.paste(Image.open(held_out / path), (column * IMAGE_SIZE, IMAGE_SIZE))
    sheet.resize((2 * sheet.width, 2 * sheet.height), Image.NEAREST).save(out)


def plot_dimensions(curves: dict[str, dict[str, dict[str, float]]], out: Path) -> None:
    """``curves[protocol][features][dimension]`` = Recall@1: one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.4), sharey=True)
    for axis, (protocol, by_name) in zip(np.atleast_1d(axes), curves.items()):
        for name, points in by_name.items():
            dims = sorted(points, key=int)
            axis.plot([int(d) for d in dims], [100 * points[d] for d in dims], marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("embedding dimension (first d)")
        axis.set_title(f"{protocol} queries")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("Recall@1, held-out characters (%)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


EVALUATED = {  # metrics.json key: what the report calls it
    "clustering_features": "clustering features (pixels)",
    "untrained_network": "untrained network",
    "trained_network": "trained network",
    "trained_network_compact_epoch": "trained network + compact epoch",
}


def run(out: Path, steps: int | None = None, threads: int | None = None) -> dict:
    import torch

    from unicom.cli import main as unicom_command
    from unicom.train.config import load_config

    def unicom(argv: list[str]) -> int:
        code = unicom_command(argv)
        if code == 130:  # Ctrl-C in the stage, which said so: end the demo too, not as a failure
            raise KeyboardInterrupt
        return code

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 1)
        print(f"[demo] {name}: {timings[name]} s", flush=True)

    if out.exists():
        if not out.is_dir():
            from unicom.errors import InputError

            raise InputError(f"{out} is a file; give a folder as --out (the demo replaces its folder)")
        if any(out.iterdir()) and not (out / "data" / "train_glyphs.json").is_file():
            from unicom.errors import InputError

            raise InputError(f"{out} exists and is not a demo folder; give another --out (the demo replaces its folder)")
        shutil.rmtree(out)
    data = out / "data"
    began = time.perf_counter()
    sizes = write_dataset(data)
    query_sheet(data / "held_out", out / "queries.png")
    stage("dataset", began)

    began = time.perf_counter()
    write_clustering_features(data / "shards", out / "features")
    k = sizes["train_classes"]  # as many pseudo-classes as there are characters (k-means does not know that)
    if unicom(["cluster", "--embeddings", str(out / "features"), "--fusion", "image", "--k", str(k), "--init", "kmeans++",
               "--out", str(out / "clusters")]) != 0:
        raise SystemExit("unicom cluster failed")
    truth = json.loads((data / "train_glyphs.json").read_text())
    purity = cluster_purity(out / "clusters" / "labels", truth)
    # the pseudo-classes as the paper's Figures 3 and 5 show them: a few clusters beside their nearest ones
    with contextlib.redirect_stdout(io.StringIO()):
        shown = unicom(["cluster", "show", "--out", str(out / "clusters"), "--embeddings", str(out / "features"),
                        "--input", str(data / "shards"), "--random", str(SHOWN_CLUSTERS), "--samples", "8",
                        "--neighbours", "3", "--thumbnail", "48", "--sheet", str(out / "clusters.png")])
    if shown != 0:
        raise SystemExit("unicom cluster show failed")
    stage("cluster", began)

    recipe = demo_recipe()
    overrides = [f"out={out / 'train'}", f"data.shards={data / 'shards'}", f"data.labels={out / 'clusters'}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    config = load_config(recipe, overrides)
    began = time.perf_counter()
    if unicom(["train", "--config", str(recipe), *overrides]) != 0:
        raise SystemExit("unicom train failed")
    stage("train", began)

    # the compact epoch: the same pseudo-labels, half of the features per step, from the run above
    compact_steps = max(1, config.train.steps // COMPACT_FRACTION)
    compact = [f"out={out / 'compact'}", f"data.shards={data / 'shards'}", f"data.labels={out / 'clusters'}",
               "model.name=null", f"model.init={out / 'train'}", "loss.feature_rate=0.5", f"train.steps={compact_steps}",
               f"optim.lr={config.optim.lr / 4}", "schedule.warmup_fraction=0", "seed=1"]
    began = time.perf_counter()
    if unicom(["train", "--config", str(recipe), *compact]) != 0:
        raise SystemExit("unicom train (compact epoch) failed")
    stage("compact epoch", began)

    # the untrained network: the same recipe and seed, zero steps (the run's starting weights, exported)
    if unicom(["train", "--config", str(recipe), *overrides, f"out={out / 'untrained'}", "train.steps=0"]) != 0:
        raise SystemExit("unicom train (train.steps=0) failed")

    began = time.perf_counter()
    models = {"untrained_network": out / "untrained" / "model", "trained_network": out / "train" / "model",
              "trained_network_compact_epoch": out / "compact" / "model"}
    dims = ",".join(map(str, DIMENSIONS))
    reports: dict[str, dict[str, dict]] = {protocol: {} for protocol in PROTOCOLS}
    for protocol in PROTOCOLS:
        table = data / "held_out" / f"{protocol}.csv"
        pixels = write_pixel_layouts(table, out / "held_out_pixels" / protocol)
        sources = {"clustering_features": ["--embeddings", str(pixels["query"]), "--gallery-embeddings", str(pixels["gallery"])]}
        sources.update({name: ["--model", str(model), "--dataset", "csv", "--root", str(table)] for name, model in models.items()})
        for name, source in sources.items():
            folder = out / "evaluate" / protocol / name
            # the trained network's mistakes, drawn: queries whose first result is another character
            shown = ["--examples", str(SHOWN_MISTAKES), "--examples-failures"] if name == "trained_network" else []
            with contextlib.redirect_stdout(io.StringIO()):
                code = unicom(["evaluate", *source, "--ks", "1,2,4,8", "--dims", dims, "--no-pca", "--num-workers", "0",
                               *shown, "--out", str(folder)])
            if code != 0:
                raise SystemExit(f"unicom evaluate failed for the {EVALUATED[name]} ({protocol} queries)")
            reports[protocol][name] = json.loads((folder / "metrics.json").read_text())
    stage("evaluate", began)

    from unicom.evaluate.plots import plot_training_curves

    plot_training_curves(out / "train" / "log.jsonl", out / "loss.png", title="unicom train on pseudo-labels")
    by_dimension = {
        protocol: {name: {str(r["dimension"]): r["recall@1"] for r in report["dimensions"]
                             if r["method"] == "first" and "recall@1" in r}  # a skipped d has no score
                   for name, report in by_name.items()}
        for protocol, by_name in reports.items()
    }
    plot_dimensions({protocol: {EVALUATED[name]: points for name, points in by_name.items()}
                     for protocol, by_name in by_dimension.items()}, out / "recall_vs_dimension.png")
    shutil.copy(out / "clusters" / "cluster_sizes.png", out / "cluster_sizes.png")
    summary = json.loads((out / "train" / "summary.json").read_text())
    recall = {protocol: {name: report["metrics"]["recall@1"] for name, report in by_name.items()}
              for protocol, by_name in reports.items()}
    timings["total"] = round(time.perf_counter() - started, 1)
    metrics = {
        "dataset": {"name": "glyphs of matplotlib's fonts", "image_size": IMAGE_SIZE, "fonts": list(FONTS),
                    "query_fonts": [f for f in FONTS if is_query_font(f)], **sizes},
        "clustering": {"k": k, "features": f"{PIXEL_SIDE}x{PIXEL_SIDE} grey levels, centred, L2-normalised "
                                           f"({PIXEL_SIDE * PIXEL_SIDE}-d)", "purity": purity},
        "training": {"steps": summary["steps"], "final_loss": summary["final_loss"], "config": str(recipe),
                     "batch_size": config.data.batch_size, "sample_rate": config.loss.sample_rate,
                     "feature_rate": config.loss.feature_rate, "scale": config.loss.scale, "margin": config.loss.margin,
                     "lr": config.optim.lr, "embedding_dim": config.model.embedding_dim,
                     "augment": {"crop_scale": config.augment.crop_scale, "crop_ratio": config.augment.crop_ratio,
                                 "randaugment": config.augment.randaugment},
                     "compact_epoch": {"steps": compact_steps, "feature_rate": 0.5, "lr": config.optim.lr / 4}},
        "recall@1": recall,
        "recall@1_by_dimension": by_dimension,
        "trained_beats_untrained": {p: recall[p]["trained_network"] > recall[p]["untrained_network"] for p in PROTOCOLS},
        "trained_beats_clustering_features": {p: recall[p]["trained_network"] > recall[p]["clustering_features"]
                                              for p in PROTOCOLS},
        "seconds": timings,
    }
    from unicom.files import write_json_atomic, write_text_atomic

    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "report.md", report_markdown(metrics))
    for protocol in PROTOCOLS:
        print(f"[demo] Recall@1, {protocol} queries of held-out characters: "
              + ", ".join(f"{EVALUATED[name]} {value:.3f}" for name, value in recall[protocol].items()))
    print(f"[demo] report: {out / 'report.md'} ({timings['total']} s)")
    return metrics


def report_markdown(metrics: dict) -> str:
    data, clustering, training, recall = metrics["dataset"], metrics["clustering"], metrics["training"], metrics["recall@1"]
    augment = training["augment"]
    lines = [
        "# unicom demo: cluster discrimination on glyphs of matplotlib's fonts",
        "",
        f"Data: {data['classes']} characters (classes) drawn in the {len(data['fonts'])} fonts that matplotlib ships "
        f"(instances), {data['image_size']}x{data['image_size']} pixels. Training: {data['train_images']} glyphs of "
        f"{data['train_classes']} characters, without their labels. Evaluation: the {data['held_out_classes']} other "
        f"characters, which the network never saw: {data['queries']} queries (the glyphs of {len(data['query_fonts'])} "
        f"fonts) against a gallery of {data['gallery']} clean glyphs of the other fonts.",
        "",
        f"Held-out characters: {data['held_out_characters']}",
        "",
        "- **clean queries**: the query glyph drawn as the gallery is (ink centred, one size);",
        "- **varied queries**: the same glyph shifted by up to 3 pixels, scaled by 0.8-1.1, rotated by up to 12 degrees "
        "and drawn with 0 or 1 pixel of extra stroke (queries.png: gallery-style glyphs above, varied queries below).",
        "",
        "## Pipeline",
        "",
        f"1. Clustering features: {clustering['features']}. No pretrained network is available offline, so raw pixels "
        "stand in for the CLIP embeddings of the paper.",
        f"2. `unicom cluster`: k-means into k = {clustering['k']} pseudo-classes; purity against the true characters "
        f"{100 * clustering['purity']:.1f}% (the share of glyphs whose pseudo-class's majority character is their own).",
        f"3. `unicom train` ({Path(training['config']).name}): a CLIP-shaped ViT from scratch, {training['steps']} steps "
        f"of batch {training['batch_size']}, PartialFC (ArcFace m {training['margin']}, s {training['scale']}) with "
        f"sample_rate {training['sample_rate']}, lr {training['lr']}; augmentation: random resized crop "
        f"(area {augment['crop_scale']}, aspect {augment['crop_ratio']})"
        + (f" and RandAugment `{augment['randaugment']}`" if augment["randaugment"] else "")
        + f". Final loss {training['final_loss']:.3f} (loss.png).",
        "4. `unicom evaluate`: Recall@1 of the queries against the gallery.",
        "",
        "## Recall@1 on held-out characters",
        "",
        "| features | clean queries (%) | varied queries (%) |",
        "|---|---:|---:|",
    ]
    for key, name in EVALUATED.items():
        lines.append(f"| {name} | {100 * recall['clean'][key]:.2f} | {100 * recall['varied'][key]:.2f} |")
    lines += ["", "Numbers are as measured by this run. " + _verdict(metrics), "",
              "## By embedding dimension (first d dimensions)", ""]
    for protocol in PROTOCOLS:
        by = metrics["recall@1_by_dimension"][protocol]
        dims = sorted({int(d) for points in by.values() for d in points})
        lines += [f"{protocol} queries:", "", "| d | " + " | ".join(EVALUATED[n] for n in by) + " |",
                  "|---" * (len(by) + 1) + "|"]
        lines += [f"| {d} | " + " | ".join(f"{100 * by[n][str(d)]:.2f}" if str(d) in by[n] else "-" for n in by) + " |"
                  for d in dims]
        lines.append("")
    lines += [
        f"The compact epoch continues the trained run (its backbone and prototypes) for {training['compact_epoch']['steps']} "
        "steps with random feature selection (feature_rate 0.5: every step uses a random half of the dimensions, the same "
        "for the whole batch), the paper's way of making the first dimensions carry the similarity; here it "
        f"{_compact_effect(metrics)}. The first d pixel features are merely the top rows of the image "
        "(recall_vs_dimension.png).",
        "",
        "Plots: queries.png, loss.png, recall_vs_dimension.png, cluster_sizes.png; clusters.png (and clusters.html, "
        f"captioned) shows {SHOWN_CLUSTERS} random pseudo-classes, each beside its nearest clusters by centroid "
        f"similarity; evaluate/clean/trained_network/examples.png (and .html, and the same under varied/) shows "
        f"{SHOWN_MISTAKES} queries whose first result is another character, beside their first results. Timings (s): "
        + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _verdict(metrics: dict) -> str:
    """What training did, per protocol, in words."""
    parts = []
    for protocol in PROTOCOLS:
        recall = metrics["recall@1"][protocol]
        trained, untrained, pixels = recall["trained_network"], recall["untrained_network"], recall["clustering_features"]
        versus_untrained = "beats" if trained > untrained else "does NOT beat"
        versus_pixels = "beats" if trained > pixels else "does NOT beat"
        parts.append(f"On {protocol} queries the trained network {versus_untrained} its random initialisation "
                     f"({100 * trained:.1f}% against {100 * untrained:.1f}%) and {versus_pixels} the pixels it was "
                     f"clustered from ({100 * pixels:.1f}%).")
    return " ".join(parts)


def _compact_effect(metrics: dict) -> str:
    """How the compact epoch changed Recall@1 (varied queries) at the smallest dimension, in words."""
    by = metrics["recall@1_by_dimension"]["varied"]
    d = str(min(int(k) for k in by["trained_network"]))
    before, after = by["trained_network"][d], by["trained_network_compact_epoch"][d]
    change = "raised" if after > before else "did not raise"
    return f"{change} Recall@1 of varied queries at d = {d} ({100 * before:.2f}% before, {100 * after:.2f}% after)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unicom.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (replaced)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    from unicom.errors import InputError

    try:
        run(Path(args.out), args.steps, args.threads)
    except InputError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
