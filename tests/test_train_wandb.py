"""``log.wandb``: a training run's scalars and recipe in Weights & Biases, read back from the
run file wandb itself writes (offline mode: no server), decoded with wandb's own record schema."""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys

import pytest
import yaml
from support import write_class_folder

from unicom.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("wandb")

TINY = ["model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=2", "model.heads=2",
        "model.embedding_dim=16", "data.batch_size=16", "data.workers=0", "loss.scale=16", "loss.sample_rate=0.5",
        "optim.lr=0.003", "schedule.kind=constant", "log.tensorboard=false", "train.device=cpu", "log.every=1"]

BLOCK = 32 * 1024  # wandb's run files are LevelDB logs: 32 KiB blocks of records with a 7-byte header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path) -> list:
    """The records of a ``.wandb`` run file, decoded with wandb's protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no wandb run file"
    records, pieces, position = [], b"", 7  # the file's own header: ":W&B", magic, version
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zeros to the block's end
            position += left
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_runs(out) -> list[dict]:
    """Each offline W&B run under ``out/wandb`` (one per start of the run), in their order:
    its id, project, name, config and history rows ``{step: {key: value}}``."""
    runs = []
    for folder in sorted((out / "wandb").glob("offline-run-*")):
        (path,) = folder.glob("run-*.wandb")
        found = {"history": {}, "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name)
                found["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                found["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "exit":
                found["exit_code"] = record.exit.exit_code
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                found["history"].setdefault(int(record.history.step.num), {}).update(row)
        runs.append(found)
    return runs


def logged_steps(out) -> dict[int, dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines) if record["event"] == "step"}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_a_run_logs_its_scalars_and_recipe_and_a_resumed_run_continues_its_wandb_run(tmp_path, offline):
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
    # a run that fails (its checkpoint cannot be written) ends its W&B run as failed
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "checkpoints").touch()
    assert main(["train", *common, "train.steps=2", f"out={failing}"]) == 2
    (failed,) = wandb_runs(failing)
    assert failed["exit_code"] == 1 and sorted(failed["history"]) == [1, 2]


def test_a_run_asking_for_wandb_without_the_package_is_refused_before_it_trains(tmp_path, offline, monkeypatch, capsys):
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
