"""``unicom cluster``: k-means pseudo-labels from image/text embeddings.

One machine::

    unicom cluster --image-emb IMG --text-emb TXT --metadata META --k 100000 --out OUT

Many machines (each part clusters a slice of the shards; parts numbered from 0)::

    unicom cluster part   --embeddings EMB --k 62500 --part P/N --out OUT     # on every node
    unicom cluster merge  --k 1000000 --out OUT                              # once
    unicom cluster assign --embeddings EMB --part P/N --out OUT              # on every node
    unicom cluster assign --embeddings EMB --out OUT                         # once: statistics

Look at the pseudo-classes (a PNG and an HTML page; --input: the shards the embeddings came from)::

    unicom cluster show --embeddings EMB --input 'shards/{00000..00099}.tar' --clusters 3,17 --out OUT
    unicom cluster show --embeddings EMB --input 'shards/{00000..00099}.tar' --random 12 --out OUT
"""

from __future__ import annotations

import argparse
import os
import re

from unicom.errors import InputError

STAGES = {
    "run": "train, assign and summarise on this machine (the default)",
    "part": "hierarchical mode: cluster part P of N (a slice of the shards) into --k centroids",
    "merge": "hierarchical mode: cluster the union of all parts' centroids into the final --k",
    "assign": "label samples with OUT's centroids (a slice with --part); summarise when all are labelled",
    "stats": "recompute the statistics and histogram of a labelled OUT (and apply --min-cluster-size)",
    "show": "contact sheet of chosen (--clusters) or random (--random) clusters beside their nearest clusters",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "stages:\n" + "\n".join(f"  {name:7s} {text}" for name, text in STAGES.items()) + "\n\n" + __doc__.split("\n", 2)[2]
    parser.add_argument("stage", nargs="?", choices=list(STAGES), default="run", help="what to do (default: run)")
    inputs = parser.add_argument_group("inputs (the embedding folder layout; LAION's released embeddings work as they are)")
    inputs.add_argument("--embeddings", metavar="ROOT", help="a folder with img_emb/, text_emb/ and metadata/ (unicom embed's output)")
    inputs.add_argument("--image-emb", metavar="DIR", help="folder of img_emb_{i}.npy (float16 or float32)")
    inputs.add_argument("--text-emb", metavar="DIR", help="folder of text_emb_{i}.npy")
    inputs.add_argument("--metadata", metavar="DIR", help="folder of metadata_{i}.parquet, rows aligned with the npy files")
    inputs.add_argument("--fusion", choices=["image", "text", "image+text"], default=None,
                        help="what is clustered: image, text, or the mean of both after L2 normalisation "
                             "(default image+text; assign uses the centroids' fusion)")
    inputs.add_argument("--key-column", default=None, metavar="NAME",
                        help="metadata column that names each sample in the labels (default: the first of key, image_path, url)")
    inputs.add_argument("--skip-invalid", action="store_true",
                        help="leave out rows with NaN/Inf values, zero length or no key (counted and reported) instead of stopping")
    inputs.add_argument("--exclude", nargs="+", metavar="TABLE",
                        help="parquet or CSV tables whose key column lists samples to leave out of the k-means sample "
                             "and the labels (unicom dedup's duplicates.parquet); unicom train skips samples without a "
                             "label. run, part and assign (the assignment with the same tables)")
    kmeans = parser.add_argument_group("k-means")
    kmeans.add_argument("--k", type=int, help="number of clusters (pseudo-classes); for `part`, each part's number")
    kmeans.add_argument("--points-per-centroid", type=int, metavar="N", default=256,
                        help="train on a random sample of k x this many samples (all when fewer; default 256)")
    kmeans.add_argument("--iterations", type=int, metavar="N", default=20, help="Lloyd iterations (default 20)")
    kmeans.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the sample and the initial centroids (default 0)")
    kmeans.add_argument("--init", choices=["random", "kmeans++"], default="random",
                        help="initial centroids: random samples (default, as faiss) or greedy k-means++ (better for small k)")
    kmeans.add_argument("--restarts", type=int, metavar="N", default=None,
                        help="train N times from different initial centroids and keep the best fit (faiss's nredo); "
                             "each restart costs a whole training (default: 3 below k = 1,000, else 1; see "
                             "benchmarks/results/kmeans_restarts.txt)")
    kmeans.add_argument("--euclidean", action="store_true", help="plain (L2) k-means instead of spherical (cosine) k-means")
    kmeans.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="auto (default): faiss's GPUs when it has any, else this GPU through torch "
                             "(no faiss-gpu needed), else the CPU")
    parser.add_argument("--part", metavar="P/N", help="this process's part P of N (0 <= P < N): `part` and `assign`")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--tiny-cluster-size", type=int, metavar="N", default=10, help="report clusters with fewer samples than this (default 10)")
    stats.add_argument("--min-cluster-size", type=int, metavar="N", default=0,
                       help="drop from the labels the samples of clusters smaller than this, with the statistics "
                            "(run, stats, assign without --part; default 0: keep all)")
    show = parser.add_argument_group("show (a contact sheet of OUT's clusters)")
    show.add_argument("--clusters", type=_ids, metavar="IDS", help="cluster ids to show, e.g. 3,17")
    show.add_argument("--random", type=int, metavar="N", help="show N random non-empty clusters (drawn with --seed)")
    show.add_argument("--samples", type=int, metavar="N", default=8, help="images per cluster (a seeded draw; default 8)")
    show.add_argument("--neighbours", type=int, metavar="N", default=4,
                      help="nearest clusters (centroid cosine) shown beside each cluster (default 4)")
    show.add_argument("--input", nargs="+", metavar="INPUT",
                      help="the shards the embeddings were made from (paths, patterns, folders or URLs, as given to "
                           "`unicom embed`), or the folder an image folder's images are in now")
    show.add_argument("--thumbnail", type=int, metavar="PX", default=128, help="thumbnail side in pixels, at least 24 (default 128)")
    show.add_argument("--sheet", metavar="PATH.png",
                      help="where to write the PNG; the HTML page goes beside it (default OUT/contact_sheet.png)")
    parser.add_argument("--chunk-rows", type=int, metavar="N", default=65536, help="rows read and assigned at once (default 65536)")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder (a run into an existing OUT resumes)")


