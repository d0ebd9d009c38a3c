"""unicom dedup: near-duplicate pairs found exactly, groups kept once, overlap with a test set."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_evaluate_cli import embedding_folder

from unicom.cli import main
from unicom.dedup import OUTPUT_NAMES
from unicom.evaluate.metrics import pairs_above


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_pairs(x, y=None, threshold=0.95) -> set[tuple[int, int]]:
    """Every (i, j) with cosine >= threshold, by a plain double loop (i < j within ``x``)."""
    x = unit(x)
    other = x if y is None else unit(y)
    return {(i, j) for i in range(len(x)) for j in range(len(other))
            if (y is not None or i < j) and float(x[i] @ other[j]) >= threshold}


def reference_groups(n: int, pairs) -> list[int]:
    """The lowest row reachable from each row through the pairs (a plain flood fill)."""
    neighbours = {i: set() for i in range(n)}
    for i, j in pairs:
        neighbours[i].add(j)
        neighbours[j].add(i)
    first = list(range(n))
    for start in range(n):
        seen, todo = {start}, [start]
        while todo:
            for other in neighbours[todo.pop()] - seen:
                seen.add(other)
                todo.append(other)
        first[start] = min(seen)
    return first


def collection(seed: int = 0, n: int = 60, d: int = 12) -> np.ndarray:
    """Random rows, with copies planted: a chain 5 ~ 17 ~ 33 (17 near both, 5 and 33 farther
    apart), an exact copy 40 = 8, and 50 near 2."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[17] = x[5] + 0.25 * rng.standard_normal(d)
    x[33] = x[17] + 0.25 * rng.standard_normal(d)
    x[40] = x[8]
    x[50] = x[2] + 0.1 * rng.standard_normal(d)
    return x.astype(np.float32)


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97])
def test_pairs_above_equals_a_double_loop(threshold, chunk_size):
    x = collection()
    rows, matches, similarities = pairs_above(x, threshold=threshold, chunk_size=chunk_size)
    assert set(zip(rows.tolist(), matches.tolist())) == reference_pairs(x, threshold=threshold)
    assert list(zip(rows, matches)) == sorted(zip(rows, matches))  # by row, then match
    np.testing.assert_allclose(similarities, [unit(x)[i] @ unit(x)[j] for i, j in zip(rows, matches)], atol=1e-6)
    y = collection(seed=1)[:25]
    rows, matches, _ = pairs_above(x, y, threshold=threshold / 2, chunk_size=chunk_size)
    assert set(zip(rows.tolist(), matches.tolist())) == reference_pairs(x, y, threshold / 2)


def test_pairs_above_stops_at_the_most_pairs_allowed():
    x = np.ones((30, 4), np.float32)  # 435 pairs of identical rows
    with pytest.raises(Exception, match=r"more than 100 pairs have a cosine similarity of 0\.9 or more"):
        pairs_above(x, threshold=0.9, max_pairs=100, chunk_size=4)
    assert len(pairs_above(x, threshold=0.9, max_pairs=435)[0]) == 435


def test_a_hand_computed_collection(tmp_path, capsys):
    """Rows a and c at cosine 0.965, c and d at 0.985 (a and d at 0.905), b alone: one group
    {a, c, d} keeps a and lists c (nearest d, 0.985) and d (nearest c); from 0.97 only d goes,
    from 0.99 none (the folder holds float16: 1e-3 of rounding)."""
    angles = np.cumsum([0.0, np.arccos(0.965), np.arccos(0.985)])
    x = np.stack([np.cos(angles), np.sin(angles)], 1)
    x = np.insert(x, 1, [0.0, -1.0], axis=0).astype(np.float32)  # b
    embedding_folder(tmp_path / "emb", x, ["a", "b", "c", "d"], parts=2)
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "out"), "--threshold", "0.95"]) == 0
    duplicates = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pydict()
    assert duplicates["key"] == ["c", "d"] and duplicates["row"] == [2, 3]
    assert duplicates["kept_key"] == ["a", "a"] and duplicates["kept_row"] == [0, 0]
    assert duplicates["match_key"] == ["d", "c"]
    np.testing.assert_allclose(duplicates["similarity"], [0.985, 0.985], atol=1e-3)
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pydict()
    assert list(zip(pairs["key"], pairs["match_key"])) == [("a", "c"), ("c", "d")]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["rows"], summary["pairs"], summary["groups"], summary["left_out"], summary["kept"]) == (4, 2, 1, 2, 2)
    by = {row["threshold"]: (row["pairs"], row["left_out"]) for row in summary["by_threshold"]}
    assert by[0.95] == by[0.96] == (2, 2) and by[0.97] == by[0.98] == (1, 1) and by[0.99] == by[1.0] == (0, 0)
    out = capsys.readouterr().out
    assert "2 pairs join 1 groups of near duplicates" in out and "| 0.97 | 1 | 1 |" in out
    assert (tmp_path / "out" / "summary.md").read_text() in out


