"""Retrieval examples (`unicom evaluate --examples`): each query's first results as the
evaluated search ranks them (against a plain stable sort, and torchreid's k-reciprocal
distances), marked by each protocol, drawn as a PNG and a self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from test_evaluate_cli import clustered, tiny_model_file
from test_kreciprocal import reference_distances, reference_leave_one_out
from test_revisited import GND, NAMES, QUERIES, revisited_dataset

from support import write_class_folder
from unicom.cli import main
from unicom.errors import InputError
from unicom.evaluate import KReciprocal
from unicom.evaluate.examples import (IGNORED, NOT_RELEVANT, RELEVANT, Examples, Item, Marks, image_size,
                                      rank_examples, ranked, render_png)
from unicom.evaluate.kreciprocal import KReciprocalScores
from unicom.formats.embeddings import read_embedding_folder


def stable_order(similarities: np.ndarray, k: int, leave_out: int | None = None) -> np.ndarray:
    """The first k columns of a row by decreasing similarity, equal ones by lower column."""
    row = similarities.astype(np.float64).copy()
    if leave_out is not None:
        row[leave_out] = -np.inf
    return np.argsort(-row, kind="stable")[:k]


def test_ranked_lists_are_the_stable_descending_order_of_the_similarities():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(40, 8)).astype(np.float32)
    gallery[[5, 17, 30]] = gallery[11]  # equal similarities: by lower row
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = gallery[[11, 3, 25]] + 0.01 * rng.normal(size=(3, 8)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    rows = np.array([0, 2])
    scores, ids = ranked(query, gallery, rows, 6, chunk_size=1)
    similarities = query.astype(np.float64) @ gallery.T.astype(np.float64)
    for r, row in enumerate(rows):
        assert ids[r].tolist() == stable_order(similarities[row], 6).tolist()
        np.testing.assert_allclose(scores[r], similarities[row, ids[r]], atol=1e-6)
    assert ids[0, :4].tolist() == [5, 11, 17, 30]
    # leave-one-out: a query's own row is not among its results
    scores, ids = ranked(gallery, None, np.arange(40), 5)
    self_similarities = gallery.astype(np.float64) @ gallery.T.astype(np.float64)
    for row in range(40):
        assert row not in ids[row]
        expected = stable_order(self_similarities[row], 5, leave_out=row)
        assert sorted(ids[row].tolist()) == sorted(expected.tolist())  # equal rows tie at the float32 level
        np.testing.assert_allclose(scores[row], self_similarities[row, ids[row]], atol=1e-6)


def test_re_ranked_examples_follow_the_reference_k_reciprocal_distances():
    x, _ = clustered(60, 16, 6, 0.8, seed=3)
    query, gallery = x[:12], x[12:]
    settings = KReciprocal(8, 4, 0.3)
    rescore = KReciprocalScores(query, gallery, settings)
    _, ids = ranked(query, gallery, np.arange(12), 10, rescore=rescore)
    distances = reference_distances(query, gallery, 8, 4, 0.3)
    for row in range(12):
        assert ids[row].tolist() == np.argsort(distances[row], kind="stable")[:10].tolist()
    rescore = KReciprocalScores(x[:30], None, settings)  # leave-one-out
    _, ids = ranked(x[:30], None, np.arange(30), 6, rescore=rescore)
    distances = reference_leave_one_out(x[:30], 8, 4, 0.3)
    for row in range(30):
        expected = np.argsort(np.where(np.isnan(distances[row]), np.inf, distances[row]), kind="stable")[:6]
        assert ids[row].tolist() == expected.tolist()


def test_marks_of_labels_relevance_lists_and_revisited_setups():
    ids = np.array([4, 0, 2, 1])
    assert Marks([1, 0], [0, 0, 1, 1, 1]).__call__(0, ids).tolist() == [RELEVANT, NOT_RELEVANT, RELEVANT, NOT_RELEVANT]
    assert Marks([2, 2, 1, 2, 0]).__call__(1, ids).tolist() == [NOT_RELEVANT, RELEVANT, NOT_RELEVANT, RELEVANT]
    assert Marks(relevant=[np.array([2, 1])]).__call__(0, ids).tolist() == [NOT_RELEVANT, NOT_RELEVANT, RELEVANT,
                                                                             RELEVANT]
    # Revisited: a junk image is ignored, one listed as both is a positive
    setup = ([np.array([0, 1])], [np.array([4, 1])])
    assert Marks(setup=setup)(0, ids).tolist() == [IGNORED, RELEVANT, NOT_RELEVANT, RELEVANT]


def test_the_draw_is_seeded_and_failures_are_the_queries_whose_first_counted_result_is_wrong():
    x, labels = clustered(80, 16, 8, 1.2, seed=1)
    items = [Item(f"img{i}") for i in range(80)]
    marks = Marks(labels)
    drawn = rank_examples(x, None, marks, Examples(7, k=5, seed=4), items, items)
    assert [e.row for e in drawn] == sorted(np.random.default_rng(4).choice(80, 7, replace=False).tolist())
    similarities = x.astype(np.float64) @ x.T.astype(np.float64)
    firsts = [stable_order(similarities[row], 1, leave_out=row)[0] for row in range(80)]
    failing = [row for row in range(80) if labels[firsts[row]] != labels[row]]
    assert 5 < len(failing) < 80
    everything = rank_examples(x, None, marks, Examples(500, k=5, failures=True), items, items)
    assert [e.row for e in everything] == failing  # fewer than asked: all there are
    some = rank_examples(x, None, marks, Examples(3, k=5, failures=True, seed=2), items, items)
    assert [e.row for e in some] == sorted(np.random.default_rng(2).choice(failing, 3, replace=False).tolist())
    for example in everything:
        assert example.results[0].mark == NOT_RELEVANT and example.results[0].key == f"img{firsts[example.row]}"
        assert [r.rank for r in example.results] == [1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="count is a whole number of at least 1"):
        Examples(0)


class Page(HTMLParser):
    """The rows of examples.html: per row its query key and its figures' attributes."""

    def __init__(self):
        super().__init__()
        self.rows, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "data-query" in attrs:
            self.rows.append({"query": attrs["data-query"], "figures": []})
        elif tag == "figure":
            self.rows[-1]["figures"].append(attrs)
        elif tag == "img":
            self.images.append(attrs["src"])


