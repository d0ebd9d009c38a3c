"""clip-retrieval's index folder: what ``clip-retrieval index`` (autofaiss) writes and
``clip-retrieval back`` serves::

    INDEX/image.index            faiss index of the image embeddings, inner product
    INDEX/image.json             autofaiss' description: index_key, index_param, nb vectors, ...
    INDEX/text.index, text.json  the same for the text embeddings (either index may be absent)
    INDEX/metadata/*.parquet     the embedding folder's metadata, one row per vector

**Ids and metadata rows.** autofaiss adds the vectors of the embedding files in the order
of their names sorted as strings (``img_emb_10.npy`` before ``img_emb_2.npy``), ids 0, 1, …;
clip-retrieval's back end concatenates the metadata files in the same name order, so id i
is row i of that concatenation. :func:`metadata_files` lists them so; :func:`write` names
the files with zero-padded part numbers, so that name order is part order.

The search parameters (nprobe, efSearch) live inside the faiss file, where autofaiss sets
them. This module owns the layout: :func:`open_folder` reads and checks it (for
:meth:`unicom.search.index.Index.load`), :func:`write` writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicom import storage
from unicom.errors import InputError
from unicom.files import atomic_path, write_json_atomic, write_parquet_atomic

LAYOUT = "clip-retrieval"
MODALITIES = ("image", "text")
METADATA_FOLDER = "metadata"


def index_file(modality: str) -> str:
    """``image.index`` or ``text.index``."""
    return f"{modality}.index"


def infos_file(modality: str) -> str:
    """``image.json`` or ``text.json``: autofaiss' description of the index."""
    return f"{modality}.json"


def is_clip_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an ``image.index`` or a ``text.index``."""
    return any((Path(path) / index_file(modality)).is_file() for modality in MODALITIES)


def metadata_name(number: int, width: int) -> str:
    """The metadata file of part ``number``, zero-padded to ``width`` digits."""
    return f"{METADATA_FOLDER}/metadata_{number:0{width}d}.parquet"


@dataclass
class MetadataFile:
    """A metadata file in name order: its path relative to the folder, rows, and first id."""

    file: str
    rows: int
    first_id: int


def metadata_files(path: str | os.PathLike) -> list[MetadataFile]:
    """The folder's metadata parquet files in clip-retrieval's order (names sorted as strings),
    with the id of each one's first row; empty without a metadata folder. ``path`` may be a
    URL: the files' footers are read there (a ranged request each), not the files."""
    from unicom.search.metadata_rows import read_footer

    folder = storage.join(path, METADATA_FOLDER)
    # hidden files are not the metadata (temporaries of a write under way, as a local glob skips them)
    names = sorted(name for name in storage.list_files(folder) if name.endswith(".parquet") and not name.startswith("."))

    def rows(file) -> int:
        return int(read_footer(file).metadata.num_rows)

    files, first_id = [], 0
    for name, count in zip(names, storage.gather(rows, [storage.join(folder, name) for name in names])):
        files.append(MetadataFile(f"{METADATA_FOLDER}/{name}", count, first_id))
        first_id += count
    return files