def test_groups_and_nearest_matches_equal_a_plain_walk(tmp_path):
    x = collection()
    keys = [f"img{i:03d}" for i in range(len(x))]
    embedding_folder(tmp_path / "emb", x, keys, parts=3)
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "out"), "--threshold", "0.9",
                 "--chunk-size", "8"]) == 0
    x16 = unit(x.astype(np.float16))  # as the folder holds them
    pairs = reference_pairs(x16, threshold=0.9)
    assert {(5, 17), (17, 33), (8, 40), (2, 50)} <= pairs
    first = reference_groups(len(x), pairs)
    duplicates = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pydict()
    assert duplicates["row"] == [i for i in range(len(x)) if first[i] != i]
    assert duplicates["kept_row"] == [first[i] for i in duplicates["row"]]
    assert duplicates["key"] == [keys[i] for i in duplicates["row"]]
    similarity = x16 @ x16.T
    for row, match, value in zip(duplicates["row"], duplicates["match_row"], duplicates["similarity"]):
        others = [j for j in range(len(x)) if j != row and ((row, j) in pairs or (j, row) in pairs)]
        assert match == max(others, key=lambda j: (similarity[row, j], -j))
        assert value == pytest.approx(similarity[row, match], abs=1e-6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for step in summary["by_threshold"]:
        stricter = reference_pairs(x16, threshold=step["threshold"])
        groups = reference_groups(len(x), stricter)
        assert step["pairs"] == len(stricter)
        assert step["left_out"] == sum(groups[i] != i for i in range(len(x)))


def test_rows_that_copy_a_test_set(tmp_path):
    train, rng = collection(), np.random.default_rng(4)
    test = np.concatenate([train[[5, 40]] + 0.05 * rng.standard_normal((2, 12)), rng.standard_normal((6, 12))])
    embedding_folder(tmp_path / "train", train, [f"t{i}" for i in range(len(train))], parts=2)
    embedding_folder(tmp_path / "test", test.astype(np.float32), [f"q{i}" for i in range(len(test))], parts=1)
    assert main(["dedup", "--emb", str(tmp_path / "train"), "--against", str(tmp_path / "test"),
                 "--out", str(tmp_path / "out"), "--threshold", "0.9"]) == 0
    a, b = unit(train.astype(np.float16)), unit(test.astype(np.float32).astype(np.float16))
    pairs = reference_pairs(a, b, 0.9)
    listed = sorted({i for i, _ in pairs})
    assert {5, 8, 40} <= set(listed)  # 8 is 40's exact copy
    duplicates = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pydict()
    assert duplicates["row"] == listed and "kept_row" not in duplicates
    assert duplicates["match_key"] == [f"q{max((j for i, j in pairs if i == row), key=lambda j: (a[row] @ b[j], -j))}"
                                       for row in listed]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["against_rows"] == 8 and summary["left_out"] == len(listed) and summary["groups"] is None


def test_a_rerun_replaces_the_set_and_leaves_no_temporary(tmp_path):
    embedding_folder(tmp_path / "emb", collection(), [f"k{i}" for i in range(60)], parts=1)
    out = tmp_path / "out"
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--out", str(out), "--threshold", "0.5"]) == 0
    (out / ".pairs.parquet.abcdefgh.tmp").write_bytes(b"what a killed run left")
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--out", str(out), "--threshold", "0.99"]) == 0
    assert sorted(os.listdir(out)) == sorted(OUTPUT_NAMES)
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.99
    assert pq.read_table(out / "pairs.parquet").num_rows == len(reference_pairs(
        unit(collection().astype(np.float16)), threshold=0.99))


@pytest.mark.parametrize("case, message", [
    ("threshold", r"threshold 1\.5: a cosine similarity, between -1 and 1"),
    ("itself", r"is --emb itself: leave --against out"),
    ("dimension", r"holds 6-dimensional embeddings and .* 12-dimensional ones"),
    ("weights", r"was embedded by other weights than .* \(weights_sha256 bbbbbbbbbbbb… against aaaaaaaaaaaa…\)"),
    ("flip", r"emb was embedded with the images alone \(no --flip, no --scales\) and .*other \(--against\) with "
             r"each image averaged with its mirror image \(--flip\): a copy in both would not score as one"),
    ("zero row", r"1 of the rows used hold NaN or infinite values or are all zeros, e\.g\. 'k3' \(row 3\)"),
    ("max pairs", r"more than 10 pairs have a cosine similarity of 0\.95 or more"),
    ("no metadata", r"no metadata/ folder"),
])
def test_refusals_name_what_to_do(case, message, tmp_path, capsys):
    from unicom.formats.embeddings import write_config

    x = collection()
    emb, other = tmp_path / "emb", tmp_path / "other"
    embedding_folder(emb, x, [f"k{i}" for i in range(60)], parts=1)
    embedding_folder(other, x[:, :6] if case == "dimension" else x, [f"o{i}" for i in range(60)], parts=1)
    argv = ["dedup", "--emb", str(emb), "--out", str(tmp_path / "out")]
    if case == "threshold":
        argv += ["--threshold", "1.5"]
    elif case == "itself":
        argv += ["--against", str(emb)]
    elif case in ("dimension", "weights"):
        argv += ["--against", str(other)]
        write_config(emb, {"weights_sha256": "a" * 64})
        write_config(other, {"weights_sha256": "b" * 64})
    elif case == "flip":  # the same weights, embedded another way
        argv += ["--against", str(other)]
        write_config(emb, {"weights_sha256": "a" * 64})
        write_config(other, {"weights_sha256": "a" * 64, "flip": True})
    elif case == "zero row":
        embedding_folder(emb, np.where(np.arange(60)[:, None] == 3, 0, x).astype(np.float32),
                         [f"k{i}" for i in range(60)], parts=1)
    elif case == "max pairs":
        embedding_folder(emb, np.ones((20, 4), np.float32), [f"k{i}" for i in range(20)], parts=1)
        argv += ["--max-pairs", "10"]
    elif case == "no metadata":
        for file in (emb / "metadata").iterdir():
            file.unlink()
        (emb / "metadata").rmdir()
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "summary.json").exists()


