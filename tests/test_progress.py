"""Progress bars: counts as people read them, and the switch that turns them off."""

from __future__ import annotations

import io

import pytest

from unicom.progress import progress, progress_enabled


@pytest.mark.parametrize("items, shown", [(5, "5/5"), (20_000, "20.0k/20.0k")])
def test_counts_are_plain_integers_until_they_are_large(monkeypatch, items, shown):
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    for given_total in (True, False):
        out = io.StringIO()
        bar = progress(range(items), total=items if given_total else None, file=out, mininterval=0)
        for _ in bar:
            pass
        bar.close()
        assert f" {shown} " in out.getvalue().splitlines()[-1].split("\r")[-1]


def test_a_total_known_only_later_is_shown_as_integers(monkeypatch):
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    out = io.StringIO()
    bar = progress(total=None, file=out, mininterval=0)  # shards: the size is estimated after a part
    bar.update(12)
    bar.total = 24
    bar.update(12)
    bar.close()
    lines = [line for line in out.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    assert lines[1].startswith("12it ") and " 24/24 " in lines[-1]


@pytest.mark.parametrize("value, enabled", [("0", False), ("False", False), ("OFF", False), (" no ", False),
                                            ("1", True), ("yes", True)])
def test_the_switch_reads_the_usual_spellings(monkeypatch, value, enabled):
    monkeypatch.setenv("UNICOM_PROGRESS", value)
    monkeypatch.delenv("RANK", raising=False)
    assert progress_enabled() is enabled