def test_evaluate_draws_each_querys_first_results_as_the_search_ranks_them(tmp_path, capsys):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    images = write_class_folder(tmp_path / "images", [0, 1, 2, 3], 5)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "folder", "--root", str(tmp_path / "images"),
                 "--out", str(out), "--dims", "none", "--workers", "0", "--examples", "4", "--examples-k", "5"]) == 0
    x, metadata = read_embedding_folder(out / "embeddings" / "query")
    keys = metadata.column("key").to_pylist()
    labels = [key.split("/")[0] for key in keys]
    similarities = x.astype(np.float64) @ x.T.astype(np.float64)
    rows = sorted(np.random.default_rng(0).choice(len(keys), 4, replace=False).tolist())

    page = Page()
    page.feed((out / "examples.html").read_text())
    assert [row["query"] for row in page.rows] == [keys[r] for r in rows]
    report = json.loads((out / "metrics.json").read_text())["examples"]
    assert (report["count"], report["k"], report["failures"], report["seed"]) == (4, 5, False, 0)
    for row, shown, listed in zip(rows, page.rows, report["queries"]):
        expected = stable_order(similarities[row], 5, leave_out=row)
        results = shown["figures"][1:]  # the query first
        assert shown["figures"][0]["class"] == "query"
        assert [f["data-key"] for f in results] == [keys[i] for i in expected]
        assert [f["data-mark"] for f in results] == ["relevant" if labels[i] == labels[row] else "not relevant"
                                                     for i in expected]
        np.testing.assert_allclose([float(f["data-score"]) for f in results], similarities[row, expected], atol=1e-5)
        assert [r["key"] for r in listed["results"]] == [keys[i] for i in expected]
    # every image inline, a JPEG of the thumbnail's size at most
    assert len(page.images) == 4 * 6
    for source in page.images:
        assert source.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and max(image.size) <= 96
    with Image.open(out / "examples.png") as png:
        assert png.size == (180 + 6 * (96 + 6) + 12 + 6, 6 + 4 * (96 + 14 + 6))
    assert "Examples (examples.html, examples.png): 4 queries drawn at random (seed 0), each with its first 5 " \
           "results of the search." in (out / "metrics.md").read_text()
    assert "examples.html" in capsys.readouterr().out
    # a run without --examples leaves no drawing of an earlier run beside its report
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "folder", "--root", str(tmp_path / "images"),
                 "--out", str(out), "--dims", "none", "--workers", "0"]) == 0
    assert not (out / "examples.html").exists() and not (out / "examples.png").exists()
    assert len(images) == 20


