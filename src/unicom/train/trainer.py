"""The training program: cluster-discrimination pre-training and retrieval fine-tuning.

:func:`train` runs a recipe (:class:`~unicom.train.config.TrainConfig`) on one process or
under ``torchrun``: the backbone in DistributedDataParallel with summed gradients
(:mod:`unicom.engine.ddp`), the prototypes sharded by :class:`~unicom.losses.PartialFC`
and updated by :class:`~unicom.optim.SparseAdamW`, one optimiser step at a time by the
training core's :class:`~unicom.engine.step.TrainStep`. This module adds what only this
program does: the data stream, the run's counters, checkpoints of every rank, resuming
and the export of the backbone.

Order of work: the recipe is validated, the inputs are read and checked, the model is
built, a checkpoint to resume from is found and verified, and only then is anything
written under ``out``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unicom import distributed, storage
from unicom.data.transforms import resolve_decode
from unicom.engine import checkpoint as ckpt
from unicom.engine.device import check_attention_backend, made_ahead, resolve_device, resolve_precision
from unicom.engine.ema import WeightsEMA
from unicom.engine.recipe import changed_keys, to_yaml, yaml_value
from unicom.engine.runlog import LOG_FILE, RunLog, check_wandb, format_duration
from unicom.engine.seeding import rng_state, seed_everything, set_rng_state
from unicom.engine.step import (UNREAD_STEPS, StepResult, TrainingStopped, TrainStep, build_train_step,
                                load_optimizer_state)
from unicom.errors import InputError
from unicom.losses.partial_fc import ClassesPerStep, classes_per_step
from unicom.progress import INPUT_BOUND_SHARE
from unicom.train.config import TrainConfig


# -------------------------------------------------------------------------- the state


@dataclass
class RunState:
    """Counters of a run, stored in every checkpoint's manifest."""

    step: int = 0
    images: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    unlabelled: int = 0
    failed: int = 0
    seconds: float = 0.0
    loss_scale: dict = field(default_factory=dict)
    best_score: float | None = None  # eval.keep_best: the best score so far, and its step
    best_step: int | None = None
    best_of: str | None = None  # what best_score is of: "cub recall@1" (None: a checkpoint before it was kept)


# Keys a resumed run may change without a word: where the run writes and how often, the
# readers, and the batch layout (which has a note of its own, see _resume_batch)
QUIET_RESUME_CHANGES = ("out", "checkpoint.resume", "checkpoint.every", "checkpoint.keep", "log.", "data.workers",
                        "data.batch_size", "train.accumulation")


# ---------------------------------------------------------------------------- training


@dataclass
class Run:
    """Everything :func:`train` builds before its loop (see :func:`prepare`)."""

    config: TrainConfig
    out: Path
    device: torch.device
    precision: str
    source: Any
    created: Any
    backbone: nn.Module
    partial_fc: nn.Module
    step_fn: TrainStep
    workers: int
    roles: int
    steps_per_epoch: int
    total_steps: int
    resume_from: Path | None
    epoch_origin: tuple[int, float] = (0, 0.0)  # (step, epoch) the epochs count on from: the resumed checkpoint's
    ema: WeightsEMA | None = None  # train.ema's moving average of the backbone's weights (rank 0)
    locked: Any = None  # model.lock's unicom.engine.lock.Locked
    evaluation: Any = None  # the eval section's unicom.train.evaluation.RunEvaluation

    @property
    def global_batch(self) -> int:
        """Images per optimiser step, all ranks and micro-steps together."""
        return distributed.get_world_size() * self.config.data.batch_size * self.config.train.accumulation

    def epoch(self, step: int) -> float:
        """Epochs done after ``step``, continuous over resumes with another batch layout."""
        origin_step, origin_epoch = self.epoch_origin
        return origin_epoch + (step - origin_step) / self.steps_per_epoch


def _find_resume(config: TrainConfig, log) -> Path | None:
    """The checkpoint to resume from (collective), or None to start afresh."""
    out = Path(config.out)
    setting = config.checkpoint.resume
    if setting == "never":
        # every rank takes part in the broadcast, also where out is missing (a node's own disk)
        found = distributed_broadcast(ckpt.complete_checkpoints(out) if out.exists() else [])
        if found:
            raise InputError(
                f"{out} holds checkpoints (newest {found[0].name}) and checkpoint.resume=never: "
                "use another out, delete its checkpoints/, or resume (checkpoint.resume=auto)"
            )
        return None
    if setting == "auto":
        candidates = distributed_broadcast(ckpt.complete_checkpoints(out))
        if not candidates:
            return None
    else:
        path = Path(setting)
        if (path / ckpt.MANIFEST).is_file():
            candidates = [path]
        elif (path / ckpt.CHECKPOINTS).is_dir():
            candidates = distributed_broadcast(ckpt.complete_checkpoints(path))
        else:
            raise InputError(f"checkpoint.resume={setting!r}: neither a checkpoint folder (with {ckpt.MANIFEST}) nor a run "
                             f"folder{ckpt.missing_checkpoint_hint(path)}")
    chosen = ckpt.find_valid_checkpoint(candidates, log=log)
    if chosen is None:
        raise InputError(
            f"no intact checkpoint among {', '.join(str(c) for c in candidates)}; "
            "delete them (or use another out) to start afresh"
        )
    if setting != "auto" and Path(setting).resolve() != out.resolve():  # out itself: the choice auto makes
        _refuse_newer_checkpoints(out, chosen)
    return chosen


