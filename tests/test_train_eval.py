"""Retrieval scored while ``unicom train`` runs (``eval.benchmark``, ``eval.root``,
``eval.every``): the scores are those ``unicom evaluate --model`` gives the model exported at
that step (the moving average with ``train.ema``), on one process and on two gloo ranks;
training is left bit for bit as it was; the log, TensorBoard and the summary carry them; a
benchmark that cannot be read stops the run before it trains."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image
from support import class_image, write_class_folder
from test_layer_decay import TINY
from test_train_run import events, free_port, run_command

from unicom.cli import main
from unicom.engine.checkpoint import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SCORED = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "map@100", "n_queries")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    write_class_folder(root / "train", list(range(6)), 8, size=16)
    # 72 images of 24 classes never trained on, each blended with another class's: a task with mistakes
    for label in range(24):
        (root / "val" / f"class_{label:02d}").mkdir(parents=True)
        for index in range(3):
            blended = Image.blend(class_image(label + 6, index, 16), class_image((label * 7 + index) % 24 + 6, 9, 16), 0.45)
            blended.save(root / "val" / f"class_{label:02d}" / f"{index}.png")
    return {"train": root / "train", "val": root / "val"}


# timm's test_resnet takes TINY's settings but a ViT's sizes
RESNET = ["model.name=timm/test_resnet", *(setting for setting in TINY
                                          if not setting.startswith(("model.patch_size", "model.width", "model.depth",
                                                                     "model.heads")))]


def recipe(folders, out: Path, *extra: str, network=TINY) -> list[str]:
    return [f"data.folder={folders['train']}", *network, "eval.benchmark=folder", f"eval.root={folders['val']}",
            "eval.workers=0", f"out={out}", *extra]


def evaluated(model: Path, folders, out: Path) -> dict:
    """``unicom evaluate --model`` of the exported model on the same benchmark: the reference."""
    assert main(["evaluate", "--model", str(model), "--dataset", "folder", "--root", str(folders["val"]),
                 "--out", str(out), "--workers", "0"]) == 0
    return json.loads((out / "metrics.json").read_text())["metrics"]


def assert_scores(scores: dict, reference: dict) -> None:
    for name in SCORED:
        assert scores[name] == pytest.approx(reference[name], abs=1e-9), name


def test_each_evaluation_scores_the_model_as_exported_at_that_step(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *recipe(folders, out, "train.steps=4", "eval.every=2")]) == 0
    printed = capsys.readouterr().out
    assert "eval: folder (72 query images), every 2 steps and at the end" in printed
    assert "eval step 2: folder recall@1 " in printed and "eval step 4: folder recall@1 " in printed
    scored = events(out, "eval")
    assert [record["step"] for record in scored] == [2, 4] and {r["weights"] for r in scored} == {"network"}
    final = evaluated(out / "model", folders, tmp_path / "final")
    assert_scores(scored[-1], final)
    assert 0 < final["recall@1"] < 1 and 0 < final["map@r"] < 1  # a score that can tell models apart
    summary = json.loads((out / "summary.json").read_text())
    assert_scores(summary["eval"], final)
    # the score at step 2 is that of step 2's checkpoint, exported
    assert main(["train", "--export-from", str(out / "checkpoints" / "step_00000002"), "--model-out",
                 str(tmp_path / "at2")]) == 0
    at2 = evaluated(tmp_path / "at2", folders, tmp_path / "eval2")
    assert_scores(scored[0], at2)
    assert at2["map@r"] != final["map@r"]


def test_a_moving_average_is_what_is_scored_and_training_is_left_as_it_was(folders, tmp_path):
    averaged = tmp_path / "averaged"
    # stochastic depth draws from torch's generator, which the evaluations leave as they found it
    assert main(["train", *recipe(folders, averaged, "train.steps=3", "eval.every=1", "train.ema=0.5",
                                  "model.drop_path_rate=0.2")]) == 0
    scored = events(averaged, "eval")
    assert [record["step"] for record in scored] == [1, 2, 3] and {r["weights"] for r in scored} == {"moving average"}
    assert_scores(scored[-1], evaluated(averaged / "model", folders, tmp_path / "ema"))
    # the same recipe without evaluations trains to the same weights, bit for bit, and averages them alike
    plain = tmp_path / "plain"
    assert main(["train", f"data.folder={folders['train']}", *TINY, "train.steps=3", "train.ema=0.5",
                 "model.drop_path_rate=0.2", f"out={plain}"]) == 0
    for name in ("model.safetensors", "model_ema.safetensors"):
        with_eval = load_file(str(averaged / "checkpoints" / "step_00000003" / name))
        without = load_file(str(plain / "checkpoints" / "step_00000003" / name))
        assert with_eval.keys() == without.keys() and all(torch.equal(with_eval[k], without[k]) for k in without), name


def test_locked_batchnorm_stays_held_across_evaluations(folders, tmp_path):
    """timm's test_resnet with its first groups locked and their BatchNorm held: an evaluation
    (the whole network in evaluation mode) gives the held layers back held, the others training."""
    out = tmp_path / "resnet"
    assert main(["train", *recipe(folders, out, "train.steps=3", "eval.every=1", "model.lock=true",
                                  "model.unlocked_groups=1", "model.lock_bn_stats=true", network=RESNET)]) == 0
    start = tmp_path / "start"
    assert main(["train", f"data.folder={folders['train']}", *RESNET, "train.steps=0", f"out={start}"]) == 0
    before, after = (load_file(str(folder / "model" / "model.safetensors")) for folder in (start, out))
    statistics = [name for name in before if name.endswith("running_mean")]
    kept = {name for name in statistics if torch.equal(before[name], after[name])}
    assert kept and kept != set(statistics)  # the held layers kept theirs through three evaluations, the rest moved


@pytest.mark.parametrize("override, message", [
    ("eval.root=", "give eval.benchmark and eval.root (the benchmark's folder) together"),
    ("eval.every=-1", "eval.every must be 0 or more, got -1"),
])
def test_eval_settings_out_of_range_are_refused(folders, tmp_path, capsys, override, message):
    assert main(["train", *recipe(folders, tmp_path / "run", override)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_benchmark_that_cannot_be_read_stops_the_run_before_it_trains(folders, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"data.folder={folders['train']}", *TINY, "eval.benchmark=sop", f"eval.root={tmp_path / 'nowhere'}",
            f"out={out}", "train.steps=2"]
    assert main(["train", *args]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_two_gloo_ranks_score_as_one_process_does(folders, tmp_path):
    out = tmp_path / "two"
    done = run_command(recipe(folders, out, "train.steps=2", "data.batch_size=8"), prefix=[
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "unicom.train"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (scored,) = events(out, "eval")
    assert_scores(scored, evaluated(out / "model", folders, tmp_path / "reference"))


def test_the_best_evaluation_is_exported_and_remembered_across_a_resume(folders, tmp_path, capsys):
    """``eval.keep_best``: OUT/model_best is the model of the step with the highest headline
    metric (the first of equals), its score in the provenance; a resumed run compares with the
    best before the checkpoint, which the checkpoints keep."""
    out = tmp_path / "run"
    keep = ["eval.every=1", "eval.keep_best=true", "checkpoint.every=1", "checkpoint.keep=10", "optim.lr=0.01"]
    assert main(["train", *recipe(folders, out, "train.steps=3", *keep)]) == 0
    assert main(["train", *recipe(folders, out, "train.steps=6", *keep)]) == 0
    scored = events(out, "eval")
    assert [record["step"] for record in scored] == [1, 2, 3, 4, 5, 6]
    values = [record["recall@1"] for record in scored]
    best = max(range(6), key=lambda i: (values[i], -i))
    flags = [record["best"] for record in scored]
    assert flags == [values[i] > max(values[:i], default=-1) for i in range(6)] and not all(flags)
    provenance = json.loads((out / "model_best" / "unicom_model.json").read_text())["provenance"]
    assert provenance["step"] == best + 1
    assert provenance["eval"] == {"benchmark": "folder", "metric": "recall@1", "value": values[best]}
    assert_scores(scored[best], evaluated(out / "model_best", folders, tmp_path / "best"))
    manifest = read_manifest(out / "checkpoints" / "step_00000006")
    assert (manifest["state"]["best_score"], manifest["state"]["best_step"]) == (values[best], best + 1)
    assert "the best so far: exported to" in capsys.readouterr().out


def test_the_best_of_another_metric_is_kept_and_a_resume_scoring_another_starts_its_best_anew(folders, tmp_path,
                                                                                              capsys):
    """``eval.metric``: the best of MAP@R kept; a run that kept the best recall@1 resumed with
    it drops that best (a note says so) and its next evaluation is the best so far."""
    out = tmp_path / "run"
    keep = ["eval.every=1", "eval.keep_best=true", "checkpoint.every=1", "checkpoint.keep=10", "optim.lr=0.01"]
    assert main(["train", *recipe(folders, out, "train.steps=2", *keep)]) == 0
    capsys.readouterr()
    assert main(["train", *recipe(folders, out, "train.steps=6", "eval.metric=map@r", *keep)]) == 0
    printed = capsys.readouterr().out
    assert "note: the checkpoint's best score (folder recall@1 " in printed
    assert "is not of folder map@r: the next evaluation is the best so far" in printed
    scored = events(out, "eval")[2:]
    assert [record["step"] for record in scored] == [3, 4, 5, 6] and {r["metric"] for r in scored} == {"map@r"}
    values = [record["map@r"] for record in scored]
    flags = [record["best"] for record in scored]
    assert flags == [values[i] > max(values[:i], default=-1) for i in range(4)]
    best = max(range(4), key=lambda i: (values[i], -i))
    provenance = json.loads((out / "model_best" / "unicom_model.json").read_text())["provenance"]
    assert provenance["step"] == best + 3
    assert provenance["eval"] == {"benchmark": "folder", "metric": "map@r", "value": values[best]}
    state = read_manifest(out / "checkpoints" / "step_00000006")["state"]
    assert (state["best_score"], state["best_step"], state["best_of"]) == (values[best], best + 3, "folder map@r")
    # a metric the benchmark does not report is refused before anything trains
    assert main(["train", *recipe(folders, tmp_path / "other", "train.steps=1", "eval.metric=recall@3")]) == 2
    assert ("eval.metric=recall@3: folder reports recall@1, recall@2, recall@4, recall@8, map@r, r_precision, "
            "map@100, mmp@5; give one of them (or leave eval.metric out for recall@1)") in capsys.readouterr().err
    assert not (tmp_path / "other" / "checkpoints").exists()
    assert main(["train", f"data.folder={folders['train']}", *TINY, "eval.metric=map@r", f"out={tmp_path / 'x'}"]) == 2
    assert "eval.metric is a metric of eval.benchmark: give eval.benchmark and eval.root" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_killed_while_it_scores_takes_the_steps_and_the_scores_again(folders, tmp_path):
    from test_train_run import run_until_paused_then_kill

    args = recipe(folders, tmp_path / "run", "train.steps=10", "eval.every=2", "checkpoint.every=5",
                  "log.tensorboard=true")
    whole = recipe(folders, tmp_path / "whole", "train.steps=10", "eval.every=2", "checkpoint.every=5")
    assert run_command(whole).returncode == 0
    run_until_paused_then_kill(args, "eval:8")  # checkpoint 5 is written; steps 6-8 and the score of 6 are lost
    assert [record["step"] for record in events(tmp_path / "run", "eval")] == [2, 4, 6]
    resumed = run_command(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, once = events(tmp_path / "run", "eval"), events(tmp_path / "whole", "eval")
    assert [record["step"] for record in again] == [2, 4, 6, 8, 10]
    for mine, theirs in zip(again, once):
        assert_scores(mine, theirs)
    trained, reference = (load_file(str(out / "model" / "model.safetensors")) for out in (tmp_path / "run", tmp_path / "whole"))
    assert all(torch.equal(trained[key], reference[key]) for key in reference)


def test_the_run_draws_its_loss_and_its_scores_against_the_step(folders, tmp_path):
    """OUT/curves.png: the curves of log.jsonl's step and eval records, each step once after a
    resume."""
    from PIL import Image as PILImage

    from unicom.evaluate.plots import training_curves

    out = tmp_path / "run"
    assert main(["train", *recipe(folders, out, "train.steps=2", "eval.every=1", "log.every=1")]) == 0
    assert main(["train", *recipe(folders, out, "train.steps=4", "eval.every=1", "log.every=1")]) == 0
    curves = training_curves(out / "log.jsonl")
    assert curves["loss"] == [(r["step"], r["loss"]) for r in events(out, "step")] and len(curves["loss"]) == 4
    scored = events(out, "eval")
    assert curves["eval"]["metric"] == "recall@1" and curves["eval"]["benchmark"] == "folder"
    assert curves["eval"]["recall@1"] == [(r["step"], r["recall@1"]) for r in scored]
    assert curves["eval"]["map@r"] == [(r["step"], r["map@r"]) for r in scored] and len(scored) == 4
    with PILImage.open(out / "curves.png") as drawn:
        assert drawn.format == "PNG" and drawn.size == (672, 720)  # two panels: the loss, the scores
    plain = tmp_path / "plain"
    assert main(["train", f"data.folder={folders['train']}", *TINY, "train.steps=1", f"out={plain}"]) == 0
    assert "eval" not in training_curves(plain / "log.jsonl")
    with PILImage.open(plain / "curves.png") as drawn:
        assert drawn.size == (672, 408)  # the loss alone


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_several_benchmarks_are_each_scored_and_the_best_of_their_mean_is_kept(folders, tmp_path, capsys):
    """``eval.benchmark=[folder,cub]``: each benchmark's scores are those ``unicom evaluate``
    gives the exported model; OUT/model_best is the step with the best mean of their headline
    metrics; TensorBoard, the summary and the curves carry each one; a run resumed to score one
    of them drops the best of the mean."""
    from benchmark_layouts import cub
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unicom.evaluate.plots import training_curves

    birds = cub(tmp_path / "cub", "flat")
    out = tmp_path / "run"
    keep = ["eval.every=1", "eval.keep_best=true", "checkpoint.every=1", "checkpoint.keep=10", "optim.lr=0.01",
            "log.tensorboard=true"]
    several = recipe(folders, out, "train.steps=3", *keep, "eval.benchmark=[folder,cub]",
                     f"eval.root=[{folders['val']},{birds}]")
    assert main(["train", *several]) == 0
    printed = capsys.readouterr().out
    assert ("eval: folder (72 query images), cub (4 query images), every 1 steps and at the end; the best mean of "
            "folder recall@1, cub recall@1 kept") in printed
    assert "eval step 3: mean of folder recall@1, cub recall@1 " in printed
    scored = events(out, "eval")
    assert [(r["step"], r["benchmark"]) for r in scored] == [(s, b) for s in (1, 2, 3) for b in ("folder", "cub")]
    by_step = {step: {r["benchmark"]: r for r in scored if r["step"] == step} for step in (1, 2, 3)}
    final = {"folder": evaluated(out / "model", folders, tmp_path / "final")}
    assert main(["evaluate", "--model", str(out / "model"), "--dataset", "cub", "--root", str(birds),
                 "--out", str(tmp_path / "final_cub"), "--workers", "0"]) == 0
    final["cub"] = json.loads((tmp_path / "final_cub" / "metrics.json").read_text())["metrics"]
    for name in ("folder", "cub"):
        assert_scores(by_step[3][name], final[name])
    means = [(by_step[s]["folder"]["recall@1"] + by_step[s]["cub"]["recall@1"]) / 2 for s in (1, 2, 3)]
    flags = [by_step[s]["folder"]["best"] for s in (1, 2, 3)]
    assert flags == [by_step[s]["cub"]["best"] for s in (1, 2, 3)]
    assert flags == [means[i] > max(means[:i], default=-1) for i in range(3)]
    best = max(range(3), key=lambda i: (means[i], -i))
    provenance = json.loads((out / "model_best" / "unicom_model.json").read_text())["provenance"]
    assert provenance["step"] == best + 1
    assert provenance["eval"]["benchmark"] == ["folder", "cub"] and provenance["eval"]["metric"] == ["recall@1"] * 2
    assert provenance["eval"]["value"] == pytest.approx(means[best], abs=1e-12)
    assert provenance["eval"]["values"] == [by_step[best + 1][name]["recall@1"] for name in ("folder", "cub")]
    summary = json.loads((out / "summary.json").read_text())["eval"]
    assert_scores(summary["folder"], final["folder"]) and summary["mean"] == pytest.approx(means[2], abs=1e-12)
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    for tag, values in (("eval/folder/recall@1", [by_step[s]["folder"]["recall@1"] for s in (1, 2, 3)]),
                        ("eval/cub/map@r", [by_step[s]["cub"]["map@r"] for s in (1, 2, 3)]), ("eval/mean", means)):
        assert [(e.step, e.value) for e in board.Scalars(tag)] == [(s, pytest.approx(v, abs=1e-6))
                                                                   for s, v in zip((1, 2, 3), values)], tag
    curves = training_curves(out / "log.jsonl")["eval"]
    assert curves["benchmark"] == "folder, cub"
    assert curves["cub recall@1"] == [(s, by_step[s]["cub"]["recall@1"]) for s in (1, 2, 3)]
    assert curves["folder recall@1"] == [(s, by_step[s]["folder"]["recall@1"]) for s in (1, 2, 3)]
    # resumed to score the folder alone: the best mean is not of it
    assert main(["train", *recipe(folders, out, "train.steps=4", *keep)]) == 0
    assert ("is not of folder recall@1: the next evaluation is the best so far" in capsys.readouterr().out)
    (last,) = events(out, "eval")[6:]
    assert last["benchmark"] == "folder" and last["best"]
    assert training_curves(out / "log.jsonl")["eval"]["recall@1"] == [
        (s, by_step[s]["folder"]["recall@1"]) for s in (1, 2, 3)] + [(4, last["recall@1"])]
    # the run's last scores beside unicom evaluate's of its step-3 model
    assert main(["evaluate", "--compare", str(out), str(tmp_path / "final_cub"), "--out", str(tmp_path / "vs")]) == 0
    comparison = json.loads((tmp_path / "vs" / "comparison.json").read_text())
    assert comparison["runs"][0]["evaluated"] == "unicom train, step 4"
    assert comparison["rows"] == [
        {"dataset": "folder", "score": "recall@1", "values": [last["recall@1"], None]},
        {"dataset": "folder", "score": "map@r", "values": [last["map@r"], None]},
        {"dataset": "cub", "score": "recall@1", "values": [None, final["cub"]["recall@1"]]},
        {"dataset": "cub", "score": "map@r", "values": [None, final["cub"]["map@r"]]}]


@pytest.mark.parametrize("override, message", [
    ("eval.root=[a,b]", "eval.benchmark names 1 benchmark(s) and eval.root 2 folder(s): give one folder per benchmark"),
    ("eval.benchmark=[folder,folder]", "eval.benchmark names folder more than once"),
    ("eval.benchmark=[cars,cars196]", "eval.benchmark names cars196 more than once"),
])
def test_several_benchmarks_need_a_folder_each_and_each_once(folders, tmp_path, capsys, override, message):
    args = recipe(folders, tmp_path / "run", override)
    if override.startswith("eval.benchmark"):
        args.append(f"eval.root=[{folders['val']},{folders['val']}]")
    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
