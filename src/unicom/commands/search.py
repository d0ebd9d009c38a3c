"""``unicom search``: query an index with images, texts or indexed items; ranked results as a table or JSON.

Examples::

    unicom search --index INDEX/ query.jpg -k 10
    unicom search --index INDEX/ --text "a red car" --text "a dog on a beach" --json
    unicom search --index INDEX/ query.jpg --text "at night" --text-weight 0.3
    unicom search --index INDEX/ --like 1234 --deduplicate
    unicom search --index INDEX/ --text "a cat" --text "a kitten" --min-score 0.28 --out cats.parquet
    unicom search --index INDEX/ --text-file prompts.txt --min-score 0.3 -k 1000 --out subset.parquet
    unicom search --index INDEX/ --text "a cat" --min-score 0.28 --out cats.parquet --copy-images cats/
    unicom search --index INDEX/ --text "un chat noir" --multilingual   # the text model of its captions

Each image, each ``--text`` (and line of a ``--text-file``) and each ``--like`` item is a query of its own. With
``--text-weight``, images and items are combined with the texts instead (in pairs, or one
with each of the others): ``(1 - w)·image + w·text``. ``--model`` defaults to the model that
embedded the collection, when ``unicom embed`` recorded it; its weights must be the ones
recorded.

``--min-score S`` keeps the results scoring at least S; without ``-k`` it gives every one of
them, however many (a range search: :meth:`unicom.search.index.Index.search_range`).
``--out FILE.parquet`` writes the items found, one row each with its best score, the query
that gave it and its metadata, instead of printing them (:mod:`unicom.search.subset`): the
subset of a collection that the queries describe, which img2dataset downloads.
``--copy-images FOLDER`` copies the image file of each item found into FOLDER, named by its
id (as clip-retrieval's ``filter`` does), from where the collection keeps it: the image paths
of its metadata (relative ones from ``--image-root``), the shards it was embedded from
(``--shards``), or a remote image folder; the URLs of its ``url`` column are left to img2dataset.
``--with-metadata`` writes each item's caption (``000001234.txt``) and metadata row
(``000001234.json``) beside its image, as img2dataset's ``files`` output does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

DEFAULT_K = 10  # results per query unless -k or --min-score says otherwise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queries", nargs="*", metavar="QUERY", help="query image files (each a query of its own)")
    parser.add_argument("--index", required=True, help="index folder written by `unicom index`")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="a text query, embedded by the model's text tower (repeat for several)")
    parser.add_argument("--text-file", action="append", default=[], metavar="FILE",
                        help="text queries, one a line (blank lines left out; a path or a URL; repeat for several)")
    parser.add_argument("--like", action="append", default=[], type=int, metavar="ID",
                        help="more like the indexed item ID (repeat for several)")
    parser.add_argument("--text-weight", type=float, default=None, metavar="W",
                        help="combine each image or item with a text: (1 - W)·image + W·text, W in [0, 1]")
    parser.add_argument("--model", default=None,
                        help="the model that embedded the collection (default: the one recorded in the index)")
    parser.add_argument("--pretrained", default=None, help="its weights: a tag or a local checkpoint file")
    add_multilingual_argument(parser, "embeds the --text queries (in about a hundred languages) instead of the model's "
                                      "own text tower")
    parser.add_argument("--multilingual", action="store_true",
                        help="embed the --text queries with the multilingual text model that embedded the index's "
                             "captions (embed's --text-model), or --multilingual-model's; without either, "
                             "that model embeds them only where the collection's model has no text tower")
    parser.add_argument("-k", type=int, default=None,
                        help=f"results per query (default: {DEFAULT_K}; with --min-score, every result above it)")
    parser.add_argument("--min-score", type=float, default=None, metavar="S",
                        help="only results scoring at least S (a cosine similarity, -1 to 1); without -k, all of them")
    parser.add_argument("--out", default=None, metavar="FILE.parquet",
                        help="write the items found (id, best score, query, metadata; local or a URL) instead of "
                             "printing them: with --min-score, the subset of the collection the queries describe")
    parser.add_argument("--copy-images", default=None, metavar="FOLDER",
                        help="copy the image file of each item found into FOLDER (local or a URL), named by its id "
                             "(000001234.jpg, the id column of --out); a rerun copies what is missing")
    parser.add_argument("--with-metadata", action="store_true",
                        help="--copy-images: write beside each image its caption (000001234.txt) and metadata row "
                             "(000001234.json), img2dataset's layout: a folder `unicom embed` reads with its captions")
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="--copy-images: the folder that relative image paths in the metadata start from "
                             "(default: the current folder)")
    parser.add_argument("--shards", default=None, metavar="DIR",
                        help="--copy-images: the folder of the shards (tars, parquet files) the collection was embedded "
                             "from, local or a URL, for items that are samples of shards")
    add_laion_arguments(parser, {
        "aesthetic": "--aesthetic-score moves the queries towards a rating",
        "violence": "the results it marks are left out",
        "safety": "results are left out"})
    parser.add_argument("--aesthetic-score", type=int, default=None, metavar="R",
                        help="move each query towards LAION's embedding of aesthetic rating R (0-9; with "
                             "--aesthetic-embeddings), as clip-retrieval's front end does")
    parser.add_argument("--aesthetic-weight", type=float, default=None, metavar="W",
                        help="how far: query + W x the rating's embedding, re-normalised (default: 0.5)")
    parser.add_argument("--modality", choices=("image", "text"), default=None,
                        help="the embeddings searched: image, or text where the index holds caption embeddings "
                             "(clip-retrieval's text.index; default: the index's first)")
    parser.add_argument("--nprobe", type=int, default=None, metavar="N",
                        help="IVF indexes: inverted lists scanned per query (default: the index's own, tuned when it was "
                             "built); more find more, slower")
    parser.add_argument("--ef-search", type=int, default=None, metavar="N",
                        help="HNSW indexes: candidates kept while walking the graph (default: the index's own, and at "
                             "least -k)")
    parser.add_argument("--deduplicate", action="store_true", help="leave out results that nearly repeat a better one")
    parser.add_argument("--hide-duplicate-urls", action="store_true",
                        help="leave out results whose url (a metadata column) repeats a better one's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="torch device (default: a GPU if there is one, else the CPU)")


NO_TEXT_MODEL = "none"  # --multilingual-model none: not even the index's recorded one


def add_multilingual_argument(parser: argparse.ArgumentParser, use: str) -> None:
    parser.add_argument("--multilingual-model", default=None, metavar="MODEL",
                        help="a multilingual text model into the collection's space (M-CLIP or sentence-transformers: "
                             "a folder, or hf-hub:M-CLIP/XLM-Roberta-Large-Vit-L-14 for ViT-L/14, ...-Vit-B-32 for "
                             "ViT-B/32; needs unicom[multilingual]) that " + use + "; none: no multilingual model, "
                             "not even the one that embedded the index's captions (which embed's --text-model "
                             "records)")


def load_multilingual_models(args: argparse.Namespace, indexes: dict, given: dict | None = None) -> dict:
    """Index name -> its multilingual text model, or None: ``given``'s spec for the indexes it
    names (``unicom serve --indices-paths``' ``enable_mclip_option``), else ``--multilingual-model``'s,
    checked against each (each spec loaded once); without either each index's recorded one
    (:func:`unicom.search.queries.recorded_text_model`; each loaded once, its weights checked);
    ``none``: no model but ``given``'s."""
    from unicom.errors import InputError
    from unicom.models.multilingual import load_multilingual
    from unicom.search import queries

    given = {name: spec for name, spec in (given or {}).items() if spec is not None}
    models, loaded = {}, {}
    for name, index in indexes.items():
        spec = given.get(name, args.multilingual_model)
        if spec == NO_TEXT_MODEL:
            models[name] = None
            continue
        if spec is not None:
            if spec not in loaded:
                loaded[spec] = load_multilingual(spec, _device(args))
            queries.check_text_model(index, loaded[spec])
            models[name] = loaded[spec]
            continue
        recorded = queries.recorded_text_model(index)
        if recorded is not None and recorded not in loaded:
            try:
                loaded[recorded] = load_multilingual(recorded[0], _device(args))
            except InputError as error:
                raise InputError(f"{index.location}: its captions were embedded by the text model {recorded[0]}, which "
                                 f"multilingual queries use: {error}. Give the model with --multilingual-model, or "
                                 "--multilingual-model none to query without one") from error
        if recorded is not None:
            queries.check_recorded_text_model(index, loaded[recorded])
            queries.check_text_model(index, loaded[recorded])
        models[name] = loaded.get(recorded)
    return models


def _device(args: argparse.Namespace) -> str:
    if args.device is not None:
        return args.device
    from unicom import distributed

    return distributed.local_device()


def add_laion_arguments(parser: argparse.ArgumentParser, uses: dict[str, str]) -> None:
    """The options of LAION's files for a model and of the metadata's safety column;
    ``uses``: what each does in the command (keys ``aesthetic``, ``violence``, ``safety``)."""
    parser.add_argument("--aesthetic-embeddings", metavar="FOLDER",
                        help="LAION's aesthetic embeddings for the model (rating0.npy .. rating9.npy), local or a URL: "
                             + uses["aesthetic"])
    parser.add_argument("--violence-prompts", metavar="FILE",
                        help="LAION's violence detector for the model (violence_detection_vit_b_32.npy, prompt embeddings), "
                             "local or a URL: " + uses["violence"])
    parser.add_argument("--safety-column", metavar="NAME",
                        help=f"the metadata column by which {uses['safety']}: a probability above 0.5 (LAION-5B's punsafe) "
                             "or a text among --unsafe-values (LAION-400M's NSFW)")
    parser.add_argument("--unsafe-values", metavar="A,B",
                        help="the values of a text --safety-column that leave a result out (default: NSFW, LAION-400M's tag "
                             "for the unsafe; add UNSURE to leave out its doubtful ones too)")


def laion_files(args: argparse.Namespace):
    """(aesthetic embeddings, violence prompts, unsafe values) of :func:`add_laion_arguments`'
    options, the files read (a wrong one named before any model loads)."""
    from unicom.errors import InputError
    from unicom.search import queries

    if args.unsafe_values is not None and args.safety_column is None:
        raise InputError("--unsafe-values: the values of a text --safety-column; name the column with --safety-column")
    if args.unsafe_values is not None and not args.unsafe_values.strip(" ,"):
        raise InputError("--unsafe-values names no value; give them comma-separated (NSFW,UNSURE)")
    aesthetic = None if args.aesthetic_embeddings is None else queries.load_aesthetic_embeddings(args.aesthetic_embeddings)
    violence = None if args.violence_prompts is None else queries.load_violence_prompts(args.violence_prompts)
    unsafe_values = queries.UNSAFE_VALUES if args.unsafe_values is None else tuple(
        value.strip() for value in args.unsafe_values.split(",") if value.strip())
    return aesthetic, violence, unsafe_values


def model_spec(args: argparse.Namespace, index) -> tuple[str, str | None]:
    """(spec, pretrained) from ``--model``/``--pretrained``, else from the index's record."""
    from unicom.errors import InputError

    if args.model:
        return args.model, args.pretrained
    recorded = index.config.get("model") or {}
    if not recorded.get("spec"):
        raise InputError(f"{index.location}: the index does not record the model of its embeddings; pass --model (and --pretrained)")
    return recorded["spec"], args.pretrained or recorded.get("pretrained")


def model_known(args: argparse.Namespace, index) -> bool:
    """Whether ``--model`` or the index's record names the model of the collection."""
    return bool(args.model or (index.config.get("model") or {}).get("spec"))


def load_checked_encoder(args: argparse.Namespace, index, spec: tuple[str, str | None] | None = None):
    """The model ``spec`` (spec, pretrained), else of ``--model``/``--pretrained`` (or the
    index's record), checked against the index (its queries' encoder:
    :func:`unicom.search.queries.query_encoder`)."""
    from unicom.models.encoders import load_encoder
    from unicom.search.queries import check_model

    spec, pretrained = spec or model_spec(args, index)
    encoder = load_encoder(spec, pretrained, _device(args))
    check_model(index, encoder)
    return encoder


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from unicom.data.lists import read_lines
    from unicom.data.transforms import DecodeError, check_resized_pixels, decode_image, short_side_size
    from unicom.errors import InputError
    from unicom.search import queries, subset
    from unicom.search.index import IVF_TYPES, Index

    if args.k is not None and args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    for name, value in (("--nprobe", args.nprobe), ("--ef-search", args.ef_search)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if args.min_score is not None and not -1 <= args.min_score <= 1:
        raise InputError(f"--min-score is a cosine similarity, from -1 to 1; got {args.min_score:g}")
    k = args.k if args.k is not None or args.min_score is not None else DEFAULT_K
    if k is None and args.deduplicate:
        raise InputError("--deduplicate compares each result with every better one: with --min-score, give -k to say "
                         "how many results to keep (or leave near duplicates in)")
    if args.out is not None:
        if args.json:
            raise InputError("--json prints the results and --out writes them: give one")
        subset.check_output(args.out)
    for name, value, does in (("--image-root", args.image_root, "says where --copy-images finds the images"),
                              ("--shards", args.shards, "says where --copy-images finds the images"),
                              ("--with-metadata", args.with_metadata or None, "writes files beside --copy-images' copies")):
        if value is not None and args.copy_images is None:
            raise InputError(f"{name} {does}: give --copy-images FOLDER, or leave it out")
    if args.copy_images is not None:
        if args.json:
            raise InputError("--json prints the results and --copy-images copies their images: give one")
        subset.check_copy_folder(args.copy_images)
        if args.image_root is not None and not os.path.isdir(args.image_root):
            raise InputError(f"--image-root {args.image_root}: not a folder; give the folder that the metadata's "
                             "relative image paths start from")
    if not (args.queries or args.text or args.text_file or args.like):
        raise InputError("nothing to search for: give query images, --text, --text-file or --like")
    if args.aesthetic_score is not None and args.aesthetic_embeddings is None:
        raise InputError("--aesthetic-score moves the queries towards LAION's embedding of a rating: give "
                         "--aesthetic-embeddings FOLDER (rating0.npy .. rating9.npy for the model)")
    if args.aesthetic_weight is not None and args.aesthetic_score is None:
        raise InputError("--aesthetic-weight says how far the queries move towards --aesthetic-score's rating: give "
                         "--aesthetic-score too, or leave it out")
    rating = None if args.aesthetic_score is None else (queries.aesthetic_rating(args.aesthetic_score, "--aesthetic-score"),
                                                         queries.aesthetic_weight(args.aesthetic_weight, "--aesthetic-weight"))
    if args.aesthetic_embeddings is not None and args.aesthetic_score is None:
        raise InputError("--aesthetic-embeddings: give --aesthetic-score R, the rating (0-9) to move the queries towards")
    aesthetic, violence, unsafe_values = laion_files(args)
    texts = [text for text in args.text if text.strip()]
    if len(texts) != len(args.text):
        raise InputError("--text: an empty text is no query")
    for file in args.text_file:
        lines = read_lines(file, f"--text-file {file}")
        if not lines:
            raise InputError(f"--text-file {file}: no text in the file (one query a line)")
        texts += lines
    for name, given in (("--multilingual-model", args.multilingual_model not in (None, NO_TEXT_MODEL)),
                        ("--multilingual", args.multilingual)):
        if given and not texts:
            raise InputError(f"{name} embeds the --text (and --text-file) queries with a multilingual model: give them, "
                             "or leave it out")
    if args.multilingual and args.multilingual_model == NO_TEXT_MODEL:
        raise InputError("--multilingual asks for a multilingual model and --multilingual-model none for none: give one")
    combined = args.text_weight is not None
    if combined:
        queries.parse_text_weight(args.text_weight, "--text-weight")
        visual = len(args.queries) + len(args.like)
        if not texts or not visual:
            raise InputError("--text-weight combines images or --like items with --text: give both")
        if visual != len(texts) and 1 not in (visual, len(texts)):
            raise InputError(f"--text-weight pairs images and items with texts: {visual} against {len(texts)}; "
                             "give as many of each, or one of either")
    images = []
    for query in args.queries:  # every query is read before the model is built
        if os.path.isdir(query):
            raise InputError(f"{query}: a folder; a query is one image file (give several: {query.rstrip('/')}/*.jpg)")
        try:
            images.append(decode_image(query)[0])
        except DecodeError as error:
            raise InputError(f"{query}: {error}") from error
    index = Index.load(args.index)
    modality = args.modality or index.modalities[0]
    if modality not in index.modalities:
        raise InputError(f"--modality {modality}: {args.index} holds {' and '.join(index.modalities)} embeddings only")
    dims = index.modality_dims(modality)
    tuning = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    tuned = (("--nprobe", args.nprobe, IVF_TYPES, "IVF"), ("--ef-search", args.ef_search, ("hnsw",), "HNSW"))
    for name, value, kinds, kind in tuned:
        if value is not None and index.modality_type(modality) not in kinds:
            raise InputError(f"{name} tunes {kind} indexes; {args.index}'s {modality} index is a "
                             f"{index.modality_type(modality)} index: leave it out")
    queries.check_filters({str(args.index): index}, aesthetic, violence, args.safety_column)
    if args.hide_duplicate_urls and not queries.has_column(index, queries.URL_COLUMN):
        raise InputError(f"--hide-duplicate-urls: the metadata of {args.index} has no {queries.URL_COLUMN} column to "
                         "compare; leave it out")
    remove = queries.result_filter(index, violence, args.safety_column, unsafe_values,
                                   queries.URL_COLUMN if args.hide_duplicate_urls else None)
    stored = queries.StoredVectors(index, modality)
    text_model = encoder = None
    if texts and (args.multilingual or args.multilingual_model not in (None, NO_TEXT_MODEL)):
        text_model = load_multilingual_models(args, {args.index: index})[args.index]
        if text_model is None:
            raise InputError(f"--multilingual: {args.index} records no multilingual text model (its captions were not "
                             "embedded with `unicom embed --text-model`); give one with --multilingual-model")
    # the collection's own model, for the images, and for the texts unless it has no text tower (or is not recorded)
    spare = queries.recorded_text_model(index) is not None and args.multilingual_model != NO_TEXT_MODEL
    if images or (texts and text_model is None and (model_known(args, index) or not spare)):
        encoder = queries.query_encoder(index, load_checked_encoder(args, index))
    if texts and text_model is None:
        if spare and (encoder is None or not encoder.has_text):  # the text model of the captions then
            text_model = load_multilingual_models(args, {args.index: index})[args.index]
        else:
            text_model = encoder
        queries.require_text(text_model)
    for query, image in zip(args.queries, images):  # an image too thin for the model's resize, named by its file
        try:
            check_resized_pixels(short_side_size(encoder.image_transform), image.size)
        except DecodeError as error:
            raise InputError(f"{query}: {error}") from error
    visual_vectors = [queries.image_vectors(encoder, images, dims, args.batch_size)] if images else []
    if args.like:
        visual_vectors.append(stored(args.like))
    visual_vectors = np.concatenate(visual_vectors) if visual_vectors else np.zeros((0, dims), np.float32)
    visual_labels = [str(query) for query in args.queries] + [f"item {item}" for item in args.like]
    text_vectors = queries.text_vectors(text_model, texts, dims)
    if combined:
        pairs = max(len(visual_labels), len(texts))
        pick_visual = (lambda i: i) if len(visual_labels) == pairs else (lambda i: 0)
        pick_text = (lambda i: i) if len(texts) == pairs else (lambda i: 0)
        vectors = np.concatenate([queries.combine(visual_vectors[pick_visual(i)], text_vectors[pick_text(i)], args.text_weight)
                                  for i in range(pairs)])
        labels = [f"{visual_labels[pick_visual(i)]} + {texts[pick_text(i)]!r} (text weight {args.text_weight:g})"
                  for i in range(pairs)]
        written = [f"{visual_labels[pick_visual(i)]} + {texts[pick_text(i)]} (text weight {args.text_weight:g})"
                   for i in range(pairs)]
    else:
        vectors = np.concatenate([visual_vectors, text_vectors])
        labels = visual_labels + [repr(text) for text in texts]
        written = visual_labels + texts  # a table's query column holds the texts as given
    if rating is not None:  # each query moved towards the rating, as clip-retrieval's back end moves it
        vectors = np.stack([queries.with_aesthetic(vector, aesthetic[rating[0]], rating[1]) for vector in vectors])
    if k is None:
        found = index.search_range(vectors, args.min_score, modality=modality, **tuning)
        if remove is not None:  # every result reaching the score, less those the filters mark
            marked = [remove(ids, lambda ids=ids: stored(ids)) if len(ids) else np.zeros(0, bool) for _, ids in found]
            found = [(scores[~out], ids[~out]) for (scores, ids), out in zip(found, marked)]
    else:
        found = queries.search(index, vectors, k, deduplicate=args.deduplicate, stored=stored, modality=modality,
                               min_score=args.min_score, remove=None if remove is None else [remove] * len(vectors),
                               **tuning)
    if args.out is not None or args.copy_images is not None:
        items = subset.merge(found)
        if args.out is not None:
            subset.write(index, items, written, args.out)
        print(summary(items, labels, found, args.out))
        return 0 if args.copy_images is None else copy_images(args, index, items)
    results = [index.hits(scores[None, :], ids[None, :])[0] for scores, ids in found]
    if args.json:
        print(json.dumps([{"query": label, "results": queries.json_value(hits)} for label, hits in zip(labels, results)],
                         indent=2, default=str))
        return 0
    for number, (label, hits) in enumerate(zip(labels, results)):
        if number:
            print()
        print(f"{label}:")
        print(format_table(hits))
    return 0


def copy_images(args: argparse.Namespace, index, items) -> int:
    """``--copy-images``: copy the images of ``items``, say what was copied; 1 when some could not be."""
    import sys

    from unicom.search import subset
    from unicom.search.item_images import ItemImages, recorded_shard_columns

    columns = recorded_shard_columns(index) if args.shards is not None else None
    images = ItemImages(args.image_root, args.shards, cache=0, shard_columns=columns)
    done = subset.copy_images(index, items.ids, args.copy_images, images, with_metadata=args.with_metadata)
    already = f" ({done.present} there from an earlier run)" if done.present else ""
    print(f"{done.copied + done.present} of {len(items)} images in {args.copy_images}{already}")
    if not done.failed:
        return 0
    shown = 10
    print(f"{len(done.failed)} items have no image copied:", file=sys.stderr)
    for item_id, why in done.failed[:shown]:
        print(f"  item {item_id}: {why}", file=sys.stderr)
    if len(done.failed) > shown:
        print(f"  ... and {len(done.failed) - shown} more", file=sys.stderr)
    hint = "" if args.image_root or args.shards else " (--image-root, --shards: where the collection's images are)"
    print(f"make their images readable{hint} and run the command again: it copies only what is missing",
          file=sys.stderr)
    return 1


def summary(items, labels: list[str], found, out: str | None) -> str:
    """What was found, and written to ``out`` when given: the items, their scores, and each query's share."""
    import numpy as np

    from unicom.search.queries import score_digits

    if not len(items):
        return "no item found" + (f"; {out} holds the columns and no rows" if out is not None else "")
    digits = score_digits(items.scores)
    where = f"written to {out}" if out is not None else "found"
    lines = [f"{len(items)} items {where} (scores {items.scores.min():.{digits}f} to "
             f"{items.scores.max():.{digits}f}{', sorted by id' if out is not None else ''})"]
    counts = np.bincount(items.queries, minlength=len(labels))
    for number, (label, (scores, _)) in enumerate(zip(labels, found)):
        best = f", the best {scores[0]:.{digits}f}" if len(scores) else ""
        lines.append(f"  {label}: {len(scores)} found, {counts[number]} kept as its own{best}")
    return "\n".join(lines)


def format_table(hits: list[dict]) -> str:
    """rank, score, key, caption and where the image is (its path or url, else the shard it
    was read from: keys may repeat across shards) of each hit, as aligned columns; the scores
    with as many decimals as tell them apart."""
    from unicom.search.queries import score_digits

    width = shutil.get_terminal_size((120, 20)).columns
    digits = score_digits([hit["score"] for hit in hits])
    rows = [["rank", "score", "key", "caption", "path, url or shard"]]
    for hit in hits:
        where = hit.get("image_path") or hit.get("path") or hit.get("url") or hit.get("shard") or ""
        caption = hit.get("caption") or ""
        rows.append([str(hit["rank"]), f"{hit['score']:.{digits}f}", _printable(hit.get("key", hit["id"])), str(caption),
                     _printable(where)])
    caption_room = max(12, width - sum(max(len(row[i]) for row in rows) + 2 for i in (0, 1, 2, 4)) - 2)
    for row in rows[1:]:
        text = _printable(" ".join(row[3].split()))  # an escape sequence or a backspace in a caption as text
        row[3] = text if len(text) <= caption_room else text[: caption_room - 1] + "…"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i != 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines)


def _printable(value) -> str:
    """``value`` on one line, as it reads: control characters (a newline in a key or a path, a
    terminal's escape sequence in a caption) as their escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
