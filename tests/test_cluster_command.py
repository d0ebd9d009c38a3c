"""`unicom cluster`: one machine, and the hierarchical part / merge / assign stages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import adjusted_rand_score
from support import free_port

from unicom.cli import main
from unicom.cluster import Shard, load_labels, split_shards
from unicom.cluster.kmeans import _no_gpu_device_files
from unicom.errors import InputError
from unicom.formats.embeddings import write_part


@pytest.fixture
def collection(tmp_path):
    """600 image–text pairs of 6 classes in 6 shards (float16, LAION-like), and the truth."""
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.standard_normal((32, 12)))[0].T  # 12 orthonormal directions
    truth = rng.integers(0, 6, 600)
    image = centres[truth] + 0.1 * rng.standard_normal((600, 32))
    text = centres[6 + truth] + 0.1 * rng.standard_normal((600, 32))
    for number in range(6):
        rows = slice(100 * number, 100 * (number + 1))
        write_part(
            tmp_path / "emb", number,
            image=image[rows].astype(np.float16), text=text[rows].astype(np.float16),
            metadata=pa.table({"key": [f"{number:05d}{r:04d}" for r in range(100)], "caption": ["a photo"] * 100}),
        )
    return tmp_path / "emb", truth


def ari(out, truth) -> float:
    labels = load_labels(out)
    rows = [int(key[:5]) * 100 + int(key[5:]) for key in labels.column("key").to_pylist()]
    return adjusted_rand_score(truth[rows], labels.column("label").to_numpy())


def test_one_machine_run_with_laion_style_folders(collection, tmp_path, capsys):
    root, truth = collection
    code = main([
        "cluster", "--image-emb", str(root / "img_emb"), "--text-emb", str(root / "text_emb"),
        "--metadata", str(root / "metadata"), "--k", "6", "--fusion", "image+text", "--init", "kmeans++",
        "--out", str(tmp_path / "out"),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 centroids from 600 training points" in printed
    assert "labelled 600 of 600 samples in 6 parts (0 invalid rows skipped)" in printed
    assert ari(tmp_path / "out", truth) >= 0.95
    summary = json.loads((tmp_path / "out" / "clusters.json").read_text())
    assert (summary["fusion"], summary["k"], summary["dimension"], summary["mode"]) == ("image+text", 6, 32, "single")


def test_bad_input_is_printed_without_a_traceback(collection, tmp_path, capsys):
    root, _ = collection
    code = main(["cluster", "--embeddings", str(root), "--k", "601", "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("unicom cluster: error: k = 601 is larger than the 600 samples")
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_hierarchical_parts_merge_and_assign_label_every_sample(collection, tmp_path, capsys):
    root, truth = collection
    out = str(tmp_path / "out")
    for part in range(3):  # what each node runs, independently
        assert main(["cluster", "part", "--embeddings", str(root), "--k", "12", "--part", f"{part}/3", "--out", out]) == 0
    assert main(["cluster", "merge", "--k", "6", "--init", "kmeans++", "--out", out]) == 0
    for part in range(2):
        assert main(["cluster", "assign", "--embeddings", str(root), "--part", f"{part}/2", "--out", out]) == 0
    assert not (tmp_path / "out" / "clusters.json").exists()
    assert main(["cluster", "assign", "--embeddings", str(root), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "merged 3 parts: 6 centroids from 36 training points" in printed
    # 6 part centroids per final one: more come from the parts' k, not from more samples
    assert "the centroids may be noisy (raise the parts' --k, or lower the merge's --k)" in printed
    assert "labelled 0 of 6 parts (0 samples) in 0.0 s; 6 of them were labelled already" in printed
    assert "labelled 600 of 600 samples" in printed
    records = [json.loads((tmp_path / "out" / "parts" / f"part_{p}.json").read_text()) for p in range(3)]
    assert [r["shards"] for r in records] == [[0, 1], [2, 3], [4, 5]]
    assert all(r["training_points"] == 200 for r in records)
    summary = json.loads((tmp_path / "out" / "clusters.json").read_text())
    assert summary["mode"] == "hierarchical" and summary["hierarchical"]["union_centroids"] == 36
    assert ari(tmp_path / "out", truth) >= 0.95


def torchrun_cluster(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m unicom.cli cluster ARGS``, as a user types it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "unicom.cli", "cluster", *args]
    env = dict(os.environ, UNICOM_PROGRESS="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_under_torchrun_each_process_takes_its_rank_as_its_part(collection, tmp_path):
    root, truth = collection
    out = str(tmp_path / "out")
    parts = torchrun_cluster("part", "--embeddings", str(root), "--k", "12", "--out", out)
    assert parts.returncode == 0, parts.stderr[-3000:]
    records = [json.loads((tmp_path / "out" / "parts" / f"part_{p}.json").read_text()) for p in range(2)]
    assert [r["shards"] for r in records] == [[0, 1, 2], [3, 4, 5]]
    assert main(["cluster", "merge", "--k", "6", "--init", "kmeans++", "--out", out]) == 0
    labelled = torchrun_cluster("assign", "--embeddings", str(root), "--out", out)
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    assert labelled.stdout.count("labelled 3 of 3 parts (300 samples)") == 2
    assert not (tmp_path / "out" / "clusters.json").exists()  # the statistics: once, without torchrun
    assert main(["cluster", "assign", "--embeddings", str(root), "--out", out]) == 0
    assert ari(tmp_path / "out", truth) >= 0.95


@pytest.mark.parametrize("stage", ["run", "merge", "stats", "show"])
def test_a_one_process_stage_under_torchrun_is_refused_before_it_writes(collection, tmp_path, capsys, monkeypatch, stage):
    root, _ = collection
    # what torchrun sets in each of its 2 processes: every one would write the same OUT
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(["cluster", stage, "--embeddings", str(root), "--k", "6", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"`unicom cluster {stage}` runs in one process, but torchrun started 2" in error
    assert "`torchrun ... unicom cluster part --k K`" in error
    assert not (tmp_path / "out").exists()


def test_merge_names_the_parts_still_missing(collection, tmp_path, capsys):
    root, _ = collection
    out = str(tmp_path / "out")
    main(["cluster", "part", "--embeddings", str(root), "--k", "4", "--part", "1/3", "--out", out])
    assert main(["cluster", "merge", "--k", "4", "--out", out]) == 2
    assert "2 of 3 parts are not finished (parts 0, 2); run `unicom cluster part --part P/3" in capsys.readouterr().err


def test_statistics_wait_until_every_part_is_labelled(collection, tmp_path, capsys):
    root, _ = collection
    out = str(tmp_path / "out")
    main(["cluster", "part", "--embeddings", str(root), "--k", "6", "--part", "0/1", "--out", out])
    main(["cluster", "merge", "--k", "6", "--out", out])
    main(["cluster", "assign", "--embeddings", str(root), "--part", "0/3", "--out", out])
    assert main(["cluster", "stats", "--out", out]) == 2
    assert "4 of 6 parts have no labels yet (parts 2, 3, 4, 5)" in capsys.readouterr().err


def test_assign_keeps_the_fusion_of_the_centroids(collection, tmp_path, capsys):
    root, _ = collection
    out = str(tmp_path / "out")
    main(["cluster", "--embeddings", str(root), "--k", "6", "--fusion", "text", "--out", out])
    assert main(["cluster", "assign", "--embeddings", str(root), "--fusion", "image", "--out", out]) == 2
    assert "trained on text rows; use --fusion text" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["cluster", "part", "--k", "3"], "needs --part P/N"),
    (["cluster", "part", "--k", "3", "--part", "3/3"], "P must be between 0 and N - 1"),
    (["cluster", "part", "--k", "3", "--part", "three"], "expected P/N"),
    (["cluster", "merge", "--part", "0/2"], "--part applies to `part` and `assign`"),
    (["cluster", "assign", "--embeddings", "EMB", "--part", "0/2", "--min-cluster-size", "5"],
     "--min-cluster-size is applied with the statistics, once every part is labelled, not by `unicom cluster assign` "
     "of part 0/2: give it to the `unicom cluster assign` without --part"),
    (["cluster", "part", "--embeddings", "EMB", "--k", "3", "--part", "0/2", "--min-cluster-size", "5"],
     "not by `unicom cluster part` of part 0/2"),
    (["cluster", "--k", "3"], "no inputs: give --embeddings ROOT"),
    (["cluster", "--embeddings", "EMB"], "needs --k"),
])
def test_command_line_mistakes(collection, tmp_path, capsys, argv, message):
    root, _ = collection
    argv = [str(root) if a == "EMB" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_split_shards_gives_every_shard_to_exactly_one_part():
    shards = [Shard(number, 10) for number in (0, 1, 2, 5, 9, 10, 11)]
    slices = [split_shards(shards, part, 3) for part in range(3)]
    assert [[s.number for s in part] for part in slices] == [[0, 1, 2], [5, 9], [10, 11]]
    with pytest.raises(InputError, match=r"8 parts but only 7 shards; use at most 7 parts \(--part I/N, or under torchrun as many processes"):
        split_shards(shards, 0, 8)


def test_the_help_shows_the_hierarchical_ks_of_the_docs(capsys):
    # each part clusters its slice into fewer centroids than the merge's final k (docs/clustering.md)
    def ks(text: str) -> dict[str, str]:
        return {stage: re.search(rf"cluster {stage}\s.*?--k (\d+)", text).group(1) for stage in ("part", "merge")}

    with pytest.raises(SystemExit):
        main(["cluster", "--help"])
    docs = (Path(__file__).resolve().parents[1] / "docs" / "clustering.md").read_text()
    assert ks(capsys.readouterr().out) == ks(docs) == {"part": "62500", "merge": "1000000"}


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("auto", marks=pytest.mark.skipif(not _no_gpu_device_files(), reason="a GPU driver is here: auto asks torch")),
])
def test_clustering_on_the_cpu_does_not_import_torch(collection, tmp_path, device):
    # torch is only needed to use a GPU, or under torchrun: importing it to read WORLD_SIZE, or
    # to look for a GPU on a machine without a GPU driver, took 1.5 s and put ~0.85 GiB of its
    # libraries in the resident set
    root, _ = collection
    code = (
        "import sys; from unicom.cli import main; "
        f"code = main(['cluster', '--embeddings', {str(root)!r}, '--k', '6', '--device', {device!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]); "
        "print(code, 'torch' in sys.modules)"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, "UNICOM_PROGRESS": "0"})
    assert result.stdout.split()[-2:] == ["0", "False"], result.stderr[-2000:]


def test_a_run_started_again_says_that_it_reused_the_centroids(collection, tmp_path, capsys):
    root, _ = collection
    argv = ["cluster", "--embeddings", str(root), "--k", "6", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("trained: 6 centroids from 600 training points")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"reused the centroids in {tmp_path / 'out'} (trained by an earlier run): 6 centroids")
    assert "trained:" not in printed
