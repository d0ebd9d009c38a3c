"""Shared test options.

``--run-slow`` enables tests marked ``slow`` (the long ones: runs killed and resumed, load
tests, the demo; together many minutes; CI runs them). ``--run-heavy``
enables tests marked ``heavy``: full-size models with random weights, several minutes and
gigabytes of disk each, for a machine with room to spare (``make test-all``).
"""

from __future__ import annotations

import os

import pytest

OPTIONS = {
    "slow": ("--run-slow", "UNICOM_SLOW_TESTS", "run with --run-slow (CI does) or UNICOM_SLOW_TESTS=1"),
    "heavy": ("--run-heavy", "UNICOM_HEAVY_TESTS", "full-size models: run with --run-heavy (make test-all) or UNICOM_HEAVY_TESTS=1"),
}


def pytest_addoption(parser):
    for marker, (option, _, _) in OPTIONS.items():
        parser.addoption(option, action="store_true", default=False, help=f"also run tests marked {marker}")


def pytest_collection_modifyitems(config, items):
    for marker, (option, variable, how) in OPTIONS.items():
        if config.getoption(option) or os.environ.get(variable) == "1":
            continue
        skip = pytest.mark.skip(reason=f"{marker}: {how}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("UNICOM_PROGRESS", "0")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and in-process runs then match subprocesses'."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session (see ``storage_servers.S3``)."""
    import logging

    from storage_servers import S3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with this process's (and its children's) AWS settings pointing at it
    and short retry delays."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    monkeypatch.delenv("UNICOM_STORAGE_OPTIONS", raising=False)
    return s3_server


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator's GCS server on 127.0.0.1 for the whole session (see
    ``storage_servers.GCS``)."""
    from storage_servers import GCS

    server = GCS()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azure_server():
    """Azurite's blob service on 127.0.0.1 for the whole session (see ``storage_servers.Azure``);
    the tests that use it are skipped, saying why, where Azurite cannot be installed."""
    from storage_servers import Azure, azurite_blob

    command = azurite_blob()
    if command is None:
        pytest.skip("Azurite is not installed and scripts/install-azurite.sh could not install it (it needs npm: "
                    "Debian's apt-get install nodejs npm)")
    server = Azure(command)
    yield server
    server.stop()


@pytest.fixture
def azure(azure_server, monkeypatch):
    """The Azure server, with adlfs in this process (and its children) pointed at it and short
    retry delays."""
    for name, value in azure_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    monkeypatch.delenv("UNICOM_STORAGE_OPTIONS", raising=False)
    return azure_server


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """The GCS server, with gcsfs in this process (and its children) pointed at it and
    short retry delays."""
    for name, value in gcs_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    import gcsfs  # after the settings above: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on import

    assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem, \
        "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set"
    return gcs_server


@pytest.fixture
def wandb_offline(monkeypatch):
    """wandb writes its runs to files (``OUT/wandb``: :func:`support.wandb_runs` reads them), quietly."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
