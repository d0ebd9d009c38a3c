"""A model's image encoder, or its text encoder, as one ONNX file, to serve it without this
package (onnxruntime, Triton Inference Server, TensorRT).

:func:`export_onnx` writes the image encoder of anything :func:`unicom.models.encoders.load_encoder`
takes (a model folder, a released name or file, ``hf-hub:``, a timm or open_clip model with its
weights, a transformers CLIP-like or DINOv2 folder), optionally as test-time views make it
(averaged with each image's mirror, at several scales), as the graph ``pixels`` ->
``embeddings``: float32 (batch, 3, S, S) pixels prepared by the model's transform (resize, crop,
``(x / 255 - mean) / std``) to float32 (batch, D) embeddings, L2-normalised as ``unicom embed``
writes them; the batch size is free. Only the image tower's weights are in the graph (a CLIP's
text tower is not). The file's metadata (``metadata_props``) records the model, D, S, the
transform and the views. A graph whose weights pass 2 GiB, which one ONNX file cannot hold,
keeps them in a second file beside it, ``OUT.onnx.data`` (ONNX's external data), as does any
graph with ``external_data=True``. Before anything is written, the graph is run by onnxruntime
(when installed) on images drawn at random and compared with the network itself.

With ``tower="text"`` the graph is the text encoder of a model that embeds texts in its image
space (open_clip and transformers CLIP-like models, a UniFEx head on one, a multilingual text
model beside a CLIP): the inputs are the model's tokens as :meth:`Encoder.tokenize` gives them,
int64 (batch, L) ``input_ids`` and, for transformers models, ``attention_mask`` (and
``token_type_ids`` where the model takes them), L free where the tokenizer pads to the longest
text and fixed where it pads to its context (open_clip, SigLIP); the output the L2-normalised
text embeddings. The metadata names the tokenizer (``tokenizer``), which a server runs itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from typing import Any

import torch

from unicom.errors import InputError
from unicom.files import atomic_path

ONNX_FILE_LIMIT = 2**31 - 1  # bytes: protobuf's limit on one message, the whole graph with its weights
MAX_DIFFERENCE = 1e-3  # the largest difference from the network that an exported graph may show
PACKAGES = "pip install 'unicom[onnx]' (onnx, onnxscript, onnxruntime)"


class NormalisedEncoder(torch.nn.Module):
    """``model``'s embeddings, L2-normalised (the graph that is exported)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model(pixels), dim=-1)


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the rows of Encoder.tokenize's (B, k, L) tokens
CHECK_TEXTS = ("a photo of a cat", "a red car parked beside a tall brick building at night, seen from across the street",
               "two dogs", "Schlüssel und Münzen auf einem Holztisch")


class NormalisedText(torch.nn.Module):
    """``encoder``'s text embeddings, L2-normalised, of its tokens given as separate inputs
    (the rows of its ``(B, k, L)`` tokens, or ``(B, L)`` token ids alone)."""

    def __init__(self, encoder: torch.nn.Module, stacked: bool):
        super().__init__()
        self.encoder, self.stacked = encoder, stacked

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        rows = [row for row in (input_ids, attention_mask, token_type_ids) if row is not None]
        tokens = torch.stack(rows, dim=1) if self.stacked else input_ids
        return torch.nn.functional.normalize(self.encoder.encode_text(tokens), dim=-1)


def _tokenizer_name(encoder: torch.nn.Module) -> str:
    """What tokenizes texts for ``encoder``: an open_clip tokenizer's name, or a transformers
    tokenizer's class and source (found on the encoder or the modules it wraps)."""
    for module in encoder.modules():
        spec = getattr(module, "tokenizer_spec", None)
        if spec is not None:
            return f"open_clip.get_tokenizer({spec!r})"
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "name_or_path"):
            limit = getattr(module, "max_tokens", None)
            return (f"transformers {type(tokenizer).__name__} of {tokenizer.name_or_path!r}"
                    + (f", at most {limit} tokens" if limit else ""))
    return type(encoder).__name__