def test_revisited_examples_show_the_query_crop_and_mark_the_medium_setups_junk(tmp_path):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root), "--out",
                 str(out), "--dims", "none", "--workers", "0", "--examples", "2", "--examples-k", "9"]) == 0
    report = json.loads((out / "metrics.json").read_text())["examples"]
    assert report["setup"] == "medium"
    for q, listed in enumerate(report["queries"]):
        assert listed["query"] == f"jpg/{QUERIES[q]}.jpg#crop"
        positives = {int(i) for i in GND[q]["easy"]} | {int(i) for i in GND[q]["hard"]}
        junk = {int(i) for i in GND[q]["junk"]} - positives
        for result in listed["results"]:
            row = NAMES.index(re.search(r"jpg/(.+)\.jpg", result["key"]).group(1))
            expected = "relevant" if row in positives else "ignored" if row in junk else "not relevant"
            assert result["mark"] == expected
        assert {r["mark"] for r in listed["results"]} >= {"relevant", "ignored"}
    page = Page()
    page.feed((out / "examples.html").read_text())
    with Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))) as query:
        box = GND[0]["bbx"]  # the crop's shape, not the 40 x 40 image's
        width, height = box[2] - box[0], box[3] - box[1]
        assert abs(query.size[0] / query.size[1] - width / height) < 0.1


def test_examples_of_embeddings_whose_images_are_not_here_name_what_is_missing(tmp_path):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    write_class_folder(tmp_path / "images", [0, 1], 4)
    emb = tmp_path / "emb"
    assert main(["embed", "--input", str(tmp_path / "images"), "--out", str(emb), "--model", str(checkpoint),
                 "--workers", "0"]) == 0
    for image in (tmp_path / "images").rglob("*.jpg"):
        image.unlink()
    out = tmp_path / "eval"
    assert main(["evaluate", "--embeddings", str(emb), "--out", str(out), "--dims", "none", "--examples", "2",
                 "--examples-k", "3"]) == 0
    text = (out / "examples.html").read_text()
    assert text.count('class="problem"') == 2 * 4 and "file not found" in text
    assert len(json.loads((out / "metrics.json").read_text())["examples"]["queries"]) == 2


def test_examples_options_are_refused_where_they_draw_nothing(tmp_path, capsys):
    assert main(["evaluate", "--embeddings", str(tmp_path), "--out", str(tmp_path / "o"), "--examples-k", "3"]) == 2
    assert "give --examples too" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(tmp_path), "--train-embeddings", str(tmp_path), "--task",
                 "classification", "--out", str(tmp_path / "o"), "--examples", "3"]) == 2
    assert "leave --examples out" in capsys.readouterr().err


def test_the_png_has_the_documented_size_and_colours():
    rows = rank_examples(np.eye(4, dtype=np.float32), None, Marks([0, 0, 1, 1]), Examples(2, k=3),
                         [Item(f"k{i}") for i in range(4)], [Item(f"k{i}") for i in range(4)])
    side = 40
    with Image.open(io.BytesIO(render_png(rows, side))) as png:
        assert png.size == image_size(rows, side) == (180 + 4 * (side + 6) + 12 + 6, 6 + 2 * (side + 14 + 6))
        x = 180 + 6 + 12 + 1 * (side + 6)  # the first result's frame
        mark = rows[0].results[0].mark
        assert png.getpixel((x + 1, 6 + 1)) == {RELEVANT: (20, 150, 40), NOT_RELEVANT: (210, 30, 30)}[mark]


def test_distractors_in_the_examples_are_named_by_their_folders_keys(tmp_path):
    from test_distractors import distractor_images, embed_folder

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    distractor_images(tmp_path / "r1m_images")
    embed_folder(tmp_path / "r1m_images", checkpoint, tmp_path / "r1m")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "roxford5k", "--root", str(root), "--distractors",
                 str(tmp_path / "r1m"), "--out", str(out), "--dims", "none", "--workers", "0", "--examples", "2",
                 "--examples-k", "16"]) == 0
    listed = json.loads((out / "metrics.json").read_text())["examples"]["queries"]
    keys = [r["key"] for q in listed for r in q["results"]]
    distractors = [key for key in keys if key.startswith("0")]  # 000/distractor_0.jpg, ...
    assert len(keys) == 2 * 16 and len(distractors) == 2 * 7
    assert all(r["mark"] == "not relevant" for q in listed for r in q["results"] if r["key"] in distractors)
    page = Page()
    page.feed((out / "examples.html").read_text())
    assert len(page.images) == 2 * 17  # the distractors' images drawn from the paths their metadata records