def _refuse_newer_checkpoints(out: Path, chosen: Path) -> None:
    """Going on from an earlier checkpoint than ``out``'s newest would leave the newer ones
    of the run it leaves beside its own: pruning would keep those and delete its own, and the
    next resume (auto: the newest) would take them up again."""
    step = int(ckpt.read_manifest(chosen)["step"])
    found = distributed_broadcast(ckpt.complete_checkpoints(out) if out.exists() else [])
    newer = [path for path in found if ckpt.step_of(path) > step]
    if newer:
        raise InputError(
            f"checkpoint.resume={chosen}: {out} holds later checkpoints ({', '.join(p.name for p in reversed(newer))}) "
            f"that a resumed run would leave among its own, and that the next resume would take up again; to go on "
            f"from step {step}, delete them, or give another out"
        )


def _refuse_trained_out(out: Path) -> None:
    """``train.steps=0`` writes the untrained network to ``out/model``: never over a run's."""
    found = distributed_broadcast(ckpt.complete_checkpoints(out) if out.exists() else [])
    if found:
        raise InputError(f"train.steps=0 exports the untrained network to {out / 'model'}, but {out} holds a run "
                         f"(newest checkpoint {found[0].name}): use another out")


def _refuse_differing_data(source, per_epoch: int, total: int) -> None:
    """Every rank reads its own copy of the data description (a node reads its own disk):
    ranks that found other data would take other numbers of steps, and the one that stops
    first would leave the others waiting in a collective, or map labels to other prototype
    rows. Refused on every rank, naming the ranks that differ from rank 0 (collective)."""
    labels = getattr(source, "class_labels", None)
    mine = {"data": source.describe(), "steps per epoch": per_epoch, "steps": total,
            "classes": hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:12] if labels is not None else None}
    views = distributed.all_gather_object((mine, socket.gethostname()))
    first, host = views[0]
    differing = [(rank, view, other) for rank, (view, other) in enumerate(views) if view != first]
    if differing:
        def shown(view):
            return (f"{view['data']}, {view['steps per epoch']} steps per epoch, {view['steps']} steps"
                    + (f", class labels {view['classes']}" if view["classes"] else ""))

        others = "; ".join(f"rank {rank} (host {other}): {shown(view)}" for rank, view, other in differing[:3])
        raise InputError(f"the ranks read different data: rank 0 (host {host}): {shown(first)}; {others}. Every node "
                         "must read the same data (data.shards, data.labels, data.folder): on object storage or a file "
                         "system every node mounts, under the same path")


def distributed_broadcast(value):
    return distributed.broadcast_object(value)


def prepare(config: TrainConfig, log: RunLog | None = None) -> Run:
    """Validate, read inputs, build the model, loss and optimisers, find the checkpoint."""
    from unicom.engine.ddp import wrap_backbone
    from unicom.models.vit import create_model
    from unicom.train.data import build_source, steps_per_epoch

    config.validate()
    if config.log.wandb and distributed.get_rank() == 0:
        check_wandb()
    distributed.require_shared_folder(config.out, "out", "every rank writes its share of each checkpoint there and "
                                      "reads it back when the run resumes")
    say = log.print if log is not None else (lambda text: print(text) if distributed.get_rank() == 0 else None)
    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    world = distributed.get_world_size()

    source = build_source(config)
    if config.data.workers is not None:
        workers = config.data.workers
    else:  # as many as the data can keep busy
        from unicom.embed import default_num_workers

        workers = min(default_num_workers(device), source.max_readers(world, config.data.batch_size))
        workers = 0 if workers <= 1 and device.type == "cpu" else workers
    roles = max(1, workers)
    if config.train.steps != 0:  # train.steps=0 reads no image: any data size exports the network
        source.check_readers(world, roles, config.data.batch_size)

    seed_everything(config.seed)  # the same initial weights on every rank
    created = create_model(config.model.name, init=config.model.init, overrides=config.model.overrides(),
                           drop_path_rate=config.model.drop_path_rate)
    seed_everything(config.seed + 1 + distributed.get_rank())  # stochastic depth differs over ranks
    backbone = created.module.to(device).train()
    if config.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    # DynM-ArcFace's margins come from the training images per class
    class_counts = source.class_counts() if config.loss.needs_class_counts else None
    partial_fc = config.loss.partial_fc(created.embedding_dim, source.num_classes, class_counts, seed=config.seed).to(device)
    if config.train.steps == 0:  # the untrained network: never resumed, never written over a run
        _refuse_trained_out(Path(config.out))
        resume_from = None
    else:
        resume_from = _find_resume(config, say)
    origin = (0, 0.0)
    if resume_from is not None:
        manifest = ckpt.read_manifest(resume_from)
        config = _resume_batch(config, manifest, world, say)
        origin = (int(manifest["step"]), float(manifest["epoch"]))
    per_epoch = steps_per_epoch(source, world, config.data.batch_size, config.train.accumulation, config.data.samples_per_epoch)
    if config.train.steps is not None:
        total = config.train.steps
    else:  # the epochs left after the checkpoint, at this run's steps per epoch
        total = max(1, origin[0] + int(round((config.train.epochs - origin[1]) * per_epoch)))
    _refuse_differing_data(source, per_epoch, total)
    if resume_from is None and created.prototypes_from is not None:
        _warm_start_prototypes(partial_fc, created.prototypes_from, source.labels_centroids, say)
    if config.model.sync_batchnorm and world > 1 and device.type == "cuda":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)  # no-op without BatchNorm
    evaluation = None
    if config.eval.benchmark:  # read (its images checked) before anything trains
        from unicom.train.evaluation import RunEvaluation

        evaluation = RunEvaluation(config.eval, created, device)
    locked = None
    if config.model.lock:  # after the SyncBatchNorm conversion, which makes new BatchNorm layers
        from unicom.engine.lock import lock_layers

        locked = lock_layers(backbone, config.model.unlocked_groups, config.model.lock_bn_stats)
    if config.model.attention != "auto":  # refused here, with the backends that run, rather than in the first step
        size, channels = int(created.settings["image_size"]), int(created.settings.get("in_chans", 3))
        check_attention_backend(config.model.attention, backbone, torch.zeros(1, channels, size, size, device=device),
                                precision)
    if config.model.compile:
        from unicom.engine.device import compile_cache

        compile_cache()  # compiled graphs outlive the process: a restart skips the compilation
        backbone.compile()
    step_fn = build_train_step(backbone, partial_fc, config.optim, device, precision, wrapped=wrap_backbone(backbone, device),
                               attention=config.model.attention)
    return Run(config, Path(config.out), device, precision, source, created, backbone, partial_fc, step_fn,
               workers, roles, per_epoch, total, resume_from, origin, locked=locked, evaluation=evaluation)