def _ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated cluster ids, got {text!r}") from None


def _part(text: str | None, stage: str) -> tuple[int, int] | None:
    world = 1
    if os.environ.get("WORLD_SIZE", "1") != "1":  # torchrun's: no torch import (1.5 s) for a plain launch
        from unicom import distributed

        world = distributed.launched_world_size()
    if text is None and world > 1:  # every process of the launch runs this command
        if stage in ("part", "assign"):  # each process its own part: torchrun's RANK of WORLD_SIZE
            text = f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
        else:
            raise InputError(
                f"`unicom cluster {stage}` runs in one process, but torchrun started {world} "
                "(WORLD_SIZE): each would write the same OUT. Run it without torchrun, or split the work with the "
                "hierarchical stages: `torchrun ... unicom cluster part --k K` (each process clusters part RANK of "
                "WORLD_SIZE), then `unicom cluster merge` once, `torchrun ... unicom cluster assign`, and "
                "`unicom cluster assign` once (see docs/clustering.md)"
            )
    if text is None:
        if stage == "part":
            raise InputError("`unicom cluster part` needs --part P/N (this process's part P of N, from 0)")
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise InputError(f"--part {text!r}: expected P/N, e.g. --part 3/160 (parts are numbered from 0)")
    part, num_parts = int(match.group(1)), int(match.group(2))
    if not 0 <= part < num_parts:
        raise InputError(f"--part {text}: P must be between 0 and N - 1")
    return part, num_parts


