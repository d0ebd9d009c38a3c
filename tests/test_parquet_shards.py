"""Parquet shards (img2dataset's ``--output_format parquet``, Hugging Face datasets' image
parquet files): the same samples as the tar shards written from the same images, read by
``unicom embed``, ``unicom train``'s shard source and ``unicom serve``'s images alike."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import captioned_samples, class_image, encode_image, tiny_open_clip, write_tar_shard

from unicom.data.shards import ShardReadError, expand_shards, not_a_shard, read_shard_samples, read_tar_samples
from unicom.data.sources import ListPart, ShardPart, open_parts
from unicom.data.transforms import DecodeError
from unicom.errors import InputError


def write_img2dataset_parquet(path, samples, failed=(), row_group_size=2):
    """A shard as img2dataset's parquet writer lays it out: its metadata columns, then the
    encoded image in ``jpg``; ``failed``: keys of rows it could not download (no image)."""
    rows = []
    for sample in samples:
        rows.append({"url": sample["json"]["url"], "caption": sample["txt"], "key": sample["key"], "status": "success",
                     "error_message": None, "width": 40, "height": 40, "jpg": sample["jpg"]})
    for key in failed:
        rows.append({"url": f"https://example.org/{key}", "caption": "gone", "key": key, "status": "failed_to_download",
                     "error_message": "404", "width": None, "height": None, "jpg": None})
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("jpg", pa.binary())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema), path, row_group_size=row_group_size)
    return path


def write_hf_parquet(path, images, texts, paths=None):
    """A shard as Hugging Face datasets writes an Image column: ``{bytes, path}`` structs,
    no key column."""
    paths = paths or [None] * len(images)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": p} for b, p in zip(images, paths)], image_type),
                      "text": pa.array(texts, pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=3)
    return path


def _as_read(samples):
    return [(s.key, s.image_bytes(), s.caption(), s.json().get("url")) for s in samples]


def test_an_img2dataset_parquet_shard_gives_the_samples_of_its_tar(tmp_path):
    samples = captioned_samples(3, 5)
    write_tar_shard(tmp_path / "00003.tar", samples)
    write_img2dataset_parquet(tmp_path / "00003.parquet", samples, failed=["3-9"])
    from_tar = _as_read(read_tar_samples(tmp_path / "00003.tar"))
    assert _as_read(read_shard_samples(tmp_path / "00003.parquet")) == from_tar  # the failed download is no sample
    assert [key for key, *_ in from_tar] == [f"3-{i}" for i in range(5)]


def test_a_hugging_face_image_column_gives_bytes_and_row_numbers_as_keys(tmp_path):
    images = [encode_image(class_image(i, i, 24), "PNG") for i in range(4)]
    write_hf_parquet(tmp_path / "train-00002-of-00004.parquet", images + [None], [f" text {i} " for i in range(5)],
                     paths=[None] * 4 + ["photos/4.jpg"])
    found = list(read_shard_samples(tmp_path / "train-00002-of-00004.parquet"))
    assert [(s.key, s.image_bytes(), s.caption()) for s in found[:4]] == [(str(i), images[i], f"text {i}") for i in range(4)]
    assert isinstance(found[4].image_bytes(), DecodeError)
    assert str(found[4].image_bytes()) == ("row 4 names its image by path ('photos/4.jpg') without its bytes; embed such "
                                           "a dataset as a list (a CSV or parquet with a 'path' column) where the files are")
    assert [p.number for p in open_parts(str(tmp_path / "train-00002-of-00004.parquet"))] == [2]


def test_keys_read_only_their_row_groups_and_stop_as_a_tars_keys_do(tmp_path, monkeypatch):
    samples = captioned_samples(1, 9)
    write_tar_shard(tmp_path / "1.tar", samples)
    write_img2dataset_parquet(tmp_path / "1.parquet", samples, row_group_size=2)
    groups = []
    original = pq.ParquetFile.read_row_group

    def recording(self, group, *args, **kwargs):
        groups.append(group)
        return original(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recording)
    wanted = {"1-7", "1-2"}
    assert _as_read(read_shard_samples(tmp_path / "1.parquet", keys=wanted)) == \
        _as_read(read_tar_samples(tmp_path / "1.tar", keys=wanted))
    assert groups == [1, 3]  # rows 2 and 7 of groups of two


def test_a_folder_gives_its_tars_before_the_metadata_parquets_beside_them(tmp_path):
    for number in range(2):
        samples = captioned_samples(number, 2)
        write_tar_shard(tmp_path / "wds" / f"{number:05d}.tar", samples)
        pq.write_table(pa.table({"key": [s["key"] for s in samples], "status": ["success"] * 2}),
                       tmp_path / "wds" / f"{number:05d}.parquet")  # img2dataset's metadata, no images
        write_img2dataset_parquet(tmp_path / "pq" / f"{number:05d}.parquet", samples)
    assert [p.name for p in expand_shards(tmp_path / "wds")] == ["00000.tar", "00001.tar"]
    with pytest.raises(InputError, match=r"00000.(tar|parquet) carry the same number 0; .* img2dataset writes a parquet of "
                                         r"metadata beside each tar: give the tars alone \(\*.tar\)"):
        expand_shards(str(tmp_path / "wds" / "*"))
    assert [p.name for p in expand_shards(tmp_path / "pq")] == ["00000.parquet", "00001.parquet"]
    parts = open_parts(str(tmp_path / "pq"))
    assert [(type(p), p.number) for p in parts] == [(ShardPart, 0), (ShardPart, 1)]


def test_an_image_folder_keeps_a_parquet_list_beside_its_images(tmp_path):
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    class_image(0, 0, 16).save(tmp_path / "photos" / "cats" / "a.png")
    pq.write_table(pa.table({"path": ["cats/a.png"]}), tmp_path / "photos" / "list.parquet")
    parts = open_parts(str(tmp_path / "photos"))
    assert [type(p) for p in parts] == [ListPart] and parts[0].size == 1


def test_one_parquet_file_is_a_shard_or_a_list_by_what_it_holds(tmp_path):
    samples = captioned_samples(4, 2)
    write_img2dataset_parquet(tmp_path / "00004.parquet", samples)
    class_image(0, 0, 16).save(tmp_path / "a.png")
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "list.parquet")
    assert [type(p) for p in open_parts(str(tmp_path / "00004.parquet"))] == [ShardPart]
    assert [type(p) for p in open_parts(str(tmp_path / "list.parquet"))] == [ListPart]
    with pytest.raises(InputError) as error:
        open_parts(str(tmp_path / "00004.parquet"), table_options={"label_column": "TEXT", "required": ["TEXT"]})
    assert str(error.value) == (f"{tmp_path / '00004.parquet'}: a parquet shard (its images are in the column 'jpg'), "
                                "and 'TEXT' name the path or label column of a list; a shard's images and keys are its "
                                "own (docs/embedding.md): leave those column options out")
    both = pq.read_table(tmp_path / "00004.parquet").append_column("path", pa.array(["a.png", "a.png"]))
    pq.write_table(both, tmp_path / "both.parquet")
    with pytest.raises(InputError, match=r"both.parquet: holds both images \(column 'jpg'\) and image paths \(column "
                                         r"'path'\); write the images and the list of paths to separate files"):
        open_parts(str(tmp_path / "both.parquet"))


def test_a_parquet_without_images_given_as_a_shard_is_named_with_its_columns(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "status": ["success"]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"key": ["b"], "status": ["success"]}), tmp_path / "00001.parquet")
    message = (r"0000{}.parquet: a parquet file without images \(no jpg, jpeg, png, webp, image column of encoded bytes; "
               r"its columns are key, status\); give the shards")
    with pytest.raises(InputError, match=message.format(0)):  # the first shard, before anything is read
        open_parts([str(tmp_path / "00000.parquet"), str(tmp_path / "00001.parquet")])
    with pytest.raises(InputError, match=message.format(1)):  # another, when its turn comes
        list(ShardPart(1, tmp_path / "00001.parquet").records())


def test_a_truncated_parquet_shard_is_named_before_training_and_when_read(tmp_path):
    write_img2dataset_parquet(tmp_path / "00005.parquet", captioned_samples(5, 3))
    data = (tmp_path / "00005.parquet").read_bytes()
    (tmp_path / "00005.parquet").write_bytes(data[: len(data) // 2])
    why = not_a_shard(tmp_path / "00005.parquet")
    assert why == (f"not a parquet file: it is {len(data) // 2:,} bytes and does not start and end with PAR1 (it starts "
                   "with 'PAR1'; a truncated download?)")
    with pytest.raises(ShardReadError) as error:
        list(read_shard_samples(tmp_path / "00005.parquet"))
    assert error.value.samples == 0 and error.value.reason == why


def test_a_row_group_over_the_limit_is_refused_naming_it(tmp_path, monkeypatch):
    import unicom.data.parquet_shards as parquet_shards

    write_img2dataset_parquet(tmp_path / "00006.parquet", captioned_samples(6, 4), row_group_size=4)
    monkeypatch.setattr(parquet_shards, "MAX_ROW_GROUP_BYTES", 1000)
    with pytest.raises(InputError, match=r"00006.parquet: row group 0 holds [\d,]+ bytes, over the 1,000 read at once; "
                                         r"write the file with smaller row groups"):
        list(read_shard_samples(tmp_path / "00006.parquet"))


def test_embed_of_parquet_shards_equals_embed_of_the_same_tars(tmp_path):
    from unicom.cli import main

    spec = tiny_open_clip(tmp_path / "clip")
    for number in range(2):
        samples = captioned_samples(number, 3 + number)
        write_tar_shard(tmp_path / "tars" / f"{number:05d}.tar", samples)
        write_img2dataset_parquet(tmp_path / "pq" / f"{number:05d}.parquet", samples, failed=[f"{number}-x"])
    common = ["--model", spec, "--modalities", "image,text", "--batch-size", "2", "--workers", "0", "--dtype", "float32"]
    assert main(["embed", "--input", str(tmp_path / "tars"), "--out", str(tmp_path / "from_tars"), *common]) == 0
    assert main(["embed", "--input", str(tmp_path / "pq" / "*.parquet"), "--out", str(tmp_path / "from_pq"), *common]) == 0
    assert main(["embed", "--input", str(tmp_path / "pq" / "*.parquet"), "--out", str(tmp_path / "from_pq_workers"),
                 *common[:-4], "--workers", "2", "--dtype", "float32"]) == 0  # each decoding process reads its shards
    for number in range(2):
        for name in (f"img_emb/img_emb_{number}.npy", f"text_emb/text_emb_{number}.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "from_pq" / name), np.load(tmp_path / "from_tars" / name))
            np.testing.assert_array_equal(np.load(tmp_path / "from_pq_workers" / name), np.load(tmp_path / "from_tars" / name))
        tars = pq.read_table(tmp_path / "from_tars" / "metadata" / f"metadata_{number}.parquet").to_pylist()
        parquets = pq.read_table(tmp_path / "from_pq" / "metadata" / f"metadata_{number}.parquet").to_pylist()
        assert [row.pop("shard") for row in parquets] == [f"{number:05d}.parquet"] * (3 + number)
        assert parquets == [{k: v for k, v in row.items() if k != "shard"} for row in tars]
    assert not (tmp_path / "from_pq" / "failures").exists() or not any((tmp_path / "from_pq" / "failures").iterdir())


def test_a_parquet_shard_in_s3_is_read_by_ranges_as_the_local_file(tmp_path, s3):
    samples = captioned_samples(7, 6)
    write_img2dataset_parquet(tmp_path / "00007.parquet", samples, row_group_size=2)
    s3.bucket("parquet-shards")
    s3.put("parquet-shards", "shards/00007.parquet", (tmp_path / "00007.parquet").read_bytes())
    shards = expand_shards("s3://parquet-shards/shards/")
    assert shards == ["s3://parquet-shards/shards/00007.parquet"]
    assert _as_read(read_shard_samples(shards[0])) == _as_read(read_shard_samples(tmp_path / "00007.parquet"))
    assert _as_read(read_shard_samples(shards[0], keys={"7-4"})) == [("7-4", samples[4]["jpg"], "caption 4",
                                                                       "https://example.org/7/4.jpg")]


def test_the_training_source_reads_parquet_shards_as_it_reads_tars(tmp_path):
    from test_train_data import labels_of, shard_config, write_collection
    from torchvision.transforms import ToTensor

    from unicom.train.data import TrainStream, build_source

    expected = write_collection(tmp_path)
    for number in range(3):  # the same samples, as parquet shards in place of the tars
        samples = list(read_tar_samples(tmp_path / f"{number:05d}.tar"))
        (tmp_path / f"{number:05d}.tar").unlink()
        table = pa.table({"key": [s.key for s in samples], "png": [s.image_bytes() for s in samples],
                          "txt": [s.caption() for s in samples]})
        pq.write_table(table, tmp_path / f"{number:05d}.parquet", row_group_size=5)
    source = build_source(shard_config(tmp_path))
    assert (source.labelled, source.num_classes) == (expected["labelled"], 4)
    reader = TrainStream(source, ToTensor(), batch_size=4, seed=0).reader(0)
    batches = [next(reader) for _ in range(expected["labelled"] // 4)]  # one pass
    assert all(batch.labels.tolist() == labels_of(batch) for batch in batches)
    assert sum(b.unlabelled for b in batches) == expected["unlabelled"]


def test_serve_reads_an_items_image_from_its_parquet_shard(tmp_path):
    from unicom.search.item_images import ShardImages

    samples = captioned_samples(8, 5)
    write_img2dataset_parquet(tmp_path / "shards" / "00008.parquet", samples, failed=["8-gone"], row_group_size=2)
    shards = ShardImages(tmp_path / "shards")
    for sample in samples:
        assert shards.size("00008.parquet", sample["key"], 0) == len(sample["jpg"])
        assert shards.read("00008.parquet", sample["key"], occurrence=0) == sample["jpg"]
    assert shards.read("00008.parquet", "8-3", first=10, occurrence=0) == samples[3]["jpg"][:10]
    assert shards.read("00008.parquet", "8-gone") is None and shards.size("00008.parquet", "8-9") is None
    from PIL import Image

    assert Image.open(io.BytesIO(shards.read("00008.parquet", "8-1"))).size == (40, 40)


def test_a_parquet_shard_over_http_is_read_by_ranges_through_transient_faults(tmp_path, monkeypatch):
    from storage_servers import FileServer

    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    samples = captioned_samples(9, 6)
    write_img2dataset_parquet(tmp_path / "00009.parquet", samples, row_group_size=2)
    with FileServer(tmp_path) as server:
        faults = server.fault("00009.parquet", status=503, statuses=2, cut_after=100, cuts=1)
        url = f"{server.url}/00009.parquet"
        assert [p.path for p in open_parts(url)] == [url]
        assert _as_read(read_shard_samples(url)) == _as_read(read_shard_samples(tmp_path / "00009.parquet"))
        assert faults.requests > 4  # the faults were met and retried
        ranged = [line for line in server.state.asked if line.startswith("GET") and "bytes=" in line]
        assert ranged and all("00009.parquet" in line for line in ranged)


def test_parquet_shards_over_http_embed_as_local_tars_and_one_that_stays_missing_is_retried_later(tmp_path, monkeypatch,
                                                                                                  capsys):
    from storage_servers import FileServer

    import unicom.data.parquet_shards as parquet_shards
    from unicom.cli import main

    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    monkeypatch.setenv("UNICOM_PROGRESS", "0")
    spec = tiny_open_clip(tmp_path / "clip")
    for number in range(3):  # the next shard is opened while one is read: 1 while 0, 2 while 1
        samples = captioned_samples(number, 4 + number)
        write_tar_shard(tmp_path / "tars" / f"{number:05d}.tar", samples)
        write_img2dataset_parquet(tmp_path / "pq" / f"{number:05d}.parquet", samples, row_group_size=2)
    common = ["--model", spec, "--batch-size", "3", "--workers", "0", "--dtype", "float32"]
    assert main(["embed", "--input", str(tmp_path / "tars"), "--out", str(tmp_path / "local"), *common]) == 0
    with FileServer(tmp_path / "pq") as http:
        command = ["embed", "--input", f"{http.url}/{{00000..00002}}.parquet", "--out", str(tmp_path / "remote"), *common]
        http.fault("00001.parquet", missing=1000)
        assert main(command) == 1
        assert "1 parts are not finished" in capsys.readouterr().err
        report = pq.read_table(tmp_path / "remote" / "failures" / "failures_1.parquet").to_pylist()
        assert [(r["part"], r["source"]) for r in report] == [(1, f"{http.url}/00001.parquet")]
        assert "fetch failed" in report[0]["reason"] and "404" in report[0]["reason"]
        assert not parquet_shards._AHEAD  # nothing opened ahead is left behind
        http.state.faults.clear()
        assert main(command) == 0
    for number in range(3):
        name = f"img_emb/img_emb_{number}.npy"
        np.testing.assert_array_equal(np.load(tmp_path / "remote" / name), np.load(tmp_path / "local" / name))


def test_serve_reads_each_image_of_a_remote_parquet_shard_with_one_ranged_request(tmp_path):
    from storage_servers import FileServer

    from unicom.search.item_images import ShardImages

    samples = captioned_samples(2, 6)
    write_img2dataset_parquet(tmp_path / "00002.parquet", samples, row_group_size=2)
    with FileServer(tmp_path) as server:
        shards = ShardImages(server.url)
        assert shards.read("00002.parquet", "2-0", occurrence=0) == samples[0]["jpg"]  # lists the shard, reads its footer
        asked = len(server.state.asked)
        for sample in samples[1:]:
            assert shards.read("00002.parquet", sample["key"], occurrence=0) == sample["jpg"]
        assert len(server.state.asked) - asked == 5  # one request an image


def test_a_caption_column_that_is_not_text_is_left_unread_with_a_warning_and_a_key_column_refused(tmp_path, caplog):
    images = [encode_image(class_image(i, i, 24)) for i in range(2)]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": [["a", "b"], ["c"]]}),
                   tmp_path / "00000.parquet")
    with caplog.at_level("WARNING", logger="unicom.data.parquet_shards"):
        found = list(read_shard_samples(tmp_path / "00000.parquet"))
    assert [(s.key, s.image_bytes(), s.caption()) for s in found] == [("0", images[0], None), ("1", images[1], None)]
    assert re.search(r"the column 'caption' holds list<\w+: string>, not text: it is not read as the samples' caption",
                     caplog.text)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "key": [0.5, 1.5]}), tmp_path / "00001.parquet")
    with pytest.raises(InputError, match=r"00001.parquet: the column 'key' holds double, where a parquet shard's keys are "
                                         r"text or whole numbers; write it as text"):
        open_parts(str(tmp_path / "00001.parquet"))
