"""The demo: glyphs of matplotlib's fonts through embed layout -> cluster -> train -> evaluate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch


def ink(image) -> np.ndarray:
    """(32, 32) float: how dark each pixel is, 0 (white) to 1 (black)."""
    return 1 - np.asarray(image.convert("L"), dtype=np.float64) / 255


def centre_of_ink(image) -> tuple[float, float]:
    weights = ink(image)
    rows, columns = np.indices(weights.shape)
    return float((columns * weights).sum() / weights.sum()), float((rows * weights).sum() / weights.sum())


def test_a_glyph_is_dark_ink_centred_on_white():
    from unicom.demo import IMAGE_SIZE, GlyphRenderer

    image = GlyphRenderer().render("H", "DejaVuSans.ttf")
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    weights = ink(image)
    assert weights[0].max() == 0 and weights[:, 0].max() == 0  # white margins
    assert weights.max() > 0.9  # solid strokes
    x, y = centre_of_ink(image)  # H is symmetric: its ink's centre is the image's centre
    assert abs(x - 15.5) < 0.75 and abs(y - 15.5) < 0.75


def test_a_variation_shifts_thickens_and_rotates_the_glyph():
    from unicom.demo import GlyphRenderer, Variation

    renderer = GlyphRenderer()
    clean = renderer.render("H", "DejaVuSans.ttf")
    x, y = centre_of_ink(clean)
    shifted = renderer.render("H", "DejaVuSans.ttf", Variation(shift=(3, -2)))
    sx, sy = centre_of_ink(shifted)
    assert sx - x == pytest.approx(3, abs=0.3) and sy - y == pytest.approx(-2, abs=0.3)
    assert ink(renderer.render("H", "DejaVuSans.ttf", Variation(stroke=1))).sum() > 1.3 * ink(clean).sum()
    smaller = ink(renderer.render("H", "DejaVuSans.ttf", Variation(scale=0.8))).sum()
    assert smaller < 0.9 * ink(clean).sum()
    # rotated by 90 degrees, H's two uprights become two bars: the rows hold the ink the columns held
    turned = ink(renderer.render("H", "DejaVuSans.ttf", Variation(angle=90)))
    assert np.corrcoef(turned.sum(axis=1), ink(clean).sum(axis=0))[0, 1] > 0.9


def test_the_classes_drop_accented_letters_and_shapes_drawn_alike():
    from unicom.demo import GlyphRenderer, glyph_classes

    chars = glyph_classes(GlyphRenderer())
    assert {"A", "a", "Z", "0", "9", "ж", "λ"} <= set(chars)
    assert "\u00c9" not in chars  # É: A decomposes into E + an accent
    assert "\u0391" not in chars and "\u0410" not in chars  # Greek Alpha and Cyrillic A are drawn as Latin A
    assert len(chars) == len(set(chars)) and 250 < len(chars) < 345


def test_a_third_of_the_classes_is_held_out_the_same_way_every_time():
    from unicom.demo import split_classes

    chars = [chr(c) for c in range(0x41, 0x41 + 30)]
    seen, held = split_classes(chars)
    assert len(held) == 10 and sorted(seen + held) == chars and not set(seen) & set(held)
    assert split_classes(chars) == (seen, held) and split_classes(chars, seed=1) != (seen, held)


def test_pixel_features_are_centred_unit_rows_of_the_16x16_image():
    from PIL import Image

    from unicom.demo import pixel_features

    grey = np.full((32, 32), 255, dtype=np.uint8)
    grey[8:24, 14:18] = 0  # a vertical stroke
    features = pixel_features([Image.fromarray(grey, "L").convert("RGB")])
    assert features.shape == (1, 256)
    assert abs(float(features.sum())) < 1e-4 and abs(float(np.linalg.norm(features)) - 1) < 1e-5
    image = features.reshape(16, 16)
    assert image[8, 7] < 0 < image[0, 0]  # ink is dark on white: below the image's mean
    assert image[8, 7] == pytest.approx(image[4, 8]) and image[0, 0] == pytest.approx(image[15, 15])


def test_cluster_purity_counts_the_majority_class_of_each_pseudo_class(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unicom.demo import cluster_purity

    (tmp_path / "labels").mkdir()
    table = pa.table({"key": ["a", "b", "c", "d", "e"], "label": pa.array([0, 0, 0, 1, 1], pa.int64())})
    pq.write_table(table, tmp_path / "labels" / "labels_0.parquet")
    truth = {"a": 0x3B1, "b": 0x3B1, "c": 0x41, "d": 0x436, "e": 0x436}  # code points, as the demo writes them
    assert cluster_purity(tmp_path / "labels", truth) == pytest.approx(4 / 5)


def test_the_untrained_network_is_the_training_runs_starting_point(tmp_path):
    """The demo's untrained network is `unicom train` of its recipe with train.steps=0."""
    from support import write_class_folder

    from unicom.cli import main as unicom
    from unicom.demo import demo_recipe
    from unicom.models.export import read_weights
    from unicom.train.config import load_config
    from unicom.train.trainer import prepare

    write_class_folder(tmp_path / "images", [0, 1], 64, size=32)
    overrides = [f"data.folder={tmp_path / 'images'}"]
    config = load_config(demo_recipe(), [f"out={tmp_path / 'run'}", *overrides])
    start = prepare(config).backbone.state_dict()
    assert unicom(["train", "--config", str(demo_recipe()), *overrides, f"out={tmp_path / 'untrained'}",
                   "train.steps=0"]) == 0
    saved = read_weights(tmp_path / "untrained" / "model")
    assert saved.keys() == start.keys()
    assert all(torch.equal(saved[k], start[k]) for k in saved)


