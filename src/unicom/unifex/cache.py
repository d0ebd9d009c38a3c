"""The feature cache: the frozen backbone's features of every image, computed once.

::

    CACHE/
      cache.json                         backbone, weights, feature size, views and images per list
      train/view_0/                      the backbone's own evaluation transform
        img_emb/img_emb_{i}.npy          (N_i, D_in) float32 (or float16), rows L2-normalised
                                         (the backbone's raw features with neck.features=raw)
        metadata/metadata_{i}.parquet    key, image_path, label (global class id), width, height
        embed_config.json                what made the view (checked on every rerun)
        failures/failures_{i}.parquet    images that could not be decoded (left out of the rows)
      train/view_1/ ...                  augmented views: the augment section's random transform
      query/<images>/view_0/             evaluation images (the eval lists, or held-out classes when
      index/<images>/view_0/             training images are transformed otherwise); <images> is the start
                                         of the images' fingerprint, so each evaluation split keeps its own

Every view folder is an embedding folder written by :func:`unicom.embed.embed_parts`, so
it is resumable part by part (a killed build continues where it stopped), a folder built
with another backbone, transform, image list, precision or JPEG decoder is refused, and ``unicom evaluate
--embeddings`` or ``unicom index`` read it as they read any ``unicom embed`` output.
Augmented views are random draws, each image's seeded by (seed, view, its key): a build killed and
run again, or run with other workers, draws the same views; the plain view is deterministic.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from unicom import storage
from unicom.data.lists import ImageList
from unicom.data.sources import list_parts
from unicom.errors import InputError
from unicom.files import write_json_atomic
from unicom.models.encoders import Encoder

MANIFEST = "cache.json"


def view_folder(root, split: str, view: int) -> Path:
    """``root/<split>/view_<view>`` (``root`` a folder or a URL)."""
    return storage.join(root, split, f"view_{view}")


def eval_split(name: str, images: ImageList) -> str:
    """``<name>/<images>``: the split of an evaluation set (``query``, ``index``) named by
    its images' fingerprint, so that runs evaluating on other images (another held-out
    fraction, seed or list) add their own views instead of being refused."""
    return f"{name}/{images_fingerprint(images)[:16]}"


def transform_identity(transform: Callable):
    """What a view's transform does, comparable across runs: its preprocess description
    when it has one, else its repr without object addresses (a function's ``at 0x…``)."""
    from unicom.unifex.model import describe_transform

    try:
        return describe_transform(transform)
    except InputError:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def images_fingerprint(images: ImageList) -> str:
    """sha256 of the keys, paths and labels of ``images``, in order: what a view's rows mean."""
    digest = hashlib.sha256()
    labels = images.labels if images.labels is not None else [None] * len(images)
    for key, path, label in zip(images.keys, images.paths, labels):
        digest.update(f"{key}\0{path}\0{label}\n".encode())
    return digest.hexdigest()


class _ViewEncoder(Encoder):
    """The backbone seen through another image transform (an augmented view)."""

    def __init__(self, encoder: Encoder, transform: Callable):
        super().__init__()
        self.encoder = encoder
        self.image_transform = transform
        self.embedding_dim = encoder.embedding_dim
        self.name = encoder.name

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images)


def build_views(
    encoder: Encoder,
    images: ImageList,
    root: str | os.PathLike,
    split: str,
    transforms: Sequence[Callable],
    *,
    identity: dict,
    batch_size: int = 64,
    num_workers: int | None = None,
    dtype: str = "float32",
    rows_per_part: int = 10_000,
    precision: str = "auto",
    seed: int = 0,
    normalize: bool = True,
    decode: str = "auto",
) -> list[Path]:
    """Embed ``images`` once per transform into ``root/<split>/view_<v>``; parts already
    written are kept. ``transforms[0]`` should be the backbone's own evaluation transform.

    ``identity`` (backbone spec and weights) goes into each view's ``embed_config.json``
    with the view's transform and the images' fingerprint; a rerun with anything else
    raises :class:`InputError` instead of mixing features. ``normalize=False`` stores the
    backbone's features as it gives them (``"features": "raw"`` in the view's config).
    ``decode``: where JPEGs are decoded (:func:`unicom.data.transforms.resolve_decode`; a
    view whose transform cannot run on tensors is decoded on the CPU under ``auto``).
    """
    from unicom.data.transforms import DrawnPerKey, resolve_decode
    from unicom.embed import embed_parts
    from unicom.engine.device import resolve_precision

    fingerprint = images_fingerprint(images)
    device = encoder.device
    folders = []
    for view, transform in enumerate(transforms):
        folder = view_folder(root, split, view)
        parts = list_parts(images, rows_per_part, f"{split} list")
        # the forward's precision and the JPEG decoder change the features a little (fp16 against
        # fp32: cosine ~0.9999): a cache shared by recipes that differ in them is refused, not mixed
        made = {"precision": resolve_precision(precision, device, training=False),
                "decode": "gpu" if resolve_decode(decode, device, transform) else "cpu"}
        config = dict(identity, view=view, transform=transform_identity(transform), images=fingerprint,
                      rows_per_part=rows_per_part, **made, **({} if normalize else {"features": "raw"}))
        if view > 0:  # an augmented view: each image's draws seeded by (seed, view, key), in any run or process
            transform = DrawnPerKey(transform, seed * 1000 + view)
        view_encoder = encoder if transform is encoder.image_transform else _ViewEncoder(encoder, transform)
        embed_parts(parts, view_encoder, folder, modalities=("image",), batch_size=batch_size, num_workers=num_workers,
                    dtype=dtype, precision=precision, config=config, normalize=normalize, decode=decode,
                    advice="give the recipe another cache.folder, or the settings the cache was made with")
        folders.append(folder)
    return folders


def load_view(folder: str | os.PathLike, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features of the rows ``keys`` from a view folder: ``(float32 (N, D_in), present bool (N,))``;
    rows whose image failed to decode are zeros with ``present`` False."""
    from unicom.formats.embeddings import read_embedding_folder

    features, metadata = read_embedding_folder(folder)
    stored = [str(k) for k in metadata.column("key").to_pylist()]
    row_of = {key: row for row, key in enumerate(keys)}
    unknown = [k for k in stored if k not in row_of]
    if unknown:
        raise InputError(f"{folder}: holds rows of other images (e.g. {unknown[:3]}); delete the cache folder and rebuild it")
    rows = np.asarray([row_of[k] for k in stored], dtype=np.int64)
    out = np.zeros((len(keys), features.shape[1]), dtype=np.float32)
    out[rows] = features
    present = np.zeros(len(keys), dtype=bool)
    present[rows] = True
    return out, present


def write_manifest(root: str | os.PathLike, identity: dict, input_dim: int, splits: dict[str, dict]) -> None:
    """``root/cache.json``: what the cache holds (for people; the views check themselves)."""
    write_json_atomic(storage.join(root, MANIFEST), {**identity, "input_dim": int(input_dim), "splits": splits})


__all__ = ["build_views", "load_view", "view_folder", "eval_split", "images_fingerprint", "transform_identity", "write_manifest",
           "MANIFEST"]
