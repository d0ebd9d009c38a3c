"""Distractors (Revisited Oxford/Paris + 1M): embeddings of images of no query joining the gallery."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from support import class_image, encode_image
from test_evaluate_cli import embedding_folder, tiny_model_file
from test_expansion import reference_expand
from test_revisited import NAMES, QUERIES, GND, revisited_dataset, straightforward_metrics

from unicom.cli import main
from unicom.data.benchmarks import load_retrieval_benchmark


def distractor_images(folder: Path, count: int = 7) -> list[Path]:
    """``count`` 40x40 JPEGs of classes the benchmark's images are not of."""
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}" / f"distractor_{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(class_image(10 + i % 3, 100 + i, size=40)))
        paths.append(path)
    return paths


def embed_folder(images: Path, checkpoint: Path, out: Path) -> None:
    assert main(["embed", "--input", str(images), "--model", str(checkpoint), "--out", str(out), "--dtype", "float32",
                 "--device", "cpu", "--workers", "0"]) == 0


def test_distractors_embedded_by_the_model_join_the_gallery(tmp_path, capsys):
    from PIL import Image

    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    paths = distractor_images(tmp_path / "revisitop1m" / "jpg")
    embed_folder(tmp_path / "revisitop1m" / "jpg", checkpoint, tmp_path / "r1m")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root),
                 "--distractors", str(tmp_path / "r1m"), "--dims", "8", "--no-pca", "--num-workers", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())

    encoder = load_encoder(str(checkpoint))
    images = root / "roxford5k" / "jpg"
    crops = []
    for name, gnd in zip(QUERIES, GND):
        with Image.open(images / f"{name}.jpg") as image:
            crops.append(image.convert("RGB").crop(tuple(float(v) for v in gnd["bbx"])))
    query = embed_images(encoder, crops, num_workers=0)
    gallery = embed_images(encoder, [str(images / f"{n}.jpg") for n in NAMES], num_workers=0)
    distractors = embed_images(encoder, [str(p) for p in sorted(paths)], num_workers=0)
    expected = straightforward_metrics(query, np.concatenate([gallery, distractors]))
    assert expected != pytest.approx(straightforward_metrics(query, gallery))  # the distractors outrank positives
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)
    assert report["protocol"]["gallery"] == len(NAMES) + len(paths)
    assert report["distractors"] == {"embeddings": str(tmp_path / "r1m"), "count": len(paths)}
    assert f"against a gallery of 16 (7 of them distractors, {tmp_path / 'r1m'})" in capsys.readouterr().out

    # the benchmark's embeddings from unicom embed --dataset: the same report
    assert main(["embed", "--dataset", "roxford5k", "--root", str(root), "--model", str(checkpoint), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32", "--device", "cpu", "--workers", "0"]) == 0
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--distractors", str(tmp_path / "r1m"), "--dims", "8", "--no-pca", "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["metrics"] == pytest.approx(
        report["metrics"], abs=1e-6)

    # distractors of other weights (another model of the same width) are refused, by the recorded digest
    other = tiny_model_file(tmp_path / "other.pt", seed=1)
    embed_folder(tmp_path / "revisitop1m" / "jpg", other, tmp_path / "r1m-other")
    for source in (["--model", str(checkpoint), "--num-workers", "0", "--device", "cpu"],
                   ["--embeddings", str(tmp_path / "emb")]):
        assert main(["evaluate", *source, "--dataset", "roxford5k", "--root", str(root), "--distractors",
                     str(tmp_path / "r1m-other"), "--dims", "none", "--out", str(tmp_path / "r3")]) == 2
        assert re.search(r"r1m-other \(--distractors\) was embedded by other weights than the benchmark "
                         r"\(weights_sha256 [0-9a-f]{12}… against [0-9a-f]{12}…\)", capsys.readouterr().err)

    # the benchmark's own images, embedded as a folder (keys of their own): found by their files
    embed_folder(root / "roxford5k" / "jpg", checkpoint, tmp_path / "own")
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--distractors", str(tmp_path / "own"), "--dims", "none", "--out", str(tmp_path / "r4")]) == 2
    assert f"own (--distractors) holds {len(NAMES)} images of the benchmark's gallery" in capsys.readouterr().err


def test_distractor_vectors_join_the_gallery_before_re_ranking(tmp_path, capsys):
    root = revisited_dataset(tmp_path / "data", "rparis6k")
    protocol = load_retrieval_benchmark("rparis6k", root)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2 + len(NAMES), 8)).astype(np.float32)
    d = rng.standard_normal((30, 8)).astype(np.float32)
    embedding_folder(tmp_path / "emb", x, protocol.query.keys + protocol.gallery.keys, parts=1)
    embedding_folder(tmp_path / "r1m", d, [f"r1m/{i}" for i in range(30)], parts=3)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "rparis6k", "--root", str(root),
                 "--distractors", str(tmp_path / "r1m"), "--dba", "2", "--qe", "1", "--dims", "none",
                 "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x, d = (a.astype(np.float16).astype(np.float64) for a in (x, d))
    x, d = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, d))  # as they are ranked
    gallery = np.concatenate([x[2:], d])
    assert report["without_expansion"] == pytest.approx(straightforward_metrics(x[:2], gallery))
    assert report["metrics"] == pytest.approx(straightforward_metrics(*reference_expand(x[:2], gallery, 1, 2)))
    assert report["distractors"]["count"] == 30


