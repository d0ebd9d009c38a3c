"""``unicom index``: a faiss index from embedding folders; adds new parts to an existing one.

Examples::

    unicom index --emb EMB/ --dims 256 --out INDEX/
    unicom index --emb EMB/ --out INDEX/ --memory 2GB                 # the best recall within 2 GB
    unicom index --emb EMB/ --out INDEX/ --target-recall 0.95         # the smallest index that reaches 0.95
    unicom index --emb EMB/ --out INDEX/ --layout clip-retrieval      # image.index, text.index, metadata/
    unicom index --emb EMB/ --out INDEX/          # again, after `unicom embed` wrote new parts
    unicom index --emb s3://bucket/emb --out s3://bucket/index        # built locally, uploaded, index.json last
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--emb", required=True, help="embedding folder (img_emb/, metadata/) written by `unicom embed`")
    parser.add_argument("--out", required=True, help="index folder, local or a URL; if it holds an index, the new parts of --emb are added")
    parser.add_argument("--dims", type=int, default=None, help="keep the first DIMS dimensions, re-normalised (default: all)")
    parser.add_argument("--type", dest="index_type", choices=("auto", "flat", "hnsw", "ivfsq", "ivfpq"), default="auto",
                        help="index type (default: auto, chosen from --memory and --target-recall)")
    parser.add_argument("--memory", default=None,
                        help="memory budget of the index, e.g. 512MB or 2GiB; without --target-recall it is spent on "
                             "recall (default: no limit)")
    parser.add_argument("--target-recall", "--recall", dest="target_recall", type=float, default=None,
                        help="recall@k to reach on the held-out sample, against exact search: --type auto keeps the "
                             "smallest index that reaches it (default: none; without --memory either, tuned to 0.9)")
    parser.add_argument("--layout", choices=("unicom", "clip-retrieval"), default=None,
                        help="folder layout: unicom's, or clip-retrieval's (image.index, text.index, metadata/), which "
                             "`clip-retrieval back` serves (default: unicom)")
    parser.add_argument("-k", type=int, default=None, help="k of the recall target (default: 10)")
    parser.add_argument("--heldout", type=int, default=1000,
                        help="rows held out of quantizer training to measure recall (default: 1000, at most a tenth)")
    parser.add_argument("--exact-max-rows", type=int, default=100_000,
                        help="with --type auto, exact search up to this many rows when it fits --memory (default: 100000)")
    parser.add_argument("--nlist", type=int, default=None, help="ivfpq: inverted lists (default: a power of two near 4·sqrt(N))")
    parser.add_argument("--pq-m", type=int, default=None, help="ivfpq: sub-quantizers, i.e. code bytes (default: the largest that fits --memory)")
    parser.add_argument("--nbits", type=int, default=None, help="ivfpq: bits per sub-quantizer code (default: 8)")
    parser.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links per vector and layer (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out and training samples (default: 0)")
    parser.add_argument("--rebuild", action="store_true", help="build anew even if --out holds an index")


def run(args: argparse.Namespace) -> int:
    from unicom.commands import configure_logging
    from unicom import storage
    from unicom.search.index import Index, holds_index
    from unicom.search.planner import format_size

    configure_logging()
    out = args.out if storage.is_url(args.out) else Path(args.out)
    if storage.is_url(out):
        storage.writable(out)  # an index cannot go to http(s): said before anything is read
    if holds_index(out) and not args.rebuild:
        index = Index.load(out)
        _check_unchanged(args, index, out)
        added = index.add_parts(args.emb)
        if not added:
            print(f"{out}: up to date ({len(index)} vectors, parts {_numbers(index)})")
            return 0
        print(f"added parts {added} to {out}")
    else:
        _check_options_apply(args)
        index = Index.build(
            args.emb,
            out,
            dims=args.dims,
            index_type=args.index_type,
            memory_budget=args.memory,
            recall_target=args.target_recall,
            k=10 if args.k is None else args.k,
            heldout=args.heldout,
            exact_max_rows=args.exact_max_rows,
            nlist=args.nlist,
            pq_m=args.pq_m,
            nbits=args.nbits,
            hnsw_m=32 if args.hnsw_m is None else args.hnsw_m,
            seed=args.seed,
            overwrite=args.rebuild,
            layout=args.layout or "unicom",
        )
    config = index.config
    for modality in index.modalities:
        described = (config.get("modalities") or {}).get(modality, config)
        selection = described.get("selection") or config["selection"]
        search = ", ".join(f"{key}={value}" for key, value in described["search"].items())
        goal = (f"target {selection['recall_target']}" if selection.get("objective") != "recall" else
                f"the best within {format_size(selection['memory_budget'])}")
        # once parts were added, the recall is the one measured on the held-out rows of the added parts
        measured = (f"{selection['heldout_after_add']} held-out rows of the added parts" if "heldout_after_add" in selection
                    else f"{selection['heldout']} held-out rows")
        print(
            f"{out}: {modality} {described['type']} index ({described['structure']}{', ' + search if search else ''}) of "
            f"{len(index)} vectors, {described['dims']} dimensions, {format_size(described.get('bytes', config['bytes']))}; recall@{selection['k']} "
            f"{selection['recall']:.4f} on {measured} ({goal})"
        )
    text_model = (config.get("text_model") or {}).get("spec")
    if text_model:  # unicom serve loads it for the index's multilingual text queries
        print(f"{out}: captions embedded by the text model {text_model} (its multilingual queries' model)")
    return 0


# the build options each index type has a use for (--type auto uses those of the type it chooses)
_TYPE_OPTIONS = {"flat": (), "hnsw": ("--hnsw-m",), "ivfsq": ("--nlist",), "ivfpq": ("--nlist", "--pq-m", "--nbits")}


def _check_options_apply(args: argparse.Namespace) -> None:
    """Refuse build options that the type asked for with ``--type`` has no use for: they
    would be ignored by the build, and a rerun of the same command would refuse them."""
    from unicom.errors import InputError

    if args.index_type == "auto":
        return
    given = {"--nlist": args.nlist, "--pq-m": args.pq_m, "--nbits": args.nbits, "--hnsw-m": args.hnsw_m}
    unused = [option for option, value in given.items() if value is not None and option not in _TYPE_OPTIONS[args.index_type]]
    if unused:
        takes = ", ".join(_TYPE_OPTIONS[args.index_type]) or "none of them"
        raise InputError(f"--type {args.index_type} has no use for {', '.join(unused)} (of the build options it takes "
                         f"{takes}): leave {'it' if len(unused) == 1 else 'them'} out, or choose the type that uses "
                         f"{'it' if len(unused) == 1 else 'them'}")


def _check_unchanged(args: argparse.Namespace, index, out) -> None:
    """Refuse options that ask for another index than the one ``out`` holds: they apply to a
    build, and new parts are added to the index as it was built."""
    from unicom.errors import InputError
    from unicom.search.planner import format_size, parse_size

    selection = index.config.get("selection") or {}
    differences = []
    if args.dims is not None and args.dims != index.dims:
        differences.append(f"it keeps {index.dims} dimensions, not --dims {args.dims}")
    if args.layout is not None and args.layout != index.layout:
        differences.append(f"its layout is {index.layout}, not --layout {args.layout}")
    if args.index_type != "auto" and args.index_type != index.type:
        differences.append(f"it is a {index.type} index, not --type {args.index_type}")
    if args.memory is not None and parse_size(args.memory) != selection.get("memory_budget"):
        budget = selection.get("memory_budget")
        differences.append(f"it was built {'for ' + format_size(budget) if budget else 'without a memory budget'}, "
                           f"not --memory {args.memory}")
    if args.target_recall is not None and args.target_recall != selection.get("recall_target"):
        target = selection.get("recall_target")
        differences.append(f"it was built {'for recall ' + str(target) if target else 'without a recall target'}, "
                           f"not --target-recall {args.target_recall}")
    if args.k is not None and args.k != selection.get("k"):
        differences.append(f"its recall is measured at k {selection.get('k')}, not -k {args.k}")
    params = index.config.get("params") or {}
    chosen = selection.get("index_type") == "auto"  # the type was chosen, and options it has no use for left unused
    for option, value, key in (("--nlist", args.nlist, "nlist"), ("--pq-m", args.pq_m, "m"), ("--nbits", args.nbits, "nbits"),
                               ("--hnsw-m", args.hnsw_m, "M")):
        if value is None or value == params.get(key) or (key not in params and chosen):
            continue  # the same command that built the index (`--nlist 64` choosing a flat index) adds to it
        differences.append(f"it was built with {key} {params[key]}, not {option} {value}" if key in params else
                           f"a {index.type} index has no {key}, which {option} {value} sets")
    if differences:
        raise InputError(f"{out}: holds an index; {'; '.join(differences)}. New parts are added to the index as it "
                         "was built: use --rebuild to build it anew with these options")


def _numbers(index) -> str:
    numbers = [part.number for part in index.parts]
    return f"{numbers[0]}..{numbers[-1]}" if len(numbers) > 3 else str(numbers)