def _inputs(args, fusion: str):
    from unicom.cluster import ClusterInputs
    from unicom.formats.embeddings import EmbeddingFolders

    explicit = {"image": args.image_emb, "text": args.text_emb, "metadata": args.metadata}
    if args.embeddings:
        folders = EmbeddingFolders.from_root(args.embeddings)
        for kind, path in explicit.items():  # an explicit folder overrides the root's
            if path:
                setattr(folders, kind, path)
                folders.root = None  # messages then name every folder
    elif any(explicit.values()):
        folders = EmbeddingFolders(**{kind: path for kind, path in explicit.items() if path})
    else:
        raise InputError("no inputs: give --embeddings ROOT, or --image-emb/--text-emb with --metadata")
    return ClusterInputs(folders, fusion=fusion, key_column=args.key_column, chunk_rows=args.chunk_rows,
                         exclude=_excluded_keys(args.exclude))


def _excluded_keys(tables: list[str] | None) -> frozenset[str] | None:
    """The keys of the ``--exclude`` tables (their ``key`` column, as written)."""
    from unicom.data.lists import read_keys

    return read_keys(tables) if tables else None


def _settings(args):
    from unicom.cluster import KMeansSettings

    if args.k is None:
        raise InputError(f"`unicom cluster {args.stage}` needs --k (the number of clusters)")
    return KMeansSettings(
        k=args.k, iterations=args.iterations, points_per_centroid=args.points_per_centroid,
        seed=args.seed, spherical=not args.euclidean, init=args.init, restarts=args.restarts,
    )


def _print_training(record: dict, what: str, denser: str = "lower --k or give more samples") -> None:
    """One line on the centroids of ``record``; a note when they had few training points,
    with ``denser``: how to give them more."""
    seconds = record["seconds"]
    print(
        f"{what}: {record['k']:,} centroids from {record['training_points']:,} training points "
        f"({record['points_per_centroid_used']:.1f} per centroid) in {seconds['read'] + seconds['kmeans']:.1f} s "
        f"on the {record['device']}"
        + (f" ({record['backend']})" if record.get("backend", "cpu") != "cpu" else "")
        + f"; mean cosine to the centroid {record['mean_similarity']:.4f}"
    )
    if record["points_per_centroid_used"] < 39:
        print(f"  note: fewer than 39 training points per centroid; the centroids may be noisy ({denser})")


def _print_summary(summary: dict, out: str) -> None:
    sizes = summary["cluster_sizes"]
    print(
        f"labelled {summary['labelled']:,} of {summary['samples']:,} samples in {summary['parts']} parts "
        f"({summary['invalid_rows']:,} invalid rows skipped"
        + (f", {summary['excluded_rows']:,} excluded" if "excluded_rows" in summary else "")
        + f"); mean cosine to the centroid {summary['mean_similarity']:.4f}"
    )
    print(
        f"cluster sizes: min {sizes['min']:,}, median {sizes['percentiles']['50']:,.0f}, max {sizes['max']:,}; "
        f"{sizes['empty']:,} empty, {sizes['tiny']:,} with fewer than {sizes['tiny_threshold']} samples"
    )
    if summary["min_cluster_size"]:
        print(
            f"dropped {summary['dropped_samples']:,} samples of {summary['dropped_clusters']:,} clusters smaller than "
            f"{summary['min_cluster_size']}"
        )
    written = ["labels/labels_<i>.parquet", "centroids.npy", "cluster_sizes.npy", "clusters.json"]
    if summary["histogram"]:
        written.append(summary["histogram"])
    print(f"wrote {', '.join(written)} in {out}")


