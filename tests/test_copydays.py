"""INRIA Copydays: attacked copies against the originals, one setup per attack, Jégou's AP."""

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

ORIGINALS = ["200000.jpg", "200100.jpg", "200200.jpg", "200300.jpg"]
ATTACKS = {  # as the archives unpack: the strong copies numbered after their original, the others named as it
    "strong": ["200001.jpg", "200002.jpg", "200101.jpg", "200201.jpg", "200301.jpg"],
    "jpegqual/10": ORIGINALS, "jpegqual/3": ORIGINALS,
    "crops/50": ORIGINALS,
}


def copydays(root: Path, top: str = "", images: bool = True) -> Path:
    """``root/[top/]original/``, ``strong/``, ``jpegqual/<q>/``, ``crops/<p>/``: 40x40 JPEGs
    (an original's copies alike in colour), or empty files when not ``images``."""
    for folder, names in {"original": ORIGINALS, **ATTACKS}.items():
        (root / top / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            content = encode_image(class_image(int(name[2:4]), i + 7 * len(folder), size=40)) if images else b""
            (root / top / folder / name).write_bytes(content)
    return root


def query_keys() -> list[str]:
    return [f"{block}/{name}" for block in ("strong", "jpegqual/3", "jpegqual/10", "crops/50") for name in ATTACKS[block]]


def holidays_ap(ranks: list[int], positives: int) -> float:
    """The AP of the Holidays evaluation package: trapezoids under the precision-recall
    curve, from the 0-based ranks of the positives found."""
    ap = 0.0
    for found, rank in enumerate(ranks):
        before = 1.0 if rank == 0 else found / rank
        after = (found + 1) / (rank + 1)
        ap += (before + after) / (2 * positives)
    return ap


def reference_map(queries: np.ndarray, gallery: np.ndarray, keys: list[str], blocks: tuple[str, ...]) -> float:
    """The mean AP of the copies of ``blocks``: each ranks the gallery by cosine (ties by lower
    row), its positive being the original of its first 4 digits (gallery row of ORIGINALS)."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    aps = []
    for q, key in enumerate(keys):
        block, name = key.rsplit("/", 1)
        if block not in blocks:
            continue
        ranking = list(np.argsort(-(gallery @ queries[q]), kind="stable"))
        positive = [n[:4] for n in ORIGINALS].index(name[:4])
        aps.append(holidays_ap([ranking.index(positive)], 1))
    return float(np.mean(aps))


@pytest.mark.parametrize("top", ["", "copydays", "Copydays"])
def test_reader_pairs_each_copy_with_its_original(top, tmp_path):
    protocol = load_retrieval_benchmark("inria-copydays", copydays(tmp_path, top, images=False))
    assert protocol.gallery.keys == [f"original/{name}" for name in ORIGINALS]
    assert protocol.query.keys == query_keys()  # the quality and crop folders in numeric order
    assert list(protocol.setups) == ["strong", "jpegqual/3", "jpegqual/10", "jpegqual", "crops/50", "crops", "all"]
    positives, ignored = protocol.setups["all"]
    assert [p.tolist() for p in positives] == [[0], [0], [1], [2], [3]] + [[0], [1], [2], [3]] * 3
    assert all(len(i) == 0 for i in ignored)
    strong = protocol.setups["strong"][0]
    assert [len(p) for p in strong] == [1] * 5 + [0] * 12  # the other copies are left out of the setup
    assert [len(p) for p in protocol.setups["jpegqual"][0]] == [0] * 5 + [1] * 8 + [0] * 4
    assert protocol.metric == "map_strong" and protocol.ks == (1, 5, 10)


def test_a_hand_computed_score(tmp_path, capsys):
    """Originals along x, y, z and w. Strong copies: 200001 at (0.9, 0.1): its original first
    (AP 1); 200002 at x: AP 1; 200101 at (0.8, 0.6): the x original first, its own second:
    AP = (0/1 + 1/2) / 2 = 0.25 (Jégou's trapezoids; a plain mean of precisions would give
    0.5); 200201 and 200301 exact: 1. map_strong = (1 + 1 + 0.25 + 1 + 1) / 5 = 0.85. The
    other copies lie on their originals: 1."""
    originals = np.eye(4, dtype=np.float32)
    strong = np.array([[0.9, 0.1, 0, 0], [1, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    x = np.concatenate([originals, strong, np.tile(originals, (3, 1))])
    embedding_folder(tmp_path / "emb", x, [f"original/{n}" for n in ORIGINALS] + query_keys(), parts=2)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "copydays", "--root",
                 str(copydays(tmp_path / "data", images=False)), "--dims", "none", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["map_strong"] == pytest.approx(0.85, abs=1e-6)
    assert metrics["mp@1_strong"] == pytest.approx(4 / 5)
    assert metrics["map_jpegqual"] == metrics["map_crops/50"] == pytest.approx(1.0)
    assert metrics["map_all"] == pytest.approx((4.25 + 12) / 17, abs=1e-6)
    assert metrics["n_queries_strong"] == 5 and metrics["n_queries_jpegqual/3"] == 4 and metrics["n_queries_all"] == 17
    text = (out / "metrics.md").read_text()
    assert "17 queries, attacked copies, each against the originals, against a gallery of 4" in text
    assert "| strong | 85.00 | 80.00 |" in text and text in capsys.readouterr().out


def test_evaluate_with_a_model_scores_as_the_plain_walk(tmp_path):
    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = copydays(tmp_path / "data", "copydays")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "copydays", "--root", str(root),
                 "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    encoder = load_encoder(str(checkpoint))
    folder = root / "copydays"
    queries = np.asarray(embed_images(encoder, [str(folder / key) for key in query_keys()], num_workers=0), np.float64)
    gallery = np.asarray(embed_images(encoder, [str(folder / "original" / n) for n in ORIGINALS], num_workers=0),
                         np.float64)
    for setup, blocks in (("strong", ("strong",)), ("jpegqual", ("jpegqual/3", "jpegqual/10")),
                          ("crops/50", ("crops/50",)), ("all", ("strong", "jpegqual/3", "jpegqual/10", "crops/50"))):
        assert report["metrics"][f"map_{setup}"] == pytest.approx(reference_map(queries, gallery, query_keys(), blocks),
                                                                  abs=1e-5), setup
    assert report["protocol"]["gallery"] == len(ORIGINALS) and report["protocol"]["metric"] == "map_strong"


def test_precomputed_embeddings_with_distractors(tmp_path):
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((4, 8))
    queries = np.concatenate([gallery[[0, 0, 1, 2, 3]], np.tile(gallery, (3, 1))]) + 0.9 * rng.standard_normal((17, 8))
    distractors = rng.standard_normal((30, 8))
    embedding_folder(tmp_path / "emb", np.concatenate([gallery, queries]).astype(np.float32),
                     [f"original/{n}" for n in ORIGINALS] + query_keys(), parts=3)
    embedding_folder(tmp_path / "yfcc", distractors.astype(np.float32), [f"yfcc/{i}" for i in range(30)], parts=1)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "copydays", "--root",
                 str(copydays(tmp_path / "data", images=False)), "--distractors", str(tmp_path / "yfcc"),
                 "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    as_stored = [a.astype(np.float32).astype(np.float16).astype(np.float64) for a in (gallery, queries, distractors)]
    full_gallery = np.concatenate([as_stored[0], as_stored[2]])
    assert report["distractors"]["count"] == 30 and report["protocol"]["gallery"] == 34
    for setup, blocks in (("strong", ("strong",)), ("all", ("strong", "jpegqual/3", "jpegqual/10", "crops/50"))):
        expected = reference_map(as_stored[1], full_gallery, query_keys(), blocks)
        assert report["metrics"][f"map_{setup}"] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["map_strong"] < 1  # the distractors take places


@pytest.mark.parametrize("change, message", [
    ("rename strong/200101.jpg strong/IMG_1.jpg", r"strong: 1 files are not named as Copydays' images \(6 digits, "
                                                  r"\.jpg\), e\.g\. IMG_1\.jpg"),
    ("rename original/200300.jpg original/200301.jpg", None),  # an original of another ending: still its block's
    ("copy original/200300.jpg original/200302.jpg", r"200300\.jpg and 200302\.jpg are both originals 2003xx"),
    ("remove original/200200.jpg", r"strong/200201\.jpg: copies no original \(.*original has no 2002xx image\)"),
    ("remove strong", r"strong: not found"),
    ("empty crops", r"crops: no sub-folders"),
])
def test_a_folder_that_is_not_copydays_is_named_not_guessed(change, message, tmp_path, capsys):
    import shutil

    root = copydays(tmp_path, images=False)
    action, *paths = change.split()
    if action == "rename":
        (root / paths[0]).rename(root / paths[1])
    elif action == "copy":
        shutil.copy(root / paths[0], root / paths[1])
    elif action == "empty":
        shutil.rmtree(root / paths[0])
        (root / paths[0]).mkdir()
    else:
        target = root / paths[0]
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if message is None:
        assert load_retrieval_benchmark("copydays", root).gallery.keys[3] == "original/200301.jpg"
        return
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "copydays", "--root", str(root),
                 "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)
