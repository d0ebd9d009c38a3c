"""Extraction pipeline throughput vs. the model's forward pass alone (and clip-retrieval), in one run.

Writes N JPEG images (default 2,000 of 256x256) into webdataset shards (default 4) and a
random-weight open_clip ViT-B-32 checkpoint, then measures images/s of:

* forward only: the image tower + L2 normalisation on pre-decoded, pre-transformed tensors,
  in one autocast region and each batch's embeddings read back a batch or two later, as
  ``unicom embed`` runs its batches;
* unicom: ``embed_to_folder`` (what ``unicom embed`` runs), wall clock from the call to the
  last file written: reading tars, decoding, transforms, batching, the same forward, writing
  npy + parquet; with unicom's choice of decoding workers, and with one worker; on a GPU
  (or with ``--device-decode``) also with ``decode=gpu``: JPEGs decoded by nvJPEG and
  resized on the GPU, the workers only reading bytes, and with the workers decoding a share
  of the JPEGs themselves (``--workers-shares``, default 0.25 and 0.4: ``unicom embed
  --decode-workers-share``), which relieves the main process when it is the limit;
* clip-retrieval (``--clip-retrieval PATH`` to its command): ``clip-retrieval inference`` on
  the same shards and checkpoint, with one decoding worker, rate from its own stats file
  (first batch requested to last batch written; model loading and warm-up excluded, as for
  unicom).

The machine may be shared, so its speed drifts. Every variant is run on every shard, in an
order that rotates from shard to shard, and rates are total images over total seconds.

    python benchmarks/embed_pipeline.py --clip-retrieval /tmp/cr-venv/bin/clip-retrieval --write
    python benchmarks/embed_pipeline.py --images 200 --shards 2     # a quick look
    python benchmarks/embed_pipeline.py --device cuda --images 16000 --shards 16 --write   # -> embed_pipeline_cuda.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "embed_pipeline.txt"
RESULT_CUDA = ROOT / "benchmarks" / "results" / "embed_pipeline_cuda.txt"


def noise_photo(index: int, size: int) -> "Image.Image":
    """A JPEG-unfriendly image: smooth colour fields plus noise (decodes like a photo or slower)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(xx * rng.uniform(1, 9) + rng.uniform(0, 6)) for _ in range(3)], -1) * 90 + 128
    pixels = base + rng.normal(0, 18, (size, size, 3)) + (yy[..., None] * rng.uniform(-60, 60, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_shard(path: Path, first: int, count: int, size: int) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            buffer = io.BytesIO()
            noise_photo(i, size).save(buffer, format="JPEG", quality=90)
            key = f"{i:09d}"
            for ext, data in (("jpg", buffer.getvalue()), ("txt", f"photo {i}".encode()),
                              ("json", json.dumps({"url": f"https://example.org/{i}.jpg"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: int, shards: int, size: int) -> list[Path]:
    from concurrent.futures import ProcessPoolExecutor

    per_shard = -(-images // shards)
    jobs = [(folder / f"{s:05d}.tar", s * per_shard, min(per_shard, images - s * per_shard), size) for s in range(shards)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_shard, *zip(*jobs)))
    return [job[0] for job in jobs]


def predecoded_batches(encoder, shard, batch_size: int) -> list[torch.Tensor]:
    """The exact tensors the pipeline feeds the model, decoded once up front."""
    from unicom.data.loading import BatchStream, plan_units
    from unicom.data.sources import open_parts
    from unicom.data.transforms import draft_size

    stream = BatchStream(plan_units(open_parts(shard), 1), batch_size, encoder.image_transform, None,
                         draft_size(encoder.image_transform))
    return [stream.image_input.on_device(batch.images) for batch in stream if batch.images is not None]


def run_forward(encoder, batches: list[torch.Tensor], device: torch.device) -> tuple[int, float]:
    from unicom.embed import _encode_model_input, _inference
    from unicom.engine.device import HostCopies

    batches = [b.to(device) for b in batches]  # on a GPU the tensors wait in its memory
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    copies = HostCopies()  # each batch's embeddings read back as unicom embed reads them, a batch or two later
    with _inference(device, "auto"):  # as unicom embed runs its batches: the weights cast once
        for images in batches:
            copies.add(_encode_model_input(encoder, images, device, "auto"))
    copies.finish()  # every embedding on the host
    return sum(len(b) for b in batches), time.perf_counter() - start


STEADY: dict[str, list[float]] = {}  # variant -> [images, seconds, seconds waiting for input] after each run's first batch


def run_unicom(encoder, shard, out: Path, batch_size: int, workers: int | None, decode: str = "cpu",
               name: str = "", workers_share: float = 0.0) -> tuple[int, float]:
    """(images, seconds) of ``unicom embed``; the rate after its start-up (workers, first
    reads, until the first batch is through the model) is added to :data:`STEADY`."""
    from unicom.embed import embed_to_folder

    start = time.perf_counter()
    summary = embed_to_folder(shard, out, encoder, batch_size=batch_size, num_workers=workers, decode=decode,
                              decode_workers_share=workers_share)
    seconds = time.perf_counter() - start
    steady = STEADY.setdefault(name, [0, 0.0, 0.0])
    steady[0] += summary.samples + summary.failed - summary.startup_images
    steady[1] += summary.seconds - summary.startup_seconds
    steady[2] += summary.input_wait_seconds
    return summary.samples, seconds


def run_clip_retrieval(command: str, shard: list[Path], checkpoint: Path, out: Path, batch_size: int) -> tuple[int, float]:
    """``clip-retrieval inference`` on shards; its own stats give samples and seconds."""
    # a brace pattern needs two names or more: "{a.tar}" would be taken literally
    pattern = str(shard[0]) if len(shard) == 1 else f"{shard[0].parent}/{{{','.join(p.name for p in shard)}}}"
    result = subprocess.run(
        [command, "inference", "--input_dataset", pattern, "--output_folder", str(out), "--input_format", "webdataset",
         "--clip_model", f"open_clip:ViT-B-32/{checkpoint}", "--enable_text", "False", "--enable_metadata", "True",
         "--batch_size", str(batch_size), "--num_prepro_workers", "1", "--use_jit", "False"],
        capture_output=True, text=True, timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"clip-retrieval failed:\n{result.stderr[-2000:]}")
    stats = json.loads(next((out / "stats").glob("*.json")).read_text())
    return int(stats["sample_count"]), float(stats["end_time"] - stats["start_time"])


def clip_retrieval_versions(command: str) -> str:
    python = Path(command).parent / "python"
    code = "import importlib.metadata as m; print(m.version('clip-retrieval'), m.version('open_clip_torch'))"
    found = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.split()
    return f"clip-retrieval {found[0]} with open_clip_torch {found[1]}" if len(found) == 2 else "clip-retrieval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu (the committed result) or cuda")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds the shards are cut into, every variant running on each (default: one per shard on "
                        "CPU, where a run is long and the load may drift; one on GPU, where a run is short)")
    parser.add_argument("--clip-retrieval", default=None, help="path of the clip-retrieval command, to compare with it")
    parser.add_argument("--device-decode", action="store_true",
                        help="also run decode=gpu on a CPU device (the tensor path with libjpeg-turbo: a smoke test)")
    parser.add_argument("--workers-shares", type=float, nargs="*", default=[0.25, 0.4],
                        help="with decode=gpu, also these shares of the JPEGs decoded by the workers "
                             "(--decode-workers-share; default: 0.25 0.4)")
    parser.add_argument("--write", action="store_true",
                        help=f"write the report to {RESULT.relative_to(ROOT)} (cpu) or {RESULT_CUDA.relative_to(ROOT)} (cuda)")
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")

    import warnings

    import open_clip

    from unicom.embed import default_num_workers
    from unicom.models.encoders import load_encoder

    device = torch.device(args.device)
    auto_workers = default_num_workers(device)
    where = torch.cuda.get_device_name(device) + ", fp16 autocast" if device.type == "cuda" else "CPU, fp32"
    lines = [
        f"embed_pipeline: {args.images} JPEG {args.size}x{args.size} in {args.shards} shards, open_clip ViT-B-32 "
        f"image tower (random weights), batch {args.batch_size}, {where}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)",
    ]
    print(*lines, sep="\n", flush=True)
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="unicom-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        shards = write_shards(tmp / "shards", args.images, args.shards, args.size)
        torch.manual_seed(0)
        checkpoint = tmp / "vit-b-32.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
        encoder = load_encoder("ViT-B-32", str(checkpoint), device)
        variants = {
            "forward only (pre-decoded tensors)": None,
            f"unicom embed, {auto_workers} decoding workers (its choice)": auto_workers,
            "unicom embed, 1 decoding worker": 1,
        }
        if auto_workers == 1 or device.type == "cuda":
            del variants["unicom embed, 1 decoding worker"]
        if device.type == "cuda" or args.device_decode:
            variants[f"unicom embed, decode=gpu, {auto_workers} byte-reading workers"] = ("gpu", auto_workers, 0.0)
            for share in args.workers_shares:  # the workers decode that share of the JPEGs themselves
                variants[f"unicom embed, decode=gpu, {share:g} by the {auto_workers} workers"] = ("gpu", auto_workers, share)
        if args.clip_retrieval:
            variants["clip-retrieval inference, 1 decoding worker"] = "clip-retrieval"
        names = list(variants)
        rounds = args.rounds or (len(shards) if device.type == "cpu" else 1)
        groups = [list(g) for g in np.array_split(np.array(shards, dtype=object), rounds)]
        run_forward(encoder, predecoded_batches(encoder, shards[0], args.batch_size)[:1], device)  # warm-up
        for r, group in enumerate(groups):
            batches = [b for shard in group for b in predecoded_batches(encoder, shard, args.batch_size)]
            label = group[0].name if len(group) == 1 else f"{len(group)} shards"
            for name in names[r % len(names):] + names[: r % len(names)]:
                setting = variants[name]
                if setting is None:
                    done, seconds = run_forward(encoder, batches, device)
                elif setting == "clip-retrieval":
                    done, seconds = run_clip_retrieval(args.clip_retrieval, group, checkpoint, tmp / f"cr{r}", args.batch_size)
                elif isinstance(setting, tuple):
                    done, seconds = run_unicom(encoder, group, tmp / f"EMBgpu{names.index(name)}-{r}", args.batch_size, setting[1],
                                               setting[0], name, setting[2])
                else:
                    done, seconds = run_unicom(encoder, group, tmp / f"EMB{setting}{r}", args.batch_size, setting,
                                               name=name)
                totals.setdefault(name, [0, 0.0])
                totals[name][0] += done
                totals[name][1] += seconds
                print(f"  {label}: {name}: {done / seconds:.2f} images/s", flush=True)
            del batches
        profile = []
        if device.type == "cuda" or args.device_decode:  # where a decode=gpu run's time goes (not in the rates)
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from gpu_profile import profile_lines

            group = groups[-1]
            profile, _ = profile_lines(lambda: run_unicom(encoder, group, tmp / "EMBprofile", args.batch_size, auto_workers,
                                                       "gpu", "profiled"),
                                    steps=1, host=True, title=f"decode=gpu over {len(group)} shards, profiled "
                                    "(the main process: decoding, resizing, the model)")
            STEADY.pop("profiled", None)
    reference = totals[names[0]][0] / totals[names[0]][1]
    lines.append("images/s (total images / total seconds over all shards) and ratio to the forward pass alone:")
    for name in names:
        done, seconds = totals[name]
        lines.append(f"  {name:<55} {done / seconds:7.2f} images/s  {done / seconds / reference:6.3f}x  ({done} images)")
    steady = {name: images / seconds for name, (images, seconds, _) in STEADY.items() if seconds > 0}
    if steady:
        lines.append("after start-up (from the end of the first batch to the end: what a long extraction runs at; "
                     "the share of that time the loop waited for its next batch of model input):")
        for name, rate in steady.items():
            waited = STEADY[name][2] / STEADY[name][1]
            lines.append(f"  {name:<55} {rate:7.2f} images/s  {rate / reference:6.3f}x  (waited for input {waited:.0%})")
    ours = totals[names[1]][0] / totals[names[1]][1]
    if args.clip_retrieval:
        theirs = totals[names[-1]][0] / totals[names[-1]][1]
        lines.append(f"unicom / clip-retrieval: {ours / theirs:.3f}x (target >= 1.0); {clip_retrieval_versions(args.clip_retrieval)}")
    if device.type == "cpu":
        lines.append("target: unicom >= 0.9x the forward pass alone")
    else:
        gpu = max((n for n in names if "decode=gpu" in n), key=lambda n: steady.get(n, 0.0))  # the best of its forms
        lines.append(
            f"decode=cpu is bound by JPEG decoding and resizing in the {auto_workers} CPU workers "
            f"({ours / auto_workers:.0f} images/s each); target: decode=gpu >= 0.7x the forward pass alone after "
            f"start-up (measured {steady.get(gpu, 0.0) / reference:.3f}x, {gpu.removeprefix('unicom embed, ')}; "
            f"{totals[gpu][0] / totals[gpu][1] / reference:.3f}x with the start-up of this short run)"
        )
    lines += ["", *profile] if profile else []
    print("\n".join(lines[2:]))
    if args.write and device.type == "cuda":
        RESULT_CUDA.write_text("# benchmarks/embed_pipeline.py --device cuda\n" + "\n".join(lines) + "\n")
        print(f"written to {RESULT_CUDA.relative_to(ROOT)}", file=sys.stderr)
    elif args.write:
        write_section(device.type, lines)
        print(f"written to {RESULT.relative_to(ROOT)} ({device.type} section)", file=sys.stderr)


def write_section(kind: str, lines: list[str]) -> None:
    """Replace this device kind's section of the result file, keeping the other kind's."""
    sections = {}
    if RESULT.exists():
        for block in RESULT.read_text().split("\n## ")[1:]:
            name, _, body = block.partition("\n")
            sections[name.strip()] = body.strip("\n")
    sections[kind] = "\n".join(lines)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"\n## {name}\n{sections[name]}\n" for name in ("cpu", "cuda") if name in sections)
    RESULT.write_text(f"# benchmarks/embed_pipeline.py\n{text}")


if __name__ == "__main__":
    main()
