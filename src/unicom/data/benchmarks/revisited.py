"""Revisited Oxford5k and Paris6k (Radenović et al., CVPR 2018), as their ground truth files have them.

Each dataset folder holds ``gnd_<name>.pkl`` and the images under ``jpg/``. The ground truth
is a pickle of a dict: ``imlist`` (database image names, without extension), ``qimlist``
(the 70 query names, themselves database images) and ``gnd``, one dict per query with
``bbx`` (x1, y1, x2, y2: the query's region in pixels) and the database rows ``easy``,
``hard`` and ``junk``. Queries are the query images *cropped to their box*.

The three setups (:data:`REVISITED_SETUPS`) say, per query, which database images are
positive and which are ignored (removed from the ranking before it is scored):

* easy: positives easy; ignored junk and hard;
* medium: positives easy and hard; ignored junk;
* hard: positives hard; ignored junk and easy.

The pickle is read by :func:`load_ground_truth`, which builds only lists, dicts, strings,
numbers and numpy arrays: a pickle that asks for anything else is refused, not run.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import warnings
from pathlib import Path

import numpy as np

from unicom.data.benchmarks.retrieval import Splits, _check_images, _dataset_folder
from unicom.data.lists import ImageList
from unicom.errors import InputError

REVISITED_LAYOUT = """  {name}/gnd_{name}.pkl: the ground truth (imlist, qimlist, gnd: bbx, easy, hard, junk per query)
  {name}/jpg/<image name>.jpg: every image of imlist (the queries are among them)
  (--root: the folder holding {name}/, or {name}/ itself)"""
# (positive lists, ignored lists) of each setup, by the names of the ground truth's lists
REVISITED_SETUPS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
CROP_SUFFIX = "#crop"  # a query's key: its image's key and this (the embedding is of the crop)


# --------------------------------------------------------------------------- the pickle


class _Forbidden(pickle.UnpicklingError):
    """The pickle asks for something a ground truth file never holds."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as a protocol-2 pickle uses it for bytes: ``(text, 'latin1')`` only."""
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise _Forbidden(f"it asks for _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1", "strict")


def _numpy_core(module: str):
    import importlib

    try:  # numpy 2 keeps them in numpy._core; numpy.core is a deprecated alias there
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


def _of_content(kind: type):
    """``kind`` (bytes, bytearray) built from content only: ``kind(n)`` would be n zero bytes,
    gigabytes from a pickle of a few bytes."""
    def build(*args):
        if args and isinstance(args[0], int):
            raise _Forbidden(f"it asks for {kind.__name__}({args[0]}), that many zero bytes")
        return kind(*args)
    return build


def _empty_array(subtype, shape, dtype):
    """numpy's ``_reconstruct`` as its pickles call it: an empty array that the pickle then
    fills (a shape given here would be allocated before any data is read)."""
    if tuple(shape) != (0,):
        raise _Forbidden(f"it asks for an array of shape {tuple(shape)} before its data")
    return _numpy_core("multiarray")._reconstruct(subtype, shape, dtype)


_BUILTINS = {"list": list, "dict": dict, "tuple": tuple, "set": set, "frozenset": frozenset, "str": str,
             "unicode": str, "bytes": _of_content(bytes), "bytearray": _of_content(bytearray), "int": int, "long": int,
             "float": float, "bool": bool}


