"""Jobs of two nodes, simulated on one machine: two ``torchrun --nnodes 2`` launches of one
gloo process each, each started from a working folder, TMPDIR and caches of its own (what
nodes do not share), meeting at a rendezvous on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port, write_class_folder

TINY_RUN = [
    "model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=2", "model.heads=2",
    "model.embedding_dim=16", "data.batch_size=8", "data.workers=0", "loss.scale=16", "loss.sample_rate=0.5",
    "train.steps=4", "log.every=2", "log.tensorboard=false", "checkpoint.every=2", "train.device=cpu",
]


def node_env(home: Path) -> dict[str, str]:
    """The environment of a node whose temporary and cache folders are its own."""
    for name in ("tmp", "cache"):
        (home / name).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "UNICOM_PROGRESS": "0", "UNICOM_SHARED_FOLDER_WAIT": "5", "HOME": str(home),
            "TMPDIR": str(home / "tmp"), "XDG_CACHE_HOME": str(home / "cache"), "UNICOM_CACHE": str(home / "cache" / "unicom")}


def run_on_two_nodes(tmp_path: Path, module: str, args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """``python -m torch.distributed.run --nnodes 2 ... -m MODULE ARGS`` started once per node,
    each from ``tmp_path/node{r}``; both are waited for (bounded), node 0's result first."""
    port = free_port()
    processes = []
    for node in range(2):
        home = tmp_path / f"node{node}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", module, *args]
        processes.append(subprocess.Popen(command, cwd=node_env(home)["HOME"], env=node_env(home), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:  # SIGTERM: torchrun stops its workers (SIGKILL would leave them running)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=60)
    return results


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_class_folder(root, list(range(8)), 16, size=16)
    return root


@pytest.mark.slow
def test_a_run_whose_out_is_each_nodes_own_folder_is_refused_at_the_start_on_every_node(images, tmp_path):
    results = run_on_two_nodes(tmp_path, "unicom.train", ["out=run", f"data.folder={images}", *TINY_RUN])

    for result in results:
        assert result.returncode != 0
        assert ("out=run: rank 1 (host " in result.stderr and f"{tmp_path / 'node1' / 'run'}) does not see the folder that "
                f"rank 0" in result.stderr and f"writes to, {tmp_path / 'node0' / 'run'}; " in result.stderr), result.stderr[-3000:]
        assert "a file system that every node mounts" in result.stderr
    # refused before any step: no checkpoint, no log, on either node
    assert not (tmp_path / "node0" / "run" / "checkpoints").exists()
    assert not (tmp_path / "node0" / "run" / "log.jsonl").exists()
    assert not (tmp_path / "node1" / "run").exists()


@pytest.mark.slow
def test_a_run_whose_out_every_node_sees_trains_and_leaves_only_its_files(images, tmp_path):
    out = tmp_path / "shared" / "run"
    results = run_on_two_nodes(tmp_path, "unicom.train", [f"out={out}", f"data.folder={images}", *TINY_RUN])

    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    manifest = json.loads((out / "checkpoints" / "step_00000004" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and {"rank_0.pt", "rank_1.pt"} <= set(manifest["files"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the folder check left no marker


@pytest.fixture(scope="module")
def shards_and_weights(tmp_path_factory) -> tuple[Path, Path]:
    import timm
    import torch
    from support import class_image, encode_image, write_tar_shard

    root = tmp_path_factory.mktemp("embed")
    for number, count in {3: 3, 4: 2, 7: 3}.items():
        write_tar_shard(root / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number * 10 + i, 40)), "txt": f"c{i}"}
            for i in range(count)])
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), root / "test_vit.pth")
    return root / "shards", root / "test_vit.pth"


def embed_args(shards_and_weights, out) -> list[str]:
    shards, weights = shards_and_weights
    return ["embed", "--input", str(shards), "--model", "timm/test_vit", "--pretrained", str(weights),
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--out", str(out)]


@pytest.mark.slow
def test_an_embed_whose_out_is_each_nodes_own_folder_is_refused_before_any_part_is_written(shards_and_weights, tmp_path):
    results = run_on_two_nodes(tmp_path, "unicom.cli", embed_args(shards_and_weights, "emb"))

    for result in results:
        assert result.returncode != 0
        assert (f"--out=emb: rank 1 (host " in result.stderr and f"{tmp_path / 'node1' / 'emb'}) does not see the folder "
                f"that rank 0" in result.stderr), result.stderr[-3000:]
        assert "embedded" not in result.stdout
    # before the fix each node kept the parts of its own rank, and rank 0 reported all 3 parts as written
    assert not list((tmp_path / "node0" / "emb").rglob("*.npy"))
    assert not (tmp_path / "node1" / "emb").exists()


@pytest.mark.slow
def test_an_embed_whose_out_every_node_sees_holds_every_part(shards_and_weights, tmp_path):
    out = tmp_path / "shared" / "emb"
    results = run_on_two_nodes(tmp_path, "unicom.cli", embed_args(shards_and_weights, out))

    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded 8 samples into 3 parts" in results[0].stdout
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_3.npy", "img_emb_4.npy", "img_emb_7.npy"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_ranks_that_read_different_copies_of_the_data_are_refused_at_the_start_instead_of_hanging(images, tmp_path):
    """Each node reads ``data.folder=images`` from its own working folder; node 1's copy
    lacks 30 images (of 3 of its 8 classes), so it would take 12 steps of 2 epochs where node 0 takes 16: before the
    check, rank 1 stopped first and rank 0 waited in a collective for the job's timeout."""
    import shutil

    for node in range(2):
        shutil.copytree(images, tmp_path / f"node{node}" / "images")
    for folder in sorted((tmp_path / "node1" / "images").iterdir())[:3]:  # 10 of the 16 images of 3 classes
        for path in sorted(folder.iterdir())[:10]:
            path.unlink()
    args = [f"out={tmp_path / 'shared' / 'run'}", "data.folder=images", *TINY_RUN, "train.steps=null", "train.epochs=2"]
    results = run_on_two_nodes(tmp_path, "unicom.train", args, timeout=120)

    for result in results:
        assert result.returncode != 0
        assert ("the ranks read different data: rank 0 (host " in result.stderr and "images: 128 images, 8 classes, "
                "8 steps per epoch, 16 steps" in result.stderr and "rank 1 (host " in result.stderr
                and "images: 98 images, 8 classes, 6 steps per epoch, 12 steps" in result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "shared" / "run" / "checkpoints").exists()
