"""`unicom evaluate`: scoring a subset of the classes, and dimensions at which rows vanish."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

from unicom.cli import main
from unicom.formats.embeddings import write_part


def folder(root, x, labels, prefix):
    for number, rows in enumerate(np.array_split(np.arange(len(x)), 2)):
        write_part(root, number, image=x[rows].astype(np.float16),
                   metadata=pa.table({"key": [f"{prefix}{i}" for i in rows], "label": [labels[i] for i in rows]}))
    return root


def data(n, dim, classes, noise, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.standard_normal((classes, dim))[labels] + noise * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


def by_numpy(q, ql, g=None, gl=None, ks=(1, 4)):
    """Recall@K and R-precision by brute force: rank the gallery by cosine, read the labels."""
    leave_one_out = g is None
    if leave_one_out:
        g, gl = q, ql
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = qn @ gn.T
    if leave_one_out:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    if leave_one_out:
        order = order[:, :-1]  # the query itself, ranked last
    relevant = gl[order] == ql[:, None]
    r = relevant.sum(1)
    scored = r > 0
    result = {f"recall@{k}": relevant[scored, :k].any(1).mean() for k in ks}
    result["r_precision"] = np.mean([relevant[i, :r[i]].sum() / r[i] for i in np.flatnonzero(scored)])
    result["n_queries"] = int(scored.sum())
    return result


def stored(x):
    return x.astype(np.float16).astype(np.float32)  # the folders hold float16


def test_classes_limit_queries_and_gallery(tmp_path, capsys):
    q, ql = data(60, 16, 6, 1.6, seed=0)
    g, gl = data(120, 16, 6, 1.6, seed=0)
    g = g + 0.3 * np.random.default_rng(1).standard_normal(g.shape).astype(np.float32)
    folder(tmp_path / "q", q, ql.tolist(), "q")
    folder(tmp_path / "g", g, gl.tolist(), "g")
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 "--classes", "2,5", "--ks", "1,4", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    qm, gm = np.isin(ql, [2, 5]), np.isin(gl, [2, 5])
    expected = by_numpy(stored(q)[qm], ql[qm], stored(g)[gm], gl[gm])
    for name, value in expected.items():
        assert report["metrics"][name] == pytest.approx(value), name
    whole_gallery = by_numpy(stored(q)[qm], ql[qm], stored(g), gl)
    assert report["metrics"]["r_precision"] != pytest.approx(whole_gallery["r_precision"])  # the gallery is limited too
    assert report["protocol"]["queries"] == qm.sum() and report["protocol"]["gallery"] == gm.sum()
    assert report["class_subset"] == {"classes": ["2", "5"], "scored_classes": 2, "all_classes": 6}
    assert "Scored on 2 of 6 classes: only 2, 5" in (out / "metrics.md").read_text()


def test_excluded_classes_from_a_file_leave_one_out(tmp_path):
    x, labels = data(80, 12, 8, 1.2, seed=2)
    names = np.array(["cat", "dog", "owl", "elk", "emu", "yak", "ant", "bee"])[labels]
    folder(tmp_path / "q", x, names.tolist(), "q")
    (tmp_path / "drop.txt").write_text("# classes too easy to count\ndog\n\nowl\n")
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--exclude-classes", f"@{tmp_path / 'drop.txt'}",
                 "--ks", "1,4", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    keep = ~np.isin(names, ["dog", "owl"])
    expected = by_numpy(stored(x)[keep], names[keep])
    for name, value in expected.items():
        assert report["metrics"][name] == pytest.approx(value), name
    assert report["class_subset"] == {"exclude_classes": ["dog", "owl"], "scored_classes": 6, "all_classes": 8}


def test_a_class_file_saved_with_a_byte_order_mark_names_its_first_class(tmp_path, capsys):
    # as a Windows editor saves it: a byte-order mark before the first name, CRLF line ends
    x, labels = data(40, 12, 4, 1.0, seed=3)
    names = np.array(["cat", "dog", "owl", "elk"])[labels]
    folder(tmp_path / "q", x, names.tolist(), "q")
    (tmp_path / "keep.txt").write_bytes(b"\xef\xbb\xbfdog\r\nowl\r\n")
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--classes", f"@{tmp_path / 'keep.txt'}",
                 "--dims", "none", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["class_subset"]["classes"] == ["dog", "owl"]
    (tmp_path / "latin1.txt").write_bytes(b"dog\nb\xe9b\xe9\n")
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--classes", f"@{tmp_path / 'latin1.txt'}",
                 "--dims", "none", "--out", str(out)]) == 2
    assert "latin1.txt: line 2 (byte 5, b'\\xe9') is not UTF-8" in capsys.readouterr().err


def test_class_names_of_a_labels_file_select_classes(tmp_path):
    """--labels with names (key,label = q0,cat): --classes names them as it names the
    metadata's string labels, rather than by the numbers the file's names were mapped to."""
    x, labels = data(80, 12, 8, 1.2, seed=4)
    names = np.array(["cat", "dog", "owl", "elk", "emu", "yak", "ant", "bee"])[labels]
    folder(tmp_path / "q", x, labels.tolist(), "q")  # the metadata's own labels are numbers
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"q{i},{name}\n" for i, name in enumerate(names)))
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--labels", str(tmp_path / "labels.csv"),
                 "--classes", "owl,yak", "--ks", "1,4", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    keep = np.isin(names, ["owl", "yak"])
    expected = by_numpy(stored(x)[keep], names[keep])
    for name, value in expected.items():
        assert report["metrics"][name] == pytest.approx(value), name
    assert report["class_subset"] == {"classes": ["owl", "yak"], "scored_classes": 2, "all_classes": 8}


def test_unknown_classes_are_named(tmp_path, capsys):
    x, labels = data(40, 8, 4, 1.0, seed=3)
    folder(tmp_path / "q", x, labels.tolist(), "q")
    code = main(["evaluate", "--embeddings", str(tmp_path / "q"), "--classes", "1,7,zebra", "--dims", "none",
                 "--out", str(tmp_path / "report")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--classes: no class '7', 'zebra'" in err and "4 classes" in err
    assert not (tmp_path / "report" / "metrics.json").exists()


def test_class_names_of_a_benchmark_select_classes():
    from unicom.evaluate.report import select_classes

    query_rows, gallery_rows, what = select_classes(np.array([0, 1, 2, 1]), np.array([2, 2, 0, 1, 1]),
                                                    classes=["river", "2"], class_names=["forest", "river", "lake"])
    assert query_rows.tolist() == [1, 2, 3] and gallery_rows.tolist() == [0, 1, 3, 4]
    assert what["scored_classes"] == 2


def test_a_dimension_where_rows_vanish_is_skipped_and_the_others_are_scored(tmp_path, caplog):
    x, labels = data(50, 32, 5, 0.8, seed=4)
    x[[2, 7], :16] = 0  # rows 2 and 7 have nothing in their first 16 coordinates
    folder(tmp_path / "q", x, labels.tolist(), "q")
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--dims", "8,16,24", "--ks", "1,4",
                     "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    rows = {row["dimension"]: row for row in report["dimensions"]}
    assert sorted(rows) == [8, 16, 24, 32]
    for d in (8, 16):
        assert "recall@1" not in rows[d]
        assert rows[d]["skipped"].startswith(f"dimension {d} (first) skipped: query rows 2, 7 are all zeros")
        assert any(rows[d]["skipped"] == record.getMessage() for record in caplog.records)
    for d in (24, 32):
        expected = by_numpy(stored(x)[:, :d], labels)
        assert rows[d]["recall@1"] == pytest.approx(expected["recall@1"])
        assert rows[d]["r_precision"] == pytest.approx(expected["r_precision"])
    table = (out / "metrics.md").read_text()
    assert "| 16 | skipped |" in table and "dimension 8 (first) skipped" in table
    assert (out / "recall_vs_dimension.png").is_file()


def test_dimensions_above_the_embedding_are_named_when_left_out(tmp_path, caplog):
    x, labels = data(40, 16, 4, 0.8, seed=5)
    folder(tmp_path / "q", x, labels.tolist(), "q")
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--dims", "8,100,200", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [row["dimension"] for row in report["dimensions"]] == [8, 16]
    assert "dimensions 100, 200 left out: the embeddings have 16 dimensions (scored in full)" in caplog.messages


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_row_without_a_direction_is_named_by_folder_and_key_not_by_its_place_in_a_subset(tmp_path, capsys, value):
    x, labels = data(40, 16, 4, 0.8, seed=6)
    x[[9, 21]] = value  # rows 9 and 21 are of class 1
    folder(tmp_path / "g", x[20:], labels[20:].tolist(), "g")
    folder(tmp_path / "q", x[:20], labels[:20].tolist(), "q")
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 "--classes", "1,2", "--out", str(tmp_path / "report")]) == 2
    assert (f"{tmp_path / 'q'}: 1 of the rows used hold NaN or infinite values or are all zeros, e.g. 'q9' (row 9)"
            in capsys.readouterr().err)
    assert not (tmp_path / "report" / "metrics.json").exists()
    x[9] = 1.0
    folder(tmp_path / "q", x[:20], labels[:20].tolist(), "q")
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 "--out", str(tmp_path / "report")]) == 2
    assert f"{tmp_path / 'g'}: 1 of the rows used hold NaN or infinite values or are all zeros, e.g. 'g1' (row 1)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("subset", [["--classes", "2,3"], ["--exclude-classes", "0,1"]])
def test_a_row_without_a_direction_in_a_class_left_out_does_not_stop_the_scoring(tmp_path, subset):
    # the subset is scored without the classes left out: their rows are not ranked, whatever they hold
    x, labels = data(40, 16, 4, 0.8, seed=9)
    x[[9, 21]] = np.nan  # rows 9 and 21 are of class 1
    folder(tmp_path / "g", x[20:], labels[20:].tolist(), "g")
    folder(tmp_path / "q", x[:20], labels[:20].tolist(), "q")
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 *subset, "--ks", "1,4", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    qm, gm = np.isin(labels[:20], [2, 3]), np.isin(labels[20:], [2, 3])
    expected = by_numpy(stored(x[:20])[qm], labels[:20][qm], stored(x[20:])[gm], labels[20:][gm])
    for name, value in expected.items():
        assert report["metrics"][name] == pytest.approx(value), name


def test_a_train_row_without_a_direction_is_named_by_folder_key_and_row(tmp_path, capsys):
    x, labels = data(40, 16, 4, 0.8, seed=7)
    train, train_labels = data(30, 16, 4, 0.8, seed=8)
    train[17] = np.nan
    folder(tmp_path / "q", x, labels.tolist(), "q")
    folder(tmp_path / "t", train, train_labels.tolist(), "t")
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--train-embeddings", str(tmp_path / "t"),
                 "--dims", "8", "--out", str(tmp_path / "report")]) == 2
    assert f"{tmp_path / 't'}: 1 of the rows used hold NaN or infinite values or are all zeros, e.g. 't17' (row 17)" \
        in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_a_class_name_that_is_another_class_label_id_names_its_own_class():
    from unicom.evaluate.report import select_classes

    # SOP-like: class names are numbers, labels count from 0: label 3 is class "4", class "3" has label 2
    names = ["1", "2", "3", "4", "5"]
    query_rows, _, what = select_classes(np.array([2, 2, 3, 3, 3, 3, 4]), classes=["3"], class_names=names)
    assert query_rows.tolist() == [0, 1] and what["scored_classes"] == 1
    query_rows, _, _ = select_classes(np.array([2, 2, 3, 3, 3, 3, 4]), exclude_classes=["4", "5"], class_names=names)
    assert query_rows.tolist() == [0, 1]


def test_sop_classes_are_named_by_their_class_id_on_the_list_files_and_on_the_cached_folder(tmp_path):
    # Ebay lists whose class ids (3, 4, 5) are also label ids (train classes 1, 2 take 0, 1):
    # --classes 3 scores class 3 (2 images), not label 3 (class 4, 4 images), from the benchmark and from a
    # folder of the same embeddings labelled by class id
    lines = {"train": [(1, "a_final/1_0.JPG"), (1, "a_final/1_1.JPG"), (2, "a_final/2_0.JPG"), (2, "a_final/2_1.JPG")],
             "test": [(3, "a_final/3_0.JPG"), (3, "a_final/3_1.JPG")] + [(4, f"a_final/4_{i}.JPG") for i in range(4)]
             + [(5, f"a_final/5_{i}.JPG") for i in range(3)]}
    number = 0
    for split, rows in lines.items():
        text = "image_id class_id super_class_id path\n"
        for class_id, path in rows:
            number += 1
            text += f"{number} {class_id} 1 {path}\n"
        (tmp_path / f"Ebay_{split}.txt").write_text(text)
    test = lines["test"]
    x, _ = data(len(test), 8, 3, 0.3, seed=0)
    write_part(tmp_path / "emb", 0, image=x.astype(np.float16),
               metadata=pa.table({"key": [path for _, path in test], "label": [str(c) for c, _ in test]}))
    reports = []
    for name, options in (("benchmark", ["--dataset", "sop", "--root", str(tmp_path)]), ("folder", [])):
        assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), *options, "--classes", "3", "--dims", "none",
                     "--out", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    for report in reports:
        assert report["protocol"]["queries"] == 2 and report["class_subset"]["scored_classes"] == 1
