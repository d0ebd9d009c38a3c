"""Training throughput of `unicom train`'s step (backbone + PartialFC + both optimisers).

CPU (``--device cpu``, the default): a small configuration to catch regressions. A
CLIP-shaped ViT (64 px, patches of 8, width 192, depth 6, 3 heads, 128-d embedding),
batch 32, PartialFC over 10,000 classes with sample_rate 0.1, fp32. Side by side: the base
step on 1 and on all threads, sample_rate 1.0, gradient checkpointing, and the whole
`train()` loop reading webdataset shards + pseudo-labels (decoding and augmentation
included) against the bare step.

CUDA (``--device cuda``): the reference configuration. ViT-B/16 at 224 px under bf16 autocast,
PartialFC over 1,000,000 classes of 768-d prototypes at sample_rate 0.1 with SparseAdamW,
fused AdamW for the backbone; for gradient checkpointing off and on, the largest batch
that fits (doubling, then the sizes between), images/s and model FLOPs utilisation. Data
loading is not part of it: batches are random tensors already on the GPU. Then the model's
attention alone with each of PyTorch's SDPA backends (cuDNN, flash, memory-efficient), side
by side: at 197 tokens attention took about an eighth of the compiled step. With --compile,
a backend more than 5% faster there than PyTorch's choice gets a compiled step of its own
(the row ``model.attention=NAME``: the recipe key that makes training use it);
``--attention NAME`` times every row with that backend.

MFU = model FLOPs per second / peak dense bf16 FLOPs of the GPU. Model FLOPs per image are
3x the forward FLOPs (forward + backward), counted by torch's FlopCounterMode on one
training step (matrix products and attention); recomputation under gradient checkpointing
is not counted (it is hardware work, not model work). Peak: 989.4 TFLOP/s for H100/H200
SXM (dense bf16), 312 for A100; ``--peak-tflops`` for others.

Usage: python benchmarks/train_step.py [--device cuda] [--compile] [--batches 256 512] [--attention NAME] [--out FILE]
Writes benchmarks/results/train_step_{cpu,cuda}.txt. ``--batches`` times those sizes only
(no search for the largest, no gradient checkpointing): the quick form that
benchmarks/gpu_suite.sh runs. Compiled graphs go to unicom's persistent compile cache
(:func:`unicom.engine.device.compile_cache`), so a second run skips the compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def build(model_name: str, overrides: dict, classes: int, sample_rate: float, device: torch.device, precision: str,
          checkpointing: bool, seed: int = 0, attention: str = "auto"):
    """The trainer's own pieces: model, PartialFC, optimisers, TrainStep."""
    from unicom.losses import ArcFace, PartialFC
    from unicom.models.vit import create_model
    from unicom.engine.step import TrainStep, backbone_optimizer
    from unicom.optim import SparseAdamW

    torch.manual_seed(seed)
    created = create_model(model_name, overrides=overrides)
    backbone = created.module.to(device).train()
    backbone.set_grad_checkpointing(checkpointing)
    partial_fc = PartialFC(created.embedding_dim, classes, ArcFace(0.3, 64.0), sample_rate=sample_rate, seed=seed).to(device)
    step = TrainStep(backbone, partial_fc, backbone_optimizer(backbone, 1e-3, 0.05, (0.9, 0.999), 1e-8, device),
                     SparseAdamW(partial_fc.parameters(), lr=1e-3, weight_decay=0.05), device, precision,
                     attention=attention)
    return created, step


