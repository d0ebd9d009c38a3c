"""Inputs of extraction: parts, records, decoding with draft, batches and failure records."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from support import class_image, encode_image, write_class_folder, write_tar_shard
from torchvision import transforms as T

from unicom.data.loading import BatchStream, plan_units
from unicom.data.sources import ItemsPart, ListPart, ShardPart, open_parts
from unicom.data.transforms import DecodeError, decode_image, draft_size
from unicom.errors import InputError


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def test_shards_become_parts_numbered_like_their_files(tmp_path):
    for number in (3, 12):
        write_tar_shard(tmp_path / f"{number:05d}.tar", [{"key": "k", "txt": "x"}])
    parts = open_parts(str(tmp_path / "*.tar"))
    assert [(type(p), p.number) for p in parts] == [(ShardPart, 3), (ShardPart, 12)]


def test_class_folder_becomes_parts_of_rows_with_labels(tmp_path):
    paths = write_class_folder(tmp_path / "data", labels=[0, 1], per_class=3, size=16)
    parts = open_parts(tmp_path / "data", rows_per_part=4)
    assert [(type(p), p.number, p.start, p.stop) for p in parts] == [(ListPart, 0, 0, 4), (ListPart, 1, 4, 6)]
    records = [r for p in parts for r in p.records()]
    assert [r.image for r in records] == [str(p) for p in paths]
    assert [r.columns["label"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert [r.index for r in records] == [0, 1, 2, 3, 0, 1]  # positions inside each part
    assert records[0].key == "class_000/0000.jpg"


def test_flat_folder_is_listed_without_labels(tmp_path):
    for i in range(3):
        class_image(0, i, 16).save(tmp_path / f"{i}.png")
    (part,) = open_parts(tmp_path)
    assert [r.key for r in part.records()] == ["0.png", "1.png", "2.png"]
    assert [name for name, _ in part.columns] == ["image_path", "occurrence"]


def test_photos_of_formats_a_folder_leaves_out_are_named_in_a_warning(tmp_path):
    """A phone's HEIC photos and a .jfif JPEG beside the JPEGs are not read: a warning counts
    them by suffix and names one, so that they are not missing without a word; caption and
    JSON sidecars are not images and are not named."""
    for i in range(2):
        class_image(0, i, 16).save(tmp_path / f"{i}.jpg")
        (tmp_path / f"{i}.txt").write_text("a caption")
    (tmp_path / "trip").mkdir()
    for name in ("trip/IMG_1.HEIC", "trip/IMG_2.heic", "scan.jfif"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.warns(UserWarning, match=r"3 image files left out \(\.heic: 2, \.jfif: 1; e\.g\. scan\.jfif\)") as caught:
        (part,) = open_parts(tmp_path)
    assert [r.key for r in part.records()] == ["0.jpg", "1.jpg"]
    assert ".txt" not in str(caught[0].message)


def test_photos_a_class_folder_leaves_out_are_named_in_a_warning(tmp_path):
    write_class_folder(tmp_path / "data", labels=[0, 1], per_class=2, size=16)
    (tmp_path / "data" / "class_001" / "IMG_9.avif").write_bytes(b"\0" * 16)
    with pytest.warns(UserWarning, match=r"1 image file left out \(\.avif: 1; e\.g\. class_001/IMG_9\.avif\)"):
        parts = open_parts(tmp_path / "data", rows_per_part=10)
    assert sum(p.size for p in parts) == 4


def test_csv_list_keeps_captions_and_keys(tmp_path):
    """As written, even when they look like numbers: LAION's keys are zero-padded (000000012)."""
    class_image(0, 0, 16).save(tmp_path / "a.jpg")
    class_image(1, 0, 16).save(tmp_path / "b.jpg")
    (tmp_path / "list.csv").write_text("path,caption,key,label\na.jpg,007,000000011,3\nb.jpg,1.50,000000012,5\n")
    (part,) = open_parts(tmp_path / "list.csv")
    records = list(part.records())
    assert [(r.key, r.caption, r.columns["label"]) for r in records] == [("000000011", "007", 3), ("000000012", "1.50", 5)]
    assert records[1].image == str(tmp_path / "b.jpg")


