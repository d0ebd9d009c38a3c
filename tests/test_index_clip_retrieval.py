"""unicom.Index and clip-retrieval's index folder (image.index, text.index, metadata/*.parquet).

autofaiss needs numpy < 2 and cannot share this environment, so the autofaiss folder here
is written with faiss exactly as autofaiss writes it (its index factory keys, its search
parameter string, its description file, the metadata copied beside it);
``benchmarks/index_autofaiss.py`` opens folders built by autofaiss itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom.errors import InputError
from unicom.formats.embeddings import write_part
from unicom.search import clip_layout
from unicom.search.index import CONFIG_FILE, Index


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_collection(root, sizes: dict[int, int], d: int = 32, text: bool = True) -> dict[int, tuple]:
    """Parts with image and text embeddings and metadata (key, caption, url), as `unicom embed` writes them."""
    parts = {}
    for number, rows in sizes.items():
        image = unit_rows(rows, d, seed=number)
        words = unit_rows(rows, d, seed=1000 + number) if text else None
        keys = [f"p{number}-r{r}" for r in range(rows)]
        table = pa.table({"key": keys, "caption": [f"caption {k}" for k in keys], "url": [f"https://x/{k}.jpg" for k in keys]})
        write_part(root, number, image=image, text=words, metadata=table)
        parts[number] = (image, words, keys)
    return parts


def in_name_order(parts: dict[int, tuple], kind: int) -> np.ndarray:
    """Rows of every part with part files taken in name order, as autofaiss' reader does."""
    return np.concatenate([parts[number][kind] for number in sorted(parts, key=str)])


def write_autofaiss_folder(out, emb, parts, image_key: str, text_key: str, params: dict[str, str]) -> None:
    """What `clip-retrieval index` leaves: autofaiss' image/text indexes and descriptions, the metadata copied."""
    import faiss

    out.mkdir()
    for modality, key, kind in (("image", image_key, 0), ("text", text_key, 1)):
        vectors = in_name_order(parts, kind)
        index = faiss.index_factory(vectors.shape[1], key, faiss.METRIC_INNER_PRODUCT)
        if isinstance(index, faiss.IndexPreTransform):  # fewer training rounds keep the test quick
            opq = faiss.downcast_VectorTransform(index.chain.at(0))
            opq.niter, opq.niter_pq_0 = 4, 4
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        index.train(vectors)
        index.add(vectors)  # ids 0, 1, ... in the embedding files' name order
        if params[modality]:
            faiss.ParameterSpace().set_index_parameters(index, params[modality])
        faiss.write_index(index, str(out / f"{modality}.index"))
        infos = {"index_key": key, "index_param": params[modality], "index_path": str(out / f"{modality}.index"),
                 "nb vectors": index.ntotal, "vectors dimension": index.d}
        (out / f"{modality}.json").write_text(json.dumps(infos))
    shutil.copytree(emb / "metadata", out / "metadata")


@pytest.fixture(scope="module")
def autofaiss_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("autofaiss")
    # parts 0..11 unpadded, as `unicom embed` names them: name order puts 10 and 11 before 2
    sizes = {number: 300 + 17 * number for number in range(12)}
    parts = write_collection(root / "emb", sizes)
    write_autofaiss_folder(root / "index", root / "emb", parts, "OPQ4_32,IVF16,PQ4x8", "HNSW32",
                           {"image": "nprobe=4,ht=2048", "text": "efSearch=24"})
    return root, parts


def test_an_autofaiss_folder_answers_exactly_as_faiss_itself(autofaiss_folder):
    import faiss

    root, parts = autofaiss_folder
    index = Index.load(root / "index")
    assert index.layout == "clip-retrieval" and index.modalities == ("image", "text")
    assert len(index) == sum(len(part[0]) for part in parts.values()) and index.dims == 32
    queries = unit_rows(40, 32, seed=99)
    for modality in ("image", "text"):
        want_scores, want_ids = faiss.read_index(str(root / "index" / f"{modality}.index")).search(queries, 8)
        scores, ids = index.search(queries, 8, modality=modality)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)  # the queries are re-normalised: last bits differ
    assert index.config["modalities"]["image"]["structure"] == "OPQ4_32,IVF16,PQ4x8"
    assert index.config["modalities"]["image"]["stored_search"] == {"nprobe": 4}


