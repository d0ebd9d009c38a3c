"""An exponential moving average of a network's weights (``train.ema``).

After every optimiser step, each floating-point tensor of the network's state (parameters
and buffers, such as BatchNorm's running statistics) moves towards the network's own:
``ema <- decay * ema + (1 - decay) * weights`` (one ``torch._foreach_lerp_`` over all of
them); integer buffers are copied. It starts from the network's weights when made. This is
timm's ``ModelEmaV3`` without warm-up, whose averaged network is the one fine-tuning recipes
(DeiT, ConvNeXt, EVA) evaluate and publish; ``unicom train`` exports it as the model.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightsEMA:
    """The moving average of ``module``'s state at rate ``decay`` (in (0, 1); module docstring).

    ``state`` holds the averaged tensors under the module's state-dict keys, on its device;
    :meth:`update` never makes the host wait for the device.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the decay of a moving average must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.state = {key: value.detach().clone() for key, value in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s state (after an optimiser step)."""
        averaged, current = [], []
        for key, value in module.state_dict().items():
            mine = self.state[key]
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(value.detach().to(mine.dtype))
            else:
                mine.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take ``state`` (a checkpoint's average) in place of the current one: same keys and shapes."""
        if state.keys() != self.state.keys():
            missing, extra = sorted(self.state.keys() - state.keys()), sorted(state.keys() - self.state.keys())
            raise ValueError(f"the saved average holds other tensors (missing {missing[:3]}, extra {extra[:3]})")
        for key, value in state.items():
            self.state[key].copy_(value)


__all__ = ["WeightsEMA"]
