"""One optimiser step of a backbone (or neck) and sharded prototypes: micro-steps, mixed
precision, loss scaling, the global gradient norm, clipping and the non-finite check.

:class:`TrainStep` is shared by ``unicom train`` (a ViT in DDP), ``unicom probe`` (a neck
on frozen features) and ``benchmarks/train_step.py``. :func:`build_train_step` makes one
from a recipe's ``optim`` section: AdamW (:func:`backbone_optimizer`) for the module,
:class:`unicom.optim.SparseAdamW` for the prototypes of :class:`unicom.losses.PartialFC`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unicom import distributed
from unicom.engine.device import autocast


class TrainingStopped(RuntimeError):
    """Training cannot go on (repeated non-finite steps); the message says what to do."""


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, position embeddings and the class token are not decayed."""
    return param.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token"))


def backbone_optimizer(module: nn.Module, lr: float, weight_decay: float, betas, eps: float, device: torch.device):
    """AdamW with two groups: decayed weights and the :func:`no_decay` parameters."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type == "cuda")


class LossScaler:
    """Dynamic loss scaling for fp16: halve the scale after a non-finite step, double it
    after ``growth_interval`` finite ones in a row. Disabled, the scale is 1."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale * 0.5, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    clipped: bool = False


def _grads(params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dense gradients, coalesced sparse gradients) of ``params``; sparse ones are
    coalesced in place so that their values can be scaled."""
    dense, sparse = [], []
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            if not grad.is_coalesced():
                param.grad = grad = grad.coalesce()
            sparse.append(grad)
        else:
            dense.append(grad)
    return dense, sparse


def _squared_norm(dense: list[torch.Tensor], sparse: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    if dense:
        norms = torch._foreach_norm(dense)
        total = total + torch.stack([n.float() for n in norms]).square().sum()
    for grad in sparse:
        total = total + grad._values().float().square().sum()
    return total


def _scale_grads(dense: list[torch.Tensor], sparse: list[torch.Tensor], factor: float) -> None:
    if dense:
        torch._foreach_mul_(dense, factor)
    for grad in sparse:
        grad._values().mul_(factor)


class TrainStep:
    """One optimiser step over ``accumulation`` micro-batches.

    The backbone (possibly DDP with summed gradients) maps images to embeddings under
    autocast; PartialFC gives the loss. The gradients are unscaled (fp16), the global norm
    is computed over the backbone (identical on every rank after DDP's all-reduce) and the
    prototype shards (all-reduced), and a non-finite loss or norm skips the step on every
    rank alike; otherwise the gradients are clipped (optional) and both optimisers step.
    """

    def __init__(self, backbone: nn.Module, partial_fc: nn.Module, backbone_optimizer, prototype_optimizer,
                 device: torch.device, precision: str, clip_grad_norm: float | None = None):
        self.backbone = backbone
        self.partial_fc = partial_fc
        self.backbone_optimizer = backbone_optimizer
        self.prototype_optimizer = prototype_optimizer
        self.device = device
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.scaler = LossScaler(precision == "fp16")
        # PartialFC's input checks cost a collective per step: the trainer turns them on for its first step
        partial_fc.check_inputs = False
        self._backbone_params = [p for p in backbone.parameters() if p.requires_grad]
        self._prototype_params = list(partial_fc.parameters())
        self.distributed = distributed.get_world_size() > 1

    def set_learning_rates(self, backbone_lr: float, prototype_lr: float) -> None:
        for group in self.backbone_optimizer.param_groups:
            group["lr"] = backbone_lr
        for group in self.prototype_optimizer.param_groups:
            group["lr"] = prototype_lr

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        count = len(micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, (images, labels) in enumerate(micro_batches):
            last = index == count - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.backbone, "no_sync") else self.backbone.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    embeddings = self.backbone(images)
                    loss = self.partial_fc(embeddings, labels)
                (loss * (self.scaler.scale / count)).backward()
            loss_sum += loss.detach().float()

        dense, sparse = _grads(self._backbone_params)
        proto_dense, proto_sparse = _grads(self._prototype_params)
        if self.scaler.enabled:
            inverse = 1.0 / self.scaler.scale
            _scale_grads(dense + proto_dense, sparse + proto_sparse, inverse)
        backbone_sq = _squared_norm(dense, sparse, self.device)
        prototype_sq = _squared_norm(proto_dense, proto_sparse, self.device)
        if self.distributed:  # prototype shards are disjoint: their squared norms add up
            import torch.distributed as dist

            dist.all_reduce(prototype_sq)
        loss_value, norm_value = torch.stack([loss_sum / count, (backbone_sq + prototype_sq).sqrt()]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        clipped = False
        if finite:
            if self.clip_grad_norm is not None and norm_value > self.clip_grad_norm:
                _scale_grads(dense + proto_dense, sparse + proto_sparse, self.clip_grad_norm / (norm_value + 1e-6))
                clipped = True
            self.backbone_optimizer.step()
            self.prototype_optimizer.step()
        self.scaler.update(finite)
        self.backbone_optimizer.zero_grad(set_to_none=True)
        self.prototype_optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, finite, clipped)


def build_train_step(module: nn.Module, partial_fc: nn.Module, optim, device: torch.device, precision: str,
                     wrapped: nn.Module | None = None) -> TrainStep:
    """A :class:`TrainStep` with the optimisers of a recipe's ``optim`` section
    (:class:`unicom.engine.sections.OptimConfig`): AdamW over the trainable parameters of
    ``module`` and SparseAdamW over the prototypes at ``prototype_lr_scale`` times the
    rate; with ``optimizer: adam``, Adam with coupled L2 for both. ``wrapped``: the module
    as the step calls it (e.g. in DDP), default ``module``."""
    from unicom.optim import SparseAdamW

    coupled = getattr(optim, "optimizer", "adamw") == "adam"
    if coupled:  # Adam with L2 on every trainable parameter, as torch.optim.Adam(model.parameters(), weight_decay=...)
        module_optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=optim.lr,
                                            betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                                            fused=device.type == "cuda")
    else:
        module_optimizer = backbone_optimizer(module, optim.lr, optim.weight_decay, optim.betas, optim.eps, device)
    prototype_decay = optim.weight_decay if optim.prototype_weight_decay is None else optim.prototype_weight_decay
    prototype_optimizer = SparseAdamW(partial_fc.parameters(), lr=optim.lr * optim.prototype_lr_scale,
                                      betas=tuple(optim.betas), eps=optim.eps, weight_decay=prototype_decay,
                                      decoupled_weight_decay=not coupled)
    return TrainStep(module if wrapped is None else wrapped, partial_fc, module_optimizer, prototype_optimizer, device,
                     precision, optim.clip_grad_norm)


__all__ = ["TrainStep", "StepResult", "LossScaler", "TrainingStopped", "backbone_optimizer", "no_decay",
           "build_train_step"]
