"""unicom: universal and compact image embeddings for retrieval.

``import unicom`` is cheap: it imports neither torch nor any stage of the pipeline.
The public entry points below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute", imported on first access
_LAZY = {
    "load": "unicom.models.factory:load",
    "available_models": "unicom.models.registry:available_models",
    "embed_images": "unicom.embed:embed_images",
    "embed_texts": "unicom.embed:embed_texts",
    "load_encoder": "unicom.models.encoders:load_encoder",
    "Index": "unicom.search.index:Index",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'unicom' has no attribute {name!r}")
    module_name, attribute = target.split(":")
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
