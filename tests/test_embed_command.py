"""``unicom embed`` on webdataset shards with an open_clip model loaded from the user's own file."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import class_image, encode_image, write_tar_shard

from unicom.cli import main

# shard number -> [(key, format, width, height)], "bad" is not an image
SHARDS = {
    0: [("00000000", "JPEG", 64, 48), ("00000001", "JPEG", 40, 40), ("00000002", "PNG", 32, 64), ("00000003", "JPEG", 50, 30)],
    1: [("00010000", "PNG", 48, 48), ("00010001", "BAD", 0, 0), ("00010002", "WEBP", 36, 52), ("00010003", "JPEG", 64, 64)],
    2: [("00020000", "PNG", 30, 40), ("00020001", "JPEG", 64, 32), ("00020002", "JPEG", 44, 44)],
}
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BAD": "jpg"}


def _image(key: str, width: int, height: int) -> Image.Image:
    return class_image(int(key) % 7, int(key), max(width, height)).resize((width, height))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards with real JPEG/PNG/WebP files and one corrupt file, and a ViT-B-32 checkpoint."""
    import open_clip

    root = tmp_path_factory.mktemp("embed")
    for number, samples in SHARDS.items():
        records = []
        for key, fmt, width, height in samples:
            data = b"\xff\xd8\xff\xe0 truncated" if fmt == "BAD" else encode_image(_image(key, width, height), fmt)
            records.append({"key": key, EXT[fmt]: data, "txt": f"caption of {key}", "json": {"url": f"https://example.org/{key}"}})
        write_tar_shard(root / "shards" / f"{number:05d}.tar", records)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    checkpoint = root / "my-vit-b-32.pt"
    torch.save(model.state_dict(), checkpoint)
    return root, checkpoint, model.eval(), preprocess


