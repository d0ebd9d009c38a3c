"""Parquet shards whose columns have other names than the usual ones (a Hugging Face
dataset's ``picture``, ``prompt`` and ``id``): named once to ``unicom embed`` (``--image-column``,
``--caption-column``, ``--key-column``) or to ``unicom train`` (``data.image_column``,
``data.key_column``), recorded with the embeddings, and read by every later reader of the
shards (``unicom cluster show``, ``unicom index`` and ``unicom serve --shards``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import captioned_samples, class_image, encode_image, tiny_open_clip, write_tar_shard

from unicom.cli import main
from unicom.data.parquet_shards import ShardColumns
from unicom.data.shards import read_shard_samples, read_tar_samples
from unicom.data.sources import ListPart, ShardPart, open_parts
from unicom.errors import InputError

COLUMNS = ShardColumns(image="picture", caption="prompt", key="id")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_renamed_parquet(path, samples, first_id=100, row_group_size=2):
    """``samples`` (of :func:`captioned_samples`) as a dataset with its own names: the image in
    ``picture`` ({bytes, path} structs), the caption in ``prompt``, whole-number ids in
    ``id``; beside them the columns the usual names would pick, holding something else: a
    grey ``image`` (a conditioning image) and a ``text`` (a negative prompt)."""
    grey = encode_image(Image.new("RGB", (40, 40), (128, 128, 128)), "PNG")
    table = pa.table({
        "id": pa.array(range(first_id, first_id + len(samples)), pa.int64()),
        "image": pa.array([{"bytes": grey, "path": None}] * len(samples), IMAGE_TYPE),
        "picture": pa.array([{"bytes": s["jpg"], "path": None} for s in samples], IMAGE_TYPE),
        "text": pa.array(["blurry"] * len(samples), pa.string()),
        "prompt": pa.array([s["txt"] for s in samples], pa.string()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_same_tar(path, samples, first_id=100):
    """The tar of the samples :func:`write_renamed_parquet` holds, keyed by their ids."""
    return write_tar_shard(path, [{"key": str(first_id + i), "jpg": s["jpg"], "txt": s["txt"]}
                                  for i, s in enumerate(samples)])


def _as_read(samples):
    return [(s.key, s.image_bytes(), s.caption()) for s in samples]


def test_named_columns_give_the_samples_of_the_same_tar_and_the_usual_names_do_not(tmp_path):
    samples = captioned_samples(2, 5)
    write_renamed_parquet(tmp_path / "00002.parquet", samples)
    write_same_tar(tmp_path / "00002.tar", samples)
    expected = _as_read(read_tar_samples(tmp_path / "00002.tar"))
    assert _as_read(read_shard_samples(tmp_path / "00002.parquet", columns=COLUMNS)) == expected
    assert _as_read(read_shard_samples(tmp_path / "00002.parquet", keys={"103"}, columns=COLUMNS)) == [expected[3]]
    usual = _as_read(read_shard_samples(tmp_path / "00002.parquet"))  # image, text and row numbers
    assert [key for key, _, _ in usual] == ["0", "1", "2", "3", "4"]
    assert {caption for _, _, caption in usual} == {"blurry"}
    assert all(image != sample["jpg"] for (_, image, _), sample in zip(usual, samples))
    # one column named, the others found by their usual names
    only_key = _as_read(read_shard_samples(tmp_path / "00002.parquet", columns=ShardColumns(key="id")))
    assert [key for key, _, _ in only_key] == [key for key, _, _ in expected] and only_key[0][2] == "blurry"


def test_a_key_column_of_whole_numbers_gives_the_keys_as_text(tmp_path):
    samples = captioned_samples(0, 2)
    pq.write_table(pa.table({"key": pa.array([7, 9], pa.int64()), "jpg": [s["jpg"] for s in samples]}),
                   tmp_path / "00000.parquet")
    assert [s.key for s in read_shard_samples(tmp_path / "00000.parquet")] == ["7", "9"]


def test_a_named_column_that_is_missing_or_of_another_type_is_refused_naming_the_file_and_its_columns(tmp_path):
    path = write_renamed_parquet(tmp_path / "00000.parquet", captioned_samples(0, 2))
    cases = [
        (ShardColumns(image="photo"), "no column 'photo' (the image column named); its columns are id, image, picture, "
                                      "text, prompt: name one of them"),
        (ShardColumns(image="prompt"), "the column 'prompt' (the image column named) holds string, where the image "
                                       "column holds encoded images (binary, or structs with a 'bytes' field): name "
                                       "another column"),
        (ShardColumns(caption="id"), "the column 'id' (the caption column named) holds int64, where the caption column "
                                     "holds text (one caption a row): name another column"),
        (ShardColumns(key="picture"), "the column 'picture' (the key column named) holds struct<bytes: binary, path: "
                                      "string>, where the key column holds text or whole numbers: name another column"),
    ]
    for columns, message in cases:
        with pytest.raises(InputError) as error:
            list(read_shard_samples(path, columns=columns))
        assert str(error.value) == f"{path}: {message}"
        with pytest.raises(InputError) as error:  # before anything is written
            open_parts(str(tmp_path / "*.parquet"), shard_columns=columns)
        assert str(error.value) == f"{path}: {message}"


def test_captions_in_lists_are_refused_when_named_and_left_unread_otherwise(tmp_path):
    samples = captioned_samples(0, 2)
    table = pa.table({"jpg": [s["jpg"] for s in samples], "captions": [["one", "two"], ["three"]]})
    pq.write_table(table, tmp_path / "00000.parquet")
    with pytest.raises(InputError, match=r"the column 'captions' \(the caption column named\) holds list<element: "
                                         r"string>, where the caption column holds text \(one caption a row\)"):
        list(read_shard_samples(tmp_path / "00000.parquet", columns=ShardColumns(caption="captions")))
    assert [s.caption() for s in read_shard_samples(tmp_path / "00000.parquet")] == [None, None]


def test_a_key_column_for_tars_and_columns_for_an_image_folder_or_a_csv_list_are_refused_not_ignored(tmp_path):
    samples = captioned_samples(0, 2)
    write_same_tar(tmp_path / "tars" / "00000.tar", samples)
    with pytest.raises(InputError) as error:
        open_parts(str(tmp_path / "tars"), shard_columns=ShardColumns(key="id"))
    assert str(error.value) == (f"{tmp_path / 'tars' / '00000.tar'}: a tar shard, whose samples' keys are its members' "
                                "names (000123 of 000123.jpg); the key column named ('id') is a column of parquet "
                                "shards: leave it out")
    with pytest.raises(InputError, match="a tar shard, whose samples' keys are its members' names"):
        list(read_shard_samples(tmp_path / "tars" / "00000.tar", columns=ShardColumns(key="id")))
    for wrong in ("a/b", ".", "..txt"):  # no member's extension can be that
        with pytest.raises(InputError, match=f"--caption-column '{re.escape(wrong)}': for tar shards, the extension"):
            open_parts(str(tmp_path / "tars"), shard_columns=ShardColumns(caption=wrong))
    (tmp_path / "photos").mkdir()
    class_image(0, 0, 16).save(tmp_path / "photos" / "a.png")
    with pytest.raises(InputError, match=r"photos: an image folder, whose keys are its files' paths; the columns named "
                                         r"\(image 'picture'\) are columns of parquet shards or of a list"):
        open_parts(str(tmp_path / "photos"), shard_columns=ShardColumns(image="picture"))
    (tmp_path / "list.csv").write_text("path\nphotos/a.png\n")
    with pytest.raises(InputError, match=r"list.csv: a list of image files, whose paths are in its path column; the "
                                         r"image column named \('picture'\) is the column of encoded images"):
        open_parts(str(tmp_path / "list.csv"), shard_columns=ShardColumns(image="picture"))


def test_images_under_a_name_of_their_own_are_refused_naming_the_column_to_name(tmp_path):
    samples = captioned_samples(0, 2)
    table = pa.table({"img": pa.array([{"bytes": s["jpg"], "path": None} for s in samples], IMAGE_TYPE),
                      "label": [0, 1]})
    pq.write_table(table, tmp_path / "00000.parquet")
    message = (f"{tmp_path / '00000.parquet'}: its images are in a column of another name than jpg, jpeg, png, webp, "
               "image ('img' holds encoded images; its columns are img, label): name it, unicom embed --image-column "
               "img (and data.image_column=img to train on the shards)")
    for given in (str(tmp_path / "00000.parquet"), str(tmp_path / "*.parquet")):  # one file, or shards
        with pytest.raises(InputError) as error:
            open_parts(given)
        assert str(error.value) == message
    with pytest.raises(InputError) as error:
        list(read_shard_samples(tmp_path / "00000.parquet"))
    assert str(error.value) == message


def test_one_parquet_file_with_its_image_column_named_is_a_shard(tmp_path):
    samples = captioned_samples(4, 3)
    table = pa.table({"photo": [s["jpg"] for s in samples], "path": ["x.jpg"] * 3})  # no usual image column
    pq.write_table(table, tmp_path / "00004.parquet")
    assert [type(p) for p in open_parts(str(tmp_path / "00004.parquet"))] == [ListPart]  # a list of paths, unnamed
    with pytest.raises(InputError, match=r"holds both images \(column 'photo'\) and image paths \(column 'path'\)"):
        open_parts(str(tmp_path / "00004.parquet"), shard_columns=ShardColumns(image="photo"))
    pq.write_table(table.drop_columns(["path"]), tmp_path / "00004.parquet")
    parts = open_parts(str(tmp_path / "00004.parquet"), shard_columns=ShardColumns(image="photo"))
    assert [(type(p), p.number) for p in parts] == [(ShardPart, 4)]
    assert [r.image for r in parts[0].records()] == [s["jpg"] for s in samples]
    (tmp_path / "00005.parquet").write_bytes(b"an error page")
    with pytest.raises(InputError, match=r"00005.parquet: cannot be read as a parquet shard \(ArrowInvalid: "):
        open_parts(str(tmp_path / "00005.parquet"), shard_columns=ShardColumns(image="photo"))


def test_embed_with_named_columns_equals_embed_of_the_same_tars_and_records_them(tmp_path, capsys):
    spec = tiny_open_clip(tmp_path / "clip")
    for number in range(2):
        samples = captioned_samples(number, 3 + number)
        write_renamed_parquet(tmp_path / "pq" / f"{number:05d}.parquet", samples, first_id=10 * number)
        write_same_tar(tmp_path / "tars" / f"{number:05d}.tar", samples, first_id=10 * number)
    common = ["--model", spec, "--modalities", "image,text", "--batch-size", "2", "--workers", "0", "--dtype", "float32"]
    named = ["--image-column", "picture", "--caption-column", "prompt", "--key-column", "id"]
    assert main(["embed", "--input", str(tmp_path / "tars"), "--out", str(tmp_path / "from_tars"), *common]) == 0
    assert main(["embed", "--input", str(tmp_path / "pq"), "--out", str(tmp_path / "from_pq"), *common, *named]) == 0
    assert main(["embed", "--input", str(tmp_path / "pq"), "--out", str(tmp_path / "from_pq_workers"), *common[:-4],
                 "--workers", "2", "--dtype", "float32", *named]) == 0  # each decoding process reads its shards
    for number in range(2):
        for name in (f"img_emb/img_emb_{number}.npy", f"text_emb/text_emb_{number}.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "from_pq" / name), np.load(tmp_path / "from_tars" / name))
            np.testing.assert_array_equal(np.load(tmp_path / "from_pq_workers" / name),
                                          np.load(tmp_path / "from_tars" / name))
        tars = pq.read_table(tmp_path / "from_tars" / "metadata" / f"metadata_{number}.parquet").to_pylist()
        parquets = pq.read_table(tmp_path / "from_pq" / "metadata" / f"metadata_{number}.parquet").to_pylist()
        assert [row.pop("shard") for row in parquets] == [f"{number:05d}.parquet"] * (3 + number)
        assert parquets == [{k: v for k, v in row.items() if k != "shard"} for row in tars]
    config = json.loads((tmp_path / "from_pq" / "embed_config.json").read_text())
    assert config["shard_columns"] == {"image": "picture", "caption": "prompt", "key": "id"}
    assert "shard_columns" not in json.loads((tmp_path / "from_tars" / "embed_config.json").read_text())
    capsys.readouterr()
    # the same folder is not continued with other columns, nor with the usual names
    for other in (["--image-column", "image", "--caption-column", "prompt", "--key-column", "id"], []):
        assert main(["embed", "--input", str(tmp_path / "pq"), "--out", str(tmp_path / "from_pq"), *common, *other]) == 2
        assert "holds embeddings of another configuration (shard_columns: " in capsys.readouterr().err
    assert main(["embed", "--input", str(tmp_path / "pq"), "--out", str(tmp_path / "from_pq"), *common, *named]) == 0


def test_the_training_source_reads_parquet_shards_by_their_named_columns(tmp_path):
    from test_train_data import labels_of, shard_config, write_collection
    from torchvision.transforms import ToTensor

    from unicom.train.data import TrainStream, build_source

    expected = write_collection(tmp_path)
    black = encode_image(Image.new("RGB", (4, 4)), "PNG")
    for number in range(3):  # the same samples with their own names, a black image under the usual name
        samples = list(read_tar_samples(tmp_path / f"{number:05d}.tar"))
        (tmp_path / f"{number:05d}.tar").unlink()
        table = pa.table({"sample_id": [s.key for s in samples], "photo": [s.image_bytes() for s in samples],
                          "png": [black] * len(samples)})
        pq.write_table(table, tmp_path / f"{number:05d}.parquet", row_group_size=5)
    source = build_source(shard_config(tmp_path, "data.image_column=photo", "data.key_column=sample_id"))
    assert (source.labelled, source.num_classes) == (expected["labelled"], 4)
    reader = TrainStream(source, ToTensor(), batch_size=4, seed=0).reader(0)
    batches = [next(reader) for _ in range(expected["labelled"] // 4)]  # one pass
    assert all(batch.labels.tolist() == labels_of(batch) for batch in batches)
    assert sum(b.unlabelled for b in batches) == expected["unlabelled"]
    with pytest.raises(InputError, match=r"00000.parquet: none of its first 12 sample keys \(e.g. '0'\) is in "
                                         r"labels_0.parquet"):
        build_source(shard_config(tmp_path, "data.image_column=photo"))  # keyed by row numbers: no label matches
    with pytest.raises(InputError, match=r"no column 'picture' \(the image column named\); its columns are sample_id, "
                                         r"photo, png"):
        build_source(shard_config(tmp_path, "data.image_column=picture"))


def test_a_recipe_naming_an_image_column_without_shards_is_refused():
    from unicom.train.config import load_config

    with pytest.raises(InputError, match="data.image_column names the column of encoded images of data.shards"):
        load_config(None, ["out=/tmp/unused", "data.table=list.csv", "data.image_column=photo", "model.name=ViT-B-32"])


SWATCHES = [(200, 0, 0), (220, 0, 0), (240, 0, 0), (0, 0, 200), (0, 0, 220), (0, 0, 240)]


def test_cluster_show_reads_the_columns_recorded_with_the_embeddings(tmp_path, capsys):
    """Six swatches in a parquet shard under their own names (three reds, three blues), with
    grey images under the usual name: the sheet shows the swatches, as the recorded
    columns say; a folder that records none reads the grey images' column."""
    from test_cluster_show import GAP, LABEL_WIDTH

    from unicom.formats.clusters import ClusterFolder
    from unicom.formats.embeddings import read_config, write_config, write_part

    ids = [f"s{i}" for i in range(6)]
    grey = encode_image(Image.new("RGB", (24, 24), (128, 128, 128)), "PNG")
    table = pa.table({"name": ids, "swatch": [encode_image(Image.new("RGB", (24, 24), rgb), "PNG") for rgb in SWATCHES],
                      "png": [grey] * 6})
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "00000.parquet", row_group_size=4)
    write_part(tmp_path / "emb", 0, image=np.zeros((6, 4), np.float32),
               metadata=pa.table({"key": ids, "shard": ["00000.parquet"] * 6}))
    write_config(tmp_path / "emb", {"model": "m", "shard_columns": {"image": "swatch", "key": "name"}})
    clusters = ClusterFolder(tmp_path / "clusters")
    clusters.write_centroids(np.eye(2, 4, dtype=np.float32), {"k": 2, "dimension": 4, "fusion": "image"})
    clusters.write_labels(0, pa.array(ids), np.array([0, 0, 0, 1, 1, 1]), np.ones(6, np.float32),
                          {"rows": 6, "invalid": 0, "key_column": "key"})

    def shown():
        assert main(["cluster", "show", "--embeddings", str(tmp_path / "emb"), "--input", str(tmp_path / "shards"),
                     "--clusters", "0", "--samples", "3", "--neighbours", "1", "--thumbnail", "24",
                     "--out", str(tmp_path / "clusters"), "--sheet", str(tmp_path / "sheet.png")]) == 0
        sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
        cell = 24 + GAP
        return [{sheet.getpixel((LABEL_WIDTH + GAP + j * cell + 12, GAP + r * cell + 12)) for j in range(3)}
                for r in range(2)]

    assert shown() == [set(SWATCHES[:3]), set(SWATCHES[3:])]
    write_config(tmp_path / "emb", {**read_config(tmp_path / "emb"), "shard_columns": {"key": "name"}})
    assert shown() == [{(128, 128, 128)}, {(128, 128, 128)}]  # the usual image column, by the recorded keys
    write_config(tmp_path / "emb", {"model": "m", "shard_columns": {"image": ["swatch"]}})
    capsys.readouterr()
    assert main(["cluster", "show", "--embeddings", str(tmp_path / "emb"), "--input", str(tmp_path / "shards"),
                 "--clusters", "0", "--out", str(tmp_path / "clusters"), "--sheet", str(tmp_path / "sheet.png")]) == 2
    assert "embed_config.json: the shard columns {'image': ['swatch']} are not column names" in capsys.readouterr().err


