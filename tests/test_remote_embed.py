"""``unicom embed`` where the data lives: shards over HTTP, outputs in S3, equal to a local run.

The servers run on 127.0.0.1 (:mod:`storage_servers`): a file server that can answer 404,
cut a response mid-stream or add latency, and moto's S3 server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from storage_servers import FileServer, kill_at_s3_response
from support import captioned_samples, class_image, encode_image, write_tar_shard

from unicom.cli import main

SHARDS = {0: 5, 1: 4, 2: 6}  # shard number -> samples
KINDS = [("img_emb", "img_emb_{}.npy"), ("text_emb", "text_emb_{}.npy"), ("metadata", "metadata_{}.parquet")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards, a checkpoint, and the local run every remote run must equal byte for byte."""
    root = tmp_path_factory.mktemp("remote_embed")
    for number, count in SHARDS.items():
        write_tar_shard(root / "shards" / f"{number:05d}.tar", captioned_samples(number, count))
    torch.manual_seed(0)
    weights = root / "w.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    common = ["--model", "timm/test_vit", "--pretrained", str(weights), "--batch-size", "2", "--workers", "0"]
    assert main(["embed", "--input", str(root / "shards" / "{00000..00002}.tar"), "--out", str(root / "local"), *common]) == 0
    return {"root": root, "common": common, "local": root / "local"}


def _assert_equal_to_local(s3, bucket: str, prefix: str, local: Path, numbers=SHARDS) -> None:
    for number in numbers:
        for folder, name in KINDS[::2]:
            remote = s3.get(bucket, f"{prefix}/{folder}/{name.format(number)}")
            assert remote == (local / folder / name.format(number)).read_bytes(), f"{folder} of part {number} differs"


def _table(s3, bucket: str, key: str):
    return pq.read_table(pa.BufferReader(s3.get(bucket, key)))


def _no_temporaries(keys: list[str]) -> bool:
    return not any(key.rsplit("/", 1)[-1].startswith(".") for key in keys)


def test_http_shards_into_s3_equal_a_local_run_byte_for_byte_through_transient_faults(data, s3, capsys):
    s3.bucket("embed-a")
    with FileServer(data["root"] / "shards") as http:
        http.fault("00001.tar", missing=2)  # 404 twice, then there
        http.fault("00002.tar", cut_after=4000, cuts=1)  # the connection reset mid-stream once
        code = main(["embed", "--input", f"{http.url}/{{00000..00002}}.tar", "--out", "s3://embed-a/emb", *data["common"]])
    assert code == 0, capsys.readouterr().err
    _assert_equal_to_local(s3, "embed-a", "emb", data["local"])
    keys = s3.keys("embed-a")
    assert "emb/embed_config.json" in keys and _no_temporaries(keys) and not any("failures" in k for k in keys)
    assert "embedded 15 samples into 3 parts of s3://embed-a/emb" in capsys.readouterr().out


def test_a_shard_url_with_percent_escapes_keeps_the_number_of_its_file_name(data, tmp_path, capsys):
    # "café 00001.tar" over HTTP is ".../caf%C3%A9%2000001.tar": its part is 1, not 2000001
    folder = tmp_path / "served" / "sp ace"
    folder.mkdir(parents=True)
    (folder / "café 00001.tar").write_bytes((data["root"] / "shards" / "00001.tar").read_bytes())
    with FileServer(tmp_path / "served") as http:
        code = main(["embed", "--input", f"{http.url}/sp%20ace/caf%C3%A9%2000001.tar", "--out", str(tmp_path / "emb"),
                     *data["common"]])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "emb" / "img_emb").iterdir()) == ["img_emb_1.npy"]
    assert (tmp_path / "emb" / "img_emb" / "img_emb_1.npy").read_bytes() == \
        (data["local"] / "img_emb" / "img_emb_1.npy").read_bytes()
    shards = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_1.parquet").column("shard").to_pylist()
    assert shards == ["café 00001.tar"] * SHARDS[1]


def test_a_shard_that_stays_missing_is_reported_and_a_plain_rerun_completes_it(data, s3, capsys):
    s3.bucket("embed-b")
    command = ["embed", "--input", None, "--out", "s3://embed-b/emb", *data["common"]]
    with FileServer(data["root"] / "shards") as http:
        command[2] = f"{http.url}/{{00000..00002}}.tar"
        http.fault("00001.tar", missing=1000)
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "1 parts are not finished" in err and f"{http.url}/00001.tar" in err
        keys = s3.keys("embed-b")
        assert "emb/metadata/metadata_1.parquet" not in keys and "emb/img_emb/img_emb_1.npy" not in keys
        report = _table(s3, "embed-b", "emb/failures/failures_1.parquet").to_pylist()
        assert [(r["part"], r["index"], r["source"]) for r in report] == [(1, -1, f"{http.url}/00001.tar")]
        assert "fetch failed" in report[0]["reason"] and "404" in report[0]["reason"] and "attempts" in report[0]["reason"]

        http.state.faults.clear()  # the shard is back
        assert main(command) == 0
    assert "embedded 4 samples into 1 parts" in capsys.readouterr().out  # only the unfinished part
    _assert_equal_to_local(s3, "embed-b", "emb", data["local"])
    assert "emb/failures/failures_1.parquet" not in s3.keys("embed-b")