def _allowed(module: str, name: str):
    """What a ground-truth pickle may build: containers, strings, numbers, numpy arrays."""
    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return _BUILTINS[name]
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
        return _empty_array
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        return _numpy_core("multiarray").scalar
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return getattr(_numpy_core("numeric"), name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    return None


class _GroundTruthUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _allowed(module, name)
        if found is None:
            raise _Forbidden(f"it asks for {module}.{name}")
        return found


def load_ground_truth(path: str | os.PathLike) -> dict:
    """The dict pickled in ``path``, read with an unpickler that builds nothing but lists,
    dicts, tuples, sets, strings, numbers and numpy arrays (Python 2 pickles included: their
    strings are read as Latin-1). Names given as bytes are decoded. Anything else, such as a
    pickle that would call a function, is an :class:`InputError`; nothing of it is run."""
    try:
        with open(path, "rb") as f:
            data = _GroundTruthUnpickler(f, encoding="latin1").load()
    except _Forbidden as error:
        raise InputError(
            f"{path}: refused as a ground truth file: {error}; it may hold only lists, dicts, strings, numbers and "
            "numpy arrays (imlist, qimlist, gnd). Use the gnd_*.pkl distributed with the Revisited Oxford/Paris "
            "benchmark, or write your own with pickle.dump of such a dict"
        ) from None
    except Exception as error:  # nothing but the allowed constructors ran: the file is not a whole pickle
        raise InputError(f"{path}: cannot be read as a pickle ({error or type(error).__name__}); the file is damaged "
                         "or incomplete: download it again") from None
    try:
        return _text_names(data)
    except RecursionError:  # a ground truth nests three deep: gnd, a query, its lists
        raise InputError(f"{path}: refused as a ground truth file: its lists are nested thousands deep; use the "
                         "gnd_*.pkl distributed with the Revisited Oxford/Paris benchmark") from None


def _text_names(value, done: dict | None = None):
    """``value`` with bytes (a pickle written with bytes names) decoded as UTF-8, recursively.
    A container met twice is converted once and shared as in the pickle (a pickle of a few
    bytes may nest a list twice in itself 40 times: 2**40 copies), a list that holds itself
    holds its conversion."""
    done = {} if done is None else done
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, dict):
        converted = done[id(value)] = {}
        converted.update((_text_names(k, done), _text_names(v, done)) for k, v in value.items())
    elif isinstance(value, list):
        converted = done[id(value)] = []
        converted.extend(_text_names(v, done) for v in value)
    elif isinstance(value, tuple):
        converted = done[id(value)] = tuple(_text_names(v, done) for v in value)
    else:
        return value
    return converted


# --------------------------------------------------------------------------- the reader


def _names(gnd: dict, field: str, path: Path) -> list[str]:
    names = gnd.get(field)
    if not isinstance(names, (list, tuple, np.ndarray)) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: {field!r} must be a list of image names, got {type(names).__name__}")
    return [str(n) for n in names]


