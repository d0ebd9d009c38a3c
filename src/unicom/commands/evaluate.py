"""``unicom evaluate``: retrieval benchmarks, compact dimensions, linear probe, kNN, zero-shot, image-text retrieval.

Examples::

    unicom evaluate --model ViT-B/32 --dataset cub --root data/CUB_200_2011 --out runs/eval/cub
    unicom evaluate --model ViT-B-32 --pretrained laion400m_e32 --dataset cifar10 --root data --out runs/eval/c10
    unicom evaluate --embeddings runs/eval/cub/embeddings/query --out runs/eval/cub-again
    unicom evaluate --embeddings emb/test --train-embeddings emb/train --task classification --out runs/eval/mine
    unicom evaluate --model ViT-B-32 --pretrained laion400m_e32 --dataset coco-captions --root data/coco --out runs/eval/coco

Writes ``OUT/metrics.json``, ``OUT/metrics.md`` and, for retrieval with ``--dims``,
``OUT/recall_vs_dimension.png``; of several datasets (``--dataset cub,cars196 --root
data/cub,data/cars196``), each one's report in ``OUT/<dataset>/`` and ``OUT/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import functools

from unicom.errors import InputError


def _int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, each once, in the order given."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r} names {', '.join(map(str, repeated))} more than once")
    return values


def _dims_list(text: str) -> tuple[int, ...]:
    """:func:`_int_list`, or ``none`` (no compact-dimension curve)."""
    return () if text.strip().lower() == "none" else _int_list(text)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value}")
        return value

    return parse


def class_list(text: str | None, option: str) -> list[str] | None:
    """``A,B,C`` -> the names; ``@FILE`` (a path or URL) -> its lines, blank lines and
    ``#`` comments left out."""
    if text is None:
        return None
    if text.startswith("@"):
        from unicom.data.lists import read_lines

        names = read_lines(text[1:], f"{option} {text}", comments=True)  # UTF-8, a byte-order mark dropped
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError(f"{option} {text!r}: no class named")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unicom.data.benchmarks import CAPTION_BENCHMARKS, CLASSIFICATION_BENCHMARKS, RETRIEVAL_BENCHMARKS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model the project can load: released name or .pt, exported folder, "
                                        "timm/<name>, open_clip name")
    source.add_argument("--embeddings", help="an embedding folder (img_emb/ + metadata/ with keys), or its URL; with "
                                             "--dataset also the OUT/embeddings folder of an evaluate --model run")
    source.add_argument("--compare", nargs="+", metavar="FOLDER",
                        help="the --out folders of earlier evaluations (or of training runs, their last "
                             "eval.benchmark scores), side by side in OUT/comparison.md (the best of each row in "
                             "bold), comparison.csv and comparison.json")
    parser.add_argument("--pretrained", help="weights for --model (open_clip tag or local file; timm tag or file)")
    parser.add_argument("--dataset", help=f"retrieval: {', '.join(RETRIEVAL_BENCHMARKS)}; "
                                          f"image-text (a model with a text tower): {', '.join(CAPTION_BENCHMARKS)}; "
                                          f"classification: {', '.join(CLASSIFICATION_BENCHMARKS)}; several "
                                          "separated by commas (cub,cars196,sop: each one's report in OUT/<dataset>, "
                                          "their scores in OUT/benchmarks.md)")
    parser.add_argument("--root", help="the dataset's local folder (or the CSV for --dataset csv and captions; a URL too for "
                                       "--dataset folder); of several datasets, their folders separated by commas, in "
                                       "the same order")
    parser.add_argument("--out", required=True,
                        help="local folder for metrics.json, metrics.md, the PNG and embeddings (not a URL)")
    parser.add_argument("--ks", type=_int_list,
                        help="K of Recall@K (of mP@k for roxford5k, rparis6k, holidays, copydays), e.g. 1,2,4,8 (default: the "
                             "benchmark's)")
    parser.add_argument("--dims", type=_dims_list,
                        help="dimensions of the compact-dimension curve (default 32,64,128,256; 'none' to skip)")
    parser.add_argument("--no-pca", action="store_true", help="skip the PCA baseline (and embedding train images for it)")
    parser.add_argument("--pca-samples", type=_at_least(2),
                        help="train images the PCA is fitted on, at most (seeded draw; fewer, with a warning, when "
                        "--embeddings holds fewer)")
    parser.add_argument("--chunk-size", type=_at_least(1), help="queries searched at once (default: ~256 MiB of similarities)")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--classes", metavar="A,B,...",
                        help="retrieval: score only these classes (labels or class names), queries and gallery alike; "
                             "@FILE reads one class per line")
    subset.add_argument("--exclude-classes", metavar="A,B,...",
                        help="retrieval: score all classes but these (as --classes)")

    embedding = parser.add_argument_group("embedding with --model")
    embedding.add_argument("--batch-size", type=_at_least(1), default=64)
    embedding.add_argument("--workers", "--num-workers", dest="num_workers", type=int,
                           help="image decoding processes, as unicom embed's --workers (default: by device)")
    embedding.add_argument("--device", help="cuda, cuda:1 or cpu: where the model runs and the retrieval searches are "
                                            "scored, in full float32 (default: this rank's GPU, else CPU)")
    embedding.add_argument("--download", action="store_true", help="let torchvision download a classification dataset")
    embedding.add_argument("--flip", action="store_true",
                           help="test-time augmentation: each image embedding the mean of the image's features and its "
                                "mirror image's (two forward passes; recorded as flip in metrics.json)")
    embedding.add_argument("--scales", metavar="S,S,...",
                           help="multi-scale descriptors: each image embedding the mean of the normalised embeddings of "
                                "the model input resized by each scale (1,0.7071,0.5 as in landmark retrieval; for "
                                "networks that take other input sizes: convolutional networks, DINOv2; recorded as "
                                "scales in metrics.json; default: 1)")

    folders = parser.add_argument_group("precomputed embeddings without --dataset")
    folders.add_argument("--labels", help="CSV/parquet with key,label (default: metadata's label column); a path or URL")
    folders.add_argument("--gallery-embeddings", help="gallery folder (default: leave-one-out on --embeddings); a path or URL")
    folders.add_argument("--train-embeddings", help="train split: PCA baseline, or probe/kNN training; a path or URL")
    folders.add_argument("--task", choices=("retrieval", "classification"), default="retrieval")

    parser.add_argument("--distractors", metavar="FOLDER",
                        help="an embedding folder (or URL) of images of no query, added to the gallery of roxford5k, "
                             "rparis6k, gldv2, holidays, ukbench or copydays (+1M: revisitop1m's embeddings, by the "
                             "benchmark's model; +10k for copydays: 10,000 other photos)")
    parser.add_argument("--whiten", metavar="FOLDER",
                        help="an embedding folder (or URL) of the same model on which a PCA whitening is learned and "
                             "applied to every embedding searched (images apart from the benchmark's)")
    parser.add_argument("--whiten-method", choices=("pca", "discriminative"),
                        help="pca (the default), or discriminative: learned from the classes of --whiten's images, "
                             "their matching pairs' differences whitened (Radenović et al.'s learned whitening)")
    parser.add_argument("--whiten-labels", metavar="FILE",
                        help="the classes of --whiten's images for --whiten-method discriminative: a CSV/parquet of "
                             "key,label (default: its metadata's label column); a path or URL")
    rerank = parser.add_argument_group("re-ranking a retrieval search (docs/evaluation.md#query-expansion-and-dba, "
                                      "#k-reciprocal-re-ranking and #diffusion)")
    rerank.add_argument("--qe", type=_at_least(0), default=0, metavar="K",
                        help="α-query expansion: each query plus its K nearest gallery items, searched again "
                             "(needs a gallery apart from the queries; default 0: none)")
    rerank.add_argument("--dba", type=_at_least(0), default=0, metavar="K",
                        help="database-side augmentation: each gallery item plus its K nearest others (default 0: none)")
    rerank.add_argument("--qe-alpha", type=float, metavar="A",
                        help="neighbours of --qe weighed by similarity^A (default 3; 0: all as the query itself)")
    rerank.add_argument("--dba-alpha", type=float, metavar="A",
                        help="neighbours of --dba weighed by similarity^A (default 3)")
    rerank.add_argument("--k-reciprocal", type=_at_least(1), metavar="K1",
                        help="k-reciprocal re-ranking (Zhong et al. 2017): each query's distance to a gallery item "
                             "blended with the Jaccard distance of their K1-reciprocal neighbourhoods (20 in the "
                             "paper; after --dba and --qe; default: none)")
    rerank.add_argument("--k-reciprocal-k2", type=_at_least(1), metavar="K2",
                        help="k-reciprocal encodings averaged over each item's K2 - 1 nearest neighbours (default 6, "
                             "or K1 + 1 when smaller; 1: none)")
    rerank.add_argument("--k-reciprocal-lambda", type=float, metavar="L",
                        help="the share of the original distance in the blend, from 0 to 1 (default 0.3)")
    rerank.add_argument("--diffusion", type=_at_least(1), metavar="K",
                        help="diffusion (Iscen et al. 2017): each query's similarity spread over a graph of the "
                             "gallery's reciprocal K nearest neighbours (50 in the paper; after --dba and --qe; "
                             "for tens of queries: --diffusion-rank for thousands; default: none)")
    rerank.add_argument("--diffusion-alpha", type=float, metavar="A",
                        help="how far a query spreads, from 0 up to but not 1 (default 0.99)")
    rerank.add_argument("--diffusion-gamma", type=float, metavar="G",
                        help="the graph's and the query's similarities raised to G (default 3)")
    rerank.add_argument("--diffusion-rank", type=_at_least(1), metavar="R",
                        help="the spectral form: the spread on the graph's R leading eigenvectors, computed once, for "
                             "thousands of queries (a benchmark searched leave-one-out; 1000 is a start; default: "
                             "the exact solve of each query)")

    shown = parser.add_argument_group("retrieval examples and per-query metrics "
                                      "(docs/evaluation.md#retrieval-examples)")
    shown.add_argument("--examples", type=_at_least(1), metavar="N",
                       help="draw N queries beside their first results, marked relevant or not, as examples.html and "
                            "examples.png in --out (default: none)")
    shown.add_argument("--examples-k", type=_at_least(1), metavar="K", help="results shown per query (default: 8)")
    shown.add_argument("--examples-failures", action="store_true",
                       help="draw the queries among those whose first result is not relevant")
    shown.add_argument("--examples-seed", type=int, metavar="S", help="the seed of the draw (default: 0)")
    shown.add_argument("--shards", metavar="DIR",
                       help="with --examples and --embeddings folders embedded from webdataset shards: the folder "
                            "(a path or URL) of those shards, from which the examples' images are read (default: "
                            "the files the metadata names)")
    shown.add_argument("--per-query", action="store_true",
                       help="also write each query's metrics of the search, a row per query, as per_query.parquet in "
                            "--out")

    classification = parser.add_argument_group("classification (linear probe and kNN)")
    classification.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    classification.add_argument("--no-knn", action="store_true", help="skip kNN classification")
    classification.add_argument("--knn-k", type=_at_least(1), help="neighbours of kNN classification (default: 20)")
    classification.add_argument("--temperature", type=float,
                                help="of the kNN vote's exp(similarity / temperature) weights (default: 0.07)")
    classification.add_argument("--zero-shot", action="store_true",
                                help="also classify by the model's text tower: each class the mean embedding of its "
                                     "prompts (with --no-probe --no-knn the train split is not embedded)")
    classification.add_argument("--templates", help="zero-shot prompts: openai (open_clip's 80, the default), simple "
                                                    "(its 7), clip_benchmark (the dataset's own set, from an installed "
                                                    "clip_benchmark), or a file of one template a line holding {c}")
    classification.add_argument("--class-names", help="zero-shot: a file of the class names the prompts say, one a line "
                                                      "in label order, or clip_benchmark (its list for the dataset, from "
                                                      "an installed clip_benchmark; default: the dataset's)")