@pytest.mark.parametrize("case, message", [
    ("same folder", r"\(--distractors\) is the folder of the benchmark's own embeddings \(--embeddings\)"),
    ("gallery image", r"\(--distractors\) holds 1 image of the benchmark's gallery \(e.g. jpg/all_souls_000003.jpg\)"),
    ("other width", r"\(--distractors\) holds 4-dimensional embeddings, the benchmark's are 8-dimensional"),
    ("zero row", r"r1m: 1 of the rows used hold NaN or infinite values or are all zeros, e.g. 'r1m/2' \(row 2\)"),
])
def test_distractors_that_would_falsify_the_scores_are_refused(case, message, tmp_path, capsys):
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    protocol = load_retrieval_benchmark("roxford5k", root)
    rng = np.random.default_rng(0)
    embedding_folder(tmp_path / "emb", rng.standard_normal((2 + len(NAMES), 8)).astype(np.float32),
                     protocol.query.keys + protocol.gallery.keys, parts=1)
    d, keys = rng.standard_normal((5, 4 if case == "other width" else 8)), [f"r1m/{i}" for i in range(5)]
    if case == "gallery image":
        keys[1] = protocol.gallery.keys[3]
    if case == "zero row":
        d[2] = 0
    embedding_folder(tmp_path / "r1m", d.astype(np.float32), keys, parts=1)
    distractors = tmp_path / ("emb" if case == "same folder" else "r1m")
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--distractors", str(distractors), "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "report").exists()


def test_benchmarks_that_relate_images_by_class_refuse_distractors_before_embedding(tmp_path, capsys):
    from benchmark_layouts import sop

    root = sop(tmp_path / "data", "download")
    assert main(["evaluate", "--model", "NOT-LOADED", "--dataset", "sop", "--root", str(root),
                 "--distractors", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "--distractors: sop finds a query's relevant images by class label" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(tmp_path), "--distractors", str(tmp_path),
                 "--out", str(tmp_path / "report")]) == 2
    assert "give --dataset roxford5k, rparis6k, gldv2, holidays, ukbench or copydays with --root" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "cifar10", "--root", str(tmp_path),
                 "--distractors", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "--distractors join the gallery of an image retrieval benchmark" in capsys.readouterr().err


def test_gldv2_index_takes_distractors_and_scores_public_and_private_with_them(tmp_path):
    from benchmark_layouts import gldv2

    from unicom.evaluate import retrieval_metrics_from_relevance
    from unicom.evaluate.metrics import summarize

    root = gldv2(tmp_path / "data", "download")
    protocol = load_retrieval_benchmark("gldv2", root)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((len(protocol.query) + len(protocol.gallery), 6)).astype(np.float32)
    d = rng.standard_normal((12, 6)).astype(np.float32)
    embedding_folder(tmp_path / "emb", x, protocol.query.keys + protocol.gallery.keys, parts=1)
    embedding_folder(tmp_path / "distractors", d, [f"d{i}" for i in range(12)], parts=2)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "gldv2", "--root", str(root),
                 "--distractors", str(tmp_path / "distractors"), "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x, d = (a.astype(np.float16).astype(np.float32) for a in (x, d))
    query, gallery = x[:len(protocol.query)], np.concatenate([x[len(protocol.query):], d])
    expected = retrieval_metrics_from_relevance(query, gallery, protocol.relevant, ks=(1, 10, 100), per_query=True)
    per_query = expected.pop("per_query")
    assert expected != pytest.approx(retrieval_metrics_from_relevance(  # the distractors outrank relevant images
        query, x[len(protocol.query):], protocol.relevant, ks=(1, 10, 100)))
    assert report["metrics"] == pytest.approx(expected)
    assert set(report["subsets"]) == set(protocol.subsets)
    for name, rows in protocol.subsets.items():
        assert report["subsets"][name] == pytest.approx(summarize(per_query, (1, 10, 100), rows))
    assert report["protocol"]["gallery"] == len(protocol.gallery) + 12
