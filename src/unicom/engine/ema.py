"""An exponential moving average of a network's weights (``train.ema``).

After every optimiser step, each floating-point tensor of the network's state (parameters
and buffers, such as BatchNorm's running statistics) moves towards the network's own:
``ema <- decay * ema + (1 - decay) * weights`` (one ``torch._foreach_lerp_`` over all of
them); integer buffers are copied. It starts from the network's weights when made. This is
timm's ``ModelEmaV3``, whose averaged network is the one fine-tuning recipes (DeiT, ConvNeXt,
EVA) evaluate and publish; ``unicom train`` exports it as the model.

With ``warmup`` the decay of the update after step t (1, 2, ...) is timm's warm-up,
``max(min_decay, min(decay, 1 - (1 + (t - 1) / gamma) ** -power))`` (gamma 1 and power 2/3 by
default; 0 at the first step: the average starts as the network after it), so that a short run is
not an average dominated by its starting weights (at a constant 0.9998, the weights a run starts
with still weigh 0.9998^1000 = 82% after 1,000 steps).

With ``update_after`` = N, the average is the network itself (copied) through step N and
averages from step N + 1 on, the warm-up's steps counted from there (its first, step N + 1,
copying too). With the warm-up, the decay of every step is that of timm's ``ModelEmaV3`` with
``update_after_step=N``, ``min_decay``, ``warmup_gamma`` and ``warmup_power`` given the step.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightsEMA:
    """The moving average of ``module``'s state at rate ``decay`` (in (0, 1); module docstring).

    ``state`` holds the averaged tensors under the module's state-dict keys, on its device;
    :meth:`update` never makes the host wait for the device.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False, update_after: int = 0,
                 min_decay: float = 0.0, warmup_gamma: float = 1.0, warmup_power: float = 2.0 / 3.0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the decay of a moving average must be in (0, 1), got {decay}")
        if update_after < 0:
            raise ValueError(f"the steps before a moving average starts must be 0 or more, got {update_after}")
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"the least decay of the warm-up must be in [0, {decay}] (the decay), got {min_decay}")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(f"the warm-up's gamma and power must be above 0, got {warmup_gamma} and {warmup_power}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_after = int(update_after)
        self.min_decay, self.warmup_gamma, self.warmup_power = float(min_decay), float(warmup_gamma), float(warmup_power)
        self.state = {key: value.detach().clone() for key, value in module.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimiser step ``step`` (1, 2, ...; module docstring)."""
        if step <= self.update_after:
            return 0.0
        if not self.warmup:
            return self.decay
        updates = step - 1 - self.update_after
        if updates <= 0:
            return 0.0
        warming = 1.0 - (1.0 + updates / self.warmup_gamma) ** -self.warmup_power
        return max(self.min_decay, min(self.decay, warming))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Move the average towards ``module``'s state after optimiser step ``step`` (1, 2, ...)."""
        decay = self.decay_at(step)
        averaged, current = [], []
        for key, value in module.state_dict().items():
            mine = self.state[key]
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(value.detach().to(mine.dtype))
            else:
                mine.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take ``state`` (a checkpoint's average) in place of the current one: same keys and shapes."""
        if state.keys() != self.state.keys():
            missing, extra = sorted(self.state.keys() - state.keys()), sorted(state.keys() - self.state.keys())
            raise ValueError(f"the saved average holds other tensors (missing {missing[:3]}, extra {extra[:3]})")
        for key, value in state.items():
            self.state[key].copy_(value)


__all__ = ["WeightsEMA"]