def test_an_autofaiss_folder_in_s3_loads_as_it_does_from_disk(s3, autofaiss_folder, tmp_path, monkeypatch):
    root, _ = autofaiss_folder
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    s3.bucket("autofaiss-url")
    # the folder held an index in unicom's layout first: its copy in the cache must not answer for what replaced it
    write_collection(tmp_path / "emb", {0: 30}, text=False)
    Index.build(tmp_path / "emb", tmp_path / "unicom_index")
    url = s3.upload_folder(tmp_path / "unicom_index", "autofaiss-url", "index")
    assert len(Index.load(url)) == 30
    for key in s3.keys("autofaiss-url", "index/"):
        s3.client().delete_object(Bucket="autofaiss-url", Key=key)
    s3.upload_folder(root / "index", "autofaiss-url", "index")

    remote, local = Index.load(url), Index.load(root / "index")
    assert remote.layout == "clip-retrieval" and remote.modalities == ("image", "text") and len(remote) == len(local)
    assert remote.path.is_relative_to(tmp_path / "cache")
    queries = unit_rows(10, 32, seed=7)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(remote.search(queries, 5, modality=modality)[1],
                                      local.search(queries, 5, modality=modality)[1])
    ids = local.search(queries, 5)[1]
    assert remote.metadata(ids) == local.metadata(ids)
    with pytest.raises(InputError, match="no index.json inside .unicom's layout., nor image.index / text.index"):
        Index.load("s3://autofaiss-url/elsewhere")


@pytest.mark.parametrize("key, described", [
    ("Flat", ("flat", {})), ("HNSW32", ("hnsw", {"efSearch": 16})), ("IVF8,Flat", ("ivf", {"nprobe": 1})),
    ("IVF8,SQ8", ("ivfsq", {"nprobe": 1})), ("IVF8,PQ4x8", ("ivfpq", {"nprobe": 1})),
    ("OPQ4_16,IVF8_HNSW32,PQ4x8", ("ivfpq", {"nprobe": 1})), ("PCA8,IVF8,SQfp16", ("ivfsq", {"nprobe": 1})),
])
def test_every_index_type_autofaiss_builds_is_described_by_its_codes(key, described):
    import faiss

    assert clip_layout.describe(faiss.index_factory(16, key, faiss.METRIC_INNER_PRODUCT)) == described


def test_the_type_of_an_autofaiss_folder_is_its_own(autofaiss_folder):
    root, _ = autofaiss_folder
    index = Index.load(root / "index")
    assert index.type == "ivfpq"
    assert {modality: index.config["modalities"][modality]["type"] for modality in index.modalities} == \
        {"image": "ivfpq", "text": "hnsw"}


def test_an_autofaiss_hnsw_index_finds_k_results_for_a_k_above_its_ef_search(autofaiss_folder):
    root, parts = autofaiss_folder
    index = Index.load(root / "index")
    queries = unit_rows(10, 32, seed=98)
    _, ids = index.search(queries, 500, modality="text")  # text.index: HNSW32 with efSearch=24
    assert (ids >= 0).all()
    text = in_name_order(parts, 1)
    truth = np.argsort(-(queries @ text.T), axis=1, kind="stable")[:, :500]
    assert np.mean([len(set(found) & set(true)) / 500 for found, true in zip(ids, truth)]) > 0.95


