"""Clean restarts: every stage removes the temporaries a killed run of it left (and only
those), and recorded paths mean the same file from any working folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import timm
import torch
from support import class_image, encode_image, random_unicom_vit, write_tar_shard

from unicom.cli import main
from unicom.formats.embeddings import write_part

TOKEN = "k1ll3d_x"  # the 8 random characters of a temporary name


def _plant(folder, *names) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for path in paths:
        path.write_bytes(b"half-written")
    return paths


def _leftovers(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp*"))


def test_embed_sweeps_the_temporaries_of_its_own_parts_and_leaves_others(tmp_path):
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": "a", "jpg": encode_image(class_image(0, 0, 32))}])
    out = tmp_path / "EMB"
    _plant(out / "img_emb", f".img_emb_0.npy.{TOKEN}.tmp.npy", f".img_emb_5.npy.{TOKEN}.tmp.npy")
    _plant(out / "metadata", f".metadata_0.parquet.{TOKEN}.tmp.parquet")
    _plant(out / "failures", f".failures_0.parquet.{TOKEN}.tmp.parquet")
    _plant(out, f".embed_config.json.{TOKEN}.tmp.json", f".notes.txt.{TOKEN}.tmp.txt")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    assert main(["embed", "--input", str(tmp_path / "shards"), "--model", "timm/test_vit", "--pretrained",
                 str(tmp_path / "w.pth"), "--out", str(out), "--workers", "0"]) == 0
    # part 5 is not this run's (another job may be writing it), the notes are nobody's part
    assert _leftovers(out) == [f".notes.txt.{TOKEN}.tmp.txt", f"img_emb/.img_emb_5.npy.{TOKEN}.tmp.npy"]


def _embedding_folder(root):
    rng = np.random.default_rng(0)
    for number in (0, 1):
        write_part(root, number, image=rng.standard_normal((30, 8)).astype(np.float32),
                   metadata=pa.table({"key": [f"{number}-{i}" for i in range(30)]}))
    return root


def test_cluster_stages_sweep_their_own_temporaries(tmp_path):
    emb = _embedding_folder(tmp_path / "emb")
    out = tmp_path / "clusters"
    _plant(out, f".centroids.npy.{TOKEN}.tmp.npy", f".centroids.json.{TOKEN}.tmp.json", f".clusters.json.{TOKEN}.tmp.json",
           f".cluster_sizes.png.{TOKEN}.tmp.png")
    _plant(out / "labels", f".labels_0.parquet.{TOKEN}.tmp.parquet", f".labels_1.parquet.{TOKEN}.tmp.parquet")
    assert main(["cluster", "--embeddings", str(emb), "--fusion", "image", "--k", "3", "--out", str(out)]) == 0
    assert _leftovers(out) == []


def test_a_hierarchical_part_sweeps_only_its_own_part_files(tmp_path):
    emb = _embedding_folder(tmp_path / "emb")
    out = tmp_path / "clusters"
    _plant(out / "parts", f".part_0.npy.{TOKEN}.tmp.npy", f".part_0.json.{TOKEN}.tmp.json", f".part_1.npy.{TOKEN}.tmp.npy")
    assert main(["cluster", "part", "--embeddings", str(emb), "--fusion", "image", "--k", "3", "--part", "0/2",
                 "--out", str(out)]) == 0
    assert _leftovers(out) == [f"parts/.part_1.npy.{TOKEN}.tmp.npy"]  # part 1 may be running elsewhere


def test_index_sweeps_its_folder(tmp_path):
    emb = _embedding_folder(tmp_path / "emb")
    out = tmp_path / "index"
    _plant(out, f".index_0.faiss.{TOKEN}.tmp.faiss", f".index.json.{TOKEN}.tmp.json")
    _plant(out / "metadata", f".metadata_1.parquet.{TOKEN}.tmp.parquet")
    assert main(["index", "--emb", str(emb), "--out", str(out)]) == 0
    assert _leftovers(out) == []


def test_search_works_from_another_folder_when_the_model_was_given_relative(tmp_path, monkeypatch, capsys):
    from unicom.models import export
    from unicom.models.registry import clip_preprocess
    from unicom.models.unicom_vit import ViTSettings

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=2, heads=1, mlp_dim=256, embedding_dim=24)
    work = tmp_path / "work"
    export.save_model(work / "train_ref" / "model", random_unicom_vit(settings), "unicom_vit", settings, clip_preprocess(32))
    for i in range(4):
        (work / "photos").mkdir(parents=True, exist_ok=True)
        class_image(i, i, 40).save(work / "photos" / f"{i}.png")
    monkeypatch.chdir(work)
    assert main(["embed", "--input", "photos", "--model", "train_ref/model", "--out", "EMB", "--workers", "0"]) == 0
    recorded = json.loads((work / "EMB" / "embed_config.json").read_text())
    assert recorded["model"] == str(work / "train_ref" / "model")
    assert main(["index", "--emb", "EMB", "--out", "INDEX"]) == 0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["search", "--index", str(work / "INDEX"), str(work / "photos" / "2.png"), "-k", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results[0]["results"][0]["key"] == "2.png"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc (Linux)")
def test_a_two_rank_embed_frees_its_process_group_before_the_interpreter_exits(tmp_path):
    """The gloo group's threads are gone when the command returns: a group still alive then
    (held by default arguments of torch.distributed.nn, which open_clip imports) is
    destroyed during interpreter shutdown, and that aborts the process now and then."""
    import os
    import subprocess
    import sys

    from support import free_port

    write_tar_shard(tmp_path / "shards" / "00000.tar", [
        {"key": f"0-{i}", "jpg": encode_image(class_image(i, i, 32))} for i in range(4)])
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import os, sys\n"
        "from unicom.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        # a file per rank: two ranks printing at once may interleave their lines on the one stderr
        f"open(os.path.join({str(tmp_path)!r}, 'threads-' + os.environ['RANK']), 'w').write(' '.join(sorted(names)))\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ, UNICOM_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(runner), "embed", "--input", str(tmp_path / "shards"),
               "--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"), "--batch-size", "2", "--workers", "0",
               "--out", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exits = [(tmp_path / f"threads-{rank}").read_text() for rank in (0, 1)]
    assert all(exits) and not any("gloo" in names for names in exits), exits


@pytest.mark.slow
def test_two_rank_embed_never_aborts_over_many_runs(tmp_path):
    """The teardown of both ranks (gloo process group, loader, readers) is clean every time."""
    import os
    import subprocess
    import sys

    from support import free_port

    for number in range(4):
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number + i, 32))} for i in range(3)])
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    env = dict(os.environ, UNICOM_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for run in range(6):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "-m", "unicom.cli", "embed", "--input", str(tmp_path / "shards"),
                   "--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"), "--batch-size", "2",
                   "--workers", str(run % 2), "--out", str(tmp_path / f"out{run}")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "terminate called" not in result.stderr, (run, result.stderr[-3000:])
