"""Progress bars: counts as people read them, and the switch that turns them off."""

from __future__ import annotations

import io

import pytest

from unicom.progress import LOG_INTERVAL, progress, progress_enabled


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


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("leave", [True, False])
def test_a_bar_written_to_a_log_is_one_plain_line_per_refresh(monkeypatch, leave):
    """A file or a pipe (a batch job's log) gets whole lines, no carriage returns and no
    block characters, refreshed every LOG_INTERVAL seconds; the last line is the total."""
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    log = io.StringIO()
    bar = progress(total=3, desc="embed 1 parts", unit="img", file=log, leave=leave)
    assert bar.mininterval == LOG_INTERVAL
    bar.mininterval = 0  # every update refreshes, to see each one
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n") and text.isascii()
    lines = text.splitlines()
    assert len(lines) >= 3 and all(line.startswith("embed 1 parts: ") for line in lines)
    assert lines[0].startswith("embed 1 parts:   0%|          | 0/3 [")
    assert lines[-1].startswith("embed 1 parts: 100%|##########| 3/3 [") and "img/s]" in lines[-1]


def test_a_bar_on_a_terminal_is_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    terminal = Terminal()
    bar = progress(total=3, file=terminal, mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert terminal.getvalue().count("\r") >= 4 and terminal.getvalue().count("\n") == 1


def test_unicom_embed_with_its_standard_error_in_a_file_writes_lines(tmp_path):
    """`unicom embed ... 2> log`: the progress is readable in the file as it is."""
    import os
    import subprocess
    import sys

    from support import tiny_open_clip, write_class_folder

    spec = tiny_open_clip(tmp_path / "clip")
    write_class_folder(tmp_path / "images", [0, 1], 3)
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-m", "unicom", "embed", "--input", str(tmp_path / "images"), "--model", spec,
                        "--out", str(tmp_path / "emb")], stderr=log, check=True, timeout=300,
                       env=dict(os.environ, UNICOM_PROGRESS="1", PYTHONWARNINGS="ignore"))
    text = (tmp_path / "log").read_text()
    assert "\r" not in text
    assert [line for line in text.splitlines() if line.startswith("embed 1 parts: 100%|##########| 6/6 [")]


def test_bars_open_at_once_in_a_log_are_lines_without_cursor_moves(monkeypatch):
    """An epoch's bar around a step's bar (training): on a terminal tqdm stacks them with
    cursor moves; in a log each refresh of either is a plain line of its own."""
    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    log = io.StringIO()
    for _ in progress(range(2), desc="epochs", file=log, mininterval=0):
        for _ in progress(range(3), desc="steps", file=log, mininterval=0, leave=False):
            pass
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert all(line.startswith(("epochs: ", "steps: ")) for line in lines)  # no empty line, none run together
    finished = [line.split(":")[0] for line in lines if "100%" in line]
    assert [bar for i, bar in enumerate(finished) if finished[i - 1:i] != [bar]] == ["steps", "epochs"]
    assert finished.count("steps") >= 2  # each step bar's last line stays in the log
    assert lines[-1].startswith("epochs: 100%|##########| 2/2 [")


def test_a_process_without_standard_error_draws_no_bar(monkeypatch):
    """`... 2>&-`: Python has no sys.stderr; the work goes on without a bar."""
    import sys

    monkeypatch.setenv("UNICOM_PROGRESS", "1")
    monkeypatch.setattr(sys, "stderr", None)
    assert sum(progress(range(4), desc="embed")) == 6
    bar = progress(total=2)
    bar.update(2)
    bar.close()
