"""Whole training runs: learning, two processes against one, kill -9 and exact resume,
fine-tuning from released weights, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import free_port, random_unicom_vit, write_class_folder

from unicom.errors import InputError
from unicom.progress import INPUT_BOUND_SHARE

TINY = [
    "model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=2", "model.heads=2",
    "model.embedding_dim=16", "data.batch_size=16", "data.workers=0", "augment.crop_scale=[0.5,1.0]",
    "loss.scale=16", "loss.sample_rate=0.5", "optim.lr=0.003", "train.steps=40", "log.every=1",
    "log.tensorboard=false", "checkpoint.every=10", "train.device=cpu",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "UNICOM_PROGRESS": "0"}


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs then match the subprocesses'


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_class_folder(root, list(range(8)), 16, size=16)
    return root


def overrides(images: Path, out: Path, *extra: str) -> list[str]:
    return [f"out={out}", f"data.folder={images}", *TINY, *extra]


def events(out: Path, name: str) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == name]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in events(out, "step")]


def run_command(args: list[str], env_extra: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (prefix or [sys.executable, "-m", "unicom.train"]) + args
    return subprocess.run(command, env={**ENV, **(env_extra or {})}, capture_output=True, text=True, timeout=300)


def torchrun() -> list[str]:
    """The command that starts ``unicom train`` on two gloo processes (a fresh port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "unicom.train"]


