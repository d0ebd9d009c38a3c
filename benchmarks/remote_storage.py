"""Remote storage against local disk, side by side in one run.

* ``unicom embed`` (``embed_parts``, what the command runs once the model is built, with
  the decoding in the main process: the choice on 2 CPUs) on webdataset shards read from local disk, and from an HTTP server on 127.0.0.1 that adds
  ``--latency`` (50 ms) to every request and caps every response at ``--bandwidth``
  (20 MB/s). Two models: a random-weight open_clip ViT-B-32 (the extraction setting of
  ``embed_pipeline.py``) and timm's tiny ``test_vit``, where decoding and reading dominate
  and the link has the least compute to hide behind. Target: remote >= 0.9x local.
* ``unicom cluster`` (``cluster``: check, sample, k-means, assign, summarise) on an
  embedding folder in moto's S3 server on 127.0.0.1, writing its output there, against
  the same folder and output on local disk.

The machine may be shared, so its speed drifts: the variants alternate run by run, and
rates are totals over totals.

    python benchmarks/remote_storage.py --write
    python benchmarks/remote_storage.py --images 120 --shards 2 --rows 20000   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "remote_storage.txt"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def embed_rates(encoder, name: str, local_shards: list[Path], url: str, tmp: Path, batch_size: int,
                repeats: int) -> dict[str, tuple[int, float]]:
    """images and seconds of each variant over all shards, ``repeats`` runs each, alternating."""
    from unicom.data.sources import open_parts
    from unicom.embed import embed_parts

    totals = {"local": [0, 0.0], "http": [0, 0.0]}
    for repeat in range(repeats):
        for variant in (("local", "http") if repeat % 2 == 0 else ("http", "local")):
            sources = [str(s) for s in local_shards] if variant == "local" else [f"{url}/{s.name}" for s in local_shards]
            parts = open_parts(sources)
            out = tmp / f"{variant}_{name}_{repeat}"
            started = time.perf_counter()
            summary = embed_parts(parts, encoder, out, batch_size=batch_size, num_workers=0)
            totals[variant][1] += time.perf_counter() - started
            totals[variant][0] += summary.samples
    return {k: (int(v[0]), float(v[1])) for k, v in totals.items()}


def same_outputs(tmp: Path, name: str) -> bool:
    local = sorted((tmp / f"local_{name}_0").rglob("*.npy"))
    remote = sorted((tmp / f"http_{name}_0").rglob("*.npy"))
    return bool(local) and [p.read_bytes() for p in local] == [p.read_bytes() for p in remote]


def cluster_times(s3, local_emb: Path, remote_emb: str, tmp: Path, k: int, repeats: int) -> dict[str, float]:
    from unicom.cluster import ClusterInputs, KMeansSettings, cluster
    from unicom.formats.embeddings import EmbeddingFolders

    settings = KMeansSettings(k=k, points_per_centroid=64, iterations=10)
    seconds = {"local": 0.0, "s3": 0.0}
    for repeat in range(repeats):
        for variant in (("local", "s3") if repeat % 2 == 0 else ("s3", "local")):
            emb, out = (str(local_emb), tmp / f"clusters_{repeat}") if variant == "local" else (remote_emb, f"s3://bench/clusters_{repeat}")
            started = time.perf_counter()
            inputs = ClusterInputs(EmbeddingFolders.from_root(emb), fusion="image")
            cluster(inputs, out, settings, plot=False)
            seconds[variant] += time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480, help="JPEGs over all shards (default 480)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every HTTP request (default 0.05)")
    parser.add_argument("--bandwidth", type=float, default=20e6, help="bytes/s of every HTTP response (default 20e6)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=400_000, help="embedding rows to cluster (default 400000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating (default 2)")
    parser.add_argument("--write", action="store_true", help=f"write the report to {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()

    os.environ.setdefault("UNICOM_PROGRESS", "0")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import open_clip
    import pyarrow as pa

    from embed_pipeline import write_shards
    from storage_servers import S3, FileServer
    from unicom.formats.embeddings import write_part
    from unicom.models.encoders import load_encoder

    lines = [f"# benchmarks/{Path(__file__).name}", "",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
             "other jobs were running on it"]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "shards").mkdir()
        shards = write_shards(tmp / "shards", args.images, args.shards, args.size)
        shard_bytes = sum(p.stat().st_size for p in shards)
        torch.manual_seed(0)
        checkpoint = tmp / "vit-b-32.pt"
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
        import timm

        tiny = tmp / "test_vit.pth"
        torch.save(timm.create_model("test_vit").state_dict(), tiny)
        encoders = {"ViT-B-32": load_encoder("ViT-B-32", str(checkpoint), "cpu"),
                    "timm test_vit": load_encoder("timm/test_vit", str(tiny), "cpu")}

        lines += ["", "## embed: shards over HTTP vs local disk",
                  f"{args.images} JPEG {args.size}x{args.size} in {args.shards} shards ({shard_bytes / 1e6:.1f} MB), batch "
                  f"{args.batch_size}, 0 decoding workers (the choice on 2 CPUs); HTTP server on 127.0.0.1 adding "
                  f"{args.latency * 1000:.0f} ms to every request, each response capped at {args.bandwidth / 1e6:.0f} MB/s"]
        with FileServer(tmp / "shards", latency=args.latency, bandwidth=args.bandwidth) as http:
            for name, encoder in encoders.items():
                tag = name.replace(" ", "_")
                rates = embed_rates(encoder, tag, shards, http.url, tmp, args.batch_size, args.repeats)
                local = rates["local"][0] / rates["local"][1]
                remote = rates["http"][0] / rates["http"][1]
                same = same_outputs(tmp, tag)
                lines.append(f"  {name:<14} local {local:8.2f} images/s   http {remote:8.2f} images/s   "
                             f"ratio {remote / local:.3f}x   identical embeddings: {same}")
                print(lines[-1], flush=True)
        lines.append("target: http >= 0.9x local")

        s3 = S3(process=True)
        os.environ.update(s3.env)
        s3.bucket("bench")
        rng = np.random.default_rng(0)
        parts = 4
        rows = args.rows // parts
        for number in range(parts):
            image = rng.standard_normal((rows, args.dim)).astype(np.float16)
            write_part(tmp / "emb", number, image=image, metadata=pa.table({"key": [f"{number}-{i}" for i in range(rows)]}))
        size = sum(p.stat().st_size for p in (tmp / "emb").rglob("*") if p.is_file())
        remote_emb = s3.upload_folder(tmp / "emb", "bench", "emb")
        seconds = cluster_times(s3, tmp / "emb", remote_emb, tmp, args.k, args.repeats)
        same = all(s3.get("bench", f"clusters_0/{name}") == (tmp / "clusters_0" / name).read_bytes()
                   for name in ("centroids.npy", "labels/labels_0.parquet", "labels/labels_3.parquet"))
        s3.stop()
        lines += ["", "## cluster: an embedding folder in S3 vs local disk",
                  f"{parts * rows:,} x {args.dim} float16 in {parts} parts ({size / 1e6:.0f} MB), k = {args.k}, 64 points per "
                  f"centroid, 10 iterations, fusion image; input and output folder in moto's S3 server on 127.0.0.1 "
                  f"(its own process) vs local disk; {args.repeats} runs each",
                  f"  local {seconds['local'] / args.repeats:7.2f} s per run   s3 {seconds['s3'] / args.repeats:7.2f} s per run   "
                  f"ratio (local time / s3 time) {seconds['local'] / seconds['s3']:.3f}x   identical centroids and labels: {same}"]
        print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        RESULT.write_text(report)


if __name__ == "__main__":
    main()
