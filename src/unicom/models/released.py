"""The released Unicom checkpoints: their ViT, names, download, loading and preprocessing.

``unicom.load("ViT-B/32")`` downloads ``FP16-ViT-B-32.pt`` into the cache (verified
against its SHA-256), builds the architecture and loads the weights strictly; it returns
``(model, transform)``: an :class:`UnicomViT` in eval mode (float32) mapping images
``(B, 3, n_px, n_px)`` to embeddings ``(B, D)``, and the PIL -> tensor preprocessing.

The architecture differs from CLIP's ViT: no class token, a learned position embedding
for the N patch tokens only, ReLU6 in the MLP, no bias in ``qkv``, and a head
(``feature``) that flattens all N normalised tokens (N * width values) and projects them
with Linear -> BatchNorm1d -> Linear -> BatchNorm1d. The key names of the released files
are the attribute names below, so their state dicts load without renaming.

Where files come from and go (see ``docs/released_models.md``):

* cache: ``download_root``, else ``$UNICOM_CACHE``, else ``$XDG_CACHE_HOME/unicom``, else
  ``~/.cache/unicom``;
* source: the release URLs in :data:`RELEASED`, or ``$UNICOM_BASE_URL/<file name>`` (a
  mirror: ``https://…``, or ``file:///…`` for a shared disk);
* ``UNICOM_OFFLINE=1`` never touches the network: a cached file loads, a missing one is
  an error that says where to put it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unicom.errors import InputError
from unicom.files import atomic_path

ARCHITECTURE = "unicom_vit"  # the name of this architecture in unicom.models.export

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """One public checkpoint: where it is, its SHA-256 and its architecture."""

    name: str
    url: str
    sha256: str
    settings: ViTSettings

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_RELEASES = "https://github.com/deepglint/unicom/releases/download"

# name -> checkpoint. Users may add their own entries (a private model behind a mirror).
RELEASED: dict[str, ReleasedCheckpoint] = {
    "ViT-B/32": ReleasedCheckpoint(
        "ViT-B/32",
        f"{_RELEASES}/b32/FP16-ViT-B-32.pt",
        "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a",
        ViTSettings(224, 32, 768, 12, 12, 3072, 512),
    ),
    "ViT-B/16": ReleasedCheckpoint(
        "ViT-B/16",
        f"{_RELEASES}/b16/FP16-ViT-B-16.pt",
        "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef",
        ViTSettings(224, 16, 768, 12, 12, 3072, 768),
    ),
    "ViT-L/14": ReleasedCheckpoint(
        "ViT-L/14",
        f"{_RELEASES}/l14/FP16-ViT-L-14.pt",
        "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd",
        ViTSettings(224, 14, 1024, 24, 16, 4096, 768),
    ),
    "ViT-L/14@336px": ReleasedCheckpoint(
        "ViT-L/14@336px",
        f"{_RELEASES}/l14_336px/FP16-ViT-L-14-336px.pt",
        "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea",
        ViTSettings(336, 14, 1024, 24, 16, 4096, 768),
    ),
}


def available_models() -> list[str]:
    """The names accepted by :func:`load`: ``['ViT-B/32', 'ViT-B/16', 'ViT-L/14', 'ViT-L/14@336px']``."""
    return list(RELEASED)


def released_name(settings: ViTSettings) -> str | None:
    """The released name with exactly these settings, or None."""
    return next((name for name, entry in RELEASED.items() if entry.settings == settings), None)


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


def build_unicom_vit(settings: Mapping[str, Any]) -> UnicomViT:
    """Builder of the ``unicom_vit`` architecture in :mod:`unicom.models.export`."""
    return UnicomViT(ViTSettings.from_dict(settings))


# ---------------------------------------------------------------------- preprocessing


def clip_preprocess(n_px: int) -> dict[str, Any]:
    """The released models' preprocessing as data (see :func:`unicom.models.export.build_transform`)."""
    return {"size": n_px, "resize_mode": "shortest", "interpolation": "bicubic", "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}


def image_transform(n_px: int):
    """PIL image -> float32 tensor (3, n_px, n_px): bicubic resize of the short side to
    ``n_px``, centre crop ``n_px``, RGB, ``(x / 255 - CLIP_MEAN) / CLIP_STD``."""
    from unicom.models.export import build_transform

    return build_transform(clip_preprocess(n_px))


# ------------------------------------------------------------------ reading weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, read safely (no arbitrary unpickling).

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A dict that wraps the weights under ``state_dict``
    or ``model`` is unwrapped, and a prefix carried by every key (``module.`` from
    DistributedDataParallel, ``model.`` from the public fine-tuning script) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise InputError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():  # not pickled objects: bytes that are no checkpoint
            raise InputError(f"{path}: not a readable PyTorch checkpoint (damaged, or another format)") from error
        raise InputError(
            f"{path}: holds Python objects besides tensors, which are not unpickled for safety; "
            "re-save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from error
    except Exception as error:  # a damaged or foreign file: torch raises many types
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    return _tensor_dict(obj, path)


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise InputError(f"{path}: expected a state dict (key -> tensor); found keys {sorted(map(str, obj))[:10]}")
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a non-empty state dict (key -> tensor), got {type(obj).__name__}")
    state_dict = dict(obj)
    for prefix in ("module.", "model."):
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


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


def infer_settings(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> ViTSettings:
    """Read a :class:`ViTSettings` off the tensor shapes of a released-format state dict.

    patch size and width from ``patch_embed.proj.weight`` (width, 3, p, p); the input size
    from ``pos_embed`` (1, N, width) as √N · p; depth from the ``blocks.{i}`` keys; the MLP
    size from ``blocks.0.mlp.fc1.weight``; the embedding size from ``feature.2.weight``.
    The head count is not in any shape: it is ``width / 64``, as in every released model.
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
    if width % HEAD_DIM:
        raise InputError(f"{source}: width {width} is not a multiple of {HEAD_DIM}, so the head count is unknown; pass arch=")
    return ViTSettings(grid * patch, patch, width, depth, width // HEAD_DIM, mlp_dim, embedding_dim, in_chans)


def resolve_settings(arch: str | ViTSettings | Mapping[str, Any] | None) -> ViTSettings | None:
    """``arch`` as :class:`ViTSettings`: a released name, a settings object or dict, or None."""
    if arch is None or isinstance(arch, ViTSettings):
        return arch
    if isinstance(arch, str):
        if arch not in RELEASED:
            raise InputError(f"unknown architecture {arch!r}; known: {available_models()} (or give a dict of ViT settings)")
        return RELEASED[arch].settings
    return ViTSettings.from_dict(arch)


# ------------------------------------------------------------------------- download


def cache_dir(download_root: str | os.PathLike | None = None) -> Path:
    """Where downloaded checkpoints are kept (see the module docstring for the order)."""
    if download_root:
        return Path(download_root).expanduser()
    if os.environ.get("UNICOM_CACHE"):
        return Path(os.environ["UNICOM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "unicom"
    return Path("~/.cache/unicom").expanduser()


def checkpoint_url(name: str, base_url: str | None = None) -> str:
    """The URL of a released checkpoint: ``base_url`` or ``$UNICOM_BASE_URL`` + file name
    (a mirror holding the files side by side), else the official release URL."""
    entry = RELEASED[name]
    base = base_url or os.environ.get("UNICOM_BASE_URL")
    return f"{base.rstrip('/')}/{entry.file_name}" if base else entry.url


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("UNICOM_OFFLINE", "0").lower() not in ("0", "", "false", "no")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One download per file at a time, across processes (the ranks of a torchrun job)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, downloads still land atomically
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download(url: str, sha256: str, root: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``root`` (unless a copy with this SHA-256 is there) and verify it.

    The file is written under a temporary name and renamed only after its SHA-256 matched;
    on a mismatch nothing is kept and :class:`InputError` is raised. Returns the path.
    """
    root = Path(root)
    target = root / url.rsplit("/", 1)[-1]
    where = (
        f"Without network access, put the file (SHA-256 {sha256}) at {target}, "
        "or set UNICOM_BASE_URL to a mirror holding it"
    )
    stale = None
    if target.is_file():
        actual = file_sha256(target)
        if actual == sha256:
            return target
        stale = f"the cached {target} has SHA-256 {actual}, expected {sha256}"
    if _offline():
        raise InputError(f"{stale or f'{target} is not in the cache'} and UNICOM_OFFLINE is set. {where}")
    if stale:
        warnings.warn(f"{stale}; downloading it again")
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{target.name}.lock"):
        if target.is_file() and target.stat().st_size and file_sha256(target) == sha256:
            return target  # another process finished it while we waited
        _fetch(url, sha256, target, timeout, where)
    return target


def _fetch(url: str, sha256: str, target: Path, timeout: float, where: str) -> None:
    from unicom.progress import progress

    with atomic_path(target) as tmp:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise InputError(f"could not download {url} ({getattr(error, 'reason', error)}). {where}") from error
        digest = hashlib.sha256()
        with response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            with progress(total=int(length) if length else None, desc=target.name, unit="B", unit_divisor=1024) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise InputError(
                f"{url}: downloaded file has SHA-256 {digest.hexdigest()}, expected {sha256}; it was not kept. "
                "A mirror may hold a different file or the download was corrupted; try again"
            )


def checkpoint_path(name: str, download_root: str | os.PathLike | None = None, base_url: str | None = None) -> Path:
    """The verified local file of a released model, downloaded if needed."""
    return download(checkpoint_url(name, base_url), RELEASED[name].sha256, cache_dir(download_root))


# -------------------------------------------------------------------------- loading


def _locate(name_or_path: str | os.PathLike, download_root, base_url) -> tuple[Path, ViTSettings | None]:
    if isinstance(name_or_path, str) and name_or_path in RELEASED:
        return checkpoint_path(name_or_path, download_root, base_url), RELEASED[name_or_path].settings
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    raise InputError(
        f"{name_or_path}: neither a released model ({', '.join(available_models())}) "
        "nor an existing checkpoint file or exported model folder"
    )


def load_state(
    name_or_path: str | os.PathLike,
    download_root: str | os.PathLike | None = None,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    base_url: str | None = None,
) -> tuple[dict[str, torch.Tensor], ViTSettings, Path]:
    """``(state_dict, settings, path)`` of a released name or a released-format file,
    with ``settings`` from ``arch``, the release table or the tensor shapes."""
    path, known = _locate(name_or_path, download_root, base_url)
    state_dict = read_state_dict(path)
    settings = resolve_settings(arch) or known or infer_settings(state_dict, str(path))
    return state_dict, settings, path


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    download_root: str | os.PathLike | None = None,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    base_url: str | None = None,
):
    """Load a released Unicom model: ``(model, transform)``.

    Args:
        name_or_path: a name from :func:`available_models`, a released-format ``.pt`` (or
            ``.safetensors``) file, or a folder written by :func:`unicom.models.export.save_model`.
        device: where the model goes.
        download_root: the cache folder (default: see :func:`cache_dir`).
        arch: the architecture of a file, as a released name or ViT settings; inferred
            from the tensor shapes when omitted.
        base_url: a mirror holding the released files (default ``$UNICOM_BASE_URL``).

    Returns:
        ``model``: an :class:`UnicomViT` in eval mode with float32 weights, mapping
        ``(B, 3, n_px, n_px)`` to ``(B, D)``; ``transform``: PIL image -> (3, n_px, n_px).

    Every key of the file must match the architecture (``num_batches_tracked`` counters
    may be absent); missing, unexpected or mis-shaped keys raise :class:`InputError`.
    """
    from unicom.models import export

    if not (isinstance(name_or_path, str) and name_or_path in RELEASED) and Path(name_or_path).expanduser().is_dir():
        return export.load_model(Path(name_or_path).expanduser(), device=device)
    state_dict, settings, path = load_state(name_or_path, download_root, arch, base_url)
    model = export.instantiate(build_unicom_vit, settings.to_dict(), state_dict, source=str(path))
    return model.to(device), image_transform(settings.image_size)


def accepts_released(spec: str, pretrained: str | None) -> bool:
    """Backend test for :func:`unicom.models.encoders.load_encoder`: a released name, or
    a checkpoint file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``), without ``pretrained``."""
    if pretrained is not None:
        return False
    if spec in RELEASED:
        return True
    path = Path(spec).expanduser()
    return path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".safetensors")


def released_encoder(spec: str, pretrained: str | None, device: str | torch.device = "cpu"):
    """A released model (name or file) as an :class:`unicom.models.encoders.Encoder`."""
    from unicom.models.export import ModelEncoder

    model, transform = load(spec, device=device)
    name = f"unicom {spec}" if spec in RELEASED else f"unicom {released_name(model.settings) or 'ViT'} ({spec})"
    return ModelEncoder(model, transform, model.embedding_dim, name)


# ----------------------------------------------------------------------- conversion


def released_to_unicom(
    name_or_path: str | os.PathLike,
    folder: str | os.PathLike,
    arch: str | ViTSettings | Mapping[str, Any] | None = None,
    download_root: str | os.PathLike | None = None,
) -> Path:
    """Write a released checkpoint (name or file) as an exported model folder.

    The tensors are stored unchanged (same keys, dtypes and values), so
    :func:`unicom_to_released` gives back an identical state dict.
    """
    from unicom.models.export import save_model

    state_dict, settings, path = load_state(name_or_path, download_root, arch)
    provenance = {"source": path.name, "sha256": file_sha256(path), "released_name": released_name(settings)}
    return save_model(folder, state_dict, ARCHITECTURE, settings.to_dict(), clip_preprocess(settings.image_size), provenance=provenance)


def unicom_to_released(folder: str | os.PathLike, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write an exported ``unicom_vit`` folder as a released-format ``.pt`` state dict.

    ``dtype`` casts the floating-point tensors (``torch.float16`` like the released
    files); None keeps the stored dtypes. Keys follow the module's order.
    """
    from unicom.models.export import read_config, read_weights

    config = read_config(folder)
    if config["architecture"] != ARCHITECTURE:
        raise InputError(
            f"{folder}: architecture {config['architecture']!r} has no released-checkpoint form (only {ARCHITECTURE!r} has)"
        )
    tensors = read_weights(folder)
    with torch.device("meta"):
        order = list(build_unicom_vit(config["settings"]).state_dict())
    keys = [k for k in order if k in tensors] + [k for k in tensors if k not in order]
    state_dict = {k: tensors[k].to(dtype) if dtype is not None and tensors[k].is_floating_point() else tensors[k] for k in keys}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)
    return path