def test_autofaiss_ids_are_rows_of_the_metadata_files_in_name_order(autofaiss_folder):
    root, parts = autofaiss_folder
    index = Index.load(root / "index")
    keys = [key for number in sorted(parts, key=str) for key in parts[number][2]]
    # part 10's row 3 comes after parts 0 and 1 (names sort as "0", "1", "10", "11", "2", ...)
    position = len(parts[0][2]) + len(parts[1][2]) + 3
    assert keys[position] == "p10-r3"
    assert index.metadata(position) == {"id": position, "key": "p10-r3", "caption": "caption p10-r3", "url": "https://x/p10-r3.jpg"}
    rows = index.metadata(np.arange(len(keys)))
    assert [row["key"] for row in rows] == keys and [row["id"] for row in rows] == list(range(len(keys)))
    # an exact text match finds its own row: text.index is HNSW over the text embeddings
    text = in_name_order(parts, 1)
    scores, ids = index.search(text[position], 1, modality="text")
    assert ids.tolist() == [[position]] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_folder_with_one_index_searches_that_modality_only(autofaiss_folder, tmp_path):
    root, _ = autofaiss_folder
    shutil.copytree(root / "index", tmp_path / "index")
    (tmp_path / "index" / "image.index").unlink()
    index = Index.load(tmp_path / "index")
    assert index.modalities == ("text",)
    with pytest.raises(InputError, match="holds no image index .*searches text embeddings"):
        index.search(np.ones(32), 3, modality="image")


def test_metadata_that_does_not_match_the_index_is_refused(autofaiss_folder, tmp_path):
    root, _ = autofaiss_folder
    shutil.copytree(root / "index", tmp_path / "index")
    (tmp_path / "index" / "metadata" / "metadata_7.parquet").unlink()
    with pytest.raises(InputError, match=r"image.index holds 4722 vectors, but .*metadata has 4303 rows"):
        Index.load(tmp_path / "index")


def test_an_l2_index_is_refused(tmp_path):
    import faiss

    tmp_path.joinpath("index").mkdir()
    flat = faiss.IndexFlatL2(8)
    flat.add(unit_rows(10, 8, seed=0))
    faiss.write_index(flat, str(tmp_path / "index" / "image.index"))
    with pytest.raises(InputError, match="ranks by L2 distance .*metric_type='ip'"):
        Index.load(tmp_path / "index")


# --------------------------------------------------------------------------- writing the layout


def clip_back_reads(folder, queries: np.ndarray, k: int, modality: str = "image"):
    """What clip-retrieval's back end does: faiss.read_index, search_and_reconstruct, and the
    metadata files sorted by name and concatenated (ParquetMetadataProvider)."""
    import faiss

    index = faiss.read_index(str(folder / f"{modality}.index"))
    scores, ids, vectors = index.search_and_reconstruct(queries, k)
    files = sorted((folder / "metadata").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(file) for file in files])
    return scores, ids, vectors, table


