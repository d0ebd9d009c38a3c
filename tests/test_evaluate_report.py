"""Publishing a report: ``metrics.json``, ``metrics.md`` and the curve appear as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unicom.evaluate.report import JSON_NAME, MARKDOWN_NAME, PLOT_NAME, evaluate_retrieval

# a run whose process dies (os._exit: no cleanup, as kill -9) as it renames one file of its report into place
KILLED_RUN = """
import os, sys
from pathlib import Path
import numpy as np

rename = os.replace
def dying_rename(source, destination, *args, **kwargs):
    if Path(destination).name == sys.argv[2]:
        os._exit(9)
    return rename(source, destination, *args, **kwargs)
os.replace = dying_rename

from unicom.evaluate.report import evaluate_retrieval
x = np.random.default_rng(2).standard_normal((40, 16)).astype(np.float32)
evaluate_retrieval(x, np.arange(40) % 4, dims=(4, 8), out=sys.argv[1], info={"dataset": "second"})
"""


def second_run(out: Path) -> None:
    x = np.random.default_rng(2).standard_normal((40, 16)).astype(np.float32)
    evaluate_retrieval(x, np.arange(40) % 4, dims=(4, 8), out=out, info={"dataset": "second"})


def runs_present(out: Path, first_plot: bytes) -> dict[str, str]:
    """Which run wrote each report file in ``out``: "first" or "second"."""
    runs = {}
    if (out / JSON_NAME).exists():
        runs[JSON_NAME] = json.loads((out / JSON_NAME).read_text())["dataset"]
    if (out / MARKDOWN_NAME).exists():
        runs[MARKDOWN_NAME] = (out / MARKDOWN_NAME).read_text().splitlines()[0].removeprefix("# ")
    if (out / PLOT_NAME).exists():
        runs[PLOT_NAME] = "first" if (out / PLOT_NAME).read_bytes() == first_plot else "second"
    return runs


@pytest.mark.parametrize("killed_at", [PLOT_NAME, MARKDOWN_NAME, JSON_NAME])
def test_a_run_killed_while_publishing_never_leaves_files_of_two_runs(tmp_path, killed_at):
    out = tmp_path / "report"
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    evaluate_retrieval(x, np.arange(40) % 5, dims=(4, 8), out=out, info={"dataset": "first"})
    first_plot = (out / PLOT_NAME).read_bytes()

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), killed_at], env=env, timeout=300)
    assert killed.returncode == 9

    runs = runs_present(out, first_plot)
    assert len(set(runs.values())) <= 1, runs  # one run's files: the first's whole, or the second's
    if set(runs.values()) == {"first"}:
        assert set(runs) == {JSON_NAME, MARKDOWN_NAME, PLOT_NAME}
    else:  # metrics.json stands only beside the rest of its report
        assert JSON_NAME not in runs

    second_run(out)  # the next run publishes its whole report and removes what the killed one left
    assert runs_present(out, first_plot) == {JSON_NAME: "second", MARKDOWN_NAME: "second", PLOT_NAME: "second"}
    assert sorted(p.name for p in out.iterdir()) == sorted([JSON_NAME, MARKDOWN_NAME, PLOT_NAME])


def test_a_report_whose_write_fails_leaves_neither_temporaries_nor_a_metrics_json_of_another_run(tmp_path, monkeypatch):
    out = tmp_path / "report"
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    evaluate_retrieval(x, np.arange(40) % 5, dims=(4, 8), out=out, info={"dataset": "first"})
    rename = os.replace

    def full_disk(source, destination, *args, **kwargs):
        if Path(destination).name == MARKDOWN_NAME:
            raise OSError(28, "No space left on device")
        return rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        second_run(out)
    assert [p.name for p in out.iterdir()] == [PLOT_NAME]  # the second run's curve alone, no temporaries


@pytest.mark.parametrize("corner", ["lower right", "upper right", "lower left", "upper left"])
def test_the_dimension_curve_legend_hides_no_point(corner):
    from unicom.evaluate.plots import dimension_figure

    # one method's points in the named corner of the axes, the other's spread across the middle
    low, high = corner.startswith("lower"), corner.endswith("right")
    rows = []
    for i, dimension in enumerate((4, 8, 16, 32)):
        toward_corner = i >= 2 if high else i < 2
        rows.append({"method": "pca", "dimension": dimension,
                     "recall@1": (0.40 if low else 0.70) if toward_corner else 0.55})
        rows.append({"method": "first", "dimension": dimension, "recall@1": 0.5 + 0.02 * i})
    figure = dimension_figure(rows)
    figure.canvas.draw()
    axes = figure.axes[0]
    legend = axes.get_legend().get_window_extent()
    points = np.concatenate([line.get_transform().transform(line.get_xydata()) for line in axes.get_lines()])
    assert len(points) == 8
    inside = [tuple(p) for p in points if legend.contains(*p)]
    assert not inside, f"the legend at {legend} hides the points {inside}"
    for text in axes.get_legend().get_texts():  # and the legend is drawn within the picture
        box = text.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width and 0 <= box.y0 and box.y1 <= figure.bbox.height


def _protocols(rng):
    """Embeddings scored seven ways: labels leave-one-out, a gallery with relevance lists and
    subsets, Revisited-style setups, a gallery with DBA + αQE and a dimension curve,
    k-reciprocal re-ranking leave-one-out and of the setups, and diffusion of the setups."""
    from unicom.evaluate.diffusion import Diffusion
    from unicom.evaluate.expansion import Expansion
    from unicom.evaluate.kreciprocal import KReciprocal

    query, gallery, train = (rng.standard_normal((n, 32)).astype(np.float32) for n in (300, 900, 400))
    labels, gallery_labels = rng.integers(0, 20, 300), rng.integers(0, 20, 900)
    relevant = [np.flatnonzero(gallery_labels == label) for label in labels]
    setups = {"easy": (relevant, [np.arange(i % 5) for i in range(300)]), "hard": (relevant[::-1], [np.arange(0)] * 300)}
    return [
        dict(query=query, query_labels=labels, ks=(1, 4), dims=(8, 16), train=train),
        dict(query=query, gallery=gallery, relevant=relevant, subsets={"a": np.arange(100), "b": np.arange(100, 300)},
             ks=(1, 10), metric="map@100"),
        dict(query=query, gallery=gallery, setups=setups, ks=(1, 5), metric="map_easy"),
        dict(query=query, query_labels=labels, gallery=gallery, gallery_labels=gallery_labels, ks=(1, 5), dims=(8,),
             train=train, expansion=Expansion(qe=2, dba=3)),
        dict(query=query, query_labels=labels, ks=(1, 4), expansion=Expansion(k_reciprocal=KReciprocal(10))),
        dict(query=query, gallery=gallery, setups=setups, ks=(1, 5), metric="map_easy",
             expansion=Expansion(k_reciprocal=KReciprocal(8, 3, 0.2))),
        dict(query=query, gallery=gallery, setups=setups, ks=(1, 5), metric="map_easy",
             expansion=Expansion(diffusion=Diffusion(10))),
    ]


def _assert_close(a, b, where: str = "") -> None:
    """``a`` equals ``b``, numbers to 1e-6, through nested dicts and lists."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), where
        for key in b:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


