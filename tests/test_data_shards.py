"""Webdataset shards: patterns, numeric order, samples grouped by key, damaged tars."""

from __future__ import annotations

import io
import tarfile

import pytest
from support import class_image, encode_image, write_tar_shard

from unicom.data.shards import ShardReadError, TarSample, expand_shards, read_tar_samples, shard_number
from unicom.data.sources import open_parts
from unicom.errors import InputError


def _empty_shards(folder, names):
    for name in names:
        write_tar_shard(folder / name, [{"key": "a", "txt": "x"}])


def test_brace_pattern_expands_in_numeric_order(tmp_path):
    _empty_shards(tmp_path, ["8.tar", "9.tar", "10.tar", "11.tar"])
    shards = expand_shards(str(tmp_path / "{8..11}.tar"))
    assert [p.name for p in shards] == ["8.tar", "9.tar", "10.tar", "11.tar"]


def test_zero_padded_brace_pattern_and_list_of_patterns(tmp_path):
    _empty_shards(tmp_path, ["00000.tar", "00001.tar", "00002.tar"])
    shards = expand_shards([str(tmp_path / "{00001..00002}.tar"), str(tmp_path / "00000.tar")])
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]


def test_glob_and_folder_are_sorted_by_number_not_by_text(tmp_path):
    _empty_shards(tmp_path, ["shard-2.tar", "shard-10.tar", "shard-1.tar"])
    expected = ["shard-1.tar", "shard-2.tar", "shard-10.tar"]
    assert [p.name for p in expand_shards(str(tmp_path / "*.tar"))] == expected
    assert [p.name for p in expand_shards(str(tmp_path))] == expected


def test_shards_numbered_i_of_n_take_i_as_their_part(tmp_path):
    # Hugging Face's "train-00012-of-00100.tar": every shard carries the total, 100, last
    _empty_shards(tmp_path, ["train-00010-of-00012.tar", "train-00002-of-00012.tar", "train-00000-of-00012.tar"])
    parts = open_parts(str(tmp_path / "train-*-of-00012.tar"))
    assert [(part.number, part.path.name) for part in parts] == [
        (0, "train-00000-of-00012.tar"), (2, "train-00002-of-00012.tar"), (10, "train-00010-of-00012.tar")]


@pytest.mark.parametrize("shard, number", [
    ("00012.tar", 12), ("shard-000012.tar", 12), ("data-00012.tar.gz", 12), ("laion2b-en-2023-00012.tar", 12),
    ("train-00012-of-00100.tar", 12),
    # "of" in a name without a shard number before it is no total: the number is the shard's
    ("copy-of-3.tar", 3), ("/data/part-of-7.tar.gz", 7),
    # a quoted URL of a pipe command is the word inside the quotes
    ("pipe:aws s3 cp 's3://bucket/00012.tar' -", 12), ('pipe:curl -s "https://host/00013.tar" -o -', 13),
    ("pipe:curl -s 'https://host/00014.tar?X-Amz-Signature=abc&X-Amz-Expires=60'", 14),
])
def test_shard_numbers_of_real_names(shard, number):
    assert shard_number(shard) == number


def test_a_signed_shard_url_keeps_its_query(tmp_path):
    # the "?" of a signed URL's query is no glob character: the shard is read with its signature
    from storage_servers import FileServer

    _empty_shards(tmp_path, ["00012.tar", "00013.tar"])
    with FileServer(tmp_path) as server:
        signed = [f"{server.url}/00012.tar?X-Amz-Signature=ab%2Fc&X-Amz-Expires=60", f"{server.url}/00013.tar?token=1"]
        assert expand_shards(signed) == signed
        assert [(part.number, part.path) for part in open_parts(signed)] == [(12, signed[0]), (13, signed[1])]


def test_a_shard_name_without_a_number_is_named_as_given(tmp_path):
    with pytest.raises(InputError, match=r"^pipe:aws s3 cp s3://bucket/latest -: no number in the shard's name '-'; "
                                         r"each shard is the output part of the number in its name"):
        shard_number("pipe:aws s3 cp s3://bucket/latest -")
    with pytest.raises(InputError, match=r"photos.tar: no number in the shard's name 'photos.tar'"):
        shard_number(str(tmp_path / "photos.tar"))


def test_missing_shard_in_a_pattern_is_named(tmp_path):
    _empty_shards(tmp_path, ["00000.tar", "00002.tar"])
    with pytest.raises(InputError, match="00001.tar: shard not found"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))


