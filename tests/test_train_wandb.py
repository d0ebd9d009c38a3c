"""``log.wandb``: a training run's scalars and recipe in Weights & Biases, read back from the
run file wandb itself writes (offline mode: no server), decoded with wandb's own record schema
(``support.wandb_runs``)."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import yaml
from support import wandb_runs, write_class_folder

from unicom.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("wandb")

TINY = ["model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=2", "model.heads=2",
        "model.embedding_dim=16", "data.batch_size=16", "data.workers=0", "loss.scale=16", "loss.sample_rate=0.5",
        "optim.lr=0.003", "schedule.kind=constant", "log.tensorboard=false", "train.device=cpu", "log.every=1"]

def logged_steps(out) -> dict[int, dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines) if record["event"] == "step"}


def test_a_run_logs_its_scalars_and_recipe_and_a_resumed_run_continues_its_wandb_run(tmp_path, wandb_offline,
                                                                                     monkeypatch):
    write_class_folder(tmp_path / "images", list(range(4)), 8, size=16)
    out = tmp_path / "run"
    common = [f"data.folder={tmp_path / 'images'}", *TINY, "log.wandb=true", "log.wandb_project=retrieval",
              "checkpoint.every=2", f"out={out}"]
    assert main(["train", *common, "train.steps=2"]) == 0
    (first,) = wandb_runs(out)
    assert (first["project"], first["name"], first["exit_code"]) == ("retrieval", "run", 0)  # named as out
    recipe = yaml.safe_load((out / "config.yaml").read_text())
    assert {key: first["config"][key] for key in recipe} == recipe
    # resumed from step 2: the same W&B run goes on (its id kept in out), steps 3 and 4 added
    assert main(["train", *common, "train.steps=4"]) == 0
    runs = wandb_runs(out)
    assert len(runs) == 2 and runs[1]["id"] == first["id"] == json.loads((out / "wandb_run.json").read_text())["id"]
    history = {**runs[0]["history"], **runs[1]["history"]}
    steps = logged_steps(out)
    assert sorted(history) == sorted(steps) == [1, 2, 3, 4]
    for step, record in steps.items():
        row = history[step]
        for name in ("loss", "lr", "grad_norm", "images_per_second"):
            if isinstance(record.get(name), float) and math.isfinite(record[name]):
                assert row[f"train/{name}"] == pytest.approx(record[name], rel=1e-12), (step, name)
            else:  # not a number at this step (the first step's speed): not in W&B either
                assert f"train/{name}" not in row, (step, name)
        assert isinstance(row["train/loss"], float)
    # a run started afresh in the folder (no checkpoint there to resume) is a new W&B run
    shutil.rmtree(out / "checkpoints")
    assert main(["train", *common, "train.steps=1", "log.wandb_name=again"]) == 0
    runs = wandb_runs(out)
    assert len(runs) == 3 and runs[2]["id"] != first["id"] and runs[2]["name"] == "again"
    assert json.loads((out / "wandb_run.json").read_text())["id"] == runs[2]["id"]
    # an id given in WANDB_RUN_ID (as a sweep's agent gives it) is the run's
    monkeypatch.setenv("WANDB_RUN_ID", "sweep123")
    assert main(["train", *common, "train.steps=1", f"out={tmp_path / 'swept'}"]) == 0
    assert wandb_runs(tmp_path / "swept")[0]["id"] == "sweep123"
    monkeypatch.delenv("WANDB_RUN_ID")
    # a run that fails (its checkpoint cannot be written) ends its W&B run as failed
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "checkpoints").touch()
    assert main(["train", *common, "train.steps=2", f"out={failing}"]) == 2
    (failed,) = wandb_runs(failing)
    assert failed["exit_code"] == 1 and sorted(failed["history"]) == [1, 2]


def test_a_run_asking_for_wandb_without_the_package_is_refused_before_it_trains(tmp_path, wandb_offline, monkeypatch, capsys):
    write_class_folder(tmp_path / "images", list(range(4)), 8, size=16)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    out = tmp_path / "run"
    assert main(["train", f"data.folder={tmp_path / 'images'}", *TINY, "log.wandb=true", "train.steps=2",
                 f"out={out}"]) == 2
    assert "log.wandb=true needs the wandb package: pip install 'unicom[wandb]'" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
    assert main(["train", f"data.folder={tmp_path / 'images'}", *TINY, "log.wandb_project=x", "train.steps=1",
                 f"out={out}"]) == 2
    assert "log.wandb_project names the W&B project of log.wandb: set log.wandb=true too" in capsys.readouterr().err