# --------------------------------------------------------------------------- through an index, a block at a time


def build_index(emb, out, *options) -> None:
    assert main(["index", "--emb", str(emb), "--out", str(out), "--heldout", "10", *options]) == 0


def dedup_files(out) -> tuple[dict, dict, dict]:
    return (pq.read_table(out / "pairs.parquet").to_pydict(), pq.read_table(out / "duplicates.parquet").to_pydict(),
            json.loads((out / "summary.json").read_text()))


@pytest.mark.parametrize("index_type, layout", [("flat", "unicom"), ("hnsw", "unicom"), ("flat", "clip-retrieval")])
def test_through_an_index_the_pairs_of_the_exact_search(index_type, layout, tmp_path, monkeypatch):
    """A flat index is searched exactly, and an HNSW graph of 60 rows holds every link: the
    same pairs, groups and files as the exact search, with the folder read 7 rows at a time,
    in either layout of the index."""
    import unicom.dedup

    x = collection()
    keys = [f"img{i:03d}" for i in range(len(x))]
    embedding_folder(tmp_path / "emb", x, keys, parts=3)
    build_index(tmp_path / "emb", tmp_path / "index", "--type", index_type, "--layout", layout)
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "exact"), "--threshold", "0.9"]) == 0
    monkeypatch.setattr(unicom.dedup, "BLOCK_ROWS", 7)
    assert main(["dedup", "--emb", str(tmp_path / "emb"), "--index", str(tmp_path / "index"),
                 "--out", str(tmp_path / "indexed"), "--threshold", "0.9"]) == 0
    exact, indexed = dedup_files(tmp_path / "exact"), dedup_files(tmp_path / "indexed")
    x16 = unit(x.astype(np.float16))
    assert set(zip(indexed[0]["row"], indexed[0]["match_row"])) == reference_pairs(x16, threshold=0.9)
    for table_exact, table_indexed in zip(exact[:2], indexed[:2]):
        assert {k: v for k, v in table_exact.items() if k != "similarity"} == \
               {k: v for k, v in table_indexed.items() if k != "similarity"}
        np.testing.assert_allclose(table_indexed["similarity"], table_exact["similarity"], atol=1e-5)
    # the exact copy 8 = 40 scores 1 within float32 rounding either way: the step at 1 may count it or not
    assert exact[2]["by_threshold"][:-1] == indexed[2]["by_threshold"][:-1]
    assert exact[2]["search"]["method"] == "exact"  # on this machine's GPU, or its CPU
    search = indexed[2]["search"]
    assert (search["method"], search["type"], search["dims"]) == ("index", index_type, 12)
    assert search["index"] == str((tmp_path / "index").resolve())