def run_until_paused_then_kill(args: list[str], pause: str) -> str:
    """Start ``unicom train``, wait until it pauses at ``pause`` (fault injection), SIGKILL it."""
    process = subprocess.Popen([sys.executable, "-m", "unicom.train", *args], env={**ENV, "UNICOM_FAULT_PAUSE": pause},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith("fault injection: paused at"):
                break
        else:
            raise AssertionError(f"the run ended without pausing at {pause}: {''.join(seen)[-2000:]}")
    finally:
        process.kill()  # SIGKILL: no cleanup, no flush, no finally blocks
        process.wait(timeout=60)
    assert process.returncode == -9
    return "".join(seen)


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """Backbone and prototypes (with their optimiser state) of the last checkpoint."""
    (checkpoint,) = sorted((out / "checkpoints").glob("step_*"))[-1:]
    state = {f"model.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    for path in checkpoint.glob("prototypes_*.safetensors"):
        state.update({f"{path.stem}.{k}": v for k, v in load_file(str(path)).items()})
    return state


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------- learning


def test_a_tiny_vit_learns_pseudo_classes_and_exports_a_loadable_model(images, tmp_path):
    from unicom.models.encoders import load_encoder
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    summary = train(load_config(None, overrides(images, tmp_path / "run")))
    curve = losses(tmp_path / "run")
    assert summary["steps"] == 40 and len(curve) == 40
    start, end = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert end < 0.4 * start, (start, end)
    encoder = load_encoder(str(tmp_path / "run" / "model"))
    assert encoder.embedding_dim == 16
    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000040" / "model.safetensors"))
    probe = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        encoder.model.load_state_dict(checkpoint)
        assert encoder.encode_image(probe).shape == (2, 16)


def test_the_start_says_which_classes_a_step_uses_and_the_first_line_gives_no_eta(images, tmp_path, capsys):
    """8 classes, 16 images a step, r1 = 0.5: ceil(4) sampled against ~7.1 distinct labels."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=3", "log.every=2")))
    lines = capsys.readouterr().out.splitlines()
    assert "  classes per step: ~7 of 8, the batch's positives only" in lines
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert "loss.sample_rate=0.5 has no effect: a batch of 16 images holds ~7 distinct labels" in warning
    assert "raise loss.sample_rate above ~0.88" in warning
    first, second, last = [line for line in lines if line.startswith("step ")]
    assert first.startswith("step 1/3 ") and "with start-up, ETA from the next line" in first and "img/s" not in first
    assert second.startswith("step 2/3 ") and " img/s ETA " in second and last.startswith("step 3/3 ")
    records = events(tmp_path / "run", "step")
    assert records[0]["images_per_second"] is None and records[0]["startup_seconds"] > 0
    assert records[1]["images_per_second"] > 0 and "startup_seconds" not in records[1]
    assert events(tmp_path / "run", "start")[0]["classes_per_step"] == round(8 * (1 - (7 / 8) ** 16), 1)
    for line, record in zip((second, last), records[1:]):  # the wait for data is told when it is large
        assert ("waited for data" in line) == (record["data_wait"] >= INPUT_BOUND_SHARE), (line, record)
    told = [line for line in (second, last) if "waited for data" in line]
    assert ["may feed it faster" in line for line in told] == [True] + [False] * (len(told) - 1)  # remedies once


def test_a_step_line_tells_a_long_wait_for_data_with_what_to_change():
    from unicom.train.trainer import data_wait_note

    assert data_wait_note(INPUT_BOUND_SHARE - 0.01) == ""
    assert data_wait_note(0.6) == (" (waited for data 60% of the time: reading and decoding limit this run; more "
                                   "data.workers, or data.decode=gpu on a GPU where the augmentation allows, may feed "
                                   "it faster)")
    assert data_wait_note(0.6, remedies=False) == " (waited for data 60% of the time)"  # the lines after the first


def test_the_start_line_names_every_class_or_the_random_negatives():
    from unicom.losses import classes_per_step
    from unicom.train.trainer import _describe_selection

    assert _describe_selection(classes_per_step(8, 16, 1.0), 16, 1.0) == ["  classes per step: all 8"]
    lines = _describe_selection(classes_per_step(10, 16, 0.95), 16, 0.95)
    assert lines[0] == "  classes per step: all 10" and lines[1].startswith("warning: loss.sample_rate=0.95 keeps every class")
    # 4 classes, 64 images: every class is a positive; no sample_rate (at most 1) leaves room for negatives
    (_, warning) = _describe_selection(classes_per_step(4, 64, 0.5), 64, 0.5)
    assert warning.endswith("for random negatives the batch holds nearly all 4 classes, so no sample_rate can add any: "
                            "lower data.batch_size or train on more classes")
    # 100 000 classes, 1024 images: ~1019 positives and 10 000 - 1019 random negatives
    assert _describe_selection(classes_per_step(100_000, 1024, 0.1), 1024, 0.1) == [
        "  classes per step: ~10,000 of 100,000 (the batch's ~1,019 positives and ~8,981 random negatives)"]


def test_zero_steps_export_the_network_the_recipe_and_seed_start_from(images, tmp_path):
    import unicom
    from unicom.engine.seeding import seed_everything
    from unicom.models.export import read_config, read_weights
    from unicom.models.vit import create_model
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    config = load_config(None, overrides(images, tmp_path / "run", "train.steps=0", "seed=5", "data.workers=2",
                                              "data.batch_size=100000"))  # a batch larger than the data: no image is read
    summary = train(config)
    assert summary["steps"] == 0 and summary["checkpoint"] is None
    assert not (tmp_path / "run" / "checkpoints").exists()
    exported = read_weights(tmp_path / "run" / "model")
    seed_everything(5)
    reference = create_model("ViT-B-32", overrides=config.model.overrides()).module.state_dict()
    assert_identical(exported, reference)
    seed_everything(6)
    other = create_model("ViT-B-32", overrides=config.model.overrides()).module.state_dict()
    assert not all(torch.equal(exported[key], other[key]) for key in exported)  # the seed decides
    provenance = read_config(tmp_path / "run" / "model")["provenance"]
    assert provenance["seed"] == 5 and provenance["step"] == 0
    model, _ = unicom.load(str(tmp_path / "run" / "model"))
    assert_identical(model.state_dict(), reference)


def test_zero_steps_never_overwrite_the_model_of_a_run(images, tmp_path):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=2")))
    trained = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match="train.steps=0 exports the untrained network .* holds a run .* use another out"):
        train(load_config(None, overrides(images, tmp_path / "run", "train.steps=0")))
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == trained


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_loss_curve(images, tmp_path):
    """Same global batch (2 x 8 against 1 x 16), every class in every step: the losses agree
    to 1e-4 at every one of 40 steps (measured: about 2e-6)."""
    common = ["loss.sample_rate=1.0"]
    single = run_command(overrides(images, tmp_path / "one", *common))
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_command(overrides(images, tmp_path / "two", *common, "data.batch_size=8"), prefix=torchrun())
    assert double.returncode == 0, (double.stdout + double.stderr)[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 40
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert one[-1] < 0.5 * one[0]  # and they learned


# --------------------------------------------------------------------- kill -9 and resume


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_command(overrides(images, out, "data.workers=2", "checkpoint.every=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(out)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(images, tmp_path, uninterrupted):
    args = overrides(images, tmp_path / "run", "data.workers=2", "checkpoint.every=5")
    run_until_paused_then_kill(args, "step:8")  # checkpoint 5 is written, steps 6-8 are lost
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000005"]
    resumed = run_command(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000005 at step 5" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 40
    assert_identical(final_state(tmp_path / "run"), uninterrupted)


def _tensorboard_steps(out: Path) -> list[int]:
    """The steps of ``train/loss`` as TensorBoard shows them (after its purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


@pytest.mark.slow
def test_the_log_of_a_resumed_run_holds_every_step_once(images, tmp_path):
    """Steps 6-8 are logged, lost with the kill and taken again: log.jsonl and TensorBoard
    keep the second take only."""
    args = overrides(images, tmp_path / "run", "train.steps=10", "checkpoint.every=5", "log.tensorboard=true")
    run_until_paused_then_kill(args, "step:8")
    assert [r["step"] for r in events(tmp_path / "run", "step")] == list(range(1, 9))
    assert run_command(args).returncode == 0
    assert [r["step"] for r in events(tmp_path / "run", "step")] == list(range(1, 11))
    assert [r["step"] for r in events(tmp_path / "run", "resume")] == [5]
    assert _tensorboard_steps(tmp_path / "run") == list(range(1, 11))


@pytest.mark.slow
def test_a_start_killed_before_its_first_checkpoint_leaves_nothing_in_the_log_of_the_next(images, tmp_path):
    args = overrides(images, tmp_path / "run", "train.steps=6", "checkpoint.every=5", "log.tensorboard=true")
    run_until_paused_then_kill(args, "step:3")
    assert run_command(args).returncode == 0
    assert len(events(tmp_path / "run", "start")) == 1
    assert [r["step"] for r in events(tmp_path / "run", "step")] == list(range(1, 7))
    assert _tensorboard_steps(tmp_path / "run") == list(range(1, 7))


def _failure_list(out: Path, rank: int, steps: list[int]) -> Path:
    path = out / f"failures_rank{rank}.jsonl"
    path.write_text("".join(json.dumps({"step": step, "key": f"k{step}", "reason": "not an image"}) + "\n" for step in steps))
    return path


def test_a_resume_on_fewer_ranks_leaves_out_what_the_missing_ranks_listed_of_the_steps_taken_again(tmp_path):
    """A 2-rank run killed at step 7 after checkpoint 5, resumed on 1 rank: rank 1 is gone,
    and its list of steps 6-7 (taken again, by rank 0 now) goes with them; a fresh start
    empties every list."""
    from unicom.engine.runlog import RunLog

    mine, gone = _failure_list(tmp_path, 0, [2, 6]), _failure_list(tmp_path, 1, [3, 5, 7])
    RunLog(tmp_path, tensorboard=False, continues_from=5).close()
    assert [json.loads(line)["step"] for line in mine.read_text().splitlines()] == [2]
    assert [json.loads(line)["step"] for line in gone.read_text().splitlines()] == [3, 5]
    RunLog(tmp_path, tensorboard=False, continues_from=0).close()
    assert (mine.read_text(), gone.read_text()) == ("", "")


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(images, tmp_path, uninterrupted):
    args = overrides(images, tmp_path / "run", "data.workers=2", "checkpoint.every=5")
    run_until_paused_then_kill(args, "checkpoint:15")
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".step_00000015.tmp", "step_00000005", "step_00000010"]
    resumed = run_command(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000010 at step 10" in resumed.stdout
    assert not (folder / ".step_00000015.tmp").exists()
    assert_identical(final_state(tmp_path / "run"), uninterrupted)


def test_the_host_reads_step_results_at_log_lines_only_and_the_weights_are_unchanged(images, tmp_path, monkeypatch):
    """With log.every = 4 the host queues steps 2-4 before it reads step 2's result: the
    results are read at steps 1 (the first line), 4, 8 and 10 (the last), and the weights
    equal those of a run that reads every step's result as it ends."""
    from support import record_step_reads

    from unicom.train.config import load_config
    from unicom.train.trainer import train

    train(load_config(None, overrides(images, tmp_path / "each", "train.steps=10")))
    _, read_at = record_step_reads(monkeypatch)
    train(load_config(None, overrides(images, tmp_path / "deferred", "train.steps=10", "log.every=4")))
    assert read_at == [1, 4, 4, 4, 8, 8, 8, 8, 10, 10]
    assert_identical(final_state(tmp_path / "deferred"), final_state(tmp_path / "each"))


@pytest.mark.slow
def test_decoding_on_the_device_a_batch_ahead_resumes_to_the_same_weights(images, tmp_path):
    """data.decode=gpu (here torchvision's decoder on the CPU): the next batch is decoded while
    a step runs, so a killed run has read a batch it never used; the checkpoint's reading
    positions leave it out, and the resumed run reaches the uninterrupted run's weights."""
    settings = ("data.decode=gpu", "data.workers=2", "checkpoint.every=5", "train.steps=12")
    straight = run_command(overrides(images, tmp_path / "straight", *settings))
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = overrides(images, tmp_path / "run", *settings)
    run_until_paused_then_kill(args, "step:8")
    resumed = run_command(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000005 at step 5" in resumed.stdout
    assert_identical(final_state(tmp_path / "run"), final_state(tmp_path / "straight"))


def _limit_file_size(limit: int = 100_000):
    """A disk that refuses writes past ``limit`` bytes a file, as a full one would (the tiny
    model's weights are 270 KB): the write fails with EFBIG instead of killing the process."""
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_run_the_disk_refuses_from_the_start_says_so_without_a_traceback(images, tmp_path):
    import functools

    out = tmp_path / "run"
    failed = subprocess.run([sys.executable, "-m", "unicom.train", *overrides(images, out)], env=ENV, capture_output=True,
                            text=True, timeout=300, preexec_fn=functools.partial(_limit_file_size, 100))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert f"{out}: the run's recipe (config.yaml) could not be written (" in failed.stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_a_checkpoint_the_disk_refuses_stops_the_run_keeping_no_part_of_it(images, tmp_path):
    out = tmp_path / "run"
    assert run_command(overrides(images, out, "train.steps=2", "checkpoint.every=2")).returncode == 0
    failed = subprocess.run([sys.executable, "-m", "unicom.train", *overrides(images, out, "train.steps=4", "checkpoint.every=2")],
                            env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert (f"{out / 'checkpoints'}: checkpoint step_00000004 could not be written (the write stopped short, as on a "
            "full disk (") in failed.stderr
    assert "then run again: the run resumes from its newest intact checkpoint" in failed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    resumed = run_command(overrides(images, out, "train.steps=4", "checkpoint.every=2"))
    assert resumed.returncode == 0 and "step_00000002 at step 2" in resumed.stdout, resumed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


@pytest.mark.slow
def test_a_model_the_disk_refuses_is_exported_by_the_next_run(images, tmp_path):
    out = tmp_path / "run"
    assert run_command(overrides(images, out, "train.steps=2", "checkpoint.every=2")).returncode == 0
    exported = (out / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "model")
    failed = subprocess.run([sys.executable, "-m", "unicom.train", *overrides(images, out, "train.steps=2", "checkpoint.every=2")],
                            env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert f"{out}: the model (model/) could not be written (the write stopped short" in failed.stderr
    assert run_command(overrides(images, out, "train.steps=2", "checkpoint.every=2")).returncode == 0
    assert (out / "model" / "model.safetensors").read_bytes() == exported


def test_going_on_from_an_earlier_checkpoint_than_the_newest_is_refused_while_the_later_ones_are_there(images, tmp_path):
    """Resumed from step 2 of a run at step 6, a run would write step 4 beside the old step 6:
    pruning (keep 2) would delete its own step 4, and the next resume would take the old step 6."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    out = tmp_path / "run"
    train(load_config(None, overrides(images, out, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=3")))
    earlier = out / "checkpoints" / "step_00000002"
    again = overrides(images, out, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2", "optim.lr=0.001",
                      f"checkpoint.resume={earlier}")
    log = (out / "log.jsonl").read_text()
    with pytest.raises(InputError, match=rf"checkpoint.resume={earlier}: {out} holds later checkpoints \(step_00000004, "
                                         r"step_00000006\) .* to go on from step 2, delete them, or give another out"):
        train(load_config(None, again))
    assert (out / "log.jsonl").read_text() == log
    for later in ("step_00000004", "step_00000006"):
        shutil.rmtree(out / "checkpoints" / later)
    assert train(load_config(None, again))["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert json.loads((out / "checkpoints" / "step_00000006" / "checkpoint.json").read_text())["config"]["optim"]["lr"] == 0.001


def test_resuming_the_run_folder_itself_skips_its_damaged_newest_checkpoint_as_auto_does(images, tmp_path, capsys):
    """`--resume out` names the run, not an earlier checkpoint of it: the damaged newest is no
    later checkpoint to delete, the run goes on from the one before and writes it anew."""
    from unicom.train.config import load_config
    from unicom.engine.checkpoint import verify_checkpoint
    from unicom.train.trainer import train

    out = tmp_path / "run"
    args = overrides(images, out, "train.steps=4", "checkpoint.every=2")
    train(load_config(None, args))
    damaged = out / "checkpoints" / "step_00000004" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    assert train(load_config(None, [*args, f"checkpoint.resume={out}"]))["steps"] == 4
    assert "step_00000002 at step 2" in capsys.readouterr().out
    assert verify_checkpoint(out / "checkpoints" / "step_00000004") is None  # written anew, whole


def test_resume_asked_for_in_a_folder_without_a_checkpoint_is_an_error_not_a_fresh_start(images, tmp_path, capsys):
    from unicom.cli import main

    typo = tmp_path / "rnu"
    assert main(["train", *overrides(images, typo, "train.steps=2"), "--resume"]) == 2
    assert capsys.readouterr().err == (f"unicom train: error: --resume: {typo} holds no checkpoint to resume; check out=, "
                                       "give the checkpoint (--resume PATH), or leave --resume out to start a run there\n")
    assert not typo.exists()
    assert main(["train", *overrides(images, typo, "train.steps=2")]) == 0
    assert main(["train", *overrides(images, typo, "train.steps=3"), "--resume"]) == 0
    assert "at step 2" in capsys.readouterr().out


def test_an_override_right_after_resume_is_not_taken_for_the_checkpoint(images, tmp_path, capsys):
    """argparse gives `--resume` the word after it: `--resume data.folder=...` would train
    without the data it names, and `--resume out=...` look for a folder named `out=...`."""
    from unicom.cli import main

    assert main(["train", "--resume", f"out={tmp_path / 'run'}", *overrides(images, tmp_path / "run")[1:]]) == 2
    assert capsys.readouterr().err == (f"unicom train: error: --resume took the override 'out={tmp_path / 'run'}' for its "
                                       "CHECKPOINT; write --resume after the overrides (or --resume=auto), or give the "
                                       "checkpoint or run folder after it\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the choice itself is covered by test_train_checkpoint; this is the whole run
def test_a_damaged_newest_checkpoint_is_replaced_by_the_previous_one(images, tmp_path, uninterrupted):
    args = overrides(images, tmp_path / "run", "data.workers=2", "checkpoint.every=5")
    run_until_paused_then_kill(args, "step:12")
    damaged = tmp_path / "run" / "checkpoints" / "step_00000010" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    resumed = run_command(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000010 is damaged and is skipped" in resumed.stdout
    assert "step_00000005 at step 5" in resumed.stdout
    assert_identical(final_state(tmp_path / "run"), uninterrupted)


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_rank(images, tmp_path):
    first = run_command(overrides(images, tmp_path / "run", "data.batch_size=8", "train.steps=20"), prefix=torchrun())
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_command(overrides(images, tmp_path / "run", "data.batch_size=16", "train.steps=30"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "written by 2 rank(s)" in second.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 30
    blocks = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000030").glob("prototypes_*"))
    assert blocks == ["prototypes_000000000_000000008.safetensors"]


@pytest.mark.slow
def test_a_two_rank_run_resumed_on_one_rank_and_back_keeps_its_global_batch_and_epochs(images, tmp_path):
    """2 ranks x 8, then 1 rank x 8 (accumulation 2), then 2 ranks x 8 with a recipe saying
    accumulation 2 (back to 1): 16 images and 1/8 epoch per step throughout."""
    out = tmp_path / "run"
    first = run_command(overrides(images, out, "data.batch_size=8", "train.steps=10", "checkpoint.every=5"), prefix=torchrun())
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    second = run_command(overrides(images, out, "data.batch_size=8", "train.steps=20", "checkpoint.every=5"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "train.accumulation=2 instead of 1: 1 rank(s) x 8 images x 2 micro-step(s) keep the checkpoint's global batch " \
           "of 16 (2 rank(s) x 8 images x 1 micro-step(s))" in second.stdout
    third = run_command(overrides(images, out, "data.batch_size=8", "train.accumulation=2", "train.steps=30",
                                  "checkpoint.every=5"), prefix=torchrun())
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert "train.accumulation=1 instead of 2" in third.stdout
    starts = events(out, "start")
    assert [s["global_batch"] for s in starts] == [16, 16, 16] and [s["steps_per_epoch"] for s in starts] == [8, 8, 8]
    steps = events(out, "step")
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert [r["epoch"] for r in steps] == [round(step / 8, 4) for step in range(1, 31)]
    manifest = json.loads((out / "checkpoints" / "step_00000020" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 1 and manifest["global_batch"] == 16 and manifest["config"]["train"]["accumulation"] == 2


def _checkpointed_run(images: Path, out: Path) -> None:
    """A run of 4 steps of 1 rank x 16 images, checkpointed at 2 and 4 (half an epoch)."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    train(load_config(None, overrides(images, out, "train.steps=4", "checkpoint.every=2")))


def test_a_batch_no_whole_accumulation_makes_up_is_refused_with_what_would(images, tmp_path):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    _checkpointed_run(images, tmp_path / "run")
    with pytest.raises(InputError, match=r"global batch of 16 \(1 rank\(s\) x 16 images x 1 micro-step\(s\)\); 1 rank\(s\) x "
                                         r"data.batch_size=12 .* Use data.batch_size=8 .* checkpoint.resume_batch=change"):
        train(load_config(None, overrides(images, tmp_path / "run", "train.steps=6", "data.batch_size=12")))


def test_a_smaller_batch_on_the_same_ranks_accumulates_to_the_checkpoints_batch(images, tmp_path, capsys):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    _checkpointed_run(images, tmp_path / "run")
    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=6", "data.batch_size=8")))
    assert "train.accumulation=2 instead of 1" in capsys.readouterr().out
    assert [r["epoch"] for r in events(tmp_path / "run", "step")] == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    assert "accumulation: 2" in (tmp_path / "run" / "config.yaml").read_text()


def test_an_allowed_batch_change_counts_epochs_on_from_the_checkpoint(images, tmp_path, capsys):
    """Half an epoch at 16 images a step, then 8 a step (16 steps an epoch): one epoch in all
    takes 8 more steps, and step 5 ends epoch 0.5 + 1/16."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    _checkpointed_run(images, tmp_path / "run")
    summary = train(load_config(None, overrides(images, tmp_path / "run", "train.steps=null", "train.epochs=1",
                                                "data.batch_size=8", "checkpoint.resume_batch=change")))
    assert "this run steps with 8 (1 x 8 x 1), as checkpoint.resume_batch=change allows" in capsys.readouterr().out
    assert summary["steps"] == 12
    epochs = [r["epoch"] for r in events(tmp_path / "run", "step")]
    assert epochs[4:] == [round(0.5 + (step - 4) / 16, 4) for step in range(5, 13)] and epochs[-1] == 1.0


def test_a_resumed_run_says_which_settings_differ_from_the_checkpoints(images, tmp_path, capsys):
    """A longer run with another learning rate and margin (null: the head's own) goes on, and
    says so; where it writes and how often it logs are no change of the training."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    _checkpointed_run(images, tmp_path / "run")
    capsys.readouterr()
    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=6", "optim.lr=0.001", "loss.margin=0.2",
                                      "log.every=2", "checkpoint.every=3")))
    (note,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == ("note: the recipe differs from the checkpoint's and the run goes on with this one: "
                    "loss.margin null -> 0.2; optim.lr 0.003 -> 0.001; train.steps 4 -> 6")


def test_a_resumed_run_with_the_checkpoints_recipe_has_no_note(images, tmp_path, capsys):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    _checkpointed_run(images, tmp_path / "run")
    capsys.readouterr()
    (tmp_path / "run" / "checkpoints" / "step_00000004").rename(tmp_path / "run" / "checkpoints" / "old")
    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=4", "checkpoint.every=2")))
    output = capsys.readouterr().out
    assert "resumed from" in output and "note:" not in output


def _pseudo_labels(images: Path, folder: Path, seed: int) -> str:
    """The images' classes as the pseudo-labels of a clustering run into ``folder`` with
    centroids drawn from ``seed`` (the labels are the same whatever the seed); returns the
    digest of its centroids."""
    import numpy as np
    import pyarrow as pa

    from unicom.formats.clusters import ClusterFolder, centroids_digest

    keys = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    labels = np.array([int(key.split("/")[0].rsplit("_", 1)[1]) for key in keys])
    centroids = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
    run = ClusterFolder(folder)
    run.write_centroids(centroids, {"k": 8, "dimension": 4})
    run.write_labels(0, pa.array(keys), labels, np.ones(len(keys), np.float32), {"rows": len(keys), "invalid": 0, "key_column": "key"})
    run.write_assignment({"inputs": {"shards": {"0": len(keys)}}, "centroids": centroids_digest(centroids)})
    return centroids_digest(centroids)


def test_a_run_does_not_resume_on_pseudo_labels_of_other_centroids(images, tmp_path):
    """Clustered again, cluster c is another group of images, and the checkpoint's prototype
    row c learnt the old one: resuming on the new labels would mix the two without a word."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    first = _pseudo_labels(images, tmp_path / "clusters", seed=0)
    recipe = [f"data.labels={tmp_path / 'clusters'}", "checkpoint.every=2"]
    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=2", *recipe)))
    shutil.rmtree(tmp_path / "clusters")
    again = _pseudo_labels(images, tmp_path / "clusters", seed=1)
    with pytest.raises(InputError) as error:
        train(load_config(None, overrides(images, tmp_path / "run", "train.steps=4", *recipe)))
    assert str(error.value) == (
        f"{tmp_path / 'run' / 'checkpoints' / 'step_00000002'} was trained on pseudo-labels of other centroids than those "
        f"of {tmp_path / 'clusters'} now (clustered again since: centroids {first} there, {again} now), and its "
        "prototypes belong to those: give the labels it was trained on, or start a new run in another out (model.init "
        "may take this run's model)")
    shutil.rmtree(tmp_path / "clusters")
    _pseudo_labels(images, tmp_path / "clusters", seed=0)  # the labels it was trained on: it resumes
    assert train(load_config(None, overrides(images, tmp_path / "run", "train.steps=4", *recipe)))["steps"] == 4


def test_prototypes_are_not_taken_from_a_run_on_pseudo_labels_of_other_centroids(images, tmp_path, capsys):
    """model.init=RUN on labels clustered again (say with embeddings of RUN's model): the
    backbone is taken, but prototype row c learnt another cluster, so the prototypes start afresh."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    first = _pseudo_labels(images, tmp_path / "first", seed=0)
    again = _pseudo_labels(images, tmp_path / "again", seed=1)
    train(load_config(None, overrides(images, tmp_path / "run", "train.steps=2", f"data.labels={tmp_path / 'first'}")))
    capsys.readouterr()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    for labels, out in (("again", "next"), ("first", "same")):
        train(load_config(None, overrides(images, tmp_path / out, "train.steps=0", f"data.labels={tmp_path / labels}",
                                          f"model.init={tmp_path / 'run'}")))
        printed = capsys.readouterr().out
        if labels == "again":
            assert (f"prototypes start afresh: {checkpoint} was trained on pseudo-labels of other centroids ({first}) "
                    f"than this run's ({again})") in printed
        else:
            assert f"prototypes start from {checkpoint}" in printed


# ----------------------------------------------------------------- fine-tuning and export


def test_fine_tuning_starts_from_a_released_checkpoint_file(images, tmp_path):
    import unicom
    from unicom.models.unicom_vit import ViTSettings
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    settings = ViTSettings(image_size=16, patch_size=8, width=64, depth=1, heads=1, mlp_dim=64, embedding_dim=12)
    released = tmp_path / "FP16-tiny.pt"
    torch.save({k: v.half() for k, v in random_unicom_vit(settings).state_dict().items()}, released)
    config = load_config("finetune_sop", [
        f"model.init={released}", f"out={tmp_path / 'run'}", "data.benchmark=null", f"data.folder={images}",
        "data.batch_size=16", "data.workers=0", "train.steps=4", "augment.randaugment=null", "log.tensorboard=false",
    ])
    train(config)
    model, transform = unicom.load(str(tmp_path / "run" / "model"))
    assert type(model).__name__ == "UnicomViT" and model.embedding_dim == 12
    start = torch.load(released, weights_only=True)
    assert not torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], start["blocks.0.mlp.fc1.weight"].float())


def test_fine_tuning_from_a_released_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    monkeypatch.setenv("UNICOM_OFFLINE", "1")
    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    write_class_folder(tmp_path / "images", [0, 1], 4, size=16)
    config = load_config("finetune_sop", [
        "model.init=ViT-B/32", f"out={tmp_path / 'run'}", "data.benchmark=null", f"data.folder={tmp_path / 'images'}",
        "data.batch_size=2", "data.workers=0",
    ])
    with pytest.raises(InputError, match=f"put the file .* at {tmp_path / 'cache' / 'FP16-ViT-B-32.pt'}"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_any_checkpoint_exports_as_a_model_folder(images, tmp_path):
    from unicom.cli import main
    from unicom.models.export import read_config, read_weights

    result = run_command(overrides(images, tmp_path / "run", "train.steps=10", "checkpoint.every=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", "--export-from", str(tmp_path / "run" / "checkpoints" / "step_00000005"),
                 "--model-out", str(tmp_path / "model5")]) == 0
    config = read_config(tmp_path / "model5")
    assert config["architecture"] == "clip_vit" and config["provenance"]["step"] == 5
    exported = read_weights(tmp_path / "model5")
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert_identical(exported, saved)


def test_a_run_or_checkpoint_given_as_a_model_says_what_to_give(images, tmp_path):
    import unicom
    from unicom.models.encoders import load_encoder

    run = tmp_path / "run"
    result = run_command(overrides(images, run, "train.steps=2", "checkpoint.every=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    for load in (unicom.load, load_encoder):
        with pytest.raises(InputError, match=f"it is a training run: its exported model is {run / 'model'}$"):
            load(str(run))
        with pytest.raises(InputError, match=r"it is a training checkpoint: `unicom train --export-from .*step_00000002"):
            load(str(run / "checkpoints" / "step_00000002"))
