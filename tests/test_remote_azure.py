"""What is Azure's own in ``az://`` URLs (Azure Blob Storage through adlfs), against Azurite's
blob service on 127.0.0.1 (:class:`storage_servers.Azure`): a missing container and refused
credentials are named, a file's last bytes are read without the suffix ranges Azure's API
lacks, and ``embed`` killed mid-upload is completed by a rerun with nothing half-written.
``embed``, ``cluster`` and ``index`` into a container are in ``test_remote_object_stores.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import write_separated_embeddings

from unicom.cli import main


@pytest.fixture(scope="module")
def embedding_folder(tmp_path_factory):
    return write_separated_embeddings(tmp_path_factory.mktemp("azure_emb") / "emb", {0: 30})


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_missing_container_and_refused_credentials_are_named(azure, embedding_folder, tmp_path, capsys):
    assert main(["cluster", "--embeddings", "az://no-such-container/emb", "--k", "4", "--out",
                 str(tmp_path / "out")]) != 0
    assert "az://no-such-container/emb: folder not found" in capsys.readouterr().err
    # an output folder in a container that does not exist: refused before any work
    assert main(["embed", "--input", str(tmp_path), "--model", "timm/test_vit", "--out",
                 "az://no-such-container/emb"]) == 2
    assert ("az://no-such-container/emb: the bucket az://no-such-container does not exist (or these credentials "
            "cannot see it)") in capsys.readouterr().err
    assert main(["embed", "--input", "az://no-such-container/shards/{0..1}.tar", "--model", "timm/test_vit", "--out",
                 str(tmp_path / "emb")]) == 2
    assert "the bucket az://no-such-container does not exist" in capsys.readouterr().err
    azure.bucket("refused")
    emb = azure.upload_folder(embedding_folder, "refused", "emb")
    wrong = azure.connection_string.replace("AccountKey=", "AccountKey=AAAA")  # a key Azurite does not have
    assert main(["cluster", "--embeddings", emb, "--k", "4", "--out", str(tmp_path / "out"), "--storage-options",
                 json.dumps({"az": {"connection_string": wrong}})]) != 0
    said = capsys.readouterr().err
    assert emb in said and "Azure refused the request" in said and "AZURE_STORAGE_CONNECTION_STRING" in said
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_the_last_bytes_of_a_blob_are_read_by_its_size_and_a_range(azure):
    """Azure's API has no suffix ranges (``bytes=-N``) and refuses an empty range: a file's
    footer is read as its size and then a range, and an empty range asks nothing."""
    from unicom import storage

    data = np.random.default_rng(4).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    azure.bucket("ranges")
    azure.put("ranges", "x.bin", data)
    assert storage.read_tail("az://ranges/x.bin", 100) == data[-100:]
    assert storage.read_tail("az://ranges/x.bin", 10_000) == data  # shorter than asked: the whole file
    assert storage.read_range("az://ranges/x.bin", 3, 900) == data[3:900]
    assert storage.read_range("az://ranges/x.bin", 7, 7) == b""
    assert storage.read_bytes("abfs://ranges/x.bin") == data  # Data Lake Gen2's scheme, the same store


@pytest.mark.slow
def test_killed_mid_upload_a_rerun_leaves_the_same_folder_and_nothing_half_written(azure, tmp_path):
    """kill -9 as Azurite answers the upload of a part's temporary blob, then run again: the
    rerun sweeps what the kill left and writes the files of a local run."""
    import os
    import subprocess
    import sys

    import timm
    import torch
    from storage_servers import kill_at_response
    from support import captioned_samples, write_tar_shard

    for number in range(3):
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", captioned_samples(number, 3))
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    common = ["--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"), "--batch-size", "2", "--workers", "0"]
    assert main(["embed", "--input", str(tmp_path / "shards"), "--out", str(tmp_path / "local"), *common]) == 0
    azure.bucket("killed")
    env = dict(os.environ, PYTHONWARNINGS="ignore", UNICOM_PROGRESS="0")
    command = [sys.executable, "-m", "unicom.cli", "embed", "--input", str(tmp_path / "shards"), "--out",
               "az://killed/emb", *common]
    kill_at_response(azure.port, azure.connection_to, command, env,
                     rb"PUT /devstoreaccount1/killed/emb/img_emb/\.img_emb_1\.npy\.[a-z0-9_]{8}\.tmp")
    keys = azure.keys("killed")
    assert "emb/img_emb/img_emb_1.npy" not in keys
    assert [key for key in keys if key.rsplit("/", 1)[-1].startswith(".")] != []  # what the kill left
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for path in sorted((tmp_path / "local").rglob("*.npy")) + sorted((tmp_path / "local").rglob("*.parquet")):
        relative = path.relative_to(tmp_path / "local").as_posix()
        assert azure.get("killed", f"emb/{relative}") == path.read_bytes(), relative
    assert not [key for key in azure.keys("killed") if key.rsplit("/", 1)[-1].startswith(".")]