def _resume_batch(config: TrainConfig, manifest: dict, world: int, say) -> TrainConfig:
    """The recipe to resume ``manifest``'s checkpoint with on ``world`` ranks.

    A step keeps the checkpoint's global batch (its images per optimiser step): on another
    number of ranks, or with another ``data.batch_size``, ``train.accumulation`` changes to
    make it up (a copy of the recipe says so); when no whole accumulation does, an
    :class:`InputError` says which batch sizes or rank counts would.
    ``checkpoint.resume_batch=change`` runs the recipe's batch as given instead.
    """
    import copy

    saved = manifest["config"]
    old_world = manifest["world_size"]
    old_batch, old_accumulation = saved["data"]["batch_size"], saved["train"]["accumulation"]
    old_global = manifest.get("global_batch", old_world * old_batch * old_accumulation)
    batch, accumulation = config.data.batch_size, config.train.accumulation
    new_global = world * batch * accumulation
    was = f"{old_global} ({old_world} rank(s) x {old_batch} images x {old_accumulation} micro-step(s))"
    if new_global == old_global:
        return config
    if config.checkpoint.resume_batch == "change":
        say(f"note: the checkpoint's global batch was {was}; this run steps with {new_global} "
            f"({world} x {batch} x {accumulation}), as checkpoint.resume_batch=change allows")
        return config
    if old_global % (world * batch):
        per_rank = old_global // world if old_global % world == 0 else None
        sizes = [size for size in range(batch, 0, -1) if per_rank and per_rank % size == 0][:1]
        ranks = [r for r in range(1, old_global + 1) if old_global % (r * batch) == 0]
        raise InputError(
            f"the checkpoint was trained with a global batch of {was}; {world} rank(s) x data.batch_size={batch} cannot "
            "make it up with a whole train.accumulation. "
            + (f"Use data.batch_size={sizes[0]} (or another divisor of {per_rank}), " if sizes else "")
            + (f"run on {' or '.join(str(r) for r in ranks[:3])} rank(s), " if ranks else "")
            + f"or set checkpoint.resume_batch=change to go on with {new_global} images per step"
        )
    adjusted = copy.deepcopy(config)
    adjusted.train.accumulation = old_global // (world * batch)
    say(f"note: train.accumulation={adjusted.train.accumulation} instead of {accumulation}: {world} rank(s) x {batch} "
        f"images x {adjusted.train.accumulation} micro-step(s) keep the checkpoint's global batch of {was}")
    return adjusted


def _warm_start_prototypes(partial_fc, path: Path, labels_centroids: str | None, say) -> None:
    """Start the prototypes from a training checkpoint given as model.init, when they fit:
    the same shape, and pseudo-labels of the same centroids when both runs record theirs."""
    manifest = ckpt.read_manifest(path)
    fits = (manifest.get("num_classes") == partial_fc.num_classes and manifest.get("centers") == partial_fc.centers
            and manifest.get("embedding_dim") == partial_fc.embedding_size)
    trained_on = manifest.get("labels_centroids")
    if fits and trained_on is not None and labels_centroids is not None and trained_on != labels_centroids:
        # clustered again: class c is another cluster, and row c of those prototypes learnt the old one
        say(f"prototypes start afresh: {path} was trained on pseudo-labels of other centroids ({trained_on}) than "
            f"this run's ({labels_centroids})")
        return
    if not fits:
        say(f"prototypes start afresh: {path} has {manifest.get('num_classes')} classes x {manifest.get('centers')} "
            f"center(s) x {manifest.get('embedding_dim')} dims, this run {partial_fc.num_classes} x {partial_fc.centers} "
            f"x {partial_fc.embedding_size}")
        return
    block = ckpt.load_prototypes(path, partial_fc.class_start, partial_fc.num_local, partial_fc.centers, partial_fc.embedding_size)
    with torch.no_grad():
        partial_fc.prototypes.copy_(block["weight"])
    say(f"prototypes start from {path}")


