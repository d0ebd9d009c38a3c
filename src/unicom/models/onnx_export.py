"""A model's image encoder as one ONNX file, to serve it without this package (onnxruntime,
Triton Inference Server, TensorRT).

:func:`export_onnx` writes the network of anything :func:`unicom.load` takes (a model folder,
a released name or file, ``hf-hub:``) as the graph ``pixels`` -> ``embeddings``: float32
(batch, 3, S, S) pixels prepared by the model's transform (resize, crop, ``(x / 255 - mean) /
std``, as ``unicom.load`` returns it) to float32 (batch, D) embeddings, L2-normalised as
``unicom embed`` writes them; the batch size is free. The file's metadata (``metadata_props``)
records the model, D, S and the transform. Before it is written, the graph is run by
onnxruntime (when installed) on images drawn at random and compared with the network itself.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import torch

from unicom.errors import InputError

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
                check_images: int = 4) -> dict[str, Any]:
    """Write the image encoder of ``spec`` (module docstring) as ONNX at ``output`` (a path or a
    URL), whole or not at all. ``opset``: the ONNX operator set (default: the exporter's);
    ``check_images``: how many random images the graph is checked on with onnxruntime.
    Returns what was written: ``output``, ``model``, ``embedding_dim``, ``input_size``,
    ``bytes``, ``opset`` and ``max_difference`` (None without onnxruntime)."""
    import importlib

    try:
        import onnx

        importlib.import_module("onnxscript")  # torch's exporter needs it
    except ImportError as error:
        raise InputError(f"exporting to ONNX needs onnx and onnxscript ({error}); {PACKAGES}") from error
    from unicom.files import atomic_path
    from unicom.models.factory import load_described

    model, transform, dims, label = load_described(spec)
    size = _input_size(transform)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if weights > ONNX_FILE_LIMIT:
        raise InputError(f"{spec}: {weights / 2**30:.1f} GiB of weights, over the 2 GiB that one ONNX file can hold")
    encoder = NormalisedEncoder(model.float().eval()).eval()
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter reports its steps on stdout
        program = torch.onnx.export(encoder, (example,), input_names=["pixels"], output_names=["embeddings"],
                                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                    external_data=False)
    proto = program.model_proto
    for key, value in (("unicom_model", label), ("embedding_dim", str(dims)), ("input_size", str(size)),
                       ("transform", repr(transform)), ("output", "L2-normalised embeddings")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    difference = _check(data, encoder, size, check_images, spec)
    with atomic_path(output) as temporary:
        temporary.write_bytes(data)
    return {"output": os.fspath(output), "model": label, "embedding_dim": dims, "input_size": size, "bytes": len(data),
            "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
            "max_difference": difference}


def _check(data: bytes, encoder: torch.nn.Module, size: int, count: int, spec) -> float | None:
    """The largest difference between the graph ``data`` run by onnxruntime and ``encoder`` on
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
