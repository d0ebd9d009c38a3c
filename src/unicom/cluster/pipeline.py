"""Clustering runs: resumable stages that meet only through the files under ``OUT``.

The folder and its files are :mod:`unicom.formats.clusters` (:class:`ClusterFolder`
writes and reads them). A stage that finds its output (with a record of the same
settings) skips it, so a killed run started again continues; a record with other settings
is an error rather than a silent mix of two runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from unicom import storage
from unicom.cluster.inputs import ClusterInputs, ScanResult, Shard, plan_sample, scan
from unicom.cluster.kmeans import INITS, CentroidSearch, available_memory, compute_backend, train_kmeans, training_memory
from unicom.cluster.statistics import plot_cluster_sizes, size_statistics
from unicom.errors import InputError
from unicom.formats.clusters import ClusterFolder, check_record
from unicom.progress import progress


def default_restarts(k: int) -> int:
    """Restarts when none are given: 3 below k = 1,000, else 1.

    From ``benchmarks/results/kmeans_restarts.txt``: with 20 classes and k = 40, one
    random start in three merges classes (10 of 30 seeds; 1 of 30 with 3 restarts); at
    k = 2,000 three restarts improved the fit by 0.1% for 3.3 times the training, and at
    LAION's k = 1M each restart would be hours of GPU time.
    """
    return 3 if k < 1000 else 1


@dataclass(frozen=True)
class KMeansSettings:
    """The k-means of one run: ``k`` clusters trained on ``k · points_per_centroid``
    random samples (all of them when fewer) for ``iterations`` Lloyd iterations, the best
    of ``restarts`` trainings from different initial centroids."""

    k: int
    iterations: int = 20
    points_per_centroid: int = 256
    seed: int = 0
    spherical: bool = True
    init: str = "random"
    restarts: int | None = None  # None: default_restarts(k)

    def __post_init__(self) -> None:
        if self.restarts is None and isinstance(self.k, int):
            object.__setattr__(self, "restarts", default_restarts(self.k))
        for name in ("k", "iterations", "points_per_centroid", "restarts"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise InputError(f"seed must be 0 or more, got {self.seed}")
        if self.init not in INITS:
            raise InputError(f"unknown k-means initialisation {self.init!r}; choose one of {', '.join(INITS)}")

    @property
    def sample_size(self) -> int:
        return self.k * self.points_per_centroid


def sample_seed(settings: KMeansSettings, part: int | None = None) -> tuple:
    """Seed of the training sample of a single run (``part`` None) or of one part."""
    return (settings.seed, 0) if part is None else (settings.seed, 0, part + 1)


def kmeans_seed(settings: KMeansSettings, part: int | None = None) -> tuple:
    """Seed of the initial centroids (and of faiss) of a single run or of one part."""
    return (settings.seed, 1) if part is None else (settings.seed, 1, part + 1)


def training_sample(
    inputs: ClusterInputs,
    settings: KMeansSettings,
    shards: list[Shard] | None = None,
    *,
    part: int | None = None,
    skip_invalid: bool = False,
) -> ScanResult:
    """Check ``shards`` (default all) and draw the training sample of ``settings``: the
    scan whose ``sample`` a run trains on (``part`` selects a hierarchical part's seed)."""
    shards = list(inputs.shards) if shards is None else shards
    desc = "read" if part is None else f"read part {part}"
    return scan(inputs, shards, skip_invalid=skip_invalid, sample_size=settings.sample_size, seed=sample_seed(settings, part), desc=desc)


def _training_record(trained, result: ScanResult, settings: KMeansSettings, backend: str, read_seconds: float) -> dict:
    return {
        "training_points": trained.training_points,
        "planned_training_points": result.planned,
        "points_per_centroid_used": trained.training_points / settings.k,
        "invalid_rows": result.num_invalid,
        "mean_similarity": trained.mean_similarity,
        "mean_squared_distance": trained.mean_squared_distance,
        "objective_per_iteration": trained.objective,
        "empty_clusters_on_training_points": trained.empty_clusters,
        "device": "cpu" if backend == "cpu" else "gpu",
        "backend": backend,
        "seconds": {"read": read_seconds, "kmeans": trained.seconds},
    }


def _train_on(
    inputs: ClusterInputs,
    shards: list[Shard],
    settings: KMeansSettings,
    *,
    part: int | None,
    skip_invalid: bool,
    device: str,
) -> tuple:
    """Check ``shards``, sample and train: (KMeansResult, ScanResult, record fields)."""
    where = "" if part is None else f" of part {part}"
    rows = sum(s.rows for s in shards)
    if settings.k > rows:
        raise InputError(f"k = {settings.k} is larger than the {rows} samples{where}; lower --k")
    backend = compute_backend(device)
    check_training_memory(min(rows, settings.sample_size), inputs.dimension, settings, where)
    started = time.perf_counter()
    result = training_sample(inputs, settings, shards, part=part, skip_invalid=skip_invalid)
    read_seconds = time.perf_counter() - started
    valid = rows - result.num_invalid - result.excluded
    if settings.k > valid:
        raise InputError(f"k = {settings.k} is larger than the {valid} valid samples{where}; lower --k")
    if settings.k > len(result.sample):  # invalid rows drawn into a sample of barely k rows
        raise InputError(
            f"the training sample{where} of {result.planned} rows (k x --points-per-centroid) keeps {len(result.sample)} "
            f"valid rows, fewer than k = {settings.k}: {result.planned - len(result.sample)} of the rows drawn are "
            f"invalid{' or excluded' if inputs.exclude else ''}; raise --points-per-centroid"
        )
    trained = train_kmeans(
        result.sample, settings.k, iterations=settings.iterations, seed=kmeans_seed(settings, part),
        spherical=settings.spherical, init=settings.init, backend=backend, restarts=settings.restarts,
        desc="k-means" if part is None else f"k-means part {part}",
    )
    result.sample = None  # the sample is the largest thing in memory: let it go now
    fields = {
        "k": settings.k,
        "dimension": inputs.dimension,
        "fusion": inputs.fusion,
        "key_column": inputs.key_column,
        "spherical": settings.spherical,
        "samples": rows,
        "valid_samples": valid,
        **({"excluded_rows": result.excluded} if inputs.exclude else {}),
        **_training_record(trained, result, settings, backend, read_seconds),
    }
    return trained, result, fields


def check_training_memory(rows: int, dimension: int, settings: KMeansSettings, where: str = "",
                          available: int | None = None) -> None:
    """Refuse, before anything is read, a training sample that does not fit in memory.

    ``rows`` training points of ``dimension`` take :func:`training_memory` bytes; with
    more than the memory available (``available``, default :func:`available_memory`) the
    error says how many points per centroid would fit and names the hierarchical mode.
    """
    available = available_memory() if available is None else available
    needed = training_memory(rows, dimension, settings.k)
    if available is None or needed <= available:
        return
    per_point = training_memory(1, dimension, 0)
    fitting = max(0, (available - training_memory(0, dimension, settings.k)) // per_point)
    fits = fitting // settings.k
    gib = 2.0**30
    advice = (f"lower --points-per-centroid to {fits} or less (the centroids are noisier below about 39)"
              if fits >= 1 else "no number of points per centroid fits")
    raise InputError(
        f"k = {settings.k:,} x {settings.points_per_centroid} points per centroid{where} is a training sample of "
        f"{rows:,} points x {dimension} dims, about {needed / gib:,.1f} GiB in memory, but {available / gib:,.1f} GiB "
        f"is available: {advice}; or cluster in parts on several machines (`unicom cluster part --part P/N`, "
        "then `unicom cluster merge`), each part training on its own slice of the shards"
    )


def train_centroids(
    inputs: ClusterInputs,
    out,
    settings: KMeansSettings,
    *,
    skip_invalid: bool = False,
    device: str = "auto",
) -> tuple[dict, ScanResult | None]:
    """Stage 1 on one machine: check every shard, sample, train, write the centroids.

    Returns the centroids record and the scan (None when finished centroids were found,
    so nothing was read). Nothing is written before every shard has been checked.
    """
    folder = ClusterFolder(out)
    storage.writable_folder(folder.root)
    expected = {"mode": "single", "settings": asdict(settings), "inputs": inputs.fingerprint()}
    record = check_record(folder.centroids_record, expected)
    if record is not None and storage.is_file(folder.centroids):
        return record, None
    folder.sweep(["centroids.npy", "centroids.json"])
    trained, result, fields = _train_on(inputs, inputs.shards, settings, part=None, skip_invalid=skip_invalid, device=device)
    record = {**expected, **fields}
    folder.write_centroids(trained.centroids, record)
    return record, result


def _select(inputs: ClusterInputs, numbers: list[int] | None) -> list[Shard]:
    if numbers is None:
        return list(inputs.shards)
    return [inputs.shard(number) for number in numbers]


def assign_labels(
    inputs: ClusterInputs,
    out,
    *,
    shards: list[int] | None = None,
    skip_invalid: bool = False,
    device: str = "auto",
    scan_result: ScanResult | None = None,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict:
    """Stage 2: label every sample of ``shards`` (part numbers; default all) with its
    nearest centroid, one ``labels_{i}.parquet`` per part, skipping parts already labelled.

    The parts to label are checked first (unless ``scan_result`` from this run covers
    them), so a bad row stops the run before a label file is written. ``on_shard_done``
    is called with each part number once its file is in place.
    """
    folder = ClusterFolder(out)
    centroids, record = folder.read_centroids()
    if record["fusion"] != inputs.fusion:
        raise InputError(
            f"{folder.centroids_record}: the centroids were trained on {record['fusion']} rows, these inputs are "
            f"fused as {inputs.fusion}; use --fusion {record['fusion']}"
        )
    if record["dimension"] != inputs.dimension:
        raise InputError(
            f"the centroids in {folder.centroids} are {record['dimension']}-d but the embeddings are {inputs.dimension}-d; "
            "assign with embeddings of the model the centroids were trained on"
        )
    expected = {"inputs": inputs.fingerprint()}
    trained_without = (record.get("inputs") or {}).get("excluded_keys")
    if trained_without != expected["inputs"].get("excluded_keys"):  # labels for what the centroids never saw, or none
        raise InputError(
            f"{folder.centroids_record}: the centroids were trained with {_exclusion(trained_without)}, and this "
            f"assignment is given {_exclusion(expected['inputs'].get('excluded_keys'))}: give `assign` the same "
            "--exclude tables as the training"
        )
    assignment = check_record(folder.assignment_record, expected)
    trained = folder.check_assigned_with(assignment, centroids)
    selected = _select(inputs, shards)
    labelled = folder.labelled_parts()
    pending = [shard for shard in selected if shard.number not in labelled]
    report = {"parts": len(selected), "written": [s.number for s in pending], "rows": sum(s.rows for s in pending)}
    if not pending:
        report.update(invalid_rows=0, seconds=0.0)
        return report
    folder.sweep(labels=[s.number for s in pending])
    if scan_result is None:
        scan_result = scan(inputs, pending, skip_invalid=skip_invalid, desc="check")
    if assignment is None:  # new labels: a summary left in OUT (its sizes, its run's times) describes others
        storage.remove(folder.summary)
        folder.write_assignment({**expected, "centroids": trained, "dropped_below": 0})
    search = CentroidSearch(centroids, spherical=record["spherical"], backend=compute_backend(device))
    started = time.perf_counter()
    bar = progress(total=report["rows"], desc="assign", unit="sample")
    try:
        for shard in pending:
            _assign_shard(inputs, folder, shard, search, scan_result.invalid.get(shard.number), bar)
            if on_shard_done is not None:
                on_shard_done(shard.number)
    finally:
        bar.close()
    report.update(
        invalid_rows=int(sum(len(scan_result.invalid.get(s.number, ())) for s in pending)),
        seconds=time.perf_counter() - started,
    )
    return report


def _exclusion(excluded: dict | None) -> str:
    """The ``--exclude`` tables an inputs fingerprint records, in words."""
    if not excluded:
        return "no --exclude"
    return f"--exclude tables of {excluded['count']:,} keys (digest {excluded['sha256']})"


def _assign_shard(inputs: ClusterInputs, folder: ClusterFolder, shard: Shard, search: CentroidSearch, invalid, bar) -> None:
    import pyarrow as pa

    keep = np.ones(shard.rows, dtype=bool)
    if invalid is not None:
        keep[invalid] = False
    keys, occurrences = inputs.keys(shard), inputs.occurrences(shard)
    valid_rows = int(keep.sum())
    keep[inputs.excluded_rows(shard, keys)] = False
    labels = np.empty(shard.rows, dtype=np.int64)
    similarity = np.empty(shard.rows, dtype=np.float32)
    for start, rows, valid in inputs.chunks(shard):
        stop = start + len(rows)
        if (~valid & keep[start:stop]).any():
            raise InputError(
                f"part {shard.number}: rows {(start + np.flatnonzero(~valid & keep[start:stop]))[:5].tolist()} became "
                "invalid (NaN/Inf or zero) after the part was checked; was the file changed during the run?"
            )
        labels[start:stop], similarity[start:stop] = search.search(rows)
        bar.update(len(rows))
    facts = {"rows": shard.rows, "invalid": shard.rows - valid_rows, "key_column": inputs.key_column}
    if inputs.exclude:
        facts["excluded"] = valid_rows - int(keep.sum())
    mask = pa.array(keep)
    folder.write_labels(shard.number, keys.filter(mask), labels[keep], similarity[keep], facts,
                        None if occurrences is None else occurrences.filter(mask))


def summarize(
    out, *, tiny_cluster_size: int = 10, min_cluster_size: int = 0, plot: bool = True, seconds: dict | None = None
) -> dict:
    """Stage 3: cluster sizes, their histogram and ``clusters.json``, once every part is
    labelled; with ``min_cluster_size``, drop from the label files the samples of the
    clusters smaller than that (label ids are kept, so they still index the centroids).
    ``seconds`` (the stage timings of this run) is recorded as it is; without it (``stats``,
    the hierarchical ``assign``) those of the summary already there are kept."""
    folder = ClusterFolder(out)
    centroids, record = folder.read_centroids(mmap=True)
    assignment = folder.read_assignment()
    folder.check_assigned_with(assignment, centroids)  # `stats` after the centroids were trained again
    numbers = sorted(int(n) for n in assignment["inputs"]["shards"])
    labelled = folder.labelled_parts()
    missing = [n for n in numbers if n not in labelled]
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"{len(missing)} of {len(numbers)} parts have no labels yet (parts {listed}); run `unicom cluster assign` for them")
    applied = int(assignment.get("dropped_below", 0))
    if 0 < min_cluster_size < applied:
        raise InputError(
            f"the labels in {folder.labels} were already filtered with --min-cluster-size {applied}; "
            f"to use {min_cluster_size}, delete {folder.labels} and {folder.assignment_record} and assign again"
        )
    # every part is labelled: what a killed summary (or filter) left is this stage's own
    folder.sweep(["cluster_sizes.npy", "cluster_sizes.png", "clusters.json", "assignment.json"], labels=numbers)
    k = record["k"]
    facts = {n: folder.label_facts(n) for n in numbers}
    if applied == 0:  # the files hold every labelled sample: count them
        sizes = np.zeros(k, dtype=np.int64)
        similarity_sum = 0.0
        for n in numbers:
            table = folder.read_labels(n, ["label", "similarity"])
            sizes += np.bincount(table.column("label").to_numpy(), minlength=k)
            similarity_sum += float(np.sum(table.column("similarity").to_numpy(), dtype=np.float64))
        folder.write_sizes(sizes)
        assignment["mean_similarity"] = similarity_sum / max(int(sizes.sum()), 1)
    else:  # some files may be filtered already: the sizes were saved before filtering
        if not storage.is_file(folder.sizes):
            raise InputError(
                f"{folder.sizes} is missing but the labels were filtered with --min-cluster-size {applied}; "
                f"delete {folder.labels} and {folder.assignment_record} and assign again"
            )
        sizes = folder.read_sizes()
    threshold = max(applied, min_cluster_size)
    if threshold > applied:  # recorded before the first file changes, so a resumed run knows
        assignment["dropped_below"] = threshold
        folder.write_assignment(assignment)
    if threshold > 0:
        _drop_small_clusters(folder, numbers, sizes, threshold)
    statistics = size_statistics(sizes, tiny_cluster_size)
    small = sizes < threshold
    summary = {
        "mode": record["mode"],
        "k": k,
        "dimension": record["dimension"],
        "fusion": record["fusion"],
        "key_column": facts[numbers[0]]["key_column"],
        "spherical": record["spherical"],
        "seed": record["settings"]["seed"],
        "iterations": record["settings"]["iterations"],
        "init": record["settings"]["init"],
        "points_per_centroid": record["settings"]["points_per_centroid"],
        "training_points": record["training_points"],
        "objective": {
            "mean_similarity_training": record["mean_similarity"],
            "mean_squared_distance_training": record["mean_squared_distance"],
            "per_iteration": record["objective_per_iteration"],
        },
        "mean_similarity": assignment.get("mean_similarity"),
        "samples": int(sum(f["rows"] for f in facts.values())),
        "invalid_rows": int(sum(f["invalid"] for f in facts.values())),
        "labelled": int(sizes.sum()),
        **({"excluded_rows": int(sum(f.get("excluded", 0) for f in facts.values()))}
           if any("excluded" in f for f in facts.values()) else {}),
        "min_cluster_size": threshold,
        "dropped_clusters": int((small & (sizes > 0)).sum()),
        "dropped_samples": int(sizes[small].sum()),
        "cluster_sizes": statistics,
        "histogram": folder.histogram.name if plot else None,
        "parts": len(numbers),
    }
    if record["mode"] == "hierarchical":
        summary["hierarchical"] = record["hierarchical"]
    if seconds is None:  # the statistics are recomputed; how long the run took stays what it was
        seconds = (folder.read_summary() or {}).get("seconds")
    if seconds is not None:
        summary["seconds"] = seconds
    if plot:
        plot_cluster_sizes(sizes, folder.histogram, tiny_cluster_size=tiny_cluster_size, min_cluster_size=threshold or None)
    folder.write_summary(summary)
    return summary


def _drop_small_clusters(folder: ClusterFolder, numbers: list[int], sizes: np.ndarray, threshold: int) -> None:
    # Idempotent: a file already filtered holds no row of a small cluster and is left alone,
    # so a run killed half-way through simply filters the rest when started again.
    import pyarrow as pa
    import pyarrow.compute as pc

    small = np.flatnonzero(sizes < threshold)
    if len(small) == 0:
        return
    for n in numbers:
        table = folder.read_labels(n)
        drop = pc.is_in(table.column("label"), value_set=pa.array(small))
        if pc.any(drop).as_py():
            folder.replace_labels(n, table.filter(pc.invert(drop)))


def cluster(
    inputs: ClusterInputs,
    out,
    settings: KMeansSettings,
    *,
    skip_invalid: bool = False,
    device: str = "auto",
    tiny_cluster_size: int = 10,
    min_cluster_size: int = 0,
    plot: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict:
    """The whole of stage 1 on one machine: train, assign every part, summarise.

    Returns the summary written to ``OUT/clusters.json``, with this run's stage timings
    in seconds: ``read`` (checking every row and gathering the sample) and ``kmeans`` make
    up ``train``; ``assign`` is the streaming pass (read, fuse, search, write).
    """
    started = time.perf_counter()
    record, result = train_centroids(inputs, out, settings, skip_invalid=skip_invalid, device=device)
    trained = time.perf_counter()
    assignment = assign_labels(inputs, out, skip_invalid=skip_invalid, device=device, scan_result=result, on_shard_done=on_shard_done)
    seconds = {
        # 0 when the centroids of an earlier run were found
        "read": record["seconds"]["read"] if result is not None else 0.0,
        "kmeans": record["seconds"]["kmeans"] if result is not None else 0.0,
        "train": trained - started if result is not None else 0.0,
        "assign": assignment["seconds"],
    }
    return summarize(out, tiny_cluster_size=tiny_cluster_size, min_cluster_size=min_cluster_size, plot=plot, seconds=seconds)


# ---- hierarchical mode: parts cluster slices of the shards, a merge clusters their union


def split_shards(shards: list[Shard], part: int, num_parts: int) -> list[Shard]:
    """Part ``part`` of ``num_parts`` contiguous, near-equal slices of ``shards``."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise InputError(f"--part {part}/{num_parts}: expected 0 <= part < parts (parts are numbered from 0)")
    if num_parts > len(shards):
        raise InputError(
            f"{num_parts} parts but only {len(shards)} shards; use at most {len(shards)} parts "
            "(--part I/N, or under torchrun as many processes: each process is one part)"
        )
    size, extra = divmod(len(shards), num_parts)
    start = part * size + min(part, extra)
    return shards[start:start + size + (part < extra)]


def train_part(
    inputs: ClusterInputs,
    out,
    settings: KMeansSettings,
    part: int,
    num_parts: int,
    *,
    skip_invalid: bool = False,
    device: str = "auto",
) -> dict:
    """Cluster part ``part`` of ``num_parts`` (its slice of the shards) into ``settings.k``
    centroids; writes ``OUT/parts/part_{part}.*``. Independent of every other part."""
    folder = ClusterFolder(out)
    record_path = folder.part_paths(part)[2]
    shards = split_shards(inputs.shards, part, num_parts)
    expected = {"part": part, "num_parts": num_parts, "settings": asdict(settings), "inputs": inputs.fingerprint()}
    record = check_record(record_path, expected)
    if record is not None:
        return record
    storage.writable_folder(folder.root)
    folder.sweep(parts=[part])
    trained, _, fields = _train_on(inputs, shards, settings, part=part, skip_invalid=skip_invalid, device=device)
    record = {**expected, "shards": [s.number for s in shards], **fields}
    folder.write_part(part, trained.centroids, trained.sizes, record)
    return record


def merge_parts(out, settings: KMeansSettings, *, device: str = "auto") -> dict:
    """Cluster the union of all parts' centroids into ``settings.k`` final centroids.

    Each part centroid weighs as many samples as it stands for (its training points,
    scaled by the part's valid samples over its training points). The union is sampled
    to ``k · points_per_centroid`` centroids when larger. Writes ``centroids.npy``/``.json``.
    """
    folder = ClusterFolder(out)
    records = folder.part_records()
    if not records:
        raise InputError(f"{folder.parts}: no part results; run `unicom cluster part --part P/N ...` for every part first")
    first = next(iter(records.values()))
    num_parts = first["num_parts"]
    for number, part in records.items():
        for key in ("num_parts", "inputs", "dimension", "spherical"):
            if part[key] != first[key]:
                raise InputError(
                    f"{folder.part_paths(number)[2]}: {key} {json.dumps(part[key])} differs from "
                    f"{json.dumps(first[key])} of part {next(iter(records))}; every part must come from the same run"
                )
    missing = sorted(set(range(num_parts)) - set(records))
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(
            f"{len(missing)} of {num_parts} parts are not finished (parts {listed}); run "
            f"`unicom cluster part --part P/{num_parts} ...` for each"
        )
    if settings.spherical != first["spherical"]:
        raise InputError(f"the parts were trained with spherical={first['spherical']}; merge with the same (--euclidean or not)")
    part_ks = [records[p]["k"] for p in range(num_parts)]
    union = int(sum(part_ks))
    hierarchical = {
        "num_parts": num_parts,
        "part_settings": first["settings"],
        "union_centroids": union,
    }
    expected = {"mode": "hierarchical", "settings": asdict(settings), "inputs": first["inputs"], "hierarchical": hierarchical}
    record = check_record(folder.centroids_record, expected)
    if record is not None and storage.is_file(folder.centroids):
        return record
    folder.sweep(["centroids.npy", "centroids.json"])
    if settings.k > union:
        raise InputError(f"k = {settings.k} is larger than the {union} centroids of the {num_parts} parts; lower --k or raise the parts' k")
    backend = compute_backend(device)
    check_training_memory(min(union, settings.sample_size), first["dimension"], settings, " (merge)")
    started = time.perf_counter()
    plan = plan_sample(part_ks, settings.sample_size, (settings.seed, 2))
    points = np.empty((sum(len(rows) for rows in plan), first["dimension"]), dtype=np.float32)
    weights = np.empty(len(points), dtype=np.float32)
    filled = 0
    for p, rows in enumerate(plan):
        centroids, sizes = folder.read_part(p, part_ks[p], first["dimension"])
        scale = records[p]["valid_samples"] / records[p]["training_points"]
        points[filled:filled + len(rows)] = centroids[rows]
        weights[filled:filled + len(rows)] = sizes[rows] * scale
        filled += len(rows)
        del centroids
    read_seconds = time.perf_counter() - started
    trained = train_kmeans(
        points, settings.k, iterations=settings.iterations, seed=(settings.seed, 3), spherical=settings.spherical,
        init=settings.init, weights=weights, backend=backend, restarts=settings.restarts, desc="k-means merge",
    )
    result = ScanResult(invalid={}, planned=len(points))
    record = {
        **expected,
        "k": settings.k,
        "dimension": first["dimension"],
        "fusion": first["fusion"],
        "key_column": first["key_column"],
        "spherical": settings.spherical,
        "samples": int(sum(r["samples"] for r in records.values())),
        "valid_samples": int(sum(r["valid_samples"] for r in records.values())),
        **_training_record(trained, result, settings, backend, read_seconds),
        "invalid_rows": int(sum(r["invalid_rows"] for r in records.values())),
        "part_training_points": int(sum(r["training_points"] for r in records.values())),
    }
    folder.write_centroids(trained.centroids, record)
    return record