@pytest.mark.parametrize("what", ["a folder of other files", "a file"])
def test_an_out_the_demo_would_not_replace_is_refused_without_a_traceback(tmp_path, capsys, what):
    """The demo replaces its --out; a folder that is not a demo's, or a file, is refused
    (exit status 2, one line saying what to do) and left as it was."""
    from unicom.demo import main

    out = tmp_path / "mine"
    if what == "a file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    assert main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m unicom.demo: error: {out} ") and "give " in err and "Traceback" not in err
    assert (out.read_text() if what == "a file" else (out / "notes.txt").read_text()) == "keep me"


@pytest.mark.slow
def test_the_demo_trains_a_network_that_beats_its_start_and_its_clustering_features(tmp_path):
    """The shipped recipe, as `make demo` runs it: minutes on 2 cores."""
    from unicom.demo import EVALUATED, PROTOCOLS, run

    metrics = run(tmp_path / "demo")
    out = tmp_path / "demo"
    for name in ("report.md", "metrics.json", "queries.png", "loss.png", "recall_vs_dimension.png", "cluster_sizes.png",
                 "train/model/unicom_model.json", "compact/model/unicom_model.json",
                 "untrained/model/unicom_model.json", "clusters.png", "clusters.html", "clusters/labels/labels_0.parquet",
                 "features/img_emb/img_emb_0.npy"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["recall@1"] == metrics["recall@1"]
    for protocol in PROTOCOLS:
        assert set(saved["recall@1"][protocol]) == set(EVALUATED)
        # the reported numbers are those of `unicom evaluate`'s own reports
        trained = json.loads((out / "evaluate" / protocol / "trained_network" / "metrics.json").read_text())
        assert saved["recall@1"][protocol]["trained_network"] == trained["metrics"]["recall@1"]
    recall = saved["recall@1"]
    assert recall["clean"]["trained_network"] > recall["clean"]["untrained_network"]
    assert recall["varied"]["trained_network"] > recall["varied"]["untrained_network"]
    assert recall["varied"]["trained_network"] > recall["varied"]["clustering_features"]
    # held-out characters are none of the training ones; queries and gallery come from different fonts
    data = saved["dataset"]
    assert not set(data["train_characters"]) & set(data["held_out_characters"])
    with open(out / "data" / "held_out" / "varied.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {chr(int(row["label"])) for row in rows} == set(data["held_out_characters"])
    queries = {row["path"].split("/")[-1] for row in rows if row["split"] == "query"}
    gallery = {row["path"].split("/")[-1] for row in rows if row["split"] == "gallery"}
    assert not queries & gallery and len(rows) == data["queries"] + data["gallery"]
    assert all(row["path"].startswith("varied/") == (row["split"] == "query") for row in rows)
    assert saved["training"]["steps"] == metrics["training"]["steps"] > 0
    assert "Recall@1 on held-out characters" in (out / "report.md").read_text()