def _data_positions(run: Run, resume_state: dict | None, manifest: dict | None, say) -> tuple[list[tuple[int, int]], int]:
    """Readers' ``(pass, cursor)`` and the next reader, restored or re-planned."""
    fresh = [(0, 0)] * run.roles, 0
    if manifest is None:  # a fresh start
        return fresh
    world = distributed.get_world_size()
    data = resume_state.get("data") if resume_state else None
    if data is not None and manifest["world_size"] == world and data["roles"] == run.roles:
        return [tuple(p) for p in data["positions"]], int(data["next_role"])
    # another number of ranks or readers: keep the amount of data consumed in the pass in progress
    old = [ckpt.load_rank_state(run.resume_from, r) for r in range(manifest["world_size"])]
    positions = [tuple(p) for state in old if state for p in state["data"]["positions"]]
    if not positions:
        return fresh
    first_pass = min(p for p, _ in positions)
    consumed = sum(c for p, c in positions if p == first_pass)
    cursor = consumed // (world * run.roles)
    say(f"note: the checkpoint was written by {manifest['world_size']} rank(s) x {manifest['roles']} reader(s); with "
        f"{world} x {run.roles} the data order differs from an uninterrupted run: every reader restarts pass "
        f"{first_pass} after {cursor} records")
    return [(first_pass, cursor)] * run.roles, 0


def _restore(run: Run, say) -> tuple[RunState, dict | None, dict | None]:
    """Load the checkpoint to resume from into the run; returns its counters and states."""
    path = run.resume_from
    manifest = ckpt.read_manifest(path)
    expected = {"architecture": run.created.architecture, "settings": run.created.settings,
                "num_classes": run.partial_fc.num_classes, "centers": run.partial_fc.centers}
    differences = [f"{key}: {manifest.get(key)!r} there, {value!r} now" for key, value in expected.items() if manifest.get(key) != value]
    if differences:
        raise InputError(f"{path} belongs to another configuration ({'; '.join(differences)}); use another out")
    trained_on, labels_now = manifest.get("labels_centroids"), run.source.labels_centroids
    if trained_on is not None and labels_now is not None and trained_on != labels_now:
        # prototype row c learnt cluster c of those labels: a clustering made anew numbers other clusters c
        raise InputError(
            f"{path} was trained on pseudo-labels of other centroids than those of {run.config.data.labels} now "
            f"(clustered again since: centroids {trained_on} there, {labels_now} now), and its prototypes belong to "
            "those: give the labels it was trained on, or start a new run in another out (model.init may take this "
            "run's model)"
        )
    run.backbone.load_state_dict(ckpt.load_model_state(path))
    optimizer_state = ckpt.load_optimizer_state(path)
    if optimizer_state is not None:
        load_optimizer_state(run.step_fn.backbone_optimizer, optimizer_state, run.backbone)
    pfc = run.partial_fc
    block = ckpt.load_prototypes(path, pfc.class_start, pfc.num_local, pfc.centers, pfc.embedding_size)
    with torch.no_grad():
        pfc.prototypes.copy_(block["weight"].to(pfc.prototypes.device))
    if "exp_avg" in block:
        device = pfc.prototypes.device
        run.step_fn.prototype_optimizer.state[pfc.prototypes] = {
            "step": block["step"].to(device),
            "exp_avg": block["exp_avg"].to(device),
            "exp_avg_sq": block["exp_avg_sq"].to(device),
            "common_step": block["common_step"],
        }
    run_state = RunState(**manifest["state"])
    run.step_fn.scaler.load_state_dict(run_state.loss_scale)
    world = distributed.get_world_size()
    rank_state = ckpt.load_rank_state(path, distributed.get_rank()) if manifest["world_size"] == world else None
    if rank_state is not None:
        set_rng_state(rank_state["rng"], run.device)
        pfc.set_rng_state(rank_state["partial_fc"], run.device)
    else:
        # another number of ranks: the feature selection is common to all ranks (rank 0's);
        # the class selection and augmentation generators are seeded anew for this rank
        rank0 = ckpt.load_rank_state(path, 0)
        seed_everything(run.config.seed + 7919 * (run_state.step + 1) + distributed.get_rank())
        feature = rank0["partial_fc"].get("feature") if rank0 else None
        if feature is not None:
            pfc.set_rng_state({"feature": feature}, run.device)
            _, classes = pfc.generators(run.device)
            classes.manual_seed(run.config.seed + 2 + pfc.rank + 7919 * (run_state.step + 1))
    say(f"resumed from {path} at step {run_state.step}")
    changed = changed_keys(manifest["config"], run.config, ignore=QUIET_RESUME_CHANGES)
    if changed:
        say("note: the recipe differs from the checkpoint's and the run goes on with this one: "
            + "; ".join(f"{key} {yaml_value(old)} -> {yaml_value(new)}" for key, old, new in changed))
    return run_state, rank_state, manifest


def _save(run: Run, state: RunState, positions, next_role: int) -> Path:
    """Write checkpoint ``state.step``; a write the disk refuses keeps no part of it and
    ends the run with an :class:`InputError` that says so."""
    from unicom.files import refused_write

    with refused_write(ckpt.checkpoint_root(run.out), f"checkpoint {ckpt.step_name(state.step)}",
                       "the run resumes from its newest intact checkpoint"):
        return _write_run_checkpoint(run, state, positions, next_role)


