"""Revisited Oxford5k / Paris6k: the easy, medium and hard setups, mAP and mP@k, the ground truth pickle."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from support import class_image, encode_image

from unicom.cli import main
from unicom.data.benchmarks import load_retrieval_benchmark
from unicom.errors import InputError
from unicom.evaluate import revisited_metrics


def on_circle(angles) -> np.ndarray:
    """2-D unit vectors at ``angles``: a query at angle 0 ranks them by increasing angle."""
    angles = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)


# --------------------------------------------------------------------------- the metric, by hand


def test_ap_and_mp_at_k_of_each_setup_by_hand():
    # gallery rows 0..7 at angles 0.1 * row: query 0 (angle 0) ranks them 0, 1, ..., 7 and
    # query 1 (angle pi) ranks them 7, 6, ..., 0
    gallery = on_circle(0.1 * np.arange(8))
    query = on_circle([0.0, math.pi])
    easy, hard, junk = [[0, 4], [3]], [[2, 6], []], [[1, 5], []]  # query 1 has no hard positive
    setups = {
        "easy": (easy, [j + h for j, h in zip(junk, hard)]),
        "medium": ([e + h for e, h in zip(easy, hard)], junk),
        "hard": (hard, [j + e for j, e in zip(junk, easy)]),
    }
    m = revisited_metrics(query, gallery, setups, kappas=(1, 5, 10))

    # query 0, easy: 1, 5, 2, 6 removed leaves 0 3 4 7; positives at 0-based ranks 0 and 2:
    # AP = ((1 + 1/1)/2 + (1/2 + 2/3)/2) / 2 = 19/24; last positive at rank 3, so mP@5 and
    # mP@10 are the precision at 3: 2/3
    # query 1, easy: nothing removed, ranking 7 6 5 4 3 ...: its positive 3 at rank 4:
    # AP = (0/4 + 1/5)/2 = 1/10; P@1 = 0, P@5 = P@10 = 1/5 (cut at its rank, 5)
    assert m["map_easy"] == pytest.approx((19 / 24 + 1 / 10) / 2)
    assert m["mp@1_easy"] == pytest.approx((1 + 0) / 2)
    assert m["mp@5_easy"] == pytest.approx((2 / 3 + 1 / 5) / 2)
    assert m["mp@10_easy"] == pytest.approx((2 / 3 + 1 / 5) / 2)
    # query 0, medium: 1, 5 removed leaves 0 2 3 4 6 7; positives 0 2 4 6 at ranks 0, 1, 3, 4:
    # AP = (1 + 1 + (2/3 + 3/4)/2 + (3/4 + 4/5)/2) / 4 = 209/240; mP@5 = mP@10 = 4/5
    assert m["map_medium"] == pytest.approx((209 / 240 + 1 / 10) / 2)
    assert m["mp@1_medium"] == pytest.approx(1 / 2)
    assert m["mp@5_medium"] == pytest.approx((4 / 5 + 1 / 5) / 2)
    assert m["mp@10_medium"] == pytest.approx((4 / 5 + 1 / 5) / 2)
    # query 0, hard: 1, 5, 0, 4 removed leaves 2 3 6 7; positives at 0 and 2, as in easy;
    # query 1 has no hard positive: left out of the hard means, not counted as 0
    assert m["map_hard"] == pytest.approx(19 / 24)
    assert (m["mp@1_hard"], m["mp@5_hard"], m["mp@10_hard"]) == pytest.approx((1, 2 / 3, 2 / 3))
    assert (m["n_queries_hard"], m["n_excluded_hard"]) == (1, 1)
    assert (m["n_queries_easy"], m["n_excluded_easy"]) == (2, 0)


def test_ignored_images_do_not_count_against_a_positive():
    # ranking 0 1 2: the positive 2 behind two ignored images scores as if it came first
    gallery, query = on_circle([0.0, 0.1, 0.2]), on_circle([0.0])
    m = revisited_metrics(query, gallery, {"s": ([[2]], [[0, 1]])}, kappas=(1,))
    assert (m["map_s"], m["mp@1_s"]) == (1.0, 1.0)
    kept = revisited_metrics(query, gallery, {"s": ([[2]], [[]])}, kappas=(1,))
    assert kept["map_s"] == pytest.approx((0 / 2 + 1 / 3) / 2)
    assert kept["mp@1_s"] == 0.0


def test_an_image_listed_as_positive_and_ignored_counts_as_positive():
    gallery, query = on_circle([0.0, 0.1]), on_circle([0.0])
    m = revisited_metrics(query, gallery, {"s": ([[0, 1]], [[0]])}, kappas=(1,))
    assert m["map_s"] == 1.0


# --------------------------------------------------------------------------- a dataset on disk

NAMES = [f"all_souls_{i:06d}" for i in range(9)]
QUERIES = [NAMES[0], NAMES[4]]
GND = [
    {"bbx": np.array([4.0, 6.5, 30.2, 28.0]), "easy": np.array([1, 2]), "hard": np.array([3, 5]),
     "junk": np.array([6])},
    {"bbx": [0, 0, 20, 36], "easy": [7], "hard": [], "junk": [8, 0]},
]


def revisited_dataset(root: Path, name: str, *, layout: str = "download", protocol: int = 2) -> Path:
    """``root/<name>/gnd_<name>.pkl`` (pickle ``protocol``) and ``jpg/<image>.jpg`` (40x40
    JPEGs); with ``layout="flat"`` the files are directly under ``root``."""
    folder = root / name if layout == "download" else root
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(NAMES):
        (folder / "jpg" / f"{image}.jpg").write_bytes(encode_image(class_image(i % 4, i, size=40)))
    with open(folder / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": NAMES, "qimlist": QUERIES, "gnd": GND}, f, protocol=protocol)
    return root


def straightforward_metrics(query, gallery, kappas=(1, 5, 10), ground_truth=GND) -> dict:
    """The protocol computed the plain way: walk each ranking, skip the ignored images."""
    similarities = query @ gallery.T
    result = {}
    for setup, (positive_lists, ignored_lists) in {
        "easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }.items():
        aps, precisions = [], []
        for q, gnd in enumerate(ground_truth):
            positives = {int(i) for f in positive_lists for i in gnd[f]}
            ignored = {int(i) for f in ignored_lists for i in gnd[f]} - positives
            if not positives:
                continue
            ranking = [i for i in np.argsort(-similarities[q], kind="stable") if i not in ignored]
            ap, found, hits_at = 0.0, 0, []
            for rank, item in enumerate(ranking):
                if item in positives:
                    before = 1.0 if rank == 0 else found / rank
                    found += 1
                    ap += (before + found / (rank + 1)) / 2 / len(positives)
                hits_at.append(found)
            last = max(rank for rank, item in enumerate(ranking) if item in positives) + 1
            aps.append(ap)
            precisions.append([hits_at[min(k, last) - 1] / min(k, last) for k in kappas])
        result[f"map_{setup}"] = np.mean(aps)
        for column, k in enumerate(kappas):
            result[f"mp@{k}_{setup}"] = np.mean([p[column] for p in precisions])
        result[f"n_queries_{setup}"] = len(aps)
        result[f"n_excluded_{setup}"] = len(ground_truth) - len(aps)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_queries_in_blocks_agree_with_walking_each_ranking(seed):
    from unicom.data.benchmarks.revisited import REVISITED_SETUPS

    rng = np.random.default_rng(seed)
    query, gallery = rng.standard_normal((30, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    ground_truth = []
    for _ in range(30):
        order, (easy, hard, junk) = rng.permutation(300), rng.integers(0, 20, 3)
        ground_truth.append({"easy": order[:easy], "hard": order[easy:easy + hard],
                             "junk": order[easy + hard:easy + hard + junk]})
    setups = {name: ([np.concatenate([g[f] for f in positive]) for g in ground_truth],
                     [np.concatenate([g[f] for f in ignored]) for g in ground_truth])
              for name, (positive, ignored) in REVISITED_SETUPS.items()}
    got = revisited_metrics(query, gallery, setups, kappas=(1, 5, 10), chunk_size=7)
    assert got == pytest.approx(straightforward_metrics(query, gallery, ground_truth=ground_truth), abs=1e-12)


def test_reader_gives_cropped_queries_the_database_and_the_three_setups(tmp_path):
    protocol = load_retrieval_benchmark("roxford", revisited_dataset(tmp_path, "roxford5k"))
    assert protocol.name == "roxford5k" and protocol.metric == "map_medium" and protocol.ks == (1, 5, 10)
    assert protocol.gallery.keys == [f"jpg/{n}.jpg" for n in NAMES]
    assert protocol.query.keys == ["jpg/all_souls_000000.jpg#crop", "jpg/all_souls_000004.jpg#crop"]
    assert protocol.query.paths[1] == str(tmp_path / "roxford5k" / "jpg" / "all_souls_000004.jpg")
    np.testing.assert_array_equal(protocol.query_boxes, [[4.0, 6.5, 30.2, 28.0], [0, 0, 20, 36]])
    as_lists = {name: ([p.tolist() for p in positives], [i.tolist() for i in ignored])
                for name, (positives, ignored) in protocol.setups.items()}
    assert as_lists == {
        "easy": ([[1, 2], [7]], [[3, 5, 6], [0, 8]]),
        "medium": ([[1, 2, 3, 5], [7]], [[6], [0, 8]]),
        "hard": ([[3, 5], []], [[1, 2, 6], [0, 7, 8]]),
    }
    # --root may be the dataset folder itself
    flat = load_retrieval_benchmark("rparis6k", revisited_dataset(tmp_path / "flat", "rparis6k", layout="flat"))
    assert flat.query.keys == protocol.query.keys and flat.gallery.keys == protocol.gallery.keys


def test_evaluate_with_a_model_embeds_the_query_crops_and_reports_each_setup(tmp_path, capsys):
    from PIL import Image
    from test_evaluate_cli import tiny_model_file

    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder

    checkpoint = tiny_model_file(tmp_path / "FP16-ViT-tiny.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "8", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())

    images = root / "roxford5k" / "jpg"
    crops = []
    for name, gnd in zip(QUERIES, GND):
        with Image.open(images / f"{name}.jpg") as image:
            crops.append(image.convert("RGB").crop(tuple(float(v) for v in gnd["bbx"])))
    encoder = load_encoder(str(checkpoint))
    query = embed_images(encoder, crops, num_workers=0)
    gallery = embed_images(encoder, [str(images / f"{n}.jpg") for n in NAMES], num_workers=0)
    assert not np.allclose(query[0], gallery[0], atol=1e-3)  # the crop, not the whole image
    expected = straightforward_metrics(query, gallery)
    assert report["metrics"] == pytest.approx(expected)
    assert report["protocol"]["setups"] == ["easy", "medium", "hard"] and report["protocol"]["metric"] == "map_medium"
    assert (report["metrics"]["n_queries_hard"], report["metrics"]["n_excluded_hard"]) == (1, 1)
    assert [r["dimension"] for r in report["dimensions"]] == [8, 16]
    assert report["dimensions"][-1]["map_medium"] == pytest.approx(expected["map_medium"])
    markdown = (out / "metrics.md").read_text()
    assert "2 queries, cropped to their boxes, against a gallery of 9" in markdown
    assert "| setup | mAP | mP@1 | mP@5 | mP@10 | queries scored |" in markdown
    assert (f"| hard | {100 * expected['map_hard']:.2f} | {100 * expected['mp@1_hard']:.2f} | "
            f"{100 * expected['mp@5_hard']:.2f} | {100 * expected['mp@10_hard']:.2f} | 1 |") in markdown
    assert (out / "recall_vs_dimension.png").is_file()
    from unicom.evaluate.report import headline_scores

    # a summary of several benchmarks quotes it by its medium and hard mAP
    assert headline_scores(report) == pytest.approx({"map_medium": expected["map_medium"], "map_hard": expected["map_hard"]})

    # other boxes are other queries: the cached crops are not scored for them
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": [dict(GND[0], bbx=[0, 0, 9, 9]), GND[1]]}))
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "none", "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 2
    assert re.search(r"holds embeddings made otherwise \(query_boxes_sha256: '[0-9a-f]{64}' before, '[0-9a-f]{64}' "
                     r"now\); use another --out", capsys.readouterr().err)


def test_a_query_box_beyond_its_image_is_cropped_with_a_warning(tmp_path):
    # images resized after the ground truth was made: the boxes no longer fit them
    from unicom.data.benchmarks.revisited import cropped_queries

    protocol = load_retrieval_benchmark("roxford5k", revisited_dataset(tmp_path, "roxford5k"))
    with pytest.warns(UserWarning, match=r"1 query boxes reach beyond their image, e\.g\. all_souls_000004\.jpg "
                                         r"\(40x40, box 0, 0, 20, 41\.5\)"):
        crops = cropped_queries(protocol.query, protocol.query_boxes + [[0, 0, 0, 0], [0, 0, 0, 5.5]])
    assert crops[1].size == (20, 42)  # PIL's crop, rounded: black below the image


def test_a_class_subset_is_refused_before_anything_is_embedded(tmp_path, capsys):
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root",
                 str(revisited_dataset(tmp_path / "data", "roxford5k")), "--classes", "1", "--num-workers", "0",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "--classes and --exclude-classes need class labels" in capsys.readouterr().err
    assert not (out / "embeddings").exists()


def test_precomputed_embeddings_are_scored_from_the_ground_truth_alone(tmp_path):
    from test_evaluate_cli import embedding_folder

    root = revisited_dataset(tmp_path / "data", "rparis6k")
    protocol = load_retrieval_benchmark("rparis6k", root)
    x = np.random.default_rng(3).standard_normal((2 + len(NAMES), 8)).astype(np.float32)
    embedding_folder(tmp_path / "emb", x, protocol.query.keys + protocol.gallery.keys, parts=1)
    for image in (root / "rparis6k" / "jpg").iterdir():
        image.unlink()
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "rparis", "--root", str(root),
                 "--dims", "none", "--out", str(out)]) == 0
    x = x.astype(np.float16).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == pytest.approx(
        straightforward_metrics(x[:2], x[2:]))


def test_a_whole_query_image_is_not_taken_for_its_crop(tmp_path, capsys):
    # embeddings of the database images alone, with their paths: the queries are among them,
    # but uncropped; they must not be matched by path
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    root = revisited_dataset(tmp_path / "data", "roxford5k")
    protocol = load_retrieval_benchmark("roxford5k", root)
    x = np.random.default_rng(0).standard_normal((len(NAMES), 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=x, metadata=pa.table({"key": protocol.gallery.keys,
                                                               "path": protocol.gallery.paths}))
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert "2 query images of the benchmark have no embedding (by key or path), e.g. ['jpg/all_souls_000000.jpg#crop'" \
        in error
    assert "the queries are the query images cropped to their boxes: give the embeddings of the crops rows" in error


# --------------------------------------------------------------------------- unicom embed --dataset


def embed_dataset(root: Path, checkpoint: Path, out: Path, *extra: str, name: str = "roxford5k") -> int:
    return main(["embed", "--dataset", name, "--root", str(root), "--model", str(checkpoint), "--out", str(out),
                 "--dtype", "float32", "--device", "cpu", "--rows-per-part", "4", *extra])


def folder_contents(folder: Path) -> dict:
    """Every file of an embedding folder: arrays as lists, parquet files as rows, JSON as loaded."""
    import pyarrow.parquet as pq

    contents = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".npy":
            contents[path.relative_to(folder).as_posix()] = np.load(path).tolist()
        elif path.suffix == ".parquet":
            contents[path.relative_to(folder).as_posix()] = pq.read_table(path).to_pylist()
        elif path.is_file():
            contents[path.relative_to(folder).as_posix()] = json.loads(path.read_text())
    return contents


def test_embed_writes_the_gallery_and_the_cropped_queries_that_evaluate_scores_as_with_the_model(tmp_path):
    import pyarrow.parquet as pq
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    # two decoding processes: the crops are made in the workers
    assert embed_dataset(root, checkpoint, tmp_path / "emb", "--workers", "2", name="roxford") == 0
    # the gallery in parts of 4 rows, then the queries' part
    keys = [pq.read_table(tmp_path / "emb" / "metadata" / f"metadata_{n}.parquet").column("key").to_pylist()
            for n in range(4)]
    assert keys == [[f"jpg/{n}.jpg" for n in NAMES[start:start + 4]] for start in (0, 4, 8)] + [
        ["jpg/all_souls_000000.jpg#crop", "jpg/all_souls_000004.jpg#crop"]]
    crops = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_3.parquet").to_pylist()
    assert [(row["width"], row["height"]) for row in crops] == [(26, 22), (20, 36)]  # the boxes' sizes, rounded
    assert crops[1]["image_path"] == str(root / "roxford5k" / "jpg" / "all_souls_000004.jpg")

    from_embeddings, from_model = tmp_path / "scored", tmp_path / "with-model"
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "8", "--out", str(from_embeddings)]) == 0
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root), "--dims", "8",
                 "--num-workers", "0", "--device", "cpu", "--out", str(from_model)]) == 0
    scored = json.loads((from_embeddings / "metrics.json").read_text())
    reference = json.loads((from_model / "metrics.json").read_text())
    assert scored["metrics"] == pytest.approx(reference["metrics"], abs=1e-9)
    assert [row["dimension"] for row in scored["dimensions"]] == [8, 16]
    for row, expected in zip(scored["dimensions"], reference["dimensions"]):
        assert row == pytest.approx(expected, abs=1e-9)
    assert scored["protocol"] == reference["protocol"]


def test_draft_decoding_leaves_the_query_crops_as_they_are(tmp_path):
    # 256-pixel JPEGs: --draft decodes the gallery at 1/8 scale (32 pixels, the model's input)
    # but a query is a crop of the whole image, never decoded in draft
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = tmp_path / "data"
    (root / "roxford5k" / "jpg").mkdir(parents=True)
    for i, name in enumerate(NAMES):
        (root / "roxford5k" / "jpg" / f"{name}.jpg").write_bytes(encode_image(class_image(i % 4, i, size=256)))
    ground_truth = [dict(GND[0], bbx=[10, 20, 250, 230]), dict(GND[1], bbx=[0, 0, 256, 128])]
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(
        pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": ground_truth}))
    assert embed_dataset(root, checkpoint, tmp_path / "full", "--workers", "0") == 0
    assert embed_dataset(root, checkpoint, tmp_path / "draft", "--workers", "0", "--draft") == 0
    full, draft = folder_contents(tmp_path / "full"), folder_contents(tmp_path / "draft")
    assert draft["img_emb/img_emb_3.npy"] == full["img_emb/img_emb_3.npy"]
    assert not np.allclose(draft["img_emb/img_emb_0.npy"], full["img_emb/img_emb_0.npy"], atol=1e-4)


def test_embed_resumed_after_a_kill_gives_the_same_folder(tmp_path):
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "rparis6k")
    assert embed_dataset(root, checkpoint, tmp_path / "whole", "--workers", "0", name="rparis6k") == 0
    assert embed_dataset(root, checkpoint, tmp_path / "killed", "--workers", "0", name="rparis6k") == 0
    # what a kill leaves: the queries' part with its embeddings but not yet its metadata (the
    # last file of a part), a gallery part not started, half-written temporaries
    killed = tmp_path / "killed"
    (killed / "metadata" / "metadata_3.parquet").unlink()
    (killed / "img_emb" / "img_emb_1.npy").unlink()
    (killed / "metadata" / "metadata_1.parquet").unlink()
    (killed / "metadata" / ".metadata_3.parquet.k1ll3d_x.tmp.parquet").write_bytes(b"half-written")
    (killed / "img_emb" / "img_emb_3.npy").write_bytes(b"\x93NUMPY cut short")
    assert embed_dataset(root, checkpoint, killed, "--workers", "0", name="rparis6k") == 0
    assert folder_contents(killed) == folder_contents(tmp_path / "whole")


def test_embed_refuses_a_folder_of_crops_of_other_boxes(tmp_path, capsys):
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    out = tmp_path / "emb"
    assert embed_dataset(root, checkpoint, out, "--workers", "0") == 0
    before = folder_contents(out)
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": [dict(GND[0], bbx=[0, 0, 9, 9]), GND[1]]}))
    capsys.readouterr()
    # neither finished (as here) nor resumed: the crops of other boxes are other queries
    assert embed_dataset(root, checkpoint, out, "--workers", "0") == 2
    assert re.search(r"holds embeddings of another configuration \(query_boxes_sha256: '[0-9a-f]{64}' before, "
                     r"'[0-9a-f]{64}' now\); mixing them would make the parts incomparable: use another --out",
                     capsys.readouterr().err)
    # nor scored against the new boxes
    assert main(["evaluate", "--embeddings", str(out), "--dataset", "roxford5k", "--root", str(root), "--dims", "none",
                 "--out", str(tmp_path / "report")]) == 2
    assert re.search(r"emb: its query crops were made from other boxes than the ground truth's \(query_boxes_sha256: "
                     r"'[0-9a-f]{64}' recorded, '[0-9a-f]{64}' now\); embed the queries again", capsys.readouterr().err)
    # nor scored as the other dataset
    paris = revisited_dataset(tmp_path / "paris", "rparis6k")
    assert main(["evaluate", "--embeddings", str(out), "--dataset", "rparis", "--root", str(paris), "--dims", "none",
                 "--out", str(tmp_path / "report")]) == 2
    assert "emb: holds the embeddings of roxford5k, not of rparis6k; give --dataset roxford5k, or the folder unicom " \
        "embed --dataset rparis6k wrote" in capsys.readouterr().err
    # nor continued from the dataset's images as a plain folder
    assert main(["embed", "--input", str(root / "roxford5k" / "jpg"), "--model", str(checkpoint), "--out", str(out),
                 "--dtype", "float32", "--device", "cpu", "--rows-per-part", "4", "--workers", "0"]) == 2
    assert "(dataset: 'roxford5k' before, None now, query_boxes_sha256: " in capsys.readouterr().err
    assert folder_contents(out) == before


def test_embed_of_a_benchmark_has_no_captions_to_embed_as_text(tmp_path, capsys):
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    assert main(["embed", "--dataset", "roxford5k", "--root", str(root), "--model", "timm/test_vit", "--modalities",
                 "image,text", "--out", str(tmp_path / "emb")]) == 2
    assert f"{root}: no captions to embed as text (a benchmark of images); use --modalities image" in \
        capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "cub", "--root", "data"], "--dataset cub: unicom embed writes the benchmarks whose queries are crops: "
                                             "roxford5k, rparis6k (or roxford, rparis); embed another benchmark's "
                                             "images with --input"),
    (["--dataset", "roxford5k"], "--dataset roxford5k needs --root, the folder holding the dataset"),
    (["--input", "photos", "--root", "data"], "--root goes with --dataset; --input names the images itself"),
    (["--dataset", "roxford5k", "--root", "data", "--key-column", "id", "--path-column", "file"],
     "--path-column, --key-column name columns of an --input list or parquet shards; --dataset reads the benchmark's "
     "own ground truth"),
])
def test_embed_refuses_what_it_cannot_write_before_anything_is_written(arguments, message, tmp_path, capsys):
    assert main(["embed", *arguments, "--model", "timm/test_vit", "--out", str(tmp_path / "emb")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "emb").exists()


def test_embed_takes_either_input_or_a_dataset(tmp_path, capsys):
    for arguments in (["--input", "photos", "--dataset", "roxford5k"], ["--root", "data"]):
        with pytest.raises(SystemExit) as exited:
            main(["embed", *arguments, "--model", "timm/test_vit", "--out", str(tmp_path / "emb")])
        assert exited.value.code == 2
    errors = capsys.readouterr().err
    assert "argument --dataset: not allowed with argument --input" in errors
    assert "one of the arguments --input --dataset is required" in errors
    assert not (tmp_path / "emb").exists()


def test_a_query_crop_is_not_taken_for_its_whole_image(tmp_path, capsys):
    # a folder as unicom embed --dataset writes it, but without the gallery row of a query
    # image: the crop's row names that image's path, and must not stand in for it
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    root = revisited_dataset(tmp_path / "data", "roxford5k")
    protocol = load_retrieval_benchmark("roxford5k", root)
    x = np.random.default_rng(0).standard_normal((len(NAMES) + 1, 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=x[:8], metadata=pa.table({"key": protocol.gallery.keys[1:],
                                                                   "image_path": protocol.gallery.paths[1:]}))
    write_part(tmp_path / "emb", 1, image=x[8:], metadata=pa.table({"key": protocol.query.keys,
                                                                   "image_path": protocol.query.paths}))
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "report")]) == 2
    assert "1 gallery images of the benchmark have no embedding (by key or path), e.g. ['jpg/all_souls_000000.jpg']" \
        in capsys.readouterr().err


def test_missing_images_are_listed_with_the_ground_truth_file(tmp_path):
    root = revisited_dataset(tmp_path, "roxford5k")
    for name in NAMES[:6]:
        (root / "roxford5k" / "jpg" / f"{name}.jpg").unlink()
    with pytest.raises(InputError, match=r"gnd_roxford5k\.pkl: 6 of the images it lists are missing, e\.g\.:\n"
                                         r"(.*all_souls_00000[0-4]\.jpg\n){4}.*all_souls_000004\.jpg\n"):
        load_retrieval_benchmark("roxford5k", root)


# --------------------------------------------------------------------------- the pickle


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(protocol, tmp_path):
    root = revisited_dataset(tmp_path, "roxford5k")
    marker = tmp_path / "ran"
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": GND, "x": RunsACommand(marker)},
                                 protocol=protocol))
    with pytest.raises(InputError, match=r"gnd_roxford5k\.pkl: refused as a ground truth file: it asks for "
                                         r"(posix|os|nt)\.system; it may hold only lists, dicts"):
        load_retrieval_benchmark("roxford5k", root)
    assert not marker.exists()


def test_a_python_2_pickle_with_byte_strings_is_read(tmp_path):
    # Python 2 wrote names as byte strings (opcode U) and numpy arrays with their raw bytes as a
    # byte string; read as Latin-1 they give the same names and arrays
    def string(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    def int64_array(values) -> bytes:
        raw = np.asarray(values, dtype="<i8").tobytes()
        return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\nK\x00\x85" + string(b"b") + b"tR"
                + b"(K\x01K" + bytes([len(values)]) + b"\x85cnumpy\ndtype\n(" + string(b"i8") + b"K\x00K\x01tR"
                + b"(K\x03" + string(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(raw) + b"tb")

    def names(items) -> bytes:
        return b"](" + b"".join(string(n.encode()) for n in items) + b"e"

    query = b"}(" + string(b"bbx") + b"](G" + np.float64(1.5).tobytes()[::-1] + b"K\x02K\x20K\x22e"
    query += string(b"easy") + int64_array([1, 2]) + string(b"hard") + int64_array([3]) + string(b"junk") + b"]u"
    other = b"}(" + string(b"bbx") + b"](K\x00K\x00K\x05K\x05e" + string(b"easy") + b"](K\x07e" + string(b"hard")
    other += b"]" + string(b"junk") + b"]u"
    data = (b"\x80\x02}(" + string(b"imlist") + names(NAMES) + string(b"qimlist") + names(QUERIES)
            + string(b"gnd") + b"](" + query + other + b"eu.")
    root = tmp_path / "rparis6k"
    (root / "jpg").mkdir(parents=True)
    (root / "gnd_rparis6k.pkl").write_bytes(data)
    protocol = load_retrieval_benchmark("rparis6k", root, check_images=False)
    assert protocol.gallery.keys[3] == "jpg/all_souls_000003.jpg"
    np.testing.assert_array_equal(protocol.query_boxes[0], [1.5, 2, 32, 34])
    positives, ignored = protocol.setups["medium"]
    assert [p.tolist() for p in positives] == [[1, 2, 3], [7]]
    assert [i.tolist() for i in ignored] == [[], []]


def test_a_pickle_that_encodes_with_another_codec_is_refused(tmp_path):
    # protocol 2 writes bytes as _codecs.encode(text, "latin1"); no other codec is looked up
    root = revisited_dataset(tmp_path, "roxford5k")
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(InputError, match=r"refused as a ground truth file: it asks for _codecs\.encode with encoding "
                                         r"'rot13'"):
        load_retrieval_benchmark("roxford5k", root)


@pytest.mark.parametrize("pickled, asked", [
    (b"\x80\x03cbuiltins\nbytearray\nJ\x00\xe1\xf5\x05\x85R.", r"bytearray\(100000000\), that many zero bytes"),
    (b"\x80\x03cbuiltins\nbytes\nJ\x00\xe1\xf5\x05\x85R.", r"bytes\(100000000\), that many zero bytes"),
    (b"\x80\x03cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85C\x01b\x87R.",
     r"an array of shape \(100000000,\) before its data"),
])
def test_a_pickle_of_a_few_bytes_that_asks_for_a_large_buffer_is_refused(pickled, asked, tmp_path):
    # 30 bytes that would allocate 100 MB (a larger number: all of the machine's memory)
    root = revisited_dataset(tmp_path, "roxford5k")
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickled)
    with pytest.raises(InputError, match=rf"gnd_roxford5k\.pkl: refused as a ground truth file: it asks for {asked}"):
        load_retrieval_benchmark("roxford5k", root)


def test_a_pickle_that_shares_or_nests_its_lists_is_read_as_pickled_or_refused(tmp_path):
    from unicom.data.benchmarks.revisited import load_ground_truth

    shared = [b"jpg"]
    for _ in range(20):  # 2**20 paths to its innermost list, 21 lists
        shared = [shared, shared]
    looped = [b"all_souls"]
    looped.append(looped)
    for name, value in (("shared", shared), ("looped", looped)):
        (tmp_path / f"{name}.pkl").write_bytes(pickle.dumps(value, protocol=4))
    # 100,000 lists each in the one before (pickle.dumps itself would give up; unpickling does not)
    (tmp_path / "deep.pkl").write_bytes(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")
    read = load_ground_truth(tmp_path / "shared.pkl")
    for _ in range(20):
        assert read[0] is read[1]
        read = read[0]
    assert read == ["jpg"]
    read = load_ground_truth(tmp_path / "looped.pkl")
    assert read[0] == "all_souls" and read[1] is read
    with pytest.raises(InputError, match=r"deep\.pkl: refused as a ground truth file: its lists are nested thousands "
                                         "deep"):
        load_ground_truth(tmp_path / "deep.pkl")


@pytest.mark.parametrize("protocol", [0, 3, 5])
def test_ground_truth_pickled_with_any_protocol_reads_the_same(protocol, tmp_path):
    reference = load_retrieval_benchmark("roxford5k", revisited_dataset(tmp_path / "p2", "roxford5k"))
    other = load_retrieval_benchmark("roxford5k", revisited_dataset(tmp_path / "other", "roxford5k", protocol=protocol))
    np.testing.assert_array_equal(other.query_boxes, reference.query_boxes)
    for name, (positives, ignored) in reference.setups.items():
        assert [p.tolist() for p in other.setups[name][0]] == [p.tolist() for p in positives]
        assert [i.tolist() for i in other.setups[name][1]] == [i.tolist() for i in ignored]


def test_names_pickled_as_bytes_are_read_as_text(tmp_path):
    root = revisited_dataset(tmp_path, "roxford5k")
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(pickle.dumps({b"imlist": [n.encode() for n in NAMES], b"qimlist": [q.encode() for q in QUERIES],
                                  b"gnd": [{k.encode(): v for k, v in g.items()} for g in GND]}, protocol=2))
    protocol = load_retrieval_benchmark("roxford5k", root)
    assert protocol.query.keys[1] == "jpg/all_souls_000004.jpg#crop"
    assert [p.tolist() for p in protocol.setups["easy"][0]] == [[1, 2], [7]]


def test_a_ground_truth_row_outside_the_database_is_named(tmp_path):
    root = revisited_dataset(tmp_path, "roxford5k")
    gnd = [dict(GND[0]), GND[1]]
    gnd[0]["junk"] = [6, 9]
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(
        pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": gnd}, protocol=2))
    with pytest.raises(InputError, match=r"gnd\[0\]\['junk'\] names database row 9, outside 0\.\.8"):
        load_retrieval_benchmark("roxford5k", root)


@pytest.mark.parametrize("rows", [[1.5], ["a"]])
def test_a_ground_truth_row_that_is_not_a_whole_number_is_named(rows, tmp_path):
    root = revisited_dataset(tmp_path, "roxford5k")
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(
        pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": [dict(GND[0], easy=rows), GND[1]]}, protocol=2))
    with pytest.raises(InputError, match=r"gnd\[0\]\['easy'\] is not a list of database rows \(whole numbers\)"):
        load_retrieval_benchmark("roxford5k", root)


def test_a_damaged_ground_truth_file_is_named_with_what_to_do(tmp_path):
    root = revisited_dataset(tmp_path, "roxford5k")
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(gnd.read_bytes()[:100])
    with pytest.raises(InputError, match=r"gnd_roxford5k\.pkl: cannot be read as a pickle \(.*\); the file is damaged "
                                         "or incomplete: download it again"):
        load_retrieval_benchmark("roxford5k", root)


def test_a_query_crop_of_a_16_bit_image_has_the_pixels_of_the_gallery_image(tmp_path):
    """The query crop and the gallery entry of one 16-bit PNG reach the model with the same
    pixels: 16-bit samples scaled to 8 bits, round(v * 255 / 65535), not clipped to white."""
    from PIL import Image

    from unicom.data.benchmarks.revisited import crop_query
    from unicom.data.transforms import decode_image

    samples = np.array([[0, 257, 1000], [32768, 65535, 12345]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(samples).save(path)
    expected = np.round(samples.astype(np.float64) * 255 / 65535).astype(np.uint8)
    crop = np.asarray(crop_query(path, np.array([0, 0, 3, 2])))
    assert crop.shape == (2, 3, 3) and np.array_equal(crop[..., 0], expected)
    assert np.array_equal(crop, np.asarray(decode_image(str(path))[0]))


def test_the_embeddings_evaluate_model_cached_are_scored_again_from_their_folder(tmp_path, capsys):
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    first = tmp_path / "first"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root), "--dims", "8",
                 "--num-workers", "0", "--device", "cpu", "--out", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["evaluate", "--embeddings", str(first / "embeddings"), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "8", "--out", str(again)]) == 0
    report, rescored = (json.loads((out / "metrics.json").read_text()) for out in (first, again))
    assert rescored["metrics"] == report["metrics"] and rescored["dimensions"] == report["dimensions"]
    assert rescored["metrics"]["n_queries_medium"] == 2
    # the cached crops are of the ground truth's boxes: other boxes are other queries
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(pickle.dumps({"imlist": NAMES, "qimlist": QUERIES, "gnd": [dict(GND[0], bbx=[0, 0, 9, 9]), GND[1]]}))
    capsys.readouterr()
    assert main(["evaluate", "--embeddings", str(first / "embeddings"), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "none", "--out", str(again)]) == 2
    assert re.search(r"embeddings/query: its query crops were made from other boxes than the ground truth's",
                     capsys.readouterr().err)


def _evaluated_roxford(tmp_path):
    """A Revisited Oxford layout and the OUT folder of an evaluate --model run on it."""
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    first = tmp_path / "first"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root), "--dims", "none",
                 "--num-workers", "0", "--device", "cpu", "--out", str(first)]) == 0
    return root, first


def test_a_damaged_record_of_a_cached_query_folder_is_named_rather_than_a_traceback(tmp_path, capsys):
    root, first = _evaluated_roxford(tmp_path)
    record = first / "embeddings" / "query" / "evaluate_embeddings.json"
    record.write_text(record.read_text()[:-5])  # cut short, as a full disk leaves it
    capsys.readouterr()
    assert main(["evaluate", "--embeddings", str(first / "embeddings"), "--dataset", "roxford5k", "--root", str(root),
                 "--dims", "none", "--out", str(tmp_path / "again")]) == 2
    assert f"{record}: unreadable (" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_a_cached_query_folder_that_records_its_boxes_as_a_list_is_checked_against_the_ground_truth(tmp_path, capsys):
    # evaluate --model runs before the digest recorded the boxes themselves ("query_boxes": [[x1, y1, x2, y2], ...])
    root, first = _evaluated_roxford(tmp_path)
    record = first / "embeddings" / "query" / "evaluate_embeddings.json"
    config = json.loads(record.read_text())
    del config["query_boxes_sha256"]
    again = tmp_path / "again"
    truth = [[float(v) for v in g["bbx"]] for g in GND]
    for boxes, code in ((truth, 0), ([[0.0, 0.0, 9.0, 9.0], truth[1]], 2)):
        record.write_text(json.dumps(dict(config, query_boxes=boxes)))
        capsys.readouterr()
        assert main(["evaluate", "--embeddings", str(first / "embeddings"), "--dataset", "roxford5k", "--root",
                     str(root), "--dims", "none", "--out", str(again)]) == code
    assert re.search(r"embeddings/query: its query crops were made from other boxes than the ground truth's",
                     capsys.readouterr().err)
