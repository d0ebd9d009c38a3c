"""SigLIP 2's NaFlex input: each image at its own aspect ratio, as a sequence of patches.

A NaFlex model (``google/siglip2-*-naflex``) sees an image resized, its aspect ratio kept, to
the largest size whose sides are whole patches and whose patches number at most
``max_patches``; the patches go in row by row, padded to ``max_patches`` with a mask, with the
grid's height and width in patches (``spatial_shapes``), as transformers' ``Siglip2Model``
takes them.

Every stage here batches images as tensors of one shape, so :class:`NaFlexTransform` packs an
image's input into one: float32 (``max_patches`` + 1, 3 · patch²), the patches (each patch's
pixels row by row, the three channels of a pixel together, as transformers lays them out),
zeros after them, and a last row that holds the grid's height and width in patches.
:func:`unpack` gives transformers' three inputs back from a batch of them.
"""

from __future__ import annotations

import math

import torch

from unicom.errors import InputError

SEARCH_TOLERANCE = 1e-5  # the scale is searched to this precision, as transformers' processor searches it


def patch_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The grid (rows, columns of patches) an image of ``height`` x ``width`` pixels is resized to:
    both sides scaled by the largest factor (found by bisection to :data:`SEARCH_TOLERANCE`, as
    transformers' ``Siglip2ImageProcessor`` finds it) for which the sides, each rounded up to
    whole patches and at least one, make at most ``max_patches`` patches."""
    if height < 1 or width < 1 or patch < 1 or max_patches < 1:
        raise ValueError(f"patch_grid({height}, {width}, {patch}, {max_patches}): sizes must be positive")

    def grid(scale: float) -> tuple[int, int]:
        return (max(1, math.ceil(height * scale / patch)), max(1, math.ceil(width * scale / patch)))

    low, high = SEARCH_TOLERANCE / 10, 100.0
    while high - low >= SEARCH_TOLERANCE:
        middle = (low + high) / 2
        rows, columns = grid(middle)
        if rows * columns <= max_patches:
            low = middle
        else:
            high = middle
    return grid(low)


class NaFlexTransform:
    """PIL image -> float32 (``max_patches`` + 1, 3 · ``patch``²): the image in RGB, resized to
    :func:`patch_grid`'s grid with Pillow's ``interpolation`` filter, values / 255, then
    ``(x - mean) / std``, cut into patches and packed (module docstring)."""

    def __init__(self, patch: int, max_patches: int, interpolation: str, mean, std):
        from PIL import Image

        filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                   "bicubic": Image.Resampling.BICUBIC}
        if interpolation not in filters:
            raise InputError(f"NaFlex: interpolation {interpolation!r}; read are {', '.join(filters)}")
        self.patch, self.max_patches, self.interpolation = int(patch), int(max_patches), interpolation
        self.filter = filters[interpolation]
        self.mean = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        from unicom.data.transforms import to_rgb

        image = to_rgb(image)
        rows, columns = patch_grid(image.height, image.width, self.patch, self.max_patches)
        image = image.resize((columns * self.patch, rows * self.patch), self.filter)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(rows * self.patch, columns * self.patch, 3).permute(2, 0, 1).float().div(255)
        pixels = (pixels - self.mean) / self.std
        patches = pixels.reshape(3, rows, self.patch, columns, self.patch).permute(1, 3, 2, 4, 0)
        packed = torch.zeros(self.max_patches + 1, 3 * self.patch * self.patch)
        packed[:rows * columns] = patches.reshape(rows * columns, -1)
        packed[self.max_patches, :2] = torch.tensor([rows, columns], dtype=torch.float32)
        return packed

    def __repr__(self) -> str:
        return (f"NaFlexTransform(patch={self.patch}, max_patches={self.max_patches}, "
                f"interpolation={self.interpolation!r}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()})")


def unpack(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' NaFlex inputs from a batch of :class:`NaFlexTransform`'s tensors (B,
    max_patches + 1, 3 · patch²): ``pixel_values`` (B, max_patches, 3 · patch²),
    ``pixel_attention_mask`` (B, max_patches) and ``spatial_shapes`` (B, 2)."""
    if batch.ndim != 3 or batch.shape[1] < 2:
        raise ValueError(f"NaFlex input of shape {tuple(batch.shape)}: expected (batch, max_patches + 1, values)")
    max_patches = batch.shape[1] - 1
    shapes = batch[:, max_patches, :2].float().round().long()
    counts = shapes[:, 0] * shapes[:, 1]
    if bool(((shapes < 1).any(dim=1) | (counts > max_patches)).any()):
        raise ValueError("NaFlex input whose last row is not a grid of at most max_patches patches: "
                         "images for this model are prepared by its image_transform")
    mask = (torch.arange(max_patches, device=batch.device)[None, :] < counts[:, None]).to(torch.int32)
    return {"pixel_values": batch[:, :max_patches], "pixel_attention_mask": mask, "spatial_shapes": shapes}
