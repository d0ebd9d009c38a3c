"""The architecture of the released Unicom checkpoints: :class:`UnicomViT` and its sizes.

It differs from CLIP's ViT: no class token, a learned position embedding for the N patch
tokens only, ReLU6 in the MLP, no bias in ``qkv``, and a head (``feature``) that flattens
all N normalised tokens (N * width values) and projects them with Linear -> BatchNorm1d ->
Linear -> BatchNorm1d. The key names of the released files are the attribute names below,
so their state dicts load without renaming, and :func:`infer_settings` reads the sizes of
a released-format state dict off its tensor shapes.

timm cannot build this network (no class token, a flattening BatchNorm head), so its
model folders carry no timm config; see ``docs/model_format.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unicom.errors import InputError

ARCHITECTURE = "unicom_vit"  # its name in unicom.models.registry.ARCHITECTURES

# Every released model uses 64-dimensional attention heads; the number of heads is the
# one size that the tensor shapes do not reveal (qkv is (3 * width, width) for any count).
HEAD_DIM = 64


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ViTSettings:
    """The sizes of an :class:`UnicomViT`.

    ``image_size`` and ``patch_size`` in pixels; ``width`` the token dimension;
    ``mlp_dim`` the hidden size of each block's MLP; ``embedding_dim`` the output size.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    embedding_dim: int = 512
    in_chans: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"ViT setting {field.name}={value!r}: expected a positive integer")
        if self.image_size % self.patch_size:
            raise InputError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise InputError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N, the number of tokens (there is no class token)."""
        return self.grid_size**2

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> "ViTSettings":
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise InputError(f"unknown ViT setting(s) {unknown}; known: {sorted(names)}")
        return cls(**settings)


# ----------------------------------------------------------------------- architecture


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: ``(B, C, H, W) -> (B, N, width)``, row-major."""

    def __init__(self, settings: ViTSettings):
        super().__init__()
        self.proj = nn.Conv2d(settings.in_chans, settings.width, kernel_size=settings.patch_size, stride=settings.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q kᵀ / √head_dim) v; ``qkv`` has no bias."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        # (B, N, 3 * width) -> (3, B, heads, N, head_dim): q, k, v in that order
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale: head_dim ** -0.5
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, settings: ViTSettings, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(settings.width)
        self.attn = Attention(settings.width, settings.heads)
        self.norm2 = nn.LayerNorm(settings.width)
        self.mlp = Mlp(settings.width, settings.mlp_dim)
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class UnicomViT(nn.Module):
    """The ViT of the released Unicom checkpoints: images ``(B, 3, S, S)`` -> ``(B, D)``.

    ``S = settings.image_size``, ``D = settings.embedding_dim``. Outputs are the
    BatchNorm1d outputs of the ``feature`` head, not L2-normalised.

    Args:
        settings: the sizes (:class:`ViTSettings`).
        drop_path_rate: stochastic depth for training, rising linearly over the blocks
            from 0 to this value (the public training code uses 0.1); 0 at inference.
    """

    def __init__(self, settings: ViTSettings, drop_path_rate: float = 0.0):
        super().__init__()
        self.settings = settings
        self.embedding_dim = settings.embedding_dim
        self.grad_checkpointing = False
        width, tokens = settings.width, settings.num_patches
        self.patch_embed = PatchEmbed(settings)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        rates = [drop_path_rate * i / max(settings.depth - 1, 1) for i in range(settings.depth)]
        self.blocks = nn.ModuleList(Block(settings, rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(tokens * width, width, bias=False),
            nn.BatchNorm1d(width, eps=2e-5),
            nn.Linear(width, settings.embedding_dim, bias=False),
            nn.BatchNorm1d(settings.embedding_dim, eps=2e-5),
        )
        if not self.pos_embed.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Training from scratch: truncated normal (std 0.02) for the position embedding
        and every Linear weight, zero biases, LayerNorms at identity."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Its layers as timm's ViTs name theirs (layer-wise learning-rate decay,
        :func:`unicom.engine.step.layer_ids`): the patch and position embeddings, one layer
        per block with the final norm in the last (99999: timm's "the previous group"), and
        the feature head, which no pattern names, last."""
        return {"stem": r"^pos_embed|patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S) -> (B, N, width)``: the tokens after the final LayerNorm."""
        x = self.patch_embed(images)
        if x.shape[1] != self.pos_embed.shape[1]:
            size = self.settings.image_size
            raise ValueError(
                f"{type(self).__name__} expects {size}x{size} images (got {tuple(images.shape[-2:])}); "
                "use the transform returned with the model"
            )
        x = x + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        # Blocks may run under autocast; the norm and the head see the parameters' dtype.
        return self.norm(x.to(self.norm.weight.dtype))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, width) -> (B, D)``: flatten all tokens, Linear-BN-Linear-BN."""
        x = tokens.flatten(1)
        # The first Linear sums N * width products (up to 589,824 for L/14@336px); like
        # the public code, the head never runs in half precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.feature(x.to(self.feature[0].weight.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def build_unicom_vit(settings: Mapping[str, Any], drop_path_rate: float = 0.0) -> UnicomViT:
    """Builder of the ``unicom_vit`` architecture (:mod:`unicom.models.registry`)."""
    return UnicomViT(ViTSettings.from_dict(settings), drop_path_rate=drop_path_rate)


# ------------------------------------------------------------ released-format shapes


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int, source: str) -> tuple[int, ...]:
    tensor = state_dict.get(key)
    if tensor is None:
        raise InputError(
            f"{source}: cannot infer the architecture: key {key!r} is missing "
            f"(the file has {len(state_dict)} keys, e.g. {sorted(state_dict)[:6]}); "
            "is it a released Unicom checkpoint? Otherwise pass arch="
        )
    if tensor.ndim != ndim:
        raise InputError(f"{source}: key {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
    return tuple(tensor.shape)


def infer_settings(state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                   heads: int | None = None) -> ViTSettings:
    """Read a :class:`ViTSettings` off the tensor shapes of a released-format state dict.

    patch size and width from ``patch_embed.proj.weight`` (width, 3, p, p); the input size
    from ``pos_embed`` (1, N, width) as √N · p; depth from the ``blocks.{i}`` keys; the MLP
    size from ``blocks.0.mlp.fc1.weight``; the embedding size from ``feature.2.weight``.
    The head count is not in any shape: ``heads``, else ``width / 64``, as in every released model.
    """
    width, in_chans, patch, patch_w = _shape(state_dict, "patch_embed.proj.weight", 4, source)
    _, tokens, pos_width = _shape(state_dict, "pos_embed", 3, source)
    grid = round(tokens**0.5)
    if patch != patch_w or pos_width != width or grid * grid != tokens:
        raise InputError(
            f"{source}: patch_embed.proj.weight {(width, in_chans, patch, patch_w)} and pos_embed "
            f"{(1, tokens, pos_width)} do not describe square patches on a square grid; pass arch="
        )
    indices = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    depth = len(indices)
    if indices != set(range(depth)) or depth == 0:
        raise InputError(f"{source}: block indices {sorted(indices)} are not 0..depth-1; is a block missing?")
    mlp_dim, _ = _shape(state_dict, "blocks.0.mlp.fc1.weight", 2, source)
    embedding_dim, _ = _shape(state_dict, "feature.2.weight", 2, source)
    if heads is None and width % HEAD_DIM:
        raise InputError(f"{source}: width {width} is not a multiple of {HEAD_DIM}, so the head count is unknown; "
                         "give it (arch={'heads': N}, unicom convert --arch '{\"heads\": N}')")
    return ViTSettings(grid * patch, patch, width, depth, heads or width // HEAD_DIM, mlp_dim, embedding_dim, in_chans)


__all__ = ["ARCHITECTURE", "HEAD_DIM", "UnicomViT", "ViTSettings", "build_unicom_vit", "infer_settings"]
