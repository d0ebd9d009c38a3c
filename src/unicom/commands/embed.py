"""``unicom embed``: images (and captions) -> img_emb/ text_emb/ metadata/ under --out.

Examples::

    unicom embed --input 'shards/{00000..00099}.tar' --model ViT-B-32 \\
        --pretrained laion400m_e32 --modalities image,text --out EMB/
    torchrun --nproc_per_node 8 -m unicom.cli embed --input 'shards/{00000..09999}.tar' ...
    unicom embed --input photos/ --model timm/vit_base_patch16_224 --pretrained augreg_in21k --out EMB/
    unicom embed --dataset roxford5k --root data --model ViT-B/16 --out EMB/roxford5k
"""

from __future__ import annotations

import argparse
import sys

from unicom.engine.device import PRECISIONS
from unicom.progress import INPUT_BOUND_SHARE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", metavar="INPUT",
        help="shards: webdataset tars or parquet files holding the images (paths, brace patterns like "
        "'shards/{00000..00099}.tar', globs, a folder of them); an image folder; or one CSV/parquet list",
    )
    source.add_argument(
        "--dataset", metavar="NAME",
        help="instead of --input, a benchmark whose queries are crops of images: roxford5k or rparis6k (roxford, "
        "rparis), read from --root: the gallery and the queries cropped to their boxes, keyed as "
        "'unicom evaluate --embeddings' looks for them",
    )
    parser.add_argument("--root", help="with --dataset: the folder holding roxford5k/ (or rparis6k/), or that folder itself")
    parser.add_argument("--out", required=True, help="output folder (img_emb/, text_emb/, metadata/, failures/)")
    parser.add_argument("--model", required=True, help="open_clip name (ViT-B-32), timm/<name> or timm/local-dir:FOLDER, released Unicom name or exported folder")
    parser.add_argument("--pretrained", default=None, help="weights: a tag (laion400m_e32) or a local checkpoint file")
    parser.add_argument("--modalities", default="image", help="comma-separated: image, text, or image,text (default: image)")
    parser.add_argument("--text-model", default=None, metavar="MODEL",
                        help="a multilingual text model into --model's space that embeds the captions instead of its own "
                             "text tower (M-CLIP or sentence-transformers: a folder, or "
                             "hf-hub:M-CLIP/XLM-Roberta-Large-Vit-L-14 for ViT-L/14; needs unicom[multilingual]), as "
                             "clip-retrieval's inference --use_mclip")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default: 256)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes per rank (default: the CPUs of this rank less one on GPU, at most 16; none on CPUs of up to 4 cores)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored embedding type (default: float16)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="compute precision (default: fp16 autocast on GPU, fp32 on CPU)")
    parser.add_argument("--draft", action="store_true",
                        help="decode large JPEGs at 1/2, 1/4 or 1/8 scale inside the decoder (never below the model's input "
                             "size): several times faster on big photos, embeddings differ slightly from the model's reference "
                             "preprocessing (default: full decoding)")
    parser.add_argument("--flip", action="store_true",
                        help="test-time augmentation: each image embedding the mean of the image's features and its "
                             "mirror image's (two forward passes; recorded in the folder, and the index's image queries "
                             "are embedded so too; default: the image alone)")
    parser.add_argument("--scales", metavar="S,S,...",
                        help="multi-scale descriptors: each image embedding the mean of the normalised embeddings of "
                             "the model input resized by each scale, as landmark retrieval computes them (1,0.7071,0.5; "
                             "for networks that take other input sizes: convolutional networks, DINOv2; recorded in "
                             "the folder, and the index's image queries are embedded so too; default: 1)")
    parser.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where JPEGs are decoded and resized: gpu (nvJPEG on the model's GPU, the workers only read "
                             "bytes; other formats and JPEGs it refuses take the CPU path per sample), cpu (Pillow in the "
                             "workers), auto (gpu on a GPU when the model's transform is resize, crop, normalise; default)")
    parser.add_argument("--decode-workers-share", type=float, default=0.0, metavar="SHARE",
                        help="with JPEGs decoded on the GPU: the share of them (0 to 1) that the workers decode with Pillow "
                             "nonetheless, the same samples in every run, to relieve the main process when it limits the "
                             "rate (benchmarks/embed_pipeline.py measures it; default: 0)")
    parser.add_argument("--rows-per-part", type=int, default=None,
                        help="rows per output part for folders and lists (default: 100000); shards are one part each")
    parser.add_argument("--path-column", default="path", help="list column with image paths (default: path)")
    parser.add_argument("--caption-column", help="list or parquet shards' column with captions (default: caption, if the "
                        "list has it; for shards the first of txt, caption, text, TEXT); for tar shards the extension of "
                        "the caption members (caption.txt; default: txt)")
    parser.add_argument("--label-column", help="list column with labels (default: label, if the list has it)")
    parser.add_argument("--key-column", help="list or parquet shards' column with keys (default: key, if there is one, "
                        "else a list's paths or a shard's row numbers)")
    parser.add_argument("--image-column", help="parquet shards' column of encoded images: bytes, or Hugging Face's "
                        "{bytes, path} structs (default: the first of jpg, jpeg, png, webp, image); for tar shards the "
                        "extension of the image members (webp; default: the first of jpg, jpeg, png, webp)")
    parser.add_argument("--metadata-fields", metavar="NAMES", help="fields of the samples kept as metadata columns, "
                        "comma-separated (a tar's json's, a parquet shard's columns, the json file's beside a folder's "
                        "image, a list's other columns; LAION's NSFW, similarity, ...), or 'all', as clip-retrieval's "
                        "enable_metadata (default: none)")
    parser.add_argument("--device", default=None, help="torch device (default: this rank's GPU, else the CPU)")


