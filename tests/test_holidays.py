"""INRIA Holidays: scenes by name, each scene's 00 image its query, mAP as Jégou's evaluation computes it."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from support import class_image, encode_image
from test_evaluate_cli import embedding_folder, tiny_model_file
from test_revisited import straightforward_metrics

from unicom.cli import main
from unicom.data.benchmarks import load_retrieval_benchmark

# three scenes: 1000 (a query and two others), 1001 (a query and one), 1023 (a query and three)
SCENES = {"1000": ["00", "01", "02"], "1001": ["00", "01"], "1023": ["00", "01", "02", "03"]}
NAMES = sorted(f"{scene}{image}.jpg" for scene, images in SCENES.items() for image in images)


def holidays(root: Path, top: str = "holidays") -> Path:
    """``root/<top>/jpg/<name>.jpg`` as Holidays' archives unpack (40x40 JPEGs, a colour per scene)."""
    images = root / top / "jpg" if top else root / "jpg"
    images.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NAMES):
        (images / name).write_bytes(encode_image(class_image(int(name[:4]) % 7, i, size=40)))
    return root


def holidays_map(query, gallery, names=NAMES, kappas=(1, 5, 10)) -> dict:
    """mAP and mP@k as Jégou's holidays evaluation ranks: each query's ranking of the database
    without the query image, the other images of its scene positive. That is the Revisited
    protocol's medium setup with the scene's other images "easy" and the query's own "junk",
    walked by ``test_revisited.straightforward_metrics``."""
    queries = [row for row, name in enumerate(names) if name[4:6] == "00"]
    ground_truth = [{"easy": [row for row, name in enumerate(names) if name[:4] == names[own][:4] and row != own],
                     "hard": [], "junk": [own]} for own in queries]
    with warnings.catch_warnings():  # the hard setup, here without positives, averages nothing
        warnings.simplefilter("ignore", RuntimeWarning)
        medium = straightforward_metrics(np.asarray(query, np.float64), np.asarray(gallery, np.float64), kappas,
                                         ground_truth)
    return {key.replace("_medium", "_all"): value for key, value in medium.items() if key.endswith("_medium")}


@pytest.mark.parametrize("top", ["holidays", "Holidays", ""])
def test_reader_finds_each_scene_and_its_query(top, tmp_path):
    protocol = load_retrieval_benchmark("inria-holidays", holidays(tmp_path, top))
    assert protocol.gallery.keys == [f"jpg/{name}" for name in NAMES]
    assert protocol.query.keys == ["jpg/100000.jpg", "jpg/100100.jpg", "jpg/102300.jpg"]
    positives, ignored = protocol.setups["all"]
    assert [p.tolist() for p in positives] == [[1, 2], [4], [6, 7, 8]]
    assert [i.tolist() for i in ignored] == [[0], [3], [5]]
    assert protocol.metric == "map_all" and protocol.relevant is None


def test_evaluate_scores_the_model_as_jegous_evaluation_does(tmp_path, capsys):
    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = holidays(tmp_path / "data")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "holidays", "--root", str(root),
                 "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    gallery = embed_images(load_encoder(str(checkpoint)), [str(root / "holidays" / "jpg" / n) for n in NAMES],
                           num_workers=0)
    query = gallery[[0, 3, 5]]
    assert report["metrics"] == pytest.approx(holidays_map(query, gallery), abs=1e-6)
    markdown = capsys.readouterr().out
    assert "3 queries, each removed from its own ranking, against a gallery of 9" in markdown
    assert "| all | " in markdown

    # the images embedded once with unicom embed --input (keys of their own) are found by path
    assert main(["embed", "--input", str(root / "holidays" / "jpg"), "--model", str(checkpoint), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32", "--device", "cpu", "--workers", "0"]) == 0
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "holidays", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["metrics"] == pytest.approx(
        report["metrics"], abs=1e-6)


def test_precomputed_embeddings_with_distractors_and_re_ranking(tmp_path):
    from test_expansion import reference_expand

    root = holidays(tmp_path / "data")
    rng = np.random.default_rng(6)
    x, d = rng.standard_normal((len(NAMES), 8)), rng.standard_normal((15, 8))
    embedding_folder(tmp_path / "emb", x.astype(np.float32), [f"jpg/{n}" for n in NAMES], parts=1)
    embedding_folder(tmp_path / "flickr", d.astype(np.float32), [f"flickr/{i}" for i in range(15)], parts=1)
    for name in NAMES:  # scored from the file names alone: the images are not read
        (root / "holidays" / "jpg" / name).write_bytes(b"")
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "holidays", "--root", str(root),
                 "--distractors", str(tmp_path / "flickr"), "--qe", "1", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x, d = (a.astype(np.float32).astype(np.float16).astype(np.float64) for a in (x, d))
    x, d = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, d))
    gallery = np.concatenate([x, d])
    names = NAMES + [f"distractor {i}" for i in range(15)]
    assert report["without_expansion"] == pytest.approx(holidays_map(x[[0, 3, 5]], gallery, names))
    query, augmented = reference_expand(x[[0, 3, 5]], gallery, 1, 0)
    assert report["metrics"] == pytest.approx(holidays_map(query, augmented, names))


@pytest.mark.parametrize("change, message", [
    ("rename 102301.jpg IMG_0001.jpg", r"1 files are not named as Holidays' images \(6 digits, .jpg\), e.g. IMG_0001.jpg"),
    ("remove 100100.jpg", r"scene 1001 has no query image \(100100.jpg\)"),
    ("remove 100101.jpg", r"scene 1001 has no image but its query"),
    ("remove all", r"jpg: no images"),
])
def test_a_folder_that_is_not_holidays_is_named_not_guessed(change, message, tmp_path, capsys):
    root = holidays(tmp_path)
    images = root / "holidays" / "jpg"
    action, *names = change.split()
    if action == "rename":
        (images / names[0]).rename(images / names[1])
    elif names == ["all"]:
        for image in images.iterdir():
            image.unlink()
    else:
        (images / names[0]).unlink()
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "holidays", "--root", str(root),
                 "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_no_jpg_folder_names_the_layout(tmp_path, capsys):
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "holidays", "--root", str(tmp_path),
                 "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'jpg'}: not found" in err and "holidays/jpg/<6 digits>.jpg" in err
