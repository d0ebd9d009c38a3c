"""Every result above a score (range search) and the items found written as a parquet table
(`unicom search --min-score S --out FILE.parquet`): against brute force over the stored
embeddings, faiss' own k-nearest search of the same index, and the metadata as written."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom.cli import main
from unicom.errors import InputError
from unicom.formats.embeddings import write_part
from unicom.search import queries
from unicom.search.index import RANGE_FIRST_K, Index

from support import clip_collection_with_texts
from test_index import clustered

ROWS = 1500  # per part: a query of the collection's cluster has more results above the median than RANGE_FIRST_K


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Two parts whose metadata differ: part 0 has a `score` column, part 1 a `url` column."""
    root = tmp_path_factory.mktemp("range")
    first, second = clustered(ROWS, 32, seed=0), clustered(ROWS, 32, seed=1)
    write_part(root / "emb", 0, image=first, metadata=pa.table({
        "key": [f"a{i}" for i in range(ROWS)], "score": np.arange(ROWS, dtype=np.float64)}))
    write_part(root / "emb", 1, image=second, metadata=pa.table({
        "key": [f"b{i}" for i in range(ROWS)], "url": [f"https://example.com/{i}.jpg" for i in range(ROWS)]}))
    return {"root": root, "vectors": np.concatenate([first, second]), "queries": clustered(4, 32, seed=5)}


def exact_range(vectors: np.ndarray, query: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    scores = (vectors @ query).astype(np.float32)
    ids = np.flatnonzero(scores >= np.float32(threshold))
    order = np.lexsort((ids, -scores[ids]))
    return scores[ids][order], ids[order]


@pytest.mark.parametrize("index_type, options", [("flat", {}), ("hnsw", {"hnsw_m": 8})])
def test_a_range_search_gives_every_row_above_the_score_as_brute_force_does(collection, index_type, options):
    index = Index.build(collection["root"] / "emb", collection["root"] / index_type, index_type=index_type,
                        heldout=200, **options)
    x, q = collection["vectors"], collection["queries"]
    threshold = float(np.quantile(q @ x.T, 0.6))
    found = index.search_range(q, threshold)
    assert len(found) == len(q)
    for query, (scores, ids) in zip(q, found):
        want_scores, want_ids = exact_range(x, query, threshold)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # more results than an HNSW range search asks for first: it asked again, for more
    assert max(len(ids) for _, ids in found) > RANGE_FIRST_K
    # a score no row reaches: nothing, and nothing below it
    assert all(len(ids) == 0 for _, ids in index.search_range(q, 1.0 + 1e-3))


def test_a_row_scoring_exactly_the_minimum_is_kept(tmp_path):
    # scores 1, 0, 0 and -1, exact in float32: faiss keeps scores strictly above its radius
    rows = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 0]], dtype=np.float32)
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": list("abcd")}))
    index = Index.build(tmp_path / "emb", tmp_path / "index", index_type="flat")
    (scores, ids), = index.search_range(rows[:1], 0.0)
    assert ids.tolist() == [0, 1, 2] and scores.tolist() == [1.0, 0.0, 0.0]  # equal scores: the lower id first
    assert index.search_range(rows[:1], -1.0)[0][1].tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError, match="min_score must be a finite number"):
        index.search_range(rows[:1], float("nan"))


@pytest.mark.parametrize("index_type, options", [("ivfpq", {"pq_m": 8}), ("ivfsq", {})])
def test_a_compressed_index_gives_the_rows_its_own_nearest_search_finds_above_the_score(collection, index_type, options):
    index = Index.build(collection["root"] / "emb", collection["root"] / index_type, index_type=index_type,
                        heldout=200, **options)
    x, q = collection["vectors"], collection["queries"]
    threshold = float(np.quantile(q @ x.T, 0.6))
    for nprobe in (None, 32):
        found = index.search_range(q, threshold, nprobe=nprobe)
        knn_scores, knn_ids = index.search(q, len(index), nprobe=nprobe)
        for (scores, ids), row_scores, row_ids in zip(found, knn_scores, knn_ids):
            above = (row_ids >= 0) & (row_scores >= np.float32(threshold))
            assert len(ids) and set(ids.tolist()) == set(row_ids[above].tolist())
            np.testing.assert_allclose(np.sort(scores), np.sort(row_scores[above]), atol=1e-5)
            assert np.all(np.diff(scores) <= 0)
    assert sum(len(ids) for _, ids in index.search_range(q, threshold, nprobe=64)) > \
        sum(len(ids) for _, ids in index.search_range(q, threshold, nprobe=1))  # more lists scanned, more found