def _write_run_checkpoint(run: Run, state: RunState, positions, next_role: int) -> Path:
    pfc = run.partial_fc
    opt_state = run.step_fn.prototype_optimizer.state.get(pfc.prototypes, {})
    prototypes = {
        "class_start": pfc.class_start,
        "classes": pfc.num_local,
        "centers": pfc.centers,
        "weight": pfc.prototypes,
        "exp_avg": opt_state.get("exp_avg"),
        "exp_avg_sq": opt_state.get("exp_avg_sq"),
        "step": opt_state.get("step"),
        "common_step": opt_state.get("common_step"),
    }
    rank_state = {
        "rng": rng_state(run.device),
        "partial_fc": pfc.rng_state(),
        "data": {"roles": run.roles, "positions": [list(p) for p in positions], "next_role": next_role},
    }
    state.loss_scale = run.step_fn.scaler.state_dict()
    main = distributed.get_rank() == 0
    manifest = {
        "epoch": run.epoch(state.step),
        "global_batch": run.global_batch,
        "architecture": run.created.architecture,
        "settings": run.created.settings,
        "embedding_dim": run.created.embedding_dim,
        "num_classes": pfc.num_classes,
        "centers": pfc.centers,
        "labels_centroids": run.source.labels_centroids,
        "roles": run.roles,
        "state": asdict(state),
        "config": run.config.to_dict(),
    }
    return ckpt.save_checkpoint(
        run.out, state.step,
        model_state=run.backbone.state_dict() if main else None,
        optimizer_state=run.step_fn.backbone_optimizer.state_dict() if main else None,
        prototypes=prototypes, rank_state=rank_state, manifest=manifest, keep=run.config.checkpoint.keep,
        ema=(run.ema.state, run.ema.decay) if main and run.ema is not None else None,
    )


BEST_MODEL = "model_best"  # eval.keep_best's folder in OUT
CURVES = "curves.png"  # the loss (and the evaluations) against the step, drawn at the end


def export_model(run: Run, folder: Path, step: int, evaluation: dict | None = None) -> Path:
    """Write the backbone as an exported model folder (rank 0): with ``train.ema``, the moving
    average of its weights; ``evaluation``, its score (``provenance.eval``)."""
    from unicom.losses.heads import head_settings
    from unicom.models.export import save_model

    pfc = run.partial_fc
    provenance = {
        "trained_by": "unicom train",
        "run": str(run.out.resolve()),
        "step": step,
        "seed": run.config.seed,
        "init": storage.recorded(run.config.model.init),
        "data": run.source.describe(),
        "loss": {**head_settings(pfc.margin), "sample_rate": pfc.sample_rate, "feature_rate": pfc.feature_rate,
                 "centers": pfc.centers, "margin_gradient": pfc.margin_gradient, "num_classes": pfc.num_classes},
    }
    if evaluation is not None:
        provenance["eval"] = evaluation
    weights = run.backbone.state_dict()
    if run.ema is not None:  # train.ema: the moving average is the model
        weights, provenance["ema_decay"] = run.ema.state, run.ema.decay
    return save_model(folder, weights, run.created.architecture, run.created.settings, run.created.preprocess(),
                      provenance=provenance)