def run(args: argparse.Namespace) -> int:
    from unicom.models.export import local_output

    args.out = local_output(args.out, "the evaluation report")  # a URL would become a local folder 's3:'
    if args.compare is not None:
        return _compare(args)
    several = _several(args)
    if several is not None:
        return _run_several(args, several)
    report = _prepare(args)()
    _print_report(report, args.out)
    return 0


def _prepare(args: argparse.Namespace):
    """Check the options of one evaluation (one --dataset, or --embeddings folders) and return
    the call that runs it (and writes its report under ``args.out``)."""
    from unicom.data.benchmarks import CAPTION_BENCHMARKS, RETRIEVAL_BENCHMARKS, canonical_name
    from unicom.evaluate.benchmark import evaluate_benchmark, evaluate_embedding_folders

    subset = {"classes": class_list(args.classes, "--classes"),
              "exclude_classes": class_list(args.exclude_classes, "--exclude-classes")}

    if args.dataset is not None and canonical_name(args.dataset) in CAPTION_BENCHMARKS:
        unused = [option for option, given in (
            ("--dims", args.dims is not None), ("--no-pca", args.no_pca), ("--pca-samples", args.pca_samples is not None),
            ("--no-probe", args.no_probe), ("--no-knn", args.no_knn), ("--knn-k", args.knn_k is not None),
            ("--temperature", args.temperature is not None), ("--download", args.download),
            ("--zero-shot", args.zero_shot)) if given]
        if unused:
            raise InputError(f"{', '.join(unused)}: --dataset {args.dataset} scores image-text retrieval at the full "
                             "dimension (no compact-dimension curve, PCA, probe or download); leave them out")
    prompts = [option for option, given in (("--templates", args.templates), ("--class-names", args.class_names)) if given]
    if prompts and not args.zero_shot:
        raise InputError(f"{', '.join(prompts)}: the prompts of zero-shot classification; add --zero-shot")
    if args.zero_shot and (args.dataset is None or args.model is None):
        raise InputError("--zero-shot classifies the images of a classification dataset by the classes' prompts, "
                         "embedded with --model's text tower: give --model and --dataset (cifar10, imagenet, ...)")
    expansion = _expansion(args)
    whiten = _whitening(args)
    examples = _examples(args)
    dims = (32, 64, 128, 256) if args.dims is None else args.dims
    pca_samples = 50_000 if args.pca_samples is None else args.pca_samples
    if args.pretrained is not None and args.model is None:
        raise InputError("--pretrained names the weights of --model; embeddings given with --embeddings are used as they are")
    zero_shot = {"zero_shot": True, "templates": args.templates or "openai", "class_names": args.class_names} \
        if args.zero_shot else {}
    classify = {"probe": not args.no_probe, "knn": not args.no_knn,
                **{name: value for name, value in (("knn_k", args.knn_k), ("temperature", args.temperature)) if value is not None}}
    unused = [option for option, given in (("--no-probe", args.no_probe), ("--no-knn", args.no_knn),
                                           ("--knn-k", args.knn_k is not None),
                                           ("--temperature", args.temperature is not None),
                                           ("--zero-shot", args.zero_shot)) if given]
    retrieval = (canonical_name(args.dataset) in RETRIEVAL_BENCHMARKS if args.dataset is not None
                 else args.embeddings is not None and args.task == "retrieval")
    if unused and retrieval:
        run_is = (f"--dataset {args.dataset} is a retrieval benchmark" if args.dataset is not None else
                  "embedding folders are scored as retrieval unless --task classification (with --train-embeddings)")
        raise InputError(f"{', '.join(unused)}: for classification (linear probe, kNN, zero-shot); {run_is}, which "
                         "classifies nothing")
    if args.download and (args.dataset is None or retrieval):
        run_is = (f"--dataset {args.dataset} is a retrieval benchmark, read from --root as it was placed there"
                  if args.dataset is not None else "embedding folders are read as they are")
        raise InputError(f"--download: torchvision downloads the classification benchmarks only; {run_is} "
                         "(docs/evaluation.md gives each layout); leave --download out")
    if args.dataset is not None:
        unused = [option for option, given in (("--labels", args.labels), ("--gallery-embeddings", args.gallery_embeddings),
                                               ("--train-embeddings", args.train_embeddings),
                                               ("--task", args.task != "retrieval")) if given]
        if unused:
            raise InputError(
                f"{', '.join(unused)}: for embedding folders without --dataset; with --dataset {args.dataset} the "
                "benchmark gives the splits, labels and task, and --embeddings is one folder holding the embeddings "
                "of all its images, found by key (as unicom embed --dataset writes it)")
        if args.root is None:
            raise InputError(f"--dataset {args.dataset} needs --root, the dataset's folder")
        if args.shards is not None:
            raise InputError(f"--shards: the examples of --dataset {args.dataset} show its images in --root; --shards "
                             "is for --embeddings folders embedded from shards, without --dataset: leave it out")
        return functools.partial(
            evaluate_benchmark, args.dataset, args.root, out=args.out, model=args.model, pretrained=args.pretrained,
            embeddings=args.embeddings, ks=args.ks, dims=dims, pca=not args.no_pca, pca_samples=pca_samples,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, chunk_size=args.chunk_size,
            download=args.download, expansion=expansion, distractors=args.distractors, whiten=whiten, flip=args.flip,
            examples=examples, per_query=args.per_query, scales=args.scales,
            **classify, **subset, **zero_shot,
        )
    elif args.distractors is not None:
        raise InputError("--distractors join the gallery of a benchmark whose relevant images are listed per query: "
                         "give --dataset roxford5k, rparis6k, gldv2, holidays, ukbench or copydays with --root")
    elif args.embeddings is not None:
        if args.flip:
            raise InputError("--flip averages each image's embedding with its mirror image's as --model embeds them; "
                             "embeddings already made are read as they are: embed them with unicom embed --flip")
        if args.scales is not None:
            raise InputError("--scales embeds each image at several sizes as --model embeds them; embeddings already "
                             "made are read as they are: embed them with unicom embed --scales")
        return functools.partial(
            evaluate_embedding_folders, args.embeddings, labels=args.labels, gallery_embeddings=args.gallery_embeddings,
            train_embeddings=args.train_embeddings, task=args.task, ks=args.ks or (1, 2, 4, 8), dims=dims,
            pca=not args.no_pca, pca_samples=pca_samples, out=args.out, chunk_size=args.chunk_size,
            expansion=expansion, whiten=whiten, device=args.device, examples=examples, per_query=args.per_query,
            shards=args.shards, **classify, **subset,
        )
    raise InputError("--model needs --dataset and --root (what to embed and how to score it)")


