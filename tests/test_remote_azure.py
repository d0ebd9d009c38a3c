"""What is Azure's own in ``az://`` URLs (Azure Blob Storage through adlfs), against Azurite's
blob service on 127.0.0.1 (:class:`storage_servers.Azure`): a missing container and refused
credentials are named, and a file's last bytes are read without the suffix ranges Azure's API
lacks. ``embed``, ``cluster`` and ``index`` into a container are in
``test_remote_object_stores.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import write_separated_embeddings

from unicom.cli import main


@pytest.fixture(scope="module")
def embedding_folder(tmp_path_factory):
    return write_separated_embeddings(tmp_path_factory.mktemp("azure_emb") / "emb", {0: 30})


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
