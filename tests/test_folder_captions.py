"""Captions and fields of an image folder's images in the files beside them (``0001.txt``
and ``0001.json`` beside ``0001.jpg``: img2dataset's ``files`` output, clip-retrieval's
``files`` input): read when each sample is decoded; captions embedded and kept as a CSV
list's are, fields kept as metadata columns with ``--metadata-fields``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import class_image, tiny_open_clip

from unicom.cli import main
from unicom.data.lists import read_image_folder
from unicom.data.sources import CaptionFile, read_flat_folder

# image name -> its caption file's text (None: no caption file)
CAPTIONS = {"00000/000000000.jpg": "a red stripe  \n", "00000/000000001.png": None,
            "00001/000000002.jpg": "ein Hund ☃", "00001/sub/000000003.jpg": "nested\n"}


def write_files_output(root):
    """A folder as img2dataset's ``files`` output lays it out (its json files beside), with
    one image without a caption file."""
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        class_image(i, i, 32).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        if i != 1:  # img2dataset's json of the sample; one image has none
            path.with_suffix(".json").write_text(json.dumps({
                "url": f"https://example.org/{i}.jpg", "key": f"{i:09d}", "caption": caption, "status": "success",
                "width": 32, "NSFW": ["UNLIKELY", None, "NSFW", "UNSURE"][i], "similarity": 0.25 + i / 100}))
    return root


def write_same_list(root):
    """The CSV list of the same images and captions (a missing caption empty, as a list's)."""
    lines = ["path,key,caption"] + [f'{root / name},{name},"{(caption or "").strip()}"' for name, caption in CAPTIONS.items()]
    (root.parent / "list.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root.parent / "list.csv"


def test_a_folders_listing_names_each_images_caption_file(tmp_path):
    root = write_files_output(tmp_path / "files")
    listed = read_flat_folder(root)
    assert listed.keys == sorted(CAPTIONS)
    assert [None if f is None else f[len(str(root)) + 1:] for f in listed.caption_files] == \
        [None if c is None else n.rsplit(".", 1)[0] + ".txt" for n, c in sorted(CAPTIONS.items())]
    classes = read_image_folder(root)
    assert classes.caption_files == listed.caption_files
    assert classes.subset([3, 1]).caption_files == [listed.caption_files[3], listed.caption_files[1]]
    (tmp_path / "plain").mkdir()
    class_image(0, 0, 16).save(tmp_path / "plain" / "a.png")
    assert read_flat_folder(tmp_path / "plain").caption_files is None


@pytest.mark.parametrize("workers", [0, 2])
def test_a_folder_with_caption_files_embeds_as_the_list_of_the_same_captions(tmp_path, workers):
    root = write_files_output(tmp_path / "files")
    spec = tiny_open_clip(tmp_path / "clip")
    common = ["--model", spec, "--modalities", "image,text", "--workers", str(workers), "--dtype", "float32",
              "--batch-size", "3"]
    assert main(["embed", "--input", str(root), "--out", str(tmp_path / "from_folder"), *common]) == 0
    assert main(["embed", "--input", str(write_same_list(root)), "--out", str(tmp_path / "from_list"), *common]) == 0
    for name in ("img_emb/img_emb_0.npy", "text_emb/text_emb_0.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "from_folder" / name), np.load(tmp_path / "from_list" / name))
    metadata = pq.read_table(tmp_path / "from_folder" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [(row["key"], row["caption"]) for row in metadata] == \
        [(name, None if caption is None else caption.strip()) for name, caption in sorted(CAPTIONS.items())]
    assert metadata[0]["label"] == 0 and metadata[3]["label"] == 1  # the sub-folders are classes, as without captions


def test_a_caption_file_that_cannot_be_read_leaves_its_sample_out_naming_the_file(tmp_path, monkeypatch, capsys):
    import unicom.data.sources as sources

    root = write_files_output(tmp_path / "files")
    (root / "00001" / "000000002.txt").write_text("x" * 40)
    monkeypatch.setattr(sources, "MAX_SIDECAR_BYTES", 32)
    (root / "00001" / "sub" / "000000003.txt").unlink()
    (root / "00001" / "sub" / "000000003.txt").mkdir()  # listed, and cannot be read
    listed = read_flat_folder(root)
    spec = tiny_open_clip(tmp_path / "clip")
    assert main(["embed", "--input", str(root), "--out", str(tmp_path / "emb"), "--model", spec, "--modalities",
                 "image,text", "--workers", "0"]) == 0  # samples left out are listed, as images that fail
    assert "2 samples could not be used" in capsys.readouterr().err
    failures = pq.read_table(tmp_path / "emb" / "failures" / "failures_0.parquet").to_pylist()
    assert [(f["key"], f["source"]) for f in failures] == [("00001/000000002.jpg", listed.caption_files[2]),
                                                            ("00001/sub/000000003.jpg", listed.caption_files[3])]
    assert failures[0]["reason"] == f"its caption file {listed.caption_files[2]} is longer than the 32 bytes it may have"
    assert failures[1]["reason"] == "unreadable: Is a directory"
    keys = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").column("key").to_pylist()
    assert keys == ["00000/000000000.jpg", "00000/000000001.png"]


def test_caption_files_in_s3_are_read_as_local_ones(tmp_path, s3):
    root = write_files_output(tmp_path / "files")
    s3.bucket("captions")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.put("captions", f"files/{path.relative_to(root).as_posix()}", path.read_bytes())
    local, remote = read_flat_folder(root), read_flat_folder("s3://captions/files")
    assert remote.keys == local.keys
    assert [None if f is None else CaptionFile(f).read() for f in remote.caption_files] == \
        [None if f is None else CaptionFile(f).read() for f in local.caption_files] == \
        [None if c is None else c.strip() for _, c in sorted(CAPTIONS.items())]
    assert read_image_folder("s3://captions/files").caption_files == remote.caption_files


def test_fields_of_the_json_beside_each_image_are_metadata_columns(tmp_path, capsys):
    root = write_files_output(tmp_path / "files")
    (root / "00001" / "sub" / "000000003.json").write_text("{not json")  # gives no fields, as a tar's json
    import timm
    import torch

    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "test_vit.pth")
    common = ["--input", str(root), "--model", "timm/test_vit", "--pretrained", str(tmp_path / "test_vit.pth"),
              "--workers", "0"]
    assert main(["embed", *common, "--out", str(tmp_path / "named"), "--metadata-fields", "url,NSFW,similarity"]) == 0
    table = pq.read_table(tmp_path / "named" / "metadata" / "metadata_0.parquet")
    assert table.column_names[-3:] == ["url", "NSFW", "similarity"]
    assert table.column("url").to_pylist() == ["https://example.org/0.jpg", None, "https://example.org/2.jpg", None]
    assert table.column("NSFW").to_pylist() == ["UNLIKELY", None, "NSFW", None]
    assert table.column("similarity").to_pylist() == [0.25, None, 0.27, None]
    assert json.loads((tmp_path / "named" / "embed_config.json").read_text())["metadata_fields"] == \
        ["url", "NSFW", "similarity"]
    assert main(["embed", *common, "--out", str(tmp_path / "all"), "--metadata-fields", "all"]) == 0
    table = pq.read_table(tmp_path / "all" / "metadata" / "metadata_0.parquet")
    plain = ["key", "caption", "image_path", "width", "height", "occurrence", "label"]
    assert table.column_names == plain + ["url", "status", "NSFW", "similarity"]  # key, caption, width: the folder's own
    assert table.column("caption").to_pylist()[0] == "a red stripe"  # from the text file, not the json
    capsys.readouterr()
    assert main(["embed", *common, "--out", str(tmp_path / "bad"), "--metadata-fields", "image_path"]) == 2
    assert "metadata fields image_path: the metadata has columns of these names already" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
