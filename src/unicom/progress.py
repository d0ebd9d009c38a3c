"""Progress bars with rate and ETA for long work (extraction, k-means, training).

Shown on rank 0 only, and turned off with ``UNICOM_PROGRESS=0``. On a terminal a bar
is redrawn in place; written to a file or a pipe (the log of a batch job) it is one plain
line every ``LOG_INTERVAL`` seconds, so a log holds no carriage returns.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("UNICOM_PROGRESS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return int(os.environ.get("RANK", "0")) == 0


# seconds between two lines of a bar written to a file or a pipe
LOG_INTERVAL = 30.0

# a loop that waits this share of its time for input leaves its model as idle: its report says so, with remedies
INPUT_BOUND_SHARE = 0.25


def progress(iterable: Iterable[T] | None = None, *, total: int | float | None = None, desc: str = "", unit: str = "it", **kwargs):
    """A ``tqdm`` bar (rate and ETA) over ``iterable``; use ``.update(n)`` when it is None."""
    from tqdm.auto import tqdm

    notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto in a notebook, whose bar draws itself
    in_notebook = notebook is not None and issubclass(tqdm, notebook.tqdm_notebook)
    if not in_notebook and not _is_terminal(kwargs.get("file") or sys.stderr):
        tqdm = _line_bar(tqdm)
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("ascii", True)
        kwargs["leave"] = True  # a line once written stays; a bar that clears itself would leave a "\r"
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("smoothing", 0.1)
    kwargs.setdefault("dynamic_ncols", True)
    # no standard error at all (`2>&-`, pythonw): nowhere to draw, and tqdm would fail writing to None
    disable = not progress_enabled() or (kwargs.get("file") or sys.stderr) is None
    if "unit_scale" in kwargs:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)
    return _counting_bar(tqdm)(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# the streams whose last line is not ended yet (by id), shared by the bars writing to them
_unfinished: dict[int, object] = {}


@functools.lru_cache(maxsize=None)
def _line_bar(base):
    """``base`` (a tqdm class) writing each refresh as a line of its own, for logs: a line
    ends when the next one starts, from this bar or another one open at the same time (an
    epoch's bar around a step's bar), and the last when the bar closes (tqdm's final newline)."""

    class LineBar(base):
        def moveto(self, n):  # a log has no cursor to move to a bar's row: lines follow each other
            pass

        @staticmethod
        def status_printer(file):
            stream = getattr(file, "_wrapped", file)  # tqdm wraps the file anew for each bar

            def print_status(text):
                unfinished = id(stream) in _unfinished
                if text:
                    file.write(("\n" if unfinished else "") + text)
                    _unfinished[id(stream)] = stream
                elif unfinished:  # a clearing refresh: end the line, write nothing
                    file.write("\n")
                    del _unfinished[id(stream)]
                getattr(file, "flush", lambda: None)()

            return print_status

        def close(self):
            writes = not getattr(self, "disable", True) and getattr(self, "last_print_t", -1) >= self.start_t + self.delay
            super().close()
            if writes:  # its last line, then tqdm's newline
                _unfinished.pop(id(getattr(self.fp, "_wrapped", self.fp)), None)

    return LineBar


def close_open_bars() -> None:
    """Close the bars still open (a command interrupted inside a loop), so that their last
    line is written now, before what is printed next, and not at exit."""
    std = sys.modules.get("tqdm.std")
    if std is None:  # no bar was ever made
        return
    for bar in list(std.tqdm._instances):
        bar.close()


@functools.lru_cache(maxsize=None)
def _counting_bar(base):
    """``base`` (a tqdm class) showing SI prefixes (12.3k/1.20M) for large counts and small
    ones as plain integers, not 5.00/5.00, decided at each refresh: from the total, which a
    caller may set once it is known, else from the count so far."""

    class CountingBar(base):
        @property
        def format_dict(self):
            values = super().format_dict
            count = self.total if self.total is not None else self.n
            values["unit_scale"] = count is not None and count >= 10_000
            return values

    return CountingBar
