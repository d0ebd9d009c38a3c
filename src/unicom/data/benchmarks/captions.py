"""Image–text retrieval benchmarks: images with their captions, in the layouts distributed.

Each reader takes the dataset's folder (or, for ``captions``, the table itself) and returns
:class:`CaptionSplit`: the distinct images of the test split, every caption, and which image
each caption describes. Text-to-image retrieval searches the images with each caption;
image-to-text retrieval searches the captions with each image, a hit being any of its own
(the protocol of CLIP and of clip_benchmark's ``zeroshot_retrieval``). The k's live in the
registry (:data:`CAPTION_BENCHMARKS`).

Keys are image paths relative to the dataset's folder. A missing annotation file is an
:class:`InputError` listing every place looked at and the layout; missing images are listed
(first five and a count, with the file naming them) before anything is embedded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unicom import storage
from unicom.data.benchmarks.retrieval import _check_images
from unicom.data.lists import ImageList, decode_utf8, read_table
from unicom.errors import InputError


@dataclass
class CaptionSplit:
    """``images``: one row per distinct image; ``captions``: every caption, in the file's
    order; ``caption_image``: int64 (len(captions),), the row of ``images`` each caption
    describes; ``source``: the annotation file read (named in reports)."""

    images: ImageList
    captions: list[str]
    caption_image: np.ndarray
    source: str

    def captions_sha256(self) -> str:
        """sha256 of the captions and the image key of each: which text is row ``i``."""
        digest = hashlib.sha256()
        for caption, row in zip(self.captions, self.caption_image.tolist()):
            digest.update(f"{self.images.keys[row]}\0{caption}\0".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


COCO_LAYOUT = """  coco/                            (--root)
    coco_test_karpathy.json        clip_benchmark's Karpathy test split (COCO captions format)
    val2014/COCO_val2014_*.jpg
  or
    dataset_coco.json              Karpathy's splits (split "test": 5,000 images, 25,010 captions)
    val2014/COCO_val2014_*.jpg     (each image's "filepath"/"filename")
  or
    coco_karpathy_test.json        BLIP's/LAVIS's test file (also in annotations/): [{"image", "caption": [...]}]
    val2014/COCO_val2014_*.jpg     (each entry's "image", relative to --root)
  or
    annotations/captions_val2017.json   the official 2017 validation captions (5,000 images)
    val2017/*.jpg"""

FLICKR_LAYOUT = """  flickr30k/                       (--root)
    flickr30k_test_karpathy.txt    clip_benchmark's Karpathy test split: image,caption lines (a header line image,caption)
    <image>.jpg                    (or flickr30k-images/<image>.jpg, flickr30k_images/<image>.jpg)
  or
    dataset_flickr30k.json         Karpathy's splits (split "test": 1,000 images, 5,000 captions)
    flickr30k-images/<image>.jpg
  or
    flickr30k_test.json            BLIP's/LAVIS's test file (also in annotations/): [{"image", "caption": [...]}]
    flickr30k-images/<image>.jpg   (each entry's "image", relative to --root)"""

TABLE_LAYOUT = """  a CSV or parquet table with columns path and caption (optionally key): one row per caption
  (an image on several rows has several captions), or a list of captions per row (parquet);
  paths relative to the table's folder"""

IMAGE_FOLDERS = (".", "flickr30k-images", "flickr30k_images")  # where Flickr30k's images are looked for


def _json(path: Path) -> object:
    try:
        return json.loads(decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error}); download the annotation file again") from error


def _found(root: Path, candidates: tuple[str, ...], layout: str) -> Path:
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    looked = "\n  ".join(str(root / c) for c in candidates)
    raise InputError(f"{root}: no annotation file; looked for:\n  {looked}\nexpected layout:\n{layout}")


def _split(root: Path, records: list[tuple[str, str]], source: Path, layout: str, check_images: bool) -> CaptionSplit:
    """``records``: (image path relative to ``root``, caption) in the file's order -> the split,
    images in the order of their first caption."""
    rows: dict[str, int] = {}
    caption_image = np.empty(len(records), dtype=np.int64)
    for i, (key, _) in enumerate(records):
        caption_image[i] = rows.setdefault(key, len(rows))
    keys = list(rows)
    paths = [str(root / key) for key in keys]
    if check_images:
        _check_images(paths, layout, source)
    return CaptionSplit(ImageList(paths, keys), [caption for _, caption in records], caption_image, str(source))


def _caption_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: a caption must be non-empty text, found {value!r}")
    return value


def _coco_format(root: Path, source: Path, image_folder: str, layout: str, check_images: bool) -> CaptionSplit:
    """A COCO captions file (``images`` with ``id``/``file_name``, ``annotations`` with
    ``image_id``/``caption``): images in the order of their ids (as torchvision's
    ``CocoCaptions`` lists them), each image's captions in the file's order."""
    data = _json(source)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{source}: not a COCO captions file (an object with 'images' and 'annotations' lists)")
    names: dict = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise InputError(f"{source}: images[{i}] has no 'id' and 'file_name'")
        if image["id"] in names:
            raise InputError(f"{source}: image id {image['id']!r} is listed twice in 'images'")
        names[image["id"]] = image["file_name"]
    by_image: dict = {image_id: [] for image_id in names}
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or annotation.get("image_id") not in names:
            found = annotation.get("image_id") if isinstance(annotation, dict) else annotation
            raise InputError(f"{source}: annotations[{i}] names image {found!r}, which 'images' does not list")
        by_image[annotation["image_id"]].append(_caption_text(annotation.get("caption"), f"{source}: annotations[{i}]"))
    ordered = sorted(names)
    without = [names[i] for i in ordered if not by_image[i]]
    if without:
        raise InputError(f"{source}: {len(without)} images have no caption, e.g. {without[:3]}; "
                         "every image of an image-text benchmark needs at least one")
    records = [(f"{image_folder}/{names[i]}", caption) for i in ordered for caption in by_image[i]]
    return _split(root, records, source, layout, check_images)


def _karpathy(root: Path, source: Path, image_folder: str | None, layout: str, check_images: bool,
              split: str = "test") -> CaptionSplit:
    """Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: the images whose
    ``split`` is ``split``, each with its ``sentences``' ``raw`` text, in the file's order.
    An image is at ``filepath/filename`` (COCO), or ``image_folder/filename`` (Flickr30k)."""
    data = _json(source)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{source}: not a Karpathy split file (an object with an 'images' list)")
    records = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise InputError(f"{source}: images[{i}] has no 'filename'")
        if image.get("split") != split:
            continue
        folder = image.get("filepath", image_folder) if image_folder is None else image_folder
        key = f"{folder}/{image['filename']}" if folder else image["filename"]
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise InputError(f"{source}: images[{i}] ({image['filename']}) has no 'sentences'")
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            records.append((key, _caption_text(raw, f"{source}: images[{i}].sentences[{j}].raw")))
    if not records:
        raise InputError(f"{source}: no image has split {split!r}")
    return _split(root, records, source, layout, check_images)


def _image_caption_list(root: Path, source: Path, layout: str, check_images: bool) -> CaptionSplit:
    """BLIP's, ALBEF's and LAVIS's test files (``coco_karpathy_test.json``,
    ``flickr30k_test.json``): a list of ``{"image": path relative to the dataset folder,
    "caption": [captions] or one caption}``, in the file's order."""
    data = _json(source)
    if not isinstance(data, list):
        raise InputError(f"{source}: not a list of {{'image', 'caption'}} entries (BLIP's test files are)")
    records = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
            raise InputError(f"{source}: entry {i} has no 'image' path and 'caption'")
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not captions:
            raise InputError(f"{source}: entry {i} ({entry['image']}) has an empty list of captions")
        records += [(entry["image"], _caption_text(c, f"{source}: entry {i}")) for c in captions]
    if not records:
        raise InputError(f"{source}: no entry")
    return _split(root, records, source, layout, check_images)


def read_coco_captions(root: str | os.PathLike, check_images: bool = True) -> CaptionSplit:
    """MS-COCO captions: the Karpathy 5k test split (clip_benchmark's file, else Karpathy's),
    else the official 2017 validation captions (:data:`COCO_LAYOUT`)."""
    root = Path(root)
    candidates = ("coco_test_karpathy.json", "annotations/coco_test_karpathy.json", "dataset_coco.json",
                  "annotations/dataset_coco.json", "coco_karpathy_test.json", "annotations/coco_karpathy_test.json",
                  "annotations/captions_val2017.json", "captions_val2017.json")
    source = _found(root, candidates, COCO_LAYOUT)
    if source.name == "coco_test_karpathy.json":
        return _coco_format(root, source, "val2014", COCO_LAYOUT, check_images)
    if source.name == "dataset_coco.json":
        return _karpathy(root, source, None, COCO_LAYOUT, check_images)
    if source.name == "coco_karpathy_test.json":
        return _image_caption_list(root, source, COCO_LAYOUT, check_images)
    return _coco_format(root, source, "val2017", COCO_LAYOUT, check_images)


def read_flickr30k(root: str | os.PathLike, check_images: bool = True) -> CaptionSplit:
    """Flickr30k's Karpathy 1k test split: clip_benchmark's ``flickr30k_test_karpathy.txt``,
    else Karpathy's ``dataset_flickr30k.json`` (:data:`FLICKR_LAYOUT`)."""
    root = Path(root)
    source = _found(root, ("flickr30k_test_karpathy.txt", "dataset_flickr30k.json", "flickr30k_test.json",
                           "annotations/flickr30k_test.json"), FLICKR_LAYOUT)
    if source.name == "dataset_flickr30k.json":
        return _karpathy(root, source, "flickr30k-images", FLICKR_LAYOUT, check_images)
    if source.name == "flickr30k_test.json":
        return _image_caption_list(root, source, FLICKR_LAYOUT, check_images)
    lines = [line.strip() for line in decode_utf8(source.read_bytes(), source).splitlines()]
    records = []
    header = 1 if lines and lines[0].replace(" ", "").lower() == "image,caption" else 0  # clip_benchmark's files have it
    for number, line in enumerate(lines[header:], start=header + 1):
        if not line:
            continue
        name, comma, caption = line.partition(",")  # captions hold commas, unquoted; image names do not
        if not comma or not name:
            raise InputError(f"{source}: line {number} is not 'image,caption': {line[:80]!r}")
        records.append((name, _caption_text(caption, f"{source}: line {number}")))
    if not records:
        raise InputError(f"{source}: no 'image,caption' line")
    folder = next((f for f in IMAGE_FOLDERS if (root / f / records[0][0]).is_file()), ".") if check_images else "."
    if folder != ".":
        records = [(f"{folder}/{name}", caption) for name, caption in records]
    return _split(root, records, source, FLICKR_LAYOUT, check_images)


def read_caption_table(path: str | os.PathLike, check_images: bool = True) -> CaptionSplit:
    """A CSV/parquet table of images and captions (:data:`TABLE_LAYOUT`): one row per caption,
    rows of one key being one image, or a list of captions per row."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    images = read_table(path, label_column=None, caption_column=None)  # paths and keys, checked as every list's
    if path.suffix.lower() == ".parquet":
        names = pq.ParquetFile(path).schema_arrow.names
        table = pq.read_table(path, columns=["caption"]) if "caption" in names else None
    else:  # captions as written: a caption 1984 stays text
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"caption": pa.string()}))
        names = table.column_names
    if "caption" not in names:
        raise InputError(f"{path}: no 'caption' column; columns are {names}")
    column = table.column("caption").to_pylist()
    records, image_of_key = [], {}
    for row, (key, image_path, value) in enumerate(zip(images.keys, images.paths, column)):
        where = f"{path}: row {row + 1}"
        if image_of_key.setdefault(key, image_path) != image_path:
            raise InputError(f"{where}: key {key!r} names {image_path}, an earlier row {image_of_key[key]}; "
                             "one key is one image")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise InputError(f"{where}: an empty list of captions")
        records += [(key, _caption_text(v, where)) for v in values]
    rows: dict[str, int] = {}
    caption_image = np.asarray([rows.setdefault(key, len(rows)) for key, _ in records], dtype=np.int64)
    keys = list(rows)
    paths = [image_of_key[key] for key in keys]
    if check_images:
        _check_images([p for p in paths if not storage.is_url(p)], TABLE_LAYOUT, path)
    return CaptionSplit(ImageList(paths, keys), [caption for _, caption in records], caption_image, str(path))
