"""Re-ranking by α-query expansion, database-side augmentation, k-reciprocal encoding and diffusion on the demo's held-out glyphs.

`make demo` embeds held-out characters (never seen in training) with each network: queries
drawn in half of the fonts against a gallery of the same characters in the other half
(about 10 gallery glyphs per character), clean and varied. This script scores those cached
embeddings again with ``unicom evaluate``'s re-ranking (``unicom.evaluate.evaluate_embedding_folders``
with an :class:`~unicom.evaluate.expansion.Expansion`): αQE with k = 1, 2, 4, DBA with
k = 2, 4, both, the average query expansion (α = 0), k-reciprocal re-ranking (k1 = 20,
k2 = 6 and λ = 0.3, the paper's; k1 = 10; λ = 0; after DBA) and diffusion (k = 50, γ = 3,
α = 0.99, the paper's; k = 10; k = 5 with α = 0.9), each timed, beside the plain search of the same run.

Run ``make demo`` first, then ``python benchmarks/re_ranking.py [--demo runs/demo]``; it prints
the table and writes ``benchmarks/results/re_ranking.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).parent / "results" / "re_ranking.txt"
PROTOCOLS = ("clean", "varied")
NETWORKS = {"trained_network": "the trained network", "trained_network_compact_epoch": "after the compact epoch",
            "clustering_features": "16x16 pixels"}


def settings() -> list:
    """Each re-ranking measured, the plain search first (dba alpha 3 throughout)."""
    from unicom.evaluate import Diffusion, Expansion, KReciprocal

    return [Expansion(), Expansion(qe=1), Expansion(qe=2), Expansion(qe=4), Expansion(qe=2, qe_alpha=0.0),
            Expansion(dba=2), Expansion(dba=4), Expansion(qe=2, dba=2), Expansion(qe=4, dba=4),
            Expansion(k_reciprocal=KReciprocal(20, 6, 0.3)), Expansion(k_reciprocal=KReciprocal(10, 6, 0.3)),
            Expansion(k_reciprocal=KReciprocal(20, 6, 0.0)), Expansion(dba=2, k_reciprocal=KReciprocal(20, 6, 0.3)),
            Expansion(diffusion=Diffusion(50)), Expansion(diffusion=Diffusion(10)), Expansion(diffusion=Diffusion(5, 3.0, 0.9))]


def folders(demo: Path, protocol: str, network: str) -> tuple[Path, Path]:
    if network == "clustering_features":
        root = demo / "held_out_pixels" / protocol
    else:
        root = demo / "evaluate" / protocol / network / "embeddings"
    return root / "query", root / "gallery"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the folder make demo wrote")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    from unicom.evaluate.benchmark import evaluate_embedding_folders

    missing = [str(f) for p in PROTOCOLS for n in NETWORKS for f in folders(args.demo, p, n) if not f.is_dir()]
    if missing:
        print(f"{args.demo}: no embeddings of make demo ({missing[0]} missing); run make demo first", file=sys.stderr)
        return 1
    lines = [
        "# Re-ranking (αQE, DBA, k-reciprocal, diffusion) on the demo's held-out glyphs",
        "",
        f"python {platform.python_version()}, {platform.machine()}; the demo's cached embeddings ({args.demo});",
        "queries of half of the fonts against the other half's clean glyphs; metrics in %,",
        "seconds for the whole evaluation (plain search included).",
        "",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for protocol in PROTOCOLS:
            for network, title in NETWORKS.items():
                query, gallery = folders(args.demo, protocol, network)
                lines += [f"## {protocol} queries, {title}", "",
                          "| re-ranking | Recall@1 | Recall@4 | MAP@R | R-Precision | seconds |", "|---|---:|---:|---:|---:|---:|"]
                plain = None  # the first setting's: the plain search, which every re-ranked report repeats
                for expansion in settings():
                    began = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        report = evaluate_embedding_folders(
                            query, gallery_embeddings=gallery, ks=(1, 4), dims=(), pca=False,
                            out=Path(scratch) / "report", expansion=expansion)
                    seconds = time.perf_counter() - began
                    m = report["metrics"]
                    name = expansion.text() or "none (plain search)"
                    lines.append(f"| {name} | {100 * m['recall@1']:.2f} | {100 * m['recall@4']:.2f} | "
                                 f"{100 * m['map@r']:.2f} | {100 * m['r_precision']:.2f} | {seconds:.2f} |")
                    if expansion:
                        assert report["without_expansion"] == plain, "the plain search differs between runs"
                    else:
                        plain = m
                lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