def _image_graph(encoder, count: int) -> tuple[torch.nn.Module, tuple, list[str], tuple, dict, list[tuple]]:
    """The image tower's graph, example inputs, input names, dynamic shapes, metadata and the
    inputs it is checked on (``count`` seeded random images, in two batches of other sizes)."""
    size = _input_size(encoder.image_transform)
    batch = torch.export.Dim("batch", min=1)
    pixels = torch.randn(max(count, 2), 3, size, size, generator=torch.Generator().manual_seed(0))
    return (NormalisedEncoder(encoder.float().eval()).eval(), (torch.zeros(2, 3, size, size),), ["pixels"],
            ({0: batch},), {"input_size": str(size), "transform": repr(encoder.image_transform)},
            [(pixels[:1],), (pixels[1:],)])


def _text_graph(encoder) -> tuple[torch.nn.Module, tuple, list[str], tuple, dict, list[tuple]]:
    """As :func:`_image_graph`, for the text tower: its tokens' rows as inputs, checked on
    :data:`CHECK_TEXTS` (one text, then three of other lengths)."""
    if not encoder.has_text:
        raise InputError(f"{encoder.name} has no text tower to export ({encoder.no_text_reason})")
    tokens = encoder.tokenize(list(CHECK_TEXTS[:2]))
    if tokens.dim() not in (2, 3) or (tokens.dim() == 3 and tokens.shape[1] > len(TOKEN_INPUTS)):
        raise InputError(f"{encoder.name}: its tokens have shape {tuple(tokens.shape)}, not (batch, L) or "
                         f"(batch, k, L): they cannot be given to a graph")
    stacked = tokens.dim() == 3
    names = list(TOKEN_INPUTS[:tokens.shape[1]]) if stacked else ["input_ids"]
    free = encoder.tokenize(CHECK_TEXTS[2:3]).shape[-1] != tokens.shape[-1]  # padded to the longest text
    shapes = {0: torch.export.Dim("batch", min=1)}
    if free:
        shapes[1] = torch.export.Dim("length", min=1, max=max(int(tokens.shape[-1]), 2) * 64)
    split = (lambda t: tuple(t.unbind(1))) if stacked else (lambda t: (t,))  # noqa: E731
    return (NormalisedText(encoder.float().eval(), stacked).eval(), split(tokens), names,
            tuple(dict(shapes) for _ in names),
            {"inputs": json.dumps(names), "length": "free" if free else str(int(tokens.shape[-1])),
             "tokenizer": _tokenizer_name(encoder)},
            [split(encoder.tokenize(CHECK_TEXTS[2:3])), split(encoder.tokenize([CHECK_TEXTS[0], *CHECK_TEXTS[2:]]))])


