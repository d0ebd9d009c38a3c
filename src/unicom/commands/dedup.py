"""``unicom dedup``: the near duplicates within an embedding folder, or of another folder's images.

Examples::

    unicom dedup --emb EMB/ --out DEDUP/                          # groups of near copies: keep one of each
    unicom dedup --emb EMB/ --threshold 0.9 --out DEDUP/
    unicom dedup --emb EMB/ --index INDEX/ --out DEDUP/           # a web collection: through an index of EMB
    unicom dedup --emb EMB/ --index INDEX/ --check-sample 1000 --out DEDUP/   # and how many pairs it found
    unicom dedup --emb EMB/ --modality text --out CAPTIONS/       # the captions' near duplicates
    unicom dedup --emb EMB/ --keep-largest width --out DEDUP/     # keep the widest image of each group
    unicom dedup --emb TRAIN_EMB/ --against TEST_EMB/ --out DECONTAMINATED/   # training images a test image copies

DEDUP/duplicates.parquet lists the rows to leave out (key, row, the row kept, the most similar
match); pairs.parquet every pair found; summary.md how many a stricter threshold would leave.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--emb", required=True, help="embedding folder (img_emb/, metadata/) written by `unicom embed`; "
                                                      "a path or URL")
    parser.add_argument("--against", metavar="FOLDER", default=None,
                        help="another embedding folder of the same model (a test set): list the rows of --emb with a "
                             "near duplicate there, instead of those within --emb")
    parser.add_argument("--index", metavar="INDEX", default=None,
                        help="an index of --emb (the index command's --out for this --emb): read --emb a block of "
                             "rows at a time and search each in it, so the memory holds the index and the pairs, not "
                             "the rows; exact for a flat index, approximate for the others")
    parser.add_argument("--check-sample", type=int, default=0, metavar="N",
                        help="with --index: also search N rows (a seeded draw) exactly and say how many of their pairs "
                             "the index found (default 0: no check; N rows cost N x rows x dimension multiply-adds)")
    parser.add_argument("--nprobe", type=int, default=None, help="with --index: inverted lists searched (default: the index's)")
    parser.add_argument("--ef-search", type=int, default=None, help="with --index: HNSW candidates kept (default: the index's)")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep-largest", metavar="COLUMN", default=None,
                      help="keep, of each group, the row with the largest value of this metadata column of numbers "
                           "(width, aesthetic score; equal values: the first) instead of its first row")
    keep.add_argument("--keep-smallest", metavar="COLUMN", default=None,
                      help="keep, of each group, the row with the smallest value of this metadata column")
    parser.add_argument("--modality", choices=("image", "text"), default="image",
                        help="the embeddings compared: the images' (default) or the captions' (text_emb/, embedded "
                             "with --modalities image,text)")
    parser.add_argument("--threshold", type=float, default=0.95,
                        help="the cosine similarity from which two images are near duplicates (default: 0.95)")
    parser.add_argument("--out", required=True, help="local output folder: pairs.parquet, duplicates.parquet, summary.md, "
                                                     "summary.json")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="stop with an error past this many pairs, before they fill the memory (12 bytes each; "
                             "default: 50000000)")
    parser.add_argument("--device", default=None,
                        help="where the exact search runs: cuda, cuda:1 or cpu (default: this rank's GPU, else the CPU); "
                             "the rows must fit in its memory")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows searched at once (default: about 256 MiB of similarities)")


def run(args: argparse.Namespace) -> int:
    from unicom.dedup import DEFAULT_MAX_PAIRS, MARKDOWN_NAME, duplicates_markdown, find_duplicates
    from unicom.errors import InputError

    for option, value in (("--max-pairs", args.max_pairs), ("--chunk-size", args.chunk_size), ("--nprobe", args.nprobe),
                          ("--ef-search", args.ef_search)):
        if value is not None and value < 1:
            raise InputError(f"{option} {value}: give a positive number")
    summary = find_duplicates(args.emb, args.out, against=args.against, index=args.index, threshold=args.threshold,
                              max_pairs=DEFAULT_MAX_PAIRS if args.max_pairs is None else args.max_pairs,
                              chunk_size=args.chunk_size, nprobe=args.nprobe, ef_search=args.ef_search,
                              keep_by=args.keep_largest or args.keep_smallest, keep_largest=args.keep_smallest is None,
                              device=args.device, modality=args.modality, check_sample=args.check_sample)
    print(duplicates_markdown(summary), end="")
    print(f"\nwritten to {args.out} ({MARKDOWN_NAME}, duplicates.parquet, pairs.parquet, summary.json)")
    return 0
