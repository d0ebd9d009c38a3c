"""The first query of an index in S3: its metadata read in place against the whole folder copied first.

An index folder given as a URL (``unicom search``, ``unicom serve``, ``Index.load``) is
served from a local cache. Side by side, on the same folder in moto's S3 server on 127.0.0.1
(its own process), from an empty cache each time:

* whole folder: every file copied into the cache (``storage.cached_copy`` of the faiss file
  and every metadata file, what ``Index.load`` did before it read metadata in place), then
  the local copy loaded;
* in place: ``Index.load(url)``, which copies the faiss file and reads the metadata in place
  (a footer and the row groups a search touches; clip-retrieval's files in one row group
  are copied once, straight into small row groups).

Two layouts of the same collection: unicom's (metadata in row groups of 16,384 rows) and
clip-retrieval's (each file one row group, as clip-retrieval writes it). The time is from
the load to the metadata of the first search's k = 10 results; "local disk" is the cache
after it. The files hold LAION-like columns (``benchmarks/metadata_rows.py``). Run
``python benchmarks/remote_index.py``; it writes ``benchmarks/results/remote_index.txt``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "remote_index.txt"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def write_folders(tmp: Path, parts: int, rows: int, dims: int) -> dict[str, Path]:
    """An embedding folder of ``parts`` parts, its flat index in unicom's layout, and the same
    index in clip-retrieval's layout (``image.index``, metadata files of one row group)."""
    import pyarrow.parquet as pq
    from metadata_rows import write_files

    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    rng = np.random.default_rng(0)
    (tmp / "laion").mkdir()
    for number, metadata in enumerate(write_files(tmp / "laion", parts, rows, seed=0)):
        vectors = rng.standard_normal((rows, dims)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_part(tmp / "emb", number, image=vectors, metadata=pq.read_table(metadata))
    index = Index.build(tmp / "emb", tmp / "unicom", index_type="flat")
    clip = tmp / "clip"
    (clip / "metadata").mkdir(parents=True)
    shutil.copy(tmp / "unicom" / index.config["file"], clip / "image.index")
    for number in range(parts):
        table = pq.read_table(tmp / "unicom" / "metadata" / f"metadata_{number}.parquet").drop(["id"])
        pq.write_table(table, clip / "metadata" / f"metadata_{number}.parquet", row_group_size=rows)
    return {"unicom": tmp / "unicom", "clip-retrieval": clip}


def first_query(url: str, cache: Path, whole_folder: bool, query: np.ndarray) -> tuple[float, int]:
    """Seconds from loading the index at ``url`` to its first search's metadata, and the bytes
    in the cache after it."""
    from unicom import storage
    from unicom.search.index import Index

    shutil.rmtree(cache, ignore_errors=True)
    os.environ["UNICOM_CACHE"] = str(cache)
    started = time.perf_counter()
    if whole_folder:
        names = [name for name in storage.list_files(url)] + [
            f"metadata/{name}" for name in storage.list_files(storage.join(url, "metadata"))]
        index = Index.load(storage.cached_copy(url, names))
    else:
        index = Index.load(url)
    _, ids = index.search(query, 10)
    rows = index.metadata(ids)
    seconds = time.perf_counter() - started
    assert all(row is not None for row in rows[0])
    return seconds, sum(path.stat().st_size for path in cache.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--rows", type=int, default=250_000, help="rows per part (one metadata file each)")
    parser.add_argument("--dims", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")

    from storage_servers import S3

    s3 = S3(process=True)
    os.environ.update(s3.env)
    lines = []
    try:
        with tempfile.TemporaryDirectory(prefix="remote_index_") as scratch:
            tmp = Path(scratch)
            folders = write_folders(tmp, args.parts, args.rows, args.dims)
            metadata_bytes = sum(path.stat().st_size for path in (folders["unicom"] / "metadata").glob("*.parquet"))
            faiss_bytes = (folders["clip-retrieval"] / "image.index").stat().st_size
            s3.bucket("bench")
            urls = {layout: s3.upload_folder(folder, "bench", layout) for layout, folder in folders.items()}
            query = np.random.default_rng(1).standard_normal((1, args.dims)).astype(np.float32)
            lines += [
                f"first query of an index in S3 (moto's server on 127.0.0.1, its own process): {args.parts} parts x "
                f"{args.rows:,} rows, flat index of {args.dims} dims ({faiss_bytes / 2**20:.0f} MiB), metadata "
                f"{metadata_bytes / 2**20:.0f} MiB (LAION-like columns); empty cache each time, k = 10, "
                f"median of {args.repeats}",
                f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; other jobs "
                "may have been running on it",
                "",
            ]
            for layout, url in urls.items():
                runs = {True: [], False: []}
                for repeat in range(args.repeats):
                    for whole in ((True, False) if repeat % 2 == 0 else (False, True)):
                        runs[whole].append(first_query(url, tmp / "cache", whole, query))
                for whole, label in ((True, "whole folder copied"), (False, "metadata read in place")):
                    seconds = statistics.median(run[0] for run in runs[whole])
                    disk = max(run[1] for run in runs[whole])
                    lines.append(f"{layout:15s} {label:23s} first query {seconds:6.2f} s   local disk {disk / 2**20:6.0f} MiB")
                ratio = statistics.median(r[0] for r in runs[True]) / statistics.median(r[0] for r in runs[False])
                lines.append(f"{layout:15s} first query {ratio:.1f}x sooner with the metadata read in place")
                lines.append("")
    finally:
        s3.stop()
    text = "# benchmarks/remote_index.py\n\n" + "\n".join(lines).rstrip() + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
