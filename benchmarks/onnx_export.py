"""A model exported by ``unicom convert unicom-to-onnx``, run by onnxruntime, against the same
network in PyTorch, side by side in one run.

Builds a CLIP-shaped ViT of ViT-B/32's sizes (224 px, patches of 32, width 768, 12 layers, 512-d
embeddings) with random weights as a model folder, exports it (the time the export takes), and
measures images/s of the L2-normalised embeddings of random pixels in batches, each side in
turn, ``--repeat`` times (the best of each): PyTorch (eval, no_grad, float32, its threads) and
onnxruntime's CPU provider (its threads); and the largest difference between the two.

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

    run_torch(), run_onnx()  # warm-up: first calls allocate and plan
    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    for _ in range(args.repeat):
        for name, call in (("torch", run_torch), ("onnx", run_onnx)):
            start = time.perf_counter()
            out = call()
            times[name].append(time.perf_counter() - start)
            if name == "torch":
                reference = out
            else:
                difference = float(np.abs(out - reference).max())
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
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
