"""``unicom convert``: released Unicom checkpoints to and from this project's model format,
and a model's image or text encoder to ONNX.

    unicom convert released-to-unicom ViT-B/32 models/vit-b32
    unicom convert released-to-unicom FP16-ViT-B-32.pt models/vit-b32
    unicom convert released-to-unicom my-vit.pt models/my-vit --arch '{"heads": 8}'
    unicom convert unicom-to-released models/vit-b32-sop FP16-ViT-B-32-sop.pt --dtype float16
    unicom convert unicom-to-onnx models/vit-b32-sop vit-b32-sop.onnx
    unicom convert unicom-to-onnx ViT-B-32 clip-b32.onnx --pretrained laion2b_s34b_b79k
    unicom convert unicom-to-onnx ViT-B-32 clip-b32-text.onnx --pretrained laion2b_s34b_b79k --tower text
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unicom.errors import InputError

DTYPES = {"keep": None, "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _arch(text: str) -> str | dict:
    """A released name, or a JSON object of ViT settings."""
    if not text.lstrip().startswith("{"):
        return text
    import json

    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of ViT settings ({error})") from None
    if not isinstance(settings, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of ViT settings")
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_unicom = sub.add_parser(
        "released-to-unicom",
        help="a released checkpoint (name or .pt file) -> a model folder (unicom_model.json + model.safetensors)",
    )
    to_unicom.add_argument("source", help="a released name (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px) or a .pt file")
    to_unicom.add_argument("output", help="the model folder to write (a local path)")
    to_unicom.add_argument("--arch", type=_arch,
                           help="the sizes of a file, when its shapes do not tell them: a released name, or a JSON "
                                "object of ViT settings, e.g. '{\"heads\": 2}' (those left out are read off the shapes; "
                                "the head count is taken as width / 64 otherwise)")
    to_unicom.add_argument("--download-root", type=Path, help="cache folder for released files (default ~/.cache/unicom)")
    to_unicom.add_argument("--overwrite", action="store_true", help="replace a model already in OUTPUT")

    to_released = sub.add_parser(
        "unicom-to-released",
        help="a model folder of the released architecture -> a .pt state dict with the official key names",
    )
    to_released.add_argument("model", type=Path, help="a model folder written by this project")
    to_released.add_argument("output", help="the .pt file to write (a local path)")
    to_released.add_argument(
        "--dtype", choices=sorted(DTYPES), default="keep",
        help="cast floating-point tensors (the released files are float16); default: keep the stored dtypes",
    )
    to_released.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    to_onnx = sub.add_parser(
        "unicom-to-onnx",
        help="a model's image encoder -> one ONNX file: pixels (batch, 3, S, S) -> L2-normalised embeddings (batch, D); "
             "with --tower text its text encoder: token ids (batch, L) -> L2-normalised embeddings",
    )
    to_onnx.add_argument("model", help="a model folder, a released name or file, hf-hub:org/repo, timm/<name>, an "
                                        "open_clip name (with --pretrained), a transformers CLIP-like or DINOv2 folder "
                                        "(what unicom embed's --model takes)")
    to_onnx.add_argument("output", help="the .onnx file to write (a path or a URL)")
    to_onnx.add_argument("--pretrained", help="the weights of an open_clip or timm model: a tag or a local file")
    to_onnx.add_argument("--tower", choices=("image", "text"), default="image",
                         help="the encoder in the graph: image (default), or text for a model that embeds texts "
                              "(tokenized outside the graph, by the tokenizer its metadata names)")
    to_onnx.add_argument("--flip", action="store_true",
                         help="the graph averages each image's features with its mirror image's (as unicom embed --flip)")
    to_onnx.add_argument("--scales", metavar="S,S,...",
                         help="the graph embeds each image at these scales of its input (as unicom embed --scales)")
    to_onnx.add_argument("--external-data", action="store_true",
                         help="keep the weights in OUTPUT.data beside the graph (default: only when they pass the 2 GiB "
                              "one ONNX file holds)")
    to_onnx.add_argument("--opset", type=int, help="ONNX operator set version (default: the exporter's)")
    to_onnx.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def _refuse_other_files(output: Path, source: str, download_root: Path | None) -> None:
    """Refuse a folder holding files but no model (another run's folder): the model would be
    written beside them. The checkpoint converted (``source``) and the folder released files
    are downloaded to (``download_root``) are the command's own. Checked before any download."""
    from unicom import storage
    from unicom.models import export
    from unicom.models.hub import cache_dir

    if (output / export.CONFIG_NAME).exists() or (output / export.WEIGHTS_NAME).exists():
        return  # a model folder: replaced with --overwrite
    if not output.is_dir() or output.resolve() == cache_dir(download_root).resolve():
        return  # a new folder, or the one downloads are kept in
    own = Path(source).expanduser().resolve()  # a checkpoint converted where it lies
    present = sorted(entry.name for entry in output.iterdir() if not storage.is_temporary(entry.name)
                     and entry.resolve() != own)
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise InputError(f"{output}: a folder that holds no model but other files ({shown}); the model would be written "
                         f"beside them: give an empty or new folder (e.g. {output / 'model'}); --overwrite replaces a "
                         "model only, never other files")


# what a convert whose write the disk refused leaves: the output as it was before
NOTHING_KEPT = "no part of the model is kept"


def _to_onnx(args: argparse.Namespace) -> int:
    from unicom import storage
    from unicom.models.onnx_export import export_onnx

    if not str(args.output).endswith(".onnx"):
        raise InputError(f"{args.output}: name the ONNX file to write with its suffix, .onnx")
    if storage.exists(args.output) and not args.overwrite:
        raise InputError(f"{args.output} exists; pass --overwrite to replace it")
    done = export_onnx(args.model, args.output, tower=args.tower, opset=args.opset, pretrained=args.pretrained,
                       flip=args.flip, scales=args.scales, external_data=args.external_data)
    checked = (f"checked with onnxruntime: the largest difference from the network {done['max_difference']:.1e}"
               if done["max_difference"] is not None else "not checked: onnxruntime is not installed")
    beside = f", the weights in {done['data']}" if done["data"] else ""
    if done["tower"] == "image":
        inputs = f"pixels (batch, 3, {done['input_size']}, {done['input_size']})"
    else:
        length = "L" if done["length"] == "free" else done["length"]
        inputs = f"{', '.join(done['inputs'])} (batch, {length}) int64 of the {done['tokenizer']}"
    print(f"wrote {done['output']} ({done['bytes'] / 2**20:.1f} MiB{beside}, opset {done['opset']}): "
          f"{done['model']}, {inputs} -> L2-normalised {done['embedding_dim']}-d embeddings; {checked}")
    return 0


def run(args: argparse.Namespace) -> int:
    from unicom.files import refused_write
    from unicom.models import convert, export

    if args.direction == "unicom-to-onnx":
        return _to_onnx(args)

    to_folder = args.direction == "released-to-unicom"
    output = export.local_output(args.output, "a model folder" if to_folder else "a released-format file")
    if to_folder:
        if (output / export.CONFIG_NAME).exists() and not args.overwrite:
            raise InputError(f"{output} already holds a model; pass --overwrite to replace it")
        if (output / export.WEIGHTS_NAME).exists() and not args.overwrite:
            raise InputError(
                f"{output} holds a {export.WEIGHTS_NAME} without {export.CONFIG_NAME} (another project's model, "
                "such as a timm folder, or a write that was killed); pass --overwrite to replace it"
            )
        _refuse_other_files(output, args.source, args.download_root)
        with refused_write(output, "the model", NOTHING_KEPT):
            folder = convert.released_to_unicom(args.source, output, arch=args.arch, download_root=args.download_root)
        config = export.read_config(folder)
        settings = config["settings"]
        origin = config["provenance"].get("released_name") or "custom size"
        print(
            f"wrote {folder}: {config['architecture']} ({origin}; {settings['image_size']} px, patch "
            f"{settings['patch_size']}, width {settings['width']}, depth {settings['depth']}, {settings['heads']} heads), "
            f"{config['embedding_dim']}-d embeddings"
        )
        return 0

    if output.exists() and not args.overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it")
    import torch

    dtype = DTYPES[args.dtype]
    with refused_write(output.parent, output.name, NOTHING_KEPT):
        path = convert.unicom_to_released(args.model, output, dtype=getattr(torch, dtype) if dtype else None)
    print(f"wrote {path} (state dict with the released key names; load it with unicom.load({str(path)!r}))")
    return 0