def labelled_shards(root, classes: int = 3, per_class: int = 4) -> dict:
    """Two webdataset tars of ``classes`` x ``per_class`` class images, each sample's json
    holding its ``label``; returns key -> the image's bytes as written."""
    from support import class_image, encode_image, write_tar_shard

    images, samples = {}, [[], []]
    for label in range(classes):
        for i in range(per_class):
            key = f"{label:02d}{i:02d}"
            images[key] = encode_image(class_image(label, i, 48))
            samples[(label * per_class + i) % 2].append({"key": key, "jpg": images[key], "json": {"label": f"c{label}"}})
    for number, part in enumerate(samples):
        write_tar_shard(root / f"{number:05d}.tar", part)
    return images


def test_examples_of_a_folder_embedded_from_shards_show_the_shards_images(tmp_path, s3):
    from unicom.data.transforms import jpeg_data_uri, thumbnail_of

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    images = labelled_shards(tmp_path / "shards")
    emb = tmp_path / "emb"
    assert main(["embed", "--input", str(tmp_path / "shards"), "--out", str(emb), "--model", str(checkpoint),
                 "--workers", "0", "--metadata-fields", "label"]) == 0
    _, metadata = read_embedding_folder(emb)
    assert "shard" in metadata.column_names and "image_path" not in metadata.column_names
    s3.bucket("web")
    for shard in sorted((tmp_path / "shards").iterdir()):
        s3.put("web", f"shards/{shard.name}", shard.read_bytes())
    for shards, out in ((str(tmp_path / "shards"), tmp_path / "local"), ("s3://web/shards", tmp_path / "remote")):
        assert main(["evaluate", "--embeddings", str(emb), "--out", str(out), "--dims", "none", "--examples", "3",
                     "--examples-k", "4", "--shards", shards]) == 0
        page = Page()
        page.feed((out / "examples.html").read_text())
        assert 'class="problem"' not in (out / "examples.html").read_text()
        keys = [figure["data-key"] for row in page.rows for figure in row["figures"]]
        assert len(keys) == len(page.images) == 3 * 5
        # each thumbnail is that of the image the sample of its key holds, as written into the tar
        assert page.images == [jpeg_data_uri(thumbnail_of(images[key], 96)) for key in keys]
    # a shard gone from the folder is named in place of each of its images; the others are drawn
    (tmp_path / "shards" / "00001.tar").unlink()
    out = tmp_path / "gone"
    assert main(["evaluate", "--embeddings", str(emb), "--out", str(out), "--dims", "none", "--examples", "3",
                 "--examples-k", "4", "--shards", str(tmp_path / "shards")]) == 0
    text = (out / "examples.html").read_text()
    missing = sum(1 for key in re.findall(r'data-key="([^"]+)"', text) if int(key) % 2 == 1)
    assert missing > 0 and text.count('class="problem"') == missing
    assert f"shard not found: {tmp_path / 'shards' / '00001.tar'}" in text


def test_shards_are_refused_where_the_examples_would_not_read_them(tmp_path, capsys):
    checkpoint = tiny_model_file(tmp_path / "model.pt")
    write_class_folder(tmp_path / "images", [0, 1], 4)
    emb = tmp_path / "emb"
    assert main(["embed", "--input", str(tmp_path / "images"), "--out", str(emb), "--model", str(checkpoint),
                 "--workers", "0"]) == 0
    out = str(tmp_path / "o")
    assert main(["evaluate", "--embeddings", str(emb), "--out", out, "--dims", "none", "--shards", str(tmp_path)]) == 2
    assert "give --examples too, or leave --shards out" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(emb), "--out", out, "--dims", "none", "--examples", "2", "--shards",
                 str(tmp_path)]) == 2
    assert f"{emb} was not embedded from shards" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(checkpoint), "--dataset", "folder", "--root", str(tmp_path / "images"),
                 "--out", out, "--examples", "2", "--shards", str(tmp_path)]) == 2
    assert "--shards is for --embeddings folders embedded from shards" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
