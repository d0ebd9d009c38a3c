"""``unicom evaluate --dataset A,B,... --root RA,RB,...``: each benchmark's report in
OUT/<dataset>/ is the report of that benchmark evaluated alone, the model is loaded once,
OUT/summary.json and summary.md carry each one's headline scores, and every option and
folder is checked before anything is embedded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_layouts import cub, jpeg
from support import write_class_folder
from test_evaluate_cli import tiny_model_file

from unicom.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("several")
    write_class_folder(root / "folder", list(range(5)), 4, size=16)
    cub(root / "cub", "flat")
    for c, name in enumerate(["Forest", "River", "SeaLake"]):
        for i in range(6):
            jpeg(root / "eurosat" / "eurosat" / "2750" / name / f"{name}_{i}.jpg", c + 7, i)
    return {"folder": root / "folder", "cub": root / "cub", "eurosat": root / "eurosat",
            "model": tiny_model_file(root / "FP16-ViT-tiny.pt")}


def evaluate(data, out: Path, datasets: list[str], *extra: str) -> int:
    return main(["evaluate", "--model", str(data["model"]), "--dataset", ",".join(datasets),
                 "--root", ",".join(str(data[name]) for name in datasets), "--out", str(out), "--device", "cpu",
                 "--workers", "0", "--dims", "none", *extra])


def report(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_each_benchmark_is_scored_as_alone_and_the_summary_quotes_each(data, tmp_path, monkeypatch, capsys):
    import unicom.models.encoders as encoders

    loads = []
    load = encoders.load_encoder
    monkeypatch.setattr(encoders, "load_encoder", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
    out = tmp_path / "all"
    # the classification options are eurosat's, the re-ranking the retrieval benchmarks'
    assert evaluate(data, out, ["folder", "cub", "eurosat"], "--knn-k", "5", "--dba", "1") == 0
    assert len(loads) == 1  # one model, loaded once for the three
    printed = capsys.readouterr().out
    assert "== cub (2 of 3)" in printed and f"wrote {out / 'summary.json'}, {out / 'summary.md'}" in printed
    alone = {}
    for name in ("folder", "cub", "eurosat"):
        assert evaluate(data, tmp_path / name, [name], *(["--knn-k", "5"] if name == "eurosat" else ["--dba", "1"])) == 0
        alone[name] = report(tmp_path / name)
        mine = report(out / name)
        assert mine["protocol"] == alone[name]["protocol"]
        for key in ("metrics", "linear_probe", "knn"):
            assert mine.get(key) == alone[name].get(key), (name, key)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == str(data["model"])
    rows = {row["dataset"]: row for row in summary["benchmarks"]}
    assert list(rows) == ["folder", "cub", "eurosat"]
    assert rows["folder"] == {"dataset": "folder", "task": "retrieval", "report": "folder/metrics.md", "scores": {
        "recall@1": alone["folder"]["metrics"]["recall@1"], "map@r": alone["folder"]["metrics"]["map@r"]}}
    assert rows["eurosat"]["task"] == "classification" and rows["eurosat"]["scores"] == {
        "linear probe accuracy": alone["eurosat"]["linear_probe"]["accuracy"],
        "kNN accuracy": alone["eurosat"]["knn"]["accuracy"]}
    table = (out / "summary.md").read_text()
    recall = 100 * alone["cub"]["metrics"]["recall@1"]
    assert f"| cub | retrieval | recall@1 {recall:.2f}, map@r " in table and "[cub/metrics.md](cub/metrics.md)" in table
    assert (out / "cub" / "metrics.md").read_text() == (tmp_path / "cub" / "metrics.md").read_text().replace(
        str(tmp_path / "cub"), str(out / "cub"))
    # one benchmark into the same folder replaces the summary; several replace a report there
    assert evaluate(data, out, ["cub"]) == 0
    assert (out / "metrics.json").exists() and not (out / "summary.json").exists() and not (out / "summary.md").exists()
    assert evaluate(data, out, ["cub", "folder"]) == 0
    assert (out / "summary.json").exists() and not (out / "metrics.json").exists() and not (out / "metrics.md").exists()


@pytest.mark.parametrize("datasets, roots, extra, message", [
    ("cub,folder", "CUB", [], "--dataset cub,folder names 2 benchmarks and --root 1 folder(s): give their folders "
                              "separated by commas, in the same order"),
    ("cars196,cars", "A,B", [], "--dataset cars196,cars names cars196 more than once"),
    ("cub,folder", "CUB,FOLDER", ["--classes", "1,2"], "--classes: of one benchmark; with several"),
    ("cub,folder", "CUB,FOLDER", ["--knn-k", "5"], "--knn-k: for classification benchmarks; --dataset cub,folder "
                                                    "has none"),
    ("eurosat,coco-captions", "EUROSAT,CUB", ["--qe", "2"], "--qe: for retrieval benchmarks; --dataset "
                                                            "eurosat,coco-captions has none"),
    ("cub,foo", "CUB,FOLDER", [], "--dataset foo: unknown dataset 'foo'"),
    ("cub,folder", "CUB,nowhere", [], "--dataset folder: "),
])
def test_each_benchmark_is_checked_before_any_is_embedded(data, tmp_path, capsys, datasets, roots, extra, message):
    roots = roots.replace("CUB", str(data["cub"])).replace("FOLDER", str(data["folder"])).replace(
        "EUROSAT", str(data["eurosat"])).replace("nowhere", str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(data["model"]), "--dataset", datasets, "--root", roots, "--out", str(out),
                 "--device", "cpu", "--workers", "0", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "cub").exists()  # the first benchmark was not embedded
