"""Retrieval scored while ``unicom train`` runs (the recipe's ``eval`` section).

Every ``eval.every`` optimiser steps and at the end, the network as ``out/model`` would hold
it (the moving average of its weights with ``train.ema``) embeds each benchmark's images with
the model's evaluation transform, in evaluation mode, each rank a contiguous share of them;
rank 0 scores them as ``unicom evaluate --model out/model`` would (the benchmark's metrics,
:func:`unicom.evaluate.report.evaluate_retrieval`). Training is left exactly as it was: the
random generators (``torch.random.fork_rng``), every layer's training mode (BatchNorm held by
``model.lock_bn_stats`` included) and the weights (the moving average is put in their place
for the evaluation and the network's own put back) are restored after it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from unicom import distributed

__all__ = ["BenchmarkEvaluation", "RunEvaluation", "headline"]


class RunEvaluation:
    """The benchmarks of a recipe's ``eval`` section, each read (its images checked) when made;
    scored in turn. With several, the score kept by ``eval.keep_best`` is the mean of their
    metrics (:meth:`value`)."""

    def __init__(self, eval_config, created, device: torch.device):
        self.config = eval_config
        self.benchmarks = [BenchmarkEvaluation(eval_config, name, root, created, device)
                           for name, root in eval_config.benchmarks()]

    @property
    def several(self) -> bool:
        return len(self.benchmarks) > 1

    @property
    def scored_as(self) -> str:
        """What the best score is of: ``cub recall@1``, or ``mean of cub recall@1, cars196 recall@1``."""
        each = ", ".join(benchmark.scored_as for benchmark in self.benchmarks)
        return f"mean of {each}" if self.several else each

    @property
    def headline_scored_as(self) -> str:
        """What a checkpoint written before ``best_of`` was kept holds the best of: the
        benchmark's headline metric."""
        first = self.benchmarks[0].protocol
        return f"{first.name} {first.metric}"

    def value(self, scores: dict[str, dict[str, Any]]) -> float:
        """The score ``eval.keep_best`` compares: the metric of the benchmark, or the mean of the
        benchmarks' ``scores`` (as :meth:`__call__` returns them)."""
        return float(np.mean([scores[benchmark.name][benchmark.metric] for benchmark in self.benchmarks]))

    def describe(self) -> str:
        every = f"every {self.config.every} steps and at the end" if self.config.every else "at the end"
        kept = self.scored_as if self.several else self.benchmarks[0].metric
        best = f"; the best {kept} kept" if self.config.keep_best else ""
        return f"eval: {', '.join(benchmark.describe() for benchmark in self.benchmarks)}, {every}{best}"

    def __call__(self, backbone: nn.Module, average: dict[str, torch.Tensor] | None = None) -> dict[str, dict] | None:
        """Score ``backbone`` on every benchmark (:meth:`BenchmarkEvaluation.__call__`); on rank 0
        each one's metrics and ``seconds`` by its name, None elsewhere."""
        scores = {benchmark.name: benchmark(backbone, average) for benchmark in self.benchmarks}
        return scores if distributed.get_rank() == 0 else None