def test_two_shards_with_the_same_number_are_refused(tmp_path):
    _empty_shards(tmp_path / "a", ["00003.tar"])
    _empty_shards(tmp_path / "b", ["00003.tar"])
    with pytest.raises(InputError, match="same number 3"):
        expand_shards([str(tmp_path / "a" / "00003.tar"), str(tmp_path / "b" / "00003.tar")])


def test_samples_are_grouped_by_key_in_tar_order(tmp_path):
    jpeg = encode_image(class_image(1, 0, 16), "JPEG")
    png = encode_image(class_image(2, 0, 16), "PNG")
    shard = write_tar_shard(tmp_path / "0.tar", [
        {"key": "dir/000", "jpg": jpeg, "txt": "a red thing", "json": {"url": "http://a/0.jpg"}},
        {"key": "dir/001", "png": png, "txt": "a blue thing"},
        {"key": "dir/002", "txt": "caption only"},
    ])
    samples = list(read_tar_samples(shard))
    assert [s.key for s in samples] == ["dir/000", "dir/001", "dir/002"]
    assert samples[0].image_bytes() == jpeg and samples[1].image_bytes() == png
    assert samples[2].image_bytes() is None
    assert [s.caption() for s in samples] == ["a red thing", "a blue thing", "caption only"]
    assert samples[0].json() == {"url": "http://a/0.jpg"} and samples[1].json() == {}


def test_a_file_added_twice_in_a_row_begins_a_second_sample_of_that_key_and_is_not_dropped(tmp_path):
    first, second = encode_image(class_image(1, 0, 16)), encode_image(class_image(2, 1, 16))
    shard = tmp_path / "0.tar"
    with tarfile.open(shard, "w") as tar:  # 000.jpg, 000.txt, then 000.jpg again (as `tar -rf` appends it)
        for name, data in [("000.jpg", first), ("000.txt", b"a caption"), ("000.jpg", second), ("001.jpg", first)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(read_tar_samples(shard))
    assert [(s.key, s.image_bytes(), s.caption()) for s in samples] == [
        ("000", first, "a caption"), ("000", second, None), ("001", first, None)]


def test_key_is_the_name_up_to_the_first_dot(tmp_path):
    path = tmp_path / "0.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("x1.seg.png", b"p"), ("x1.jpg", b"j"), ("README", b"no extension")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(read_tar_samples(path))
    assert len(samples) == 1
    assert samples[0].files == {"seg.png": b"p", "jpg": b"j"}


def test_member_names_that_are_not_utf8_give_keys_with_their_bytes_escaped(tmp_path):
    """A GNU tar written with Latin-1 names: keys must still be text a parquet file can hold."""
    path = tmp_path / "0.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ("caf\xe9.jpg", "caf\xe9.txt", "d\xe9j\xe0.jpg", "naïve.jpg"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    with tarfile.open(tmp_path / "1.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # pax names are UTF-8
        tar.addfile(tarfile.TarInfo("naïve.jpg"), io.BytesIO(b""))
    keys = [sample.key for sample in read_tar_samples(path)] + [s.key for s in read_tar_samples(tmp_path / "1.tar")]
    assert keys == ["caf\\xe9", "d\\xe9j\\xe0", "na\\xefve", "naïve"]
    assert [key.encode("utf-8") for key in keys]  # no surrogates left


def test_unreadable_json_reads_as_empty():
    assert TarSample("k", {"json": b"{not json"}).json() == {}


def test_truncated_tar_yields_the_samples_before_the_damage(tmp_path):
    big = encode_image(class_image(0, 0, 64), "PNG")
    shard = write_tar_shard(tmp_path / "0.tar", [
        {"key": f"{i:03d}", "png": big, "txt": f"caption {i}"} for i in range(4)
    ])
    data = shard.read_bytes()
    cut = data.index(b"003.png")  # the header of the last image, then cut inside its data
    shard.write_bytes(data[: cut + 512 + 100])
    seen = []
    with pytest.raises(ShardReadError) as error:
        for sample in read_tar_samples(shard):
            seen.append(sample.key)
    assert seen == ["000", "001", "002"]
    assert error.value.path == shard and error.value.samples == 3


@pytest.mark.parametrize("where", ["inside a header", "between two members"])
def test_a_tar_cut_where_no_data_is_missing_is_truncated_too(tmp_path, where):
    """A download cut in a member's header, or between members, leaves no end-of-archive
    blocks: the samples after the cut are missing, which is damage, not the end."""
    shard = write_tar_shard(tmp_path / "0.tar", [{"key": f"{i:03d}", "txt": f"caption {i}"} for i in range(4)])
    data = shard.read_bytes()
    header = data.index(b"002.txt")  # the header of the third sample's member
    shard.write_bytes(data[: header + 300] if where == "inside a header" else data[:header])
    seen = []
    with pytest.raises(ShardReadError, match="ends without the end-of-archive blocks") as error:
        for sample in read_tar_samples(shard):
            seen.append(sample.key)
    assert seen == ["000", "001"] and error.value.samples == 2


def test_an_empty_shard_is_said_to_be_empty(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match=r"unreadable after 0 samples \(TruncatedTarError: the file is empty"):
        list(read_tar_samples(tmp_path / "0.tar"))
    with pytest.raises(ShardReadError, match=r"the file is empty"):
        list(read_tar_samples("pipe:true"))


def test_a_whole_tar_reads_to_its_end_without_error(tmp_path):
    shard = write_tar_shard(tmp_path / "0.tar", [{"key": f"{i:03d}", "txt": f"caption {i}"} for i in range(4)])
    assert [sample.key for sample in read_tar_samples(shard)] == ["000", "001", "002", "003"]


def test_a_file_that_is_not_a_tar_raises_shard_read_error(tmp_path):
    path = tmp_path / "0.tar"
    path.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardReadError, match="unreadable after 0 samples"):
        list(read_tar_samples(path))


