"""``unicom search``: query an index with images; ranked results as a table or JSON.

Examples::

    unicom search --index INDEX/ --model ViT-B-32 --pretrained laion400m_e32 query.jpg -k 10
    unicom search --index INDEX/ photos/a.jpg photos/b.png --json > results.json

``--model`` defaults to the model that embedded the collection, when ``unicom embed``
recorded it.
"""

from __future__ import annotations

import argparse
import json
import shutil


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    parser.add_argument("--index", required=True, help="index folder written by `unicom index`")
    parser.add_argument("--model", default=None,
                        help="the model that embedded the collection (default: the one recorded in the index)")
    parser.add_argument("--pretrained", default=None, help="its weights: a tag or a local checkpoint file")
    parser.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="torch device (default: a GPU if there is one, else the CPU)")


def model_spec(args: argparse.Namespace, index) -> tuple[str, str | None]:
    """(spec, pretrained) from ``--model``/``--pretrained``, else from the index's record."""
    from unicom.errors import InputError

    if args.model:
        return args.model, args.pretrained
    recorded = index.config.get("model") or {}
    if not recorded.get("spec"):
        raise InputError(f"{index.path}: the index does not record the model of its embeddings; pass --model (and --pretrained)")
    return recorded["spec"], args.pretrained or recorded.get("pretrained")


def run(args: argparse.Namespace) -> int:
    from unicom.data.transforms import DecodeError, decode_image
    from unicom.errors import InputError
    from unicom.models.encoders import load_encoder
    from unicom.search.index import Index

    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    images = []
    for query in args.queries:  # every query is read before the model is built
        try:
            images.append(decode_image(query)[0])
        except DecodeError as error:
            raise InputError(f"{query}: {error}") from error
    index = Index.load(args.index)
    spec, pretrained = model_spec(args, index)
    device = args.device
    if device is None:
        from unicom import distributed

        device = distributed.local_device()
    encoder = load_encoder(spec, pretrained, device)
    scores, ids = index.search_images(encoder, images, args.k, batch_size=args.batch_size)
    results = index.hits(scores, ids)
    if args.json:
        print(json.dumps([{"query": query, "results": hits} for query, hits in zip(args.queries, results)], indent=2, default=str))
        return 0
    for number, (query, hits) in enumerate(zip(args.queries, results)):
        if number:
            print()
        print(f"{query}:")
        print(format_table(hits))
    return 0


def format_table(hits: list[dict]) -> str:
    """rank, score, key, caption and path or url of each hit, as aligned columns."""
    width = shutil.get_terminal_size((120, 20)).columns
    rows = [["rank", "score", "key", "caption", "path or url"]]
    for hit in hits:
        where = hit.get("image_path") or hit.get("path") or hit.get("url") or ""
        caption = hit.get("caption") or ""
        rows.append([str(hit["rank"]), f"{hit['score']:.4f}", str(hit.get("key", hit["id"])), str(caption), str(where)])
    caption_room = max(12, width - sum(max(len(row[i]) for row in rows) + 2 for i in (0, 1, 2, 4)) - 2)
    for row in rows[1:]:
        text = " ".join(row[3].split())
        row[3] = text if len(text) <= caption_room else text[: caption_room - 1] + "…"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i != 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines)