def test_the_index_keeps_the_columns_and_serve_reads_the_items_images_by_them(tmp_path):
    from unicom.formats.embeddings import write_config, write_part
    from unicom.search.index import Index
    from unicom.search.item_images import ItemImages
    from unicom.search.service import Served, _shard_columns

    samples = captioned_samples(3, 4)
    write_renamed_parquet(tmp_path / "shards" / "00003.parquet", samples, first_id=30)
    rng = np.random.default_rng(0)
    write_part(tmp_path / "emb", 3, image=rng.normal(size=(4, 8)).astype(np.float32),
               metadata=pa.table({"key": [str(30 + i) for i in range(4)], "shard": ["00003.parquet"] * 4}))
    write_config(tmp_path / "emb", {"shard_columns": {"image": "picture", "key": "id"}})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    assert Index.load(tmp_path / "index").config["shard_columns"] == {"image": "picture", "key": "id"}
    images = ItemImages(None, tmp_path / "shards", 4, _shard_columns({"i": Served("i", index)}))
    for i, sample in enumerate(samples):
        assert images.shards.read("00003.parquet", str(30 + i), occurrence=0) == sample["jpg"]
    assert ItemImages(None, tmp_path / "shards", 4).shards.read("00003.parquet", "30") is None  # keys are row numbers
    write_config(tmp_path / "plain", {})
    write_part(tmp_path / "plain", 0, image=rng.normal(size=(2, 8)).astype(np.float32),
               metadata=pa.table({"key": ["0", "1"], "shard": ["00003.parquet"] * 2}))
    other = Index.build(tmp_path / "plain", tmp_path / "plain_index")
    with pytest.raises(InputError, match=r"the indexes were embedded from parquet shards by other columns \(a: "
                                         r"\{'image': 'picture', 'key': 'id'\}; b: the usual names\), and --shards is one "
                                         r"folder read one way: serve them apart"):
        _shard_columns({"a": Served("a", index), "b": Served("b", other)})


