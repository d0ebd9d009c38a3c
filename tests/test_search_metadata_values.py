"""Metadata values that parquet holds and JSON does not (NaN, bytes, timestamps, durations,
decimals) in the answers of `unicom serve` and `unicom search --json`."""

from __future__ import annotations

import datetime
import decimal
import json

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from unicom.cli import main
from unicom.formats.embeddings import write_part
from unicom.search.index import Index
from unicom.search.service import create_app

# what each row's values become in JSON
EXPECTED = [
    {"key": "k0", "pwatermark": 0.25, "raw": "a\ufffd", "when": "2021-03-04T05:06:07", "price": 1.5, "vec": [1.0, 2.0],
     "took": 1.5},
    {"key": "k1", "pwatermark": None, "raw": "b", "when": None, "price": None, "vec": [None, 3.0], "took": None},
    {"key": "k2", "pwatermark": None, "raw": "c", "when": "2021-03-04T05:06:07", "price": 2.25, "vec": [4.0, None],
     "took": 60.0},
]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every other JSON reader does."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    vectors = np.eye(3, 8, dtype=np.float32)
    when = datetime.datetime(2021, 3, 4, 5, 6, 7)
    metadata = pa.table({
        "key": ["k0", "k1", "k2"],
        "pwatermark": [0.25, float("nan"), float("inf")],  # LAION's parquet has NaN for missing numbers
        "raw": [b"a\xff", b"b", b"c"],
        "when": pa.array([when, None, when], pa.timestamp("us")),
        "price": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("2.25")], pa.decimal128(5, 2)),
        "vec": [[1.0, 2.0], [float("nan"), 3.0], [4.0, float("-inf")]],
        "took": pa.array([datetime.timedelta(seconds=1.5), None, datetime.timedelta(minutes=1)], pa.duration("ms")),
    })
    write_part(root / "emb", 0, image=vectors, metadata=metadata)
    return Index.build(root / "emb", root / "index")


def test_search_answers_metadata_values_as_json_has_them(index):
    with TestClient(create_app(index)) as client:
        for item in range(3):
            response = client.post("/search", json={"embedding": np.eye(8)[item].tolist(), "k": 1})
            assert response.status_code == 200, response.text
            hit = strict_json(response.text)["results"][0]
            assert hit["id"] == item
            assert {key: hit[key] for key in EXPECTED[item]} == EXPECTED[item]


def test_clip_retrievals_api_answers_the_same_values(index):
    with TestClient(create_app(index)) as client:
        knn = client.post("/knn-service", json={"embedding_input": np.eye(8)[1].tolist(), "num_images": 1})
        assert knn.status_code == 200
        assert {key: strict_json(knn.text)[0][key] for key in EXPECTED[1]} == EXPECTED[1]
        metadata = client.post("/metadata", json={"ids": [2]})
        assert strict_json(metadata.text)[0]["metadata"] == EXPECTED[2]


def test_search_json_prints_strict_json(index, capsys):
    assert main(["search", "--index", str(index.path), "--like", "0", "--like", "1", "--like", "2", "-k", "1", "--json"]) == 0
    answer = strict_json(capsys.readouterr().out)
    hits = [entry["results"][0] for entry in answer]
    assert [hit["id"] for hit in hits] == [0, 1, 2]
    assert [{key: hit[key] for key in expected} for hit, expected in zip(hits, EXPECTED)] == EXPECTED


def test_metadata_columns_named_like_a_results_own_keys_are_kept_as_source_columns(tmp_path):
    vectors = np.eye(2, 8, dtype=np.float32)
    metadata = pa.table({"key": ["a", "b"], "id": ["x-0", "x-1"], "rank": [7, 8], "score": [0.5, 0.25],
                         "thumbnail": ["t0.jpg", "t1.jpg"], "link": ["https://example.org/0", "https://example.org/1"]})
    write_part(tmp_path / "emb", 0, image=vectors, metadata=metadata)
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    [[hit]] = index.hits(*index.search(vectors[1], 1))
    assert (hit["rank"], hit["id"], hit["score"]) == (1, 1, pytest.approx(1.0))
    assert (hit["source_id"], hit["source_rank"], hit["source_score"]) == ("x-1", 8, 0.25)
    with TestClient(create_app(index)) as client:
        [served] = client.post("/search", json={"embedding": vectors[1].tolist(), "k": 1}).json()["results"]
    assert (served["rank"], served["id"], served["thumbnail"], served["link"]) == (1, 1, None, None)
    assert {key: served[key] for key in ("source_id", "source_rank", "source_score", "source_thumbnail", "source_link")} \
        == {"source_id": "x-1", "source_rank": 8, "source_score": 0.25, "source_thumbnail": "t1.jpg",
            "source_link": "https://example.org/1"}