def test_an_output_in_a_bucket_that_does_not_exist_is_refused_before_any_work(data, s3, capsys):
    code = main(["embed", "--input", str(data["root"] / "shards"), "--out", "s3://no-such-bucket/emb", *data["common"]])
    assert code == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket/emb: the bucket s3://no-such-bucket does not exist" in err
    assert "embedded" not in err and "attempts" not in err


def test_two_runs_with_other_settings_into_one_s3_folder_are_refused(data, s3, capsys):
    s3.bucket("embed-c")
    s3.put("embed-c", "emb/embed_config.json", (data["local"] / "embed_config.json").read_bytes())
    code = main(["embed", "--input", str(data["root"] / "shards"), "--out", "s3://embed-c/emb", *data["common"],
                 "--dtype", "float32"])
    assert code == 2
    assert "s3://embed-c/emb holds embeddings of another configuration (dtype: 'float16' before, 'float32' now)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_killed_mid_upload_a_rerun_leaves_the_same_folder_and_nothing_half_written(data, s3, tmp_path):
    """kill -9 as the upload of a part's temporary object is answered, then run again."""
    s3.bucket("embed-d")
    env = dict(os.environ, PYTHONWARNINGS="ignore", UNICOM_PROGRESS="0")
    command = [sys.executable, "-m", "unicom.cli", "embed", "--input", str(data["root"] / "shards"),
               "--out", "s3://embed-d/emb", *data["common"]]
    # killed when S3 answers the upload of part 1's temporary embeddings
    kill_at_s3_response(s3, command, env, rb"PUT /embed-d/emb/img_emb/\.img_emb_1\.npy\.[a-z0-9_]{8}\.tmp ")
    keys = s3.keys("embed-d")
    assert "emb/img_emb/img_emb_1.npy" not in keys and "emb/metadata/metadata_1.parquet" not in keys
    left = [k for k in keys if not _no_temporaries([k])]
    assert len(left) == 1 and left[0].startswith("emb/img_emb/.img_emb_1.npy.")  # what the kill left, under its temporary name

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_equal_to_local(s3, "embed-d", "emb", data["local"])
    assert _no_temporaries(s3.keys("embed-d"))  # the rerun swept its own leftover


def test_a_list_image_url_that_stays_missing_is_a_failed_sample_and_one_not_fetched_leaves_its_part_unfinished(
        data, tmp_path, capsys, monkeypatch):
    """A 404 after every retry is a file that is not there, as a missing local file: its
    sample fails and the part is finished. A server error is not final: the part waits for a rerun."""
    import pyarrow.csv as pacsv

    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    images = tmp_path / "served"
    images.mkdir()
    for i in (0, 2, 3):
        (images / f"{i}.jpg").write_bytes(encode_image(class_image(i % 2, i, 36)))
    with FileServer(images) as http:
        http.fault("3.jpg", status=503, statuses=1000)
        http.fault("2.jpg", status=410, statuses=1000)  # gone for good, said at once
        urls = [f"{http.url}/{i}.jpg" for i in range(4)]
        pacsv.write_csv(pa.table({"path": urls}), tmp_path / "list.csv")
        code = main(["embed", "--input", str(tmp_path / "list.csv"), "--out", str(tmp_path / "emb"),
                     *data["common"], "--rows-per-part", "2"])
    assert code == 1
    assert "1 parts are not finished" in capsys.readouterr().err
    rows = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    assert rows == [urls[0]]  # part 0 is finished without 1.jpg, which is not on the server
    failed = pq.read_table(tmp_path / "emb" / "failures" / "failures_0.parquet").to_pylist()
    assert [(f["index"], f["source"]) for f in failed] == [(1, urls[1])]
    assert failed[0]["reason"].startswith(f"file not found: {urls[1]}: not found (HTTP 404)")
    assert not (tmp_path / "emb" / "metadata" / "metadata_1.parquet").exists()  # 3.jpg: 503 to every attempt
    report = pq.read_table(tmp_path / "emb" / "failures" / "failures_1.parquet").to_pylist()
    assert [(f["index"], f["source"]) for f in report] == [(0, urls[2]), (1, urls[3])]
    assert report[0]["reason"] == f"file not found: {urls[2]}: refused (HTTP 410 Gone)" and "503" in report[1]["reason"]


def test_a_list_of_images_in_s3_embeds_like_the_same_list_on_disk(s3, tmp_path, data):
    import pyarrow.csv as pacsv

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(encode_image(class_image(i % 2, i, 36)))
    pacsv.write_csv(pa.table({"path": [f"images/{i}.jpg" for i in range(5)], "label": [i % 2 for i in range(5)]}),
                    tmp_path / "list.csv")
    bucket = s3.bucket("embed-e")
    s3.upload_folder(tmp_path, "embed-e", "data")
    common = [*data["common"], "--rows-per-part", "3"]
    assert main(["embed", "--input", str(tmp_path / "list.csv"), "--out", str(tmp_path / "local"), *common]) == 0
    assert main(["embed", "--input", f"{bucket}/data/list.csv", "--out", f"{bucket}/emb", *common]) == 0
    for number in (0, 1):
        assert s3.get("embed-e", f"emb/img_emb/img_emb_{number}.npy") == (tmp_path / "local" / "img_emb" / f"img_emb_{number}.npy").read_bytes()
        table = _table(s3, "embed-e", f"emb/metadata/metadata_{number}.parquet")
        assert table.column("image_path").to_pylist()[0].startswith(f"{bucket}/data/images/")
