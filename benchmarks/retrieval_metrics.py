"""Retrieval metrics at SOP's size: ``unicom.evaluate.retrieval_metrics`` vs pytorch-metric-learning.

60,000 L2-normalised embeddings of dimension 512 in 11,000 classes (2 to 9 images each,
as in Stanford Online Products' test split), leave-one-out. Both sides compute
Recall@{1,10,100,1000}, MAP@R and R-Precision from their own exact k-NN search:

* unicom: ``retrieval_metrics(x, labels, ks=(1, 10, 100, 1000))`` (one chunked search);
* pytorch-metric-learning: ``AccuracyCalculator(k=1000)`` (faiss ``IndexFlatL2``; k=1000
  is the least k that gives Recall@1000, and is above every class size, so MAP@R and
  R-Precision are exact), with Recall@K added as ``calculate_recall_at_K`` methods the way
  its documentation shows for custom metrics.

Each side runs in its own process (same data, read from one .npy file), so peak memory
(``ru_maxrss``) is each process's own. Run ``python benchmarks/retrieval_metrics.py``; it
prints the table and writes ``benchmarks/results/retrieval_metrics.txt``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KS = (1, 10, 100, 1000)
RESULT = Path(__file__).parent / "results" / "retrieval_metrics.txt"


def make_data(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class centres plus Gaussian noise, normalised; class sizes 2..9, shuffled."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 10, classes)
    labels = np.repeat(np.arange(classes), sizes)
    if len(labels) < n:
        labels = np.concatenate([labels, rng.integers(0, classes, n - len(labels))])
    labels = rng.permutation(labels[:n])
    x = rng.standard_normal((classes, dim), dtype=np.float32)[labels]
    x += noise * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_unicom(x: np.ndarray, labels: np.ndarray) -> dict:
    from unicom.evaluate import retrieval_metrics

    start = time.perf_counter()
    result = retrieval_metrics(x, labels, ks=KS)
    seconds = time.perf_counter() - start
    values = {f"recall@{k}": result[f"recall@{k}"] for k in KS}
    values.update({"map@r": result["map@r"], "r_precision": result["r_precision"]})
    return {"seconds": seconds, "values": values, "excluded": result["n_excluded"]}


def run_pml(x: np.ndarray, labels: np.ndarray) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    def recall_at(k):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            hits = (knn_labels[not_lone_query_mask, :k] == query_labels[not_lone_query_mask, None]).any(1)
            return hits.double().mean().item()

        return calculate

    class WithRecall(AccuracyCalculator):
        def requires_knn(self):
            return super().requires_knn() + [f"recall_at_{k}" for k in KS[1:]]

    for k in KS[1:]:
        setattr(WithRecall, f"calculate_recall_at_{k}", recall_at(k))
    include = ("precision_at_1", *[f"recall_at_{k}" for k in KS[1:]], "mean_average_precision_at_r", "r_precision")
    calculator = WithRecall(include=include, k=max(KS), device=torch.device("cpu"))
    start = time.perf_counter()
    result = calculator.get_accuracy(x, labels)
    seconds = time.perf_counter() - start
    values = {"recall@1": result["precision_at_1"]}
    values.update({f"recall@{k}": result[f"recall_at_{k}"] for k in KS[1:]})
    values.update({"map@r": result["mean_average_precision_at_r"], "r_precision": result["r_precision"]})
    return {"seconds": seconds, "values": values}


def child(side: str, data: str) -> None:
    x = np.load(Path(data) / "x.npy")
    labels = np.load(Path(data) / "labels.npy")
    loaded = peak_gib()
    outcome = run_unicom(x, labels) if side == "unicom" else run_pml(x, labels)
    outcome.update(peak_gib=peak_gib(), data_gib=loaded)
    print(json.dumps(outcome))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11_000)
    parser.add_argument("--noise", type=float, default=2.4, help="noise std per dimension (class centres have std 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--child", choices=("unicom", "pml"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data)
        return

    import torch
    import pytorch_metric_learning

    x, labels = make_data(args.n, args.dim, args.classes, args.noise, args.seed)
    largest_class = int(np.bincount(labels).max())
    assert largest_class <= max(KS), "k=1000 must exceed every class size for exact MAP@R"
    outcomes = {}
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "x.npy", x)
        np.save(Path(folder) / "labels.npy", labels)
        for side in ("unicom", "pml"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", side, "--data", folder], check=True, capture_output=True, text=True
            )
            outcomes[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = outcomes["unicom"], outcomes["pml"]
    lines = [
        f"retrieval metrics, leave-one-out: {args.n} x {args.dim} float32, {args.classes} classes "
        f"(sizes 2..{largest_class}), noise {args.noise}, seed {args.seed}",
        f"{ours['excluded']} queries without a same-class item excluded by both",
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), pytorch-metric-learning {pytorch_metric_learning.__version__}",
        "",
        f"{'metric':<14}{'unicom':>14}{'pml':>14}{'|difference|':>16}",
    ]
    worst = 0.0
    for key, value in ours["values"].items():
        difference = abs(value - theirs["values"][key])
        worst = max(worst, difference)
        lines.append(f"{key:<14}{value:>14.8f}{theirs['values'][key]:>14.8f}{difference:>16.2e}")
    ratio = ours["seconds"] / theirs["seconds"]
    lines += [
        "",
        f"{'':<26}{'unicom':>12}{'pml':>12}",
        f"{'time (s)':<26}{ours['seconds']:>12.1f}{theirs['seconds']:>12.1f}",
        f"{'peak memory (GiB)':<26}{ours['peak_gib']:>12.2f}{theirs['peak_gib']:>12.2f}",
        f"{'  of which data+imports':<26}{ours['data_gib']:>12.2f}{theirs['data_gib']:>12.2f}",
        "",
        f"time ratio unicom/pml: {ratio:.2f}x (target <= 1.0x)",
        f"largest |difference|: {worst:.1e} (target <= 1e-6)",
        f"unicom peak memory: {ours['peak_gib']:.2f} GiB (target < 2 GiB)",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
