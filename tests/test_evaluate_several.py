"""``unicom evaluate --dataset A,B,... --root RA,RB,...``: each benchmark's report in
OUT/<dataset>/ is the report of that benchmark evaluated alone, the model is loaded once,
OUT/benchmarks.json and benchmarks.md carry each one's headline scores, and every option and
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
    out.mkdir()
    (out / "summary.json").write_text('{"steps": 4}')  # a training run's, in the folder evaluated into: left as it is
    # the classification options are eurosat's, the re-ranking the retrieval benchmarks'
    assert evaluate(data, out, ["folder", "cub", "eurosat"], "--knn-k", "5", "--dba", "1") == 0
    assert len(loads) == 1  # one model, loaded once for the three
    printed = capsys.readouterr().out
    assert "== cub (2 of 3)" in printed and f"wrote {out / 'benchmarks.json'}, {out / 'benchmarks.md'}" in printed
    alone = {}
    for name in ("folder", "cub", "eurosat"):
        options = ["--knn-k", "5"] if name == "eurosat" else ["--dba", "1"]
        assert evaluate(data, tmp_path / name, [name], *options) == 0
        alone[name] = report(tmp_path / name)
        mine = report(out / name)
        assert mine["protocol"] == alone[name]["protocol"]
        for key in ("metrics", "linear_probe", "knn"):
            assert mine.get(key) == alone[name].get(key), (name, key)
    summary = json.loads((out / "benchmarks.json").read_text())
    assert summary["evaluated"] == str(data["model"])
    rows = {row["dataset"]: row for row in summary["benchmarks"]}
    assert list(rows) == ["folder", "cub", "eurosat"]
    assert rows["folder"] == {"dataset": "folder", "task": "retrieval", "report": "folder/metrics.md", "scores": {
        "recall@1": alone["folder"]["metrics"]["recall@1"], "map@r": alone["folder"]["metrics"]["map@r"]}}
    assert rows["eurosat"]["task"] == "classification" and rows["eurosat"]["scores"] == {
        "linear probe accuracy": alone["eurosat"]["linear_probe"]["accuracy"],
        "kNN accuracy": alone["eurosat"]["knn"]["accuracy"]}
    table = (out / "benchmarks.md").read_text()
    recall = 100 * alone["cub"]["metrics"]["recall@1"]
    assert f"| cub | retrieval | recall@1 {recall:.2f}, map@r " in table and "[cub/metrics.md](cub/metrics.md)" in table
    assert (out / "cub" / "metrics.md").read_text() == (tmp_path / "cub" / "metrics.md").read_text().replace(
        str(tmp_path / "cub"), str(out / "cub"))
    # one benchmark into the same folder replaces the summary; several replace a report there
    assert evaluate(data, out, ["cub"]) == 0
    assert (out / "metrics.json").exists() and not any((out / name).exists() for name in ("benchmarks.json",
                                                                                         "benchmarks.md"))
    assert evaluate(data, out, ["cub", "folder"]) == 0
    assert (out / "benchmarks.json").exists() and not any((out / name).exists() for name in ("metrics.json",
                                                                                             "metrics.md"))
    assert (out / "summary.json").read_text() == '{"steps": 4}'


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


def test_runs_are_compared_score_by_score_as_their_reports_give_them(data, tmp_path, capsys):
    import csv

    several, alone = tmp_path / "several", tmp_path / "alone"
    assert evaluate(data, several, ["folder", "cub"]) == 0
    other = tiny_model_file(tmp_path / "FP16-ViT-other.pt", seed=1)
    assert main(["evaluate", "--model", str(other), "--dataset", "folder", "--root", str(data["folder"]),
                 "--out", str(alone), "--device", "cpu", "--workers", "0", "--dims", "none"]) == 0
    capsys.readouterr()
    out = tmp_path / "compared"
    assert main(["evaluate", "--compare", str(several), str(alone), "--out", str(out)]) == 0
    mine = {name: report(several / name)["metrics"] for name in ("folder", "cub")}
    theirs = report(alone)["metrics"]
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["runs"] == [{"folder": str(several), "evaluated": str(data["model"])},
                                  {"folder": str(alone), "evaluated": str(other)}]
    assert comparison["rows"] == [
        {"dataset": "folder", "score": "recall@1", "values": [mine["folder"]["recall@1"], theirs["recall@1"]]},
        {"dataset": "folder", "score": "map@r", "values": [mine["folder"]["map@r"], theirs["map@r"]]},
        {"dataset": "cub", "score": "recall@1", "values": [mine["cub"]["recall@1"], None]},
        {"dataset": "cub", "score": "map@r", "values": [mine["cub"]["map@r"], None]}]
    assert mine["folder"]["map@r"] != theirs["map@r"]  # two models that score apart
    table = (out / "comparison.md").read_text()
    assert table in capsys.readouterr().out
    low, high = sorted((mine["folder"]["map@r"], theirs["map@r"]))
    cells = [f"**{100 * high:.2f}**" if value == high else f"{100 * low:.2f}" for value in (mine["folder"]["map@r"],
                                                                                          theirs["map@r"])]
    assert f"| folder | map@r | {cells[0]} | {cells[1]} |" in table
    assert f"| cub | map@r | {100 * mine['cub']['map@r']:.2f} |  |" in table
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {(r["run"], r["dataset"], r["score"]): float(r["value"]) for r in rows}[
        ("2", "folder", "map@r")] == theirs["map@r"]
    # what --compare refuses
    for args, message in (
            ([str(tmp_path / "nothing")], "holds neither benchmarks.json (unicom evaluate --dataset A,B,...) nor "
                                          "metrics.json (one benchmark) nor log.jsonl (a unicom train run)"),
            ([str(several), "--out", str(several)], "is one of the --compare folders"),
            ([str(tmp_path / "trained")], "a training run that scored no benchmark while it trained (eval.benchmark)"),
            ([str(several), "--dataset", "cub"], "--dataset: --compare reads the scores earlier runs wrote")):
        (tmp_path / "nothing").mkdir(exist_ok=True)
        (tmp_path / "trained").mkdir(exist_ok=True)
        (tmp_path / "trained" / "log.jsonl").write_text('{"event": "step", "step": 1, "loss": 2.5}\n')
        extra = [] if "--out" in args else ["--out", str(tmp_path / "refused")]
        assert main(["evaluate", "--compare", *args, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists() and (several / "benchmarks.json").exists()
