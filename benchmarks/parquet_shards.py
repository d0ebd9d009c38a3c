"""Parquet shards against tar shards of the same images, side by side in one run.

``unicom embed`` (``embed_parts``, what the command runs once the model is built, the
decoding in the main process: the choice on 2 CPUs) with timm's tiny ``test_vit``, where
reading and decoding dominate, on the same JPEGs written as webdataset tars and as
img2dataset's parquet shards (a ``jpg`` column, row groups of 100 rows as img2dataset
writes them): from local disk, and from an HTTP server on 127.0.0.1 that adds
``--latency`` (50 ms) to every request and caps every response at ``--bandwidth``
(20 MB/s). A tar streams in one request; a parquet shard is read by ranges, its footer and
then each row group. Target: parquet >= 0.9x tar in both settings, identical embeddings.

The machine may be shared, so its speed drifts: the variants alternate run by run, and
rates are totals over totals.

    python benchmarks/parquet_shards.py --write
    python benchmarks/parquet_shards.py --images 1000 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "parquet_shards.txt"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
VARIANTS = ("tar local", "parquet local", "tar http", "parquet http")


def as_parquet(tar: Path, folder: Path, row_group_size: int) -> Path:
    """The samples of ``tar`` as an img2dataset parquet shard: ``key``, ``caption``, ``url``,
    ``status``, then the image bytes in ``jpg``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unicom.data.shards import read_tar_samples

    samples = list(read_tar_samples(tar))
    table = pa.table({"key": [s.key for s in samples], "caption": [s.caption() for s in samples],
                      "url": [s.json().get("url") for s in samples], "status": ["success"] * len(samples),
                      "jpg": pa.array([s.image_bytes() for s in samples], pa.binary())})
    path = folder / tar.name.replace(".tar", ".parquet")
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def embed_rates(encoder, sources: dict[str, list[str]], tmp: Path, batch_size: int, repeats: int) -> dict[str, tuple[int, float]]:
    """images and seconds of each variant over all its shards, ``repeats`` runs each, the
    order turned round every run."""
    from unicom.data.sources import open_parts
    from unicom.embed import embed_parts

    totals = {name: [0, 0.0] for name in sources}
    for repeat in range(repeats):
        for name in (VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]):
            parts = open_parts(sources[name])
            started = time.perf_counter()
            summary = embed_parts(parts, encoder, tmp / f"{name.replace(' ', '_')}_{repeat}", batch_size=batch_size,
                                  num_workers=0)
            totals[name][1] += time.perf_counter() - started
            totals[name][0] += summary.samples
    return {k: (int(v[0]), float(v[1])) for k, v in totals.items()}


def identical(tmp: Path) -> bool:
    """Whether every variant's first run wrote the same embeddings as the local tars'."""
    reference = sorted((tmp / "tar_local_0").rglob("img_emb_*.npy"))
    return bool(reference) and all(
        np.array_equal(np.load(path), np.load(tmp / f"{name.replace(' ', '_')}_0" / path.relative_to(tmp / "tar_local_0")))
        for name in VARIANTS[1:] for path in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="JPEGs over all shards (default 4000)")
    parser.add_argument("--shards", type=int, default=2, help="shards (default 2: 2,000 rows each, 20 row groups)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--row-group", type=int, default=100, help="rows per parquet row group (default 100, img2dataset's)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every HTTP request (default 0.05)")
    parser.add_argument("--bandwidth", type=float, default=20e6, help="bytes/s of every HTTP response (default 20e6)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating (default 2)")
    parser.add_argument("--write", action="store_true", help=f"write the report to {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()

    os.environ.setdefault("UNICOM_PROGRESS", "0")
    import timm

    from embed_pipeline import write_shards
    from storage_servers import FileServer
    from unicom.models.encoders import load_encoder

    load = os.getloadavg()[0]
    lines = [f"# benchmarks/{Path(__file__).name}", "",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads); load average {load:.2f} at the start"]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "shards").mkdir()
        tars = write_shards(tmp / "shards", args.images, args.shards, args.size)
        parquets = [as_parquet(tar, tmp / "shards", args.row_group) for tar in tars]
        torch.manual_seed(0)
        weights = tmp / "test_vit.pth"
        torch.save(timm.create_model("test_vit").state_dict(), weights)
        encoder = load_encoder("timm/test_vit", str(weights), "cpu")
        with FileServer(tmp / "shards", latency=args.latency, bandwidth=args.bandwidth) as http:
            sources = {"tar local": [str(p) for p in tars], "parquet local": [str(p) for p in parquets],
                       "tar http": [f"{http.url}/{p.name}" for p in tars],
                       "parquet http": [f"{http.url}/{p.name}" for p in parquets]}
            rates = embed_rates(encoder, sources, tmp, args.batch_size, args.repeats)
            requests = len([line for line in http.state.asked if ".parquet" in line]) // args.repeats
        tar_bytes, parquet_bytes = sum(p.stat().st_size for p in tars), sum(p.stat().st_size for p in parquets)
        lines += ["", f"{args.images} JPEG {args.size}x{args.size} in {args.shards} shards: tars {tar_bytes / 1e6:.1f} MB, "
                      f"parquet {parquet_bytes / 1e6:.1f} MB (row groups of {args.row_group}); timm test_vit, batch "
                      f"{args.batch_size}, 0 decoding workers (the choice on 2 CPUs); HTTP server on 127.0.0.1 adding "
                      f"{args.latency * 1000:.0f} ms to every request, each response capped at {args.bandwidth / 1e6:.0f} MB/s; "
                      f"{args.repeats} runs each", "images/s (total images / total seconds):"]
        rate = {name: images / seconds for name, (images, seconds) in rates.items()}
        for where in ("local", "http"):
            ratio = rate[f"parquet {where}"] / rate[f"tar {where}"]
            lines.append(f"  {where:<6} tar {rate[f'tar {where}']:8.2f}   parquet {rate[f'parquet {where}']:8.2f}   "
                         f"parquet / tar {ratio:.3f}x")
        lines += [f"HTTP requests of the parquet shards per run: {requests} ({args.shards} shards)",
                  f"identical embeddings in every variant: {identical(tmp)}", "target: parquet >= 0.9x tar"]
    print("\n".join(lines))
    if args.write:
        RESULT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
