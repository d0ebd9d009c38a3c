"""``unicom serve``: the search page and HTTP API over an index (needs ``pip install 'unicom[serve]'``).

Examples::

    unicom serve --index INDEX/ --model ViT-B-32 --pretrained laion400m_e32
    unicom serve --index INDEX/ --host 0.0.0.0 --port 8080 --image-root /data/images
    unicom serve --index INDEX/ --shards /data/laion/shards

Then open http://127.0.0.1:8000/ , or ``curl -F image=@query.jpg http://127.0.0.1:8000/search``.
"""

from __future__ import annotations

import argparse
import logging
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index folder written by `unicom index`")
    parser.add_argument("--model", default=None,
                        help="the model that embedded the collection (default: the one recorded in the index; "
                        "without either, only embedding queries are served)")
    parser.add_argument("--pretrained", default=None, help="its weights: a tag or a local checkpoint file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", default=None, help="torch device (default: a GPU if there is one, else the CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="most queries per model batch (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a query waits for others to share its batch (default: 10)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MB (default: 10)")
    parser.add_argument("-k", type=int, default=10, help="results per query unless the request says (default: 10)")
    parser.add_argument("--max-k", type=int, default=100, help="most results a request may ask for (default: 100)")
    parser.add_argument("--image-root", default=None,
                        help="folder that relative image paths in the metadata start from (default: the current folder)")
    parser.add_argument("--shards", default=None,
                        help="folder of the webdataset shards the collection was embedded from: thumbnails of their samples")


def run(args: argparse.Namespace) -> int:
    from unicom.errors import InputError
    from unicom.search.index import Index

    try:
        import uvicorn

        from unicom.search.service import create_app
    except ImportError as error:
        raise InputError(f"`unicom serve` needs FastAPI and uvicorn ({error}); pip install 'unicom[serve]'") from error
    from unicom.commands.search import model_spec

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    index = Index.load(args.index)
    encoder = None
    if args.model or (index.config.get("model") or {}).get("spec"):
        from unicom.models.encoders import load_encoder

        spec, pretrained = model_spec(args, index)
        device = args.device
        if device is None:
            from unicom import distributed

            device = distributed.local_device()
        encoder = load_encoder(spec, pretrained, device)
    else:
        print(f"{args.index}: no model recorded and no --model given: serving embedding queries only", file=sys.stderr)
    app = create_app(
        index,
        encoder,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 1_000_000),
        default_k=args.k,
        max_k=args.max_k,
        image_root=args.image_root,
        shards=args.shards,
    )
    if args.host not in LOOPBACK:
        print(f"listening on {args.host}: anyone who can reach this machine can query the index", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"unicom search on http://{host}:{args.port}/ ({len(index)} items)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
