"""``torchrun ... unicom embed``: two ranks (gloo) split the shards (or a benchmark's parts) without
overlap or loss."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from support import class_image, encode_image, free_port, run_workers, write_tar_shard

from unicom.cli import main

SHARDS = {3: 5, 4: 4, 7: 6, 11: 3, 12: 2}  # shard number -> samples


@pytest.mark.slow
def test_two_ranks_write_every_part_once_and_as_one_process_would(tmp_path, capsys):
    for number, count in SHARDS.items():
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number * 10 + i, 40)), "txt": f"c{i}"}
            for i in range(count)
        ])
    torch.manual_seed(0)
    weights = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    common = ["--input", str(tmp_path / "shards"), "--model", "timm/test_vit", "--pretrained", str(weights), "--batch-size", "2"]

    # CPU ranks over gloo, also on a machine with one GPU
    env = dict(os.environ, UNICOM_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "unicom.cli", "embed", *common, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # the summary adds up the ranks: an overlap would count parts twice, a loss would miss some
    assert f"embedded {sum(SHARDS.values())} samples into {len(SHARDS)} parts" in result.stdout

    assert main(["embed", *common, "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    for number in SHARDS:
        for kind, name in (("img_emb", "img_emb_{}.npy"), ("metadata", "metadata_{}.parquet")):
            assert (tmp_path / "two" / kind / name.format(number)).is_file()
        two = np.load(tmp_path / "two" / "img_emb" / f"img_emb_{number}.npy")
        one = np.load(tmp_path / "one" / "img_emb" / f"img_emb_{number}.npy")
        np.testing.assert_array_equal(two, one)
        keys = pq.read_table(tmp_path / "two" / "metadata" / f"metadata_{number}.parquet").column("key").to_pylist()
        assert keys == [f"{number}-{i}" for i in range(SHARDS[number])]
    assert sorted(p.name for p in (tmp_path / "two" / "img_emb").iterdir()) == sorted(f"img_emb_{n}.npy" for n in SHARDS)


@pytest.mark.slow
def test_two_ranks_split_a_benchmarks_gallery_and_query_crops_as_one_process_would(tmp_path):
    from test_evaluate_cli import tiny_model_file
    from test_revisited import folder_contents, revisited_dataset

    checkpoint = tiny_model_file(tmp_path / "model.pt")
    root = revisited_dataset(tmp_path / "data", "roxford5k")
    common = ["--dataset", "roxford5k", "--root", str(root), "--model", str(checkpoint), "--rows-per-part", "3",
              "--batch-size", "2", "--workers", "0"]
    env = dict(os.environ, UNICOM_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "unicom.cli", "embed", *common, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 9 gallery images in parts 0-2, the 2 crops in part 3: each part written by one rank
    assert "embedded 11 samples into 4 parts" in result.stdout

    assert main(["embed", *common, "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    assert folder_contents(tmp_path / "two") == folder_contents(tmp_path / "one")


def _embed_on_rank(rank, world_size, shards, weights, out):
    from unicom.embed import embed_to_folder

    summary = embed_to_folder(shards, out, "timm/test_vit", pretrained=weights, batch_size=2, num_workers=0, device="cpu")
    return summary.samples, summary.written


@pytest.mark.slow
def test_a_rank_without_parts_waits_for_the_others_longer_than_the_collective_timeout(tmp_path):
    # one shard for two ranks: rank 1 has nothing to do and waits while rank 0 reads a shard that
    # takes 3 s to arrive (a slow download), longer than the process group's timeout of 1 s
    shard = write_tar_shard(tmp_path / "00000.tar", [
        {"key": f"0-{i}", "jpg": encode_image(class_image(i, i, 40))} for i in range(3)])
    torch.manual_seed(0)
    weights = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    slow = f"pipe:sleep 3; cat {shard}"
    results = run_workers(_embed_on_rank, 2, [slow], str(weights), str(tmp_path / "emb"), group_timeout=1.0)
    assert results == [("ok", (3, 1)), ("ok", (3, 1))]  # both ranks report the summary of both
    assert pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").column("key").to_pylist() == ["0-0", "0-1", "0-2"]


def _embed_with_a_slow_record(rank, world_size, root):
    """Rank 0 takes a second to write embed_config.json (as it does reading many remote parts'
    footers); returns the modification times of the config and of every metadata file."""
    import time

    from unicom import embed

    writing = embed.write_config

    def slow(out, config):
        time.sleep(1.0)
        writing(out, config)

    if rank == 0:
        embed.write_config = slow
    code = main(["embed", "--input", str(root / "shards"), "--model", "timm/test_vit", "--pretrained",
                 str(root / "w.pth"), "--out", str(root / "EMB"), "--workers", "0", "--device", "cpu"])
    assert code == 0
    return {path.name: path.stat().st_mtime_ns for path in [root / "EMB" / "embed_config.json",
                                                            *(root / "EMB" / "metadata").iterdir()]}


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_no_rank_writes_a_part_before_the_settings_of_the_run_are_recorded(tmp_path):
    """A run killed after a rank wrote a part, but before rank 0 recorded the run's settings, would
    leave parts whose settings the record lacks (and a resumed run would not read them)."""
    for number, count in SHARDS.items():
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number * 10 + i, 24))} for i in range(count)])
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    status, times = run_workers(_embed_with_a_slow_record, 2, tmp_path)[1]  # after every rank's parts
    assert status == "ok", times
    recorded = times.pop("embed_config.json")
    assert sorted(times) == sorted(f"metadata_{number}.parquet" for number in SHARDS)
    assert min(times.values()) > recorded