def run(args) -> int:
    from unicom.cluster import assign_labels, cluster, merge_parts, summarize, train_part
    from unicom.formats.clusters import ClusterFolder

    part = _part(args.part, args.stage)
    if args.exclude and args.stage not in ("run", "part", "assign"):
        raise InputError(f"--exclude leaves samples out of the k-means sample and the labels: give it to `unicom cluster` "
                         f"(run), `part` and `assign`, not `{args.stage}`")
    if part is not None and args.stage not in ("part", "assign"):
        raise InputError(f"--part applies to `part` and `assign`, not `{args.stage}`")
    if args.min_cluster_size and (args.stage in ("part", "merge", "show") or part is not None):
        where = f"`unicom cluster {args.stage}`" + (f" of part {part[0]}/{part[1]}" if part is not None else "")
        raise InputError(
            f"--min-cluster-size is applied with the statistics, once every part is labelled, not by {where}: give it "
            "to the `unicom cluster assign` without --part (and without torchrun) or to `unicom cluster stats`"
        )
    if args.stage == "run":
        inputs = _inputs(args, args.fusion or "image+text")
        summary = cluster(
            inputs, args.out, _settings(args), skip_invalid=args.skip_invalid, device=args.device,
            tiny_cluster_size=args.tiny_cluster_size, min_cluster_size=args.min_cluster_size,
        )
        reused = not summary["seconds"]["train"]  # 0: the finished centroids of an earlier run were found
        _print_training(ClusterFolder(args.out).read_record(),
                        f"reused the centroids in {args.out} (trained by an earlier run)" if reused else "trained")
        _print_summary(summary, args.out)
    elif args.stage == "part":
        inputs = _inputs(args, args.fusion or "image+text")
        record = train_part(inputs, args.out, _settings(args), *part, skip_invalid=args.skip_invalid, device=args.device)
        _print_training(record, f"part {part[0]}/{part[1]} (shards {record['shards'][0]}..{record['shards'][-1]})")
    elif args.stage == "merge":
        record = merge_parts(args.out, _settings(args), device=args.device)
        # the merge's training points are the parts' centroids: more of them come from the parts' k
        _print_training(record, f"merged {record['hierarchical']['num_parts']} parts",
                        "raise the parts' --k, or lower the merge's --k")
    elif args.stage == "assign":
        record = ClusterFolder(args.out).read_record()
        if args.fusion and args.fusion != record["fusion"]:
            raise InputError(f"the centroids in {args.out} were trained on {record['fusion']} rows; use --fusion {record['fusion']}")
        inputs = _inputs(args, record["fusion"])
        numbers = None
        if part is not None:
            from unicom.cluster import split_shards

            numbers = [s.number for s in split_shards(inputs.shards, *part)]
        report = assign_labels(inputs, args.out, shards=numbers, skip_invalid=args.skip_invalid, device=args.device)
        before = report["parts"] - len(report["written"])
        print(f"labelled {len(report['written'])} of {report['parts']} parts ({report['rows']:,} samples) in {report['seconds']:.1f} s"
              + (f"; {before} of them were labelled already" if before else ""))
        if part is None:
            _print_summary(summarize(args.out, tiny_cluster_size=args.tiny_cluster_size, min_cluster_size=args.min_cluster_size), args.out)
        else:
            print("when every part is labelled, run `unicom cluster assign` once without --part (and without torchrun) for the statistics")
    elif args.stage == "show":
        _show(args)
    else:
        summary = summarize(args.out, tiny_cluster_size=args.tiny_cluster_size, min_cluster_size=args.min_cluster_size)
        _print_summary(summary, args.out)
    return 0


def _show(args) -> None:
    from unicom import storage
    from unicom.cluster.contact_sheet import build_contact_sheet, sheet_paths, write_contact_sheet
    from unicom.formats.embeddings import EmbeddingFolders

    if args.embeddings:
        folders = EmbeddingFolders.from_root(args.embeddings)
        if args.metadata:
            folders.metadata, folders.root = args.metadata, None
    elif args.metadata:
        folders = EmbeddingFolders(metadata=args.metadata)
    else:
        raise InputError("`unicom cluster show` needs --embeddings ROOT (or --metadata DIR): the metadata says where "
                         "each sample came from")
    png = args.sheet or storage.join(args.out, "contact_sheet.png")
    sheet_paths(png)  # a wrong name is said now, not after every thumbnail was read
    sheet = build_contact_sheet(
        args.out, folders, clusters=args.clusters, random=args.random, samples=args.samples,
        neighbours=args.neighbours, seed=args.seed, inputs=args.input, thumbnail=args.thumbnail,
    )
    for block in sheet.blocks:
        near = ", ".join(f"{row.cluster} (cos {row.similarity:.3f})" for row in block[1:])
        print(f"cluster {block[0].cluster} ({block[0].size:,} samples)" + (f": nearest {near}" if near else ""))
    png, page = write_contact_sheet(sheet, png)
    print(f"wrote {png} and {page}")