def test_the_command_scans_the_lists_nprobe_says_and_refuses_it_for_other_types(collection, capsys):
    folder = collection["root"] / "ivfpq_cli"
    index = Index.build(collection["root"] / "emb", folder, index_type="ivfpq", pq_m=8, heldout=200)
    item = 7
    vector = queries.StoredVectors(index)([item])
    threshold = float(np.quantile(collection["vectors"] @ collection["vectors"][item], 0.7))
    counts = []
    for nprobe in (1, 64):
        code = main(["search", "--index", str(folder), "--like", str(item), "--min-score", repr(threshold),
                     "--nprobe", str(nprobe), "--json"])
        assert code == 0
        (entry,) = json.loads(capsys.readouterr().out)
        (_, want), = index.search_range(vector, threshold, nprobe=nprobe)
        assert [hit["id"] for hit in entry["results"]] == want.tolist()
        counts.append(len(want))
    assert counts[1] > counts[0]
    code = main(["search", "--index", str(folder), "--like", str(item), "--ef-search", "64"])
    assert code == 2 and "--ef-search tunes HNSW indexes;" in capsys.readouterr().err
    flat = collection["root"] / "flat_cli"
    Index.build(collection["root"] / "emb", flat, index_type="flat")
    code = main(["search", "--index", str(flat), "--like", str(item), "--nprobe", "8"])
    assert code == 2 and "--nprobe tunes IVF indexes;" in capsys.readouterr().err


def test_the_command_searches_the_caption_embeddings_of_a_clip_retrieval_folder(tmp_path, capsys):
    from test_index_clip_retrieval import write_collection as write_with_texts

    parts = write_with_texts(tmp_path / "emb", {0: 40, 1: 30})
    texts = np.concatenate([parts[0][1], parts[1][1]])
    Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval", heldout=10)
    item = 45
    threshold = float(np.sort(texts @ texts[item])[-6:-4].mean())  # five captions reach it, the item's own first
    code = main(["search", "--index", str(tmp_path / "index"), "--like", str(item), "--modality", "text",
                 "--min-score", repr(threshold), "--json"])
    assert code == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert [hit["id"] for hit in entry["results"]] == np.argsort(-(texts @ texts[item]), kind="stable")[:5].tolist()
    assert entry["results"][0]["caption"] == "caption p1-r5"  # item 45: part 1 (after 40 rows), row 5
    Index.build(tmp_path / "emb", tmp_path / "images_only", index_type="flat")  # unicom's layout: images only
    code = main(["search", "--index", str(tmp_path / "images_only"), "--like", "3", "--modality", "text"])
    assert code == 2 and "--modality text: " in capsys.readouterr().err


def test_the_best_k_above_a_score_are_the_brute_force_ones_and_no_more(collection):
    index = Index.build(collection["root"] / "emb", collection["root"] / "flat_k", index_type="flat")
    x, q = collection["vectors"], collection["queries"]
    threshold = float(np.quantile(q[0] @ x.T, 0.999))  # a few rows above it: fewer than k
    for k in (2, 50):
        (scores, ids), = queries.search(index, q[:1], k, min_score=threshold)
        want_scores, want_ids = exact_range(x, q[0], threshold)
        np.testing.assert_array_equal(ids, want_ids[:k])
        np.testing.assert_allclose(scores, want_scores[:k], atol=1e-5)
    # deduplicated: the filters and the score together, looking no further than the score allows
    (scores, ids), = queries.search(index, q[:1], 50, min_score=threshold, deduplicate=True)
    assert set(ids.tolist()) <= set(want_ids.tolist()) and len(ids) >= 1


def test_metadata_tables_hold_the_rows_metadata_gives_in_the_order_asked_across_parts_of_other_columns(collection):
    index = Index.build(collection["root"] / "emb", collection["root"] / "flat_meta", index_type="flat")
    ids = np.array([ROWS + 7, 3, ROWS, 0, 2 * ROWS - 1])
    table = index.metadata_table(ids)
    assert table.column_names == ["id", "key", "score", "url"]
    assert table.schema.field("score").type == pa.float64() and table.schema.field("url").type == pa.string()
    for row, want in zip(table.to_pylist(), index.metadata(ids)):
        assert row == {"score": None, "url": None, **want}
    assert index.metadata_table(np.zeros(0, np.int64)).num_rows == 0
    with pytest.raises(InputError, match=f"id {2 * ROWS} is not in this index"):
        index.metadata_table(np.array([1, 2 * ROWS]))


def test_a_clip_retrieval_folder_gives_its_source_ids_beside_the_index_ids(tmp_path):
    x = clustered(40, 16, seed=3)
    write_part(tmp_path / "emb", 0, image=x, metadata=pa.table({"id": list(range(100, 140)), "caption": ["c"] * 40}))
    index = Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval")
    table = index.metadata_table(np.array([5, 1]))
    assert table.to_pylist() == [{"id": 5, "source_id": 105, "caption": "c"}, {"id": 1, "source_id": 101, "caption": "c"}]
    assert table.to_pylist() == index.metadata(np.array([5, 1]))


