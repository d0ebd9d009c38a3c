"""Query expansion (αQE) and database-side augmentation (DBA): by hand, against a plain
numpy reference, and through `unicom evaluate` on Revisited Oxford/Paris and embedding folders."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_evaluate_cli import clustered, embedding_folder
from test_revisited import revisited_dataset, straightforward_metrics

from unicom.cli import main
from unicom.data.benchmarks import load_retrieval_benchmark
from unicom.errors import InputError
from unicom.evaluate import retrieval_metrics
from unicom.evaluate.expansion import Expansion, database_side_augmentation, expand, query_expansion

# --------------------------------------------------------------------------- by hand

# similarities to the query (1, 0): 0.6, 0 and -1
GALLERY = np.array([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def unit(*v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("k, alpha, summed", [
    (1, 1.0, (1 + 0.6 * 0.6, 0.6 * 0.8)),           # the nearest, weighted by its similarity
    (2, 1.0, (1 + 0.6 * 0.6, 0.6 * 0.8)),           # the second is orthogonal: weight 0
    (3, 3.0, (1 + 0.216 * 0.6, 0.216 * 0.8)),       # 0.6^3; the opposite item weighs max(-1, 0)^3 = 0
    (2, 0.0, (1 + 0.6 + 0.0, 0.8 + 1.0)),           # α = 0: average query expansion, each neighbour weight 1
])
def test_query_expansion_by_hand(k, alpha, summed):
    expanded = query_expansion(QUERY, GALLERY, k, alpha)
    np.testing.assert_allclose(expanded[0], unit(*summed), atol=1e-6)


def test_database_side_augmentation_by_hand():
    gallery = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    # each item's nearest other: 0 -> 1 (0.6 against 0), 1 -> 2 (0.8 against 0.6), 2 -> 1 (0.8)
    augmented = database_side_augmentation(gallery, 1, alpha=1.0)
    expected = [unit(1 + 0.6 * 0.6, 0.6 * 0.8), unit(0.6, 0.8 + 0.8), unit(0.8 * 0.6, 1 + 0.8 * 0.8)]
    np.testing.assert_allclose(augmented, np.stack(expected), atol=1e-6)


# --------------------------------------------------------------------------- against numpy


def reference_neighbour_sums(x, neighbours, k, alpha, leave_self_out):
    """x's rows plus their k most similar rows of ``neighbours`` (stable order: ties by
    lower index), weighted by max(s, 0)^alpha, normalised: float64, a loop per row."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True).astype(np.float64)
    neighbours = neighbours / np.linalg.norm(neighbours, axis=1, keepdims=True).astype(np.float64)
    out = []
    for row, v in enumerate(x):
        s = neighbours @ v
        order = [i for i in np.argsort(-s, kind="stable") if not (leave_self_out and i == row)][:k]
        total = v + sum(max(s[i], 0.0) ** alpha * neighbours[i] for i in order)
        out.append(total / np.linalg.norm(total))
    return np.stack(out)


def reference_expand(query, gallery, qe, dba, qe_alpha=3.0, dba_alpha=3.0):
    if dba:
        gallery = reference_neighbour_sums(gallery, gallery, dba, dba_alpha, True)
    if qe:
        query = reference_neighbour_sums(query, gallery, qe, qe_alpha, False)
    return query, gallery


@pytest.mark.parametrize("qe, dba, qe_alpha, dba_alpha", [
    (1, 0, 3.0, 3.0), (5, 0, 1.0, 3.0), (0, 4, 3.0, 0.5), (3, 7, 3.0, 3.0), (10, 2, 0.0, 2.0)])
def test_expansion_equals_a_plain_numpy_reference(qe, dba, qe_alpha, dba_alpha):
    rng = np.random.default_rng(qe * 10 + dba)
    query, gallery = rng.standard_normal((30, 16)), rng.standard_normal((200, 16))
    # duplicated gallery rows: equal similarities, ranked by lower index
    gallery[50:60] = gallery[40:50]
    expansion = Expansion(qe=qe, dba=dba, qe_alpha=qe_alpha, dba_alpha=dba_alpha)
    expanded_query, expanded_gallery = expand(query, gallery, expansion, chunk_size=7)
    reference_query, reference_gallery = reference_expand(query, gallery, qe, dba, qe_alpha, dba_alpha)
    np.testing.assert_allclose(expanded_gallery, reference_gallery, atol=2e-6)
    np.testing.assert_allclose(expanded_query, reference_query, atol=2e-6)