def test_only_the_wanted_samples_are_read_and_reading_stops_after_the_last(tmp_path):
    shard = write_tar_shard(tmp_path / "0.tar", [
        {"key": f"{i:03d}", "txt": f"caption {i}", "json": {"i": i}} for i in range(6)
    ])
    data = shard.read_bytes()
    members = list(tarfile.open(shard))
    # cut the tar inside sample 004: reading 001 and 003 never reaches the damage
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: members[8].offset_data + 2])
    samples = list(read_tar_samples(cut, keys={"003", "001"}))
    assert [s.key for s in samples] == ["001", "003"]
    assert [s.caption() for s in samples] == ["caption 1", "caption 3"] and samples[1].json() == {"i": 3}
    with pytest.raises(ShardReadError):
        list(read_tar_samples(cut, keys={"001", "005"}))


def test_a_remote_shard_that_is_an_error_page_says_so_from_its_first_bytes(tmp_path):
    """A server that answered a shard's URL with an HTML page (saved or served under the shard's
    name) is named as what it is, as a local one is, not as a tar with an "invalid header"."""
    from storage_servers import FileServer

    page = b"<html><body>" + b"Access denied. " * 100 + b"</body></html>"
    (tmp_path / "00007.tar").write_bytes(page)
    with FileServer(tmp_path) as server:
        with pytest.raises(ShardReadError) as error:
            list(read_tar_samples(f"{server.url}/00007.tar"))
    assert error.value.samples == 0
    assert error.value.reason == "not a tar file: it does not start with a tar header but with '<html><body>Access denied. Access denied'"


def test_a_gzip_compressed_error_page_under_a_tar_gz_name_says_so_and_a_real_tar_gz_passes(tmp_path):
    """A server may send its error page gzip-compressed; under a .tar.gz name it is named from
    the bytes the stream holds, locally and remotely. A real .tar.gz is read as before."""
    import gzip

    from storage_servers import FileServer

    from unicom.data.shards import not_a_tar

    page = b"<html><body>" + b"Access denied. " * 100 + b"</body></html>"
    (tmp_path / "00007.tar.gz").write_bytes(gzip.compress(page))
    write_tar_shard(tmp_path / "00001.tar", [{"key": "a", "jpg": b"x" * 3000, "txt": b"a cat"}])
    (tmp_path / "00001.tar.gz").write_bytes(gzip.compress((tmp_path / "00001.tar").read_bytes()))
    said = "not a tar file: it is gzip-compressed and does not start with a tar header but with '<html><body>Access denied. Access denied'"
    assert not_a_tar(tmp_path / "00007.tar.gz") == said
    assert not_a_tar(tmp_path / "00001.tar.gz") is None
    with FileServer(tmp_path) as server:
        with pytest.raises(ShardReadError) as error:
            list(read_tar_samples(f"{server.url}/00007.tar.gz"))
        assert [s.key for s in read_tar_samples(f"{server.url}/00001.tar.gz")] == ["a"]
    assert error.value.reason == said


def test_a_tar_damaged_in_its_first_member_keeps_tarfiles_reason(tmp_path):
    write_tar_shard(tmp_path / "00001.tar", [{"key": "a", "jpg": b"x" * 3000}])
    (tmp_path / "00002.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:1500])
    with pytest.raises(ShardReadError) as error:
        list(read_tar_samples(tmp_path / "00002.tar"))
    assert error.value.samples == 0 and not error.value.reason.startswith("not a tar file")
