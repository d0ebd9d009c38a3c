"""Training checkpoints: atomic folders, verified on reading, independent of the rank count.

::

    OUT/checkpoints/step_00001000/
      model.safetensors                         the backbone's state dict (rank 0)
      optimizer.pt                              the backbone's AdamW state (rank 0)
      model_ema.safetensors                     with ``train.ema``: the moving average of the
                                                backbone's state (rank 0), its decay in the metadata
      prototypes_{start}_{stop}.safetensors     classes start..stop-1: ``weight`` (classes ·
                                                centers, d), SparseAdamW's ``exp_avg``,
                                                ``exp_avg_sq`` and per-row ``step`` (one file
                                                per rank that held them)
      rank_{r}.pt                               rank r's random generators and data position
      checkpoint.json                           the manifest, written last: step, sizes and
                                                SHA-256 of every file, the trainer's state

A checkpoint is written into ``.step_{N}.tmp`` and renamed once every rank has written
its files and rank 0 has written the manifest, so a killed job never leaves a half-written
``step_*`` folder; leftovers of a killed write are removed by the next one. Reading checks
the manifest, every size and every SHA-256 (the files split over the ranks); a damaged
checkpoint is skipped for the previous one.

Prototype files are named by the classes they hold, not by the rank that wrote them: a
rank of a resumed job reads the rows of its own class range from whichever files hold
them, so a job resumes on any number of ranks.

This module is the format's one owner: ``unicom train`` writes and resumes through it,
:mod:`unicom.models.vit` reads a backbone from it (``model.init``) with
:func:`read_model_checkpoint`, and :func:`export_checkpoint` turns one into a model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from unicom import distributed
from unicom.errors import InputError
from unicom.files import file_sha256, save_safetensors, save_torch, write_json_atomic

FORMAT = "unicom-train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "model_ema.safetensors"
_PREFIX = "step_"

# Fault injection for tests of interrupted runs: "checkpoint:N" pauses rank 0 inside the
# write of checkpoint N (files written, manifest not yet); "step:N" pauses after optimiser
# step N; "eval:N" as the evaluation after step N starts (eval.benchmark). The pause lasts UNICOM_FAULT_PAUSE_SECONDS (default 3600) so that a test can
# kill the process at that exact point.
FAULT_VARIABLE = "UNICOM_FAULT_PAUSE"


def pause_if_requested(event: str, step: int) -> None:
    """Sleep when ``UNICOM_FAULT_PAUSE`` names this event and step (see above)."""
    request = os.environ.get(FAULT_VARIABLE)
    if not request or request != f"{event}:{step}" or distributed.get_rank() != 0:
        return
    print(f"fault injection: paused at {event} {step}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("UNICOM_FAULT_PAUSE_SECONDS", "3600")))


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def step_of(path: str | os.PathLike) -> int:
    """The step of checkpoint folder ``path`` (``step_00001000`` -> 1000), from its name."""
    return int(Path(path).name[len(_PREFIX):])


def prototype_file_name(class_start: int, classes: int) -> str:
    return f"prototypes_{class_start:09d}_{class_start + classes:09d}.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record(path: Path) -> dict[str, Any]:
    _fsync(path)
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    prototypes: dict[str, Any],
    rank_state: dict[str, Any],
    manifest: dict[str, Any],
    keep: int,
    ema: tuple[dict[str, torch.Tensor], float] | None = None,
) -> Path:
    """Write checkpoint ``step`` collectively (every rank calls this) and return its folder.

    ``model_state``, ``optimizer_state`` and ``ema`` (the moving average's state and decay,
    :class:`unicom.engine.ema.WeightsEMA`) are read on rank 0 only. ``prototypes``:
    ``class_start``, ``classes``, ``centers``, ``weight`` and, once the optimiser has
    state, ``exp_avg``, ``exp_avg_sq``, ``step`` (rows) and ``common_step``. ``manifest``:
    JSON values stored in ``checkpoint.json`` beside the file records. The new checkpoint
    and the newest ``keep - 1`` intact ones of earlier steps are kept, others removed.
    """
    root = checkpoint_root(out)
    rank = distributed.get_rank()
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{_PREFIX}*.tmp"):  # a write that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    try:
        return _write_checkpoint(tmp, final, step, model_state, optimizer_state, prototypes, rank_state, manifest, keep,
                                 ema)
    except (OSError, KeyboardInterrupt):  # a write the disk refused (full, read-only), or Ctrl-C: keep no part of it
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(tmp: Path, final: Path, step: int, model_state, optimizer_state, prototypes: dict[str, Any],
                      rank_state: dict[str, Any], manifest: dict[str, Any], keep: int, ema=None) -> Path:
    """The files of :func:`save_checkpoint` into ``tmp``, renamed to ``final`` once complete."""
    rank, root = distributed.get_rank(), final.parent
    written: dict[str, dict] = {}
    if rank == 0:
        path = tmp / MODEL_FILE
        save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, path, {"format": "pt"})
        written[MODEL_FILE] = _record(path)
        if optimizer_state is not None:
            path = tmp / OPTIMIZER_FILE
            save_torch(optimizer_state, path)
            written[OPTIMIZER_FILE] = _record(path)
        if ema is not None:
            path = tmp / EMA_FILE
            save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in ema[0].items()}, path,
                             {"format": "pt", "decay": json.dumps(ema[1])})
            written[EMA_FILE] = _record(path)
    name = prototype_file_name(prototypes["class_start"], prototypes["classes"])
    tensors = {key: prototypes[key].detach().to("cpu").contiguous() for key in ("weight", "exp_avg", "exp_avg_sq", "step") if prototypes.get(key) is not None}
    metadata = {key: json.dumps(prototypes.get(key)) for key in ("class_start", "classes", "centers", "common_step")}
    save_safetensors(tensors, tmp / name, metadata)
    written[name] = _record(tmp / name)
    rank_file = f"rank_{rank}.pt"
    save_torch(rank_state, tmp / rank_file)
    written[rank_file] = _record(tmp / rank_file)

    every = distributed.all_gather_object(written)
    blocks = distributed.all_gather_object({"file": name, "class_start": prototypes["class_start"], "classes": prototypes["classes"]})
    if rank == 0:
        pause_if_requested("checkpoint", step)
        files = {}
        for records in every:
            files.update(records)
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": distributed.get_world_size(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **manifest,
            "prototype_blocks": sorted(blocks, key=lambda b: b["class_start"]),
            "files": files,
        }
        write_json_atomic(tmp / MANIFEST, body)
        if final.exists():  # a damaged checkpoint of the same step, skipped when resuming
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        _prune(final, keep)
    distributed.barrier()
    return final


def _prune(final: Path, keep: int) -> None:
    """Keep ``final`` (just written, complete) and the newest ``keep - 1`` intact checkpoints
    of earlier steps; remove the others. A checkpoint of a later step than ``final`` is one a
    resume skipped as damaged (a resume takes the newest intact one, and going on from an
    earlier one is refused while later ones are there): never a keeper, and never kept in
    place of the run's own. Nor is one whose files are missing or not their recorded size."""
    keepers = 1
    for path in complete_checkpoints(final.parent.parent):
        if path == final:
            continue
        if (keepers < keep and step_of(path) < step_of(final)
                and verify_checkpoint(path, contents=False) is None):
            keepers += 1
            continue
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def complete_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of ``out`` that have a manifest, newest first (not yet verified)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(_PREFIX) and entry.name[len(_PREFIX):].isdigit() and (entry / MANIFEST).is_file():
            found.append((step_of(entry), entry))
    return [path for _, path in sorted(found, reverse=True)]


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable checkpoint manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a unicom training checkpoint")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path}: written by a newer unicom (format {manifest.get('format_version')}); upgrade unicom")
    return manifest


