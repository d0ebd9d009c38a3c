"""Copying the images of a subset (``unicom search --copy-images``, ``unicom.search.subset.copy_images``),
side by side with what a user would do without it, in one run:

* an image folder, every item: ``copy_images`` against a loop of ``shutil.copy`` over the
  metadata's paths (what clip-retrieval's ``filter`` runs); and with ``--with-metadata``
  (each image's caption and metadata row written beside it) against that loop writing the
  two files too;
* local webdataset tars, every item: against ``tarfile`` extracting every member of every
  shard (one pass over each, the least reading there is);
* tars behind an HTTP server on 127.0.0.1 that adds ``--latency`` (50 ms) to each request and
  caps each response at ``--bandwidth`` (20 MB/s), a share of the items spread over the
  shards: against downloading each shard that holds one and extracting the wanted members.

Each copy is checked byte for byte against the reference's files. The machine may be shared:
the two sides alternate, and the figures are the best of ``--repeat`` runs.

    python benchmarks/copy_images.py --write
    python benchmarks/copy_images.py --images 2000 --shards 4   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "copy_images.txt"
sys.path.insert(0, str(ROOT / "tests"))


def pictures(count: int, size: int, seed: int) -> list[bytes]:
    """JPEGs of smooth colour with noise (about 9 KB at 128 px, as photos of that size are)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    out = []
    for _ in range(count):
        colour = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        pixels = colour[0] * ramp[:, None, None] + colour[1] * ramp[None, :, None] / 2
        pixels += rng.normal(0, 12, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def collection(root: Path, name: str, metadata) -> object:
    """An exact index over random embeddings with ``metadata``."""
    import pyarrow as pa

    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    rows = len(next(iter(metadata.values())))
    x = np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32)
    write_part(root / f"{name}_emb", 0, image=x / np.linalg.norm(x, axis=1, keepdims=True), metadata=pa.table(metadata))
    return Index.build(root / f"{name}_emb", root / f"{name}_index", index_type="flat")


