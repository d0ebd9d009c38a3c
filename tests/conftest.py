"""Shared test options: ``--run-slow`` enables tests marked ``slow``."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("UNICOM_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does) or UNICOM_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("UNICOM_PROGRESS", "0")


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