def _rows(gnd: dict, field: str, query: int, size: int, path: Path) -> np.ndarray:
    """The database rows of query ``query``'s list ``field`` (int64), each in 0..size-1."""
    values = gnd.get(field, [])
    try:
        rows = np.asarray(values, dtype=np.int64).reshape(-1)
        whole = np.array_equal(rows, np.asarray(values, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        whole = False
    if not whole:  # 1.5 would otherwise be read as row 1
        raise InputError(f"{path}: gnd[{query}][{field!r}] is not a list of database rows (whole numbers)")
    outside = rows[(rows < 0) | (rows >= size)]
    if len(outside):
        raise InputError(f"{path}: gnd[{query}][{field!r}] names database row {int(outside[0])}, outside "
                         f"0..{size - 1} (imlist has {size} images)")
    return rows


def _box(gnd: dict, query: int, path: Path) -> np.ndarray:
    try:
        box = np.asarray(gnd["bbx"], dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        box = np.zeros(0)
    if box.shape != (4,) or not np.isfinite(box).all() or not (box[0] < box[2] and box[1] < box[3]):
        raise InputError(f"{path}: gnd[{query}]['bbx'] must be the query's box x1, y1, x2, y2 with x1 < x2 and "
                         f"y1 < y2, got {gnd.get('bbx')!r}")
    return box


def read_revisited(root: str | os.PathLike, name: str, check_images: bool = True) -> Splits:
    """Revisited Oxford5k (``name="roxford5k"``) or Paris6k (``"rparis6k"``).

    Returns the queries (keys ``jpg/<name>.jpg#crop``, with ``query_boxes`` to crop them to),
    the database (keys ``jpg/<name>.jpg``) and, in ``setups``, the positive and ignored
    database rows of each query in the easy, medium and hard setups. An image listed as
    positive is never ignored.
    """
    layout = REVISITED_LAYOUT.format(name=name)
    gnd_name = f"gnd_{name}.pkl"
    folder = _dataset_folder(Path(root), [gnd_name], [name], layout)
    path = folder / gnd_name
    ground_truth = load_ground_truth(path)
    if not isinstance(ground_truth, dict) or not {"imlist", "qimlist", "gnd"} <= set(ground_truth):
        found = sorted(ground_truth) if isinstance(ground_truth, dict) else type(ground_truth).__name__
        raise InputError(f"{path}: expected a dict with imlist, qimlist and gnd, found {found}")
    database, queries = _names(ground_truth, "imlist", path), _names(ground_truth, "qimlist", path)
    per_query = ground_truth["gnd"]
    if not isinstance(per_query, (list, tuple)) or len(per_query) != len(queries) or \
            not all(isinstance(g, dict) for g in per_query):
        raise InputError(f"{path}: gnd must hold one dict per query of qimlist ({len(queries)})")
    boxes = np.stack([_box(g, q, path) for q, g in enumerate(per_query)]) if queries else np.zeros((0, 4))
    lists = [{field: _rows(g, field, q, len(database), path) for field in ("easy", "hard", "junk")}
             for q, g in enumerate(per_query)]
    setups = {}
    for setup, (positive_fields, ignored_fields) in REVISITED_SETUPS.items():
        positives = [np.unique(np.concatenate([rows[f] for f in positive_fields])) for rows in lists]
        ignored = [np.setdiff1d(np.concatenate([rows[f] for f in ignored_fields]), p)
                   for rows, p in zip(lists, positives)]
        setups[setup] = (positives, ignored)
    database_keys = [f"jpg/{n}.jpg" for n in database]
    query_images = [f"jpg/{n}.jpg" for n in queries]
    gallery = ImageList([str(folder / k) for k in database_keys], database_keys)
    query = ImageList([str(folder / k) for k in query_images], [k + CROP_SUFFIX for k in query_images])
    if check_images:
        _check_images(sorted(set(gallery.paths) | set(query.paths)), layout, path)
    return Splits(query=query, gallery=gallery, query_boxes=boxes, setups=setups)


def query_boxes_sha256(boxes: np.ndarray) -> str:
    """The SHA-256 (hex) of the query boxes (Nq, 4) as little-endian float64: what a folder of
    query embeddings records, so that crops of other boxes are not mixed with or scored as
    these."""
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype="<f8").tobytes()).hexdigest()


def crop_query(path: str | os.PathLike, box: np.ndarray):
    """The image at ``path`` (RGB PIL image) cropped to ``box`` (x1, y1, x2, y2 in pixels, as
    PIL's ``crop`` takes them; beyond the image the crop is black). Raises
    :class:`InputError` naming the file when it cannot be read as an image."""
    from PIL import Image

    from unicom.data.transforms import to_rgb

    try:
        with Image.open(path) as image:  # made RGB as every other image is (16-bit samples scaled, not clipped)
            return to_rgb(image).crop(tuple(float(v) for v in box))
    except OSError as error:
        raise InputError(f"{path}: cannot be read as an image ({error})") from None


def warn_boxes_outside(query: ImageList, boxes: np.ndarray) -> None:
    """Warn, naming the queries, when boxes reach more than a pixel beyond their image
    (images resized after the ground truth was made). Reads the images' headers only; an
    image that cannot be read is named when it is cropped."""
    from PIL import Image

    outside = []
    for path, box in zip(query.paths, boxes):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except OSError:
            continue
        if box[0] < -1 or box[1] < -1 or box[2] > width + 1 or box[3] > height + 1:
            outside.append(f"{Path(path).name} ({width}x{height}, box {', '.join(f'{v:g}' for v in box)})")
    if outside:
        warnings.warn(f"{len(outside)} query boxes reach beyond their image, e.g. {'; '.join(outside[:3])}: the part "
                      "outside is black in the crop; the ground truth's boxes are in pixels of the original images, "
                      "are these images resized?")


def cropped_queries(query: ImageList, boxes: np.ndarray) -> list:
    """The query images (RGB PIL images) cropped to their boxes (:func:`crop_query`), ready
    for the model's transform. A box that reaches beyond its image is cropped all the same,
    with black outside the image, and a warning names the queries (:func:`warn_boxes_outside`)."""
    warn_boxes_outside(query, boxes)
    return [crop_query(path, box) for path, box in zip(query.paths, boxes)]