def test_nothing_asked_leaves_the_inputs_as_they_are():
    query, gallery = np.ones((2, 3)), np.eye(3)
    assert expand(query, gallery, Expansion()) == (query, gallery)


def test_leave_one_out_takes_augmentation_but_not_query_expansion():
    x = np.random.default_rng(0).standard_normal((40, 8))
    augmented, gallery = expand(x, None, Expansion(dba=3, dba_alpha=1.0))
    assert gallery is None
    np.testing.assert_allclose(augmented, reference_neighbour_sums(x, x, 3, 1.0, True), atol=2e-6)
    with pytest.raises(InputError, match="leave-one-out"):
        expand(x, None, Expansion(qe=2))


@pytest.mark.parametrize("settings, message", [
    ({"qe": -1}, "qe is a number of neighbours"), ({"dba": 1.5}, "dba is a number of neighbours"),
    ({"qe": 2, "qe_alpha": -1.0}, "qe_alpha is the power"), ({"dba": 2, "dba_alpha": float("nan")}, "dba_alpha"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        Expansion(**settings)


def test_more_neighbours_than_the_gallery_has_are_refused():
    with pytest.raises(InputError, match=r"query expansion with 4 neighbours \(qe=4\), but there are 3 gallery items"):
        query_expansion(QUERY, GALLERY, 4)
    with pytest.raises(InputError, match=r"\(dba=3\), but there are 2 other gallery items"):
        database_side_augmentation(GALLERY, 3)


# --------------------------------------------------------------------------- unicom evaluate


def re_ranked_revisited(tmp_path, *options: str) -> tuple[np.ndarray, dict]:
    """`unicom evaluate` on a small Revisited Oxford of random embeddings, with ``options``
    (the report under ``tmp_path/report``): the embeddings as scored (float16 in the folder)
    and ``metrics.json``."""
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    protocol = load_retrieval_benchmark("roxford5k", root)
    x = np.random.default_rng(5).standard_normal((2 + len(protocol.gallery), 8)).astype(np.float32)
    embedding_folder(tmp_path / "emb", x, protocol.query.keys + protocol.gallery.keys, parts=1)
    assert main(["evaluate", "--embeddings", str(tmp_path / "emb"), "--dataset", "roxford5k", "--root", str(root),
                 *options, "--out", str(tmp_path / "report")]) == 0
    return x.astype(np.float16).astype(np.float64), json.loads((tmp_path / "report" / "metrics.json").read_text())


def test_revisited_benchmark_is_scored_re_ranked_and_plain(tmp_path, capsys):
    x, report = re_ranked_revisited(tmp_path, "--qe", "2", "--dba", "3", "--dba-alpha", "1", "--dims", "4", "--no-pca")
    out = tmp_path / "report"
    printed = capsys.readouterr().out
    assert report["protocol"]["expansion"] == {"dba": {"k": 3, "alpha": 1.0}, "qe": {"k": 2, "alpha": 3.0}}
    query, gallery = reference_expand(x[:2], x[2:], 2, 3, 3.0, 1.0)
    assert report["metrics"] == pytest.approx(straightforward_metrics(query, gallery))
    assert report["without_expansion"] == pytest.approx(straightforward_metrics(x[:2], x[2:]))
    # the first 4 dimensions are re-ranked in those 4 dimensions
    query4, gallery4 = reference_expand(x[:2, :4], x[2:, :4], 2, 3, 3.0, 1.0)
    row = next(row for row in report["dimensions"] if row["dimension"] == 4)
    assert {k: v for k, v in row.items() if k not in ("dimension", "method")} == pytest.approx(
        straightforward_metrics(query4, gallery4))
    markdown = (out / "metrics.md").read_text()
    assert "Re-ranked: each gallery item augmented with its 3 nearest others (DBA, α = 1); then each query expanded " \
           "with its 2 nearest gallery items (αQE, α = 3) and searched again." in markdown
    assert "Without re-ranking:" in markdown and markdown in printed


def query_and_gallery_folders(root, query, labels, gallery, gallery_labels) -> None:
    """``root/q`` and ``root/g``: labelled embedding folders of keys q0, q1, ... and g0, g1, ..."""
    embedding_folder(root / "q", query, [f"q{i}" for i in range(len(query))], labels.tolist())
    embedding_folder(root / "g", gallery, [f"g{i}" for i in range(len(gallery))], gallery_labels.tolist())


def re_ranked_folders(tmp_path, queries: int, *options: str) -> tuple:
    """`unicom evaluate` of ``queries`` clustered 12-d queries against 70 gallery rows (5
    classes) with ``options`` (the report under ``tmp_path/report``): ``metrics.json``, then the
    query rows, their labels, the gallery rows and theirs, the rows as scored (float16 in the
    folders)."""
    query, query_labels = clustered(queries, 12, 5, 1.2, seed=13)
    gallery, gallery_labels = clustered(70, 12, 5, 1.2, seed=14)
    query_and_gallery_folders(tmp_path, query, query_labels, gallery, gallery_labels)
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 *options, "--dims", "none", "--ks", "1,4", "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    query, gallery = (a.astype(np.float16).astype(np.float32) for a in (query, gallery))
    return report, query, query_labels, gallery, gallery_labels


def test_embedding_folders_with_a_gallery_are_re_ranked(tmp_path):
    x, labels = clustered(60, 16, 6, 1.2, seed=2)
    gallery, gallery_labels = clustered(120, 16, 6, 1.2, seed=2)
    query_and_gallery_folders(tmp_path, x, labels, gallery, gallery_labels)
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--gallery-embeddings", str(tmp_path / "g"),
                 "--qe", "3", "--dims", "none", "--ks", "1,4", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x, gallery = (a.astype(np.float16).astype(np.float32) for a in (x, gallery))
    query, _ = reference_expand(x, gallery, 3, 0)
    assert report["metrics"] == pytest.approx(retrieval_metrics(query, labels, gallery, gallery_labels, ks=(1, 4)))
    assert report["without_expansion"] == pytest.approx(retrieval_metrics(x, labels, gallery, gallery_labels, ks=(1, 4)))
    assert "| all, without re-ranking |" in (out / "metrics.md").read_text()


def test_leave_one_out_folders_take_dba_and_refuse_qe(tmp_path, capsys):
    x, labels = clustered(50, 12, 5, 1.0, seed=4)
    embedding_folder(tmp_path / "q", x, [f"q{i}" for i in range(50)], labels.tolist())
    out = tmp_path / "report"
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--dba", "2", "--dims", "none", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    x = x.astype(np.float16).astype(np.float32)
    augmented = reference_neighbour_sums(x, x, 2, 3.0, True)
    assert report["metrics"] == pytest.approx(retrieval_metrics(augmented, labels, ks=(1, 2, 4, 8)))
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), "--qe", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "--qe: without --gallery-embeddings the queries are searched leave-one-out" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--qe-alpha", "2"], "--qe-alpha weighs the neighbours of --qe; give --qe K"),
    (["--dba", "2", "--dba-alpha", "-1"], "--dba-alpha -1: the power of the similarities"),
    (["--qe", "1", "--task", "classification", "--train-embeddings", "TRAIN"], "--task classification searches nothing"),
    (["--dba", "500"], r"\(dba=500\), but there are 49 other gallery items"),
    (["--k-reciprocal-k2", "3"], "--k-reciprocal-k2 sets the k-reciprocal re-ranking; give --k-reciprocal K1"),
    (["--k-reciprocal-lambda", "0.5"], "--k-reciprocal-lambda sets the k-reciprocal re-ranking"),
    (["--k-reciprocal", "4", "--k-reciprocal-lambda", "2"], "lambda is the share of the original distance"),
    (["--k-reciprocal", "4", "--k-reciprocal-k2", "9"], r"give k2 of at most 5"),
    (["--k-reciprocal", "50"], r"k1 = 50 neighbours, but there are 50 items"),
    (["--diffusion-alpha", "0.5"], "--diffusion-alpha sets the diffusion; give --diffusion K"),
    (["--diffusion-gamma", "2"], "--diffusion-gamma sets the diffusion"),
    (["--diffusion", "5", "--diffusion-alpha", "1"], "alpha is how far a query spreads, from 0 up to but not 1"),
    (["--diffusion", "5", "--diffusion-gamma", "0"], "gamma is the power of the similarities"),
    (["--diffusion", "5", "--k-reciprocal", "5"], "--k-reciprocal and --diffusion each replace the scores"),
    (["--diffusion", "50"], r"k = 50 neighbours, but the gallery has 50 items"),
    (["--diffusion-rank", "10"], "--diffusion-rank sets the diffusion; give --diffusion K"),
    (["--diffusion", "5", "--diffusion-rank", "49"], "finds at most 48; give a rank of at most 48"),
    (["--k-reciprocal", "3", "--task", "classification", "--train-embeddings", "TRAIN"],
     "--task classification searches nothing: leave --qe, --dba, --k-reciprocal and --diffusion out"),
])
def test_re_ranking_options_out_of_place_are_refused(arguments, message, tmp_path, capsys):
    x, labels = clustered(50, 12, 5, 1.0, seed=4)
    embedding_folder(tmp_path / "q", x, [f"q{i}" for i in range(50)], labels.tolist())
    arguments = [str(tmp_path / "q") if a == "TRAIN" else a for a in arguments]
    assert main(["evaluate", "--embeddings", str(tmp_path / "q"), *arguments, "--dims", "none",
                 "--out", str(tmp_path / "report")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_leave_one_out_benchmark_refuses_query_expansion_before_embedding(tmp_path, capsys):
    from benchmark_layouts import sop

    root = sop(tmp_path / "data", "download")
    assert main(["evaluate", "--model", "NOT-LOADED", "--dataset", "sop", "--root", str(root), "--qe", "1",
                 "--out", str(tmp_path / "report")]) == 2
    assert "--qe: sop searches its images leave-one-out" in capsys.readouterr().err


def test_a_classification_benchmark_refuses_re_ranking(tmp_path, capsys):
    assert main(["evaluate", "--embeddings", str(tmp_path), "--dataset", "cifar10", "--root", str(tmp_path),
                 "--dba", "2", "--out", str(tmp_path / "report")]) == 2
    assert "re-rank an image retrieval benchmark's searches" in capsys.readouterr().err



def test_the_re_ranking_benchmark_reads_the_demo_folders_and_tables_each_setting(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    demo = tmp_path / "demo"
    for protocol in ("clean", "varied"):
        for network in ("trained_network", "trained_network_compact_epoch", "clustering_features"):
            root = (demo / "held_out_pixels" / protocol if network == "clustering_features"
                    else demo / "evaluate" / protocol / network / "embeddings")
            query, labels = clustered(40, 8, 5, 1.0, seed=len(network))
            gallery, gallery_labels = clustered(60, 8, 5, 1.0, seed=len(network))  # over diffusion's k = 50
            embedding_folder(root / "query", query, [f"q{i}" for i in range(40)], labels.tolist())
            embedding_folder(root / "gallery", gallery, [f"g{i}" for i in range(60)], gallery_labels.tolist())
    script = Path(__file__).parents[1] / "benchmarks" / "re_ranking.py"
    done = subprocess.run([sys.executable, str(script), "--demo", str(demo), "--out", str(tmp_path / "out.txt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "out.txt").read_text()
    query, gallery = (a.astype(np.float16).astype(np.float32) for a in (query, gallery))
    plain = retrieval_metrics(query, labels, gallery, gallery_labels, ks=(1, 4))
    expanded = retrieval_metrics(reference_expand(query, gallery, 2, 2)[0], labels,
                                 reference_expand(query, gallery, 2, 2)[1], gallery_labels, ks=(1, 4))
    section = table.split("## varied queries, 16x16 pixels")[1]
    assert f"| none (plain search) | {100 * plain['recall@1']:.2f} | {100 * plain['recall@4']:.2f} | " \
           f"{100 * plain['map@r']:.2f} |" in section
    assert f"| DBA k=2 α=3, αQE k=2 α=3 | {100 * expanded['recall@1']:.2f} | {100 * expanded['recall@4']:.2f} | " \
           f"{100 * expanded['map@r']:.2f} |" in section
    from unicom.evaluate import KReciprocal  # its scores are checked against the authors' code in test_kreciprocal
    from unicom.evaluate.dims import score

    re_ranked = score(query, labels, gallery, gallery_labels, ks=(1, 4),
                      expansion=Expansion(k_reciprocal=KReciprocal(20, 6, 0.3)))
    assert f"| k-reciprocal k1=20 k2=6 λ=0.3 | {100 * re_ranked['recall@1']:.2f} | " \
           f"{100 * re_ranked['recall@4']:.2f} | {100 * re_ranked['map@r']:.2f} |" in section


def test_the_neighbour_searches_show_their_progress(capsys, monkeypatch):
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    x = np.random.default_rng(3).standard_normal((300, 8))
    expand(x[:20], x[20:], Expansion(qe=2, dba=3), chunk_size=16)
    err = capsys.readouterr().err
    assert re.search(r"DBA: 3 neighbours of each item.*280/280 ", err)
    assert re.search(r"αQE: 2 neighbours of each query.*20/20 ", err)