def _all_reduce_counts(values: list[int], device: torch.device) -> list[int]:
    if distributed.get_world_size() == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def train(config: TrainConfig, console=None) -> dict[str, Any]:
    """Run a recipe to the end (or resume it); returns the run's summary.

    The trained backbone is exported to ``out/model`` (``unicom_model.json`` +
    ``model.safetensors``), loadable by ``unicom embed``/``evaluate``/``index`` and
    :func:`unicom.load`.
    """
    from unicom.files import refused_write, write_json_atomic, write_text_atomic
    from unicom.train.data import TrainStream, make_loader, reader_error

    run = prepare(config)
    config = run.config  # the recipe as it runs (train.accumulation may keep a resumed run's batch)
    out, rank, world = run.out, distributed.get_rank(), distributed.get_world_size()
    starts = "the run starts (or resumes) as it would have"
    if rank == 0:
        with refused_write(out, "the run's recipe (config.yaml)", starts):
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "config.yaml", to_yaml(config))
            if getattr(run.source, "class_labels", None) is not None:  # given labels -> prototype rows
                write_text_atomic(out / "classes.csv", run.source.classes_table())
    distributed.barrier()
    continues_from = int(ckpt.read_manifest(run.resume_from)["step"]) if run.resume_from is not None else 0
    with refused_write(out, "the log (log.jsonl)", starts):
        log = RunLog(out, tensorboard=config.log.tensorboard, console=console, continues_from=continues_from,
                     wandb=config.log.wandb_run(config))
    say = log.print

    state, rank_state, manifest = (RunState(), None, None)
    if run.resume_from is not None:
        state, rank_state, manifest = _restore(run, say)
        log.event("resume", checkpoint=str(run.resume_from), step=state.step)
        _compare_best(run, state, say)
    if config.train.ema is not None and rank == 0:
        train = config.train
        run.ema = WeightsEMA(run.backbone, train.ema, warmup=train.ema_warmup, update_after=train.ema_update_after,
                             min_decay=train.ema_min_decay, warmup_gamma=train.ema_warmup_gamma,
                             warmup_power=train.ema_warmup_power)
        saved = ckpt.load_ema_state(run.resume_from) if run.resume_from is not None else None
        if saved is not None:
            run.ema.load(saved[0])
        elif run.resume_from is not None:
            say(f"note: train.ema averages the weights from step {state.step} on (the checkpoint kept no average)")
    positions, next_role = _data_positions(run, rank_state, manifest, say)
    batch, accumulation, global_batch = config.data.batch_size, config.train.accumulation, run.global_batch
    say(f"unicom train: {run.created.architecture} {run.created.settings} (weights: {run.created.init_kind}"
        f"{' ' + str(run.created.init) if run.created.init else ''}), {run.partial_fc.num_classes:,} classes, "
        f"{run.partial_fc.margin!r} head, sample_rate {config.loss.sample_rate}, feature_rate {config.loss.feature_rate}"
        + (f", margin_gradient {config.loss.margin_gradient}" if config.loss.margin_gradient != "exact" else ""))
    if run.created.reinitialised:
        say(f"  initialised afresh: {', '.join(run.created.reinitialised)}")
    if run.locked is not None:
        say(f"  {run.locked.describe()}")
    if run.evaluation is not None:
        say(f"  {run.evaluation.describe()}")
    say(f"  data: {run.source.describe()}; {world} rank(s) x {batch} images x {accumulation} micro-step(s) = "
        f"{global_batch} per step, {run.steps_per_epoch} steps per epoch, {run.total_steps} steps, "
        f"{run.workers} decoding worker(s) per rank; {run.precision} on {run.device}")
    if getattr(run.source, "class_labels", None) is not None:
        say(f"  {run.source.describe_classes()} (all in {out / 'classes.csv'})")
    if run.source.labels_note:
        say(f"  labels: {run.source.labels_note}")
    selection = classes_per_step(run.partial_fc.num_classes, world * batch, config.loss.sample_rate, world)
    for line in _describe_selection(selection, world * batch, config.loss.sample_rate):
        say(line)
    log.event("start", step=state.step, total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
              global_batch=global_batch, world_size=world, device=str(run.device), precision=run.precision,
              architecture=run.created.architecture, settings=run.created.settings, num_classes=run.partial_fc.num_classes,
              data=run.source.describe(), classes_per_step=round(selection.used, 1))

    evaluated = run.created.preprocess()  # trained with the normalisation the model is evaluated with
    transform = config.augment.transform(run.created.image_size, mean=evaluated["mean"], std=evaluated["std"])
    stream = TrainStream(run.source, transform, batch, config.seed, rank, world, run.roles, positions, next_role,
                         device_decode=resolve_decode(config.data.decode, run.device, transform))
    # train.steps=0 reads no data: no decoding workers to start. A batch decoded on the device is
    # decoded (in a thread, on a CUDA stream of its own) while the step before it runs.
    loader = make_loader(stream, run.workers, run.device) if state.step < run.total_steps else ()
    batches = made_ahead(loader, lambda item: stream.to_device(item, run.device), run.device, ahead=stream.tensor is not None)
    positions = list(positions)
    interval = {"loss": 0.0, "steps": 0, "finite": 0, "data": 0.0, "start": time.perf_counter(), "unlabelled": 0, "failed": 0}
    first_step = state.step + 1  # logged alone: it carries the start-up (workers, first batches, first kernels)
    result = None
    unread: list[tuple[int, StepResult]] = []  # steps whose results the host has not read yet
    last_saved = state.step if run.resume_from is not None else -1
    scores = None  # the last evaluation's metrics (rank 0)
    failed = True  # until the run returns: W&B is told how it ended
    try:
        while state.step < run.total_steps:
            factor = config.schedule.factor(state.step, run.total_steps, run.steps_per_epoch)
            run.step_fn.set_learning_rates(*config.optim.learning_rates(factor))
            micro = []
            waited = time.perf_counter()
            for _ in range(accumulation):
                try:
                    item, inputs = next(batches)  # inputs made where the model runs (data.decode): may add failures
                except InputError as error:  # a reader's (in a decoding worker: its traceback in the message)
                    raise reader_error(error) from None
                positions[item.role] = (item.pass_, item.cursor)
                next_role = (item.role + 1) % run.roles
                micro.append(inputs)
                interval["unlabelled"] += item.unlabelled
                interval["failed"] += item.failed
                log.failures(item.failures, state.step + 1)
            interval["data"] += time.perf_counter() - waited
            if state.step == 0 or (run.resume_from is not None and state.step == manifest["step"]):
                run.partial_fc.check_inputs = True  # labels, shapes and agreement across ranks, once
            result = run.step_fn(micro)
            run.partial_fc.check_inputs = False
            if run.ema is not None:
                run.ema.update(run.backbone, state.step + 1)  # the step just taken
            state.step += 1
            state.images += global_batch
            interval["steps"] += 1
            unread.append((state.step, result))
            log_now = state.step % config.log.every == 0 or state.step == run.total_steps or state.step == first_step
            checkpoint_now = state.step % config.checkpoint.every == 0 or state.step == run.total_steps
            if log_now or checkpoint_now or len(unread) >= UNREAD_STEPS:
                # the steps' results are read here, not after each step: the host queues the next
                # steps while the device works, and waits for it at log lines and checkpoints only
                for number, done in unread:
                    _account(number, done, state, interval, run, log, config, out)
                unread.clear()
            if log_now:
                _log_interval(run, log, state, interval, result, global_batch, factor, startup=state.step == first_step)
            ckpt.pause_if_requested("step", state.step)
            if run.evaluation is not None and (state.step == run.total_steps or
                                               (config.eval.every and state.step % config.eval.every == 0)):
                # before the checkpoint: a run stopped while it scores takes the steps and the score again
                began = time.perf_counter()
                scored = _evaluate(run, log, state)
                scores = scored if scored is not None else scores
                interval["start"] += time.perf_counter() - began  # images/s without the evaluation
            if checkpoint_now:
                began = time.perf_counter()
                saved = _save(run, state, positions, next_role)
                last_saved = state.step
                interval["start"] += time.perf_counter() - began  # images/s without the write
                log.event("checkpoint", step=state.step, path=str(saved), seconds=round(time.perf_counter() - began, 3))
        if last_saved != state.step and state.step > 0:
            _save(run, state, positions, next_role)
        model_folder = out / "model"
        if rank == 0:
            with refused_write(out, "the model (model/)", "the run resumes from its last checkpoint and exports the model"):
                export_model(run, model_folder, state.step)
        if rank == 0 and state.step > 0:
            from unicom.evaluate.plots import plot_training_curves

            with refused_write(out, f"the curves ({CURVES})", "the run resumes from its last checkpoint and draws them"):
                plot_training_curves(out / LOG_FILE, out / CURVES, title=f"unicom train: {run.created.architecture}")
        distributed.barrier()
        untrained = state.step == 0
        summary = {
            "steps": state.step,
            "images": state.images,
            "skipped_steps": state.skipped_steps,
            "unlabelled_samples": state.unlabelled,
            "failed_images": state.failed,
            "final_loss": result.loss if result is not None else None,
            "model": str(model_folder),
            "checkpoint": None if untrained else str(ckpt.checkpoint_root(out) / ckpt.step_name(state.step)),
        }
        if scores is not None:
            summary["eval"] = scores
        if rank == 0:
            write_json_atomic(out / "summary.json", summary)
        log.event("end", **summary)
        if untrained:
            say(f"train.steps=0: the initial network (seed {config.seed}) exported to {model_folder}, untrained")
        else:
            say(f"done: {state.step} steps, {state.skipped_steps} skipped; model exported to {model_folder}")
        failed = False
        return summary
    finally:
        log.close(failed=failed)
        batches.close()  # the reader ahead stops
        del batches


