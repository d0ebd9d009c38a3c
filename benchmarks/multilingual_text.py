"""Embedding texts with a multilingual text model (``unicom.models.multilingual``: ``unicom
embed --text-model``, ``--multilingual-model`` of search and serve), side by side with the
packages that define the two layouts, on the same model and texts, in one run:

* an M-CLIP folder: ``unicom.embed.embed_texts`` against M-CLIP's own model class
  (``multilingual_clip.pt_multilingual_clip.MultilingualCLIP.forward``, batch by batch);
* a sentence-transformers folder (Transformer, mean Pooling, Dense: the layout of
  ``clip-ViT-B-32-multilingual-v1``): against ``SentenceTransformer.encode``.

The transformer is an XLM-RoBERTa of ``--layers`` layers of ``--width`` with random weights
(no weights are downloaded), its tokenizer trained on captions made of words in five
languages and scripts; the texts are 5 to 40 of those words. Each side's embeddings are
compared with the other's (largest difference of unit vectors). The machine may be shared:
the sides alternate, and the figures are the best of ``--repeat`` runs.

    python benchmarks/multilingual_text.py --write
    python benchmarks/multilingual_text.py --texts 500 --layers 2   # a quick look
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
RESULT = ROOT / "benchmarks" / "results" / "multilingual_text.txt"
sys.path.insert(0, str(ROOT / "tests"))


def captions(count: int, seed: int) -> list[str]:
    """``count`` captions of 5 to 40 words drawn from the test suite's multilingual captions."""
    from support import MULTILINGUAL_CAPTIONS

    words = " ".join(MULTILINGUAL_CAPTIONS).split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, rng.integers(5, 41))) for _ in range(count)]


def timed(call) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def side_by_side(title: str, texts: list[str], repeat: int, ours, name: str, other) -> list[str]:
    """Lines comparing ``ours`` with ``other`` (each: () -> unit rows), run in turn ``repeat`` times (best of each)."""
    times: dict[str, list[float]] = {"ours": [], "other": []}
    for _ in range(repeat):
        seconds, mine = timed(ours)
        times["ours"].append(seconds)
        seconds, theirs = timed(other)
        times["other"].append(seconds)
    best, reference = min(times["ours"]), min(times["other"])
    difference = float(np.abs(mine - theirs).max())
    return ["", f"## {title}",
            f"  {'unicom embed_texts':<28} {len(texts) / best:9,.0f} texts/s",
            f"  {name:<28} {len(texts) / reference:9,.0f} texts/s   ratio {reference / best:.2f}x   "
            f"largest difference {difference:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dims", type=int, default=512, help="the projection's output (the CLIP model's dimension)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()
    os.environ.setdefault("UNICOM_PROGRESS", "0")

    import torch
    from multilingual_clip import Config_MCLIP, pt_multilingual_clip
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from support import tiny_xlm_roberta

    from unicom.embed import embed_texts
    from unicom.models.multilingual import load_multilingual

    texts = captions(args.texts, seed=1)
    lines = [f"# {Path(__file__).relative_to(ROOT)}", "",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; best of "
             f"{args.repeat} runs each; ratio: the package's time over unicom's (above 1: unicom is the faster)", "",
             f"XLM-RoBERTa, {args.layers} layers of {args.width}, random weights; projection to {args.dims}; "
             f"{args.texts:,} texts of 5-40 words, batches of {args.batch_size}"]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tmp = Path(tmp)
        tokenizer = tiny_xlm_roberta(tmp / "base", width=args.width, layers=args.layers, max_positions=130,
                                     vocabulary=2000, corpus=captions(2000, seed=0))
        lines[-1] += f"; vocabulary {len(tokenizer):,}, texts cut to 128 tokens"

        # M-CLIP: its own class, saved as the Hub repositories hold it
        config = Config_MCLIP.MCLIPConfig(modelBase=str(tmp / "base"), transformerDimSize=args.width, imageDimSize=args.dims)
        reference = pt_multilingual_clip.MultilingualCLIP(config).eval()
        config.save_pretrained(tmp / "mclip")
        torch.save(reference.state_dict(), tmp / "mclip" / "pytorch_model.bin")
        tokenizer.save_pretrained(tmp / "mclip")
        ours = load_multilingual(tmp / "mclip")

        def mclip_reference():
            def cut(batch, **options):  # the positions hold 128 tokens; the class itself cuts none
                return tokenizer(batch, truncation=True, max_length=128, **options)

            rows = [reference.forward(texts[i:i + args.batch_size], cut) for i in range(0, len(texts), args.batch_size)]
            return torch.nn.functional.normalize(torch.cat(rows), dim=-1).numpy()

        lines += side_by_side("M-CLIP folder", texts, args.repeat,
                              lambda: embed_texts(ours, texts, batch_size=args.batch_size),
                              "MultilingualCLIP.forward", mclip_reference)

        # sentence-transformers: Transformer, mean Pooling, Dense without bias or activation
        torch.manual_seed(1)
        sentence = SentenceTransformer(modules=[Transformer(str(tmp / "base"), max_seq_length=128),
                                                Pooling(args.width, "mean"),
                                                Dense(args.width, args.dims, bias=False, activation_function=torch.nn.Identity())])
        sentence.eval().save(str(tmp / "st"))
        ours = load_multilingual(tmp / "st")
        lines += side_by_side("sentence-transformers folder", texts, args.repeat,
                              lambda: embed_texts(ours, texts, batch_size=args.batch_size),
                              "SentenceTransformer.encode",
                              lambda: sentence.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                                      convert_to_numpy=True))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
