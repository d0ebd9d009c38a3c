"""The table of margin heads: recipe name -> class, options and what the data must supply.

Both recipes (``unicom train`` and ``unicom probe``) read their ``loss.head`` and its
options through this table, so a head and its options mean the same everywhere:

==================  ====================  =======================================  ==============
``loss.head``       class                 options (unset: the class's default)     from the data
==================  ====================  =======================================  ==============
``arcface``         :class:`ArcFace`      margin (0.3), scale (64)
``cosface``         :class:`CosFace`      margin (0.35), scale (64)
``combined``        :class:`CombinedMargin`  m1 (1), m2 (0.3), m3 (0), scale (64)
``dynm_arcface``    :class:`DynMArcFace`  m_max (0.6), m_min (0.2), scale (64)      class counts
``adacos``          :class:`AdaCos`       dynamic (true)                           class number
``li_arcface``      :class:`LiArcFace`    margin (0.45), scale (64)
``curricularface``  :class:`CurricularFace`  margin (0.5), scale (64), momentum (0.01)
``adaface``         :class:`AdaFace`      margin (0.4), h (0.333), scale (64), t_alpha (0.01)
==================  ====================  =======================================  ==============

Every head also takes :class:`~unicom.losses.PartialFC`'s ``centers`` (k prototypes per
class, the max over them: sub-center), ``sample_rate``, ``feature_rate`` and
``margin_gradient``. Importing this module does not import torch: the classes are named
here and imported when a head is built.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class HeadEntry:
    """One margin head of the table.

    Attributes:
        cls: its class in :mod:`unicom.losses.margins`.
        options: the recipe's ``loss.*`` keys passed to the constructor when set.
        data: constructor arguments that come from the training data: ``class_counts``
            ((K,) images per class) or ``num_classes`` (K).
    """

    cls: str
    options: tuple[str, ...]
    data: tuple[str, ...] = ()


HEADS: dict[str, HeadEntry] = {
    "arcface": HeadEntry("ArcFace", ("margin", "scale")),
    "cosface": HeadEntry("CosFace", ("margin", "scale")),
    "combined": HeadEntry("CombinedMargin", ("m1", "m2", "m3", "scale")),
    "dynm_arcface": HeadEntry("DynMArcFace", ("m_max", "m_min", "scale"), ("class_counts",)),
    "adacos": HeadEntry("AdaCos", ("dynamic",), ("num_classes",)),
    "li_arcface": HeadEntry("LiArcFace", ("margin", "scale")),
    "curricularface": HeadEntry("CurricularFace", ("margin", "scale", "momentum")),
    "adaface": HeadEntry("AdaFace", ("margin", "h", "scale", "t_alpha")),
}
HEAD_NAMES = tuple(HEADS)
# every option of any head, in the order recipes list them
HEAD_OPTIONS = ("margin", "scale", "m1", "m2", "m3", "m_max", "m_min", "dynamic", "h", "t_alpha", "momentum")
MARGIN_GRADIENTS = ("exact", "straight_through")


def head_entry(name: str) -> HeadEntry:
    if name not in HEADS:
        from unicom.errors import InputError

        raise InputError(f"unknown margin head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name]


def head_class(name: str) -> type:
    """The class of head ``name`` (imports torch)."""
    from unicom.losses import margins

    return getattr(margins, head_entry(name).cls)


def head_defaults(name: str) -> dict[str, Any]:
    """``{option: default}`` of head ``name``: its class's own defaults."""
    parameters = inspect.signature(head_class(name)).parameters
    return {option: parameters[option].default for option in head_entry(name).options}


def option_problems(name: str, options: Mapping[str, Any], prefix: str = "loss.") -> list[str]:
    """Messages for every option set in ``options`` (``None``: unset) that head ``name`` does not take."""
    accepted = head_entry(name).options
    return [f"{prefix}{option} does not apply to {prefix}head={name}; its options are {', '.join(accepted)} "
            f"(unset it: {prefix}{option}=null)"
            for option, value in options.items() if value is not None and option not in accepted]


def build_margin_head(name: str, options: Mapping[str, Any] | None = None, *, num_classes: int | None = None,
                      class_counts=None):
    """The margin head ``name`` with the options of ``options`` that are set (``None``
    values keep the class's defaults) and its data arguments: ``class_counts`` ((K,)
    training images per class, DynM-ArcFace) and ``num_classes`` (AdaCos; default
    ``len(class_counts)``)."""
    import numpy as np

    from unicom.errors import InputError

    entry = head_entry(name)
    options = {key: value for key, value in (options or {}).items() if value is not None}
    problems = option_problems(name, options, prefix="")
    if problems:
        raise InputError("; ".join(problems))
    if "class_counts" in entry.data:
        if class_counts is None:
            raise InputError(f"the {name} head needs the number of training images of every class")
        options["class_counts"] = np.asarray(class_counts, dtype=np.int64)
    if "num_classes" in entry.data:
        count = num_classes if num_classes is not None else (None if class_counts is None else len(class_counts))
        if count is None:
            raise InputError(f"the {name} head needs the number of classes")
        options["num_classes"] = int(count)
    return head_class(name)(**options)


def head_settings(head) -> dict[str, Any]:
    """The option values of a built head (what a model folder's provenance records)."""
    name = next((key for key, entry in HEADS.items() if entry.cls == type(head).__name__), None)
    if name is None:
        return {"head": type(head).__name__}
    settings: dict[str, Any] = {"head": name}
    for option in HEADS[name].options:
        value = getattr(head, option)
        settings[option] = value if isinstance(value, (bool, int, str)) else float(value)
    return settings


__all__ = ["HEADS", "HEAD_NAMES", "HEAD_OPTIONS", "MARGIN_GRADIENTS", "HeadEntry", "head_entry", "head_class",
           "head_defaults", "option_problems", "build_margin_head", "head_settings"]