def test_local_image_paths_are_recorded_absolute_whatever_the_working_folder(tmp_path, monkeypatch):
    """Outputs record image_path; `cluster show` and `serve` read it from other folders."""
    write_class_folder(tmp_path / "classes", labels=[0], per_class=2, size=16)
    (tmp_path / "flat").mkdir()
    class_image(0, 0, 16).save(tmp_path / "flat" / "a.jpg")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.csv").write_text("path\n../flat/a.jpg\n")
    monkeypatch.chdir(tmp_path)
    images = [r.image for name in ("classes", "flat", "lists/list.csv") for p in open_parts(name) for r in p.records()]
    assert images == [str(tmp_path / "classes" / "class_000" / "0000.jpg"), str(tmp_path / "classes" / "class_000" / "0001.jpg"),
                      str(tmp_path / "flat" / "a.jpg"), str(tmp_path / "lists" / ".." / "flat" / "a.jpg")]


def test_shard_record_takes_url_from_json_and_caption_from_txt(tmp_path):
    shard = write_tar_shard(tmp_path / "7.tar", [{"key": "s0", "jpg": b"x", "txt": "hello", "json": {"url": "http://u"}}])
    (record,) = ShardPart(7, shard).records()
    assert (record.key, record.caption, record.columns) == ("s0", "hello", {"url": "http://u", "shard": "7.tar", "occurrence": 0})


def test_json_strings_with_a_lone_surrogate_are_kept_as_escapes(tmp_path):
    """``"\\ud83d"`` in a JSON file (an emoji cut in half) is no text a parquet file can hold."""
    shard = write_tar_shard(tmp_path / "3.tar", [{"key": "s0", "jpg": b"x",
                                                 "json": b'{"url": "http://u/\\ud83d", "caption": "caf\\u00e9 \\ud83d"}'}])
    (record,) = ShardPart(3, shard).records()
    assert (record.caption, record.columns["url"]) == ("café \\ud83d", "http://u/\\ud83d")


def test_a_folder_of_images_with_a_shard_beside_them_is_refused_not_read_as_one_or_the_other(tmp_path):
    write_class_folder(tmp_path / "photos", labels=[0], per_class=2)
    for path in (tmp_path / "photos" / "class_000").iterdir():
        path.rename(tmp_path / "photos" / path.name)
    write_tar_shard(tmp_path / "photos" / "backup-2024.tar", [{"key": "a", "txt": "x"}])
    with pytest.raises(InputError, match=r"photos: the folder holds both shards \(backup-2024.tar, 1 in all\) and "
                                         r"images \(0000.jpg, 2 in all\); give the shards by a pattern"):
        open_parts(str(tmp_path / "photos"))
    assert [part.number for part in open_parts(str(tmp_path / "photos" / "*.tar"))] == [2024]


def test_a_class_folder_with_a_shard_beside_its_classes_is_refused(tmp_path):
    write_class_folder(tmp_path / "photos", labels=[0, 1], per_class=2)
    write_tar_shard(tmp_path / "photos" / "backup-2024.tar", [{"key": "a", "txt": "x"}])
    with pytest.raises(InputError, match=r"photos: the folder holds both shards \(backup-2024.tar, 1 in all\) and "
                                         r"images in its sub-folders \(class_000/0000.jpg, ...\); give the shards by a pattern"):
        open_parts(str(tmp_path / "photos"))


