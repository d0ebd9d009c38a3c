"""A model exported by ``unicom convert unicom-to-onnx``, run by onnxruntime, against the same
network in PyTorch, side by side in one run.

Builds a CLIP-shaped ViT of ViT-B/32's sizes (224 px, patches of 32, width 768, 12 layers, 512-d
embeddings) with random weights as a model folder, exports it (the time the export takes), and
measures images/s of the L2-normalised embeddings of random pixels in batches, each side in
turn, ``--repeat`` times (the best of each): PyTorch (eval, no_grad, float32, its threads) and
onnxruntime's CPU provider (its threads); and the largest difference between the two.

Then the text tower (``--tower text``) of open_clip's ViT-B-32 (random weights: 12 layers of
512, 77 tokens): a search box's queries one at a time (the median latency of ``--queries``
texts, each side in turn) and texts in batches of 64 (texts/s), tokenized once beforehand by
open_clip's tokenizer, as a server tokenizes before either side runs.

    python benchmarks/onnx_export.py --write
    python benchmarks/onnx_export.py --batches 2 --repeat 1     # a quick look
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

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "onnx_export.txt"
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--queries", type=int, default=64, help="texts embedded one at a time, each side")
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()

    import onnxruntime
    import torch

    from unicom.models import export
    from unicom.models.onnx_export import NormalisedEncoder, export_onnx
    from unicom.models.registry import clip_preprocess
    from unicom.models.vit import ClipViT, ClipViTSettings

    settings = ClipViTSettings(image_size=224, patch_size=32, width=768, depth=12, heads=12, embedding_dim=512)
    torch.manual_seed(0)
    network = ClipViT(settings).eval()
    with tempfile.TemporaryDirectory() as scratch:
        folder = export.save_model(Path(scratch) / "model", network, "clip_vit", settings, clip_preprocess(224))
        start = time.perf_counter()
        done = export_onnx(folder, Path(scratch) / "model.onnx")
        export_seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(str(Path(scratch) / "model.onnx"), providers=["CPUExecutionProvider"])
    encoder = NormalisedEncoder(network).eval()
    batches = [torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(i))
               for i in range(args.batches)]
    arrays = [batch.numpy() for batch in batches]
    images = args.batch_size * args.batches

    def run_torch() -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([encoder(batch).numpy() for batch in batches])

    def run_onnx() -> np.ndarray:
        return np.concatenate([session.run(["embeddings"], {"pixels": array})[0] for array in arrays])

    times, difference = side_by_side(run_torch, run_onnx, args.repeat)
    rate = {name: images / min(seconds) for name, seconds in times.items()}
    lines = [
        "# unicom convert unicom-to-onnx: onnxruntime against PyTorch, the same network",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}",
        f"model: ViT-B/32-sized CLIP ViT, random weights, {sum(p.numel() for p in network.parameters()) / 1e6:.1f}M "
        f"parameters; ONNX file {done['bytes'] / 2**20:.0f} MiB, opset {done['opset']}, exported in "
        f"{export_seconds:.1f} s (its check: largest difference {done['max_difference']:.1e})",
        f"{images} images of 224 px in batches of {args.batch_size}, best of {args.repeat}, each side in turn:",
        f"  PyTorch (eval, no_grad, float32)   {rate['torch']:8.1f} images/s",
        f"  onnxruntime (CPU provider)         {rate['onnx']:8.1f} images/s   ratio {rate['onnx'] / rate['torch']:.2f}x",
        f"largest difference between the two sides' embeddings: {difference:.1e}",
        "",
        *text_tower(args.queries, args.repeat),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        RESULT.write_text(text)


def side_by_side(run_torch, run_onnx, repeat: int) -> tuple[dict[str, list[float]], float]:
    """Each side's seconds per call over ``repeat`` rounds, each side in turn after one warm-up
    call each (first calls allocate and plan), and the largest difference of their outputs."""
    run_torch(), run_onnx()
    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    for _ in range(repeat):
        outputs = {}
        for name, call in (("torch", run_torch), ("onnx", run_onnx)):
            start = time.perf_counter()
            outputs[name] = call()
            times[name].append(time.perf_counter() - start)
    return times, float(np.abs(outputs["onnx"] - outputs["torch"]).max())


def text_tower(queries: int, repeat: int) -> list[str]:
    """The lines of the text tower's comparison (module docstring)."""
    import warnings

    import onnxruntime
    import torch

    from unicom.models.encoders import load_encoder
    from unicom.models.onnx_export import NormalisedText, export_onnx

    words = ["cat", "red car", "lighthouse at dusk", "two children on a beach", "a bowl of ramen with an egg",
             "the skyline of a city seen from a bridge at night", "a dog", "wooden chair"]
    texts = [f"a photo of {words[i % len(words)]}" + " in the rain" * (i % 3) for i in range(max(queries, 64))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: no --pretrained, as intended here
        torch.manual_seed(0)  # the same random draw as the export's below
        encoder = load_encoder("ViT-B-32").eval()
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            torch.manual_seed(0)
            done = export_onnx("ViT-B-32", Path(scratch) / "text.onnx", tower="text")
            seconds = time.perf_counter() - start
            session = onnxruntime.InferenceSession(str(Path(scratch) / "text.onnx"), providers=["CPUExecutionProvider"])
    graph = NormalisedText(encoder, stacked=False).eval()
    tokens = encoder.tokenize(texts)
    single = [tokens[i:i + 1] for i in range(queries)]
    batches = list(tokens.split(64))

    def one_by_one(call):
        def run():
            latencies, outputs = [], []
            for ids in single:
                began = time.perf_counter()
                outputs.append(call(ids))
                latencies.append(time.perf_counter() - began)
            run.latencies.append(latencies)
            return np.concatenate(outputs)
        run.latencies = []
        return run

    def torch_call(ids):
        with torch.no_grad():
            return graph(ids).numpy()

    def onnx_call(ids):
        return session.run(["embeddings"], {"input_ids": ids.numpy()})[0]

    runs = {"torch": one_by_one(torch_call), "onnx": one_by_one(onnx_call)}
    _, difference = side_by_side(runs["torch"], runs["onnx"], repeat)
    median = {name: float(np.median(np.concatenate(run.latencies[1:]))) * 1e3 for name, run in runs.items()}
    times, _ = side_by_side(lambda: np.concatenate([torch_call(b) for b in batches]),
                            lambda: np.concatenate([onnx_call(b) for b in batches]), repeat)
    rate = {name: len(texts) / min(seconds) for name, seconds in times.items()}
    return [
        f"text tower (--tower text): open_clip ViT-B-32's, random weights, "
        f"{sum(p.numel() for p in encoder.model.transformer.parameters()) / 1e6:.1f}M parameters in its "
        f"transformer; ONNX file {done['bytes'] / 2**20:.0f} MiB, exported in {seconds:.1f} s; inputs "
        f"{', '.join(done['inputs'])} (batch, {done['length']})",
        f"{queries} queries one at a time, median latency over {repeat} rounds, each side in turn:",
        f"  PyTorch (eval, no_grad, float32)   {median['torch']:8.2f} ms",
        f"  onnxruntime (CPU provider)         {median['onnx']:8.2f} ms   {median['onnx'] / median['torch']:.2f}x PyTorch's time",
        f"{len(texts)} texts in batches of 64, best of {repeat}:",
        f"  PyTorch (eval, no_grad, float32)   {rate['torch']:8.1f} texts/s",
        f"  onnxruntime (CPU provider)         {rate['onnx']:8.1f} texts/s   ratio {rate['onnx'] / rate['torch']:.2f}x",
        f"largest difference between the two sides' embeddings: {difference:.1e}",
    ]


if __name__ == "__main__":
    main()
