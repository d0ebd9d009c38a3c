"""unicom.Index: exact and compressed indexes over embedding folders, ids, metadata, adding parts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

import unicom
from unicom.errors import FolderError, InputError
from unicom.formats.embeddings import write_part
from unicom.search.collection import first_dims
from unicom.search.index import CONFIG_FILE, HELDOUT_FILE, Index
from unicom.search.planner import (
    KNEE_GAIN,
    Candidate,
    flat_memory,
    ivfpq_candidate,
    ivfpq_memory,
    ivfsq_memory,
    parse_size,
    plan,
    recall_at_k,
    search_steps,
    tune,
)


def clustered(n: int, d: int, seed: int, clusters: int = 40, rank: int = 8) -> np.ndarray:
    """Unit vectors from a Gaussian mixture in a rank-``rank`` subspace plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).standard_normal((d, rank)))[0].T
    centres = np.random.default_rng(98).standard_normal((clusters, rank))
    latent = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, rank))
    x = latent @ basis + 0.05 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_collection(root, parts: dict[int, np.ndarray], metadata: bool = True):
    for number, array in parts.items():
        table = None
        if metadata:
            rows = len(array)
            table = pa.table({
                "key": [f"p{number}-r{r}" for r in range(rows)],
                "caption": [f"caption {number}/{r}" for r in range(rows)],
            })
        write_part(root, number, image=array, metadata=table)
    return root


