"""The embedding folder has one reader: every stage sees the same parts and the same damage."""

from __future__ import annotations

import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom.cli import main
from unicom.errors import InputError
from unicom.formats.embeddings import EmbeddingFolders, part_complete, read_embedding_folder, write_part


def write_folder(root, sizes=(12, 12, 12), dim=8):
    """Parts of random unit rows with keys ``p{part}-{row}`` and labels ``row % 3``."""
    rng = np.random.default_rng(0)
    for number, rows in enumerate(sizes):
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_part(root, number, image=x,
                   metadata=pa.table({"key": [f"p{number}-{r}" for r in range(rows)], "label": [r % 3 for r in range(rows)]}))
    return root


def cluster_error(root, tmp_path, capsys) -> str:
    code = main(["cluster", "--embeddings", str(root), "--fusion", "image", "--k", "2", "--out", str(tmp_path / "clusters")])
    return _error(code, "cluster", capsys)


def index_error(root, tmp_path, capsys) -> str:
    code = main(["index", "--emb", str(root), "--out", str(tmp_path / "index")])
    return _error(code, "index", capsys)


def evaluate_error(root, tmp_path, capsys) -> str:
    code = main(["evaluate", "--embeddings", str(root), "--out", str(tmp_path / "report")])
    return _error(code, "evaluate", capsys)


def _error(code: int, command: str, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    prefix = f"unicom {command}: error: "
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0][len(prefix):]


def _rows_differ(root):
    pq.write_table(pa.table({"key": ["a", "b"]}), root / "metadata" / "metadata_1.parquet")
    return r"part 1: img_emb_1\.npy has 12, metadata_1\.parquet has 2 rows; .* re-run `unicom embed` for part 1"


def _embedding_file_removed(root):
    (root / "img_emb" / "img_emb_2.npy").unlink()
    return r"metadata_2\.parquet: part 2 has no img_emb_2\.npy beside it"


def _other_dimension(root):
    np.save(root / "img_emb" / "img_emb_1.npy", np.ones((12, 6), dtype=np.float32))
    return r"img_emb_1\.npy: dimension 6, but .*img_emb_0\.npy has 8; every part must come from the same model"


def _integers(root):
    np.save(root / "img_emb" / "img_emb_0.npy", np.ones((12, 8), dtype=np.int32))
    return r"img_emb_0\.npy: dtype int32 is not a float type"


def _truncated_npy(root):
    path = root / "img_emb" / "img_emb_1.npy"
    path.write_bytes(path.read_bytes()[:100])
    return r"img_emb_1\.npy: not a readable \.npy file"


def _damaged_parquet(root):
    (root / "metadata" / "metadata_0.parquet").write_bytes(b"PAR1 not really")
    return r"metadata_0\.parquet: not a readable parquet file"


@pytest.mark.parametrize("damage", [_rows_differ, _embedding_file_removed, _other_dimension, _integers, _truncated_npy,
                                    _damaged_parquet])
def test_the_same_damage_gives_the_same_error_in_cluster_index_and_evaluate(tmp_path, capsys, damage):
    root = write_folder(tmp_path / "emb")
    expected = damage(root)
    messages = {
        "cluster": cluster_error(root, tmp_path, capsys),
        "index": index_error(root, tmp_path, capsys),
        "evaluate": evaluate_error(root, tmp_path, capsys),
    }
    with pytest.raises(InputError) as raised:
        read_embedding_folder(root)  # what the UniFEx feature cache reads its views with
    messages["feature cache"] = str(raised.value)
    assert len(set(messages.values())) == 1, messages
    assert re.search(expected, messages["index"]), messages["index"]
    for stage in ("clusters", "index", "report"):
        assert not (tmp_path / stage).exists() or not any((tmp_path / stage).iterdir()), f"{stage} wrote before checking"


def test_unfinished_parts_stop_cluster_and_evaluate_and_are_left_out_of_an_index(tmp_path, capsys, caplog):
    root = write_folder(tmp_path / "emb", sizes=(12, 12))
    write_part(root, 2, image=np.ones((5, 8), dtype=np.float32))  # embeddings written, metadata not yet
    described = (f"{root / 'metadata'}: parts [2] have embeddings but no metadata_<N>.parquet yet "
                 "(`unicom embed` writes it last: they are unfinished)")
    for message in (cluster_error(root, tmp_path, capsys), evaluate_error(root, tmp_path, capsys)):
        assert message.startswith(described + "; let `unicom embed` finish them")
    with caplog.at_level(logging.WARNING):
        assert main(["index", "--emb", str(root), "--out", str(tmp_path / "index")]) == 0
    assert f"{described}; they are left out" in caplog.messages
    from unicom.search.index import Index

    assert [part.number for part in Index.load(tmp_path / "index").parts] == [0, 1]


