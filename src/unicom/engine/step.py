"""One optimiser step of a backbone (or neck) and sharded prototypes: micro-steps, mixed
precision, loss scaling, the global gradient norm, clipping and the non-finite check.

:class:`TrainStep` is shared by ``unicom train`` (a ViT in DDP), ``unicom probe`` (a neck
on frozen features) and ``benchmarks/train_step.py``. :func:`build_train_step` makes one
from a recipe's ``optim`` section: AdamW (:func:`backbone_optimizer`) for the module,
:class:`unicom.optim.SparseAdamW` for the prototypes of :class:`unicom.losses.PartialFC`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from unicom import distributed
from unicom.engine.device import attention_backend, autocast


class TrainingStopped(RuntimeError):
    """Training cannot go on (repeated non-finite steps); the message says what to do."""


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, position embeddings and the class token are not decayed."""
    return param.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token"))


def spared_from_decay(module: nn.Module) -> frozenset[str]:
    """The parameters (names, or fnmatch patterns of names, of ``module``'s) that ``module``, or
    the timm network it holds as ``trunk``, says weight decay must spare: timm's
    ``no_weight_decay()`` (a Swin's relative position tables, a DeiT's distillation token),
    which timm's own optimisers honour."""
    trunk = getattr(module, "trunk", None)
    owner, prefix = ((module, "") if callable(getattr(module, "no_weight_decay", None)) else
                     (trunk, "trunk.") if callable(getattr(trunk, "no_weight_decay", None)) else (None, ""))
    return frozenset() if owner is None else frozenset(prefix + name for name in owner.no_weight_decay())


def matcher_owner(module: nn.Module) -> tuple[nn.Module | None, str]:
    """What groups ``module``'s layers, and the prefix of its parameters' names in ``module``:
    ``module`` itself when it declares a timm-style ``group_matcher`` (``""``), else the timm
    network it holds as ``trunk`` (``"trunk."``), else ``(None, "")``."""
    trunk = getattr(module, "trunk", None)
    return ((module, "") if hasattr(module, "group_matcher") else
            (trunk, "trunk.") if hasattr(trunk, "group_matcher") else (None, ""))


def layer_ids(module: nn.Module) -> dict[str, int]:
    """The layer of each parameter of ``module``, 0 at the input, as timm groups them for
    layer-wise learning-rate decay (``group_matcher(coarse=False)``, BEiT's scheme): the stem
    (patch and position embeddings), then one layer per block (the final norm with the last),
    then everything the matcher does not name (the head) in a layer of its own.

    ``module`` declares its grouping with a timm-style ``group_matcher``, or holds a timm
    network as ``trunk`` whose parameters it groups, every other parameter (the projection)
    then being the head. Other modules are refused (:class:`unicom.errors.InputError`).
    """
    from timm.models._manipulate import group_with_matcher

    from unicom.errors import InputError

    owner, prefix = matcher_owner(module)
    if owner is None:
        raise InputError(f"optim.layer_decay: {type(module).__name__} does not say how its parameters form layers "
                         "(a timm-style group_matcher, or a timm network as its trunk); leave optim.layer_decay unset")
    # names outside the trunk start with a character no matcher's pattern takes: the head
    named = [(name[len(prefix):] if name.startswith(prefix) else "\0" + name, name)
             for name, _ in module.named_parameters()]
    layers = group_with_matcher(named, owner.group_matcher(coarse=False), return_values=True)
    return {name: int(layer) for layer, names in layers.items() for name in names}


def layer_scales(module: nn.Module, decay: float) -> dict[str, float]:
    """The learning-rate factor of each parameter with layer-wise decay ``decay``:
    ``decay ** (last - layer)`` over :func:`layer_ids` (1 for the head)."""
    from unicom.errors import InputError

    ids = layer_ids(module)
    last = max(ids.values())
    if last == 0:
        raise InputError(f"optim.layer_decay: every parameter of {type(module).__name__} is in one layer; "
                         "leave optim.layer_decay unset")
    return {name: float(decay) ** (last - layer) for name, layer in ids.items()}