def digests(folder: Path) -> dict[str, str]:
    """name -> sha1 of each file of a folder."""
    return {name: hashlib.sha1((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def side_by_side(title: str, args, ours, name: str, other, ours_out: Path, other_out: Path) -> list[str]:
    """Lines comparing ``copy_images`` (``ours``) with ``other`` over every image, the two run in
    turn ``args.repeat`` times (best of each), and whether their folders hold the same files."""
    times = {"ours": [], "other": []}
    for _ in range(args.repeat):
        times["ours"].append(timed(ours))
        times["other"].append(timed(other))
    best, theirs = min(times["ours"]), min(times["other"])
    same = digests(ours_out) == digests(other_out)
    return ["", f"## {title}",
            f"  {'copy_images':<17} {args.images / best:9,.0f} images/s",
            f"  {name:<17} {args.images / theirs:9,.0f} images/s   ratio {theirs / best:.2f}x   identical files: {same}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.1], help="shares of the items copied over HTTP")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the HTTP server adds to every request")
    parser.add_argument("--bandwidth", type=float, default=20e6, help="bytes per second per HTTP response")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")

    from storage_servers import FileServer
    from support import write_tar_shard

    from unicom.search import subset
    from unicom.search.item_images import ItemImages

    lines = ["# benchmarks/copy_images.py", "",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {subset.COPY_THREADS} copying threads; "
             f"best of {args.repeat} runs each; ratio: the other way's time over copy_images' (above 1: "
             "copy_images is the faster)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = pictures(args.images, args.size, seed=1)
        keys = [f"{i:09d}" for i in range(args.images)]
        (tmp / "images").mkdir()
        for key, image in zip(keys, data):
            (tmp / "images" / f"{key}.jpg").write_bytes(image)
        per_shard = -(-args.images // args.shards)
        shard_names = [f"{number:05d}.tar" for number in range(args.shards)]
        for number, name in enumerate(shard_names):
            part = range(number * per_shard, min(args.images, (number + 1) * per_shard))
            write_tar_shard(tmp / "shards" / name, [{"key": keys[i], "jpg": data[i]} for i in part])
        shard_of = [shard_names[i // per_shard] for i in range(args.images)]
        total_mb = sum(map(len, data)) / 1e6
        lines.append(f"{args.images:,} JPEGs of {args.size}x{args.size} ({total_mb:.1f} MB, "
                     f"{total_mb * 1e3 / args.images:.1f} KB each), as files and in {args.shards} tars")

        folder_index = collection(tmp, "folder", {"key": keys, "image_path": [str(tmp / "images" / f"{k}.jpg") for k in keys],
                                                  "caption": [f"a picture of colour {i % 97}" for i in range(args.images)]})
        shard_index = collection(tmp, "shard", {"key": keys, "shard": shard_of})
        every = np.arange(args.images, dtype=np.int64)

        # an image folder, every item
        def ours_folder():
            subset.copy_images(folder_index, every, fresh(tmp / "out_ours"), ItemImages(None, None, 0))

        def loop_folder():
            out = fresh(tmp / "out_loop")
            for row in folder_index.metadata_table(every).to_pylist():
                shutil.copy(row["image_path"], out)

        lines += side_by_side("an image folder, every item", args, ours_folder, "shutil.copy loop", loop_folder,
                              tmp / "out_ours", tmp / "out_loop")

        # the same, each image with its caption and metadata row beside it
        def ours_metadata():
            subset.copy_images(folder_index, every, fresh(tmp / "out_ours"), ItemImages(None, None, 0), with_metadata=True)

        def loop_metadata():
            out = fresh(tmp / "out_loop")
            for row in folder_index.metadata_table(every).to_pylist():
                shutil.copy(row["image_path"], out)
                (out / f"{row['key']}.txt").write_text(row["caption"], encoding="utf-8")
                (out / f"{row['key']}.json").write_text(json.dumps(row), encoding="utf-8")

        lines += side_by_side("an image folder, every item, with its caption and metadata (--with-metadata)", args,
                              ours_metadata, "loop, 3 files", loop_metadata, tmp / "out_ours", tmp / "out_loop")

        # local tars, every item
        def ours_tars():
            subset.copy_images(shard_index, every, fresh(tmp / "out_ours"), ItemImages(None, tmp / "shards", 0))

        def extract_tars():
            out = fresh(tmp / "out_tar")
            for name in shard_names:
                with tarfile.open(tmp / "shards" / name) as tar:
                    for member in tar:
                        (out / member.name).write_bytes(tar.extractfile(member).read())

        lines += side_by_side("local webdataset tars, every item", args, ours_tars, "tarfile, all", extract_tars,
                              tmp / "out_ours", tmp / "out_tar")

        # tars over HTTP, a share of the items
        lines += ["", f"## tars over HTTP (127.0.0.1, +{args.latency * 1e3:.0f} ms a request, "
                      f"{args.bandwidth / 1e6:.0f} MB/s a response), a share of the items spread over the shards"]
        with FileServer(tmp / "shards", latency=args.latency, bandwidth=args.bandwidth) as http:
            import urllib.request

            for share in args.shares:
                chosen = np.sort(np.random.default_rng(2).choice(args.images, int(args.images * share), replace=False))
                wanted = set(chosen.tolist())

                def ours_http():
                    images = ItemImages(None, http.url, 0)  # a new one: its listings are not kept between runs
                    subset.copy_images(shard_index, chosen, fresh(tmp / "out_ours"), images)

                def download_http():
                    out = fresh(tmp / "out_dl")
                    for name in sorted({shard_of[i] for i in wanted}):
                        with urllib.request.urlopen(f"{http.url}/{name}") as response:
                            whole = response.read()
                        with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
                            for member in tar:
                                if int(member.name.split(".")[0]) in wanted:
                                    (out / member.name).write_bytes(tar.extractfile(member).read())

                times = {"ours": [], "download": []}
                for _ in range(args.repeat):
                    times["ours"].append(timed(ours_http))
                    times["download"].append(timed(download_http))
                ours, download = min(times["ours"]), min(times["download"])
                same = digests(tmp / "out_ours") == digests(tmp / "out_dl")
                lines += [f"  {len(chosen):,} items ({share:.0%}) of {len({shard_of[i] for i in wanted})} shards:",
                          f"    copy_images                 {ours:7.2f} s  {len(chosen) / ours:8,.0f} images/s",
                          f"    download shards + tarfile   {download:7.2f} s  {len(chosen) / download:8,.0f} images/s   "
                          f"ratio {download / ours:.2f}x   identical files: {same}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
