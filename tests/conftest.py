"""Shared test options.

``--run-slow`` enables tests marked ``slow`` (minutes; CI runs them). ``--run-heavy``
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