def planted_copies(folder) -> np.ndarray:
    """1,200 random 16-d rows, 60 of them copies of others at varied distances, written to
    ``folder`` in 2 parts; returned."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1200, 16)).astype(np.float32)
    copies = rng.choice(1200, 60, replace=False)
    x[copies] = x[rng.integers(0, 1200, 60)] + rng.uniform(0.02, 0.6, (60, 1)) * rng.standard_normal((60, 16))
    embedding_folder(folder, x, [f"k{i}" for i in range(1200)], parts=2)
    return x


def test_through_a_compressed_index_the_pairs_it_scores_above_the_threshold(tmp_path):
    """An IVF index of 8-bit codes searching all its lists: every pair clearly above the
    threshold found, none clearly below, its scores within the codes' rounding of the exact
    ones; one list searched of 8 finds a subset of those pairs."""
    x = planted_copies(tmp_path / "emb")
    build_index(tmp_path / "emb", tmp_path / "index", "--type", "ivfsq", "--nlist", "8")
    found = {}
    for nprobe in (8, 1):
        out = tmp_path / f"nprobe{nprobe}"
        assert main(["dedup", "--emb", str(tmp_path / "emb"), "--index", str(tmp_path / "index"), "--nprobe",
                     str(nprobe), "--out", str(out), "--threshold", "0.9"]) == 0
        pairs, _, summary = dedup_files(out)
        assert summary["search"]["nprobe"] == nprobe and summary["search"]["type"] == "ivfsq"
        found[nprobe] = {(i, j): s for i, j, s in zip(pairs["row"], pairs["match_row"], pairs["similarity"])}
    x16 = unit(x.astype(np.float16))
    exact = x16 @ x16.T
    clear = {pair for pair in reference_pairs(x16, threshold=0.93)}
    assert len(clear) >= 40 and clear <= set(found[8])
    for (i, j), score in found[8].items():
        assert i < j and exact[i, j] >= 0.87 and abs(score - exact[i, j]) < 0.03
    assert set(found[1]) <= set(found[8]) and len(found[1]) < len(found[8])


def test_refusals_of_an_index_that_is_not_the_folders(tmp_path, capsys):
    from unicom.formats.embeddings import write_config, write_part

    x = collection()
    emb, other = tmp_path / "emb", tmp_path / "other"
    embedding_folder(emb, x, [f"k{i}" for i in range(60)], parts=2)
    embedding_folder(other, x[:50], [f"o{i}" for i in range(50)], parts=2)
    build_index(emb, tmp_path / "index", "--type", "flat")
    build_index(other, tmp_path / "other_index", "--type", "flat")
    argv = ["dedup", "--emb", str(emb), "--out", str(tmp_path / "out")]
    cases = [
        (["--index", str(tmp_path / "other_index")], r"--index .*other_index was not built from --emb .*emb as it is now: "
                                                     r"its parts \(number, rows\) \[\(0, 25\), \(1, 25\)\] are not those"),
        (["--index", str(tmp_path / "index"), "--against", str(other)], r"--index searches within --emb; with --against"),
        (["--nprobe", "4"], r"--nprobe and --ef-search set the search of an index: give --index INDEX"),
        (["--index", str(tmp_path / "index"), "--nprobe", "0"], r"--nprobe 0: give a positive number"),
    ]
    for options, message in cases:
        assert main(argv + options) == 2
        assert re.search(message, capsys.readouterr().err), options
    write_part(emb, 2, image=x[:5].astype(np.float16), metadata=pa.table({"key": [f"n{i}" for i in range(5)]}))
    assert main(argv + ["--index", str(tmp_path / "index")]) == 2
    assert re.search(r"it lacks parts 2 of --emb; build it with `unicom index --emb", capsys.readouterr().err)
    build_index(emb, tmp_path / "index")  # adds part 2
    write_config(emb, {"weights_sha256": "a" * 64})
    config = json.loads((tmp_path / "index" / "index.json").read_text())
    config["model"] = {"spec": "ViT-B/32", "weights_sha256": "b" * 64}
    (tmp_path / "index" / "index.json").write_text(json.dumps(config))
    assert main(argv + ["--index", str(tmp_path / "index")]) == 2
    assert re.search(r"holds embeddings of other weights than --emb .* \(weights_sha256 bbbbbbbbbbbb… against aaaaaaaaaaaa…\)",
                     capsys.readouterr().err)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_through_an_index_the_most_pairs_allowed(tmp_path, capsys):
    embedding_folder(tmp_path / "emb", np.ones((20, 4), np.float32), [f"k{i}" for i in range(20)], parts=1)
    build_index(tmp_path / "emb", tmp_path / "index", "--type", "flat")
    argv = ["dedup", "--emb", str(tmp_path / "emb"), "--index", str(tmp_path / "index"), "--out", str(tmp_path / "out")]
    assert main(argv + ["--max-pairs", "100"]) == 2  # 190 pairs
    assert "more than 100 pairs have a cosine similarity of 0.95 or more" in capsys.readouterr().err
    assert main(argv + ["--max-pairs", "190"]) == 0
    _, duplicates, summary = dedup_files(tmp_path / "out")
    assert summary["pairs"] == 190 and duplicates["kept_row"] == [0] * 19


def test_rows_that_copy_a_test_set_read_a_few_rows_at_a_time(tmp_path, monkeypatch):
    import unicom.dedup

    train, rng = collection(), np.random.default_rng(5)
    test = np.concatenate([train[[2, 17, 40]] + 0.05 * rng.standard_normal((3, 12)), rng.standard_normal((5, 12))])
    embedding_folder(tmp_path / "train", train, [f"t{i}" for i in range(len(train))], parts=3)
    embedding_folder(tmp_path / "test", test.astype(np.float32), [f"q{i}" for i in range(len(test))], parts=2)
    monkeypatch.setattr(unicom.dedup, "BLOCK_ROWS", 6)
    assert main(["dedup", "--emb", str(tmp_path / "train"), "--against", str(tmp_path / "test"),
                 "--out", str(tmp_path / "out"), "--threshold", "0.8", "--chunk-size", "4"]) == 0
    a, b = unit(train.astype(np.float16)), unit(test.astype(np.float32).astype(np.float16))
    pairs = reference_pairs(a, b, 0.8)
    found, duplicates, _ = dedup_files(tmp_path / "out")
    assert set(zip(found["row"], found["match_row"])) == pairs
    assert found["key"] == [f"t{i}" for i in found["row"]] and found["match_key"] == [f"q{j}" for j in found["match_row"]]
    assert duplicates["row"] == sorted({i for i, _ in pairs}) and {2, 17, 40} <= set(duplicates["row"])


# --------------------------------------------------------------------------- which row a group keeps


def folder_with_columns(root, x: np.ndarray, columns: dict, parts: int = 2):
    """``x`` as an embedding folder of ``parts`` parts whose metadata holds ``columns`` (one value per row)."""
    from unicom.formats.embeddings import write_part

    for number, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        write_part(root, number, image=x[rows].astype(np.float16),
                   metadata=pa.table({name: [values[i] for i in rows] for name, values in columns.items()}))
    return root


def test_a_group_keeps_its_widest_or_its_narrowest_row(tmp_path, capsys):
    """The hand-computed collection (one group {a, c, d}, b alone): widths 10, 99, 30, 20 keep
    c with --keep-largest (a and d listed, nearest c and c), a with --keep-smallest; equal
    widths keep the first."""
    angles = np.cumsum([0.0, np.arccos(0.965), np.arccos(0.985)])
    x = np.insert(np.stack([np.cos(angles), np.sin(angles)], 1), 1, [0.0, -1.0], axis=0).astype(np.float32)
    for widths, option, kept, listed, nearest in [([10, 99, 30, 20], "--keep-largest", "c", ["a", "d"], ["c", "c"]),
                                                  ([10, 99, 30, 20], "--keep-smallest", "a", ["c", "d"], ["d", "c"]),
                                                  ([30, 1, 30, 20], "--keep-largest", "a", ["c", "d"], ["d", "c"]),
                                                  ([30.5, 1.0, 12.0, 30.5], "--keep-largest", "a", ["c", "d"],
                                                   ["d", "c"])]:
        emb = folder_with_columns(tmp_path / f"emb{len(list(tmp_path.iterdir()))}", x,
                                  {"key": ["a", "b", "c", "d"], "width": widths})
        assert main(["dedup", "--emb", str(emb), "--out", str(tmp_path / "out"), option, "width"]) == 0
        duplicates = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pydict()
        assert duplicates["key"] == listed and duplicates["kept_key"] == [kept, kept], (widths, option)
        assert duplicates["match_key"] == nearest  # each listed row's most similar other member
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["keep"] == {"by": "width", "largest": option == "--keep-largest"}
        assert (summary["left_out"], summary["kept"], summary["groups"]) == (2, 2, 1)
    out = capsys.readouterr().out
    assert "the row of each group with the smallest width is kept (equal values: the first)" in out


def test_the_row_kept_equals_a_plain_walk_of_the_groups(tmp_path):
    x = collection(n=90)
    rng = np.random.default_rng(7)
    x[60:90] = x[rng.integers(0, 60, 30)] + 0.2 * rng.standard_normal((30, 12)).astype(np.float32)  # more groups
    scores = rng.integers(0, 3, len(x)).astype(np.int64)  # many equal scores
    emb = folder_with_columns(tmp_path / "emb", x, {"key": [f"k{i}" for i in range(len(x))], "score": scores}, parts=3)
    assert main(["dedup", "--emb", str(emb), "--out", str(tmp_path / "out"), "--threshold", "0.9",
                 "--keep-largest", "score"]) == 0
    first = reference_groups(len(x), reference_pairs(unit(x.astype(np.float16)), threshold=0.9))
    groups = {}
    for row, head in enumerate(first):
        groups.setdefault(head, []).append(row)
    kept = {head: max(members, key=lambda row: (scores[row], -row)) for head, members in groups.items()}
    assert sum(kept[head] != head for head in groups if len(groups[head]) > 1) >= 3  # not merely the first rows
    duplicates = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pydict()
    expected = [row for row in range(len(x)) if kept[first[row]] != row]
    assert duplicates["row"] == expected
    assert duplicates["kept_row"] == [kept[first[row]] for row in expected]
    assert duplicates["kept_key"] == [f"k{kept[first[row]]}" for row in expected]


@pytest.mark.parametrize("case, message", [
    ("against", r"--keep-largest width picks the row a group of near duplicates keeps; with --against"),
    ("no column", r"metadata_0\.parquet: no column 'height' for --keep-largest height \(columns: key, width, name\)"),
    ("text column", r"metadata_0\.parquet: column 'name' holds string, not numbers; --keep-largest name compares"),
    ("missing value", r"column 'width' \(--keep-largest width\) has no value for 1 of the rows compared, e\.g\. 'k40' "
                      r"\(row 40\); fill it in"),
    ("both", r"argument --keep-smallest: not allowed with argument --keep-largest"),
])
def test_refusals_of_the_row_kept(case, message, tmp_path, capsys):
    x = collection()
    widths = [None if case == "missing value" and i == 40 else float(i) for i in range(60)]
    emb = folder_with_columns(tmp_path / "emb", x, {"key": [f"k{i}" for i in range(60)], "width": widths,
                                                    "name": [f"n{i}" for i in range(60)]})
    column = {"no column": "height", "text column": "name"}.get(case, "width")
    argv = ["dedup", "--emb", str(emb), "--out", str(tmp_path / "out"), "--threshold", "0.9", "--keep-largest", column]
    if case == "against":
        argv += ["--against", str(folder_with_columns(tmp_path / "test", x[:5], {"key": list("abcde")}, parts=1))]
    if case == "both":
        with pytest.raises(SystemExit, match="2"):  # refused by the parser
            main(argv + ["--keep-smallest", "width"])
    else:
        assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "summary.json").exists()


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the search there")
def test_a_gpu_asked_for_without_one_and_a_device_with_an_index_are_refused(tmp_path, capsys):
    embedding_folder(tmp_path / "emb", collection(), [f"k{i}" for i in range(60)], parts=1)
    argv = ["dedup", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "out")]
    assert main(argv + ["--device", "cuda"]) == 2
    assert "--device='cuda' but CUDA is not available; use --device=cpu" in capsys.readouterr().err
    assert main(argv + ["--device", "cpu", "--index", str(tmp_path / "index")]) == 2
    assert "an index (--index) is searched by faiss on the CPU: leave --device out" in capsys.readouterr().err
    assert main(argv) == 0  # the default: the CPU here
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["search"] == {"method": "exact", "device": "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_exact_search_on_cuda_finds_the_pairs_of_the_cpu(tmp_path):
    x = collection(n=3000, d=64)
    train = collection(seed=2, n=500, d=64)
    embedding_folder(tmp_path / "emb", x, [f"k{i}" for i in range(len(x))], parts=3)
    embedding_folder(tmp_path / "test", train, [f"t{i}" for i in range(len(train))], parts=1)
    for against in (None, tmp_path / "test"):
        runs = {}
        for device in ("cpu", "cuda"):
            out = tmp_path / f"{device}_{against is None}"
            argv = ["dedup", "--emb", str(tmp_path / "emb"), "--out", str(out), "--threshold", "0.5", "--device", device]
            assert main(argv + ([] if against is None else ["--against", str(against)])) == 0
            runs[device] = dedup_files(out)
        assert runs["cuda"][2]["search"]["device"].startswith("cuda")
        for cpu, cuda in zip(runs["cpu"][:2], runs["cuda"][:2]):
            assert {k: v for k, v in cpu.items() if k != "similarity"} == {k: v for k, v in cuda.items() if k != "similarity"}
            np.testing.assert_allclose(cuda["similarity"], cpu["similarity"], atol=1e-5)


# --------------------------------------------------------------------------- the captions' embeddings


def test_the_captions_near_duplicates_exactly_and_through_their_index(tmp_path, capsys):
    """--modality text compares the text_emb/ rows: the pairs of a plain double loop on them
    (not on the images'), exactly and through the text.index of a clip-retrieval layout."""
    from unicom.formats.embeddings import write_part

    images, texts = collection(seed=3), collection(seed=4)[::-1].copy()  # other rows, other planted pairs
    for number, rows in enumerate(np.array_split(np.arange(60), 2)):
        write_part(tmp_path / "emb", number, image=images[rows].astype(np.float16), text=texts[rows].astype(np.float16),
                   metadata=pa.table({"key": [f"k{i}" for i in rows]}))
    expected = reference_pairs(unit(texts.astype(np.float16)), threshold=0.9)
    assert expected != reference_pairs(unit(images.astype(np.float16)), threshold=0.9)
    build_index(tmp_path / "emb", tmp_path / "index", "--type", "flat", "--layout", "clip-retrieval")
    for out, options in (("exact", []), ("indexed", ["--index", str(tmp_path / "index")])):
        assert main(["dedup", "--emb", str(tmp_path / "emb"), "--modality", "text", "--threshold", "0.9",
                     "--out", str(tmp_path / out), *options]) == 0
        pairs, _, summary = dedup_files(tmp_path / out)
        assert set(zip(pairs["row"], pairs["match_row"])) == expected, out
        assert summary["modality"] == "text"
    assert "60 caption embeddings of" in capsys.readouterr().out
    embedding_folder(tmp_path / "images_only", images, [f"k{i}" for i in range(60)], parts=2)
    build_index(tmp_path / "images_only", tmp_path / "image_index", "--type", "flat")
    argv = ["dedup", "--modality", "text", "--out", str(tmp_path / "out")]
    assert main(argv + ["--emb", str(tmp_path / "images_only")]) == 2
    assert "images_only: holds no text embeddings (it has image, metadata)" in capsys.readouterr().err
    assert main(argv + ["--emb", str(tmp_path / "emb"), "--index", str(tmp_path / "image_index")]) == 2
    assert re.search(r"--index .*image_index: holds no index of text embeddings \(only of image\)",
                     capsys.readouterr().err)


def test_a_sample_checked_exactly_measures_the_pairs_an_index_finds(tmp_path, capsys):
    """Every row sampled: the exact pairs are the double loop's, and the index's share of them
    (one list of 8 scanned: some missed) and its pairs beyond them are counted as by hand; a
    flat index finds every pair of a partial sample and none more."""
    x = planted_copies(tmp_path / "emb")
    build_index(tmp_path / "emb", tmp_path / "ivf", "--type", "ivfsq", "--nlist", "8")
    build_index(tmp_path / "emb", tmp_path / "flat", "--type", "flat")
    argv = ["dedup", "--emb", str(tmp_path / "emb"), "--threshold", "0.9"]
    assert main(argv + ["--index", str(tmp_path / "ivf"), "--nprobe", "1", "--check-sample", "5000",
                        "--out", str(tmp_path / "ivf_out")]) == 0
    pairs, _, summary = dedup_files(tmp_path / "ivf_out")
    found = set(zip(pairs["row"], pairs["match_row"]))
    exact = reference_pairs(unit(x.astype(np.float16)), threshold=0.9)
    check = summary["sample_check"]
    assert (check["rows"], check["exact_pairs"]) == (1200, len(exact))
    assert check["found"] == len(found & exact) < len(exact) and check["extra"] == len(found - exact)
    assert check["recall"] == pytest.approx(len(found & exact) / len(exact))
    assert f"Checked exactly on 1,200 sampled rows: the index found {check['found']:,} of their {len(exact):,} pairs (" \
           in capsys.readouterr().out
    assert main(argv + ["--index", str(tmp_path / "flat"), "--check-sample", "300", "--out", str(tmp_path / "flat_out")]) == 0
    check = dedup_files(tmp_path / "flat_out")[2]["sample_check"]
    assert check["rows"] == 300 and check["exact_pairs"] > 0 and check["recall"] == 1.0 and check["extra"] == 0
    assert main(argv + ["--check-sample", "10", "--out", str(tmp_path / "out")]) == 2
    assert "--check-sample measures how many pairs an index finds" in capsys.readouterr().err


def test_captions_against_another_folder_need_the_same_text_model(tmp_path, capsys):
    from unicom.formats.embeddings import write_config, write_part

    texts, other = collection(seed=4), collection(seed=4)[:20] + 0.01
    for root, rows, prefix in ((tmp_path / "train", texts, "t"), (tmp_path / "test", other, "q")):
        write_part(root, 0, image=rows.astype(np.float16), text=rows.astype(np.float16),
                   metadata=pa.table({"key": [f"{prefix}{i}" for i in range(len(rows))]}))
    argv = ["dedup", "--emb", str(tmp_path / "train"), "--against", str(tmp_path / "test"), "--modality", "text",
            "--threshold", "0.99", "--out", str(tmp_path / "out")]
    write_config(tmp_path / "train", {"weights_sha256": "a" * 64, "text_model": "m-clip", "text_model_sha256": "c" * 64})
    write_config(tmp_path / "test", {"weights_sha256": "a" * 64, "text_model": "m-clip", "text_model_sha256": "d" * 64})
    assert main(argv) == 2  # the same CLIP, but the captions of another text model
    assert "(weights_sha256 dddddddddddd… against cccccccccccc…)" in capsys.readouterr().err
    write_config(tmp_path / "test", {"weights_sha256": "b" * 64, "text_model": "m-clip", "text_model_sha256": "c" * 64})
    assert main(argv) == 0  # another image model does not matter to the captions
    pairs, duplicates, summary = dedup_files(tmp_path / "out")
    expected = reference_pairs(unit(texts.astype(np.float16)), unit(other.astype(np.float16)), 0.99)
    assert set(zip(pairs["row"], pairs["match_row"])) == expected
    assert duplicates["row"] == sorted({i for i, _ in expected}) and set(range(20)) <= set(duplicates["row"])
    assert summary["modality"] == "text"
