"""Latency and throughput of text and image queries against a real ``unicom serve`` on 127.0.0.1.

Run (a few minutes on 2 cores)::

    flock /tmp/unicom-heavy.lock python benchmarks/serve_latency.py

Writes ``benchmarks/results/serve_latency.txt``. The model is an open_clip CLIP
(``--arch``, default ViT-B-32) with random weights saved to a model folder (``local-dir:``),
as no weights can be downloaded here: the work per query is the real model's. The
collection is 64 generated images embedded by ``unicom embed``'s library call plus
``--rows`` synthetic unit vectors in further parts, indexed exactly (``flat``).

For each kind of query (a text; a 640x480 JPEG upload) it measures, at concurrency 1 and
16, the latency of every request (p50, p99) and the throughput over the run. Side by side,
in the same run, the same query answered in-process (``embed_texts``/``embed_images`` and
``Index.search``, one at a time) gives the service's overhead at concurrency 1. The number
of requests and the time of each run are bounded. The in-process queries run in a worker
thread, as the server's batches do (on a loaded machine, torch's threads in the main
thread wait much longer for each other).

Then how long the server's event loop keeps others waiting while large uploads arrive:
``/healthz`` (answered by the loop alone) polled from a process of its own, idle and while
four clients each send six uploads of a 10 MB noise PNG, as multipart forms to ``/search``
and as base64 JSON (13 MB) to ``/knn-service``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TEXTS = ["a red car parked on a street", "a dog running on the beach", "a bowl of fruit on a table",
         "a mountain lake at sunrise", "two people riding bicycles", "a cat sleeping on a sofa"]


def build(root: Path, arch: str, rows: int) -> tuple[str, Path]:
    """The model folder and the index; returns (spec, index folder)."""
    import json

    import open_clip
    import pyarrow as pa
    import torch
    from PIL import Image

    from unicom.embed import embed_to_folder
    from unicom.formats.embeddings import write_part
    from unicom.search.index import Index

    model_dir = root / "model"
    if not (model_dir / "open_clip_pytorch_model.bin").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": {}}
        (model_dir / "open_clip_config.json").write_text(json.dumps(config))
        torch.manual_seed(0)
        torch.save(open_clip.create_model(arch).state_dict(), model_dir / "open_clip_pytorch_model.bin")
    spec = f"local-dir:{model_dir}"
    images = root / "images"
    if not images.exists():
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(64):
            pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{i:03d}.jpg", quality=90)
    emb = root / "emb"
    if not (emb / "metadata").exists():
        embed_to_folder([str(images)], emb, spec, rows_per_part=64, num_workers=0, dtype="float16")
        dims = np.load(emb / "img_emb" / "img_emb_0.npy").shape[1]
        rng = np.random.default_rng(1)
        per_part = 50_000
        for number, start in enumerate(range(0, rows, per_part), start=1):
            block = rng.standard_normal((min(per_part, rows - start), dims)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            keys = [f"synthetic_{start + i}" for i in range(len(block))]
            write_part(emb, number, image=block.astype(np.float16), metadata=pa.table({"key": keys}))
    index_dir = root / "index"
    if not (index_dir / "index.json").exists():
        Index.build(emb, index_dir, index_type="flat")
    return spec, index_dir


def percentiles(latencies: list[float]) -> tuple[float, float]:
    values = np.asarray(latencies) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


async def load(url: str, request, total: int, concurrency: int, limit_s: float) -> tuple[list[float], float, int]:
    """``total`` requests, ``concurrency`` at a time, stopping after ``limit_s``: (latencies, seconds, failures)."""
    import httpx

    latencies: list[float] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + limit_s

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(number: int) -> None:
            nonlocal failures
            async with gate:
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                response = await request(client, number)
                latencies.append(time.perf_counter() - start)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        return latencies, time.perf_counter() - start, failures


def poll_health(url: str, started, stop, results) -> None:
    """In a process of its own (the uploading client's work does not delay it): GET ``/healthz``
    every 5 ms until ``stop`` is set (``started`` is set after the first); puts the latencies
    (s) on ``results``."""
    import httpx

    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/healthz").raise_for_status()
        started.set()
        while not stop.is_set():
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.005)
    results.put(latencies)


def loop_waits(url: str, uploads: dict, limit_s: float) -> list[str]:
    """Rows of /healthz latency (p50, p99, max ms), idle and while each kind of upload in
    ``uploads`` (name -> (path, body, content type)) arrives, 4 clients x 6 uploads."""
    import multiprocessing

    import httpx

    async def send(path: str, body: bytes, content_type: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=limit_s) as client:
            async def client_uploads() -> int:
                failed = 0
                for _ in range(6):
                    response = await client.post(path, content=body, headers={"content-type": content_type})
                    failed += response.status_code != 200
                return failed

            return sum(await asyncio.wait_for(asyncio.gather(*(client_uploads() for _ in range(4))), limit_s))

    context = multiprocessing.get_context("spawn")
    header = f"{'while':<34} {'polls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'uploads s':>9} {'errors':>6}"
    rows = [header, "-" * len(header)]
    for name, upload in {"idle": None, **uploads}.items():
        results, started, stop = context.Queue(), context.Event(), context.Event()
        poller = context.Process(target=poll_health, args=(url, started, stop, results))
        poller.start()
        if not started.wait(60):
            raise SystemExit("the /healthz poller did not start")
        start = time.perf_counter()
        failed = asyncio.run(send(*upload)) if upload is not None else time.sleep(3) or 0
        seconds = time.perf_counter() - start
        stop.set()
        latencies = np.asarray(results.get(timeout=60)) * 1000
        poller.join(timeout=30)
        rows.append(f"{name:<34} {len(latencies):>6} {np.percentile(latencies, 50):>8.1f} "
                    f"{np.percentile(latencies, 99):>8.1f} {latencies.max():>8.1f} "
                    f"{f'{seconds:.1f}' if upload is not None else '-':>9} {failed:>6}")
        print(rows[-1], flush=True)
    return rows


def noise_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (default: ViT-B-32)")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic rows besides the 64 images (default: 100,000)")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "unicom-bench-serve"))
    parser.add_argument("--requests", type=int, default=40, help="requests per run at concurrency 1 (16 × that at 16)")
    parser.add_argument("--limit-s", type=float, default=120.0, help="longest run (default: 120 s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_latency.txt"))
    args = parser.parse_args()

    import httpx
    import torch

    from unicom.embed import embed_images, embed_texts
    from unicom.models.encoders import load_encoder
    from unicom.search.index import Index

    root = Path(args.data) / args.arch
    spec, index_dir = build(root, args.arch, args.rows)
    index = Index.load(index_dir)
    upload = (root / "images" / "007.jpg").read_bytes()
    lines = [
        f"unicom serve: text and image queries, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the start (other jobs on the "
        "machine slow both sides)",
        f"model: open_clip {args.arch} (random weights, saved); index: flat, {len(index):,} x {index.dims}",
        "",
    ]

    # in-process, one query at a time: the model and the index alone
    encoder = load_encoder(spec)
    from PIL import Image

    image = Image.open(io.BytesIO(upload)).convert("RGB")
    direct = {}
    worker = ThreadPoolExecutor(max_workers=1)  # where the server runs its batches: a thread of its own

    def one_query(embed, i: int) -> float:
        start = time.perf_counter()
        index.search(embed(i), 10)
        return time.perf_counter() - start

    for kind, embed in (("text", lambda i: embed_texts(encoder, [TEXTS[i % len(TEXTS)]])),
                        ("image", lambda i: embed_images(encoder, [image], num_workers=0))):
        worker.submit(one_query, embed, 0).result()  # warm-up
        times = [worker.submit(one_query, embed, i).result() for i in range(min(args.requests, 20))]
        direct[kind] = percentiles(times)[0]
    worker.shutdown()
    del encoder

    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "unicom", "serve", "--index", str(index_dir), "--port", str(port),
                               "--max-upload-mb", "12"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"unicom serve did not start:\n{server.stderr.read()}")
                time.sleep(0.5)

        def text_query(client, number):
            return client.post("/search", json={"text": TEXTS[number % len(TEXTS)], "k": 10})

        def image_query(client, number):
            return client.post("/search", files={"image": ("q.jpg", upload, "image/jpeg")}, data={"k": "10"})

        header = f"{'query':<6} {'concurrency':>11} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'queries/s':>9} {'errors':>6}"
        lines += [header, "-" * len(header)]
        measured = {}
        for kind, request in (("text", text_query), ("image", image_query)):
            asyncio.run(load(url, request, 4, 4, 60))  # warm-up
            for concurrency in (1, 16):
                total = args.requests * (16 if concurrency > 1 else 1)
                latencies, seconds, failures = asyncio.run(load(url, request, total, concurrency, args.limit_s))
                p50, p99 = percentiles(latencies)
                measured[kind, concurrency] = (p50, len(latencies) / seconds)
                lines.append(f"{kind:<6} {concurrency:>11} {len(latencies):>8} {p50:>8.1f} {p99:>8.1f} "
                             f"{len(latencies) / seconds:>9.1f} {failures:>6}")
                print(lines[-1], flush=True)

        big = noise_png(1800, 1900)  # 9.8 MB
        form = httpx.Request("POST", url, files={"image": ("big.png", big, "image/png")}, data={"k": "3"})
        knn = httpx.Request("POST", url, json={"image": base64.b64encode(big).decode(), "modality": "image",
                                               "num_images": 3})
        lines += ["", f"the event loop while large uploads arrive: /healthz polled every 5 ms from another process; "
                      f"4 clients x 6 uploads of a {len(big) / 1e6:.1f} MB noise PNG"]
        lines += loop_waits(url, {
            f"multipart /search {len(form.read()) / 1e6:.1f} MB": ("/search", form.read(), form.headers["content-type"]),
            f"base64 JSON /knn-service {len(knn.read()) / 1e6:.1f} MB": ("/knn-service", knn.read(), "application/json"),
        }, args.limit_s)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines += ["", "side by side, one query at a time (p50 ms):"]
    for kind in ("text", "image"):
        served = measured[kind, 1][0]
        lines.append(f"  {kind}: in-process model + index {direct[kind]:.1f}, through unicom serve {served:.1f} "
                     f"({served / direct[kind]:.2f}x); throughput at concurrency 16 is "
                     f"{measured[kind, 16][1] / measured[kind, 1][1]:.2f}x that at 1")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