def _embed(root, checkpoint, out, *extra):
    pattern = str(root / "shards" / "{00000..00002}.tar")
    return main(["embed", "--input", pattern, "--model", "ViT-B-32", "--pretrained", str(checkpoint),
                 "--modalities", "image,text", "--out", str(out), "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def first_run(setup):
    root, checkpoint, _, _ = setup
    out = root / "EMB"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNICOM_PROGRESS", "0")
        assert _embed(root, checkpoint, out) == 0
    return out


def _load(out, number):
    return (
        np.load(out / "img_emb" / f"img_emb_{number}.npy"),
        np.load(out / "text_emb" / f"text_emb_{number}.npy"),
        pq.read_table(out / "metadata" / f"metadata_{number}.parquet").to_pylist(),
    )


def test_one_row_per_good_sample_with_keys_aligned(first_run):
    for number, samples in SHARDS.items():
        image, text, metadata = _load(first_run, number)
        good = [(key, w, h) for key, fmt, w, h in samples if fmt != "BAD"]
        assert image.shape == (len(good), 512) and text.shape == (len(good), 512)
        assert image.dtype == np.float16 and text.dtype == np.float16
        assert [row["key"] for row in metadata] == [key for key, _, _ in good]
        assert [(row["width"], row["height"]) for row in metadata] == [(w, h) for _, w, h in good]
        assert [row["caption"] for row in metadata] == [f"caption of {key}" for key, _, _ in good]
        assert [row["url"] for row in metadata] == [f"https://example.org/{key}" for key, _, _ in good]
        assert {row["shard"] for row in metadata} == {f"{number:05d}.tar"}


def test_rows_are_the_models_embeddings_l2_normalised(setup, first_run):
    import open_clip

    root, _, model, preprocess = setup
    for number, samples in SHARDS.items():
        image, text, metadata = _load(first_run, number)
        np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(text.astype(np.float32), axis=1), 1.0, atol=2e-3)
        fmt = {key: (f, w, h) for key, f, w, h in samples}
        pixels = torch.stack([preprocess(_decoded(row["key"], *fmt[row["key"]])) for row in metadata])
        tokens = open_clip.get_tokenizer("ViT-B-32")([row["caption"] for row in metadata])
        with torch.no_grad():
            expected_image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
            expected_text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
        np.testing.assert_allclose(image.astype(np.float32), expected_image, atol=2e-3)
        np.testing.assert_allclose(text.astype(np.float32), expected_text, atol=2e-3)


def _decoded(key, fmt, width, height):
    """The image as the shard stores it (lossy formats included), decoded again."""
    return Image.open(io.BytesIO(encode_image(_image(key, width, height), fmt))).convert("RGB")


def test_the_corrupt_sample_is_reported_with_key_shard_and_reason(setup, first_run):
    report = pq.read_table(first_run / "failures" / "failures_1.parquet").to_pylist()
    assert len(report) == 1
    assert report[0]["key"] == "00010001" and report[0]["index"] == 1 and report[0]["part"] == 1
    assert report[0]["source"].endswith("00001.tar")
    assert "cannot decode" in report[0]["reason"] or "not an image" in report[0]["reason"]
    assert not (first_run / "failures" / "failures_0.parquet").exists()


def test_deleting_one_part_recomputes_only_that_part_identically(setup, first_run, capsys):
    root, checkpoint, _, _ = setup
    before = {n: _load(first_run, n) for n in SHARDS}
    files = sorted(p for p in first_run.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    (first_run / "img_emb" / "img_emb_1.npy").unlink()
    capsys.readouterr()
    assert _embed(root, checkpoint, first_run) == 0
    captured = capsys.readouterr()
    assert "embedded 3 samples into 1 parts" in captured.out and "2 of 3 parts were already finished" in captured.out
    assert "00010001" in captured.err  # the corrupt sample is reported again
    changed = {p.relative_to(first_run).as_posix() for p in files if p.exists() and p.stat().st_mtime_ns != stamps[p]}
    assert changed == {
        "img_emb/img_emb_1.npy", "text_emb/text_emb_1.npy", "metadata/metadata_1.parquet", "failures/failures_1.parquet"
    }
    after = _load(first_run, 1)
    np.testing.assert_array_equal(after[0], before[1][0])
    np.testing.assert_array_equal(after[1], before[1][1])
    assert after[2] == before[1][2]


def test_the_summary_says_how_long_the_model_waited_for_its_input(setup, tmp_path, capsys):
    import re

    root, checkpoint, _, _ = setup
    assert _embed(root, checkpoint, tmp_path / "emb") == 0
    out = capsys.readouterr().out
    assert re.search(r"^after the start-up the model waited \d+% of the time for its next batch", out, re.MULTILINE), out


def test_a_finished_folder_is_left_alone_and_another_configuration_refused(setup, first_run, capsys):
    root, checkpoint, _, _ = setup
    files = {p: p.stat().st_mtime_ns for p in first_run.rglob("*") if p.is_file()}
    assert _embed(root, checkpoint, first_run) == 0
    assert "0 parts" in capsys.readouterr().out
    pattern = str(root / "shards" / "{00000..00002}.tar")
    code = main(["embed", "--input", pattern, "--model", "ViT-B-32", "--pretrained", str(checkpoint), "--out", str(first_run)])
    assert code == 2
    assert "another configuration" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in first_run.rglob("*") if p.is_file()} == files


def test_a_rerun_with_draft_decoding_into_a_fully_decoded_folder_is_refused(setup, first_run, tmp_path, capsys):
    import json
    import shutil

    root, checkpoint, _, _ = setup
    out = tmp_path / "EMB"
    shutil.copytree(first_run, out)
    assert json.loads((out / "embed_config.json").read_text())["draft"] is False
    (out / "img_emb" / "img_emb_2.npy").unlink()
    # draft decoding gives other image embeddings: part 2 must not be redone with it beside parts 0 and 1
    assert _embed(root, checkpoint, out, "--draft") == 2
    assert "another configuration (draft: False before, True now)" in capsys.readouterr().err
    assert not (out / "img_emb" / "img_emb_2.npy").exists()


def test_missing_shard_is_an_error_before_anything_is_written(setup, capsys):
    root, checkpoint, _, _ = setup
    out = root / "never"
    code = main(["embed", "--input", str(root / "shards" / "{00000..00005}.tar"), "--model", "ViT-B-32",
                 "--pretrained", str(checkpoint), "--out", str(out)])
    assert code == 2 and "00003.tar: shard not found" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_weights_file_moved_elsewhere_resumes_by_its_digest_and_other_weights_are_refused(setup, first_run, tmp_path, capsys):
    import json
    import shutil

    root, checkpoint, _, _ = setup
    out = tmp_path / "EMB"
    shutil.copytree(first_run, out)
    (out / "img_emb" / "img_emb_2.npy").unlink()
    moved = tmp_path / "elsewhere" / "weights.pt"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    assert _embed(root, moved, out) == 0
    assert "embedded 3 samples into 1 parts" in capsys.readouterr().out
    config = json.loads((out / "embed_config.json").read_text())
    assert config["pretrained"] == str(moved)  # the new place is recorded (unicom search loads it from there)
    assert config == dict(json.loads((first_run / "embed_config.json").read_text()), pretrained=str(moved))
    np.testing.assert_array_equal(_load(out, 2)[0], _load(first_run, 2)[0])

    state = torch.load(checkpoint, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3  # other weights
    other = tmp_path / "other.pt"
    torch.save(state, other)
    (out / "img_emb" / "img_emb_2.npy").unlink()
    assert _embed(root, other, out) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "weights_sha256" in err and "pretrained" in err
    assert not (out / "img_emb" / "img_emb_2.npy").exists()


def test_a_relative_local_dir_model_is_recorded_by_its_absolute_folder(setup, tmp_path, monkeypatch):
    import json

    from support import tiny_open_clip

    root, _, _, _ = setup
    tiny_open_clip(tmp_path / "models" / "clip")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNICOM_PROGRESS", "0")
    pattern = str(root / "shards" / "00000.tar")
    assert main(["embed", "--input", pattern, "--model", "local-dir:models/clip", "--out", "emb"]) == 0
    config = json.loads((tmp_path / "emb" / "embed_config.json").read_text())
    assert config["model"] == f"local-dir:{tmp_path / 'models' / 'clip'}"
    # a rerun from the same folder, spelled relative again, finds the same configuration
    assert main(["embed", "--input", pattern, "--model", "local-dir:models/clip", "--out", "emb"]) == 0
    # so does a folder that recorded the spec as given (relative)
    (tmp_path / "emb" / "embed_config.json").write_text(json.dumps(dict(config, model="local-dir:models/clip")))
    assert main(["embed", "--input", pattern, "--model", f"local-dir:{tmp_path / 'models' / 'clip'}", "--out", "emb"]) == 0


def test_a_folder_where_an_earlier_version_numbered_a_shard_otherwise_is_not_continued(setup, tmp_path, capsys):
    """Earlier versions numbered `train-00000-of-00001.tar` by its total (part 1); today it is
    part 0: continuing such a folder would embed the shard a second time beside part 1."""
    import shutil

    root, checkpoint, _, _ = setup
    shard = tmp_path / "train-00000-of-00001.tar"
    shutil.copy(root / "shards" / "00000.tar", shard)
    out = tmp_path / "EMB"
    command = ["embed", "--input", str(shard), "--model", "ViT-B-32", "--pretrained", str(checkpoint), "--out", str(out)]
    assert main(command) == 0
    assert main(command) == 0 and "0 parts" in capsys.readouterr().out  # this version's folder continues
    for path in list(out.rglob("*_0.*")):  # the folder as the earlier numbering wrote it
        path.rename(path.with_name(path.name.replace("_0.", "_1.")))
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert main(command) == 2
    assert (f"{out}: part 1 holds the embeddings of {shard}, which is part 0 now"
            in capsys.readouterr().err)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == files


def test_the_earlier_numbers_of_shards_are_those_of_their_names_as_written():
    from unicom.data.sources import ShardPart
    from unicom.embed import _earlier_number

    assert _earlier_number(ShardPart(12, "https://host/shard%2000012.tar?token=a1")) == 2000012
    assert _earlier_number(ShardPart(0, "/data/train-00000-of-00001.tar")) == 1
    assert _earlier_number(ShardPart(12, "/data/00012.tar")) is None  # the same number then and now
    assert _earlier_number(ShardPart(2000012, "s3://bucket/shard%2000012.tar")) is None  # a key is read as written


def test_a_rerun_over_many_shards_of_one_total_reads_the_part_of_that_number_once(tmp_path, monkeypatch):
    """Every `train-…-of-00003.tar` was part 3 by the earlier numbering: the part 3 this
    version wrote (of another shard) is looked at once, not once per shard, and continues."""
    import numpy as np
    import pyarrow as pa

    from unicom import embed
    from unicom.data.sources import ShardPart
    from unicom.formats.embeddings import write_part

    for number, shard in enumerate(["train-00000-of-00003.tar", "train-00001-of-00003.tar",
                                    "train-00002-of-00003.tar", "extra-00003.tar"]):
        write_part(tmp_path / "emb", number, image=np.ones((1, 4), np.float32),
                   metadata=pa.table({"key": ["a"], "shard": [shard]}))
    parts = [ShardPart(n, f"/data/train-{n:05d}-of-00003.tar") for n in range(3)] + [ShardPart(3, "/data/extra-00003.tar")]
    reads = []
    real = embed.part_column_values
    monkeypatch.setattr(embed, "part_column_values", lambda *args: reads.append(args[1]) or real(*args))
    embed._check_numbering(tmp_path / "emb", parts, ["image", "metadata"])  # no refusal
    assert reads == [3]