def verify_checkpoint(path: str | os.PathLike, rank: int = 0, world_size: int = 1, *, contents: bool = True) -> str | None:
    """None if the files of the checkpoint at ``path`` match its manifest, else what is wrong.

    Sizes are checked for every file; SHA-256 for the files ``i`` with ``i % world_size ==
    rank`` (every rank checks its share; see :func:`find_valid_checkpoint`), or for none
    without ``contents``.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except InputError as error:
        return str(error)
    files = manifest.get("files", {})
    for name in (MODEL_FILE, *[block["file"] for block in manifest.get("prototype_blocks", [])]):
        if name not in files:
            return f"{path}: the manifest lists no {name}"
    for index, (name, record) in enumerate(sorted(files.items())):
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != record["size"]:
            return f"{file}: {file.stat().st_size} bytes, the manifest says {record['size']} (truncated or replaced)"
        if contents and index % world_size == rank and file_sha256(file) != record["sha256"]:
            return f"{file}: SHA-256 differs from the manifest (damaged)"
    covered = 0
    for block in manifest.get("prototype_blocks", []):
        if block["class_start"] != covered:
            return f"{path}: prototype files do not cover classes {covered}..{block['class_start'] - 1}"
        covered += block["classes"]
    if covered != manifest.get("num_classes", covered):
        return f"{path}: prototype files cover {covered} classes, the manifest says {manifest.get('num_classes')}"
    return None


def find_valid_checkpoint(candidates: list[Path], log=print) -> Path | None:
    """The first checkpoint of ``candidates`` that every rank finds intact (collective).

    Damaged ones are reported through ``log`` (rank 0) and skipped.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    for path in candidates:
        problem = verify_checkpoint(path, rank, world)
        problems = [p for p in distributed.all_gather_object(problem) if p]
        if not problems:
            return path
        if rank == 0:
            log(f"checkpoint {path} is damaged and is skipped: {problems[0]}")
    return None