# --------------------------------------------------------------------------- the command


TEXTS = ["a red car", "stripes"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return clip_collection_with_texts(tmp_path_factory.mktemp("clip_subset"), TEXTS)


def expected_subset(clip, threshold: float) -> dict[int, tuple[float, str]]:
    """id -> (best score, the first query giving it) by brute force."""
    scores = clip["texts"] @ clip["stored"].T  # (queries, items)
    out = {}
    for item in np.flatnonzero((scores >= np.float32(threshold)).any(axis=0)):
        column = np.where(scores[:, item] >= np.float32(threshold), scores[:, item], -np.inf)
        out[int(item)] = (float(column.max()), TEXTS[int(np.argmax(column))])  # the text as given
    return out


def test_out_writes_every_item_above_the_score_once_with_its_best_score_query_and_metadata(clip, tmp_path, capsys):
    threshold = float(np.quantile(clip["texts"] @ clip["stored"].T, 0.5))
    out = tmp_path / "subset.parquet"
    leftover = tmp_path / ".subset.parquet.abcd1234.tmp"  # what a write killed halfway leaves
    leftover.write_bytes(b"half")
    code = main(["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "--text", TEXTS[1],
                 "--min-score", repr(threshold), "--out", str(out)])
    assert code == 0
    table = pq.read_table(out)
    want = expected_subset(clip, threshold)
    assert 0 < table.num_rows == len(want) < len(clip["stored"])
    assert table.column_names[:3] == ["id", "score", "query"]
    rows = table.to_pylist()
    assert [row["id"] for row in rows] == sorted(want)  # id order
    for row in rows:
        score, query = want[row["id"]]
        assert row["score"] == pytest.approx(score, abs=1e-5) and row["query"] == query
    metadata = clip["index"].metadata(np.array([row["id"] for row in rows]))
    assert [{k: v for k, v in row.items() if k not in ("score", "query")} for row in rows] == metadata
    assert not leftover.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["subset.parquet"]
    printed = capsys.readouterr().out
    assert printed.startswith(f"{len(want)} items written to {out}")
    for text in TEXTS:  # each query's count, by brute force
        count = int(((clip["texts"][TEXTS.index(text)] @ clip["stored"].T) >= np.float32(threshold)).sum())
        assert f"{text!r}: {count} found" in printed


def test_min_score_with_k_prints_the_best_k_above_it(clip, capsys):
    scores = clip["texts"][0] @ clip["stored"].T
    threshold = float(np.sort(scores)[-4:-2].mean())  # three items reach it (halfway to the fourth)
    code = main(["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "--min-score", repr(threshold),
                 "-k", "10", "--json"])
    assert code == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert [hit["id"] for hit in entry["results"]] == np.argsort(-scores, kind="stable")[:3].tolist()
    code = main(["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "--min-score", repr(threshold), "--json"])
    (entry,) = json.loads(capsys.readouterr().out)
    assert [hit["id"] for hit in entry["results"]] == np.argsort(-scores, kind="stable")[:3].tolist()


def test_a_text_file_gives_one_query_a_line_as_texts_given_one_by_one(clip, tmp_path, capsys):
    threshold = float(np.quantile(clip["texts"] @ clip["stored"].T, 0.5))
    (tmp_path / "prompts.txt").write_text(f"\ufeff{TEXTS[0]}\n\n  {TEXTS[1]}  \n")  # a byte-order mark, a blank line
    written = []
    for name, options in (("file", ["--text-file", str(tmp_path / "prompts.txt")]),
                          ("texts", ["--text", TEXTS[0], "--text", TEXTS[1]])):
        out = tmp_path / f"{name}.parquet"
        assert main(["search", "--index", str(clip["index"].path), *options, "--min-score", repr(threshold),
                     "--out", str(out)]) == 0
        written.append(pq.read_table(out).to_pylist())
    assert written[0] == written[1] and len(written[0]) == len(expected_subset(clip, threshold))
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("\n  \n")
    for file, message in ((tmp_path / "empty.txt", "no text in the file"), (tmp_path / "missing.txt", "cannot be read")):
        code = main(["search", "--index", str(clip["index"].path), "--model", "timm/no_such_net", "--text-file", str(file)])
        assert code == 2 and f"--text-file {file}: {message}" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_named_before_or_after_the_search(collection, s3, tmp_path, capsys):
    folder = collection["root"] / "flat_out"
    Index.build(collection["root"] / "emb", folder, index_type="flat")
    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path / "a_file" / "x.parquet", "a file, not a folder"),
                         ("s3://no-such-bucket/x.parquet", "the bucket s3://no-such-bucket does not exist"),
                         ("https://example.com/x.parquet", "https URLs are read only")):
        code = main(["search", "--index", str(folder), "--like", "3", "--out", str(out)])
        assert code == 2 and message in capsys.readouterr().err
    # a folder the system will not make (Linux's /proc; elsewhere a folder this user may not write): found writing
    code = main(["search", "--index", str(folder), "--like", "3", "--out", "/proc/unicom-none/x.parquet"])
    assert code == 2 and "the results table x.parquet could not be written" in capsys.readouterr().err


def test_a_subset_is_uploaded_whole_to_s3(clip, s3, tmp_path, capsys):
    s3.bucket("subsets")
    threshold = float(np.quantile(clip["texts"][1] @ clip["stored"].T, 0.75))
    code = main(["search", "--index", str(clip["index"].path), "--text", TEXTS[1], "--min-score", repr(threshold),
                 "--out", "s3://subsets/stripes/subset.parquet"])
    assert code == 0
    assert s3.keys("subsets") == ["stripes/subset.parquet"]
    table = pq.read_table(io.BytesIO(s3.get("subsets", "stripes/subset.parquet")))
    assert sorted(table.column("id").to_pylist()) == sorted(expected_subset_one(clip, 1, threshold))


def expected_subset_one(clip, query: int, threshold: float) -> list[int]:
    return np.flatnonzero(clip["texts"][query] @ clip["stored"].T >= np.float32(threshold)).tolist()


def test_nothing_above_the_score_writes_a_table_of_no_rows(clip, tmp_path, capsys):
    out = tmp_path / "none.parquet"
    assert main(["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "--min-score", "1",
                 "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.column_names[:3] == ["id", "score", "query"]
    assert "no item found" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--min-score", "0.2", "--deduplicate"], "--deduplicate compares each result with every better one"),
    (["--min-score", "1.5"], "--min-score is a cosine similarity, from -1 to 1; got 1.5"),
    (["--out", "subset.csv"], "subset.csv: the results are written as parquet"),
    (["--out", "x.parquet", "--json"], "--json prints the results and --out writes them"),
])
def test_options_that_cannot_go_together_are_refused_before_the_model_loads(clip, extra, message, capsys):
    code = main(["search", "--index", str(clip["index"].path), "--model", "timm/no_such_net", "--text", TEXTS[0], *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_a_folder_given_as_the_output_is_refused(clip, tmp_path, capsys):
    (tmp_path / "out.parquet").mkdir()
    code = main(["search", "--index", str(clip["index"].path), "--model", "timm/no_such_net", "--text", TEXTS[0],
                 "--out", str(tmp_path / "out.parquet")])
    assert code == 2 and "a folder; give the file to write" in capsys.readouterr().err


def test_the_search_api_leaves_out_results_below_min_score_per_query(clip):
    from fastapi.testclient import TestClient

    from unicom.models.encoders import load_encoder
    from unicom.search.service import Search, Served, create_app, run_searches

    scores = clip["texts"] @ clip["stored"].T
    best = np.argsort(-scores, axis=1, kind="stable")
    thresholds = [float(np.sort(row)[-5:-3].mean()) for row in scores]  # four items reach each
    encoder = load_encoder(clip["spec"])
    with TestClient(create_app(clip["index"], encoder)) as client:
        response = client.post("/search", json={"text": TEXTS[0], "k": 10, "min_score": thresholds[0]})
        assert response.status_code == 200
        assert [hit["id"] for hit in response.json()["results"]] == best[0, :4].tolist()
        form = client.post("/search", files={"text": (None, TEXTS[1]), "k": (None, "10"),
                                             "min_score": (None, repr(thresholds[1]))})
        assert form.status_code == 200
        assert [hit["id"] for hit in form.json()["results"]] == best[1, :4].tolist()
        for bad in (2, "x"):
            refused = client.post("/search", json={"text": TEXTS[0], "min_score": bad})
            assert refused.status_code == 400 and "min_score" in refused.json()["detail"]
        refused = client.post("/search", files={"text": (None, TEXTS[0]), "min_score": (None, "nan")})
        assert refused.status_code == 400 and "min_score is a cosine similarity" in refused.json()["detail"]
    # one batch, three queries, each with its own minimum (or none)
    served = Served("photos", clip["index"], encoder)
    batch = [Search(served, 10, vector=clip["texts"][0], min_score=thresholds[0]),
             Search(served, 10, vector=clip["texts"][0], min_score=None),
             Search(served, 10, vector=clip["texts"][1], min_score=thresholds[1])]
    answers = run_searches(batch)
    assert [ids.tolist() for _, ids in answers] == [best[0, :4].tolist(), best[0, :10].tolist(), best[1, :4].tolist()]
