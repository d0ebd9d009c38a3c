"""Stage 1 of Unicom: multimodal k-means turns image–text embeddings into pseudo-classes.

Fused, L2-normalised CLIP image and text embeddings (:func:`fuse`) are clustered with
k-means (:func:`train_kmeans`: faiss, or torch on GPUs without faiss-gpu) on a random sample, then every sample is labelled
with its nearest centroid in one streaming pass (:func:`assign_labels`). The whole run
(:func:`cluster`) reads the shards memory-mapped in row chunks, so memory does not grow
with the number of samples; at larger scale, independent parts cluster slices of the
shards (:func:`train_part`) and :func:`merge_parts` clusters the union of their centroids.
The output folder is :mod:`unicom.formats.clusters`; :func:`build_contact_sheet` draws
sample images of chosen clusters beside their nearest clusters (``unicom cluster show``). See ``docs/clustering.md`` for the
commands and file formats.
"""

from unicom.cluster.contact_sheet import build_contact_sheet, write_contact_sheet
from unicom.cluster.inputs import FUSIONS, ClusterInputs, ScanResult, Shard, fuse, plan_sample, scan
from unicom.cluster.kmeans import CentroidSearch, KMeansResult, compute_backend, initial_centroids, train_kmeans, use_gpu
from unicom.cluster.pipeline import (
    KMeansSettings,
    assign_labels,
    cluster,
    merge_parts,
    split_shards,
    summarize,
    train_centroids,
    train_part,
)
from unicom.cluster.statistics import plot_cluster_sizes, size_statistics
from unicom.formats.clusters import ClusterFolder, load_labels

__all__ = [
    "FUSIONS",
    "CentroidSearch",
    "ClusterFolder",
    "ClusterInputs",
    "KMeansResult",
    "KMeansSettings",
    "ScanResult",
    "Shard",
    "assign_labels",
    "build_contact_sheet",
    "cluster",
    "compute_backend",
    "fuse",
    "initial_centroids",
    "load_labels",
    "merge_parts",
    "plan_sample",
    "plot_cluster_sizes",
    "scan",
    "size_statistics",
    "split_shards",
    "summarize",
    "train_centroids",
    "train_kmeans",
    "train_part",
    "use_gpu",
    "write_contact_sheet",
]