def describe(faiss_index) -> tuple[str, dict]:
    """(type, search parameter) of a faiss index from anywhere: ``flat``, ``hnsw``, ``ivfpq``,
    ``ivfsq``, ``ivf`` (other inverted lists) or ``other``; the parameter stored in the index."""
    import faiss

    ivf = faiss.try_extract_index_ivf(faiss_index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)  # extracted as the base IndexIVF: its codes are in the subclass
        kind = ("ivfpq" if isinstance(ivf, faiss.IndexIVFPQ) else
                "ivfsq" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else "ivf")
        return kind, {"nprobe": int(ivf.nprobe)}
    base = faiss_index
    while isinstance(base, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        base = faiss.downcast_index(base.index)
    if isinstance(base, faiss.IndexHNSW):
        return "hnsw", {"efSearch": int(base.hnsw.efSearch)}
    if isinstance(base, faiss.IndexFlat):
        return "flat", {}
    return "other", {}


@dataclass
class Opened:
    """A clip-retrieval folder read by :func:`open_folder`."""

    faiss_indexes: dict[str, Any]  # modality -> faiss index
    infos: dict[str, dict]  # modality -> autofaiss' description (empty when absent)
    files: list[MetadataFile]


def open_folder(path: str | os.PathLike, location: str | os.PathLike | None = None) -> Opened:
    """Read the faiss indexes and list the metadata files of the folder ``path``, checking
    that they agree: every index counts the metadata's rows, and ranks by inner product.
    ``location``: where the metadata files are, when not in ``path`` (the URL of a folder
    whose faiss files were copied to ``path``)."""
    import faiss

    path = Path(path)
    location = path if location is None else location
    faiss_indexes, infos = {}, {}
    for modality in MODALITIES:
        file = path / index_file(modality)
        if not file.is_file():
            continue
        try:
            faiss_index = faiss.read_index(str(file))
        except RuntimeError as error:
            raise InputError(f"{file}: not a readable faiss index ({str(error).splitlines()[0]})") from error
        if faiss_index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InputError(
                f"{file}: ranks by L2 distance (metric {faiss_index.metric_type}); unicom ranks unit vectors by inner "
                "product, as clip-retrieval does: rebuild it with metric_type='ip'"
            )
        faiss_indexes[modality] = faiss_index
        infos_path = path / infos_file(modality)
        try:
            infos[modality] = json.loads(infos_path.read_text()) if infos_path.is_file() else {}
        except (OSError, ValueError) as error:
            raise InputError(f"{infos_path}: unreadable ({error}); delete it, the index does not need it") from error
    if not faiss_indexes:
        raise InputError(f"{path}: neither image.index nor text.index inside")
    files = metadata_files(location)
    counts = {modality: int(index.ntotal) for modality, index in faiss_indexes.items()}
    if files:
        rows = sum(file.rows for file in files)
        for modality, count in counts.items():
            if count != rows:
                raise InputError(
                    f"{path / index_file(modality)} holds {count} vectors, but "
                    f"{storage.text(storage.join(location, METADATA_FOLDER))} has {rows} rows in its parquet files; "
                    "id i is row i of those files in name order, so they must describe the same collection: copy the "
                    "embedding folder's metadata again"
                )
    elif len(set(counts.values())) > 1:
        raise InputError(f"{path}: image.index and text.index hold {counts['image']} and {counts['text']} vectors; "
                         "they must index the same collection")
    return Opened(faiss_indexes, infos, files)


def infos(faiss_index, structure: str, search: dict, index_path: Path, extra: dict, recorded_path: str | None = None) -> dict:
    """autofaiss' description of an index (its keys, so tools that read them find them), plus
    ``extra``; ``recorded_path``: where the index is published, when not at ``index_path``."""
    size = index_path.stat().st_size
    return {
        "index_key": structure,
        "index_param": ",".join(f"{key}={value}" for key, value in search.items()),
        "index_path": recorded_path or str(index_path.resolve()),
        "size in bytes": size,
        "nb vectors": int(faiss_index.ntotal),
        "vectors dimension": int(faiss_index.d),
        "compression ratio": 4.0 * faiss_index.ntotal * faiss_index.d / max(size, 1),
        **extra,
    }


def write_index(out: Path, modality: str, faiss_index) -> Path:
    """``out/{modality}.index``, written atomically."""
    import faiss

    target = out / index_file(modality)
    with atomic_path(target) as tmp:
        faiss.write_index(faiss_index, str(tmp))
    return target


def write_infos(out: Path, modality: str, description: dict) -> None:
    write_json_atomic(out / infos_file(modality), description)


def write_metadata(out: Path, file: str, table, build: str | None = None) -> None:
    """The collection's metadata as it is, in row groups that a lookup reads alone; ``build``:
    the index build's id, recorded in the file's key-value metadata (clip-retrieval ignores it)."""
    from unicom.search.metadata_rows import ROW_GROUP_ROWS, with_build

    write_parquet_atomic(out / file, with_build(table, build), row_group_size=ROW_GROUP_ROWS)


def stale_metadata(out: Path, kept: set[str]) -> list[Path]:
    """Metadata files in ``out`` that are not ``kept`` (relative paths): left from an earlier build."""
    folder = out / METADATA_FOLDER
    if not folder.is_dir():
        return []
    return [file for file in folder.glob("*.parquet") if f"{METADATA_FOLDER}/{file.name}" not in kept]