def backbone_optimizer(module: nn.Module, lr: float, weight_decay: float, betas, eps: float, device: torch.device,
                       layer_decay: float | None = None):
    """AdamW over the trainable parameters of ``module``: decayed weights and the
    :func:`no_decay` and :func:`spared_from_decay` parameters in groups of their own, per layer with ``layer_decay``
    (:func:`layer_scales`). Every group carries ``lr_scale`` (its factor of the learning
    rate, :meth:`TrainStep.set_learning_rates`) and ``param_names``, by which
    :func:`load_optimizer_state` finds each parameter's moments whatever the grouping.

    The fused implementation where torch has one for ``device`` (CUDA and the CPU among
    them): one kernel per group instead of a dozen passes, and it takes the step's
    ``grad_scale`` and ``found_inf`` on the device (see :class:`TrainStep`).
    """
    import fnmatch

    scales = {} if layer_decay is None else layer_scales(module, layer_decay)
    spared = spared_from_decay(module)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            plain = no_decay(name, param) or any(fnmatch.fnmatchcase(name, pattern) for pattern in spared)
            scale = scales.get(name, 1.0)
            group = groups.setdefault((-scale, plain), {"params": [], "param_names": [], "lr_scale": scale,
                                                        "weight_decay": 0.0 if plain else weight_decay})
            group["params"].append(param)
            group["param_names"].append(name)
    # the head first, weights before the plain parameters; a module with nothing to train (a
    # pooling neck) has one empty group
    ordered = [groups[key] for key in sorted(groups)] or [{"params": [], "param_names": [], "lr_scale": 1.0}]
    return torch.optim.AdamW(ordered, lr=lr, betas=tuple(betas), eps=eps, fused=_has_fused_adamw(device))


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, module: nn.Module) -> None:
    """Load ``saved``, a :func:`backbone_optimizer`'s ``state_dict()``, into ``optimizer``,
    one of ``module``: each parameter takes the moments saved under its name, whatever the
    grouping then and now (layer-wise decay on, off or other; parameters locked since drop
    theirs, those unlocked since start without), and the groups keep
    ``optimizer``'s hyperparameters (weight decay, betas, eps, learning-rate factors): those of
    the recipe now. States saved before groups carried names (two groups: weights, then the
    :func:`no_decay` parameters) are named by that grouping of ``module``."""
    from unicom.errors import InputError

    saved_groups = saved["param_groups"]
    if all("param_names" in group for group in saved_groups):
        names = [name for group in saved_groups for name in group["param_names"]]
    else:
        trainable = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
        weights = [name for name, param in trainable if not no_decay(name, param)]
        plain = [name for name, param in trainable if no_decay(name, param)]
        if [len(group["params"]) for group in saved_groups] != [len(weights), len(plain)]:
            raise InputError(f"the saved optimiser state has groups of {[len(g['params']) for g in saved_groups]} "
                             f"parameters where this model has {[len(weights), len(plain)]}: it belongs to another model")
        names = weights + plain
    indices = [index for group in saved_groups for index in group["params"]]
    current = optimizer.state_dict()
    position = {name: index for group in current["param_groups"]
                for index, name in zip(group["params"], group["param_names"])}
    locked = {name for name, param in module.named_parameters() if not param.requires_grad}
    unknown = sorted(set(names) - set(position) - locked)  # a parameter locked since (model.lock) drops its moments
    if unknown:
        raise InputError(f"the saved optimiser state holds parameters this model does not train: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    state = {position[name]: saved["state"][index] for name, index in zip(names, indices)
             if index in saved["state"] and name in position}
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _has_fused_adamw(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: CUDA only
        return device.type == "cuda"


class LossScaler:
    """Dynamic loss scaling for fp16: halve the scale after a non-finite step (not below 1),
    double it after ``growth_interval`` finite ones in a row. Disabled, the scale is 1.

    The scale lives on the device with the step (:meth:`tensor`) and :meth:`update` takes
    the step's finiteness as a device tensor, so scaling never makes the host wait;
    :attr:`scale` reads it (for logs and checkpoints).
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = enabled
        self.growth_interval = growth_interval
        self._scale = torch.tensor(init_scale if enabled else 1.0, dtype=torch.float32)
        self._good_steps = torch.zeros((), dtype=torch.int64)

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The scale, a float32 scalar on ``device`` (moved there once)."""
        if self._scale.device != device:
            self._scale, self._good_steps = self._scale.to(device), self._good_steps.to(device)
        return self._scale

    @property
    def scale(self) -> float:
        return float(self._scale)

    @scale.setter
    def scale(self, value: float) -> None:
        if not self.enabled and float(value) != 1.0:  # the step divides by the scale whenever it is not 1
            raise ValueError(f"the loss scaler is off (precision without loss scaling): its scale stays 1, not {value}")
        self._scale = torch.full((), float(value), dtype=torch.float32, device=self._scale.device)

    @property
    def good_steps(self) -> int:
        return int(self._good_steps)

    def update(self, finite) -> None:
        """``finite``: a bool, or a bool scalar tensor on the scale's device."""
        if not self.enabled:
            return
        finite = torch.as_tensor(finite, device=self._scale.device)
        good = torch.where(finite, self._good_steps + 1, 0)
        grow = good >= self.growth_interval
        self._scale = torch.where(finite, torch.where(grow, self._scale * 2.0, self._scale), (self._scale * 0.5).clamp_min(1.0))
        self._good_steps = torch.where(grow, 0, good)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            device = self._scale.device
            self._scale = torch.tensor(float(state["scale"]), dtype=torch.float32, device=device)
            self._good_steps = torch.tensor(int(state["good_steps"]), dtype=torch.int64, device=device)


# Steps a loop queues before the host reads their results (a read waits for the device):
# the trainers read them in groups of at most this many, at their log lines and checkpoints.
UNREAD_STEPS = 50


class StepResult:
    """What a step did: ``loss`` (mean over micro-batches), ``grad_norm`` (global, after
    unscaling, before clipping), ``finite`` (the step was applied), ``clipped``.

    The values stay on the device until one of them is read; the first read copies all of
    them to the host at once (the only point where the host waits for the step) and raises
    :class:`unicom.errors.InputError` if the step's labels were out of range (the step
    was then skipped on the device).
    """

    def __init__(self, values: torch.Tensor | list[float], check=None):
        self._values = values
        self._check = check

    def _read(self) -> list[float]:
        if isinstance(self._values, torch.Tensor):
            self._values = self._values.tolist()
        if self._check is not None:
            check, self._check = self._check, None
            check(self._values)
        return self._values

    @property
    def loss(self) -> float:
        return self._read()[0]

    @property
    def grad_norm(self) -> float:
        return self._read()[1]

    @property
    def finite(self) -> bool:
        return bool(self._read()[2])

    @property
    def clipped(self) -> bool:
        return bool(self._read()[3])

    @property
    def loss_scale(self) -> float:
        """The loss scale after this step (1 without loss scaling)."""
        return self._read()[4]

    def __repr__(self) -> str:
        loss, norm, finite, clipped = self._read()[:4]
        return f"StepResult(loss={loss}, grad_norm={norm}, finite={bool(finite)}, clipped={bool(clipped)})"


def _grads(params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dense gradients, coalesced sparse gradients) of ``params``; sparse ones are
    coalesced in place (a no-op for PartialFC's single backward, flagged beforehand)."""
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


def _scale_grads(dense: list[torch.Tensor], sparse: list[torch.Tensor], factor: torch.Tensor) -> None:
    if dense:
        torch._foreach_mul_(dense, factor)
    for grad in sparse:
        grad._values().mul_(factor)


class TrainStep:
    """One optimiser step over ``accumulation`` micro-batches.

    The backbone (possibly DDP with summed gradients) maps images to embeddings under
    autocast; PartialFC gives the loss. The global gradient norm is computed over the
    backbone (identical on every rank after DDP's all-reduce) and the prototype shards
    (all-reduced); a non-finite loss or norm, or labels out of range, skips the step on
    every rank alike; otherwise the gradients are unscaled (fp16), clipped (optional) and
    both optimisers step.

    Nothing in it makes the host wait for the device: the loss scale, the norm, the
    clipping factor and the decision to skip are device tensors, handed to the optimisers
    as ``grad_scale`` and ``found_inf`` (fused AdamW and :class:`unicom.optim.SparseAdamW`
    take them), and the returned :class:`StepResult` is read only when the caller looks.
    Optimisers without that protocol are stepped after one read of the norm.

    ``attention``: the backend of ``F.scaled_dot_product_attention`` in the forward and the
    backward (one of :data:`unicom.engine.device.ATTENTION_BACKENDS`; ``auto``: PyTorch's choice).
    """

    def __init__(self, backbone: nn.Module, partial_fc: nn.Module, backbone_optimizer, prototype_optimizer,
                 device: torch.device, precision: str, clip_grad_norm: float | None = None, attention: str = "auto"):
        self.backbone = backbone
        self.partial_fc = partial_fc
        self.backbone_optimizer = backbone_optimizer
        self.prototype_optimizer = prototype_optimizer
        self.device = device
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.attention = attention
        self.scaler = LossScaler(precision == "fp16")
        # PartialFC's full input checks cost a collective and a host read per step: the
        # trainer turns them on for its first step; the labels are checked on the device always
        partial_fc.check_inputs = False
        self._backbone_params = [p for p in backbone.parameters() if p.requires_grad]
        self._prototype_params = list(partial_fc.parameters())
        self.distributed = distributed.get_world_size() > 1

    def set_learning_rates(self, backbone_lr: float, prototype_lr: float) -> None:
        for group in self.backbone_optimizer.param_groups:
            group["lr"] = backbone_lr * group.get("lr_scale", 1.0)
        for group in self.prototype_optimizer.param_groups:
            group["lr"] = prototype_lr

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        count = len(micro_batches)
        scale = self.scaler.tensor(self.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for index, (images, labels) in enumerate(micro_batches):
            last = index == count - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.backbone, "no_sync") else self.backbone.no_sync()
            # the backward too: gradient checkpointing runs the forward again there
            with sync, attention_backend(self.attention):
                with autocast(self.device, self.precision):
                    embeddings = self.backbone(images)
                    loss = self.partial_fc(embeddings, labels)
                (loss * (scale / count) if self.scaler.enabled else loss / count).backward()
            loss_sum += loss.detach().float()
        if count == 1 and hasattr(self.partial_fc, "flag_sorted_gradient"):
            self.partial_fc.flag_sorted_gradient()

        dense, sparse = _grads(self._backbone_params)
        proto_dense, proto_sparse = _grads(self._prototype_params)
        backbone_sq = _squared_norm(dense, sparse, self.device)
        prototype_sq = _squared_norm(proto_dense, proto_sparse, self.device)
        if self.distributed:  # prototype shards are disjoint: their squared norms add up
            import torch.distributed as dist

            dist.all_reduce(prototype_sq)
        norm = (backbone_sq + prototype_sq).sqrt() / scale  # of the unscaled gradients
        loss = loss_sum / count
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        bounds = self.partial_fc.take_label_bounds() if hasattr(self.partial_fc, "take_label_bounds") else None
        apply = finite
        if bounds is not None:
            apply = apply & (bounds[0] >= 0) & (bounds[1] < self.partial_fc.num_classes)
        if self.clip_grad_norm is not None:
            clipped = finite & (norm > self.clip_grad_norm)
            factor = torch.where(clipped, self.clip_grad_norm / (norm + 1e-6), 1.0)
        else:
            clipped, factor = torch.zeros((), dtype=torch.bool, device=self.device), None

        optimizers = (self.backbone_optimizer, self.prototype_optimizer)
        if all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers):
            grad_scale = None
            if self.scaler.enabled or factor is not None:
                grad_scale = scale if factor is None else scale / factor  # the optimisers divide by it
            found_inf = (~apply).float()
            for optimizer in optimizers:
                optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
                try:
                    optimizer.step()
                finally:
                    del optimizer.grad_scale, optimizer.found_inf
        elif bool(apply):  # an optimiser without grad_scale/found_inf: decide on the host
            unscale = 1.0 / scale if factor is None else factor / scale
            _scale_grads(dense + proto_dense, sparse + proto_sparse, unscale)
            for optimizer in optimizers:
                optimizer.step()
        self.scaler.update(finite)
        self.backbone_optimizer.zero_grad(set_to_none=True)
        self.prototype_optimizer.zero_grad(set_to_none=True)

        # the loss scale as this step left it: read later, with the step's other values
        values = torch.stack([loss, norm, apply.float(), clipped.float(), self.scaler.tensor(self.device).float()])
        check = None
        if bounds is not None:
            values = torch.cat([values, bounds.to(values.dtype)])
            check = lambda read: self.partial_fc.check_label_bounds(read[5], read[6])  # noqa: E731
        return StepResult(values, check)


def build_train_step(module: nn.Module, partial_fc: nn.Module, optim, device: torch.device, precision: str,
                     wrapped: nn.Module | None = None, attention: str = "auto") -> TrainStep:
    """A :class:`TrainStep` with the optimisers of a recipe's ``optim`` section
    (:class:`unicom.engine.sections.OptimConfig`): AdamW over the trainable parameters of
    ``module`` and SparseAdamW over the prototypes at ``prototype_lr_scale`` times the
    rate; with ``optimizer: adam``, Adam with coupled L2 for both. ``wrapped``: the module
    as the step calls it (e.g. in DDP), default ``module``; ``attention``: the step's SDPA backend."""
    from unicom.optim import SparseAdamW

    coupled = getattr(optim, "optimizer", "adamw") == "adam"
    if coupled:  # Adam with L2 on every trainable parameter, as torch.optim.Adam(model.parameters(), weight_decay=...)
        module_optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=optim.lr,
                                            betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                                            fused=_has_fused_adamw(device))
    else:
        module_optimizer = backbone_optimizer(module, optim.lr, optim.weight_decay, optim.betas, optim.eps, device,
                                              getattr(optim, "layer_decay", None))
    prototype_decay = optim.weight_decay if optim.prototype_weight_decay is None else optim.prototype_weight_decay
    prototype_optimizer = SparseAdamW(partial_fc.parameters(), lr=optim.lr * optim.prototype_lr_scale,
                                      betas=tuple(optim.betas), eps=optim.eps, weight_decay=prototype_decay,
                                      decoupled_weight_decay=not coupled)
    return TrainStep(module if wrapped is None else wrapped, partial_fc, module_optimizer, prototype_optimizer, device,
                     precision, optim.clip_grad_norm, attention)


__all__ = ["TrainStep", "StepResult", "LossScaler", "TrainingStopped", "backbone_optimizer", "no_decay",
           "build_train_step", "layer_ids", "layer_scales", "load_optimizer_state", "spared_from_decay"]