def test_a_class_folder_in_s3_with_a_shard_beside_its_classes_is_refused(s3):
    s3.bucket("class-folder")
    s3.put("class-folder", "photos/cats/0.jpg", encode_image(class_image(0, 0, 16)))
    s3.put("class-folder", "photos/dogs/0.jpg", encode_image(class_image(1, 0, 16)))
    s3.put("class-folder", "photos/backup-2024.tar", b"")
    with pytest.raises(InputError, match=r"s3://class-folder/photos: the folder holds both shards \(backup-2024.tar, 1 in "
                                         r"all\) and images in its sub-folders \(cats/0.jpg, ...\)"):
        open_parts("s3://class-folder/photos")


def test_a_folder_of_shards_with_a_hidden_folder_of_images_is_read_as_shards(tmp_path):
    write_class_folder(tmp_path / "shards" / ".thumbnails", labels=[0], per_class=1)
    _ = [write_tar_shard(tmp_path / "shards" / f"{i:05d}.tar", [{"key": "a", "txt": "x"}]) for i in (0, 1)]
    assert [part.number for part in open_parts(str(tmp_path / "shards"))] == [0, 1]


def test_a_list_without_rows_is_an_error(tmp_path):
    (tmp_path / "list.csv").write_text("path,caption\n")
    with pytest.raises(InputError, match=r"list.csv: the list has no rows"):
        open_parts(tmp_path / "list.csv")


@pytest.mark.parametrize("folder", ["", "class_a"])
def test_image_names_that_are_not_utf8_are_named_before_anything_is_read(tmp_path, folder):
    (tmp_path / "data" / folder).mkdir(parents=True)
    class_image(0, 0, 16).save(tmp_path / "data" / folder / "ok.png")
    class_image(1, 0, 16).save(os.path.join(os.fsencode(tmp_path / "data" / folder), b"caf\xe9.png"))
    with pytest.raises(InputError, match=r"1 file names are not UTF-8 \(e.g. b'.*caf\\xe9.png'\).*rename them"):
        open_parts(tmp_path / "data")


def test_a_list_of_other_files_is_not_taken_for_shards(tmp_path):
    (tmp_path / "0.zip").write_bytes(b"x")
    (tmp_path / "1.zip").write_bytes(b"x")
    with pytest.raises(InputError, match="not a shard"):
        open_parts([str(tmp_path / "0.zip"), str(tmp_path / "1.zip")])


@pytest.mark.parametrize("names", [["notes.txt"], ["a.zip", "b.zip"], ["00001.tar", "readme.md"]])
def test_a_file_that_is_not_a_shard_is_named_as_such_whatever_its_name_carries(tmp_path, names):
    # a name without a number said "no part number in the file name (expected e.g. part_0.npy)",
    # and two without numbers that they "carry the same number"
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    other = next(name for name in names if not name.endswith(".tar"))
    with pytest.raises(InputError) as error:
        open_parts([str(tmp_path / name) for name in names])
    assert str(error.value) == (f"{tmp_path / other}: not a shard (.tar/.tar.gz/.tgz/.parquet); give shards (webdataset "
                                "tars, or parquet files that hold the images), one image folder, or one CSV/parquet list")


@pytest.mark.parametrize("orientation", [6, 8])
def test_an_exif_orientation_is_not_applied_as_open_clip_reads_images(orientation):
    stored = class_image(1, 0, 32).resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation  # "turn by 90 degrees to show"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    image, size = decode_image(buffer.getvalue())
    assert size == (48, 32) and image.size == (48, 32)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))


def test_draft_size_follows_the_first_resize():
    assert draft_size(T.Compose([T.Resize(224), T.CenterCrop(224)])) == (224, 224)
    assert draft_size(T.Compose([T.Resize((160, 200)), T.ToTensor()])) == (200, 160)
    assert draft_size(T.Compose([T.CenterCrop(224), T.Resize(224)])) is None


def test_draft_decodes_large_jpegs_smaller_but_not_below_the_target():
    data = encode_image(class_image(0, 0, 1000), "JPEG")
    image, size = decode_image(data, draft=(224, 224))
    assert size == (1000, 1000)  # the stored size is reported
    assert image.size == (250, 250)  # scale 4: the largest of 2, 4, 8 that keeps >= 224
    full, _ = decode_image(data)
    assert full.size == (1000, 1000)


