"""Checkpoints: rank-count independent prototypes, verification, atomic writes, retention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import run_workers

from unicom.engine.checkpoint import (
    complete_checkpoints,
    find_valid_checkpoint,
    load_model_state,
    load_prototypes,
    load_rank_state,
    resolve_run_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from unicom.errors import InputError

MANIFEST = {"num_classes": 7, "centers": 1, "embedding_dim": 8}


def _prototypes(pfc, optimizer) -> dict:
    state = optimizer.state[pfc.prototypes]
    return {"class_start": pfc.class_start, "classes": pfc.num_local, "centers": 1, "weight": pfc.prototypes,
            "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"], "step": state["step"],
            "common_step": state["common_step"]}


def _train_and_save(rank, world_size, out):
    """Two ranks shard 7 classes (4 + 3), take one sparse SparseAdamW step and save together."""
    from unicom.losses import PartialFC
    from unicom.optim import SparseAdamW

    pfc = PartialFC(8, 7, sample_rate=0.5, seed=3)
    optimizer = SparseAdamW(pfc.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    pfc(torch.randn(4, 8, generator=generator), torch.randint(0, 7, (4,), generator=generator)).backward()
    optimizer.step()
    save_checkpoint(out, 5, model_state={"w": torch.arange(3.0)}, optimizer_state=None,
                    prototypes=_prototypes(pfc, optimizer), rank_state={"rank": rank}, manifest=MANIFEST, keep=2)
    state = optimizer.state[pfc.prototypes]
    return {key: value.numpy().copy() for key, value in
            (("weight", pfc.prototypes.detach()), ("exp_avg", state["exp_avg"]), ("step", state["step"]))}


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = run_workers(_train_and_save, 2, out, timeout=120)
    assert all(status == "ok" for status, _ in results), results
    return out, [value for _, value in results]


def _checks_before_training(rank, world_size, run, missing):
    """Rank 0 sees a run folder with checkpoints, rank 1 has no such folder (disks of their own)."""
    from types import SimpleNamespace

    from unicom.train.trainer import _find_resume, _refuse_trained_out

    out = run if rank == 0 else missing
    refusals = []
    for check in (lambda: _find_resume(SimpleNamespace(out=out, checkpoint=SimpleNamespace(resume="never")), print),
                  lambda: _refuse_trained_out(out)):
        try:
            check()
        except InputError as error:
            refusals.append(str(error))
    return refusals


def test_ranks_without_the_run_folder_take_part_in_the_checks_before_training(two_rank_checkpoint, tmp_path):
    out, _ = two_rank_checkpoint
    results = run_workers(_checks_before_training, 2, out, tmp_path / "absent", timeout=60, group_timeout=20.0)
    assert [status for status, _ in results] == ["ok", "ok"], results
    # both ranks refuse, each naming its own folder: rank 0's checkpoints reached rank 1
    for (_, refusals), folder in zip(results, (out, tmp_path / "absent")):
        assert len(refusals) == 2
        assert refusals[0].startswith(f"{folder} holds checkpoints (newest step_00000005)")
        assert refusals[1].startswith(f"train.steps=0 exports the untrained network to {folder / 'model'}")


def test_prototypes_saved_by_two_ranks_load_on_one(two_rank_checkpoint):
    out, shards = two_rank_checkpoint
    (path,) = complete_checkpoints(out)
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("prototypes")) == [
        "prototypes_000000000_000000004.safetensors", "prototypes_000000004_000000007.safetensors"]
    loaded = load_prototypes(path, 0, 7, 1, 8)
    for key in ("weight", "exp_avg", "step"):
        np.testing.assert_array_equal(loaded[key].numpy(), np.concatenate([shards[0][key], shards[1][key]]))
    # only the rows that took part in the sparse step moved: their per-row step count is 1
    assert set(loaded["step"].tolist()) == {0, 1}


def test_prototypes_saved_by_two_ranks_load_on_three(two_rank_checkpoint):
    from unicom.losses import shard_range

    out, shards = two_rank_checkpoint
    (path,) = complete_checkpoints(out)
    everything = np.concatenate([shards[0]["weight"], shards[1]["weight"]])
    for rank in range(3):
        start, count = shard_range(7, rank, 3)  # 0-2, 3-4, 5-6: the middle block spans both files
        np.testing.assert_array_equal(load_prototypes(path, start, count, 1, 8)["weight"].numpy(), everything[start:start + count])


def test_every_rank_keeps_its_own_state_file(two_rank_checkpoint):
    out, _ = two_rank_checkpoint
    (path,) = complete_checkpoints(out)
    assert [load_rank_state(path, r)["rank"] for r in range(2)] == [0, 1]
    assert verify_checkpoint(path) is None
    torch.testing.assert_close(load_model_state(path)["w"], torch.arange(3.0))


def _save(out, step, keep=3, value=0.0):
    weight = torch.full((7, 8), float(value))
    prototypes = {"class_start": 0, "classes": 7, "centers": 1, "weight": weight}
    return save_checkpoint(out, step, model_state={"w": torch.full((4,), float(value))}, optimizer_state={"lr": 0.1},
                           prototypes=prototypes, rank_state={"step": step}, manifest=MANIFEST, keep=keep)


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    _save(tmp_path, 10, value=1)
    newest = _save(tmp_path, 20, value=2)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    (newest / "model.safetensors").write_bytes(bytes(data))
    messages = []
    chosen = find_valid_checkpoint(complete_checkpoints(tmp_path), log=messages.append)
    assert chosen.name == "step_00000010"
    assert "step_00000020 is damaged" in messages[0] and "SHA-256" in messages[0]


def test_a_truncated_file_is_detected_by_its_size(tmp_path):
    path = _save(tmp_path, 3)
    with open(path / "prototypes_000000000_000000007.safetensors", "r+b") as f:
        f.truncate(10)
    assert "10 bytes, the manifest says" in verify_checkpoint(path)


def test_an_interrupted_write_is_ignored_and_cleared_by_the_next_one(tmp_path):
    _save(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / ".step_00000002.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000001"]
    _save(tmp_path, 3)
    assert not leftover.exists()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000001"]


def test_ctrl_c_during_a_write_leaves_the_previous_checkpoint_and_no_partial_one(tmp_path, monkeypatch):
    """`unicom train` interrupted while it saves: the run resumes from the last complete
    checkpoint, and no hidden half-written folder is left in checkpoints/."""
    import signal
    import threading

    _save(tmp_path, 1)
    monkeypatch.setenv("UNICOM_FAULT_PAUSE", "checkpoint:2")  # the write waits before its manifest
    monkeypatch.setenv("UNICOM_FAULT_PAUSE_SECONDS", "60")
    callers = signal.signal(signal.SIGINT, signal.default_int_handler)
    # to the main thread, as a terminal's Ctrl-C reaches it: it interrupts the paused write
    # (raise_signal from this timer's thread would be seen only once the pause has ended)
    ctrl_c = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 2)
    finally:
        ctrl_c.cancel()
        signal.signal(signal.SIGINT, callers)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert find_valid_checkpoint(complete_checkpoints(tmp_path)).name == "step_00000001"


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def test_a_checkpoint_named_by_its_plain_step_number_points_to_the_folder_as_named(tmp_path):
    folder = _save(tmp_path, 500)
    assert resolve_run_checkpoint(tmp_path / "checkpoints" / "step_00000500") == folder
    with pytest.raises(InputError, match=f"step_500: no such run or checkpoint folder .*named step_00000500: {folder}"):
        resolve_run_checkpoint(tmp_path / "checkpoints" / "step_500")
    with pytest.raises(InputError, match="elsewhere: no such run or checkpoint folder$"):
        resolve_run_checkpoint(tmp_path / "elsewhere")


def test_checkpoint_files_get_the_mode_a_plain_write_gives(tmp_path):
    """safetensors' save_file replaces the file it writes by one of mode 0o600: the weights and
    prototypes would be unreadable by the other users of a shared run folder (a colleague's
    evaluation, a server run as another user)."""
    import os

    previous = os.umask(0o022)
    try:
        folder = _save(tmp_path, 10)
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "checkpoint.json": 0o644, "model.safetensors": 0o644, "optimizer.pt": 0o644,
        "prototypes_000000000_000000007.safetensors": 0o644, "rank_0.pt": 0o644}


def test_a_resumed_run_never_prunes_its_own_checkpoints_for_a_damaged_later_one(tmp_path, tmp_path_factory):
    """A run's newest checkpoint (step 4) is damaged; resumed (auto) from step 2 with
    checkpoint.every=3 and keep=1, the run writes step 3. Step 4 is later but damaged and
    no keeper: step 3 is kept, and the next resume goes on from it."""
    from support import write_class_folder
    from test_train_run import overrides  # the tiny model of whole training runs

    from unicom.train.config import load_config
    from unicom.train.trainer import train

    folder = tmp_path_factory.mktemp("images")
    write_class_folder(folder, list(range(8)), 16, size=16)
    out = tmp_path / "run"
    train(load_config(None, overrides(folder, out, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2")))
    damaged = out / "checkpoints" / "step_00000004" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size: only its SHA-256 tells
    damaged.write_bytes(bytes(data))
    assert train(load_config(None, overrides(folder, out, "train.steps=3", "checkpoint.every=3",
                                             "checkpoint.keep=1")))["steps"] == 3
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000003"]
    assert verify_checkpoint(out / "checkpoints" / "step_00000003") is None
    assert train(load_config(None, overrides(folder, out, "train.steps=5", "checkpoint.every=5",
                                             "checkpoint.keep=1")))["steps"] == 5
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000005"]


def test_a_truncated_checkpoint_is_no_keeper(tmp_path):
    _save(tmp_path, 1)
    truncated = _save(tmp_path, 2)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(10)
    _save(tmp_path, 3, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000001"]
