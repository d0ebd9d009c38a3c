"""What a training run reports: a console line, ``log.jsonl`` and TensorBoard scalars (rank 0).

``OUT/log.jsonl`` holds one JSON object per line, ``{"event": name, "time": ..., ...}``.
``unicom train`` writes a ``step`` line every ``log.every`` steps (loss, learning rates,
gradient norm, images/s, skipped steps, samples without a label, images that failed to
decode, loss scale) and one line for each other event (``start``, ``resume``,
``skipped``, ``checkpoint``, ``stopped``, ``end``); ``unicom probe`` an ``epoch`` line per
epoch.
``OUT/failures_rank{r}.jsonl`` lists the images each rank could not use (key, source,
reason).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from unicom import distributed

LOG_FILE = "log.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
_FAILURES_PREFIX = "failures_rank"
TENSORBOARD_SCALARS = ("loss", "lr", "prototype_lr", "grad_norm", "images_per_second", "loss_scale")


def format_duration(seconds: float) -> str:
    """``3h07m``, ``12m05s`` or ``42s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class RunLog:
    """Rank 0 writes the console line, the JSONL and TensorBoard; other ranks only their failures.

    ``continues_from``: the step a training run starts from (0: afresh, N: resumed from
    checkpoint N). What ``out`` holds of later steps (of a start killed before its first
    checkpoint, or of the steps after the checkpoint) is left out of ``log.jsonl``, the
    failure lists and TensorBoard (its ``purge_step``): those steps are taken again, and the
    log holds each step once. None (the default) appends to what is there. ``counted_in``:
    the records' field that counts them (``epoch`` for a run checkpointed per epoch);
    ``keep_others``: only the records of later steps are left out, also from 0 (others, such
    as a feature cache's build, were not made again).
    """

    def __init__(self, out: Path, tensorboard: bool = True, console: TextIO | None = None,
                 continues_from: int | None = None, counted_in: str = "step", keep_others: bool = False):
        self.out = Path(out)
        self.rank = distributed.get_rank()
        self.main = self.rank == 0
        self.console = console or sys.stdout
        if continues_from is not None:
            dropped = dict(field=counted_in, keep_others=keep_others)
            _drop_later_steps(self.out / _failures_file(self.rank), continues_from, **dropped)
            if self.main:  # and the lists of ranks this run lacks (resumed on fewer): they are its steps now
                world = distributed.get_world_size()
                for path in [self.out / LOG_FILE, *_failure_lists(self.out, beyond=world)]:
                    _drop_later_steps(path, continues_from, **dropped)
        self._jsonl = open(self.out / LOG_FILE, "a", encoding="utf-8") if self.main else None
        self._failures = None
        self._writer = None
        if self.main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print("note: TensorBoard logging is off: install the tensorboard package (pip install 'unicom[tensorboard]')")
            else:
                purge = None if continues_from is None else continues_from + 1  # steps are logged from 1
                self._writer = SummaryWriter(str(self.out / TENSORBOARD_FOLDER), purge_step=purge)

    def print(self, text: str) -> None:
        if self.main:
            print(text, file=self.console, flush=True)

    def event(self, name: str, **fields: Any) -> None:
        if self._jsonl is None:
            return
        record = {"event": name, "time": round(time.time(), 3), **fields}
        self._jsonl.write(json.dumps(record, default=_jsonable) + "\n")
        self._jsonl.flush()

    def scalars(self, step: int, values: dict[str, Any], section: str = "train") -> None:
        """TensorBoard's ``section/name`` scalars at ``step``: of a training step, those of
        :data:`TENSORBOARD_SCALARS`; of another section, every finite number of ``values``, those
        of a nested dict as ``section/outer/inner``."""
        if self._writer is None:
            return
        if section == "train":
            values = {name: values.get(name) for name in TENSORBOARD_SCALARS}
        for name, value in _numbers(values):
            if math.isfinite(value):
                self._writer.add_scalar(f"{section}/{name}", value, step)
        self._writer.flush()

    def failures(self, records: list[dict], step: int) -> None:
        if not records:
            return
        if self._failures is None:
            self._failures = open(self.out / _failures_file(self.rank), "a", encoding="utf-8")
        for record in records:
            self._failures.write(json.dumps({"step": step, **record}) + "\n")
        self._failures.flush()

    def close(self) -> None:
        for handle in (self._jsonl, self._failures):
            if handle is not None:
                handle.close()
        if self._writer is not None:
            self._writer.close()


def _numbers(values: dict[str, Any], prefix: str = ""):
    """(name, float) of every number in ``values`` (not booleans), nested dicts' as ``outer/inner``."""
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{name}", float(value)


def _failures_file(rank: int | str) -> str:
    return f"{_FAILURES_PREFIX}{rank}.jsonl"


def _failure_lists(out: Path, beyond: int) -> list[Path]:
    """The ``failures_rank{r}.jsonl`` of ``out`` with r >= ``beyond``."""
    found = []
    for path in out.glob(_failures_file("*")):
        rank = path.name[len(_FAILURES_PREFIX):-len(".jsonl")]
        if rank.isdigit() and int(rank) >= beyond:
            found.append(path)
    return sorted(found)


def _drop_later_steps(path: Path, step: int, field: str = "step", keep_others: bool = False) -> None:
    """Rewrite the JSONL ``path`` without the records of steps (their ``field``) after
    ``step``; from step 0, without any record (a fresh start continues nothing) unless
    ``keep_others``."""
    if not path.is_file():
        return
    from unicom.files import write_text_atomic

    kept = []
    if step > 0 or keep_others:
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if not isinstance(record.get(field), int) or record[field] <= step:
                kept.append(line)
    write_text_atomic(path, "".join(kept))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
