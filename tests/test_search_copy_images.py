"""`unicom search --copy-images FOLDER`: the image files of the items found, copied as stored
and named by id, from image folders, webdataset shards (local and in S3) and parquet shards;
checked against the files themselves, tarfile's and pyarrow's reading of the shards, and the
subset table's ids."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unicom.cli import main
from unicom.formats.embeddings import write_part
from unicom.search.index import Index

from support import clip_collection_with_texts, encode_image, write_tar_shard
from test_search_subset import TEXTS, expected_subset


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return clip_collection_with_texts(tmp_path_factory.mktemp("clip_copy"), TEXTS)


def named(folder) -> dict[int, bytes]:
    """id -> bytes of the images of a copy folder (every other file must be a copy's name or
    written beside one)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith((".txt", ".json")):
            continue
        stem, suffix = name.split(".")
        assert len(stem) == 9 and stem.isdigit() and suffix in ("jpg", "png"), name
        out[int(stem)] = (folder / name).read_bytes()
    return out


def test_the_images_of_the_subset_are_copied_as_stored_and_named_by_id(clip, tmp_path, capsys):
    threshold = float(np.quantile(clip["texts"] @ clip["stored"].T, 0.5))
    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / ".000000000.jpg.abcd1234.tmp").write_bytes(b"half")  # what a copy killed halfway leaves
    args = ["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "--text", TEXTS[1],
            "--min-score", repr(threshold), "--out", str(tmp_path / "subset.parquet"), "--copy-images", str(copies)]
    assert main(args) == 0
    want = expected_subset(clip, threshold)  # brute force over the stored embeddings
    table = pq.read_table(tmp_path / "subset.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(want)
    copied = named(copies)
    assert sorted(copied) == sorted(want)  # and no leftover
    for row in table.to_pylist():  # each copy is its file, byte for byte
        with open(row["image_path"], "rb") as f:
            assert copied[row["id"]] == f.read()
    assert f"{len(want)} of {len(want)} images in {copies}\n" in capsys.readouterr().out
    # a rerun copies what is missing only
    gone = sorted(want)[1]
    (copies / f"{gone:09d}.jpg").unlink()
    kept = sorted(want)[0]
    (copies / f"{kept:09d}.jpg").write_bytes(b"left as it is")
    assert main(args) == 0
    assert named(copies)[gone] == copied[gone] and named(copies)[kept] == b"left as it is"
    assert f"({len(want) - 1} there from an earlier run)" in capsys.readouterr().out


def test_without_out_the_items_are_counted_not_printed_and_their_images_copied(clip, tmp_path, capsys):
    scores = clip["texts"][0] @ clip["stored"].T
    assert main(["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "-k", "3",
                 "--copy-images", str(tmp_path / "best")]) == 0
    assert sorted(named(tmp_path / "best")) == sorted(np.argsort(-scores, kind="stable")[:3].tolist())
    printed = capsys.readouterr().out
    assert printed.startswith("3 items found (scores ") and "3 of 3 images in" in printed


KEYS = ["a", "b", "c", "d", "e", "f"]  # the items with images: ids 0 to 5; id 6 has none


def shard_collection(root, occurrence: bool = True):
    """Seven items: three in a webdataset tar (a JPEG, a PNG, the second of two samples of a
    key), two in a parquet shard, one in a gzipped tar, one whose shard lacks its key; their
    embeddings one-hot, so that item 0's neighbours come in id order."""
    import gzip

    pictures = [encode_image(Image.new("RGB", (24 + i, 20), (40 * i, 90, 200 - 30 * i)), "PNG" if i == 1 else "JPEG")
                for i in range(7)]
    write_tar_shard(root / "shards" / "00000.tar", [
        {"key": "a", "jpg": pictures[0]}, {"key": "b", "png": pictures[1]},
        {"key": "c", "jpg": pictures[6]}, {"key": "c", "jpg": pictures[2]}])  # the second sample of key c
    pq.write_table(pa.table({"key": ["d", "e"], "jpg": [pictures[3], pictures[4]], "caption": ["x", "y"]}),
                   root / "shards" / "00001.parquet")
    write_tar_shard(root / "gz" / "00002.tar", [{"key": "f", "jpg": pictures[5]}])
    (root / "shards" / "00002.tar.gz").write_bytes(gzip.compress((root / "gz" / "00002.tar").read_bytes()))
    metadata = {"shard": ["00000.tar"] * 3 + ["00001.parquet"] * 2 + ["00002.tar.gz", "00000.tar"],
                "key": [*KEYS, "zzz"]}
    if occurrence:
        metadata["occurrence"] = [0, 0, 1, 0, 0, 0, 0]
    write_part(root / "emb", 0, image=np.eye(7, 8, dtype=np.float32) + 0.1, metadata=pa.table(metadata))
    return Index.build(root / "emb", root / "index", index_type="flat")


def from_shards(root) -> dict[str, bytes]:
    """(key, occurrence) -> image bytes, as tarfile and pyarrow read the shards."""
    out = {}
    for name in ("00000.tar", "00002.tar.gz"):
        with tarfile.open(root / "shards" / name) as tar:
            seen = {}
            for member in tar:
                key = member.name.split(".")[0]
                out[(key, seen.get(key, 0))] = tar.extractfile(member).read()
                seen[key] = seen.get(key, 0) + 1
    for row in pq.read_table(root / "shards" / "00001.parquet").to_pylist():
        out[(row["key"], 0)] = row["jpg"]
    return out


def expected_copies(root, occurrence: bool = True) -> dict[int, bytes]:
    """id -> the image of each item with one: key c's second sample, or without the occurrence column its first."""
    want = from_shards(root)
    return {i: want[(key, 1 if key == "c" and occurrence else 0)] for i, key in enumerate(KEYS)}


@pytest.mark.parametrize("occurrence", [True, False])
def test_samples_of_tar_and_parquet_shards_are_copied_and_an_item_without_an_image_is_named(tmp_path, capsys,
                                                                                           monkeypatch, occurrence):
    from unicom.search.item_images import ShardImages

    index = shard_collection(tmp_path, occurrence)
    copies = tmp_path / "copies"
    monkeypatch.setenv("UNICOM_PROGRESS", "1")  # the bar counts each item once, shards' items as they are found
    listed, passes = [], []
    listing, samples = ShardImages._list, ShardImages.samples
    monkeypatch.setattr(ShardImages, "_list", lambda self, location: listed.append(location) or listing(self, location))
    monkeypatch.setattr(ShardImages, "samples", lambda self, shard: passes.append(shard) or samples(self, shard))
    code = main(["search", "--index", str(index.path), "--like", "0", "-k", "7", "--copy-images", str(copies),
                 "--shards", str(tmp_path / "shards")])
    assert code == 1  # one item could not be copied
    assert named(copies) == expected_copies(tmp_path, occurrence)
    assert sorted(os.listdir(copies))[:2] == ["000000000.jpg", "000000001.png"]  # a PNG named as one
    captured = capsys.readouterr()
    assert "6 of 7 images in" in captured.out
    assert "1 items have no image copied:\n  item 6: the image of item 6 is not in its shard 00000.tar" in captured.err
    assert "run the command again: it copies only what is missing" in captured.err
    assert "copying images: 100%" in captured.err and "| 7/7 [" in captured.err  # every item counted once
    # the local tar listed once and read a member at a time; the others read in one pass each
    assert listed == [tmp_path / "shards" / "00000.tar"] and sorted(passes) == ["00001.parquet", "00002.tar.gz"]


def test_shards_in_s3_are_read_in_one_pass_each_and_copies_uploaded_to_s3(tmp_path, s3, capsys):
    index = shard_collection(tmp_path)
    s3.bucket("laion")
    for name in ("00000.tar", "00001.parquet", "00002.tar.gz"):
        s3.put("laion", f"shards/{name}", (tmp_path / "shards" / name).read_bytes())
    code = main(["search", "--index", str(index.path), "--like", "0", "-k", "6", "--copy-images", "s3://laion/copies",
                 "--shards", "s3://laion/shards"])
    assert code == 0, capsys.readouterr().err
    names = [f"{i:09d}.{'png' if i == 1 else 'jpg'}" for i in range(6)]
    assert s3.keys("laion", "copies/") == [f"copies/{name}" for name in names]
    for name, data in zip(names, expected_copies(tmp_path).values()):
        assert s3.get("laion", f"copies/{name}") == data
    # with their metadata beside them, uploaded too
    code = main(["search", "--index", str(index.path), "--like", "0", "-k", "6", "--copy-images", "s3://laion/with",
                 "--shards", "s3://laion/shards", "--with-metadata"])
    assert code == 0, capsys.readouterr().err
    assert s3.keys("laion", "with/") == sorted(f"with/{name}" for i, image in enumerate(names)
                                               for name in (image, f"{i:09d}.json"))
    assert json.loads(s3.get("laion", "with/000000003.json")) == index.metadata(3)


def test_missing_and_unreadable_files_are_named_and_copied_by_a_rerun(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    pictures = [encode_image(Image.new("RGB", (16, 16), (i * 60, 0, 0)), "JPEG") for i in range(4)]
    for i, data in enumerate(pictures):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(data)
    (tmp_path / "images" / "2.jpg").write_text("not an image")
    (tmp_path / "images" / "3.jpg").unlink()
    metadata = pa.table({"image_path": [f"{i}.jpg" for i in range(4)] + [None]})  # relative paths, and none
    write_part(tmp_path / "emb", 0, image=np.eye(5, 8, dtype=np.float32) + 0.1, metadata=metadata)
    index = Index.build(tmp_path / "emb", tmp_path / "index", index_type="flat")
    args = ["search", "--index", str(index.path), "--like", "0", "-k", "5", "--copy-images", str(tmp_path / "copies"),
            "--image-root", str(tmp_path / "images")]
    assert main(args) == 1
    assert named(tmp_path / "copies") == {0: pictures[0], 1: pictures[1]}
    err = capsys.readouterr().err
    assert "3 items have no image copied:" in err
    assert "item 2: the image file of item 2 is not an image" in err
    assert f"item 3: the image file of item 3, {tmp_path / 'images' / '3.jpg'}, cannot be read (not found)" in err
    assert "item 4: item 4 has no local image in the index metadata" in err
    (tmp_path / "images" / "2.jpg").write_bytes(pictures[2])
    (tmp_path / "images" / "3.jpg").write_bytes(pictures[3])
    assert main(args) == 1  # item 4 still has none
    assert named(tmp_path / "copies") == dict(enumerate(pictures))
    assert "1 items have no image copied:\n  item 4:" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--image-root", "."], "--image-root says where --copy-images finds the images"),
    (["--shards", "shards/"], "--shards says where --copy-images finds the images"),
    (["--with-metadata"], "--with-metadata writes files beside --copy-images' copies: give --copy-images FOLDER"),
    (["--copy-images", "c", "--json"], "--json prints the results and --copy-images copies their images"),
    (["--copy-images", "c", "--image-root", "no-such-folder"], "--image-root no-such-folder: not a folder"),
    (["--copy-images", "s3://no-such-bucket/c"], "the bucket s3://no-such-bucket does not exist"),
])
def test_copy_options_that_cannot_work_are_refused_before_the_search(tmp_path, s3, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = shard_collection(tmp_path)
    code = main(["search", "--index", str(index.path), "--model", "timm/no_such_net", "--text", "x", *extra])
    assert code == 2 and message in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    code = main(["search", "--index", str(index.path), "--like", "0", "--copy-images", str(tmp_path / "a_file")])
    assert code == 2 and "a file, not a folder" in capsys.readouterr().err


def test_copying_needs_no_web_server_packages(tmp_path):
    """`unicom search --copy-images` runs where unicom's `serve` extra (fastapi) is not installed."""
    index = shard_collection(tmp_path)
    script = ("import sys; sys.modules['fastapi'] = None; from unicom.cli import main; "
              f"sys.exit(main(['search', '--index', {str(index.path)!r}, '--like', '0', '-k', '2', "
              f"'--copy-images', {str(tmp_path / 'copies')!r}, '--shards', {str(tmp_path / 'shards')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert named(tmp_path / "copies") == {i: data for i, data in expected_copies(tmp_path).items() if i < 2}
    assert "fastapi" not in done.stderr


def test_images_are_sniffed_for_their_format_not_named_by_their_file(tmp_path):
    from unicom.search.item_images import sniff

    for fmt, kind in (("JPEG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WEBP"), ("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        assert sniff(buffer.getvalue()[:64]) == kind
    assert sniff(b"not an image at all") is None


def test_a_shard_that_cannot_be_read_is_named_for_each_of_its_items(tmp_path, capsys):
    index = shard_collection(tmp_path)
    (tmp_path / "shards" / "00001.parquet").unlink()
    (tmp_path / "shards" / "00002.tar.gz").write_bytes(b"\x1f\x8b broken")
    code = main(["search", "--index", str(index.path), "--like", "0", "-k", "6", "--copy-images",
                 str(tmp_path / "copies"), "--shards", str(tmp_path / "shards")])
    assert code == 1
    assert sorted(named(tmp_path / "copies")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "3 items have no image copied:" in err
    for item_id, shard in ((3, "00001.parquet"), (4, "00001.parquet"), (5, "00002.tar.gz")):
        assert f"  item {item_id}: the shard {shard} cannot be read (" in err


def test_a_copy_has_a_plain_files_mode_and_a_failed_one_leaves_nothing(tmp_path):
    from unicom.files import write_new_file_atomic

    with open(tmp_path / "plain", "wb") as f:  # the mode this process's umask gives a new file
        f.write(b"x")
    write_new_file_atomic(tmp_path / "copy.jpg", b"head", io.BytesIO(b" and the rest"))
    assert (tmp_path / "copy.jpg").read_bytes() == b"head and the rest"
    assert (tmp_path / "copy.jpg").stat().st_mode == (tmp_path / "plain").stat().st_mode

    class Broken(io.RawIOBase):
        def readinto(self, buffer):
            raise OSError("the source went away")

    with pytest.raises(OSError, match="the source went away"):
        write_new_file_atomic(tmp_path / "half.jpg", b"head", Broken())
    assert sorted(os.listdir(tmp_path)) == ["copy.jpg", "plain"]


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_copy_killed_midway_is_finished_by_a_rerun_with_identical_files_and_no_temporaries(tmp_path):
    import signal
    import time

    count = 4000
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):  # bytes that start as a JPEG does: copied as they are, never decoded
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(2000))
    write_part(tmp_path / "emb", 0, image=np.ones((count, 4), np.float32),
               metadata=pa.table({"image_path": [str(tmp_path / "images" / f"{i}.jpg") for i in range(count)]}))
    index = Index.build(tmp_path / "emb", tmp_path / "index", index_type="flat")
    copies = tmp_path / "copies"
    command = [sys.executable, "-m", "unicom", "search", "--index", str(index.path), "--like", "0",
               "--min-score", "0.5", "--copy-images", str(copies)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if copies.is_dir() and len(os.listdir(copies)) >= 200:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the copy ended before it was killed"
    assert 0 < len(os.listdir(copies)) < count  # killed halfway
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{count} of {count} images in" in done.stdout and "there from an earlier run" in done.stdout
    assert named(copies) == {i: (tmp_path / "images" / f"{i}.jpg").read_bytes() for i in range(count)}


def test_images_of_a_remote_folder_are_fetched_and_a_missing_one_is_named(tmp_path, capsys):
    from storage_servers import FileServer

    (tmp_path / "photos").mkdir()
    pictures = [encode_image(Image.new("RGB", (20, 12), (i * 70, 30, 90)), "PNG" if i % 2 else "JPEG") for i in range(3)]
    for i, data in enumerate(pictures):
        (tmp_path / "photos" / f"{i}.img").write_bytes(data)  # named by their bytes' format, not their file's
    with FileServer(tmp_path) as server:
        metadata = pa.table({"image_path": [f"{server.url}/photos/{i}.img" for i in range(4)]})  # the fourth is missing
        write_part(tmp_path / "emb", 0, image=np.eye(4, 8, dtype=np.float32) + 0.1, metadata=metadata)
        index = Index.build(tmp_path / "emb", tmp_path / "index", index_type="flat")
        code = main(["search", "--index", str(index.path), "--like", "0", "-k", "4", "--copy-images", str(tmp_path / "c")])
    assert code == 1
    assert named(tmp_path / "c") == dict(enumerate(pictures))
    assert sorted(os.listdir(tmp_path / "c")) == ["000000000.jpg", "000000001.png", "000000002.jpg"]
    assert "  item 3: the image of item 3 cannot be fetched (not found" in capsys.readouterr().err


def test_a_shard_member_longer_than_an_image_may_be_is_named_not_read(tmp_path, capsys, monkeypatch):
    from unicom.data import transforms

    index = shard_collection(tmp_path)
    sizes = {i: len(data) for i, data in expected_copies(tmp_path).items()}
    longest = max(sizes, key=sizes.get)
    limit = max(size for i, size in sizes.items() if i != longest)
    assert longest in (0, 1, 2) and sizes[longest] > limit  # a member of the local tar, alone above the limit
    monkeypatch.setattr(transforms, "MAX_IMAGE_BYTES", limit)
    code = main(["search", "--index", str(index.path), "--like", "0", "-k", "6", "--copy-images",
                 str(tmp_path / "copies"), "--shards", str(tmp_path / "shards")])
    assert code == 1
    assert sorted(named(tmp_path / "copies")) == sorted(set(range(6)) - {longest})
    assert (f"  item {longest}: the image of item {longest} in the shard 00000.tar is {sizes[longest]:,} bytes long, "
            f"more than the {limit:,} an image may have") in capsys.readouterr().err


def embedded_rows(emb, kind: str) -> tuple[np.ndarray, list[dict]]:
    """The ``kind`` embeddings of an embedding folder and its metadata rows, parts in order."""
    numbers = sorted(int(path.stem.rsplit("_", 1)[1]) for path in (emb / f"{kind}_emb").glob("*.npy"))
    vectors = np.concatenate([np.load(emb / f"{kind}_emb" / f"{kind}_emb_{n}.npy") for n in numbers])
    rows = [row for n in numbers for row in pq.read_table(emb / "metadata" / f"metadata_{n}.parquet").to_pylist()]
    return vectors, rows


def test_with_metadata_the_copies_are_a_folder_that_embeds_as_the_collection_did(tmp_path, capsys):
    """Shards with captions and json embedded and indexed; the images found copied with their
    captions and metadata; that folder embedded again gives the same image and caption
    embeddings, its captions and url as the collection's metadata has them."""
    from support import captioned_samples, tiny_open_clip

    spec = tiny_open_clip(tmp_path / "clip")
    samples = captioned_samples(0, 5) + [{"key": "0-5", "jpg": encode_image(Image.new("RGB", (30, 30), "red")),
                                          "json": {"url": "https://example.org/0/5.jpg"}}]  # no caption
    samples[2]["txt"] = "un chat noir sur le toit — 屋根の上の黒猫"
    write_tar_shard(tmp_path / "shards" / "00000.tar", samples)
    common = ["--model", spec, "--modalities", "image,text", "--dtype", "float32", "--workers", "0"]
    assert main(["embed", "--input", str(tmp_path / "shards" / "00000.tar"), "--out", str(tmp_path / "emb"), *common]) == 0
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--type", "flat"]) == 0
    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / ".000000002.txt.abcd1234.tmp").write_bytes(b"half")  # what a copy killed halfway leaves
    assert main(["search", "--index", str(tmp_path / "index"), "--like", "0", "-k", "6", "--copy-images", str(copies),
                 "--shards", str(tmp_path / "shards"), "--with-metadata"]) == 0
    assert "6 of 6 images in" in capsys.readouterr().out
    images, rows = embedded_rows(tmp_path / "emb", "img")
    texts, _ = embedded_rows(tmp_path / "emb", "text")
    captioned = [row["id"] for row in Index.load(tmp_path / "index").metadata(range(6)) if row.get("caption")]
    assert sorted(os.listdir(copies)) == sorted([f"{i:09d}.{suffix}" for i in range(6) for suffix in ("jpg", "json")] +
                                                [f"{i:09d}.txt" for i in captioned])
    assert (copies / "000000002.txt").read_text(encoding="utf-8") == samples[2]["txt"]
    for i, row in enumerate(Index.load(tmp_path / "index").metadata(range(6))):
        assert json.loads((copies / f"{i:09d}.json").read_text(encoding="utf-8")) == row
        assert (copies / f"{i:09d}.jpg").read_bytes() == samples[i]["jpg"]
    # the copies embedded again: the same embeddings (the folder's files in name order: ids' order)
    again = tmp_path / "again"
    assert main(["embed", "--input", str(copies), "--out", str(again), *common, "--metadata-fields", "url"]) == 0
    images_again, rows_again = embedded_rows(again, "img")
    np.testing.assert_allclose(images_again, images, atol=1e-6)
    assert [row["caption"] for row in rows_again] == [row["caption"] for row in rows]
    assert [row["url"] for row in rows_again] == [row["url"] for row in rows]
    texts_again, _ = embedded_rows(again, "text")
    with_caption = [i for i, row in enumerate(rows) if row["caption"]]
    np.testing.assert_allclose(texts_again[with_caption], texts[with_caption], atol=1e-6)


def test_with_metadata_a_rerun_adds_the_files_beside_copies_made_without_it(tmp_path, capsys):
    index = shard_collection(tmp_path)
    copies = tmp_path / "copies"
    args = ["search", "--index", str(index.path), "--like", "0", "-k", "6", "--copy-images", str(copies),
            "--shards", str(tmp_path / "shards")]
    assert main(args) == 0
    assert named(copies) == expected_copies(tmp_path)
    assert main([*args, "--with-metadata"]) == 0
    assert "6 of 6 images in" in capsys.readouterr().out
    # every item its metadata row; no caption, the metadata having none
    assert sorted(name for name in os.listdir(copies) if not name.endswith((".jpg", ".png"))) == \
        [f"{i:09d}.json" for i in range(6)]
    assert json.loads((copies / "000000002.json").read_text()) == index.metadata(2)
    assert main([*args, "--with-metadata"]) == 0  # nothing left to do
    assert "(6 there from an earlier run)" in capsys.readouterr().out