def test_unicom_index_writes_the_layout_clip_retrieval_serves(tmp_path):
    sizes = {number: 40 + number for number in range(12)}
    parts = write_collection(tmp_path / "emb", sizes)
    out = subprocess.run([sys.executable, "-m", "unicom", "index", "--emb", str(tmp_path / "emb"), "--out",
                          str(tmp_path / "index"), "--layout", "clip-retrieval"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "image flat index" in out.stdout and "text flat index" in out.stdout
    folder = tmp_path / "index"
    assert sorted(p.name for p in (folder / "metadata").iterdir()) == [f"metadata_{n:02d}.parquet" for n in range(12)]
    infos = json.loads((folder / "image.json").read_text())
    assert infos["index_key"] == "Flat" and infos["nb vectors"] == sum(sizes.values()) and infos["vectors dimension"] == 32
    image = np.concatenate([parts[n][0] for n in range(12)])  # part order: the ids unicom gives
    keys = [key for n in range(12) for key in parts[n][2]]
    queries = image[[5, 100, 400]]
    scores, ids, vectors, table = clip_back_reads(folder, queries, 4)
    assert ids[:, 0].tolist() == [5, 100, 400]
    assert table.column("key").to_pylist() == keys  # id i is row i of the files in name order
    np.testing.assert_allclose(vectors[:, 0], queries, atol=1e-6)
    index = Index.load(folder)
    assert index.layout == "clip-retrieval" and index.modalities == ("image", "text")
    ours_scores, ours_ids = index.search(queries, 4)
    np.testing.assert_array_equal(ours_ids, ids)
    assert [row["key"] for row in index.metadata(ids[:, 0])] == [keys[5], keys[100], keys[400]]
    text = np.concatenate([parts[n][1] for n in range(12)])
    _, text_ids, _, _ = clip_back_reads(folder, text[[7]], 1, "text")
    assert text_ids.tolist() == [[7]] and index.search(text[7], 1, modality="text")[1].tolist() == [[7]]


def test_compressed_indexes_in_the_layout_carry_their_search_parameter_and_reconstruct(tmp_path):
    import faiss

    parts = write_collection(tmp_path / "emb", {0: 1500, 1: 1500}, text=False)
    for index_type in ("ivfsq", "hnsw"):
        folder = tmp_path / index_type
        index = Index.build(tmp_path / "emb", folder, layout="clip-retrieval", index_type=index_type, heldout=200)
        assert index.modalities == ("image",) and not (folder / "text.index").exists()
        image = np.concatenate([parts[0][0], parts[1][0]])
        queries = image[[3, 1600, 2999]]
        # faiss alone, with the parameter stored in the file, finds what Index.search finds
        scores, ids, vectors, _ = clip_back_reads(folder, queries, 5)
        np.testing.assert_array_equal(ids, index.search(queries, 5)[1])
        assert ids[:, 0].tolist() == [3, 1600, 2999]
        np.testing.assert_allclose(vectors[:, 0], queries, atol=0.02)  # decoded codes of the rows themselves
        stored = faiss.read_index(str(folder / "image.index"))
        key, value = next(iter(index.config["search"].items()))
        if key == "nprobe":
            assert faiss.extract_index_ivf(stored).nprobe == value
        else:
            assert faiss.downcast_index(stored.index).hnsw.efSearch == value


def test_the_layout_keeps_whole_embeddings_and_is_rebuilt_not_grown(tmp_path):
    write_collection(tmp_path / "emb", {0: 30}, text=False)
    with pytest.raises(InputError, match="--dims 16: clip-retrieval's back end searches whole embeddings"):
        Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval", dims=16)
    index = Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval")
    write_collection(tmp_path / "emb", {1: 30}, text=False)
    with pytest.raises(InputError, match="not grown in place.*--layout clip-retrieval --rebuild"):
        index.add_parts()
    with pytest.raises(InputError, match="already holds an index"):
        Index.build(tmp_path / "emb", tmp_path / "index")
    rebuilt = Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True)  # back to unicom's layout
    assert rebuilt.layout == "unicom" and len(rebuilt) == 60
    assert not (tmp_path / "index" / "image.index").exists() and Index.load(tmp_path / "index").layout == "unicom"
    assert json.loads((tmp_path / "index" / CONFIG_FILE).read_text())["layout"] == "unicom"


def test_a_folder_of_unicom_index_without_its_index_json_is_an_unfinished_build(tmp_path):
    write_collection(tmp_path / "emb", {0: 30}, text=False)
    built = Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval")
    (tmp_path / "index" / CONFIG_FILE).unlink()  # what a rebuild that did not finish leaves
    with pytest.raises(InputError, match="heldout_ids.npy of `unicom index` but no index.json inside: a build or rebuild "
                                         "that did not finish.*--rebuild"):
        Index.load(tmp_path / "index")
    (tmp_path / "index" / "heldout_ids.npy").unlink()  # as the error says: then it opens as clip-retrieval opens it
    opened = Index.load(tmp_path / "index")
    assert opened.config["written_by"] == "another tool" and len(opened) == len(built)
    assert opened.metadata(29) == {"id": 29, **built.metadata(29)}


# --------------------------------------------------------------------------- metadata in coarse row groups


@pytest.fixture
def coarse_row_groups(monkeypatch, tmp_path):
    """Row groups above 256 rows count as coarse (clip-retrieval writes a million rows in one);
    copies are made in row groups of 64, under a cache of this test's own."""
    from unicom.search import metadata_rows

    monkeypatch.setattr(metadata_rows, "RECHUNK_ABOVE", 256)
    monkeypatch.setattr(metadata_rows, "ROW_GROUP_ROWS", 64)
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "metadata"


def test_metadata_in_coarse_row_groups_is_read_from_a_copy_in_small_ones(autofaiss_folder, coarse_row_groups, tmp_path):
    root, parts = autofaiss_folder
    shutil.copytree(root / "index", tmp_path / "index")
    originals = [tmp_path / "index" / "metadata" / f"metadata_{number}.parquet" for number in sorted(parts, key=str)]
    assert {pq.ParquetFile(file).metadata.num_row_groups for file in originals} == {1}  # 300 to 487 rows in one
    whole = pa.concat_tables([pq.read_table(file) for file in originals]).to_pylist()
    index = Index.load(tmp_path / "index")
    ids = np.random.default_rng(0).integers(0, len(index), size=(6, 10))
    assert index.metadata(ids) == [[{"id": i, **whole[i]} for i in query] for query in ids.tolist()]
    copies = {}
    for file, original in enumerate(originals):
        copy = index.metadata_rows.read_from(file)
        assert copy.parent == coarse_row_groups
        assert pq.read_table(copy).equals(pq.read_table(original))
        rows = pq.ParquetFile(copy).metadata.num_rows
        assert pq.ParquetFile(copy).metadata.num_row_groups == -(-rows // 64)
        copies[file] = copy.stat().st_mtime_ns
    # another process opening the index reads the copies made
    again = Index.load(tmp_path / "index")
    assert again.metadata(ids) == index.metadata(ids)
    assert {file: again.metadata_rows.read_from(file).stat().st_mtime_ns for file in copies} == copies
    # a metadata file written again gets a new copy; the old one goes
    rewritten = pq.read_table(originals[3])
    rewritten = rewritten.set_column(1, "caption", pa.array([f"new {c}" for c in rewritten.column("caption").to_pylist()]))
    pq.write_table(rewritten, originals[3])
    reloaded = Index.load(tmp_path / "index")
    first = sum(pq.ParquetFile(file).metadata.num_rows for file in originals[:3])
    assert reloaded.metadata(first)["caption"] == f"new {whole[first]['caption']}"
    assert reloaded.metadata_rows.read_from(3) != index.metadata_rows.read_from(3)
    made = [reloaded.metadata_rows.read_from(f) for f in copies]  # each beside the lock its makers shared
    assert sorted(coarse_row_groups.iterdir()) == sorted(made + [copy.with_name(f".{copy.name}.lock") for copy in made])


def test_metadata_is_read_as_it_is_where_no_copy_can_be_written(autofaiss_folder, coarse_row_groups, caplog):
    root, parts = autofaiss_folder
    coarse_row_groups.parent.mkdir(parents=True)
    coarse_row_groups.write_text("a file where the copies' folder would be")
    index = Index.load(root / "index")
    keys = [key for number in sorted(parts, key=str) for key in parts[number][2]]
    with caplog.at_level("WARNING"):
        assert [row["key"] for row in index.metadata(np.arange(len(keys)))] == keys
    assert index.metadata_rows.read_from(0) == root / "index" / "metadata" / "metadata_0.parquet"
    assert "read as they are: no copy in smaller ones could be written" in caplog.text


def test_temporaries_of_killed_copies_are_removed_once_stale(autofaiss_folder, coarse_row_groups):
    import os
    import time

    root, _ = autofaiss_folder
    coarse_row_groups.mkdir(parents=True)
    stale = coarse_row_groups / ".0123456789abcdef-0123456789abcdef.parquet.k1ll3d00.tmp"
    running = coarse_row_groups / ".fedcba9876543210-fedcba9876543210.parquet.runn1ng0.tmp"
    for temporary in (stale, running):
        temporary.write_bytes(b"half a copy")
    hours_ago = time.time() - 7200
    os.utime(stale, (hours_ago, hours_ago))
    Index.load(root / "index").metadata(0)
    assert not stale.exists() and running.exists()
