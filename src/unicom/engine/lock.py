"""Locking the network's first layers for fine-tuning, as open_clip locks an image tower
(``--lock-image``, ``--lock-image-unlocked-groups``, ``--lock-image-freeze-bn-stats``: its
``TimmModel.lock``).

The layers are timm's groups (``group_matcher()``, the stem, then each block or stage, then
what the matcher does not name) of the network's timm ``trunk`` (the CLIP ViTs ``unicom
train`` builds, ``model.name=timm/<name>``), the projection after it staying trained; or of
the network itself when it declares its own matcher (the released Unicom ViT, whose head is
its last group). Locked parameters take no gradient and no optimiser state; with
``bn_stats``, the BatchNorm layers of the locked groups keep their running statistics and
normalise with them (evaluation mode), as open_clip's frozen BatchNorm does.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unicom.errors import InputError

__all__ = ["Locked", "lock_layers"]


@dataclass(frozen=True)
class Locked:
    """What :func:`lock_layers` locked: ``groups`` of ``total`` groups, ``parameters`` (their
    element count) of ``of`` in the network, and the BatchNorm layers held in evaluation mode."""

    groups: int
    total: int
    parameters: int
    of: int
    batchnorms: tuple[str, ...]

    def describe(self) -> str:
        held = f"; {len(self.batchnorms)} BatchNorm layer(s) keep their statistics" if self.batchnorms else ""
        return (f"model.lock: {self.groups} of {self.total} layer groups locked, {self.parameters:,} of "
                f"{self.of:,} weights not trained{held}")


def lock_layers(module: nn.Module, unlocked_groups: int = 0, bn_stats: bool = False) -> Locked:
    """Lock every layer group of ``module``'s trunk (module docstring) but the last
    ``unlocked_groups`` (0: the whole trunk), in place: ``requires_grad`` off, and with
    ``bn_stats`` the locked groups' BatchNorm layers in evaluation mode (call it after
    ``module.train()``). An :class:`InputError` when the network says no groups, when
    ``unlocked_groups`` leaves none locked, or when nothing of the network would be trained."""
    from timm.models._manipulate import group_modules, group_parameters

    from unicom.engine.step import matcher_owner

    owner, prefix = matcher_owner(module)
    if owner is None:
        raise InputError(f"model.lock: {type(module).__name__} does not say how its parameters form layers (a "
                         "timm-style group_matcher, or a timm network as its trunk); leave model.lock unset")
    if isinstance(unlocked_groups, bool) or not isinstance(unlocked_groups, int) or unlocked_groups < 0:
        raise InputError(f"model.unlocked_groups must be a whole number of groups (0 or more), got {unlocked_groups!r}")
    matcher = owner.group_matcher()
    groups = group_parameters(owner, matcher)
    total = len(groups)
    last_locked = max(groups) - unlocked_groups
    if last_locked < 0:
        raise InputError(f"model.unlocked_groups={unlocked_groups} unlocks every one of the {total} layer groups of "
                         f"{type(owner).__name__}: nothing is locked; give fewer, or leave model.lock unset")
    # every parameter is in a group (what the matcher does not name in the last): 0 unlocked is the whole trunk
    locked = {name for layer, names in groups.items() if layer <= last_locked for name in names}
    trained = [name for name, param in module.named_parameters()
               if param.requires_grad and not (name.startswith(prefix) and name[len(prefix):] in locked)]
    if not trained:
        raise InputError(f"model.lock with model.unlocked_groups={unlocked_groups} leaves nothing of "
                         f"{type(module).__name__} to train; unlock at least its last group")
    count = 0
    for name, param in owner.named_parameters():
        if name in locked and param.requires_grad:
            param.requires_grad_(False)
            count += param.numel()
    held = []
    if bn_stats:
        if unlocked_groups == 0:  # BatchNorm without weights too, which no group names (as open_clip holds them)
            names = {name for name, _ in owner.named_modules()}
        else:
            names = {name for name, layer in group_modules(owner, matcher, reverse=True).items() if layer <= last_locked}
        for name, layer in owner.named_modules():
            if name in names and isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()
                held.append(prefix + name)
    return Locked(groups=last_locked + 1, total=total, parameters=count,
                  of=sum(param.numel() for param in module.parameters()), batchnorms=tuple(held))
