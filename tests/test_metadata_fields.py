"""`unicom embed --metadata-fields`: fields of shards' samples (LAION's ``NSFW``,
``similarity``, ``LICENSE`` in img2dataset's json, or the same columns of its parquet shards)
kept as metadata columns, as clip-retrieval's ``enable_metadata`` keeps them, and answered by
`unicom serve` with each result."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import captioned_samples, class_image, write_tar_shard

from unicom.cli import main
from unicom.data.sources import check_metadata_fields
from unicom.embed import field_array
from unicom.errors import InputError

# what img2dataset's json of a LAION sample holds besides url and caption, one of them without a field
LAION = [
    {"NSFW": "UNLIKELY", "similarity": 0.31, "LICENSE": "?", "status": "success", "width": 40, "original_width": 640},
    {"NSFW": "NSFW", "similarity": 0.28, "LICENSE": "cc-by", "status": "success", "width": 40, "original_width": 480},
    {"NSFW": "UNSURE", "LICENSE": "?", "status": "success", "width": 40, "original_width": 320},
]


def write_laion_shards(root):
    """Two shards of three samples, each sample's json holding its url, caption and :data:`LAION`'s fields."""
    for number in range(2):
        samples = captioned_samples(number, 3)
        for sample, fields in zip(samples, LAION):
            sample["json"] = {**sample["json"], "caption": sample["txt"], "key": sample["key"], **fields}
        write_tar_shard(root / f"{number:05d}.tar", samples)
    return root


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    import timm
    import torch

    root = tmp_path_factory.mktemp("fields")
    write_laion_shards(root / "shards")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), root / "test_vit.pth")
    common = ["--model", "timm/test_vit", "--pretrained", str(root / "test_vit.pth"), "--workers", "0",
              "--dtype", "float32", "--input", str(root / "shards")]
    assert main(["embed", *common, "--out", str(root / "named"), "--metadata-fields", "NSFW,similarity,punsafe"]) == 0
    assert main(["embed", *common, "--out", str(root / "all"), "--metadata-fields", "all"]) == 0
    assert main(["embed", *common, "--out", str(root / "none")]) == 0
    return {"root": root, "common": common}


def test_named_fields_are_metadata_columns_with_the_values_of_each_samples_json(embedded):
    root = embedded["root"]
    for number in range(2):
        table = pq.read_table(root / "named" / "metadata" / f"metadata_{number}.parquet")
        plain = pq.read_table(root / "none" / "metadata" / f"metadata_{number}.parquet")
        assert table.column_names == plain.column_names + ["NSFW", "similarity", "punsafe"]
        assert table.select(plain.column_names).equals(plain)  # the other columns as without the fields
        assert table.column("NSFW").to_pylist() == ["UNLIKELY", "NSFW", "UNSURE"]
        assert table.schema.field("similarity").type == pa.float64()
        assert table.column("similarity").to_pylist() == [0.31, 0.28, None]  # the third sample has none
        assert table.schema.field("punsafe").type == pa.string()  # no sample has it: an empty column
        assert table.column("punsafe").null_count == 3
    config = json.loads((root / "named" / "embed_config.json").read_text())
    assert config["metadata_fields"] == ["NSFW", "similarity", "punsafe"]
    assert "metadata_fields" not in json.loads((root / "none" / "embed_config.json").read_text())


def test_all_keeps_every_field_but_those_the_metadata_has(embedded):
    root = embedded["root"]
    table = pq.read_table(root / "all" / "metadata" / "metadata_0.parquet")
    plain = pq.read_table(root / "none" / "metadata" / "metadata_0.parquet")
    # url, caption, key and width are the metadata's own columns, not replaced by the json's
    assert table.column_names == plain.column_names + ["NSFW", "similarity", "LICENSE", "status", "original_width"]
    assert table.select(plain.column_names).equals(plain)
    assert table.column("original_width").to_pylist() == [640, 480, 320]
    assert table.schema.field("original_width").type == pa.int64()


def test_a_rerun_with_other_fields_is_refused_and_with_the_same_finds_the_parts_done(embedded, capsys):
    root, common = embedded["root"], embedded["common"]
    capsys.readouterr()
    for other in (["--metadata-fields", "NSFW"], []):
        assert main(["embed", *common, "--out", str(root / "named"), *other]) == 2
        assert "holds embeddings of another configuration (metadata_fields: " in capsys.readouterr().err
    assert main(["embed", *common, "--out", str(root / "named"), "--metadata-fields", "NSFW,similarity,punsafe"]) == 0
    assert "(2 of 2 parts were already finished)" in capsys.readouterr().out


def test_parquet_shards_keep_the_same_fields_from_their_columns(embedded, tmp_path):
    from test_parquet_shards import write_img2dataset_parquet

    from unicom.data.shards import read_tar_samples

    root = embedded["root"]
    for number in range(2):
        samples = captioned_samples(number, 3)
        path = write_img2dataset_parquet(tmp_path / "pq" / f"{number:05d}.parquet", samples)
        table = pq.read_table(path)
        for name in ("NSFW", "similarity", "LICENSE"):
            table = table.append_column(name, pa.array([fields.get(name) for fields in LAION]))
        pq.write_table(table, path, row_group_size=2)
        assert [s.key for s in read_tar_samples(root / "shards" / f"{number:05d}.tar")] == table.column("key").to_pylist()
    command = ["embed", *embedded["common"][:-1], str(tmp_path / "pq"), "--out", str(tmp_path / "emb")]
    assert main([*command, "--metadata-fields", "NSFW,similarity,punsafe"]) == 0
    for number in range(2):
        from_pq = pq.read_table(tmp_path / "emb" / "metadata" / f"metadata_{number}.parquet").drop_columns(["shard"])
        from_tars = pq.read_table(root / "named" / "metadata" / f"metadata_{number}.parquet").drop_columns(["shard"])
        assert from_pq.equals(from_tars)
    # every column of the parquet but the images and those the metadata has anyway
    assert main([*command[:-1], str(tmp_path / "emb_all"), "--metadata-fields", "all"]) == 0
    table = pq.read_table(tmp_path / "emb_all" / "metadata" / "metadata_0.parquet")
    assert table.column_names[-5:] == ["status", "error_message", "NSFW", "similarity", "LICENSE"]
    assert "jpg" not in table.column_names
    from unicom.data.sources import open_parts

    for given in (tmp_path / "pq" / "00000.parquet", tmp_path / "pq"):  # one shard alone, or a folder of them
        with pytest.raises(InputError, match="metadata fields url: the metadata has columns of these names already"):
            open_parts(str(given), metadata_fields=["url"])
    with pytest.raises(InputError, match=r"the column 'jpg' holds encoded images \(binary\), which metadata does not keep"):
        from unicom.embed import embed_to_folder

        embed_to_folder(str(tmp_path / "pq"), tmp_path / "emb_jpg", "timm/test_vit", metadata_fields=["jpg"])
    with pytest.raises(InputError, match=r"the column 'jpg' holds encoded images"):  # one shard alone: as early
        open_parts(str(tmp_path / "pq" / "00000.parquet"), metadata_fields=["jpg"])


def test_serve_answers_the_fields_with_each_result_as_clip_retrievals_back_end_does(embedded):
    from fastapi.testclient import TestClient

    from unicom.search.index import Index
    from unicom.search.service import create_app

    root = embedded["root"]
    index = Index.build(root / "named", root / "named_index")
    vectors = np.load(root / "named" / "img_emb" / "img_emb_1.npy")
    with TestClient(create_app(index)) as client:
        answer = client.post("/knn-service", json={"embedding_input": vectors[1].tolist(), "num_images": 1})
        assert answer.status_code == 200, answer.text
        (hit,) = answer.json()  # its similarity is the result's own, as clip-retrieval's back end answers
        assert (hit["caption"], hit["NSFW"], hit["similarity"]) == ("caption 1", "NSFW", pytest.approx(1.0))
        found = client.post("/search", json={"embedding": vectors[1].tolist(), "k": 1})
        assert found.status_code == 200, found.text
        (hit,) = found.json()["results"]
        assert (hit["caption"], hit["NSFW"], hit["similarity"], hit["punsafe"]) == ("caption 1", "NSFW", 0.28, None)


@pytest.mark.parametrize("fields, message", [
    (["url"], "metadata fields url: the metadata has columns of these names already"),
    (["NSFW", "all"], "metadata fields all: the metadata has columns of these names already"),
    (["NSFW", "NSFW"], "metadata fields NSFW,NSFW: give each field once, by name"),
    (["NSFW", ""], "metadata fields NSFW,: give each field once, by name"),
])
def test_fields_the_metadata_has_or_given_twice_are_refused(fields, message):
    with pytest.raises(InputError, match=message):
        check_metadata_fields(fields)


def test_a_lists_own_columns_are_kept_as_fields(embedded, tmp_path, capsys):
    for i in range(3):
        class_image(i, i, 16).save(tmp_path / f"{i}.png")
    (tmp_path / "list.csv").write_text("path,caption,label,category,price,sku\n0.png,a cat,0,pets,1.5,007\n"
                                       "1.png,a dog,1,pets,,008\n2.png,a car,0,cars,3,009\n")
    common = ["--input", str(tmp_path / "list.csv"), "--model", "timm/test_vit", "--workers", "0",
              "--pretrained", str(embedded["root"] / "test_vit.pth")]
    assert main(["embed", *common, "--out", str(tmp_path / "named"), "--metadata-fields", "price,category"]) == 0
    table = pq.read_table(tmp_path / "named" / "metadata" / "metadata_0.parquet")
    assert table.column_names[-2:] == ["price", "category"]
    assert table.column("price").to_pylist() == [1.5, None, 3.0]
    assert table.column("category").to_pylist() == ["pets", "pets", "cars"]
    assert main(["embed", *common, "--out", str(tmp_path / "all"), "--metadata-fields", "all"]) == 0
    table = pq.read_table(tmp_path / "all" / "metadata" / "metadata_0.parquet")
    # every column but those read as the path, caption and label (sku as pyarrow reads a CSV's numbers)
    assert table.column_names == ["key", "caption", "image_path", "width", "height", "occurrence", "label", "category",
                                  "price", "sku"]
    assert table.column("sku").to_pylist() == [7, 8, 9]
    capsys.readouterr()
    assert main(["embed", *common, "--out", str(tmp_path / "bad"), "--metadata-fields", "brand"]) == 2
    assert "list.csv: no column 'brand' (a metadata field named); columns are ['path', 'caption', 'label', 'category', " \
        "'price', 'sku']" in capsys.readouterr().err
    assert main(["embed", *common, "--out", str(tmp_path / "bad"), "--metadata-fields", "label"]) == 2
    assert "metadata fields label: the metadata has columns of these names already" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_fields_are_refused_for_benchmarks(tmp_path, capsys):
    assert main(["embed", "--dataset", "roxford5k", "--root", str(tmp_path), "--model", "timm/test_vit", "--out",
                 str(tmp_path / "emb"), "--metadata-fields", "NSFW"]) == 2
    assert "--metadata-fields name columns of an --input list or parquet shards" in capsys.readouterr().err


def test_a_field_of_values_of_several_kinds_is_kept_as_their_json_text():
    assert field_array([1, "two", None, {"a": 1}]).to_pylist() == ["1", '"two"', None, '{"a": 1}']
    assert field_array([1, 2.5, None]).to_pylist() == [1.0, 2.5, None]
    assert field_array([{"make": "x"}, None]).type == pa.struct([("make", pa.string())])
    assert field_array([None, None]).type == pa.string()
