"""Results whose url repeats a better one's left out (clip-retrieval's front end's "hide
duplicate urls", which it applies in the browser): ``/search``'s ``hide_duplicate_urls``,
the page's box and ``unicom search --hide-duplicate-urls``, against brute force over the
collection with the rule applied by hand, with and without the safety filter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from unicom.cli import main
from unicom.formats.embeddings import write_part
from unicom.search.index import Index
from unicom.search.queries import repeated
from unicom.search.service import create_app

DIMS = 16
ITEMS = 300


def url_of(i: int) -> str | None:
    if i % 25 == 0:
        return None  # no url: repeats nothing
    if i % 25 == 1:
        return " "  # a blank one likewise
    return f"https://example.org/{i % 40}.jpg"  # forty pictures, each at several rows


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("urls")
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(ITEMS, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    punsafe = rng.uniform(size=ITEMS).round(3).tolist()
    write_part(root / "emb", 0, image=vectors, metadata=pa.table({
        "key": [f"{i:06d}" for i in range(ITEMS)], "url": [url_of(i) for i in range(ITEMS)], "punsafe": punsafe}))
    write_part(root / "plain_emb", 0, image=vectors, metadata=pa.table({"key": [f"{i:06d}" for i in range(ITEMS)],
                                                                       "punsafe": punsafe}))
    index = Index.build(root / "emb", root / "index", index_type="flat")
    plain = Index.build(root / "plain_emb", root / "plain", index_type="flat")
    client = TestClient(create_app({"photos": index, "plain": plain}, safety_column="punsafe"))
    return {"root": root, "index": index, "vectors": vectors, "punsafe": np.array(punsafe), "client": client}


def expected(collection, query: np.ndarray, k: int | None, safe: bool = False, min_score: float | None = None) -> list[int]:
    """Best first, the unsafe left out (with ``safe``), then every url after its first result."""
    scores = collection["vectors"] @ query
    order = np.argsort(-scores, kind="stable")
    if min_score is not None:
        order = order[scores[order] >= np.float32(min_score)]
    if safe:
        order = order[collection["punsafe"][order] <= 0.5]
    seen, kept = set(), []
    for i in order.tolist():
        url = url_of(i)
        if url is not None and url.strip() and url in seen:
            continue
        seen.add(url)
        kept.append(i)
    return kept if k is None else kept[:k]


def test_a_value_repeats_an_earlier_one_and_a_missing_one_repeats_nothing():
    values = ["a", None, "a", " ", "b", " ", "b", float("nan"), float("nan"), None, "a"]
    assert repeated(values).tolist() == [False, False, True, False, False, False, True, False, False, False, True]


def test_search_leaves_out_the_results_whose_url_repeats_a_better_one_s(collection):
    client = collection["client"]
    repeating = 0  # queries whose plain results repeat a url
    for item in (0, 7, 123, 200):
        query = collection["vectors"][item]
        answer = client.post("/search", json={"like": item, "k": 12, "hide_duplicate_urls": True})
        assert answer.status_code == 200, answer.text
        ids = [hit["id"] for hit in answer.json()["results"]]
        assert ids == expected(collection, query, 12)
        plain = [hit["id"] for hit in client.post("/search", json={"like": item, "k": 12}).json()["results"]]
        repeating += repeated([url_of(i) for i in plain]).any()
        assert (ids != plain) == repeated([url_of(i) for i in plain]).any()
    assert repeating >= 2
    # as a form field too, with the safety filter: a result left out as unsafe hides no later one of its url
    answer = client.post("/search", files={"like": (None, "42"), "k": (None, "15"), "hide_duplicate_urls": (None, "true"),
                                           "safe": (None, "true")})
    assert answer.status_code == 200, answer.text
    assert [hit["id"] for hit in answer.json()["results"]] == expected(collection, collection["vectors"][42], 15, safe=True)


def test_health_says_which_indexes_have_urls_and_one_without_refuses_the_option(collection):
    client = collection["client"]
    health = client.get("/healthz").json()
    assert [entry["urls"] for entry in health["indices"]] == [True, False]
    answer = client.post("/search", json={"like": 1, "index": "plain", "hide_duplicate_urls": True})
    assert answer.status_code == 400
    assert "hide_duplicate_urls: the metadata of plain has no url column" in answer.json()["detail"]


def test_the_command_leaves_them_out_of_its_results_and_of_a_subset(collection, tmp_path, capsys):
    index = str(collection["root"] / "index")
    assert main(["search", "--index", index, "--like", "9", "-k", "10", "--hide-duplicate-urls", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert [hit["id"] for hit in hits] == expected(collection, collection["vectors"][9], 10)
    # every result above a score: the subset table holds each url once, at its best result
    query = collection["vectors"][9]
    threshold = float(np.quantile(collection["vectors"] @ query, 0.7))
    assert main(["search", "--index", index, "--like", "9", "--min-score", repr(threshold), "--hide-duplicate-urls",
                 "--out", str(tmp_path / "subset.parquet")]) == 0
    table = pq.read_table(tmp_path / "subset.parquet")
    assert table.column("id").to_pylist() == sorted(expected(collection, query, None, min_score=threshold))
    assert main(["search", "--index", str(collection["root"] / "plain"), "--like", "9", "--hide-duplicate-urls"]) == 2
    assert "--hide-duplicate-urls: the metadata of" in capsys.readouterr().err


def test_health_answers_when_the_metadata_cannot_be_read(tmp_path, caplog):
    """Whether an index has urls is read from its metadata when first asked: metadata gone
    since the server started leaves /healthz answering (urls false, the reason logged)."""
    import shutil

    vectors = np.eye(4, DIMS, dtype=np.float32)
    write_part(tmp_path / "emb", 0, image=vectors, metadata=pa.table({"url": ["a", "b", "a", "c"]}))
    index = Index.build(tmp_path / "emb", tmp_path / "index", index_type="flat")
    client = TestClient(create_app(index))
    shutil.rmtree(tmp_path / "index" / "metadata")
    answer = client.get("/healthz")
    assert answer.status_code == 200 and answer.json()["urls"] is False
    assert "its metadata could not be read to see whether it has urls" in caplog.text