def test_named_columns_over_http_open_each_next_shard_once_ahead_and_embed_as_local_tars(tmp_path, monkeypatch):
    """Each remote shard is opened once: the one opened ahead, with the columns named, is the
    one read (opened again with other columns, it would be read twice)."""
    from storage_servers import FileServer

    import unicom.data.parquet_shards as parquet_shards

    monkeypatch.setenv("UNICOM_PROGRESS", "0")
    opened = []
    samples_of = parquet_shards._samples
    monkeypatch.setattr(parquet_shards, "_samples", lambda location, *rest: opened.append(location) or
                        samples_of(location, *rest))
    spec = tiny_open_clip(tmp_path / "clip")
    for number in range(3):
        samples = captioned_samples(number, 4 + number)
        write_renamed_parquet(tmp_path / "pq" / f"{number:05d}.parquet", samples, first_id=10 * number)
        write_same_tar(tmp_path / "tars" / f"{number:05d}.tar", samples, first_id=10 * number)
    common = ["--model", spec, "--batch-size", "3", "--workers", "0", "--dtype", "float32"]
    assert main(["embed", "--input", str(tmp_path / "tars"), "--out", str(tmp_path / "local"), *common]) == 0
    with FileServer(tmp_path / "pq") as http:
        opened.clear()
        assert main(["embed", "--input", f"{http.url}/{{00000..00002}}.parquet", "--out", str(tmp_path / "remote"),
                     *common, "--image-column", "picture", "--key-column", "id"]) == 0
        assert sorted(opened) == [f"{http.url}/{number:05d}.parquet" for number in range(3)]
        assert not parquet_shards._AHEAD
    for number in range(3):
        name = f"img_emb/img_emb_{number}.npy"
        np.testing.assert_array_equal(np.load(tmp_path / "remote" / name), np.load(tmp_path / "local" / name))
        keys = pq.read_table(tmp_path / "remote" / "metadata" / f"metadata_{number}.parquet").column("key").to_pylist()
        assert keys == [str(10 * number + i) for i in range(4 + number)]