def _compare_best(run: Run, state: RunState, say) -> None:
    """A resumed run's best score kept only when it is of what this run scores (benchmarks and
    metric, ``eval.metric``); of something else it is dropped, with a note, and the next
    evaluation is the best so far."""
    if state.best_score is None or run.evaluation is None:
        return
    kept = state.best_of or run.evaluation.headline_scored_as  # a checkpoint written before best_of
    if kept != run.evaluation.scored_as:
        say(f"note: the checkpoint's best score ({kept} {state.best_score:.4f} at step {state.best_step}) is not "
            f"of {run.evaluation.scored_as}: the next evaluation is the best so far")
        state.best_score = state.best_step = state.best_of = None


def _evaluate(run: Run, log: RunLog, state: RunState) -> dict[str, Any] | None:
    """Score the model as it would be exported after step ``state.step`` on each benchmark (every
    rank embeds its share); rank 0 logs the metrics (an ``eval`` event per benchmark, TensorBoard's
    ``eval/`` scalars, a line each) and returns them (of several benchmarks: by name, with their
    ``mean``), the other ranks None. With ``eval.keep_best``, a score above every earlier one
    (``state.best_score``, kept in the checkpoints) exports ``OUT/model_best``: the benchmark's
    metric, or the mean of the benchmarks'."""
    from unicom.train.evaluation import headline

    evaluation, step = run.evaluation, state.step
    ckpt.pause_if_requested("eval", step)
    scores = evaluation(run.backbone, run.ema.state if run.ema is not None else None)
    best = value = None
    if scores is not None:
        weights = "moving average" if run.config.train.ema is not None else "network"
        value = evaluation.value(scores)
        best = run.config.eval.keep_best and (state.best_score is None or value > state.best_score)
        kept = f"; the best so far: exported to {run.out / BEST_MODEL}" if best else ""
        for benchmark in evaluation.benchmarks:
            metrics = scores[benchmark.name]
            log.event("eval", step=step, benchmark=benchmark.name, metric=benchmark.metric, weights=weights,
                      best=bool(best), **metrics)
            log.print(f"eval step {step}: {benchmark.name} {headline(metrics, benchmark.metric)} ({weights}, "
                      f"{metrics['seconds']:.1f}s)" + ("" if evaluation.several else kept))
        if evaluation.several:
            scores = {**scores, "mean": value}
            log.print(f"eval step {step}: {evaluation.scored_as} {100 * value:.2f}{kept}")
        log.scalars(step, scores if evaluation.several else scores[evaluation.benchmarks[0].name], section="eval")
    if run.config.eval.keep_best and distributed.broadcast_object(best):  # the ranks keep the same counters
        state.best_score, state.best_step = distributed.broadcast_object((value, step) if scores is not None else None)
        state.best_of = evaluation.scored_as
        if scores is not None:
            from unicom.files import refused_write

            names = [benchmark.name for benchmark in evaluation.benchmarks]
            of = [benchmark.metric for benchmark in evaluation.benchmarks]
            scored = ({"benchmark": names[0], "metric": of[0], "value": value} if not evaluation.several else
                      {"benchmark": names, "metric": of, "value": value,
                       "values": [scores[name][metric] for name, metric in zip(names, of)]})
            with refused_write(run.out, f"the best model ({BEST_MODEL}/)", "the run resumes from its last checkpoint "
                               "and scores it again"):
                export_model(run, run.out / BEST_MODEL, step, evaluation=scored)
    if scores is None or evaluation.several:
        return scores
    return scores[evaluation.benchmarks[0].name]