def load_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    file = Path(path) / f"rank_{rank}.pt"
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / MODEL_FILE))


def load_ema_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float] | None:
    """The moving average of the backbone's state a checkpoint holds, and its decay (None: none)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) / EMA_FILE
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as handle:
        decay = json.loads(handle.metadata()["decay"])
    return load_file(str(file)), float(decay)


def load_optimizer_state(path: str | os.PathLike) -> dict | None:
    file = Path(path) / OPTIMIZER_FILE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def load_prototypes(path: str | os.PathLike, class_start: int, classes: int, centers: int, dim: int) -> dict[str, Any]:
    """The prototype rows of classes ``class_start .. class_start + classes - 1`` and their
    optimiser state, read from whichever files hold them (any number of writers).

    Returns ``weight`` ((classes · centers, d) float32) and, when saved, ``exp_avg``,
    ``exp_avg_sq``, ``step`` (per row) and ``common_step`` (None unless every file agrees).
    """
    from safetensors import safe_open

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("centers", centers) != centers or manifest.get("embedding_dim", dim) != dim:
        raise InputError(
            f"{path}: prototypes of {manifest.get('centers')} center(s) x {manifest.get('embedding_dim')} dimensions, "
            f"this run uses {centers} x {dim}"
        )
    stop = class_start + classes
    parts: dict[str, list[torch.Tensor]] = {}
    common_steps = set()
    for block in manifest["prototype_blocks"]:
        lo, hi = max(class_start, block["class_start"]), min(stop, block["class_start"] + block["classes"])
        if lo >= hi:
            continue
        with safe_open(str(path / block["file"]), framework="pt") as f:
            rows = slice((lo - block["class_start"]) * centers, (hi - block["class_start"]) * centers)
            for key in f.keys():
                parts.setdefault(key, []).append(f.get_slice(key)[rows])
            common_steps.add(json.loads(f.metadata().get("common_step", "null")))
    if not parts:
        raise InputError(f"{path}: no prototype file holds classes {class_start}..{stop - 1}")
    result: dict[str, Any] = {key: torch.cat(values) for key, values in parts.items()}
    if result["weight"].shape != (classes * centers, dim):
        raise InputError(f"{path}: prototypes for classes {class_start}..{stop - 1} have shape {tuple(result['weight'].shape)}")
    result["common_step"] = common_steps.pop() if len(common_steps) == 1 else None
    return result


def missing_checkpoint_hint(path: str | os.PathLike) -> str:
    """For a ``step_N`` folder that does not exist: the folder of step N as it is named
    (``step_00000500``) when there is one, else an empty string."""
    path = Path(path)
    number = path.name[len(_PREFIX):]
    if path.exists() or not path.name.startswith(_PREFIX) or not number.isdigit():
        return ""
    named = path.with_name(step_name(int(number)))
    return f" (checkpoint folders are named {named.name}: {named})" if named.is_dir() else ""


def resolve_run_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the newest intact one of a run folder (for ``model.init``)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such run or checkpoint folder{missing_checkpoint_hint(path)}")
    if (path / MANIFEST).is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise InputError(problem)
        return path
    for candidate in complete_checkpoints(path):
        if verify_checkpoint(candidate) is None:
            return candidate
    raise InputError(f"{path}: no intact checkpoint in {checkpoint_root(path)}")


def read_model_checkpoint(path: str | os.PathLike) -> tuple[str, dict, dict[str, torch.Tensor], Path]:
    """``(architecture, settings, backbone state dict, checkpoint folder)`` of a checkpoint
    or of the newest intact checkpoint of a run folder."""
    folder = resolve_run_checkpoint(path)
    manifest = read_manifest(folder)
    return manifest["architecture"], dict(manifest["settings"]), load_model_state(folder), folder


def export_checkpoint(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Export the backbone of a checkpoint (or of a run's newest intact one) as a model folder:
    the moving average of its weights where the run kept one (``train.ema``), as the run exports."""
    from unicom.models.export import save_model
    from unicom.models.registry import get_architecture

    architecture, settings, state_dict, source = read_model_checkpoint(path)
    manifest = read_manifest(source)
    provenance = {"trained_by": "unicom train", "checkpoint": str(Path(source).resolve()), "step": manifest["step"]}
    averaged = load_ema_state(source)
    if averaged is not None:  # the run exports its moving average (train.ema): so does this
        state_dict, provenance["ema_decay"] = averaged
    return save_model(folder, state_dict, architecture, settings,
                      get_architecture(architecture).evaluation_preprocess(settings), provenance=provenance)
