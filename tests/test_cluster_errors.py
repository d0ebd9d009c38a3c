"""Bad inputs to clustering: each is a clear error, raised before anything is written."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicom.cluster import ClusterInputs, KMeansSettings, cluster
from unicom.errors import InputError
from unicom.formats.embeddings import EmbeddingFolders, write_part


def make(root, sizes=(30, 30), dim=8, text_dim=None, dtype=np.float32, keys=True):
    """Shards of random rows (image and text) with a ``key`` column ``p{part}-{row}``."""
    rng = np.random.default_rng(0)
    for number, rows in enumerate(sizes):
        write_part(
            root, number,
            image=rng.standard_normal((rows, dim)).astype(dtype),
            text=rng.standard_normal((rows, text_dim or dim)).astype(dtype),
            metadata=pa.table({"key": [f"p{number}-{r}" for r in range(rows)]} if keys else {"caption": ["x"] * rows}),
        )
    return root


def run(root, out, fusion="image+text", k=3, **options):
    inputs = ClusterInputs(EmbeddingFolders.from_root(root), fusion=fusion, key_column=options.pop("key_column", None))
    return cluster(inputs, out, KMeansSettings(k=k), plot=False, **options)


def expect_error(tmp_path, pattern, fusion="image+text", k=3, **options):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=pattern):
        run(tmp_path / "emb", out, fusion=fusion, k=k, **options)
    assert not out.exists(), "nothing may be written before the inputs are checked"


def test_different_row_counts_of_image_and_text_in_one_part(tmp_path):
    make(tmp_path / "emb")
    np.save(tmp_path / "emb" / "text_emb" / "text_emb_1.npy", np.ones((29, 8), dtype=np.float32))
    expect_error(tmp_path, r"part 1: img_emb_1.npy has 30, text_emb_1.npy has 29, metadata_1.parquet has 30 rows")


def test_metadata_with_another_row_count(tmp_path):
    make(tmp_path / "emb")
    pq.write_table(pa.table({"key": ["a", "b"]}), tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    expect_error(tmp_path, r"part 0: .* metadata_0.parquet has 2 rows", fusion="image")


def test_a_shard_of_another_dimension(tmp_path):
    make(tmp_path / "emb")
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_1.npy", np.ones((30, 6), dtype=np.float32))
    expect_error(tmp_path, r"img_emb_1.npy: dimension 6, but .*img_emb_0.npy has 8", fusion="image")


def test_image_and_text_of_different_dimensions(tmp_path):
    make(tmp_path / "emb", text_dim=6)
    expect_error(tmp_path, r"image embeddings are 8-d .* text embeddings 6-d .* --fusion image or --fusion text")
    assert run(tmp_path / "emb", tmp_path / "text-only", fusion="text")["dimension"] == 6


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0], ids=["nan", "inf", "zero"])
def test_a_bad_image_row(tmp_path, value):
    make(tmp_path / "emb")
    path = tmp_path / "emb" / "img_emb" / "img_emb_1.npy"
    rows = np.load(path)
    rows[7] = value if value == 0.0 else rows[7]
    rows[7, 3] = value
    np.save(path, rows)
    expect_error(tmp_path, r"img_emb_1.npy: NaN/Inf values or an all-zero vector at row 7; .* --skip-invalid")


def test_bad_text_rows_name_the_text_file_and_count_them(tmp_path):
    make(tmp_path / "emb", sizes=(30, 40))
    path = tmp_path / "emb" / "text_emb" / "text_emb_1.npy"
    rows = np.load(path)
    rows[[2, 4, 6, 8, 10, 12, 14]] = np.nan
    np.save(path, rows)
    expect_error(tmp_path, r"text_emb_1.npy: NaN/Inf values or an all-zero vector at rows 2, 4, 6, 8, 10 and 2 more")


def test_a_sample_without_a_key(tmp_path):
    make(tmp_path / "emb")
    pq.write_table(pa.table({"key": ["a", None] + [f"k{i}" for i in range(28)]}), tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    expect_error(tmp_path, r"metadata_0.parquet: no 'key' \(null\) at row 1")
    summary = run(tmp_path / "emb", tmp_path / "skipped", skip_invalid=True)
    assert summary["invalid_rows"] == 1 and summary["labelled"] == 59


def test_k_larger_than_the_number_of_samples(tmp_path):
    make(tmp_path / "emb", sizes=(20, 20))
    expect_error(tmp_path, r"k = 41 is larger than the 40 samples", k=41)


def test_k_larger_than_the_valid_samples_left(tmp_path):
    make(tmp_path / "emb", sizes=(3, 3))
    path = tmp_path / "emb" / "img_emb" / "img_emb_0.npy"
    np.save(path, np.full((3, 8), np.nan, dtype=np.float32))
    expect_error(tmp_path, r"k = 4 is larger than the 3 valid samples", k=4, skip_invalid=True)


def test_a_sample_of_barely_k_rows_that_draws_invalid_rows(tmp_path):
    make(tmp_path / "emb", sizes=(30, 30))
    image = np.load(tmp_path / "emb" / "img_emb" / "img_emb_1.npy")
    image[:10] = 0.0  # 10 of 60 rows invalid: 50 valid samples, a sample of 50 drawn from 60
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_1.npy", image)
    inputs = ClusterInputs(EmbeddingFolders.from_root(tmp_path / "emb"), fusion="image")
    with pytest.raises(InputError, match=r"^the training sample of 50 rows \(k x --points-per-centroid\) keeps (4\d) "
                                         r"valid rows, fewer than k = 50: \d+ of the rows drawn are invalid; raise "
                                         r"--points-per-centroid$"):
        cluster(inputs, tmp_path / "out", KMeansSettings(k=50, points_per_centroid=1), skip_invalid=True, plot=False)
    assert not (tmp_path / "out" / "centroids.npy").exists()
    summary = cluster(inputs, tmp_path / "out", KMeansSettings(k=50, points_per_centroid=2), skip_invalid=True, plot=False)
    assert summary["labelled"] == 50 and summary["invalid_rows"] == 10


def test_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: folder not found"):
        ClusterInputs(EmbeddingFolders(image=tmp_path / "nowhere", metadata=tmp_path / "meta"), fusion="image")


def test_an_empty_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "meta").mkdir()
    with pytest.raises(InputError, match=r"img: no img_emb_<N>.npy files in this folder"):
        ClusterInputs(EmbeddingFolders(image=tmp_path / "img", metadata=tmp_path / "meta"), fusion="image")


def test_shards_that_hold_no_rows(tmp_path):
    make(tmp_path / "emb", sizes=(0, 0))
    expect_error(tmp_path, r"the shards hold no samples")


def test_a_folder_the_fusion_needs_is_not_given(tmp_path):
    make(tmp_path / "emb")
    folders = EmbeddingFolders(image=tmp_path / "emb" / "img_emb", metadata=tmp_path / "emb" / "metadata")
    with pytest.raises(InputError, match=r"no text folder was given \(--text-emb\); fusion 'image\+text' reads it: "
                                         r"give --text-emb, or cluster the images alone with "
                                         r"--fusion image$"):
        ClusterInputs(folders)
    texts = EmbeddingFolders(text=tmp_path / "emb" / "text_emb", metadata=tmp_path / "emb" / "metadata")
    with pytest.raises(InputError, match=r"give --image-emb, or cluster the texts alone with --fusion text$"):
        ClusterInputs(texts)
    with pytest.raises(InputError, match=r"no metadata folder was given \(--metadata\)"):
        ClusterInputs(EmbeddingFolders(image=tmp_path / "emb" / "img_emb"), fusion="image")


def test_an_embedding_folder_without_metadata_is_named(tmp_path, capsys):
    make(tmp_path / "emb")
    shutil.rmtree(tmp_path / "emb" / "metadata")
    from unicom.cli import main

    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--k", "2", "--out", str(tmp_path / "out")]) == 2
    assert (f"{tmp_path / 'emb'}: no metadata/ folder inside; the keys of the labels come from it: give the folder "
            "that `unicom embed` wrote (img_emb/, text_emb/ and metadata/), or add --metadata DIR") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_only_embedding_folder_under_the_default_fusion_says_what_to_do(tmp_path, capsys):
    """`unicom embed`'s default output has img_emb/ and metadata/ only; the default fusion
    image+text then needs captions embedded, or --fusion image."""
    rng = np.random.default_rng(0)
    write_part(tmp_path / "emb", 0, image=rng.standard_normal((12, 8)).astype(np.float32),
               metadata=pa.table({"key": [str(r) for r in range(12)]}))
    from unicom.cli import main

    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--k", "2", "--out", str(tmp_path / "out")]) == 2
    assert (f"{tmp_path / 'emb'}: no text_emb/ folder inside, and fusion 'image+text' (the default) reads it: "
            "cluster the images alone with --fusion image, or embed the captions too (unicom embed --modalities "
            "image,text)") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parts_missing_from_one_folder(tmp_path):
    make(tmp_path / "emb", sizes=(5, 5, 5))
    (tmp_path / "emb" / "text_emb" / "text_emb_2.npy").unlink()
    expect_error(tmp_path, r"metadata_2.parquet: part 2 has no text_emb_2.npy beside it")


def test_no_key_column(tmp_path):
    make(tmp_path / "emb", keys=False)
    expect_error(tmp_path, r"metadata_0.parquet: none of the key columns key, image_path, url is present \(columns: caption\)")


def test_a_named_key_column_that_is_absent(tmp_path):
    make(tmp_path / "emb")
    expect_error(tmp_path, r"metadata_0.parquet: no key column 'url' \(columns: key\); choose another with --key-column", key_column="url")


def test_integer_embeddings(tmp_path):
    make(tmp_path / "emb", dtype=np.int32)
    expect_error(tmp_path, r"img_emb_0.npy: dtype int32 is not a float type")


def test_an_unknown_fusion(tmp_path):
    make(tmp_path / "emb")
    expect_error(tmp_path, r"unknown fusion 'both'; choose one of image, text, image\+text", fusion="both")


@pytest.mark.parametrize("field, value", [("k", 0), ("iterations", 0), ("points_per_centroid", 0), ("init", "best"),
                                          ("seed", -1)])
def test_settings_out_of_range(field, value):
    with pytest.raises(InputError, match=field if field != "init" else "unknown k-means initialisation 'best'"):
        KMeansSettings(**{"k": 3, field: value})


def test_an_output_folder_that_is_a_file(tmp_path):
    make(tmp_path / "emb")
    (tmp_path / "out").write_text("notes")
    with pytest.raises(InputError, match=r"out: a file, not a folder"):
        run(tmp_path / "emb", tmp_path / "out")
    assert (tmp_path / "out").read_text() == "notes"