def _account(step: int, result: StepResult, state: RunState, interval: dict, run: Run, log: RunLog, config: TrainConfig,
             out: Path) -> None:
    """Count step ``step``'s result (read here: the host waits for that step) into the interval
    and the run state; a non-finite step is logged as skipped, and ``train.max_nonfinite_steps``
    of them in a row stop the run (:class:`TrainingStopped`)."""
    if result.finite:
        state.consecutive_nonfinite = 0
        interval["loss"] += result.loss
        interval["finite"] += 1
        return
    state.skipped_steps += 1
    state.consecutive_nonfinite += 1
    log.event("skipped", step=step, loss=result.loss, grad_norm=result.grad_norm,
              loss_scale=result.loss_scale, consecutive=state.consecutive_nonfinite)
    if state.consecutive_nonfinite >= config.train.max_nonfinite_steps:
        message = (
            f"stopped at step {step}: the last {state.consecutive_nonfinite} steps had a non-finite loss or "
            f"gradient (loss {result.loss}, gradient norm {result.grad_norm}) and were skipped, so no weight holds "
            f"NaN. Lower optim.lr, set optim.clip_grad_norm, use train.precision=bf16 or fp32, or check the data; "
            f"resume from the last checkpoint in {ckpt.checkpoint_root(out)}"
        )
        log.event("stopped", step=step, reason=message)
        raise TrainingStopped(message)


def _describe_selection(selection: ClassesPerStep, batch: int, sample_rate: float) -> list[str]:
    """The start line on the classes a step uses, and a warning when r1 cannot act as set."""
    k, used, positives = selection.num_classes, selection.used, selection.positives
    if selection.all_classes:
        lines = [f"  classes per step: all {k:,}"]
        if sample_rate < 1.0:
            lines.append(f"warning: loss.sample_rate={sample_rate} keeps every class: ceil({sample_rate} x the classes of "
                         f"each rank) is all of them, as with sample_rate 1.0; lower it for random negatives")
        return lines
    if selection.positives_only:
        # a batch that holds (nearly) every class: no sample_rate (at most 1) can add negatives
        remedy = (f"raise loss.sample_rate above ~{positives / k:.2g}" if positives / k < 0.995 else
                  f"the batch holds nearly all {k:,} classes, so no sample_rate can add any: lower data.batch_size "
                  f"or train on more classes")
        return [
            f"  classes per step: ~{used:,.0f} of {k:,}, the batch's positives only",
            f"warning: loss.sample_rate={sample_rate} has no effect: a batch of {batch:,} images holds ~{positives:,.0f} "
            f"distinct labels, at least the {selection.sampled:,} classes it samples, so a step takes the batch's positives "
            f"and no random negatives (effective sample_rate ~{used / k:.2g}); for random negatives {remedy}",
        ]
    return [f"  classes per step: ~{used:,.0f} of {k:,} (the batch's ~{positives:,.0f} positives and "
            f"~{used - positives:,.0f} random negatives)"]


def data_wait_note(share: float, remedies: bool = True) -> str:
    """What a step line adds when the steps waited for their batches ``share`` of the time
    (``data_wait``): nothing below :data:`unicom.progress.INPUT_BOUND_SHARE`, else that
    share, with the remedies when ``remedies`` (the first such line of a process)."""
    if share < INPUT_BOUND_SHARE:
        return ""
    if not remedies:
        return f" (waited for data {share:.0%} of the time)"
    return (f" (waited for data {share:.0%} of the time: reading and decoding limit this run; more data.workers, or "
            "data.decode=gpu on a GPU where the augmentation allows, may feed it faster)")


def _log_interval(run: Run, log: RunLog, state: RunState, interval: dict, result: StepResult, global_batch: int,
                  factor: float, startup: bool = False) -> None:
    """Log the steps since the last line. ``startup``: the interval is the process's first
    step, which carries the start-up, so it gives no rate and no ETA (the next line does,
    measured from after it)."""
    unlabelled, failed = _all_reduce_counts([interval["unlabelled"], interval["failed"]], run.device)
    state.unlabelled += unlabelled
    state.failed += failed
    now = time.perf_counter()
    seconds = max(now - interval["start"], 1e-9)
    state.seconds += seconds
    images_per_second = None if startup else interval["steps"] * global_batch / seconds
    loss = interval["loss"] / interval["finite"] if interval["finite"] else float("nan")
    lr, prototype_lr = run.config.optim.learning_rates(factor)
    values = {
        "step": state.step,
        "epoch": round(run.epoch(state.step), 4),
        "loss": loss,
        "lr": lr,
        "prototype_lr": prototype_lr,
        "grad_norm": result.grad_norm,
        "images_per_second": images_per_second,
        "data_wait": interval["data"] / seconds,
        "skipped_steps": state.skipped_steps,
        "unlabelled": state.unlabelled,
        "failed": state.failed,
        "loss_scale": run.step_fn.scaler.scale if run.step_fn.scaler.enabled else None,
    }
    if startup:
        values["startup_seconds"] = round(seconds, 3)
        speed = f"first step {format_duration(seconds)} with start-up" + (", ETA from the next line" if state.step < run.total_steps else "")
    else:
        remaining = (run.total_steps - state.step) * seconds / max(interval["steps"], 1)
        note = data_wait_note(values["data_wait"], remedies=not interval.get("told_remedies"))
        interval["told_remedies"] = interval.get("told_remedies") or bool(note)
        speed = f"{images_per_second:,.0f} img/s ETA {format_duration(remaining)}" + note
    log.event("step", **values)
    log.scalars(state.step, values)
    extra = ""
    if state.skipped_steps or state.unlabelled or state.failed:
        extra = f" [skipped {state.skipped_steps}, unlabelled {state.unlabelled}, failed {state.failed}]"
    log.print(
        f"step {state.step}/{run.total_steps} (epoch {values['epoch']:.2f}) loss {loss:.4f} lr {values['lr']:.2e} "
        f"grad {result.grad_norm:.3g} {speed}{extra}"
    )
    interval.update(loss=0.0, steps=0, finite=0, data=0.0, start=now, unlabelled=0, failed=0)