def test_draft_decodes_a_camera_jpeg_with_a_second_picture_as_any_jpeg():
    # many cameras and phones write a preview after the photo; Pillow names the format MPO
    photo = class_image(0, 0, 1000)
    buffer = io.BytesIO()
    photo.save(buffer, format="MPO", save_all=True, append_images=[photo.resize((160, 160))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    image, size = decode_image(buffer.getvalue(), draft=(224, 224))
    assert size == (1000, 1000) and image.size == (250, 250)
    reference = Image.open(io.BytesIO(buffer.getvalue()))  # the first picture, as Pillow's JPEG decoder drafts it
    reference.draft("RGB", (224, 224))
    assert np.array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


def test_an_image_opened_lazily_and_cut_short_fails_as_an_image_not_in_the_transform(tmp_path):
    from unicom.embed import embed_images
    from unicom.models.encoders import ModelEncoder

    data = encode_image(class_image(0, 0, 64), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    opened = Image.open(tmp_path / "cut.jpg")  # Pillow reads the header only; the pixels when first used
    with pytest.raises(DecodeError, match=r"^cannot decode image: OSError: image file is truncated"):
        decode_image(opened)
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # (B, 3, 8, 8) -> (B, 3)
    transform = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    encoder = ModelEncoder(pooled, transform, 3, "mean colour")
    with pytest.raises(InputError, match=r"image 0 cannot be used: cannot decode image: OSError: image file is truncated"):
        embed_images(encoder, [Image.open(tmp_path / "cut.jpg")], num_workers=0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_a_16_bit_image_is_made_8_bit_holding_a_few_bytes_a_pixel(mode):
    """16-bit samples become round(v * 255 / 65535) (a 16-bit upload counts 4 bytes a pixel
    in serve's decoding budget): the conversion holds a few bytes a pixel in arrays, not 12."""
    import tracemalloc

    from unicom.data.transforms import to_rgb

    samples = np.random.default_rng(0).integers(0, 65536, (500, 800)).astype(np.uint16)
    image = Image.frombytes(mode, (800, 500), samples.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert image.mode == mode
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.round(samples.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
    assert peak <= 5.5 * samples.size  # the samples read out (2), swapped to this machine's order (2), the output


def test_draft_leaves_png_alone():
    data = encode_image(class_image(0, 0, 600), "PNG")
    image, _ = decode_image(data, draft=(224, 224))
    assert image.size == (600, 600)


def test_grey_and_palette_images_are_converted_to_rgb():
    grey = io.BytesIO()
    Image.new("L", (8, 6), 100).save(grey, format="PNG")
    image, size = decode_image(grey.getvalue())
    assert image.mode == "RGB" and size == (8, 6)
    assert image.getpixel((0, 0)) == (100, 100, 100)


def test_undecodable_bytes_and_truncated_jpeg_give_reasons(tmp_path):
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"garbage bytes")
    data = encode_image(class_image(0, 0, 64), "JPEG")
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="file not found"):
        decode_image(tmp_path / "missing.jpg")


def test_batches_cover_every_sample_once_and_record_failures(tmp_path):
    good = [encode_image(class_image(i, i, 16), "PNG") for i in range(5)]
    samples = [{"key": f"k{i}", "png": data, "txt": f"c{i}"} for i, data in enumerate(good)]
    samples.insert(2, {"key": "broken", "jpg": b"\xff\xd8 broken jpeg", "txt": "b"})
    samples.append({"key": "text-only", "txt": "no image"})
    part = ShardPart(0, write_tar_shard(tmp_path / "0.tar", samples))
    batches = list(BatchStream(plan_units([part], 1), 3, _to_tensor))
    assert [b.indices for b in batches] == [[0, 1], [3, 4, 5], [], []]
    assert [b.last for b in batches] == [False, False, False, True] and batches[-1].read == 7
    failures = [f for b in batches for f in b.failures]
    assert [(f["index"], f["key"], f["source"]) for f in failures] == [(2, "broken", str(part.path)), (6, "text-only", str(part.path))]
    assert failures[1]["reason"] == "no image in the sample"
    rows = [row for b in batches for row in b.rows]
    assert [(r["key"], r["caption"], r["width"], r["height"]) for r in rows] == [(f"k{i}", f"c{i}", 16, 16) for i in range(5)]
    expected = torch.stack([_to_tensor(Image.open(io.BytesIO(d)).convert("RGB")) for d in good[:2]])
    assert torch.equal(batches[0].images, expected)


def test_slices_split_a_part_into_the_same_batches():
    items = [class_image(0, i, 8) for i in range(10)]
    whole = [b.indices for b in BatchStream(plan_units([ItemsPart(items)], 1), 3, _to_tensor) if b.indices]
    units = plan_units([ItemsPart(items)], 2)
    assert [(u.slice, u.slices) for u in units] == [(0, 2), (1, 2)]
    stream = BatchStream(units, 3, _to_tensor)
    sliced = [[b.indices for b in stream.unit_batches(u) if b.indices] for u in units]
    assert sliced == [[whole[0], whole[2]], [whole[1], whole[3]]]
    assert whole == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_text_only_batches_skip_decoding(tmp_path):
    part = ShardPart(0, write_tar_shard(tmp_path / "0.tar", [{"key": "a", "jpg": b"not decoded", "txt": "one"}, {"key": "b", "json": {"url": "u"}}]))
    tokenize = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731
    (batch, end) = BatchStream(plan_units([part], 1), 4, None, tokenize)
    assert batch.images is None and batch.indices == [0, 1] and not batch.failures
    assert batch.tokens.tolist() == [[3], [0]]  # a sample without caption has the empty caption
    assert end.last


def test_split_transform_gives_the_transforms_numbers_bit_for_bit():
    from unicom.data.transforms import SplitTransform

    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    split = SplitTransform(transform)
    images = [class_image(i, i, 50) for i in range(3)]
    pixels = torch.stack([split.on_worker(image) for image in images])
    assert split.split and pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 32, 32)
    assert torch.equal(split.on_device(pixels), torch.stack([transform(image) for image in images]))


def test_other_transforms_run_whole_on_the_worker():
    from unicom.data.transforms import SplitTransform

    transform = T.Compose([T.ToTensor(), T.Resize(16), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    split = SplitTransform(transform)
    image = class_image(1, 1, 20)
    out = split.on_worker(image)
    assert not split.split and out.dtype == torch.float32
    assert torch.equal(split.on_device(out[None]), transform(image)[None])


def test_plan_units_slices_only_the_parts_left_over_after_full_waves():
    parts = [ItemsPart([], number=n) for n in range(5)]
    plan = [(u.part.number, u.slice, u.slices) for u in plan_units(parts, 2)]
    assert plan == [(0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 2), (4, 1, 2)]
    assert [(u.part.number, u.slices) for u in plan_units(parts[:4], 2)] == [(n, 1) for n in range(4)]
    assert [(u.part.number, u.slice) for u in plan_units(parts[:2], 3)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(u.part.number, u.slices) for u in plan_units(parts, 0)] == [(n, 1) for n in range(5)]


def test_workers_share_the_units_and_every_batch_arrives_once():
    from torch.utils.data import DataLoader

    parts = [ItemsPart([class_image(0, i, 8) for i in range(n)], number=n) for n in (5, 1, 7, 3)]
    stream = BatchStream(plan_units(parts, 2), 2, _to_tensor)
    seen = {}
    for batch in DataLoader(stream, batch_size=None, num_workers=2):
        seen.setdefault(batch.part, []).extend(batch.indices)
    assert {part: sorted(indices) for part, indices in seen.items()} == {n: list(range(n)) for n in (5, 1, 7, 3)}