def random_batch(batch: int, size: int, classes: int, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return images, labels


def time_steps(step, batches, warmup: int, timed: int, device: torch.device) -> list[float]:
    """Seconds of each timed step (the step includes its host sync, as in training)."""
    times = []
    for i in range(warmup + timed):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = step([batches[i % len(batches)]])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        assert result.finite, result
    return times


# ------------------------------------------------------------------------------- CPU

CPU_MODEL = {"image_size": 64, "patch_size": 8, "width": 192, "depth": 6, "heads": 3, "embedding_dim": 128}
CPU_BATCH, CPU_CLASSES = 32, 10_000


def cpu_step_case(threads: int, sample_rate: float = 0.1, checkpointing: bool = False, steps: int = 12) -> dict:
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    _, step = build("ViT-B-32", CPU_MODEL, CPU_CLASSES, sample_rate, cpu, "fp32", checkpointing)
    batches = [random_batch(CPU_BATCH, 64, CPU_CLASSES, cpu, seed) for seed in range(4)]
    times = time_steps(step, batches, warmup=2, timed=steps, device=cpu)
    median = statistics.median(times)
    return {"seconds_per_step": median, "steps_per_second": 1 / median, "images_per_second": CPU_BATCH / median}


def write_shards(root: Path, shards: int = 4, per_shard: int = 128, classes: int = CPU_CLASSES) -> None:
    """Webdataset shards of 64 px JPEGs and `unicom cluster`-style labels for them."""
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "clusters" / "labels").mkdir(parents=True)
    for shard in range(shards):
        keys, labels = [], []
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:05d}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
                keys.append(key)
                labels.append(int(rng.integers(0, classes)))
        pq.write_table(pa.table({"key": keys, "label": pa.array(labels, pa.int64()), "similarity": pa.array([1.0] * per_shard, pa.float32())}),
                       root / "clusters" / "labels" / f"labels_{shard}.parquet")
    (root / "clusters" / "centroids.json").write_text(json.dumps({"k": classes}))


def cpu_pipeline_case(threads: int, steps: int = 40) -> dict:
    """The whole `train()` loop on shards: images/s between its first and last log line."""
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root)
        model = [f"model.{k}={v}" for k, v in CPU_MODEL.items()]
        config = load_config(None, [
            f"out={root / 'run'}", f"data.shards={root}", f"data.labels={root / 'clusters'}", f"data.batch_size={CPU_BATCH}",
            "data.workers=0", "data.shuffle_buffer=256", *model, f"train.steps={steps}", "log.every=10",
            "log.tensorboard=false", f"checkpoint.every={steps}",
        ])
        with open(os.devnull, "w") as quiet:
            train(config, console=quiet)
        records = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_second"] for r in records if r["event"] == "step" and r["step"] > 10]
    waits = [r["data_wait"] for r in records if r["event"] == "step" and r["step"] > 10]
    images_per_second = statistics.median(rates)
    return {"images_per_second": images_per_second, "steps_per_second": images_per_second / CPU_BATCH,
            "data_wait": statistics.median(waits)}


def run_cpu() -> list[str]:
    threads = torch.get_num_threads()
    cases = [
        ("step, 1 thread (base)", lambda: cpu_step_case(1)),
        (f"step, {threads} threads", lambda: cpu_step_case(threads)),
        ("step, 1 thread, sample_rate 1.0", lambda: cpu_step_case(1, sample_rate=1.0)),
        ("step, 1 thread, gradient checkpointing", lambda: cpu_step_case(1, checkpointing=True)),
        ("train() on shards, 1 thread, decoding in the loop", lambda: cpu_pipeline_case(1)),
    ]
    lines = [
        "# Training step throughput (cpu)",
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        f"ViT {CPU_MODEL}, batch {CPU_BATCH}, PartialFC {CPU_CLASSES:,} classes (ArcFace 0.3/64), fp32; "
        "median of 12 steps after 2 warm-up steps (train(): median images/s of its log lines after step 10)",
        "",
        "| case | steps/s | images/s | vs base |",
        "|---|---:|---:|---:|",
    ]
    base = None
    for label, case in cases:
        result = case()
        base = base or result["steps_per_second"]
        extra = f" (data wait {100 * result['data_wait']:.0f}% of the loop)" if "data_wait" in result else ""
        lines.append(f"| {label}{extra} | {result['steps_per_second']:.2f} | {result['images_per_second']:.1f} | "
                     f"{result['steps_per_second'] / base:.2f} |")
        print(lines[-1], flush=True)
    torch.set_num_threads(threads)
    return lines


# ------------------------------------------------------------------------------- CUDA