def _several(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """``--dataset A,B,... --root RA,RB,...``: each benchmark with its folder, in order; None
    for one benchmark (its --root as written, commas and all)."""
    from unicom.data.benchmarks import canonical_name
    from unicom.data.benchmarks.classification import CLASSIFICATION_ALIASES

    if args.dataset is None or "," not in args.dataset:
        return None
    names = [name.strip() for name in args.dataset.split(",")]
    if not all(names):
        raise InputError(f"--dataset {args.dataset}: an empty name; give benchmarks separated by commas (cub,cars196)")
    canonical = [CLASSIFICATION_ALIASES.get(canonical_name(name), canonical_name(name)) for name in names]
    repeated = sorted({name for name in canonical if canonical.count(name) > 1})
    if repeated:
        raise InputError(f"--dataset {args.dataset} names {', '.join(repeated)} more than once: each benchmark's "
                         "report is written to OUT/<benchmark>; give each once")
    roots = args.root.split(",") if args.root is not None else []
    if len(roots) != len(names):
        raise InputError(f"--dataset {args.dataset} names {len(names)} benchmarks and --root {len(roots)} folder(s): "
                         f"give their folders separated by commas, in the same order (--dataset cub,cars196 --root "
                         "data/cub,data/cars196)")
    given = [option for option, value in (
        ("--embeddings", args.embeddings), ("--distractors", args.distractors), ("--classes", args.classes),
        ("--exclude-classes", args.exclude_classes), ("--class-names", args.class_names)) if value is not None]
    if given:
        raise InputError(f"{', '.join(given)}: of one benchmark; with several (--dataset {args.dataset}) evaluate "
                         "that one alone")
    return list(zip(canonical, roots))


# the options of one task (argparse's dest names), and the tasks that take them: with several
# datasets, each is evaluated with the options of its task
TASK_OPTIONS = {
    ("classification",): ("no_probe", "no_knn", "knn_k", "temperature", "zero_shot", "templates", "download"),
    ("retrieval",): ("qe", "dba", "qe_alpha", "dba_alpha", "k_reciprocal", "k_reciprocal_k2", "k_reciprocal_lambda",
                     "diffusion", "diffusion_alpha", "diffusion_gamma", "diffusion_rank", "whiten", "whiten_method",
                     "whiten_labels", "examples", "examples_k", "examples_failures", "examples_seed", "per_query"),
    ("retrieval", "classification"): ("dims", "no_pca", "pca_samples"),
}


def _task_arguments(args: argparse.Namespace, benchmarks: list[tuple[str, str]]) -> list[argparse.Namespace]:
    """Each benchmark's arguments, as ``--dataset NAME --root ROOT --out OUT/NAME`` alone with
    the options of its task (those of other tasks at their defaults); an option that no
    benchmark of the list takes is refused."""
    from unicom.data.benchmarks import CAPTION_BENCHMARKS, RETRIEVAL_BENCHMARKS

    default = _defaults()
    each = []
    for name, root in benchmarks:
        task = ("retrieval" if name in RETRIEVAL_BENCHMARKS else "image-text" if name in CAPTION_BENCHMARKS
                else "classification")
        values = {**vars(args), "dataset": name, "root": root, "out": args.out / name}
        for tasks, options in TASK_OPTIONS.items():
            if task not in tasks:
                values.update({option: default(option) for option in options})
        each.append(argparse.Namespace(**values))
    for tasks, options in TASK_OPTIONS.items():
        for option in options:
            unused = all(getattr(sub, option) == default(option) for sub in each)
            if getattr(args, option) != default(option) and unused:
                raise InputError(f"--{option.replace('_', '-')}: for {' and '.join(tasks)} benchmarks; --dataset "
                                 f"{args.dataset} has none")
    return each


def _defaults():
    """The default of an option, by argparse's name for it (``knn_k``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.get_default


def _run_several(args: argparse.Namespace, benchmarks: list[tuple[str, str]]) -> int:
    """Each benchmark evaluated as alone (:func:`_task_arguments`), the model loaded once; every
    one's options checked and every retrieval benchmark's folder read before the first is
    embedded; then ``OUT/benchmarks.json`` and ``OUT/benchmarks.md``: each one's headline scores."""
    from unicom.data.benchmarks import RETRIEVAL_BENCHMARKS, load_retrieval_benchmark
    from unicom.evaluate.benchmark import check_benchmark, one_load_per_model
    from unicom.evaluate.report import SUMMARY_JSON, SUMMARY_MARKDOWN, publish_summary

    each = _task_arguments(args, benchmarks)
    calls = []
    for (name, _), sub in zip(benchmarks, each):
        try:
            calls.append(_prepare(sub))
            check_benchmark(calls[-1].args[0], **calls[-1].keywords)
            if name in RETRIEVAL_BENCHMARKS:  # its folder read (images checked) before anything is embedded
                load_retrieval_benchmark(name, sub.root)
        except InputError as error:
            raise InputError(f"--dataset {name}: {error}") from None
    reports = {}
    with one_load_per_model():
        for (name, _), sub, call in zip(benchmarks, each, calls):
            print(f"== {name} ({len(reports) + 1} of {len(benchmarks)})")
            reports[name] = call()
            _print_report(reports[name], sub.out)
            print()
    summary = publish_summary(args.out, reports)
    print(summary["markdown"], end="")
    print(f"\nwrote {args.out / SUMMARY_JSON}, {args.out / SUMMARY_MARKDOWN}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``--compare FOLDER ...``: the runs' scores side by side (:func:`unicom.evaluate.report.compare_runs`)."""
    from pathlib import Path

    from unicom.evaluate.report import COMPARISON_CSV, COMPARISON_JSON, COMPARISON_MARKDOWN, compare_runs, publish_comparison

    default = _defaults()
    given = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
             if name not in ("compare", "out") and value != default(name)]
    if given:
        raise InputError(f"{', '.join(given)}: --compare reads the scores earlier runs wrote, and evaluates nothing; "
                         "leave them out")
    if any(Path(folder).resolve() == args.out.resolve() for folder in args.compare):
        raise InputError(f"--out {args.out} is one of the --compare folders: the comparison would replace that run's "
                         "report; give another folder")
    print(publish_comparison(args.out, compare_runs(args.compare)), end="")
    print(f"\nwrote {args.out / COMPARISON_MARKDOWN}, {args.out / COMPARISON_CSV}, {args.out / COMPARISON_JSON}")
    return 0


def _print_report(report: dict, out) -> None:
    """Print ``report``'s tables and the files written under ``out``."""
    from unicom.evaluate.image_text import image_text_markdown
    from unicom.evaluate.report import (EXAMPLES_HTML, EXAMPLES_PNG, JSON_NAME, MARKDOWN_NAME, PER_QUERY_NAME, PLOT_NAME,
                                        classification_markdown, report_task, retrieval_markdown)

    table = {"image-text": image_text_markdown, "classification": classification_markdown,
             "retrieval": retrieval_markdown}[report_task(report)](report)
    print(table, end="")
    if report.get("note"):
        print(f"\nnote: {report['note']}")
    written = [out / JSON_NAME, out / MARKDOWN_NAME]
    if report.get("dimensions"):
        written.append(out / PLOT_NAME)
    if report.get("examples"):
        written += [out / EXAMPLES_HTML, out / EXAMPLES_PNG]
    if report.get("per_query"):
        written.append(out / PER_QUERY_NAME)
    print("\nwrote " + ", ".join(str(p) for p in written))


def _whitening(args: argparse.Namespace):
    """The :class:`~unicom.evaluate.benchmark.Whitening` of --whiten, --whiten-method and
    --whiten-labels (None without --whiten)."""
    from unicom.evaluate.benchmark import Whitening

    if args.whiten is None:
        for option in ("--whiten-method", "--whiten-labels"):
            if getattr(args, option[2:].replace("-", "_")) is not None:
                raise InputError(f"{option} sets the whitening of --whiten FOLDER; give --whiten too")
        return None
    if args.whiten_labels is not None and args.whiten_method != "discriminative":
        raise InputError("--whiten-labels names the classes a discriminative whitening learns from; give "
                         "--whiten-method discriminative too")
    return Whitening(args.whiten, args.whiten_method or "pca", args.whiten_labels)


def _examples(args: argparse.Namespace):
    """The :class:`~unicom.evaluate.examples.Examples` of --examples and its options, or None."""
    from unicom.evaluate.examples import DEFAULT_K, Examples

    given = [option for option, value in (("--examples-k", args.examples_k), ("--examples-seed", args.examples_seed),
                                          ("--examples-failures", args.examples_failures or None)) if value is not None]
    if args.examples is None:
        if given:
            raise InputError(f"{', '.join(given)} choose the examples that --examples N draws; give --examples too")
        return None
    return Examples(args.examples, DEFAULT_K if args.examples_k is None else args.examples_k, args.examples_failures,
                    0 if args.examples_seed is None else args.examples_seed)


def _expansion(args: argparse.Namespace):
    """The :class:`~unicom.evaluate.expansion.Expansion` of --qe, --dba, their alphas,
    --k-reciprocal with its k2 and lambda, and --diffusion with its alpha and gamma."""
    from unicom.evaluate import diffusion
    from unicom.evaluate.expansion import DEFAULT_ALPHA, Expansion
    from unicom.evaluate.kreciprocal import DEFAULT_LAMBDA, KReciprocal

    for option, k, alpha in (("--qe", args.qe, args.qe_alpha), ("--dba", args.dba, args.dba_alpha)):
        if alpha is not None and not k:
            raise InputError(f"{option}-alpha weighs the neighbours of {option}; give {option} K (K neighbours) too")
        if alpha is not None and not (alpha >= 0 and alpha != float("inf")):
            raise InputError(f"{option}-alpha {alpha:g}: the power of the similarities that weigh the neighbours is a "
                             "finite number >= 0")
    for given, option, needed, what in (
            (args.k_reciprocal_k2, "--k-reciprocal-k2", args.k_reciprocal, "the k-reciprocal re-ranking; give "
                                                                           "--k-reciprocal K1 (K1 neighbours)"),
            (args.k_reciprocal_lambda, "--k-reciprocal-lambda", args.k_reciprocal, "the k-reciprocal re-ranking; give "
                                                                                   "--k-reciprocal K1 (K1 neighbours)"),
            (args.diffusion_alpha, "--diffusion-alpha", args.diffusion, "the diffusion; give --diffusion K (K "
                                                                        "neighbours)"),
            (args.diffusion_gamma, "--diffusion-gamma", args.diffusion, "the diffusion; give --diffusion K (K "
                                                                        "neighbours)"),
            (args.diffusion_rank, "--diffusion-rank", args.diffusion, "the diffusion; give --diffusion K (K "
                                                                      "neighbours)")):
        if given is not None and needed is None:
            raise InputError(f"{option} sets {what} too")
    if args.k_reciprocal is not None and args.diffusion is not None:
        raise InputError("--k-reciprocal and --diffusion each replace the scores a search ranks by; choose one of them")
    k_reciprocal = None
    if args.k_reciprocal is not None:
        k_reciprocal = KReciprocal(
            args.k_reciprocal, args.k_reciprocal_k2,
            DEFAULT_LAMBDA if args.k_reciprocal_lambda is None else args.k_reciprocal_lambda)
    spread = None
    if args.diffusion is not None:
        spread = diffusion.Diffusion(
            args.diffusion, diffusion.DEFAULT_GAMMA if args.diffusion_gamma is None else args.diffusion_gamma,
            diffusion.DEFAULT_ALPHA if args.diffusion_alpha is None else args.diffusion_alpha, args.diffusion_rank)
    return Expansion(qe=args.qe, dba=args.dba,
                     qe_alpha=DEFAULT_ALPHA if args.qe_alpha is None else args.qe_alpha,
                     dba_alpha=DEFAULT_ALPHA if args.dba_alpha is None else args.dba_alpha,
                     k_reciprocal=k_reciprocal, diffusion=spread)
