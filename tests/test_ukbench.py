"""UKBench: every image a query against all, its object's 4 images relevant, the N-S score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from support import class_image, encode_image
from test_evaluate_cli import embedding_folder, tiny_model_file

from unicom.cli import main
from unicom.data.benchmarks import load_retrieval_benchmark

# three objects (numbers 0-3, 4-7, 20-23: the numbers need not follow each other)
NUMBERS = [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23]
NAMES = [f"ukbench{n:05d}.jpg" for n in NUMBERS]


def ukbench(root: Path, top: str = "") -> Path:
    """``root/[top/]full/ukbench<5 digits>.jpg`` as ukbench.zip unpacks (40x40 JPEGs, a colour per object)."""
    images = root / top / "full"
    images.mkdir(parents=True, exist_ok=True)
    for i, (number, name) in enumerate(zip(NUMBERS, NAMES)):
        (images / name).write_bytes(encode_image(class_image(number // 4 % 7, i, size=40)))
    return root


def ns_reference(x: np.ndarray, gallery: np.ndarray | None = None, numbers=NUMBERS) -> dict:
    """The N-S score, Recall@1/4 and R-precision walked plainly: every image of ``x`` ranks all
    rows of ``gallery`` (default ``x``; rows past ``numbers`` belong to no object) by cosine,
    ties by lower index; its relevant rows are those of its own object, itself included."""
    gallery = x if gallery is None else gallery
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    objects = [n // 4 for n in numbers] + [-1] * (len(gallery) - len(numbers))
    found_at_4, first = [], []
    for q in range(len(x)):
        ranking = np.argsort(-(gallery @ x[q]), kind="stable")
        relevant = [objects[i] == objects[q] for i in ranking]
        found_at_4.append(sum(relevant[:4]))
        first.append(relevant.index(True) + 1)
    first = np.asarray(first)
    return {"ns": float(np.mean(found_at_4)), "recall@1": float(np.mean(first <= 1)),
            "recall@4": float(np.mean(first <= 4))}


def assert_scores(metrics: dict, reference: dict) -> None:
    assert 4 * metrics["r_precision"] == pytest.approx(reference["ns"], abs=1e-9)
    assert metrics["ns_score"] == pytest.approx(reference["ns"], abs=1e-9)
    assert metrics["recall@1"] == pytest.approx(reference["recall@1"])
    assert metrics["recall@4"] == pytest.approx(reference["recall@4"])
    assert metrics["n_queries"] == len(NUMBERS) and metrics["n_excluded"] == 0


@pytest.mark.parametrize("top", ["", "ukbench", "UKBench"])
def test_reader_groups_each_object_s_four_images(top, tmp_path):
    protocol = load_retrieval_benchmark("ukb", ukbench(tmp_path, top))
    assert protocol.query.keys == [f"full/{name}" for name in NAMES]
    assert protocol.gallery is protocol.query  # one database, each image a query
    assert [r.tolist() for r in protocol.relevant] == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4 + [[8, 9, 10, 11]] * 4
    assert protocol.metric == "r_precision" and protocol.setups is None and protocol.ks == (1, 4)


def test_a_hand_computed_score(tmp_path, capsys):
    """Objects 0, 1 and 5 along the x, y and z axes, but image 7 (object 1) at (0.8, 0.6, 0).
    Objects 0 and 5: each query's first 4 are its object's 4 images (cosine 1): 4 each.
    Images 4-6: their object's 3 at cosine 1, then image 7 at 0.6: 4 each. Image 7: itself,
    then three of object 0 (0.8 beats its own object's 0.6): 1.
    N-S = (4 * 4 + 3 * 4 + 1 + 4 * 4) / 12 = 45 / 12 = 3.75."""
    x = np.zeros((12, 3), np.float32)
    x[0:4, 0] = 1
    x[4:7, 1] = 1
    x[7] = [0.8, 0.6, 0]
    x[8:12, 2] = 1
    embedding_folder(tmp_path / "emb", x, [f"full/{name}" for name in NAMES], parts=1)
    root = tmp_path / "data"
    (root / "full").mkdir(parents=True)
    for name in NAMES:  # scored from the file names alone: the images are not read
        (root / "full" / name).write_bytes(b"")
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "ukbench", "--root", str(root),
                 "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert 4 * report["metrics"]["r_precision"] == report["metrics"]["ns_score"] == pytest.approx(45 / 12)
    assert report["metrics"]["recall@1"] == 1.0
    assert "N-S score (of its object's 4 images, a query's own included, how many are among its first 4): " \
           "3.750 (all)." in capsys.readouterr().out
    assert "3.750 (all)" in (out / "metrics.md").read_text()


def test_evaluate_embeds_the_images_once_and_scores_as_the_plain_walk(tmp_path, capsys):
    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = ukbench(tmp_path / "data", "ukbench")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "ukbench", "--root", str(root),
                 "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x = embed_images(load_encoder(str(checkpoint)), [str(root / "ukbench" / "full" / n) for n in NAMES],
                     num_workers=0)
    assert_scores(report["metrics"], ns_reference(np.asarray(x, np.float64)))
    assert report["protocol"]["gallery"] == len(NAMES) and not report["protocol"]["leave_one_out"]
    assert (out / "embeddings" / "query" / "img_emb").is_dir() and not (out / "embeddings" / "gallery").exists()
    assert "N-S score" in capsys.readouterr().out

    # evaluated again from the embeddings it wrote, and from unicom embed --input's (found by path)
    assert main(["evaluate", "--embeddings", str(out / "embeddings"), "--dataset", "ukbench", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "r2")]) == 0
    assert main(["embed", "--input", str(root / "ukbench" / "full"), "--model", str(checkpoint), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32", "--device", "cpu", "--workers", "0"]) == 0
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "ukbench", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "r3")]) == 0
    for again in ("r2", "r3"):
        assert json.loads((tmp_path / again / "metrics.json").read_text())["metrics"] == pytest.approx(
            report["metrics"], abs=1e-6)


def test_precomputed_embeddings_with_distractors_and_re_ranking(tmp_path):
    from test_expansion import reference_expand

    root = tmp_path / "data"
    (root / "full").mkdir(parents=True)
    for name in NAMES:
        (root / "full" / name).write_bytes(b"")
    rng = np.random.default_rng(3)
    x, d = rng.standard_normal((len(NAMES), 6)), rng.standard_normal((9, 6))
    x[:, 0] += 2 * np.asarray([n // 4 for n in NUMBERS]) % 3  # some agreement within an object
    embedding_folder(tmp_path / "emb", x.astype(np.float32), [f"full/{n}" for n in NAMES], parts=2)
    embedding_folder(tmp_path / "flickr", d.astype(np.float32), [f"flickr/{i}" for i in range(9)], parts=1)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "ukbench", "--root", str(root),
                 "--distractors", str(tmp_path / "flickr"), "--qe", "2", "--dba", "1", "--dims", "3", "--no-pca",
                 "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    for row in report["dimensions"]:  # the first 3 dimensions, and all 6
        assert row["ns_score"] == 4 * row["r_precision"]
    x, d = (a.astype(np.float32).astype(np.float16).astype(np.float64) for a in (x, d))
    x, d = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, d))
    gallery = np.concatenate([x, d])
    assert report["distractors"]["count"] == 9 and report["protocol"]["gallery"] == len(NAMES) + 9
    assert_scores(report["without_expansion"], ns_reference(x, gallery))
    query, augmented = reference_expand(x, gallery, 2, 1)
    assert_scores(report["metrics"], ns_reference(query, augmented))


@pytest.mark.parametrize("change, message", [
    ("rename ukbench00021.jpg IMG_0001.jpg", r"1 files are not named as UKBench's images \(ukbench<5 digits>.jpg\), "
                                              r"e.g. IMG_0001.jpg"),
    ("remove ukbench00006.jpg", r"object 1 has 3 of its 4 images \(missing ukbench00006.jpg\)"),
    ("rename ukbench00006.jpg UKBENCH00006.JPG", None),  # the name's case is the archive's business
    ("copy ukbench00006.jpg UKBENCH00006.JPG", r"image number 00006 appears under 2 names"),
    ("remove all", r"full: no images"),
])
def test_a_folder_that_is_not_ukbench_is_named_not_guessed(change, message, tmp_path, capsys):
    root = ukbench(tmp_path)
    images = root / "full"
    action, *names = change.split()
    if action == "rename":
        (images / names[0]).rename(images / names[1])
    elif action == "copy":
        (images / names[1]).write_bytes((images / names[0]).read_bytes())
    elif names == ["all"]:
        for image in images.iterdir():
            image.unlink()
    else:
        (images / names[0]).unlink()
    if message is None:
        assert load_retrieval_benchmark("ukbench", root).query.keys[6] == "full/UKBENCH00006.JPG"
        return
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "ukbench", "--root", str(root),
                 "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_no_full_folder_names_the_layout(tmp_path, capsys):
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "ukbench", "--root", str(tmp_path),
                 "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'full'}: not found" in err and "full/ukbench<5 digits>.jpg" in err