def _drawn(protocol: dict, failures: bool) -> dict:
    """``protocol`` with examples (5 queries, 4 results each) of rows named q<i> and g<i>."""
    from unicom.evaluate.examples import Examples, Item

    queries = [Item(f"q{i}") for i in range(len(protocol["query"]))]
    gallery = None if protocol.get("gallery") is None else [Item(f"g{i}") for i in range(len(protocol["gallery"]))]
    return dict(protocol, examples=Examples(5, k=4, failures=failures), items=(queries, gallery))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_equal_those_on_the_cpu():
    for n, protocol in enumerate(_protocols(np.random.default_rng(0))):
        protocol = _drawn(protocol, failures=n % 2 == 1)
        on_cpu = evaluate_retrieval(**protocol, device="cpu")
        on_gpu = evaluate_retrieval(**protocol, device="cuda")
        assert on_gpu["protocol"]["device"] == "cuda" and on_cpu["protocol"]["device"] == "cpu"
        for part in ("metrics", "subsets", "without_expansion", "dimensions", "examples"):
            _assert_close(on_gpu.get(part), on_cpu.get(part), part)


def test_the_device_of_the_searches_changes_no_score():
    """Scored with the embeddings handed over as tensors on the CPU device (the path a GPU
    takes), every metric, and every example drawn, equals the arrays' own."""
    for n, protocol in enumerate(_protocols(np.random.default_rng(1))):
        protocol = _drawn(protocol, failures=n % 2 == 0)
        plain = evaluate_retrieval(**protocol)
        placed = evaluate_retrieval(**protocol, device="cpu")
        assert plain["protocol"]["device"] == placed["protocol"]["device"] == "cpu"
        for part in ("metrics", "subsets", "without_expansion", "dimensions", "examples"):
            assert placed.get(part) == plain.get(part), part
        assert len(plain["examples"]["queries"]) > 0
