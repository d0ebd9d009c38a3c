"""clip-retrieval's ``aesthetic_score``/``aesthetic_weight`` and ``use_violence_detector`` on
`unicom serve`, with LAION's files for them (``rating0.npy`` .. ``rating9.npy``, the violence
prompts), checked against clip-retrieval's back end's rules computed here by brute force:
the query moved to ``q + weight·e_rating``, re-normalised; a result left out when its
nearest prompt is prompt 1."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from unicom.cli import main
from unicom.errors import InputError
from unicom.formats.embeddings import write_part
from unicom.search.index import Index
from unicom.search.queries import load_aesthetic_embeddings, load_violence_prompts
from unicom.search.service import create_app

DIMS = 16
ITEMS = 300


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """An index of 300 random unit vectors, LAION-shaped aesthetic embeddings (one (1, 16)
    row per rating) and three violence prompts, written as the .npy files LAION publishes."""
    root = tmp_path_factory.mktemp("laion")
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(ITEMS, DIMS)))
    punsafe = [None if i % 10 == 0 else float(rng.uniform()) for i in range(ITEMS)]  # LAION-5B's safety probability
    tags = [str(rng.choice(["UNLIKELY", "UNSURE", "NSFW"])) for _ in range(ITEMS)]  # LAION-400M's NSFW tag
    write_part(root / "emb", 0, image=vectors, metadata=pa.table({"key": [f"{i:06d}" for i in range(ITEMS)],
                                                                  "punsafe": punsafe, "NSFW": tags}))
    index = Index.build(root / "emb", root / "index")
    (root / "aesthetic").mkdir()
    ratings = unit(rng.normal(size=(10, DIMS)))
    for rating in range(10):
        np.save(root / "aesthetic" / f"rating{rating}.npy", ratings[rating][None, :])
    prompts = unit(rng.normal(size=(3, DIMS)))
    np.save(root / "violence.npy", prompts)
    app = create_app(index, aesthetic_embeddings=load_aesthetic_embeddings(str(root / "aesthetic")),
                     violence_prompts=load_violence_prompts(str(root / "violence.npy")))
    with TestClient(app) as client:
        yield {"root": root, "index": index, "vectors": vectors, "ratings": ratings, "prompts": prompts,
               "client": client, "punsafe": punsafe, "tags": tags}


def knn(laion, **body) -> tuple[list[dict], str | None]:
    response = laion["client"].post("/knn-service", content=json.dumps(
        {"modality": "image", "indice_name": "index", **body}), headers={"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    return response.json(), response.headers.get("X-Unsupported-Options")


def ranked(vectors: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")
    return order, scores[order]


def test_an_aesthetic_rating_moves_the_query_as_clip_retrievals_back_end(laion):
    query = unit(np.random.default_rng(1).normal(size=DIMS))
    moved = query + laion["ratings"][7] * 0.4  # clip-retrieval: query + embedding * weight, then / norm
    moved = moved / np.linalg.norm(moved)
    order, scores = ranked(laion["vectors"], moved)
    results, unsupported = knn(laion, embedding_input=query.tolist(), num_images=10, aesthetic_score="7",
                               aesthetic_weight="0.4")
    assert [r["id"] for r in results] == order[:10].tolist()
    np.testing.assert_allclose([r["similarity"] for r in results], scores[:10], atol=1e-5)
    assert unsupported is None
    plain, _ = knn(laion, embedding_input=query.tolist(), num_images=10)
    assert [r["id"] for r in plain] != [r["id"] for r in results]  # the rating moved the answer


def test_the_weight_defaults_to_clip_retrievals_front_ends_and_numbers_are_taken_as_numbers(laion):
    query = unit(np.random.default_rng(2).normal(size=DIMS))
    moved = query + laion["ratings"][9] * 0.5
    order, _ = ranked(laion["vectors"], moved / np.linalg.norm(moved))
    results, _ = knn(laion, embedding_input=query.tolist(), num_images=5, aesthetic_score=9)
    assert [r["id"] for r in results] == order[:5].tolist()
    as_text, _ = knn(laion, embedding_input=query.tolist(), num_images=5, aesthetic_score="9.0", aesthetic_weight=0.5)
    assert as_text == results


def test_the_violence_detector_leaves_out_the_results_its_prompts_mark(laion):
    query = unit(np.random.default_rng(3).normal(size=DIMS))
    order, scores = ranked(laion["vectors"], query)
    violent = np.argmax(laion["vectors"] @ laion["prompts"].T, axis=1) == 1
    kept = [i for i in order.tolist() if not violent[i]]
    assert violent[order[:20]].any()  # the plain answer holds some: a test that could fail
    results, unsupported = knn(laion, embedding_input=query.tolist(), num_images=20, use_violence_detector=True)
    # the ones it leaves out are replaced by the next results (clip-retrieval returns fewer)
    assert [r["id"] for r in results] == kept[:20]
    assert unsupported is None


def test_a_rating_and_the_violence_detector_together(laion):
    query = unit(np.random.default_rng(4).normal(size=DIMS))
    moved = query + laion["ratings"][2] * 1.5
    order, _ = ranked(laion["vectors"], moved / np.linalg.norm(moved))
    violent = np.argmax(laion["vectors"] @ laion["prompts"].T, axis=1) == 1
    results, _ = knn(laion, embedding_input=query.tolist(), num_images=8, use_violence_detector=True,
                     aesthetic_score=2, aesthetic_weight=1.5)
    assert [r["id"] for r in results] == [i for i in order.tolist() if not violent[i]][:8]


def test_the_safety_model_leaves_out_what_laions_safety_probability_marks(laion):
    query = unit(np.random.default_rng(6).normal(size=DIMS))
    order, _ = ranked(laion["vectors"], query)
    marked = [value is not None and value > 0.5 for value in laion["punsafe"]]  # a row without a value is kept
    with TestClient(create_app(laion["index"], safety_column="punsafe")) as client:
        response = client.post("/knn-service", json={"embedding_input": query.tolist(), "modality": "image",
                                                     "num_images": 15, "use_safety_model": True})
        plain = client.post("/knn-service", json={"embedding_input": query.tolist(), "modality": "image",
                                                  "num_images": 15})
    assert [r["id"] for r in response.json()] == [i for i in order.tolist() if not marked[i]][:15]
    assert all(r["punsafe"] is None or r["punsafe"] <= 0.5 for r in response.json())
    assert "X-Unsupported-Options" not in response.headers
    assert any(marked[r["id"]] for r in plain.json())  # without the option they are there


def test_a_text_safety_column_leaves_out_the_values_named(laion):
    query = unit(np.random.default_rng(7).normal(size=DIMS))
    order, _ = ranked(laion["vectors"], query)
    with TestClient(create_app(laion["index"], safety_column="NSFW", unsafe_values=("NSFW", "UNSURE"))) as client:
        response = client.post("/knn-service", json={"embedding_input": query.tolist(), "modality": "image",
                                                     "num_images": 10, "use_safety_model": True,
                                                     "use_violence_detector": True})
    assert [r["id"] for r in response.json()] == [i for i in order.tolist() if laion["tags"][i] == "UNLIKELY"][:10]
    assert "use_violence_detector" in response.headers["X-Unsupported-Options"]  # no prompts given to this server


def test_safe_on_our_search_applies_every_filter_the_server_has_and_is_refused_where_it_has_none(laion):
    query = unit(np.random.default_rng(8).normal(size=DIMS))
    order, _ = ranked(laion["vectors"], query)
    violent = np.argmax(laion["vectors"] @ laion["prompts"].T, axis=1) == 1
    marked = np.array([value is not None and value > 0.5 for value in laion["punsafe"]])
    app = create_app(laion["index"], violence_prompts=laion["prompts"], safety_column="punsafe")
    with TestClient(app) as client:
        assert client.get("/healthz").json()["safe_search"] is True
        safe = client.post("/search", json={"embedding": query.tolist(), "k": 12, "safe": True})
        plain = client.post("/search", json={"embedding": query.tolist(), "k": 12})
        form = client.post("/search", files={"like": (None, str(int(order[0]))), "k": (None, "12"), "safe": (None, "true")})
    assert safe.status_code == 200 and plain.status_code == 200 and form.status_code == 200
    assert [hit["id"] for hit in safe.json()["results"]] == [i for i in order.tolist() if not (violent[i] or marked[i])][:12]
    assert [hit["id"] for hit in plain.json()["results"]] == order[:12].tolist()
    assert (violent | marked)[order[:12]].any()  # the plain answer holds some: a test that could fail
    liked, _ = ranked(laion["vectors"], laion["vectors"][order[0]])
    assert [hit["id"] for hit in form.json()["results"]] == [i for i in liked.tolist() if not (violent[i] or marked[i])][:12]
    with TestClient(create_app(laion["index"])) as client:  # no filter: refused, not answered unfiltered
        assert client.get("/healthz").json()["safe_search"] is False
        refused = client.post("/search", json={"embedding": query.tolist(), "safe": True})
    assert refused.status_code == 400 and refused.json()["detail"].startswith("safe: this server has no safety filter")


def test_our_search_moves_the_query_towards_a_rating_and_refuses_it_where_the_server_has_none(laion):
    query = unit(np.random.default_rng(9).normal(size=DIMS))
    moved = query + laion["ratings"][4] * 0.8
    order, scores = ranked(laion["vectors"], moved / np.linalg.norm(moved))
    client = laion["client"]
    assert client.get("/healthz").json()["aesthetic"] is True
    answer = client.post("/search", json={"embedding": query.tolist(), "k": 10, "aesthetic_score": 4,
                                          "aesthetic_weight": 0.8})
    assert answer.status_code == 200, answer.text
    assert [hit["id"] for hit in answer.json()["results"]] == order[:10].tolist()
    np.testing.assert_allclose([hit["score"] for hit in answer.json()["results"]], scores[:10], atol=1e-5)
    plain = client.post("/search", json={"embedding": query.tolist(), "k": 10}).json()["results"]
    assert [hit["id"] for hit in plain] != order[:10].tolist()  # the rating moved the answer
    # from a form, more like an item, with the default weight (clip-retrieval's front end's 0.5)
    item = int(order[20])
    liked = laion["vectors"][item] + laion["ratings"][2] * 0.5
    form = client.post("/search", files={"like": (None, str(item)), "k": (None, "8"), "aesthetic_score": (None, "2")})
    assert form.status_code == 200, form.text
    assert [hit["id"] for hit in form.json()["results"]] == ranked(laion["vectors"], liked / np.linalg.norm(liked))[0][:8].tolist()
    for body, message in (({"aesthetic_score": 10}, "aesthetic_score must be a whole number from 0 to 9, got 10"),
                          ({"aesthetic_weight": 0.3}, "aesthetic_weight says how far the query moves")):
        refused = client.post("/search", json={"embedding": query.tolist(), **body})
        assert refused.status_code == 400 and message in refused.json()["detail"]
    with TestClient(create_app(laion["index"])) as bare:  # no embeddings: refused, not answered unmoved
        assert bare.get("/healthz").json()["aesthetic"] is False
        refused = bare.post("/search", json={"embedding": query.tolist(), "aesthetic_score": 4})
    assert refused.status_code == 400
    assert refused.json()["detail"].startswith("aesthetic_score: this server has no aesthetic embeddings")


def test_a_safety_column_the_metadata_lacks_is_refused_naming_the_columns(laion):
    with pytest.raises(InputError, match=r"--safety-column pwatermark: the metadata of index has no such column "
                                         r"\(its columns: key, punsafe, NSFW\)"):
        create_app(laion["index"], safety_column="pwatermark")


def test_the_options_without_their_files_are_named_unsupported(laion):
    with TestClient(create_app(laion["index"])) as client:
        response = client.post("/knn-service", json={"embedding_input": laion["vectors"][0].tolist(), "modality": "image",
                                                     "num_images": 3, "use_violence_detector": True, "aesthetic_score": 5})
        header = response.headers["X-Unsupported-Options"]
        assert "use_violence_detector (no violence detector: results are not filtered; --violence-prompts gives one)" in header
        assert "aesthetic_score (no aesthetic embeddings: the query is not re-weighted; --aesthetic-embeddings gives them)" in header
        assert [r["id"] for r in response.json()] == ranked(laion["vectors"], laion["vectors"][0])[0][:3].tolist()


@pytest.mark.parametrize("body, message", [
    ({"aesthetic_score": 10}, "aesthetic_score must be a whole number from 0 to 9, got 10"),
    ({"aesthetic_score": "nine"}, "aesthetic_score must be a whole number from 0 to 9, got 'nine'"),
    ({"aesthetic_score": 2.5}, "aesthetic_score.int: Input should be a valid integer, got a number with a fractional part"),
    ({"aesthetic_score": 3, "aesthetic_weight": "much"}, "aesthetic_weight must be a number, got 'much'"),
])
def test_bad_aesthetic_values_are_400_naming_them(laion, body, message):
    response = laion["client"].post("/knn-service", json={"embedding_input": laion["vectors"][0].tolist(),
                                                          "modality": "image", **body})
    assert response.status_code == 400 and message in response.json()["detail"]


def test_files_that_do_not_fit_are_refused_naming_them(laion, tmp_path):
    (tmp_path / "a").mkdir()
    for rating in range(9):
        np.save(tmp_path / "a" / f"rating{rating}.npy", np.ones((1, DIMS), np.float32))
    with pytest.raises(InputError, match=r"rating9.npy: cannot read the embedding of aesthetic rating 9"):
        load_aesthetic_embeddings(str(tmp_path / "a"))
    np.save(tmp_path / "a" / "rating9.npy", np.ones((2, DIMS), np.float32))
    with pytest.raises(InputError, match=r"rating9.npy: expected one embedding, a \(D,\) or \(1, D\) array; found \(2, 16\)"):
        load_aesthetic_embeddings(str(tmp_path / "a"))
    np.save(tmp_path / "one.npy", np.ones((1, DIMS), np.float32))
    with pytest.raises(InputError, match=r"one.npy: expected prompt embeddings, a \(P, D\) array with P >= 2"):
        load_violence_prompts(str(tmp_path / "one.npy"))
    np.save(tmp_path / "narrow.npy", np.ones((3, DIMS // 2), np.float32))
    with pytest.raises(InputError, match=r"the violence prompts have 8 dimensions, fewer than the embeddings of index \(16\)"):
        create_app(laion["index"], violence_prompts=load_violence_prompts(str(tmp_path / "narrow.npy")))
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(InputError, match="text.npy: not a .npy array"):
        load_violence_prompts(str(tmp_path / "text.npy"))


def test_the_files_are_read_from_a_url(laion):
    import http.server
    import threading
    from functools import partial

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(laion["root"]))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{files.server_address[1]}"
            np.testing.assert_array_equal(load_aesthetic_embeddings(f"{url}/aesthetic"), laion["ratings"])
            np.testing.assert_array_equal(load_violence_prompts(f"{url}/violence.npy"), laion["prompts"])
        finally:
            files.shutdown()


def test_the_command_names_a_missing_file_before_loading_anything(laion, capsys):
    code = main(["serve", "--index", str(laion["index"].path), "--violence-prompts", str(laion["root"] / "absent.npy")])
    assert code == 2
    assert "absent.npy: cannot read the violence prompts" in capsys.readouterr().err


def test_the_command_refuses_unsafe_values_without_a_safety_column(laion, capsys):
    code = main(["serve", "--index", str(laion["index"].path), "--unsafe-values", "NSFW,UNSURE"])
    assert code == 2
    assert "--unsafe-values: the values of a text --safety-column; name the column with --safety-column" in capsys.readouterr().err


def test_the_search_command_moves_its_queries_towards_a_rating_and_filters_as_the_server_does(laion, capsys):
    index, vectors = str(laion["index"].path), laion["vectors"]
    item = 17
    moved = vectors[item] + laion["ratings"][7] * 0.4
    code = main(["search", "--index", index, "--like", str(item), "-k", "10", "--json",
                 "--aesthetic-embeddings", str(laion["root"] / "aesthetic"), "--aesthetic-score", "7",
                 "--aesthetic-weight", "0.4"])
    assert code == 0
    (entry,) = json.loads(capsys.readouterr().out)
    order, scores = ranked(vectors, moved / np.linalg.norm(moved))
    assert [hit["id"] for hit in entry["results"]] == order[:10].tolist()
    np.testing.assert_allclose([hit["score"] for hit in entry["results"]], scores[:10], atol=1e-5)
    # the violence prompts and the safety column: the k best of those neither marks
    violent = np.argmax(vectors @ laion["prompts"].T, axis=1) == 1
    marked = violent | np.array([value is not None and value > 0.5 for value in laion["punsafe"]])
    code = main(["search", "--index", index, "--like", str(item), "-k", "12", "--json",
                 "--violence-prompts", str(laion["root"] / "violence.npy"), "--safety-column", "punsafe"])
    assert code == 0
    (entry,) = json.loads(capsys.readouterr().out)
    order, _ = ranked(vectors, vectors[item])
    assert [hit["id"] for hit in entry["results"]] == [i for i in order.tolist() if not marked[i]][:12]
    assert marked[order[:12]].any()


def test_a_subset_above_a_score_leaves_out_what_the_safety_column_marks(laion, tmp_path, capsys):
    import pyarrow.parquet as pq

    vectors, item = laion["vectors"], 23
    scores = vectors @ vectors[item]
    threshold = float(np.sort(scores)[-41:-39].mean())  # forty items reach it
    tags = np.array(laion["tags"])
    want = [i for i in np.flatnonzero(scores >= np.float32(threshold)).tolist() if tags[i] not in ("NSFW", "UNSURE")]
    assert 0 < len(want) < 40
    code = main(["search", "--index", str(laion["index"].path), "--like", str(item), "--min-score", repr(threshold),
                 "--safety-column", "NSFW", "--unsafe-values", "NSFW,UNSURE", "--out", str(tmp_path / "safe.parquet")])
    assert code == 0
    assert pq.read_table(tmp_path / "safe.parquet").column("id").to_pylist() == want
    assert capsys.readouterr().out.startswith(f"{len(want)} items written to")


@pytest.mark.parametrize("extra, message", [
    (["--aesthetic-score", "3"], "--aesthetic-score moves the queries towards LAION's embedding of a rating: give "
                                 "--aesthetic-embeddings"),
    (["--aesthetic-embeddings", "A", "--aesthetic-weight", "0.3"], "--aesthetic-weight says how far"),
    (["--aesthetic-embeddings", "A"], "--aesthetic-embeddings: give --aesthetic-score R"),
    (["--aesthetic-embeddings", "A", "--aesthetic-score", "12"], "--aesthetic-score must be a whole number from 0 to 9, got 12"),
    (["--unsafe-values", "NSFW"], "--unsafe-values: the values of a text --safety-column"),
    (["--safety-column", "pwatermark"], "--safety-column pwatermark: the metadata of "),
])
def test_search_options_that_cannot_work_are_refused_before_the_model_loads(laion, extra, message, capsys):
    extra = [str(laion["root"] / "aesthetic") if value == "A" else value for value in extra]
    code = main(["search", "--index", str(laion["index"].path), "--model", "timm/no_such_net", "--text", "x", *extra])
    assert code == 2 and message in capsys.readouterr().err
