"""What a training run reports: a console line, ``log.jsonl``, TensorBoard scalars and, when
asked, Weights & Biases (rank 0).

``OUT/log.jsonl`` holds one JSON object per line, ``{"event": name, "time": ..., ...}``.
``unicom train`` writes a ``step`` line every ``log.every`` steps (loss, learning rates,
gradient norm, images/s, skipped steps, samples without a label, images that failed to
decode, loss scale) and one line for each other event (``start``, ``resume``,
``skipped``, ``checkpoint``, ``stopped``, ``end``); ``unicom probe`` an ``epoch`` line per
epoch.
``OUT/failures_rank{r}.jsonl`` lists the images each rank could not use (key, source,
reason).

A W&B run (:class:`WandbRun`) gets the TensorBoard scalars under the same names, at the same
steps, and the recipe as its config; ``OUT/wandb_run.json`` keeps its id, so that a run resumed
from a checkpoint goes on logging to the same W&B run (W&B keeps the first values of the steps
after the checkpoint that the resumed run takes again, which are the same); a run started
afresh is a new W&B run. wandb writes its files under ``OUT/wandb``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from unicom import distributed

LOG_FILE = "log.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
_FAILURES_PREFIX = "failures_rank"
WANDB_RUN_FILE = "wandb_run.json"
TENSORBOARD_SCALARS = ("loss", "lr", "prototype_lr", "grad_norm", "images_per_second", "loss_scale")


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``, in order; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


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


@dataclass
class WandbRun:
    """The W&B run a training run logs to: its ``project`` (None: ``WANDB_PROJECT``, else
    ``unicom``), its ``name`` (None: the output folder's), the ``config`` it records. Where it
    goes (W&B's server, or ``WANDB_MODE=offline`` for files to ``wandb sync`` later) and the
    entity are wandb's own settings (``wandb login``, ``WANDB_ENTITY``...)."""

    project: str | None = None
    name: str | None = None
    config: dict = field(default_factory=dict)


class RunLog:
    """Rank 0 writes the console line, the JSONL, TensorBoard and W&B (``wandb``, a
    :class:`WandbRun`); other ranks only their failures.

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
                 continues_from: int | None = None, counted_in: str = "step", keep_others: bool = False,
                 wandb: WandbRun | None = None):
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
        self._wandb = _start_wandb(self.out, wandb, resumed=bool(continues_from)) if self.main and wandb else None

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
        """TensorBoard's (and W&B's) ``section/name`` scalars at ``step``: of a training step,
        those of :data:`TENSORBOARD_SCALARS`; of another section, every finite number of
        ``values``, those of a nested dict as ``section/outer/inner``."""
        if self._writer is None and self._wandb is None:
            return
        if section == "train":
            values = {name: values.get(name) for name in TENSORBOARD_SCALARS}
        scalars = {f"{section}/{name}": value for name, value in _numbers(values) if math.isfinite(value)}
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def failures(self, records: list[dict], step: int) -> None:
        if not records:
            return
        if self._failures is None:
            self._failures = open(self.out / _failures_file(self.rank), "a", encoding="utf-8")
        for record in records:
            self._failures.write(json.dumps({"step": step, **record}) + "\n")
        self._failures.flush()

    def close(self, failed: bool = False) -> None:
        """Close the files; the W&B run ends as failed (exit code 1) with ``failed``."""
        for handle in (self._jsonl, self._failures):
            if handle is not None:
                handle.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None


def check_wandb() -> None:
    """Raise :class:`InputError` when the wandb package is missing (before a run starts)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        from unicom.errors import InputError

        raise InputError("log.wandb=true needs the wandb package: pip install 'unicom[wandb]' "
                         "(or leave log.wandb out)") from None


def _start_wandb(out: Path, settings: WandbRun, resumed: bool):
    """The W&B run of ``out`` (module docstring): the one ``WANDB_RUN_ID`` names, else resumed
    under the id ``out`` keeps when the run is, else a new one; its id written down."""
    import os
    import secrets
    import string

    check_wandb()
    import wandb

    from unicom.errors import InputError
    from unicom.files import write_json_atomic

    record = out / WANDB_RUN_FILE
    run_id = os.environ.get("WANDB_RUN_ID")  # given (a sweep's agent gives its run's)
    if not run_id and resumed and record.is_file():
        run_id = json.loads(record.read_text(encoding="utf-8")).get("id")
    alphabet = string.ascii_lowercase + string.digits  # W&B's run ids: 8 of these
    run_id = run_id or "".join(secrets.choice(alphabet) for _ in range(8))
    project = settings.project or os.environ.get("WANDB_PROJECT") or "unicom"
    try:
        run = wandb.init(project=project, name=settings.name or out.resolve().name, id=run_id, resume="allow",
                         dir=str(out), config=settings.config)
    except Exception as error:  # noqa: BLE001 - wandb's own errors (no login, no server) name the cause
        raise InputError(f"log.wandb: W&B did not start the run ({type(error).__name__}: {error}); log in "
                         "(wandb login), or set WANDB_MODE=offline to write it under "
                         f"{out / 'wandb'} for wandb sync, or leave log.wandb out") from None
    write_json_atomic(record, {"id": run_id, "project": project})
    return run


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