def run(args: argparse.Namespace) -> int:
    from unicom import distributed
    from unicom.data.parquet_shards import ShardColumns
    from unicom.data.sources import TABLE_SUFFIXES
    from unicom.embed import embed_to_folder
    from unicom.errors import InputError
    from unicom.formats.embeddings import FAILURES_FOLDER

    if args.dataset is not None and args.root is None:
        raise InputError(f"--dataset {args.dataset} needs --root, the folder holding the dataset")
    if args.input is not None and args.root is not None:
        raise InputError("--root goes with --dataset; --input names the images itself")
    list_columns = [option for option, value in (("--path-column", args.path_column != "path"),
                                                 ("--label-column", args.label_column)) if value]
    columns = list_columns + [option for option, value in (("--caption-column", args.caption_column),
                                                           ("--key-column", args.key_column),
                                                           ("--image-column", args.image_column)) if value]
    if args.metadata_fields is not None:
        columns.append("--metadata-fields")
    if args.dataset is not None and columns:
        raise InputError(f"{', '.join(columns)} name columns of an --input list or parquet shards; --dataset reads the "
                         "benchmark's own ground truth: leave them out")
    if args.input is not None and list_columns and not (len(args.input) == 1 and args.input[0].lower().endswith(TABLE_SUFFIXES)):
        raise InputError(f"{', '.join(list_columns)} name columns of a CSV/parquet list, and {' '.join(args.input)} is not "
                         "one: leave them out, or give the list")
    if args.decode == "cpu" and args.decode_workers_share:
        raise InputError(f"--decode-workers-share {args.decode_workers_share} shares the JPEGs that the GPU would decode; "
                         "with --decode cpu the workers decode every image: leave one of them out")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    with distributed.process_group() as (rank, _):
        summary = embed_to_folder(
            args.input if args.dataset is None else args.root,
            args.out,
            args.model,
            pretrained=args.pretrained,
            modalities=modalities,
            batch_size=args.batch_size,
            num_workers=args.workers,
            dtype=args.dtype,
            rows_per_part=args.rows_per_part,
            table_options={
                "path_column": args.path_column,
                "caption_column": args.caption_column or "caption",
                "label_column": args.label_column or "label",
                "key_column": args.key_column or "key",
                # a column named on the command line must be there, not silently left out
                "required": [c for c in (args.caption_column, args.label_column, args.key_column) if c],
            },
            shard_columns=ShardColumns(args.image_column, args.caption_column, args.key_column),
            metadata_fields=() if args.metadata_fields is None else tuple(
                name.strip() for name in args.metadata_fields.split(",")),
            draft=args.draft,
            precision=args.precision,
            device=args.device,
            decode=args.decode,
            dataset=args.dataset,
            decode_workers_share=args.decode_workers_share,
            text_model=args.text_model,
            flip=args.flip,
            scales=args.scales,
        )
    if rank != 0:
        return 0
    print(
        f"embedded {summary.samples} samples into {summary.written} parts of {args.out} "
        f"({summary.skipped} of {summary.parts} parts were already finished) "
        f"at {summary.images_per_second:.1f} samples/s"
        + (f" ({summary.steady_images_per_second:.1f} after the start-up of {summary.startup_seconds:.1f} s)"
           if summary.startup_images and summary.steady_images_per_second > 0 else "")
    )
    if summary.input_wait_share is not None:
        print(input_wait_line(summary.input_wait_share, summary.decode == "gpu"))
    if summary.failed or summary.broken_shards or summary.unfinished:
        problems = [f"{summary.failed} samples could not be used"] if summary.failed else []
        if summary.broken_shards:
            problems.append(f"{summary.broken_shards} shards could not be read to the end")
        print(
            f"{' and '.join(problems) or 'some inputs could not be fetched'}; all are listed in "
            f"{args.out.rstrip('/')}/{FAILURES_FOLDER}/failures_<part>.parquet:",
            file=sys.stderr,
        )
        for failure in summary.failures:
            print(f"  {failure['source']} key={failure['key']!r}: {failure['reason']}", file=sys.stderr)
    if summary.unfinished:
        print(
            f"{summary.unfinished} parts are not finished (their input broke off or could not be fetched): "
            "run the same command again to retry them once the inputs are fixed",
            file=sys.stderr,
        )
        return 1
    return 0


def input_wait_line(share: float, on_device: bool = False) -> str:
    """What the summary says of the time the model waited for input after the start-up
    (:attr:`unicom.embed.EmbedSummary.input_wait_share`), with the remedies when it idled
    much: they differ when the JPEGs were decoded on the model's device (``on_device``)."""
    line = f"after the start-up the model waited {100 * share:.0f}% of the time for its next batch"
    if share < INPUT_BOUND_SHARE:
        return line
    if on_device:
        return line + (": decoding the JPEGs in this process, or the workers' reading, limits this run; "
                       "--decode-workers-share (the workers decode a share of the JPEGs) or more --workers may feed "
                       "it faster")
    return line + (": reading and decoding the images limit this run; more --workers, or --decode gpu on a GPU "
                   "(JPEGs decoded there), may feed it faster")
