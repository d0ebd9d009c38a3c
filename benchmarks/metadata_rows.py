"""Metadata lookups of an index whose metadata came from clip-retrieval: a million rows per row group.

clip-retrieval (and pandas' ``to_parquet``) writes each metadata file as one row group of
up to 1,048,576 rows. A search answers k ids spread over the files; reading a row means
decoding its whole row group. Side by side on the same files, through
``unicom.search.metadata_rows.MetadataRows`` (what ``Index.metadata``, ``unicom search`` and
``unicom serve`` use), with its default 256 MiB cache of decoded row groups:

* as they are (``copies=None``): every lookup decodes the million-row groups it touches;
* with copies (``copies=FOLDER``, what ``Index`` does): the first lookup of a file copies it
  once into row groups of 16,384 rows, later lookups decode only those.

The files hold LAION-like columns (url, caption, key, sizes, scores; ~110 bytes of text a
row). Run ``python benchmarks/metadata_rows.py``; it writes
``benchmarks/results/metadata_rows.txt``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = Path(__file__).parent / "results" / "metadata_rows.txt"
WORDS = ("a", "photo", "of", "the", "red", "car", "dog", "on", "beach", "at", "sunset", "vintage", "poster", "with",
         "white", "background", "wooden", "table", "mountain", "lake", "city", "street", "night", "portrait")


def write_files(folder: Path, files: int, rows: int, seed: int) -> list[Path]:
    """``files`` parquet files of ``rows`` rows each, written with pyarrow's default row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    paths = []
    for number in range(files):
        first = number * rows
        ids = np.arange(first, first + rows)
        words = np.asarray(WORDS)[rng.integers(0, len(WORDS), (rows, 10))]
        table = pa.table({
            "url": [f"https://images.example.com/{i % 9973:04d}/{i:010d}-{h:08x}.jpg" for i, h in
                    zip(ids.tolist(), rng.integers(0, 2**32, rows).tolist())],
            "caption": [" ".join(row) for row in words.tolist()],
            "key": [f"{i:09d}" for i in ids.tolist()],
            "width": rng.integers(64, 4096, rows),
            "height": rng.integers(64, 4096, rows),
            "similarity": rng.random(rows, dtype=np.float32),
            "punsafe": rng.random(rows, dtype=np.float32),
            "pwatermark": rng.random(rows, dtype=np.float32),
        })
        path = folder / f"metadata_{number}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def lookups(rows, searches: np.ndarray, per_file: int) -> list[float]:
    """Seconds of each search: its ids' rows, grouped by file as ``Index.metadata`` asks for them."""
    seconds = []
    for ids in searches:
        start = time.perf_counter()
        files, within = np.divmod(ids, per_file)
        for file in np.unique(files):
            rows.take(int(file), within[files == file])
        seconds.append(time.perf_counter() - start)
    return seconds


def describe(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return f"p50 {statistics.median(ms):9.1f} ms   p90 {p90:9.1f} ms   max {ms[-1]:9.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per file (one row group each)")
    parser.add_argument("--searches", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from unicom.search.metadata_rows import ROW_GROUP_ROWS, MetadataRows

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        paths = write_files(folder, args.files, args.rows, seed=0)
        written = time.perf_counter() - start
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        groups = {pq.ParquetFile(p).metadata.num_row_groups for p in paths}
        rng = np.random.default_rng(1)
        searches = rng.integers(0, args.files * args.rows, size=(args.searches, args.k))
        files = [(p, args.rows) for p in paths]

        as_is = MetadataRows(files)
        plain = lookups(as_is, searches, args.rows)
        plain_peak = as_is.cached_bytes

        copied = MetadataRows(files, copies=folder / "copies")
        first_touch = lookups(copied, searches[:1], args.rows)  # copies the files this search touches
        copy_start = time.perf_counter()
        for file in range(args.files):  # the rest of the files, so that the timed searches find every copy
            copied.read_from(file)
        copy_seconds = first_touch[0] + time.perf_counter() - copy_start
        fast = lookups(copied, searches, args.rows)
        same = all(as_is.take(int(f), [r]) == copied.take(int(f), [r])
                   for f, r in zip(*np.divmod(searches.reshape(-1), args.rows)))
        copies_mb = sum(p.stat().st_size for p in (folder / "copies").glob("*.parquet")) / 2**20

    ratio = statistics.median(plain) / statistics.median(fast)
    lines = [
        f"metadata lookups: {args.files} parquet files x {args.rows:,} rows ({megabytes:.0f} MiB, row groups per file: "
        f"{sorted(groups)}), {args.searches} searches of k = {args.k} random ids",
        f"machine: {platform.machine()}, python {platform.python_version()}; files written in {written:.1f} s",
        "",
        f"{'as they are (one row group per file)':<40}{describe(plain)}",
        f"{f'with copies in row groups of {ROW_GROUP_ROWS:,}':<40}{describe(fast)}",
        "",
        f"copying every file once: {copy_seconds:.1f} s ({copy_seconds / args.files:.2f} s per file of {args.rows:,} "
        f"rows), {copies_mb:.0f} MiB of copies",
        f"decoded row groups held: {plain_peak / 2**20:.0f} MiB as they are, {copied.cached_bytes / 2**20:.0f} MiB with "
        "copies (cache limit 256 MiB)",
        f"same rows both ways: {same}",
        f"median search: {ratio:.1f}x faster with copies",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
