"""``unicom embed`` on image folders and CSV lists: parts of rows, labels, paths, failures."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from support import class_image, encode_image, write_class_folder, write_tar_shard

from unicom.cli import main
from unicom.formats.embeddings import EmbeddingFolders, part_settings


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("weights") / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    return str(path)


def test_class_folder_gives_parts_of_rows_with_labels_and_paths(tmp_path, weights):
    paths = write_class_folder(tmp_path / "data", labels=[0, 1, 2], per_class=3, size=24)
    broken = tmp_path / "data" / "class_001" / "0001.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    code = main(["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), "--rows-per-part", "4", "--workers", "0"])
    assert code == 0
    folders = EmbeddingFolders.from_root(tmp_path / "EMB")
    contents = folders.contents(("image",))
    assert contents.numbers == [0, 1, 2]  # 9 rows in parts of 4
    rows = [row for n in contents.numbers for row in folders.load("metadata", n).to_pylist()]
    good = [p for p in paths if p != broken]
    assert [row["image_path"] for row in rows] == [str(p) for p in good]
    assert [row["key"] for row in rows] == [p.relative_to(tmp_path / "data").as_posix() for p in good]
    assert [row["label"] for row in rows] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert {(row["width"], row["height"]) for row in rows} == {(24, 24)}
    assert list(rows[0]) == ["key", "image_path", "width", "height", "occurrence", "label"]
    assert {row["occurrence"] for row in rows} == {0}  # keys of a folder are unique
    assert sum(folders.num_rows("image", n) for n in contents.numbers) == contents.num_rows == 8
    (failure,) = pq.read_table(tmp_path / "EMB" / "failures" / "failures_1.parquet").to_pylist()
    assert (failure["source"], failure["index"], failure["part"]) == (str(broken), 0, 1)


def test_csv_list_keeps_its_keys_and_captions(tmp_path, weights):
    for name in ("a", "b", "c"):
        class_image(ord(name), 0, 20).save(tmp_path / f"{name}.png")
    (tmp_path / "list.csv").write_text("path,caption,key\na.png,first,ka\nb.png,second,kb\nc.png,third,kc\n")
    assert main(["embed", "--input", str(tmp_path / "list.csv"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), "--dtype", "float32"]) == 0
    rows = pq.read_table(tmp_path / "EMB" / "metadata" / "metadata_0.parquet").to_pylist()
    assert [(r["key"], r["caption"]) for r in rows] == [("ka", "first"), ("kb", "second"), ("kc", "third")]
    image = np.load(tmp_path / "EMB" / "img_emb" / "img_emb_0.npy")
    assert image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-6)


def test_csv_list_labels_are_stored_as_written(tmp_path, weights):
    """Class names stay names in the metadata (not the numbers they were sorted into), so a
    later `unicom evaluate --classes owl` finds them; numeric labels stay int64."""
    for name in ("a", "b", "c"):
        class_image(ord(name), 0, 20).save(tmp_path / f"{name}.png")
    (tmp_path / "names.csv").write_text("path,label\na.png,owl\nb.png,cat\nc.png,owl\n")
    (tmp_path / "ids.csv").write_text("path,label\na.png,7\nb.png,3\nc.png,7\n")
    for name in ("names", "ids"):
        assert main(["embed", "--input", str(tmp_path / f"{name}.csv"), "--model", "timm/test_vit",
                     "--pretrained", weights, "--out", str(tmp_path / name), "--workers", "0"]) == 0
    names = pq.read_table(tmp_path / "names" / "metadata" / "metadata_0.parquet")
    ids = pq.read_table(tmp_path / "ids" / "metadata" / "metadata_0.parquet")
    assert names.column("label").to_pylist() == ["owl", "cat", "owl"]
    assert ids.column("label").to_pylist() == [7, 3, 7] and str(ids.schema.field("label").type) == "int64"


def test_a_folder_whose_parts_store_labels_as_numbers_and_as_names_is_refused_naming_them(tmp_path, weights, capsys):
    """A list embedded partly by a version that stored class names as numbers and finished by
    one that stores the names: the parts cannot be one table; evaluate names the column and
    the parts of each kind instead of pyarrow's 'Unable to merge' traceback."""
    import pyarrow as pa

    for row in range(4):
        class_image(row, 0, 20).save(tmp_path / f"{row}.png")
    (tmp_path / "names.csv").write_text("path,label\n0.png,owl\n1.png,cat\n2.png,owl\n3.png,cat\n")
    assert main(["embed", "--input", str(tmp_path / "names.csv"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), "--rows-per-part", "2", "--workers", "0"]) == 0
    older = tmp_path / "EMB" / "metadata" / "metadata_1.parquet"
    table = pq.read_table(older)
    numbers = pa.array([{"cat": 0, "owl": 1}[name] for name in table.column("label").to_pylist()], pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", numbers), older)
    capsys.readouterr()
    assert main(["evaluate", "--embeddings", str(tmp_path / "EMB"), "--out", str(tmp_path / "ev"), "--dims", "none",
                 "--no-pca"]) == 2
    error = capsys.readouterr().err
    assert "column 'label' as different types (string in parts [0]; int64 in parts [1])" in error
    assert "Traceback" not in error


def test_text_with_an_image_only_model_fails_before_writing(tmp_path, weights, capsys):
    class_image(0, 0, 16).save(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text("path,caption\na.png,a caption\n")
    code = main(["embed", "--input", str(tmp_path / "list.csv"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--modalities", "image,text", "--out", str(tmp_path / "EMB")])
    assert code == 2 and "no text tower" in capsys.readouterr().err
    assert not (tmp_path / "EMB").exists()


def test_text_of_inputs_without_captions_is_refused_before_the_model_is_built(tmp_path, capsys):
    """Every text row would be the embedding of the empty caption."""
    write_class_folder(tmp_path / "data", labels=[0], per_class=2, size=16)
    code = main(["embed", "--input", str(tmp_path / "data"), "--model", "ViT-B-32", "--modalities", "image,text",
                 "--out", str(tmp_path / "EMB")])
    assert code == 2 and "data: no captions to embed as text" in capsys.readouterr().err
    assert not (tmp_path / "EMB").exists()


def test_unknown_modality_is_refused(tmp_path, weights, capsys):
    write_class_folder(tmp_path / "data", labels=[0], per_class=1, size=16)
    code = main(["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--modalities", "audio",
                 "--out", str(tmp_path / "EMB")])
    assert code == 2 and "choose one or both of image, text" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "batch size must be at least 1, got 0"),
    ("--batch-size", "-3", "batch size must be at least 1, got -3"),
    ("--workers", "-1", "workers must be 0 (decode in the main process) or more, got -1"),
    ("--device", "gpu0", "--device='gpu0': not a torch device"),
])
def test_options_out_of_range_are_refused_before_writing(tmp_path, weights, capsys, option, value, message):
    write_class_folder(tmp_path / "data", labels=[0], per_class=1, size=16)
    code = main(["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), option, value])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "EMB").exists()


def test_a_rerun_that_cuts_the_rows_into_other_parts_is_refused(tmp_path, weights, capsys):
    """Parts 0-1 of 2 rows already cover rows 0-3; with 3 rows per part, part 1 would be rows 3-5."""
    write_class_folder(tmp_path / "data", labels=[0, 1], per_class=3, size=16)
    args = ["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--pretrained", weights,
            "--out", str(tmp_path / "EMB"), "--workers", "0"]
    assert main([*args, "--rows-per-part", "2"]) == 0
    (tmp_path / "EMB" / "metadata" / "metadata_2.parquet").unlink()  # a run that stopped before part 2
    files = {p: p.read_bytes() for p in (tmp_path / "EMB").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, "--rows-per-part", "3"]) == 2
    assert "rows_per_part: 2 before, 3 now" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "EMB").rglob("*") if p.is_file()} == files
    assert main([*args, "--rows-per-part", "2"]) == 0  # the same cut finishes the folder
    assert EmbeddingFolders.from_root(tmp_path / "EMB").contents(("image",)).num_rows == 6


def test_a_rerun_after_images_were_added_to_the_folder_is_refused(tmp_path, weights, capsys):
    """Parts 0 and 1 of 2 rows hold class_000/0000-0002 and class_001/0000; an image added in
    front (class_000/.. sorts first) would make the same cut's part 2 repeat a finished row and
    leave the new one out."""
    write_class_folder(tmp_path / "data", labels=[0, 1], per_class=3, size=16)
    args = ["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--pretrained", weights,
            "--out", str(tmp_path / "EMB"), "--workers", "0", "--rows-per-part", "2"]
    assert main(args) == 0
    (tmp_path / "EMB" / "metadata" / "metadata_2.parquet").unlink()  # a run that stopped before part 2
    files = {p: p.read_bytes() for p in (tmp_path / "EMB").rglob("*") if p.is_file()}
    write_class_folder(tmp_path / "new", labels=[0], per_class=1, size=16)
    (tmp_path / "new" / "class_000" / "0000.jpg").rename(tmp_path / "data" / "class_000" / "000.jpg")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "keys_sha256" in err and "the images listed changed since (added, removed or reordered)" in err
    assert {p: p.read_bytes() for p in (tmp_path / "EMB").rglob("*") if p.is_file()} == files
    (tmp_path / "data" / "class_000" / "000.jpg").unlink()
    assert main(args) == 0  # the images as they were finish the folder
    keys = pq.read_table(tmp_path / "EMB" / "metadata").column("key").to_pylist()
    assert sorted(keys) == [f"class_00{c}/000{i}.jpg" for c in (0, 1) for i in range(3)]


def test_an_output_folder_that_is_a_file_is_refused_before_the_model_is_built(tmp_path, weights, capsys):
    write_class_folder(tmp_path / "data", labels=[0], per_class=1, size=16)
    (tmp_path / "EMB").write_text("notes")
    code = main(["embed", "--input", str(tmp_path / "data"), "--model", "timm/no_such_model", "--out", str(tmp_path / "EMB")])
    assert code == 2 and "EMB: a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "EMB").read_text() == "notes"


@pytest.mark.parametrize("option", ["--caption-column", "--label-column", "--key-column"])
def test_a_list_column_named_on_the_command_line_must_be_there(tmp_path, weights, capsys, option):
    class_image(0, 0, 20).save(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text("path,caption,label,key\na.png,first,0,ka\n")
    code = main(["embed", "--input", str(tmp_path / "list.csv"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), option, "typo"])
    assert code == 2
    assert "list.csv: no column 'typo'; columns are ['path', 'caption', 'label', 'key']" in capsys.readouterr().err
    assert not (tmp_path / "EMB").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--rows-per-part", "10", "rows per part (--rows-per-part 10) cut image folders and lists; every shard is one part"),
    ("--key-column", "id", "00000.tar: a tar shard, whose samples' keys are its members' names (000123 of "
                           "000123.jpg); the key column named ('id') is a column of parquet shards: leave it out"),
    ("--image-column", "img/png", "--image-column 'img/png': for tar shards, the extension of the samples' members"),
    ("--path-column", "file", "--path-column name columns of a CSV/parquet list, and "),
])
def test_options_of_folders_and_lists_are_refused_with_shards_not_ignored(tmp_path, weights, capsys, option, value,
                                                                          message):
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": "a", "png": encode_image(class_image(0, 0, 20), "PNG")}])
    code = main(["embed", "--input", str(tmp_path / "shards" / "00000.tar"), "--model", "timm/test_vit",
                 "--pretrained", weights, "--out", str(tmp_path / "EMB"), option, value])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "EMB").exists()


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_an_output_folder_on_a_full_disk_says_what_to_do_and_a_rerun_completes_it(tmp_path, weights):
    """A disk that refuses even the first small file (here a file-size limit of 100 bytes, as a
    full disk would): the error names the folder and the file, no traceback, no temporary
    left; a rerun with room writes every part."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process

    write_class_folder(tmp_path / "data", labels=[0, 1], per_class=2, size=24)
    arguments = ["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), "--workers", "0", "--device", "cpu"]
    failed = subprocess.run([sys.executable, "-m", "unicom.cli", *arguments], capture_output=True, text=True,
                            preexec_fn=limit_file_size, timeout=300)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert f"{tmp_path / 'EMB'}: embed_config.json could not be written (" in failed.stderr
    assert "free space there or write to another folder, then run again" in failed.stderr
    assert [p.name for p in (tmp_path / "EMB").rglob("*.tmp")] == []
    assert main(arguments) == 0
    assert EmbeddingFolders.from_root(tmp_path / "EMB").contents(("image",)).num_rows == 4


def embed_class_folder(tmp_path, weights, *options) -> int:
    """``unicom embed`` of a 9-image class folder in parts of 4 rows (parts 0, 1, 2) into ``tmp_path/EMB``."""
    if not (tmp_path / "data").is_dir():
        write_class_folder(tmp_path / "data", labels=[0, 1, 2], per_class=3, size=24)
    return main(["embed", "--input", str(tmp_path / "data"), "--model", "timm/test_vit", "--pretrained", weights,
                 "--out", str(tmp_path / "EMB"), "--rows-per-part", "4", "--workers", "0", *options])


def test_a_run_resumed_with_another_precision_and_decoding_warns_naming_both_and_their_parts(tmp_path, weights, caplog):
    assert embed_class_folder(tmp_path, weights, "--precision", "fp32", "--decode", "cpu") == 0
    (tmp_path / "EMB" / "metadata" / "metadata_1.parquet").unlink()  # as a run killed before part 1 was finished
    with caplog.at_level(logging.WARNING, logger="unicom.embed"):
        assert embed_class_folder(tmp_path, weights, "--precision", "bf16", "--decode", "gpu") == 0  # not refused
    assert (f"{tmp_path / 'EMB'}: finished parts were embedded with other settings than this run's (parts [0, 2] with "
            "decode cpu, precision fp32); this run embeds parts [1] with decode gpu, precision bf16. Their embeddings "
            "differ slightly") in caplog.text
    cpu, gpu = {"precision": "fp32", "decode": "cpu"}, {"precision": "bf16", "decode": "gpu"}
    assert part_settings(tmp_path / "EMB", [0, 1, 2]) == {0: cpu, 1: gpu, 2: cpu}


def test_a_run_resumed_with_the_same_settings_or_in_a_folder_without_records_does_not_warn(tmp_path, weights, caplog):
    assert embed_class_folder(tmp_path, weights) == 0  # auto on a CPU: fp32, decoded by Pillow
    assert part_settings(tmp_path / "EMB", [0]) == {0: {"precision": "fp32", "decode": "cpu"}}
    (tmp_path / "EMB" / "metadata" / "metadata_1.parquet").unlink()
    with caplog.at_level(logging.WARNING, logger="unicom.embed"):
        assert embed_class_folder(tmp_path, weights, "--precision", "fp32", "--decode", "cpu") == 0
        for number in (0, 2):  # as earlier versions wrote them: no record
            path = tmp_path / "EMB" / "metadata" / f"metadata_{number}.parquet"
            pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
        (tmp_path / "EMB" / "metadata" / "metadata_1.parquet").unlink()
        assert embed_class_folder(tmp_path, weights, "--precision", "bf16") == 0
    assert "other settings" not in caplog.text


def footers_read(monkeypatch) -> list[list[int]]:
    """The parts whose metadata footers `unicom embed` reads for their settings, per call."""
    from unicom import embed

    asked = []

    def reading(out, numbers):
        asked.append(list(numbers))
        return part_settings(out, numbers)

    monkeypatch.setattr(embed, "part_settings", reading)
    return asked


def test_a_run_resumed_with_the_settings_every_run_recorded_reads_no_part_footer(tmp_path, weights, caplog,
                                                                                monkeypatch):
    import json

    asked = footers_read(monkeypatch)
    assert embed_class_folder(tmp_path, weights, "--precision", "fp32", "--decode", "cpu") == 0
    config = tmp_path / "EMB" / "embed_config.json"
    assert json.loads(config.read_text())["part_settings"] == [{"precision": "fp32", "decode": "cpu"}]
    (tmp_path / "EMB" / "metadata" / "metadata_1.parquet").unlink()  # as a run killed before part 1 was finished
    with caplog.at_level(logging.WARNING, logger="unicom.embed"):
        assert embed_class_folder(tmp_path, weights, "--precision", "fp32", "--decode", "cpu") == 0
        assert asked == []  # the finished parts 0 and 2 were made with this run's settings: no footer is read
        (tmp_path / "EMB" / "metadata" / "metadata_1.parquet").unlink()
        assert embed_class_folder(tmp_path, weights, "--precision", "bf16", "--decode", "cpu") == 0
    assert asked == [[0, 2]]  # other settings recorded: the parts are read to name those made with them
    assert ("finished parts were embedded with other settings than this run's (parts [0, 2] with decode cpu, "
            "precision fp32); this run embeds parts [1] with decode cpu, precision bf16") in caplog.text
    assert json.loads(config.read_text())["part_settings"] == [{"precision": "fp32", "decode": "cpu"},
                                                                {"precision": "bf16", "decode": "cpu"}]


def test_a_folder_without_a_record_of_its_settings_is_read_part_by_part_and_warns(tmp_path, weights, caplog,
                                                                                  monkeypatch):
    import json

    assert embed_class_folder(tmp_path, weights, "--precision", "fp32", "--decode", "cpu") == 0
    config = tmp_path / "EMB" / "embed_config.json"
    older = {k: v for k, v in json.loads(config.read_text()).items() if k != "part_settings"}
    config.write_text(json.dumps(older))  # as the version before the record wrote it
    (tmp_path / "EMB" / "metadata" / "metadata_1.parquet").unlink()
    asked = footers_read(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="unicom.embed"):
        assert embed_class_folder(tmp_path, weights, "--precision", "bf16", "--decode", "cpu") == 0
    assert asked == [[0, 2]]
    assert "(parts [0, 2] with decode cpu, precision fp32); this run embeds parts [1]" in caplog.text
    assert json.loads(config.read_text())["part_settings"] == [{"precision": "fp32", "decode": "cpu"},
                                                                {"precision": "bf16", "decode": "cpu"}]


def test_a_run_over_other_shards_keeps_the_settings_recorded_for_the_folders_earlier_parts(tmp_path, weights, caplog):
    """Shards embedded into one folder by runs over some of them at a time: the record keeps the
    settings of parts outside a run's inputs, so a run over all of them still names those parts."""
    import json

    for number in range(3):
        write_tar_shard(tmp_path / "shards" / f"{number:05d}.tar", [
            {"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number * 10 + i, 24))} for i in range(2)])

    def embed(numbers, precision):
        shards = [str(tmp_path / "shards" / f"{number:05d}.tar") for number in numbers]
        return main(["embed", "--input", *shards, "--model", "timm/test_vit", "--pretrained", weights, "--out",
                     str(tmp_path / "EMB"), "--workers", "0", "--precision", precision, "--decode", "cpu"])

    assert embed([0], "fp32") == 0
    assert embed([1], "bf16") == 0  # none of its inputs finished: part 0 is still the folder's
    config = tmp_path / "EMB" / "embed_config.json"
    assert json.loads(config.read_text())["part_settings"] == [{"precision": "fp32", "decode": "cpu"},
                                                                {"precision": "bf16", "decode": "cpu"}]
    with caplog.at_level(logging.WARNING, logger="unicom.embed"):
        assert embed([0, 1, 2], "bf16") == 0
    assert "(parts [0] with decode cpu, precision fp32); this run embeds parts [2] with decode cpu, precision bf16" \
        in caplog.text