class BenchmarkEvaluation:
    """One benchmark of the ``eval`` section, ``name`` in its folder ``root``, read (its images
    checked) when made."""

    def __init__(self, eval_config, name: str, root: str, created, device: torch.device):
        from unicom.data.benchmarks import load_retrieval_benchmark
        from unicom.models.export import build_transform

        self.config = eval_config
        self.protocol = load_retrieval_benchmark(name, root)
        self.name = self.protocol.name  # the benchmark's own name, whatever alias named it
        self.metric = self._metric(eval_config.metric)
        self.transform = build_transform(created.preprocess())
        self.embedding_dim = int(created.embedding_dim)
        self.device = device
        self.inputs: dict[str, list | None] = {"query": list(self.protocol.query.paths), "gallery": None}
        if self.protocol.query_boxes is not None:  # a Revisited query is its box, not the whole image
            from unicom.data.benchmarks.revisited import cropped_queries

            self.inputs["query"] = cropped_queries(self.protocol.query, self.protocol.query_boxes)
        gallery = self.protocol.gallery
        if gallery is not None and not (gallery is self.protocol.query and self.protocol.query_boxes is None):
            self.inputs["gallery"] = list(gallery.paths)

    def _metric(self, asked: str | None) -> str:
        """``eval.metric``, one the benchmark reports, or its headline metric."""
        from unicom.errors import InputError
        from unicom.evaluate.metrics import metric_names

        if asked is None:
            return self.protocol.metric
        names = metric_names(self.protocol.ks, list(self.protocol.setups or ()))
        if asked not in names:
            raise InputError(f"eval.metric={asked}: {self.protocol.name} reports {', '.join(names)}; give one of them "
                             f"(or leave eval.metric out for {self.protocol.metric})")
        return asked

    @property
    def scored_as(self) -> str:
        """What the best score is of: ``cub recall@1``."""
        return f"{self.protocol.name} {self.metric}"

    def describe(self) -> str:
        sizes = ", ".join(f"{len(items):,} {split}" for split, items in self.inputs.items() if items is not None)
        return f"{self.protocol.name} ({sizes} images)"

    def __call__(self, backbone: nn.Module, average: dict[str, torch.Tensor] | None = None) -> dict[str, Any] | None:
        """Score ``backbone`` on this benchmark (the moving average ``average`` in its place: rank
        0's, given on rank 0 with ``train.ema``); on rank 0 the report's metrics and ``seconds``,
        None elsewhere."""
        began = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _weights(backbone, average), _evaluation_mode(backbone):
            vectors = {split: self._embed(backbone, items) for split, items in self.inputs.items()}
        if distributed.get_rank() != 0:
            return None
        if self.inputs["gallery"] is None and self.protocol.gallery is not None:
            vectors["gallery"] = vectors["query"]  # the queries are the database (UKBench)
        from unicom.evaluate.benchmark import score_protocol

        report = score_protocol(self.protocol, vectors)
        return {**report["metrics"], "seconds": round(time.perf_counter() - began, 3)}

    def _embed(self, backbone: nn.Module, items: list | None) -> np.ndarray | None:
        """Each rank embeds its contiguous share of ``items``; rank 0 gets them all, in order."""
        from unicom.embed import embed_images
        from unicom.models.encoders import ModelEncoder

        if items is None:
            return None
        rank, world = distributed.get_rank(), distributed.get_world_size()
        share = items[rank * len(items) // world:(rank + 1) * len(items) // world]
        encoder = ModelEncoder(backbone, self.transform, self.embedding_dim, "the network in training")
        mine = (embed_images(encoder, share, self.config.batch_size, num_workers=self.config.workers) if share
                else np.zeros((0, self.embedding_dim), dtype=np.float32))
        parts = distributed.all_gather_object(mine)
        return np.concatenate(parts) if rank == 0 else None


def headline(metrics: dict[str, Any], metric: str) -> str:
    """``recall@1 58.33, map@r 25.00``: the benchmark's headline metric ``metric`` and MAP@R
    where the benchmark has it, in percent."""
    return ", ".join(f"{name} {100 * metrics[name]:.2f}" for name in dict.fromkeys((metric, "map@r")) if name in metrics)


@contextlib.contextmanager
def _evaluation_mode(module: nn.Module):
    """``module`` in evaluation mode, then every layer back in the mode it was in."""
    modes = [(layer, layer.training) for layer in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for layer, training in modes:
            layer.training = training


@contextlib.contextmanager
def _weights(module: nn.Module, average: dict[str, torch.Tensor] | None):
    """``module`` holding rank 0's moving average ``average`` (sent to every rank), then its own
    state again, bit for bit; as it is when no rank keeps an average."""
    keeps = distributed.broadcast_object(average is not None)
    if not keeps:
        yield
        return
    own = {key: value.detach().clone() for key, value in module.state_dict().items()}
    state = module.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if distributed.get_rank() == 0:
                value.copy_(average[key])
            if distributed.get_world_size() > 1:
                torch.distributed.broadcast(value, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(own[key])
