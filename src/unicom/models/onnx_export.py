"""A model's image encoder as one ONNX file, to serve it without this package (onnxruntime,
Triton Inference Server, TensorRT).

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
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
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


def _input_size(transform) -> int:
    """The side S of the square pixels ``transform`` makes of an image."""
    from PIL import Image

    shape = tuple(transform(Image.new("RGB", (67, 45))).shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise InputError(f"the model's transform makes pixels of shape {shape}, not (3, S, S): it cannot be exported")
    return shape[1]


def export_onnx(spec: str | os.PathLike, output: str | os.PathLike, *, opset: int | None = None,
                check_images: int = 4, pretrained: str | os.PathLike | None = None, flip: bool = False,
                scales=None, external_data: bool = False, external_above: int = ONNX_FILE_LIMIT) -> dict[str, Any]:
    """Write the image encoder of ``spec`` (with ``pretrained``: module docstring) as ONNX at
    ``output`` (a path or a URL), whole or not at all. ``flip``, ``scales``: the views of
    :func:`unicom.models.encoders.with_views` in the graph. ``opset``: the ONNX operator set
    (default: the exporter's); ``check_images``: how many random images the graph is checked
    on with onnxruntime. ``external_data``: the weights in ``OUTPUT.data`` beside the graph, as
    they are anyway when they pass ``external_above`` bytes (the 2 GiB one file holds). Returns
    what was written: ``output``, ``data`` (the weights' file, or None),
    ``model``, ``embedding_dim``, ``input_size``, ``bytes`` (written, both files),
    ``weights_bytes`` (the graph's weights), ``opset`` and ``max_difference`` (None without
    onnxruntime)."""
    import importlib
    import tempfile
    from pathlib import Path

    try:
        import onnx

        importlib.import_module("onnxscript")  # torch's exporter needs it
    except ImportError as error:
        raise InputError(f"exporting to ONNX needs onnx and onnxscript ({error}); {PACKAGES}") from error
    from unicom import storage
    from unicom.formats.embeddings import views_record
    from unicom.models.encoders import check_scales, load_encoder, with_views

    scales = check_scales(scales)
    encoder = with_views(load_encoder(spec, pretrained), flip, scales)
    size = _input_size(encoder.image_transform)
    graph = NormalisedEncoder(encoder.float().eval()).eval()
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter reports its steps on stdout
            program = torch.onnx.export(graph, (example,), input_names=["pixels"], output_names=["embeddings"],
                                        dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                        external_data=False)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - what the exporter cannot convert, named with the model
        raise InputError(f"{encoder.name}: torch's ONNX exporter cannot convert its image encoder "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    weights = sum(value.const_value.nbytes for value in program.model.graph.initializers.values()
                  if value.const_value is not None)
    split = external_data or weights > external_above
    properties = {"unicom_model": encoder.name, "embedding_dim": str(encoder.embedding_dim), "input_size": str(size),
                  "transform": repr(encoder.image_transform), "output": "L2-normalised embeddings",
                  **{key: json.dumps(value) for key, value in views_record(flip, scales).items()}}
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
        difference = _check(str(local), graph, size, check_images, spec)
        if split:  # the weights first: a graph never names a file that is not there
            with atomic_path(data_output) as temporary:
                shutil.copyfile(f"{local}.data", temporary)
        with atomic_path(output) as temporary:
            shutil.copyfile(local, temporary)
        opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        written = os.path.getsize(local) + (os.path.getsize(f"{local}.data") if split else 0)
    return {"output": os.fspath(output), "data": data_output, "model": encoder.name,
            "embedding_dim": encoder.embedding_dim, "input_size": size, "bytes": written, "weights_bytes": weights,
            "opset": opset_found, "max_difference": difference}


def _check(data: str, encoder: torch.nn.Module, size: int, count: int, spec) -> float | None:
    """The largest difference between the graph at ``data`` run by onnxruntime and ``encoder`` on
    ``count`` seeded random images (in two batches of other sizes: the batch size is free);
    None without onnxruntime. Raises :class:`InputError` past :data:`MAX_DIFFERENCE`."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import numpy as np

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    pixels = torch.randn(max(count, 2), 3, size, size, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for part in (pixels[:1], pixels[1:]):
        with torch.no_grad():
            expected = encoder(part).numpy()
        got = session.run(["embeddings"], {"pixels": part.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= MAX_DIFFERENCE:
        raise InputError(f"{spec}: the exported graph's embeddings differ from the network's by {worst:.2g} (over "
                         f"{MAX_DIFFERENCE:g}); nothing was written")
    return worst


__all__ = ["export_onnx", "NormalisedEncoder", "MAX_DIFFERENCE", "ONNX_FILE_LIMIT"]