def _input_size(transform) -> int:
    """The side S of the square pixels ``transform`` makes of an image."""
    from PIL import Image

    shape = tuple(transform(Image.new("RGB", (67, 45))).shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise InputError(f"the model's transform makes pixels of shape {shape}, not (3, S, S): it cannot be exported")
    return shape[1]


def export_onnx(spec: str | os.PathLike, output: str | os.PathLike, *, tower: str = "image", opset: int | None = None,
                check_images: int = 4, pretrained: str | os.PathLike | None = None, flip: bool = False,
                scales=None, external_data: bool = False, external_above: int = ONNX_FILE_LIMIT) -> dict[str, Any]:
    """Write the image encoder (``tower="image"``) or the text encoder (``"text"``) of ``spec``
    (with ``pretrained``: module docstring) as ONNX at ``output`` (a path or a URL), whole or not
    at all. ``flip``, ``scales``: the views of :func:`unicom.models.encoders.with_views` in an
    image graph. ``opset``: the ONNX operator set (default: the exporter's); ``check_images``:
    how many random images an image graph is checked on with onnxruntime. ``external_data``:
    the weights in ``OUTPUT.data`` beside the graph, as they are anyway when they pass
    ``external_above`` bytes (the 2 GiB one file holds). Returns what was written: ``output``,
    ``data`` (the weights' file, or None), ``model``, ``tower``, ``embedding_dim``, ``inputs``
    (the graph's input names), ``input_size`` (image: S) or ``length`` (text: L, or "free"),
    ``tokenizer`` (text), ``bytes`` (written, both files), ``weights_bytes`` (the graph's
    weights), ``opset`` and ``max_difference`` (None without onnxruntime)."""
    import importlib
    import tempfile
    from pathlib import Path

    if tower not in ("image", "text"):
        raise InputError(f"tower {tower!r}: export the image or the text tower")
    if tower == "text" and (flip or scales):
        raise InputError("--flip and --scales are views of images; a text tower has none")
    try:
        import onnx

        importlib.import_module("onnxscript")  # torch's exporter needs it
    except ImportError as error:
        raise InputError(f"exporting to ONNX needs onnx and onnxscript ({error}); {PACKAGES}") from error
    from unicom import storage
    from unicom.formats.embeddings import views_record
    from unicom.models.encoders import check_scales, load_encoder, with_views

    scales = check_scales(scales)
    encoder = load_encoder(spec, pretrained)
    if tower == "image":
        encoder = with_views(encoder, flip, scales)
        graph, example, names, dynamic, described, samples = _image_graph(encoder, check_images)
        described.update({key: json.dumps(value) for key, value in views_record(flip, scales).items()})
    else:
        graph, example, names, dynamic, described, samples = _text_graph(encoder)
    try:
        # the exporter reports its steps on stdout, and warns that inputs sharing a dynamic size share its name
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints", category=UserWarning)
            program = torch.onnx.export(graph, example, input_names=names, output_names=["embeddings"],
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True, external_data=False)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - what the exporter cannot convert, named with the model
        raise InputError(f"{encoder.name}: torch's ONNX exporter cannot convert its {tower} encoder "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    weights = sum(value.const_value.nbytes for value in program.model.graph.initializers.values()
                  if value.const_value is not None)
    split = external_data or weights > external_above
    properties = {"unicom_model": encoder.name, "tower": tower, "embedding_dim": str(encoder.embedding_dim),
                  **described, "output": "L2-normalised embeddings"}
    data_output = f"{os.fspath(output)}.data" if split else None
    with tempfile.TemporaryDirectory(prefix="unicom-onnx-") as folder:
        local = Path(folder) / storage.name(output)
        program.save(str(local), external_data=split)
        proto = onnx.load(str(local), load_external_data=False)
        for key, value in properties.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(local))  # the weights stay in local.data, named as it is in the graph
        onnx.checker.check_model(str(local))
        difference = _check(str(local), graph, names, samples, spec)
        if split:  # the weights first: a graph never names a file that is not there
            with atomic_path(data_output) as temporary:
                shutil.copyfile(f"{local}.data", temporary)
        with atomic_path(output) as temporary:
            shutil.copyfile(local, temporary)
        opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        written = os.path.getsize(local) + (os.path.getsize(f"{local}.data") if split else 0)
    shape = ({"input_size": int(described["input_size"])} if tower == "image" else
             {"length": described["length"], "tokenizer": described["tokenizer"]})
    return {"output": os.fspath(output), "data": data_output, "model": encoder.name, "tower": tower,
            "embedding_dim": encoder.embedding_dim, "inputs": names, **shape, "bytes": written,
            "weights_bytes": weights, "opset": opset_found, "max_difference": difference}


def _check(data: str, graph: torch.nn.Module, names: list[str], samples: list[tuple], spec) -> float | None:
    """The largest difference between the graph at ``data`` run by onnxruntime and ``graph``
    itself on each inputs of ``samples`` (batches of other sizes: the batch size, and a free
    length, is free); None without onnxruntime. Raises :class:`InputError` past
    :data:`MAX_DIFFERENCE`."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import numpy as np

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in samples:
        with torch.no_grad():
            expected = graph(*inputs).numpy()
        got = session.run(["embeddings"], {name: value.numpy() for name, value in zip(names, inputs)})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= MAX_DIFFERENCE:
        raise InputError(f"{spec}: the exported graph's embeddings differ from the network's by {worst:.2g} (over "
                         f"{MAX_DIFFERENCE:g}); nothing was written")
    return worst


__all__ = ["export_onnx", "NormalisedEncoder", "NormalisedText", "MAX_DIFFERENCE", "ONNX_FILE_LIMIT", "TOKEN_INPUTS"]