def brute_force(collection: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ collection.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# --------------------------------------------------------------------------- pieces


def test_first_dims_keeps_the_leading_dimensions_and_renormalises():
    x = np.array([[3.0, 4.0, 12.0], [0.0, 2.0, 1.0]])
    np.testing.assert_allclose(first_dims(x, 2), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


def test_first_dims_names_the_row_that_cannot_be_normalised():
    x = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    with pytest.raises(InputError, match="part_7.npy: row 11 is zero in its first 2 dimensions"):
        first_dims(x, 2, "part_7.npy", 10)
    with pytest.raises(InputError, match="row 4 holds NaN"):
        first_dims(np.array([[np.nan, 1.0]]), 2, "q", 4)


def test_first_dims_normalises_finite_values_whose_squares_leave_float32():
    x = np.array([[3e20, 4e20, 1.0], [3e-25, 4e-25, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(first_dims(x, 2), [[0.6, 0.8], [0.6, 0.8]], rtol=1e-6)
    with pytest.raises(InputError, match="row 0 holds NaN or infinite values"):
        first_dims(np.array([[np.inf, 1.0]], dtype=np.float32), 2)


def test_parse_size_reads_decimal_and_binary_units():
    assert parse_size("512MB") == 512_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("1000") == 1000
    with pytest.raises(InputError, match="not understood"):
        parse_size("lots")


def test_recall_at_k_counts_the_shared_neighbours():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [0, 0, 0, 5]])
    assert recall_at_k(found, truth) == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_memory_estimates_follow_the_code_sizes():
    assert flat_memory(1000, 64) == 256_000
    # 1000 codes of 16 bytes + 8-byte ids, centroids (64 lists + 256 PQ centroids) x 32 dims, 64x32 rotation
    assert ivfpq_memory(1000, 64, 64, 16, 8, 32) == 24_000 + 4 * 32 * 320 + 4 * 64 * 32 + 48 * 64


def test_ivfpq_takes_the_largest_code_that_fits_the_budget():
    n, d = 100_000, 256
    fixed = ivfpq_memory(0, d, 1024, 0, 8, d)
    budget = fixed + n * (8 + 100)  # room for 100-byte codes: the largest multiple of 4 is 100
    candidate = ivfpq_candidate(n, d, budget, nlist=1024)
    assert candidate.params == {"nlist": 1024, "m": 100, "nbits": 8, "rotated_dims": 200}
    assert candidate.memory <= budget
    assert ivfpq_candidate(n, d, n * 8, nlist=1024) is None  # the ids alone fill that budget


def test_plan_is_exact_for_small_collections_and_ordered_for_large_ones():
    assert [c.type for c in plan(50_000, 256)] == ["flat"]
    assert [c.type for c in plan(1_000_000, 256)] == ["hnsw", "ivfsq", "flat"]
    assert [c.type for c in plan(1_000_000, 256, memory_budget=parse_size("200MB"))] == ["ivfsq"]
    with pytest.raises(InputError, match="no index type fits"):
        plan(1_000_000, 256, memory_budget=1_000_000)


def test_an_explicit_type_larger_than_the_budget_is_refused():
    n, d = 1_000_000, 256
    budget = flat_memory(n, d) - 1
    for index_type, structure in (("flat", "Flat"), ("hnsw", "HNSW32")):
        with pytest.raises(InputError, match=f"{structure} takes about .* for 1000000 vectors, more than the budget of"):
            plan(n, d, index_type=index_type, memory_budget=budget)
    with pytest.raises(InputError, match=r"PR256,IVF4096,PQ128x8 takes about 134.4 MiB for 1000000 vectors, more than the budget of 95.4 MiB"):
        plan(n, d, index_type="ivfpq", pq_m=128, memory_budget=parse_size("100MB"))
    assert [c.type for c in plan(n, d, index_type="flat", memory_budget=flat_memory(n, d))] == ["flat"]
    assert plan(n, d, index_type="ivfpq", memory_budget=parse_size("100MB"))[0].memory <= parse_size("100MB")


def test_a_budget_alone_is_spent_on_the_largest_code_that_fits():
    n, d = 500_000, 256
    for fraction in (8, 4):
        budget = flat_memory(n, d) // fraction
        [chosen] = plan(n, d, memory_budget=budget)
        p = chosen.params
        # 8-bit codes of the leading axes: as many as fit in steps of 8 (faiss' SIMD width), 8 more would not
        assert chosen.type == "ivfsq" and p["bits"] == 8 and chosen.memory <= budget and p["rotated_dims"] % 8 == 0
        assert ivfsq_memory(n, d, p["nlist"], p["rotated_dims"] + 8, 8) > budget
    # a budget for 2 bytes per dimension takes 16-bit floats of every axis
    [chosen] = plan(n, d, memory_budget=flat_memory(n, d) * 3 // 5)
    assert chosen.structure() == "PR256,IVF2048,SQfp16"
    # below d/4 bytes a vector, product quantization codes more axes more coarsely
    [chosen] = plan(n, d, memory_budget=n * (8 + 48))
    assert chosen.type == "ivfpq" and chosen.code_bytes < d / 4 and chosen.memory <= n * (8 + 48)


def test_a_recall_target_tries_codes_from_the_smallest_up_to_the_budget_then_exact():
    n, d = 500_000, 256
    candidates = plan(n, d, recall_target=0.95)
    memories = [c.memory for c in candidates]
    assert memories == sorted(memories) and candidates[-1].type == "flat"
    assert [c.code_bytes for c in candidates[:-1]] == [16, 32, 64, 128, 256, 512]
    assert [c.type for c in candidates[:-1]] == ["ivfpq", "ivfpq", "ivfsq", "ivfsq", "ivfsq", "ivfsq"]
    budget = flat_memory(n, d) // 4
    within = plan(n, d, recall_target=0.95, memory_budget=budget)
    assert all(c.memory <= budget for c in within) and within[-1].structure() == plan(n, d, memory_budget=budget)[0].structure()


def test_search_steps_of_an_automatic_index_scan_at_most_an_eighth_of_the_lists():
    candidate = Candidate("ivfsq", {"nlist": 2048, "rotated_dims": 64, "bits": 8}, 0)
    assert search_steps(candidate, 10, capped=True)[-1] == {"nprobe": 256}
    assert search_steps(candidate, 10)[-1] == {"nprobe": 2048}


def test_without_a_target_the_search_parameter_stops_where_doubling_it_adds_little():
    truth = np.arange(100 * 10).reshape(100, 10)
    # nprobe 1, 2, 4, 8, 16 find 50, 80, 92, 92.5 and 99 % of the true neighbours
    shares = {1: 5.0, 2: 8.0, 4: 9.2, 8: 9.25, 16: 9.9}

    def search(parameter: dict) -> np.ndarray:
        found = truth.copy()
        whole, extra = divmod(shares[parameter["nprobe"]] * 100, 100)  # hits per row, spread over the rows
        for row in range(100):
            hits = int(whole) + (1 if row < extra else 0)
            found[row, hits:] = -1
        return found

    candidate = Candidate("ivfpq", {"nlist": 16, "m": 2, "nbits": 4, "rotated_dims": 4}, 0)
    parameter, recall, steps = tune(search, candidate, truth, 10, None)
    # 4 -> 8 adds 0.005 < KNEE_GAIN: nprobe 4 is kept (8 was measured, 16 never)
    assert KNEE_GAIN == 0.01 and parameter == {"nprobe": 4} and recall == pytest.approx(0.92)
    assert [step["nprobe"] for step in steps] == [1, 2, 4, 8]


def test_tune_takes_the_smallest_search_parameter_that_reaches_the_target():
    truth = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    found = {  # what an index finds for each nprobe: 4, 6 and 8 of the 8 true neighbours
        1: np.array([[0, 9], [2, 9], [4, 9], [6, 9]]),
        2: np.array([[0, 1], [2, 3], [4, 9], [6, 9]]),
        4: truth,
    }
    candidate = Candidate("ivfpq", {"nlist": 4, "m": 2, "nbits": 4, "rotated_dims": 4}, 0)
    asked = []

    def search(parameter: dict) -> np.ndarray:
        asked.append(parameter["nprobe"])
        return found[parameter["nprobe"]]

    parameter, recall, steps = tune(search, candidate, truth, 2, 0.75)
    assert parameter == {"nprobe": 2} and recall == 0.75 and asked == [1, 2]
    assert [(step["nprobe"], step["recall"]) for step in steps] == [(1, 0.5), (2, 0.75)]
    found[4] = found[2]  # the target is out of reach: the best step is kept
    asked.clear()
    assert tune(search, candidate, truth, 2, 0.9)[:2] == ({"nprobe": 2}, 0.75) and asked == [1, 2, 4]


# --------------------------------------------------------------------------- exact index


def test_exact_index_returns_the_brute_force_neighbours_of_the_truncated_vectors(tmp_path):
    parts = {0: clustered(300, 48, seed=1), 1: clustered(250, 48, seed=2)}
    write_collection(tmp_path / "emb", parts)
    index = Index.build(tmp_path / "emb", tmp_path / "index", dims=32)
    assert index.type == "flat" and len(index) == 550 and index.dims == 32
    collection = first_dims(np.concatenate(list(parts.values())), 32)
    queries = clustered(20, 48, seed=3)
    scores, ids = index.search(queries, k=7)
    want_scores, want_ids = brute_force(collection, first_dims(queries, 32), 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (20, 7)


def test_ids_are_row_numbers_in_part_order_and_metadata_follows_them(tmp_path):
    rng = np.random.default_rng(0)
    parts = {number: rng.standard_normal((rows, 16)).astype(np.float32) for number, rows in ((10, 3), (2, 4), (0, 5))}
    write_collection(tmp_path / "emb", parts)
    index = unicom.Index.build(tmp_path / "emb", tmp_path / "index")
    assert [(p.number, p.rows, p.first_id) for p in index.parts] == [(0, 5, 0), (2, 4, 5), (10, 3, 9)]
    # part 2's row 1 is id 6: searching with it finds it first
    scores, ids = index.search(parts[2][1], k=1)
    assert ids.tolist() == [[6]] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert index.metadata(6) == {"id": 6, "key": "p2-r1", "caption": "caption 2/1"}
    rows = index.metadata(np.array([[11, -1], [0, 5]]))
    assert [[r and r["key"] for r in query] for query in rows] == [["p10-r2", None], ["p0-r0", "p2-r0"]]
    with pytest.raises(InputError, match="id 12 is not in this index"):
        index.metadata([12])


def test_index_folder_holds_ids_metadata_and_a_readable_configuration(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(40, 8, seed=0), 1: clustered(30, 8, seed=1)})
    Index.build(tmp_path / "emb", tmp_path / "index")
    config = json.loads((tmp_path / "index" / CONFIG_FILE).read_text())
    assert config["type"] == "flat" and config["count"] == 70 and config["structure"] == "Flat"
    assert config["parts"] == [{"number": 0, "rows": 40, "first_id": 0}, {"number": 1, "rows": 30, "first_id": 40}]
    assert (tmp_path / "index" / config["file"]).is_file()
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "index" / "metadata" / "metadata_1.parquet")
    assert table.column("id").to_pylist() == list(range(40, 70))
    assert table.column("key").to_pylist()[0] == "p1-r0"
    assert not list((tmp_path / "index").glob(".*tmp*"))


def test_metadata_reads_row_groups_through_a_cache_that_never_passes_its_limit(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import unicom.search.index as index_module

    monkeypatch.setattr(index_module, "ROW_GROUP_ROWS", 4)
    write_collection(tmp_path / "emb", {number: clustered(10, 8, seed=number) for number in range(12)})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    files = [tmp_path / "index" / "metadata" / f"metadata_{number}.parquet" for number in range(12)]
    assert {pq.ParquetFile(file).metadata.num_row_groups for file in files} == {3}  # 4 + 4 + 2 rows
    whole = pa.concat_tables([pq.read_table(file) for file in files]).to_pylist()  # the reference: every table read
    limit = 3 * pq.ParquetFile(files[0]).read_row_group(0).nbytes
    index.metadata_rows.cache_bytes = limit
    rng = np.random.default_rng(0)
    for _ in range(20):  # hits spread over every part
        ids = rng.integers(0, len(index), size=(3, 5))
        assert index.metadata(ids) == [[whole[i] for i in query] for query in ids.tolist()]
        assert 0 < index.metadata_rows.cached_bytes <= limit
    # a row group larger than the limit is held alone
    index.metadata_rows.cache_bytes = 1
    assert index.metadata([0, 119]) == [whole[0], whole[119]]
    assert index.metadata_rows.cached_row_groups == [(11, 2)]


def test_metadata_of_an_index_rebuilt_since_it_was_loaded_is_refused_saying_to_load_it_again(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(20, 8, seed=0)})
    loaded = Index.build(tmp_path / "emb", tmp_path / "index")
    write_collection(tmp_path / "emb", {0: clustered(30, 8, seed=1)})
    Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True)  # as a server goes on serving the first
    with pytest.raises(FolderError, match=r"metadata_0.parquet: 30 rows, but the index holds 20 of this part; .*"
                                          r"if it was rebuilt since, load it again \(restart `unicom serve`\)"):
        loaded.metadata(3)
    assert Index.load(tmp_path / "index").metadata(3)["key"] == "p0-r3"


def test_loading_an_embedding_folder_as_an_index_says_to_build_one_from_it(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    with pytest.raises(InputError, match=f"{tmp_path / 'emb'}: an embedding folder, not an index; build an index of it "
                                         f"with `unicom index --emb {tmp_path / 'emb'} --out INDEX/`"):
        Index.load(tmp_path / "emb")


def test_a_source_id_column_is_kept_as_source_id(tmp_path):
    write_part(tmp_path / "emb", 0, image=clustered(3, 8, seed=0), metadata=pa.table({"key": ["a", "b", "c"], "id": [7, 8, 9]}))
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    assert index.metadata(2) == {"id": 2, "key": "c", "source_id": 9}


# --------------------------------------------------------------------------- compressed index


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    parts = {0: clustered(2000, 32, seed=10), 1: clustered(2000, 32, seed=11)}
    write_collection(root / "emb", parts)
    index = Index.build(root / "emb", root / "index", index_type="ivfpq", pq_m=16, recall_target=0.75, heldout=200)
    return root, parts, index


def test_compressed_index_meets_its_recall_target_on_the_held_out_rows(compressed):
    root, parts, index = compressed
    assert index.type == "ivfpq" and index.config["structure"] == "PR32,IVF64,PQ16x6"
    collection = first_dims(np.concatenate(list(parts.values())), 32)
    heldout = np.load(root / "index" / HELDOUT_FILE)
    assert len(heldout) == 200 and len(index) == 4000
    # independent measurement: numpy brute force over the rows that are not held out ...
    others = np.setdiff1d(np.arange(4000), heldout)
    _, exact = brute_force(collection[others], collection[heldout], 10)
    truth = others[exact]
    # ... against the index without the held-out rows, which joined it last: for inverted
    # lists that is the full index's ranking with them filtered out
    _, found = index.search(collection[heldout], k=10 + 200)
    found = np.array([[j for j in row if j not in set(heldout.tolist())][:10] for row in found])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.75
    assert recall == pytest.approx(index.config["selection"]["recall"], abs=0.005)
    # the chosen nprobe is the smallest that reaches the target
    steps = index.config["selection"]["tried"][0]["steps"]
    assert [s["recall"] >= 0.75 for s in steps] == [False] * (len(steps) - 1) + [True]
    assert steps[-1]["nprobe"] == index.config["search"]["nprobe"]


def test_compressed_index_is_smaller_than_the_exact_one(compressed):
    _, _, index = compressed
    # 4000 codes of 16 x 6 bits and 8-byte ids, 64 + 64 centroids and a 32 x 32 rotation, in float32
    assert index.config["params"] == {"nlist": 64, "m": 16, "nbits": 6, "rotated_dims": 32}
    assert index.config["bytes"] < flat_memory(4000, 32) / 4
    assert index.config["selection"]["tried"][0]["estimated_bytes"] == 4000 * (12 + 8) + 4 * 32 * 128 + 4 * 32 * 32 + 48 * 64


def test_the_held_out_rows_never_train_the_quantizers(compressed, monkeypatch):
    root, parts, _ = compressed
    import faiss

    seen = []
    original = faiss.IndexPreTransform.train

    def recording_train(self, x):
        seen.append(np.array(x))
        return original(self, x)

    monkeypatch.setattr(faiss.IndexPreTransform, "train", recording_train)
    index = Index.build(root / "emb", root / "again", index_type="ivfpq", pq_m=16, recall_target=0.5, heldout=200)
    heldout = np.load(root / "again" / HELDOUT_FILE)
    rows = [row.tobytes() for row in first_dims(np.concatenate(list(parts.values())), 32)]
    trained = {row.tobytes() for row in seen[0]}
    # fewer rows than the 4096 wanted: every row but the held-out ones trains
    assert trained == {row for i, row in enumerate(rows) if i not in set(heldout.tolist())}
    assert index.type == "ivfpq"


def held_out_recall(index, root, vectors: np.ndarray, k: int = 10) -> float:
    """recall@k of the held-out rows, measured apart from the index's own record: numpy brute
    force over the other rows against the index's results with the held-out rows filtered out."""
    heldout = np.load(root / HELDOUT_FILE)
    others = np.setdiff1d(np.arange(len(vectors)), heldout)
    truth = others[brute_force(vectors[others], vectors[heldout], k)[1]]
    _, found = index.search(vectors[heldout], k=k + len(heldout))
    skip = set(heldout.tolist())
    found = [[j for j in row if j not in skip][:k] for row in found]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))


def test_a_recall_target_keeps_the_smallest_index_within_the_budget_that_reaches_it(compressed, tmp_path):
    root, parts, _ = compressed
    budget = flat_memory(4000, 32) // 3
    index = Index.build(root / "emb", tmp_path / "index", memory_budget=budget, recall_target=0.8, heldout=200)
    selection = index.config["selection"]
    assert selection["objective"] == "size" and selection["memory_budget"] == budget
    tried = selection["tried"]
    # codes of growing size, each below the target but the last, which is the index kept
    assert [t["estimated_bytes"] for t in tried] == sorted(t["estimated_bytes"] for t in tried) and len(tried) > 1
    assert all(t["recall"] < 0.8 for t in tried[:-1]) and tried[-1]["recall"] >= 0.8
    assert index.config["structure"] == tried[-1]["structure"] and index.config["bytes"] <= budget
    vectors = first_dims(np.concatenate(list(parts.values())), 32)
    assert held_out_recall(index, tmp_path / "index", vectors) == pytest.approx(selection["recall"], abs=0.005)


def test_a_budget_without_a_target_is_spent_on_recall(compressed, tmp_path):
    root, parts, _ = compressed
    budget = flat_memory(4000, 32) // 2
    index = Index.build(root / "emb", tmp_path / "index", memory_budget=budget, heldout=200)
    selection = index.config["selection"]
    # 8-bit codes of all 32 axes fit: the largest code within the budget
    assert selection["objective"] == "recall" and selection["recall_target"] is None
    assert index.config["structure"] == "PR32,IVF64,SQ8" and index.config["bytes"] <= budget
    steps = selection["tried"][0]["steps"]
    kept = [step["nprobe"] for step in steps].index(index.config["search"]["nprobe"])
    assert all(b["recall"] - a["recall"] >= KNEE_GAIN for a, b in zip(steps[:kept], steps[1:kept + 1]))
    assert kept == len(steps) - 1 or steps[kept + 1]["recall"] - steps[kept]["recall"] < KNEE_GAIN
    vectors = first_dims(np.concatenate(list(parts.values())), 32)
    assert held_out_recall(index, tmp_path / "index", vectors) == pytest.approx(selection["recall"], abs=0.005)


def test_scalar_codes_return_inner_products_close_to_the_exact_ones(compressed, tmp_path):
    root, parts, _ = compressed
    index = Index.build(root / "emb", tmp_path / "index", index_type="ivfsq", heldout=200)
    assert index.config["structure"] == "PR32,IVF64,SQ8"
    vectors = first_dims(np.concatenate(list(parts.values())), 32)
    queries = first_dims(clustered(50, 32, seed=14), 32)
    scores, ids = index.search(queries, 10, nprobe=64)
    exact = np.einsum("qd,qkd->qk", queries, vectors[ids])
    assert np.abs(scores - exact).max() < 0.02
    _, want = brute_force(vectors, queries, 10)
    assert recall_at_k(ids, want) >= 0.95


def test_an_unreachable_target_is_an_error_and_writes_nothing(compressed, tmp_path):
    root, _, _ = compressed
    fixed = ivfpq_memory(0, 32, 16, 0, 6, 32)
    budget = 4000 * (8 + 2) + fixed + 2000  # only 2-byte codes fit
    with pytest.raises(InputError, match=r"no index within .* reaches recall@10 0.99 .*PR32,IVF16,PQ2x6 .*: recall@10 0\."):
        Index.build(root / "emb", tmp_path / "index", memory_budget=budget, recall_target=0.99, heldout=200, nlist=16)
    assert not (tmp_path / "index").exists()


def test_hnsw_index_raises_ef_search_until_the_target(compressed, tmp_path):
    root, parts, _ = compressed
    index = Index.build(root / "emb", tmp_path / "index", index_type="hnsw", hnsw_m=8, recall_target=0.95, heldout=200)
    assert index.type == "hnsw" and index.config["structure"] == "HNSW8"
    steps = index.config["selection"]["tried"][0]["steps"]
    assert [s["efSearch"] for s in steps] == [16, 32, 64, 128, 256, 512, 1024, 2048][: len(steps)]
    assert steps[-1]["recall"] >= 0.95 and all(s["recall"] < 0.95 for s in steps[:-1])
    assert index.config["search"] == {"efSearch": steps[-1]["efSearch"]}
    collection = first_dims(np.concatenate(list(parts.values())), 32)
    scores, ids = index.search(collection[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    # the held-out rows joined the graph after the measurement, under their own ids
    heldout = np.load(tmp_path / "index" / HELDOUT_FILE)
    _, ids = index.search(collection[heldout[:20]], 1)
    assert ids[:, 0].tolist() == heldout[:20].tolist()


# --------------------------------------------------------------------------- adding parts


def test_hnsw_finds_k_results_for_a_k_above_its_ef_search(compressed, tmp_path):
    root, parts, _ = compressed
    index = Index.build(root / "emb", tmp_path / "hnsw", index_type="hnsw", heldout=200)
    assert index.config["search"]["efSearch"] < 300
    vectors = np.concatenate(list(parts.values()))
    probe = clustered(20, 32, seed=15)
    scores, ids = index.search(probe, 300)
    assert (ids >= 0).all()  # with efSearch as recorded the walk stops short of 300 results
    _, truth = brute_force(vectors, probe, 300)
    assert recall_at_k(ids, truth) > 0.95


def test_adding_a_part_equals_building_from_scratch(tmp_path):
    parts = {0: clustered(200, 24, seed=30), 1: clustered(150, 24, seed=31), 5: clustered(120, 24, seed=32)}
    write_collection(tmp_path / "emb", {n: parts[n] for n in (0, 1)})
    grown = Index.build(tmp_path / "emb", tmp_path / "grown", dims=16)
    write_collection(tmp_path / "emb", {5: parts[5]})
    assert grown.add_parts() == [5]
    scratch = Index.build(tmp_path / "emb", tmp_path / "scratch", dims=16)
    queries = clustered(30, 24, seed=33)
    for got, want in zip(grown.search(queries, 12), scratch.search(queries, 12)):
        np.testing.assert_array_equal(got, want)
    assert grown.config["parts"] == scratch.config["parts"]
    reloaded = Index.load(tmp_path / "grown")
    ids = np.arange(len(scratch))
    assert reloaded.metadata(ids) == scratch.metadata(ids)
    assert reloaded.config["generation"] == 1 and sorted(p.name for p in (tmp_path / "grown").glob("*.faiss")) == ["index_1.faiss"]


def test_adding_to_a_compressed_index_keeps_the_quantizers_and_measures_again(compressed, tmp_path):
    import shutil

    import faiss

    root, _, _ = compressed
    shutil.copytree(root / "emb", tmp_path / "emb")
    shutil.copytree(root / "index", tmp_path / "index")
    index = Index.load(tmp_path / "index")
    trained = faiss.serialize_index(index.faiss_index)
    new = clustered(1000, 32, seed=12)
    write_collection(tmp_path / "emb", {2: new})
    assert index.add_parts(tmp_path / "emb") == [2]
    assert len(index) == 5000
    # the new rows are encoded by the build's quantizers: the same as adding them to the saved index
    reference = faiss.deserialize_index(trained)
    reference.add(first_dims(new, 32))
    probe = clustered(50, 32, seed=13)
    _, got = index.search(probe, 10, nprobe=8)
    _, want = reference.search(probe, 10, params=faiss.SearchParametersPreTransform(
        index_params=faiss.SearchParametersIVF(nprobe=8)))
    np.testing.assert_array_equal(got, want)
    # a held-out sample of the new rows measured the recall again
    heldout = np.load(tmp_path / "index" / HELDOUT_FILE)
    assert len(heldout) == 100 and heldout.min() >= 4000 and heldout.max() < 5000
    assert index.config["selection"]["heldout_after_add"] == 100
    assert "steps_after_add" in index.config["selection"] and index.config["selection"]["recall"] >= 0.75


def test_a_new_part_too_small_to_measure_keeps_the_measured_recall_and_search_parameter(compressed, tmp_path):
    import shutil

    root, _, built = compressed
    shutil.copytree(root / "emb", tmp_path / "emb")
    shutil.copytree(root / "index", tmp_path / "index")
    index = Index.load(tmp_path / "index")
    new = clustered(1, 32, seed=14)  # one row: none can be held out
    write_collection(tmp_path / "emb", {2: new})
    assert index.add_parts(tmp_path / "emb") == [2]
    for config in (index.config, Index.load(tmp_path / "index").config):
        assert config["search"] == built.config["search"] and config["search"]["nprobe"] > 1
        assert config["selection"] == built.config["selection"]
    np.testing.assert_array_equal(np.load(tmp_path / "index" / HELDOUT_FILE), np.load(root / "index" / HELDOUT_FILE))
    assert index.search(new, 1)[1].tolist() == [[4000]]


def test_an_approximate_index_without_held_out_rows_is_refused(compressed, tmp_path):
    root, _, _ = compressed
    for index_type in ("ivfpq", "hnsw"):
        with pytest.raises(InputError, match=r"no held-out rows to measure recall@10 on \(4000 rows, --heldout 0\?\)"):
            Index.build(root / "emb", tmp_path / index_type, index_type=index_type, heldout=0, recall_target=0.9)
        assert not (tmp_path / index_type).exists()
    assert Index.build(root / "emb", tmp_path / "flat", index_type="flat", heldout=0).type == "flat"


def test_a_new_part_before_the_indexed_ones_is_refused(tmp_path):
    write_collection(tmp_path / "emb", {3: clustered(20, 8, seed=0)})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    write_collection(tmp_path / "emb", {1: clustered(20, 8, seed=1)})
    with pytest.raises(InputError, match=r"new parts \[1\] come before indexed part 3"):
        index.add_parts()


def test_a_changed_indexed_part_is_refused(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(20, 8, seed=0)})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    write_collection(tmp_path / "emb", {0: clustered(25, 8, seed=0)})
    with pytest.raises(InputError, match="25 rows, but the index holds 20 of this part"):
        index.add_parts()


def test_nothing_new_adds_nothing(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(20, 8, seed=0)})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    assert index.add_parts() == [] and index.config["generation"] == 0


# --------------------------------------------------------------------------- bad input


def test_a_nan_row_is_named_and_nothing_is_written(tmp_path):
    bad = clustered(30, 8, seed=0)
    bad[17, 3] = np.nan
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=1), 4: bad})
    with pytest.raises(InputError, match=r"img_emb_4\.npy: row 17 holds NaN"):
        Index.build(tmp_path / "emb", tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_unfinished_parts_are_left_out(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    write_part(tmp_path / "emb", 1, image=clustered(10, 8, seed=1))  # no metadata yet: still being written
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    assert [p.number for p in index.parts] == [0] and len(index) == 10


def test_metadata_rows_must_match_the_embeddings(tmp_path):
    write_part(tmp_path / "emb", 0, image=clustered(10, 8, seed=0), metadata=pa.table({"key": list("abc")}))
    with pytest.raises(InputError, match=r"part 0: img_emb_0\.npy has 10, metadata_0\.parquet has 3 rows"):
        Index.build(tmp_path / "emb", tmp_path / "index")


def test_more_dims_than_the_embeddings_have_is_an_error(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    with pytest.raises(InputError, match="--dims 9: the embeddings have 8 dimensions"):
        Index.build(tmp_path / "emb", tmp_path / "index", dims=9)


@pytest.mark.parametrize("options, said", [
    ({"dims": 0}, "--dims 0: the embeddings have 8 dimensions"),
    ({"k": 0}, "-k 0: the k of recall@k must be at least 1"),
    ({"heldout": -5}, "--heldout -5: the number of held-out rows cannot be negative"),
    ({"nlist": 0, "index_type": "ivfpq"}, "--nlist 0: give at least 1 inverted list"),
    ({"nbits": -3, "index_type": "ivfpq"}, "--nbits -3: give at least 1 bit per code"),
    ({"hnsw_m": 1, "index_type": "hnsw"}, "--hnsw-m 1: give at least 2 links per vector and layer"),  # faiss crashes
    # faiss builds these: 800 kB of links per vector, priced by --memory as if they were worth it
    ({"hnsw_m": 100_000, "index_type": "hnsw"}, r"--hnsw-m 100000: give at most 100 links per vector and layer \(faiss' "
                                               r"guide uses 4 to 64, hnswlib's 2 to 100"),
    ({"hnsw_m": 101}, r"--hnsw-m 101: give at most 100 links"),
    ({"nbits": 25, "index_type": "ivfpq"}, r"--nbits 25: give at most 24 bits per code \(faiss refuses more"),
    ({"seed": -1}, r"--seed -1: the seed of the samples is a number from 0 up"),  # numpy's ValueError before
    ({"exact_max_rows": -1}, r"--exact-max-rows -1: give 0 \(never exact\) or more rows"),
])
def test_build_options_out_of_range_are_named_and_nothing_is_written(tmp_path, options, said):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    with pytest.raises(InputError, match=said):
        Index.build(tmp_path / "emb", tmp_path / "index", **options)
    assert not (tmp_path / "index").exists()


def test_more_pq_bits_than_the_collection_can_train_are_refused_naming_the_option(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(1000, 8, seed=0)})  # 900 training rows: 39·2^4 ≤ 900 < 39·2^5
    with pytest.raises(InputError, match="--nbits 20: the 1,048,576 centroids .* need 40,894,464 training rows .* "
                                         "there are 900; use --nbits 4"):
        Index.build(tmp_path / "emb", tmp_path / "index", index_type="ivfpq", nbits=20, heldout=100)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("options", [{"index_type": "ivfpq"}, {"index_type": "ivfsq"},
                                     {"exact_max_rows": 100, "memory_budget": "500KB"}],  # the type left to choose
                         ids=["ivfpq", "ivfsq", "auto"])
def test_more_inverted_lists_than_the_collection_can_train_are_refused_naming_the_option(tmp_path, options):
    write_collection(tmp_path / "emb", {0: clustered(2000, 16, seed=0)})  # faiss aborts below one row per list
    with pytest.raises(InputError, match=r"^--nlist 5000: 2,000 vectors train at most 51 inverted lists \(39 rows each\); "
                                         "give a smaller --nlist or leave it out$"):
        Index.build(tmp_path / "emb", tmp_path / "index", nlist=5000, heldout=200, **options)
    assert not (tmp_path / "index").exists()
    index = Index.build(tmp_path / "emb", tmp_path / "index", nlist=51, heldout=200, **options)
    assert index.config["params"]["nlist"] == 51


def test_the_default_pq_bits_given_explicitly_build_what_leaving_them_out_builds(tmp_path):
    # 585 training rows: fewer than 39·2^4, and 4 bits is still the default (the fewest offered)
    write_collection(tmp_path / "emb", {0: clustered(650, 8, seed=0)})
    default = Index.build(tmp_path / "emb", tmp_path / "default", index_type="ivfpq", nlist=16, heldout=65)
    given = Index.build(tmp_path / "emb", tmp_path / "given", index_type="ivfpq", nlist=16, heldout=65, nbits=4)
    assert default.config["params"]["nbits"] == given.config["params"]["nbits"] == 4
    assert given.config["selection"]["recall"] == default.config["selection"]["recall"]
    with pytest.raises(InputError, match="--nbits 5: .* there are 585; use --nbits 4 or leave it out"):
        Index.build(tmp_path / "emb", tmp_path / "more", index_type="ivfpq", nlist=16, heldout=65, nbits=5)


def test_hnsw_is_tuned_with_an_ef_search_of_k_when_k_passes_the_largest_step(tmp_path):
    vectors = clustered(2300, 8, seed=0)
    write_collection(tmp_path / "emb", {0: vectors})
    index = Index.build(tmp_path / "emb", tmp_path / "index", index_type="hnsw", k=2100, heldout=100)
    assert search_steps(Candidate("hnsw", {"M": 32}, 0), 2100) == [{"efSearch": 2100}]
    assert index.config["search"] == {"efSearch": 2100}
    assert [step["efSearch"] for step in index.config["selection"]["tried"][0]["steps"]] == [2100]


def test_results_past_the_end_of_a_small_index_have_id_minus_one_and_score_minus_infinity(tmp_path):
    vectors = clustered(3, 8, seed=0)
    write_collection(tmp_path / "emb", {0: vectors})
    for index_type in ("flat", "hnsw"):
        index = Index.build(tmp_path / "emb", tmp_path / index_type, index_type=index_type)
        scores, ids = index.search(vectors[:2], 5)
        expected_scores, expected_ids = brute_force(vectors, vectors[:2], 3)
        np.testing.assert_array_equal(ids[:, :3], expected_ids)
        np.testing.assert_allclose(scores[:, :3], expected_scores, rtol=1e-5)
        assert (ids[:, 3:] == -1).all() and (scores[:, 3:] == -np.inf).all()


def test_a_recall_at_k_of_every_row_not_held_out_is_said_to_say_nothing(tmp_path, caplog):
    vectors = clustered(3, 8, seed=0)
    write_collection(tmp_path / "emb", {0: vectors})
    with caplog.at_level(logging.WARNING, logger="unicom"):
        Index.build(tmp_path / "emb", tmp_path / "hnsw", index_type="hnsw", k=10, heldout=1)
    assert "recall@10 is measured among the 2 rows that are not held out" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unicom"):
        Index.build(tmp_path / "emb", tmp_path / "hnsw", index_type="hnsw", k=1, heldout=1, overwrite=True)
    assert "says nothing" not in caplog.text


def test_k_may_be_a_numpy_integer_but_not_a_float(tmp_path):
    vectors = clustered(10, 8, seed=0)
    write_collection(tmp_path / "emb", {0: vectors})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    for k in (np.int64(3), np.int32(3), np.argmax([0, 0, 0, 1])):
        np.testing.assert_array_equal(index.search(vectors[:2], k)[1], brute_force(vectors, vectors[:2], 3)[1])
    with pytest.raises(InputError, match="k must be an integer, got 3.0"):
        index.search(vectors[:2], 3.0)


def test_a_query_that_cannot_be_searched_is_named_as_the_query(tmp_path):
    vectors = clustered(30, 8, seed=0)
    write_collection(tmp_path / "emb", {0: vectors})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    queries = vectors[:3].copy()
    queries[2, 0] = np.nan
    with pytest.raises(InputError) as error:
        index.search(queries, k=2)
    assert str(error.value) == ("query embeddings: row 2 holds NaN or infinite values; a query needs finite numbers, "
                                "not all zero, in the dimensions the index searches")
    # a finite query of large numbers is a direction like any other
    np.testing.assert_array_equal(index.search(vectors[:3] * 1e20, k=2)[1], index.search(vectors[:3], k=2)[1])


def test_a_models_output_tensor_is_a_query_as_it_is(tmp_path):
    import torch

    vectors = clustered(30, 8, seed=0)
    write_collection(tmp_path / "emb", {0: vectors})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    expected = index.search(vectors[:3], k=4)[1]
    weights = torch.eye(8, requires_grad=True)  # the query as a model's output: it carries autograd
    output = torch.from_numpy(vectors[:3]) @ weights
    np.testing.assert_array_equal(index.search(output, k=4)[1], expected)
    halves = torch.from_numpy(vectors[:3]).to(torch.bfloat16)
    assert index.search(halves, k=1)[1][:, 0].tolist() == [0, 1, 2]


def test_queries_need_at_least_the_index_dimensions(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    index = Index.build(tmp_path / "emb", tmp_path / "index", dims=6)
    with pytest.raises(InputError, match="query embeddings have 4 dimensions, the index needs at least 6"):
        index.search(np.ones((1, 4)), 3)


def test_an_index_into_the_embedding_folder_itself_is_refused_and_changes_nothing(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    before = {path: path.read_bytes() for path in (tmp_path / "emb").rglob("*") if path.is_file()}
    for out in (tmp_path / "emb", tmp_path / "emb" / ".." / "emb"):
        for layout in ("unicom", "clip-retrieval"):
            with pytest.raises(InputError, match="is the embedding folder itself: the index's metadata/ would replace"):
                Index.build(tmp_path / "emb", out, layout=layout, overwrite=True)
    assert {path: path.read_bytes() for path in (tmp_path / "emb").rglob("*") if path.is_file()} == before


def test_an_existing_index_is_not_overwritten_without_asking(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    Index.build(tmp_path / "emb", tmp_path / "index")
    with pytest.raises(InputError, match="already holds an index"):
        Index.build(tmp_path / "emb", tmp_path / "index")
    rebuilt = Index.build(tmp_path / "emb", tmp_path / "index", dims=4, overwrite=True)
    assert rebuilt.dims == 4 and [p.name for p in (tmp_path / "index").glob("*.faiss")] == ["index_1.faiss"]


def test_a_failed_write_leaves_the_previous_index_intact(tmp_path, monkeypatch):
    write_collection(tmp_path / "emb", {0: clustered(10, 8, seed=0)})
    Index.build(tmp_path / "emb", tmp_path / "index")
    write_collection(tmp_path / "emb", {1: clustered(10, 8, seed=1)})
    import faiss

    def broken_write(index, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(OSError, match="disk full"):
        Index.load(tmp_path / "index").add_parts()
    monkeypatch.undo()
    index = Index.load(tmp_path / "index")
    assert len(index) == 10 and sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        HELDOUT_FILE, CONFIG_FILE, "index_0.faiss", "metadata"]


def test_a_failed_rebuild_leaves_no_index_rather_than_old_vectors_with_new_metadata(tmp_path, monkeypatch):
    import faiss

    old, new = clustered(10, 8, seed=0), clustered(10, 8, seed=1)
    write_part(tmp_path / "emb", 0, image=old, metadata=pa.table({"key": [f"old{i}" for i in range(10)]}))
    Index.build(tmp_path / "emb", tmp_path / "index")
    assert Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True).config["generation"] == 1
    write_part(tmp_path / "emb", 0, image=new, metadata=pa.table({"key": [f"new{i}" for i in range(10)]}))
    write_index = faiss.write_index

    def broken_write(index, path):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(OSError, match="disk full"):
        Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True)  # after the metadata, before index.json
    with pytest.raises(InputError, match="no index.json inside"):
        Index.load(tmp_path / "index")
    monkeypatch.setattr(faiss, "write_index", write_index)
    index = Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True)  # the rerun completes it
    _, ids = index.search(new[3], 1)
    assert index.metadata(ids) == [[{"id": 3, "key": "new3"}]]
    assert sorted(path.name for path in (tmp_path / "index").glob("*.faiss")) == ["index_0.faiss"]  # not index_1


def test_loading_a_folder_without_an_index_says_how_to_build_one(tmp_path):
    with pytest.raises(InputError, match="no index.json inside .*nor image.index / text.index .*; build an index with `unicom index"):
        Index.load(tmp_path)


def test_search_parameters_survive_faiss_torch_utils(tmp_path):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which patches Index.search."""
    import subprocess
    import sys

    code = (
        "import numpy as np, faiss, faiss.contrib.torch_utils\n"
        "from unicom.search.index import _search\n"
        "x = np.random.default_rng(0).standard_normal((500, 16)).astype('float32')\n"
        "x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "index = faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT)\n"
        "index.add(x)\n"
        "scores, ids = _search(index, 'hnsw', {'efSearch': 64}, x[:3], 2)\n"
        "print(ids[:, 0].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 2]"


def test_an_index_written_before_layouts_and_objectives_still_opens_and_grows(tmp_path):
    write_collection(tmp_path / "emb", {0: clustered(20, 8, seed=0)})
    Index.build(tmp_path / "emb", tmp_path / "index")
    path = tmp_path / "index" / CONFIG_FILE
    config = json.loads(path.read_text())
    del config["layout"], config["selection"]["objective"]
    config.update(format_version=1)
    config["selection"]["recall_target"] = 0.9
    path.write_text(json.dumps(config))
    index = Index.load(tmp_path / "index")
    assert index.layout == "unicom" and index.modalities == ("image",)
    assert index.search(clustered(1, 8, seed=0), 1)[1].shape == (1, 1)
    write_collection(tmp_path / "emb", {1: clustered(5, 8, seed=1)})
    assert index.add_parts() == [1] and len(Index.load(tmp_path / "index")) == 25
