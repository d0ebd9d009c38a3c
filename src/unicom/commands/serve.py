"""``unicom serve``: the search page and HTTP API over indexes (needs ``pip install 'unicom[serve]'``).

Examples::

    unicom serve --index INDEX/
    unicom serve --index laion=/data/laion_index --index photos=/data/photos_index --port 1234
    unicom serve --index INDEX/ --host 0.0.0.0 --port 8080 --image-root /data/images
    unicom serve --index INDEX/ --cors-origin '*'      # clip-retrieval's front end from elsewhere
    unicom serve --index INDEX/ --root-path /unicom    # behind a proxy at https://host/unicom/
    unicom serve --indices-paths indices_paths.json --port 1234   # clip-retrieval back's configuration

Then open http://127.0.0.1:8000/ (API at /docs), or::

    curl -F image=@query.jpg http://127.0.0.1:8000/search
    curl -H 'content-type: application/json' -d '{"text": "a red car"}' http://127.0.0.1:8000/search

clip-retrieval's front end and ``ClipClient`` talk to the same server (``/knn-service``,
``/indices-list``, ``/metadata``); the index names are its ``indice_name``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unicom.commands.search import add_laion_arguments, add_multilingual_argument

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", action="append", default=[], metavar="[NAME=]DIR",
                        help="index folder written by `unicom index`, optionally named (default name: the folder's); "
                        "repeat to serve several")
    parser.add_argument("--indices-paths", default=None, metavar="FILE",
                        help="clip-retrieval's indices_paths.json (clip-retrieval back --indices-paths): the indexes "
                             "by name, each a folder or an object of clip back's options (indice_folder, clip_model, "
                             "enable_mclip_option, columns_to_return, ...); with or without --index")
    parser.add_argument("--model", default=None,
                        help="the model that embedded the collections (default: the one recorded in each index; "
                        "without either, only embedding and item queries are served)")
    parser.add_argument("--pretrained", default=None, help="its weights: a tag or a local checkpoint file")
    add_multilingual_argument(parser, "embeds the texts of /knn-service's use_mclip (clip-retrieval's front end's "
                                      "\"multilingual\" box) and /search's multilingual (the page's Multilingual), for "
                                      "every index (default: for each index, the one that embedded its captions, where "
                                      "it records one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", default=None, help="torch device (default: a GPU if there is one, else the CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="most queries per model batch (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a query waits for others to share its batch while queries come together "
                             "(default: 10)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MB (default: 10)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="largest accepted image in pixels (default: 40,000,000); larger ones are answered 413")
    parser.add_argument("--max-decode-mb", type=float, default=256.0,
                        help="memory that uploads and thumbnails being decoded (and the fetched images of items at URLs or in shards, "
                             "for thumbnails and /image) "
                             "may take at once, in MB (default: 256)")
    parser.add_argument("--max-bodies-mb", type=float, default=256.0,
                        help="memory that the bodies of requests being answered may take at once, in MB, each counted "
                             "twice its length (received, then parsed); requests beyond it wait unread; the files "
                             "fetched for image_url queries have a budget of this size too (default: 256)")
    parser.add_argument("-k", type=int, default=10, help="results per query unless the request says (default: 10)")
    parser.add_argument("--max-k", type=int, default=100, help="most results a /search request may ask for (default: 100)")
    parser.add_argument("--max-result-ids", type=int, default=10_000,
                        help="most results a /knn-service request may ask for (default: 10,000)")
    parser.add_argument("--image-root", default=None,
                        help="folder that relative image paths in the metadata start from (default: the current folder)")
    parser.add_argument("--shards", default=None,
                        help="folder of the shards (tars, parquet files) the collection was embedded from, local or a URL "
                             "(s3://bucket/shards): thumbnails of their samples")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let pages from ORIGIN (e.g. http://localhost:3005, or '*' for any) call the API from a "
                        "browser, as clip-retrieval's front end served elsewhere does; repeat for several")
    parser.add_argument("--root-path", default="", metavar="PREFIX",
                        help="the path a reverse proxy serves this server under, with the prefix stripped (e.g. /unicom "
                        "for https://host/unicom/): /search's thumbnail and link paths and /docs carry it (the page "
                        "works under any prefix without it)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="let /knn-service fetch the image_url of a query (the server then fetches URLs its clients name)")
    add_laion_arguments(parser, {
        "aesthetic": "/knn-service's aesthetic_score and aesthetic_weight (and /search's, the page's Aesthetic) move "
                     "queries towards a rating",
        "violence": "/knn-service's use_violence_detector (and /search's safe, the page's Safe mode) leaves out the "
                    "results it marks",
        "safety": "/knn-service's use_safety_model (and /search's safe) leaves results out"})


def parse_indexes(values: list[str]) -> dict[str, str]:
    """``[NAME=]DIR`` options -> names -> folders (a name defaults to the folder's name)."""
    from unicom.errors import InputError

    named: dict[str, str] = {}
    for value in values:
        name, separator, folder = value.partition("=")
        if not separator or "/" in name or not name:
            name, folder = Path(value.rstrip("/")).name or value, value
        if name in named:
            raise InputError(f"--index {value}: the name {name!r} is taken by {named[name]}; name them (--index NAME=DIR)")
        named[name] = folder
    return named


def root_path_of(value: str) -> str:
    """``--root-path`` as ASGI's ``root_path``: ``unicom/``, ``/unicom/`` -> ``/unicom``; ``/`` -> ``""``."""
    from unicom.errors import InputError

    if "://" in value or "?" in value or "#" in value:
        raise InputError(f"--root-path {value}: give the path only (e.g. /unicom), not a URL")
    path = value.strip("/")
    return f"/{path}" if path else ""


def run(args: argparse.Namespace) -> int:
    from unicom.errors import InputError
    from unicom.search.index import Index
    from unicom.search.indices_paths import SERVER_OPTIONS, read_indices_paths

    try:
        import uvicorn

        from unicom.search.service import create_app
    except ImportError as error:
        raise InputError(f"`unicom serve` needs FastAPI and uvicorn ({error}); pip install 'unicom[serve]'") from error
    from unicom.commands import configure_logging
    from unicom.commands.search import laion_files, load_checked_encoder, load_multilingual_models, model_known, model_spec

    configure_logging()
    root_path = root_path_of(args.root_path)
    # LAION's files for /knn-service's options, read first: a wrong one is named before the model loads
    aesthetic, violence, unsafe_values = laion_files(args)
    entries = read_indices_paths(args.indices_paths) if args.indices_paths is not None else {}
    named = parse_indexes(args.index)
    if not entries and not named:
        raise InputError("no index to serve: give --index DIR (or --indices-paths, clip-retrieval's indices_paths.json)")
    taken = sorted(set(entries) & set(named))
    if taken:
        raise InputError(f"--index {', '.join(taken)}: the name is taken by --indices-paths {args.indices_paths}; name "
                         "it otherwise (--index NAME=DIR)")
    indexes = {name: Index.load(folder) for name, folder in
               [*((name, entry.folder) for name, entry in entries.items()), *named.items()]}
    for name, entry in entries.items():
        for option in entry.server_options:  # what the server's own options give, where they are not given
            given = {"provide_safety_model": args.safety_column, "provide_violence_detector": args.violence_prompts,
                     "provide_aesthetic_embeddings": args.aesthetic_embeddings}[option]
            if given is None:
                print(f"{name}: {option} is given by {SERVER_OPTIONS[option]}, which the server was not started with: "
                      "the option is named unsupported in answers", file=sys.stderr)
    multilingual = load_multilingual_models(args, indexes, {name: entry.multilingual for name, entry in entries.items()})
    for name, index in indexes.items():
        if args.multilingual_model is None and multilingual[name] is not None:
            print(f"{index.location}: multilingual text queries embedded by {multilingual[name].name}, the text model of "
                  "its captions", file=sys.stderr)
    encoders, loaded = {}, {}
    for name, index in indexes.items():
        given = entries[name].model if name in entries else None  # clip_model
        if not (given or model_known(args, index)):
            served = "embedding, item and multilingual text queries" if multilingual[name] else "embedding and item queries"
            print(f"{index.location}: no model recorded and no --model given: serving {served} only", file=sys.stderr)
            encoders[name] = None
            continue
        spec = given or model_spec(args, index)
        if spec not in loaded:
            loaded[spec] = load_checked_encoder(args, index, spec)
        else:
            from unicom.search.queries import check_model

            check_model(index, loaded[spec])
        from unicom.search.queries import query_encoder

        encoders[name] = query_encoder(index, loaded[spec])  # its mirror averaged in where the index's embeddings were
    app = create_app(
        indexes,
        encoders,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 1_000_000),
        max_pixels=args.max_pixels,
        max_decode_bytes=int(args.max_decode_mb * 2**20),
        max_body_bytes=int(args.max_bodies_mb * 2**20),
        default_k=args.k,
        max_k=args.max_k,
        max_result_ids=args.max_result_ids,
        image_root=args.image_root,
        shards=args.shards,
        cors_origins=args.cors_origin,
        allow_image_urls=args.allow_image_urls,
        aesthetic_embeddings=aesthetic,
        violence_prompts=violence,
        safety_column=args.safety_column,
        unsafe_values=unsafe_values,
        multilingual=multilingual,
        columns={name: entry.columns for name, entry in entries.items() if entry.columns is not None},
    )
    if args.host not in LOOPBACK:
        print(f"listening on {args.host}: anyone who can reach this machine can query the index", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    items = ", ".join(f"{name}: {len(index)} items" for name, index in indexes.items()) if len(indexes) > 1 \
        else f"{len(next(iter(indexes.values())))} items"
    behind = f", served by the proxy under {root_path}/" if root_path else ""
    print(f"unicom search on http://{host}:{args.port}/ ({items}{behind})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", root_path=root_path)
    return 0
