"""Webdataset shards whose samples hold more than one image or caption (a ``.jpg`` and a
``.webp``, a ``.txt`` and a ``.caption.txt``): ``--image-column`` / ``--caption-column`` name
the extension of the members to read, as clip-retrieval's ``wds_image_key`` /
``wds_caption_key`` do, for ``unicom embed``, ``unicom train`` (``data.image_column``) and the
images ``unicom serve --shards`` shows; recorded with the embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import class_image, encode_image, write_tar_shard

from unicom.cli import main
from unicom.data.parquet_shards import ShardColumns
from unicom.data.shards import read_shard_samples, read_tar_samples

BLACK = encode_image(Image.new("RGB", (8, 8)), "PNG")


def two_of_each(number: int, count: int) -> tuple[list[dict], list[dict]]:
    """The samples of a shard with two images and two captions each (a black ``jpg`` and the
    picture as ``webp``; a short ``txt`` and the caption as ``caption.txt``), and the same
    samples with the picture and the caption alone under the usual names."""
    both, alone = [], []
    for i in range(count):
        picture = encode_image(class_image(i, number * 10 + i, 40), "WEBP")
        caption = f"a long caption {number} {i}"
        both.append({"key": f"{number}-{i}", "jpg": BLACK, "webp": picture, "txt": "short", "caption.txt": caption})
        alone.append({"key": f"{number}-{i}", "webp": picture, "txt": caption})
    return both, alone


def test_named_members_give_each_samples_image_and_caption(tmp_path):
    both, _ = two_of_each(0, 3)
    write_tar_shard(tmp_path / "00000.tar", both)
    usual = list(read_tar_samples(tmp_path / "00000.tar"))
    assert [(s.image_bytes(), s.caption()) for s in usual] == [(BLACK, "short")] * 3
    for columns in (ShardColumns(image="webp", caption="caption.txt"), ShardColumns(image=".WEBP", caption=".Caption.TXT")):
        named = list(read_shard_samples(tmp_path / "00000.tar", columns=columns))
        assert [(s.key, s.image_bytes(), s.caption()) for s in named] == [
            (sample["key"], sample["webp"], sample["caption.txt"]) for sample in both]


def test_embed_with_named_members_equals_embed_of_the_samples_with_those_alone(tmp_path, capsys):
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "w.pth")
    for number in range(2):
        both, alone = two_of_each(number, 3 + number)
        if number == 1:
            del both[2]["webp"]  # a sample without the member named: no image there
            alone[2]["webp"] = b"not an image"
        write_tar_shard(tmp_path / "both" / f"{number:05d}.tar", both)
        write_tar_shard(tmp_path / "alone" / f"{number:05d}.tar", alone)
    common = ["--model", "timm/test_vit", "--pretrained", str(tmp_path / "w.pth"), "--batch-size", "2", "--workers", "0",
              "--dtype", "float32"]
    named = ["--image-column", "webp", "--caption-column", "caption.txt"]
    assert main(["embed", "--input", str(tmp_path / "alone"), "--out", str(tmp_path / "from_alone"), *common]) == 0
    assert main(["embed", "--input", str(tmp_path / "both"), "--out", str(tmp_path / "from_both"), *common, *named]) == 0
    assert "00001.tar key='1-2': no image in the sample (no 'webp', the image column named)" in capsys.readouterr().err
    for number in range(2):
        name = f"img_emb/img_emb_{number}.npy"
        np.testing.assert_array_equal(np.load(tmp_path / "from_both" / name), np.load(tmp_path / "from_alone" / name))
        rows = pq.read_table(tmp_path / "from_both" / "metadata" / f"metadata_{number}.parquet").to_pylist()
        assert [row["caption"] for row in rows] == [f"a long caption {number} {i}" for i in range(3 + number)
                                                    if (number, i) != (1, 2)]  # the sample without a webp: failed
    config = json.loads((tmp_path / "from_both" / "embed_config.json").read_text())
    assert config["shard_columns"] == {"image": "webp", "caption": "caption.txt"}
    # the same folder is not continued with the usual members
    assert main(["embed", "--input", str(tmp_path / "both"), "--out", str(tmp_path / "from_both"), *common]) == 2
    assert "holds embeddings of another configuration (shard_columns: " in capsys.readouterr().err


def test_the_training_source_reads_the_image_member_named(tmp_path):
    from test_train_data import labels_of, shard_config, write_collection
    from torchvision.transforms import ToTensor

    from unicom.train.data import TrainStream, build_source

    expected = write_collection(tmp_path)
    for number in range(3):  # each picture under .picture.png, a black image under the usual name
        samples = list(read_tar_samples(tmp_path / f"{number:05d}.tar"))
        write_tar_shard(tmp_path / f"{number:05d}.tar", [{"key": s.key, "png": BLACK, "picture.png": s.image_bytes()}
                                                         for s in samples])
    source = build_source(shard_config(tmp_path, "data.image_column=picture.png"))
    assert (source.labelled, source.num_classes) == (expected["labelled"], 4)
    reader = TrainStream(source, ToTensor(), batch_size=4, seed=0).reader(0)
    batches = [next(reader) for _ in range(expected["labelled"] // 4)]  # one pass
    assert all(batch.labels.tolist() == labels_of(batch) for batch in batches)
    black = TrainStream(build_source(shard_config(tmp_path)), ToTensor(), batch_size=4, seed=0).reader(0)
    assert float(next(black).images.abs().max()) == 0.0  # the usual name: the black images


def test_serve_shows_the_image_member_recorded_with_the_embeddings(tmp_path):
    from unicom.formats.embeddings import write_config, write_part
    from unicom.search.index import Index
    from unicom.search.item_images import ItemImages
    from unicom.search.service import Served, _shard_columns

    both, _ = two_of_each(3, 4)
    write_tar_shard(tmp_path / "shards" / "00003.tar", both)
    write_part(tmp_path / "emb", 3, image=np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32),
               metadata=pa.table({"key": [s["key"] for s in both], "shard": ["00003.tar"] * 4}))
    write_config(tmp_path / "emb", {"shard_columns": {"image": "webp"}})
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    images = ItemImages(None, tmp_path / "shards", 4, _shard_columns({"i": Served("i", index)}))
    for sample in both:
        assert images.shards.read("00003.tar", sample["key"], occurrence=0) == sample["webp"]
    assert ItemImages(None, tmp_path / "shards", 4).shards.read("00003.tar", both[0]["key"]) == BLACK


def test_a_key_column_for_tars_is_refused_before_any_work(tmp_path, capsys):
    both, _ = two_of_each(0, 2)
    write_tar_shard(tmp_path / "00000.tar", both)
    assert main(["embed", "--input", str(tmp_path / "00000.tar"), "--model", "timm/test_vit", "--out",
                 str(tmp_path / "EMB"), "--key-column", "id"]) == 2
    assert "the key column named ('id') is a column of parquet shards" in capsys.readouterr().err
    assert not (tmp_path / "EMB").exists()
    with pytest.raises(Exception, match="--image-column 'a/b': for tar shards"):
        list(read_shard_samples(tmp_path / "00000.tar", columns=ShardColumns(image="a/b")))