def test_a_writer_and_the_readers_agree_on_which_parts_are_complete(tmp_path):
    root = tmp_path / "emb"
    x = np.ones((3, 8), dtype=np.float32)
    keys = pa.table({"key": list("abc")})
    for number in (0, 1):
        write_part(root, number, image=x, text=x, metadata=keys)
    write_part(root, 2, image=x, text=x)  # killed before its metadata
    write_part(root, 3, image=x, metadata=keys)  # an image-only part
    written = {n: {kind for kind in ("image", "text", "metadata") if part_complete(root, n, [kind])} for n in range(4)}
    assert written == {0: {"image", "text", "metadata"}, 1: {"image", "text", "metadata"}, 2: {"image", "text"},
                       3: {"image", "metadata"}}

    folders = EmbeddingFolders.from_root(root)
    images = folders.contents(("image",), allow_unfinished=True)
    assert images.numbers == [n for n in range(4) if part_complete(root, n, ["image", "metadata"])] == [0, 1, 3]
    assert images.unfinished == [2] and images.dimensions == {"image": 8} and images.num_rows == 9
    assert folders.contents(("image",), metadata=False).numbers == [0, 1, 2, 3]  # no mark to tell unfinished parts
    with pytest.raises(InputError, match=r"text_emb and .*img_emb hold different parts: missing \[3\], extra \[\]"):
        folders.contents(("image", "text"), metadata=False)
    with pytest.raises(InputError, match=r"metadata_3\.parquet: part 3 has no text_emb_3\.npy beside it"):
        folders.contents(("text",), allow_unfinished=True)


def test_reading_a_folder_keeps_part_order_rows_and_metadata(tmp_path):
    root = tmp_path / "emb"
    parts = {10: np.eye(4, 6, dtype=np.float16), 9: np.eye(3, 6, k=2, dtype=np.float16)}
    for number, x in parts.items():
        write_part(root, number, image=x, metadata=pa.table({"key": [f"{number}/{r}" for r in range(len(x))]}))
    x, metadata = read_embedding_folder(root)
    expected = np.concatenate([parts[9], parts[10]]).astype(np.float32)  # part 9 before part 10
    assert x.dtype == np.float32 and np.array_equal(x, expected)
    assert metadata.column("key").to_pylist() == [f"9/{r}" for r in range(3)] + [f"10/{r}" for r in range(4)]


def test_a_missing_sub_folder_is_named_with_the_root(tmp_path):
    write_part(tmp_path / "emb", 0, text=np.ones((2, 4), dtype=np.float32), metadata=pa.table({"key": ["a", "b"]}))
    with pytest.raises(InputError, match=r"emb: no img_emb/ folder inside; this needs image embeddings"):
        read_embedding_folder(tmp_path / "emb")


def test_a_remote_folder_is_counted_from_the_parquet_footers_not_the_whole_metadata(tmp_path):
    """At a URL the row counts and column names come from each metadata file's footer (ranged
    reads); LAION's metadata is gigabytes, and a stage needs only these before it starts."""
    from storage_servers import FileServer

    rng = np.random.default_rng(1)
    rows = (60_000, 3)
    for number, count in enumerate(rows):
        captions = [f"caption {i} " + "x" * int(rng.integers(10, 60)) for i in range(count)]
        table = pa.table({"key": [f"{number}-{i:09d}" for i in range(count)], "caption": captions})
        write_part(tmp_path, number, image=np.zeros((count, 4), np.float16), metadata=table)
    # part 0 again with many row groups: a footer longer than the first ranged read
    pq.write_table(pq.read_table(tmp_path / "metadata" / "metadata_0.parquet"), tmp_path / "metadata" / "metadata_0.parquet",
                   row_group_size=100)
    sizes = {n: (tmp_path / "metadata" / f"metadata_{n}.parquet").stat().st_size for n in range(2)}
    assert sizes[0] > 1_000_000
    with FileServer(tmp_path) as server:
        folders = EmbeddingFolders.from_root(server.url)
        contents = folders.contents()
        assert [(part.number, part.rows) for part in contents.parts] == list(enumerate(rows))
        assert contents.metadata_columns(0) == ["key", "caption"]
        assert folders.num_rows("metadata", 0) == rows[0]
        footer = int.from_bytes((tmp_path / "metadata" / "metadata_0.parquet").read_bytes()[-8:-4], "little")
        assert footer > 64 * 1024
        # each of the three calls: one suffix read of 64 KiB, then one of the whole footer, nothing more
        # (a plain GET may appear too: fsspec asks for a file's size with a GET when a HEAD on a reused
        # connection fails, and reads its headers only)
        reads = [line.split()[2] for line in server.state.asked if line.startswith("GET metadata/metadata_0.parquet bytes=")]
        assert reads == ["bytes=-65536", f"bytes=-{footer + 8}"] * 3, "\n".join(server.state.asked)
        (tmp_path / "metadata" / "metadata_1.parquet").write_bytes(b"not parquet, but long enough" * 4)
        with pytest.raises(InputError, match=r"metadata_1.parquet: not a readable parquet file \(no parquet footer"):
            folders.contents()
