"""Damaged shards: the damage is reported, the run goes on, and the damaged parts stay unfinished
until a rerun reads them whole."""

from __future__ import annotations

import pyarrow.parquet as pq
import timm
import torch
from support import class_image, encode_image, write_tar_shard

from unicom.cli import main


def test_truncated_and_foreign_shards_are_reported_left_unfinished_and_redone_by_a_rerun(tmp_path, capsys):
    png = [encode_image(class_image(i, i, 48), "PNG") for i in range(4)]
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": f"a{i}", "png": png[i]} for i in range(2)])
    truncated = write_tar_shard(tmp_path / "shards" / "00001.tar", [{"key": f"b{i}", "png": png[i]} for i in range(4)])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: data.index(b"b3.png") + 600])  # inside the last image
    (tmp_path / "shards" / "00002.tar").write_bytes(b"not a tar at all" * 64)
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)

    command = ["embed", "--input", str(tmp_path / "shards" / "{00000..00002}.tar"), "--model", "timm/test_vit",
               "--pretrained", str(weights), "--out", str(tmp_path / "EMB"), "--workers", "0"]
    assert main(command) == 1  # not everything is finished
    emb = tmp_path / "EMB"
    assert sorted(p.name for p in (emb / "metadata").iterdir()) == ["metadata_0.parquet"]
    assert sorted(p.name for p in (emb / "img_emb").iterdir()) == ["img_emb_0.npy"]
    assert pq.read_table(emb / "metadata" / "metadata_0.parquet").column("key").to_pylist() == ["a0", "a1"]
    report = pq.read_table(emb / "failures").to_pylist()
    assert [(r["part"], r["index"], r["key"], r["source"]) for r in report] == [
        (1, -1, "", str(truncated)), (2, -1, "", str(tmp_path / "shards" / "00002.tar"))]
    assert report[0]["reason"].startswith("shard unreadable after 3 samples")
    assert report[1]["reason"].startswith("shard unreadable after 0 samples")
    err = capsys.readouterr().err
    assert "2 shards could not be read to the end" in err and "2 parts are not finished" in err

    # the shards are repaired: a plain rerun does the two parts, and their reports go
    write_tar_shard(truncated, [{"key": f"b{i}", "png": png[i]} for i in range(4)])
    write_tar_shard(tmp_path / "shards" / "00002.tar", [{"key": "c0", "png": png[0]}])
    assert main(command) == 0
    keys = {n: pq.read_table(emb / "metadata" / f"metadata_{n}.parquet").column("key").to_pylist() for n in range(3)}
    assert keys == {0: ["a0", "a1"], 1: ["b0", "b1", "b2", "b3"], 2: ["c0"]}
    assert not list((emb / "failures").iterdir())
    assert "embedded 5 samples into 2 parts" in capsys.readouterr().out


def test_a_download_that_fails_for_one_slice_of_a_shard_leaves_the_part_unfinished(tmp_path, capsys, monkeypatch):
    """With more workers than parts each slice of a part reads the shard itself: the command
    below fails once (the first to create the lock) and reads the shard for every later read."""
    monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "1")
    png = [encode_image(class_image(i, i, 48), "PNG") for i in range(6)]
    shard = write_tar_shard(tmp_path / "00004.tar", [{"key": f"s{i}", "png": png[i]} for i in range(6)])
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    source = f"pipe:mkdir '{tmp_path / 'lock'}' 2>/dev/null && exit 1; cat '{shard}'"
    command = ["embed", "--input", source, "--model", "timm/test_vit", "--pretrained", str(weights),
               "--out", str(tmp_path / "EMB"), "--workers", "2", "--batch-size", "2"]
    assert main(command) == 1
    report = pq.read_table(tmp_path / "EMB" / "failures").to_pylist()
    assert [(r["part"], r["index"], r["source"]) for r in report] == [(4, -1, source)]
    assert not (tmp_path / "EMB" / "metadata").exists()
    assert "1 shards could not be read to the end" in capsys.readouterr().err
    assert main(command) == 0
    keys = pq.read_table(tmp_path / "EMB" / "metadata" / "metadata_4.parquet").column("key").to_pylist()
    assert keys == [f"s{i}" for i in range(6)]


def test_a_shard_member_longer_than_an_image_may_be_is_a_failure_and_is_not_read(tmp_path, monkeypatch):
    """A hostile shard (a member of gigabytes) costs no memory: the member is skipped unread."""
    import unicom.data.shards
    import unicom.data.transforms

    monkeypatch.setattr(unicom.data.shards, "MAX_IMAGE_BYTES", 5000)
    monkeypatch.setattr(unicom.data.transforms, "MAX_IMAGE_BYTES", 5000)
    small = [encode_image(class_image(i, i, 16), "PNG") for i in range(2)]
    huge = encode_image(class_image(2, 2, 256), "PNG") + b"\0" * 6000  # over the limit
    assert max(map(len, small)) < 5000 < len(huge)
    shard = write_tar_shard(tmp_path / "00000.tar", [
        {"key": "a", "png": small[0], "txt": "first"},
        {"key": "b", "png": huge, "txt": "second"},
        {"key": "c", "png": small[1], "txt": "x" * 6000},  # a caption over the limit counts as none
    ])
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    assert main(["embed", "--input", str(shard), "--model", "timm/test_vit", "--pretrained", str(weights),
                 "--out", str(tmp_path / "EMB"), "--workers", "0"]) == 0
    metadata = pq.read_table(tmp_path / "EMB" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [(row["key"], row["caption"]) for row in metadata] == [("a", "first"), ("c", None)]
    (failure,) = pq.read_table(tmp_path / "EMB" / "failures").to_pylist()
    assert (failure["key"], failure["reason"]) == (
        "b", f"shard member b.png of {len(huge):,} bytes, longer than the 5,000 bytes a sample's file may have")