GPU_MODEL, GPU_CLASSES, GPU_SAMPLE_RATE = "ViT-B-16", 1_000_000, 0.1
GPU_BATCHES = [64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
GPU_DEVICE = torch.device("cuda")  # --smoke --device cpu runs this path on the CPU at toy sizes
GPU_OVERRIDES: dict = {}
GPU_IMAGE = 224


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def model_flops_per_image(device: torch.device) -> tuple[float, float]:
    """(counted, analytic) training FLOPs per image of the ViT-B/16 + PartialFC step."""
    from torch.utils.flop_counter import FlopCounterMode

    from unicom.models.registry import model_cfg
    from unicom.models.vit import ClipViTSettings

    batch = 8
    _, step = build(GPU_MODEL, GPU_OVERRIDES, GPU_CLASSES, GPU_SAMPLE_RATE, device, "bf16", False)
    images, labels = random_batch(batch, GPU_IMAGE, GPU_CLASSES, device, 0)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step.partial_fc(step.backbone(images), labels)
        loss.backward()
    counted = counter.get_total_flops() / batch
    del step
    _release(device)
    s = ClipViTSettings.from_dict({**model_cfg(GPU_MODEL).settings, **GPU_OVERRIDES})
    tokens = (s.image_size // s.patch_size) ** 2 + 1
    width, mlp = s.width, int(s.width * s.mlp_ratio)
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    forward = s.depth * per_block + 2 * (tokens - 1) * width * 3 * s.patch_size**2 + 2 * width * s.embedding_dim
    forward += 2 * s.embedding_dim * GPU_CLASSES * GPU_SAMPLE_RATE  # cosines against the sampled prototypes
    return counted, 3.0 * forward


def gpu_cases(checkpointing: bool, compile_model: bool = False, batches: list[int] | None = None,
              profile: bool = False, attention: str = "auto") -> list[dict]:
    """Time the step at the largest batch that fits (and at 256 for comparison), one model
    built; with ``batches``, at those sizes without searching; with ``profile``, the kernel
    table of the last size's step goes into its result as ``profile`` (lines); ``attention``:
    the step's SDPA backend (``model.attention``)."""
    import gc

    device = GPU_DEVICE
    _, step = build(GPU_MODEL, GPU_OVERRIDES, GPU_CLASSES, GPU_SAMPLE_RATE, device, "bf16", checkpointing,
                    attention=attention)
    if compile_model:
        from unicom.engine.device import compile_cache

        compile_cache()
        step.backbone.compile()
    largest = max(batches) if batches else None
    for batch in [] if batches else GPU_BATCHES:
        try:
            time_steps(step, [random_batch(batch, GPU_IMAGE, GPU_CLASSES, device, 0)], warmup=2, timed=0, device=device)
            largest = batch
            print(f"  checkpointing={checkpointing}: batch {batch} fits", flush=True)
        except torch.cuda.OutOfMemoryError:
            fitted = False
        else:
            fitted = True
        step.backbone_optimizer.zero_grad(set_to_none=True)
        step.prototype_optimizer.zero_grad(set_to_none=True)
        gc.collect()
        _release(device)
        if not fitted:
            break
    if largest is None:
        raise SystemExit(f"not even batch {GPU_BATCHES[0]} fits")
    results = []
    for batch in sorted(set(batches) if batches else {256, largest}):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batches = [random_batch(batch, GPU_IMAGE, GPU_CLASSES, device, seed) for seed in range(2)]
        median = statistics.median(time_steps(step, batches, warmup=3, timed=10, device=device))
        results.append({"batch": batch, "largest": batch == largest, "seconds_per_step": median,
                        "images_per_second": batch / median, "peak_gib": _peak_gib(device)})
        if profile:
            from gpu_profile import profile_lines

            results[-1]["profile"], _ = profile_lines(lambda: step([batches[0]]),
                                                   title=f"where the time of the step goes (batch {batch})")
        del batches
    del step
    gc.collect()
    _release(device)
    return results


def backbone_only(batch: int) -> float:
    """Seconds per step of the backbone alone (fused AdamW, a squared-norm loss): the
    share of the step that PartialFC and SparseAdamW do not account for."""
    from unicom.engine.step import backbone_optimizer
    from unicom.models.vit import create_model

    device = GPU_DEVICE
    backbone = create_model(GPU_MODEL, overrides=GPU_OVERRIDES).module.to(device).train()
    optimizer = backbone_optimizer(backbone, 1e-3, 0.05, (0.9, 0.999), 1e-8, device)
    images, _ = random_batch(batch, GPU_IMAGE, 10, device, 0)
    times = []
    for i in range(13):
        _synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = backbone(images).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    del backbone, optimizer
    _release(device)
    return statistics.median(times)


def attention_backends(batch: int, repeats: int = 10) -> tuple[list[str], dict[str, float]]:
    """The model's attention alone (``F.scaled_dot_product_attention``, forward and backward,
    bf16, its shape at ``batch``) with each of PyTorch's SDPA backends, side by side: which
    kernel the step's attention share (about an eighth of it) would take best. A backend that
    cannot take the shape here is named with the reason. Returns the table's lines and the
    seconds of each backend that ran (``auto``: PyTorch's choice)."""
    import torch.nn.functional as F

    from unicom.models.vit import create_model

    device = GPU_DEVICE
    trunk = create_model(GPU_MODEL, overrides=GPU_OVERRIDES).module.trunk
    attention = trunk.blocks[0].attn
    heads, head_dim, depth = attention.num_heads, attention.head_dim, len(trunk.blocks)
    tokens = trunk.patch_embed.num_patches + 1  # and the class token
    shape = (batch, heads, tokens, head_dim)
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
               for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator)
    flops = 4 * batch * heads * tokens * tokens * head_dim * 3.5  # forward (2 products) + backward (5)
    lines = [f"### attention alone: {shape} (batch, heads, tokens, head dim), bf16, forward + backward, one layer",
             "", "| SDPA backend | ms per layer | ms per step ({} layers) | TFLOP/s (the backward's recomputation counted) |".format(depth), "|---|---:|---:|---:|"]
    from unicom.engine.device import attention_backend  # model.attention's own contexts
    from unicom.errors import InputError

    seconds_of = {}
    for name in ("auto", "cudnn", "flash", "efficient"):
        shown = "PyTorch's choice" if name == "auto" else name
        times = []
        try:
            with attention_backend(name):
                for i in range(repeats + 2):
                    _synchronize(device)
                    start = time.perf_counter()
                    out = F.scaled_dot_product_attention(q, k, v)
                    torch.autograd.grad(out, (q, k, v), grad)
                    _synchronize(device)
                    if i >= 2:
                        times.append(time.perf_counter() - start)
        except (RuntimeError, InputError) as error:  # InputError: this torch lacks the backend
            reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else type(error).__name__
            lines.append(f"| {shown} | not available: {reason.replace('|', '/')} | | |")
            continue
        seconds = seconds_of[name] = statistics.median(times)
        lines.append(f"| {shown} | {1000 * seconds:.3f} | {1000 * seconds * depth:.2f} | {flops / seconds / 1e12:.1f} |")
    del q, k, v, grad
    _release(device)
    return lines, seconds_of


def faster_attention(seconds_of: dict[str, float], margin: float = 0.05) -> str | None:
    """The backend of the attention table that beats PyTorch's choice by more than
    ``margin`` (the fastest such), or None: worth a compiled step of its own."""
    chosen = seconds_of.get("auto")
    others = {name: seconds for name, seconds in seconds_of.items() if name != "auto"}
    if chosen is None or not others:
        return None
    best = min(others, key=others.get)
    return best if others[best] < (1 - margin) * chosen else None


def run_cuda(peak_tflops: float | None, compile_model: bool = False, batches: list[int] | None = None,
             out: Path | None = None, attention: str = "auto") -> list[str]:
    """The GPU table; with ``out``, the file is rewritten after each row (a run stopped by a
    time limit keeps the rows it measured). ``attention``: the steps' SDPA backend. With
    ``compile_model`` and ``attention`` auto, when the attention table finds a backend clearly
    faster than PyTorch's choice, the compiled step is timed with it too (one more row)."""
    import timm

    device = GPU_DEVICE
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU smoke run ({GPU_OVERRIDES})"
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    counted, analytic = model_flops_per_image(device)
    lines = [
        f"# Training step throughput ({device.type})",
        f"{name}, python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}",
        f"{GPU_MODEL} at 224 px (clip_vit), bf16 autocast, PartialFC {GPU_CLASSES:,} classes x 768-d, sample_rate "
        f"{GPU_SAMPLE_RATE} (SparseAdamW), fused AdamW; random batches on the GPU (no data loading); "
        "median of 10 steps after 3 warm-up steps; attention: "
        + ("PyTorch's choice of SDPA backend" if attention == "auto" else f"SDPA backend {attention} (model.attention)"),
        f"model FLOPs per image (forward + backward): {counted / 1e9:.1f} GFLOP counted by FlopCounterMode, "
        f"{analytic / 1e9:.1f} GFLOP by formula; MFU uses the counted value and a peak of "
        + (f"{peak_tflops} TFLOP/s (dense bf16)" if peak_tflops else "unknown (give --peak-tflops)"),
        "",
        "| gradient checkpointing | batch | s/step | images/s | model TFLOP/s | MFU | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    plans = [("off", False, False, None), ("on", True, False, None)]
    if batches:  # the quick form: the given sizes, no search, no gradient checkpointing
        plans = [("off", False, False, batches)]
    largest_plain = max(batches) if batches else None
    plans += [("off, torch.compile", False, True, "plain")] if compile_model else []
    profiles = []
    for number, (label, checkpointing, compiled, sizes) in enumerate(plans):
        if sizes == "plain":
            sizes = batches or sorted({256, largest_plain})
        for result in gpu_cases(checkpointing, compiled, sizes, profile=number == len(plans) - 1, attention=attention):
            profiles += ["", f"{label}:", *result.get("profile", [])] if "profile" in result else []
            if label == "off" and result["largest"]:
                largest_plain = result["batch"]
            lines.append(step_row(label, result, sizes is None, counted, peak_tflops))
            print(lines[-1], flush=True)
            if out is not None:
                write(out, lines)
    rows_end = len(lines)
    alone = backbone_only(largest_plain)
    table, seconds_of = attention_backends(largest_plain)
    lines += ["", f"backbone alone (fused AdamW, no PartialFC) at batch {largest_plain}, checkpointing off: "
              f"{alone:.3f} s/step, {largest_plain / alone:,.0f} images/s",
              "largest: the largest of " + ", ".join(map(str, GPU_BATCHES)) + " whose step fits in memory.",
              "Target MFU >= 40%.", "", *table]
    if out is not None:
        write(out, lines + profiles)
    faster = faster_attention(seconds_of) if compile_model and attention == "auto" else None
    if faster is not None:  # the step as `model.attention=<faster>` would run it
        print(f"  attention: {faster} beats PyTorch's choice alone; the compiled step with it", flush=True)
        label = f"off, torch.compile, model.attention={faster}"
        for result in gpu_cases(False, True, [largest_plain], attention=faster):
            lines.insert(rows_end, step_row(label, result, False, counted, peak_tflops))
            print(lines[rows_end], flush=True)
            rows_end += 1
    return lines + profiles


def step_row(label: str, result: dict, searched: bool, counted: float, peak_tflops: float | None) -> str:
    """A row of the step table: ``searched``, the batch was the largest found by the search."""
    tflops = result["images_per_second"] * counted / 1e12
    mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "?"
    batch = f"{result['batch']}{' (largest)' if result['largest'] and searched else ''}"
    return (f"| {label} | {batch} | {result['seconds_per_step']:.3f} | {result['images_per_second']:,.0f} | "
            f"{tflops:.1f} | {mfu} | {result['peak_gib']:.1f} |")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_profile
    from unicom.engine.device import ATTENTION_BACKENDS  # model.attention's choices

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/train_step_<device>.txt)")
    parser.add_argument("--compile", action="store_true", help="cuda: also time the backbone under torch.compile")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check of the GPU path: on cuda 10,000 classes and small batches; with --device cpu "
                             "the same code on the CPU with a toy ViT and 1,000 classes")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="cuda: time these batch sizes only (no search, no gradient checkpointing)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                        help="cuda: the steps' SDPA backend, as the recipe's model.attention (default: PyTorch's choice; "
                             "with --compile, a backend the attention table finds faster also gets a compiled row)")
    args = parser.parse_args()
    if args.smoke:
        global GPU_CLASSES, GPU_BATCHES, GPU_DEVICE, GPU_OVERRIDES, GPU_IMAGE
        GPU_CLASSES, GPU_BATCHES = 10_000, [64, 128]
        if args.device == "cpu":  # the GPU path itself, on the CPU at toy sizes
            GPU_DEVICE, GPU_CLASSES, GPU_IMAGE = torch.device("cpu"), 1000, 32
            GPU_OVERRIDES = {"image_size": 32, "patch_size": 16, "width": 64, "depth": 2, "heads": 2}
    os.environ.setdefault("UNICOM_PROGRESS", "0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    gpu_path = args.device == "cuda" or args.smoke
    name = f"train_step_{args.device}.txt" if not (args.smoke and args.device == "cpu") else "train_step_smoke_cpu.txt"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / name)
    lines = run_cuda(args.peak_tflops, args.compile, args.batches, out, args.attention) if gpu_path else run_cpu()
    write(out, lines)
    print("\n".join(lines))


def write(out: Path, lines: list[str]) -> None:
    """The results so far, replacing the file whole."""
    from unicom.files import write_text_atomic

    write_text_atomic(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
