"""`unicom index` and `unicom search` on a small real collection embedded by a saved random timm model."""

from __future__ import annotations

import json
import re

import pytest

from unicom.cli import main
from unicom.commands.search import format_table
from unicom.errors import InputError
from unicom.formats.embeddings import write_part
from unicom.models.encoders import load_encoder
from unicom.search.index import Index

from support import embedded_image_collection


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    found = embedded_image_collection(root)
    assert main(["index", "--emb", str(found["emb"]), "--out", str(root / "index")]) == 0
    return {**found, "index": root / "index"}


def test_index_command_builds_an_index_that_records_its_model(collection, capsys):
    index = Index.load(collection["index"])
    assert len(index) == 24 and index.type == "flat"
    recorded = dict(index.config["model"])
    digest = recorded.pop("weights_sha256")
    assert recorded == {"spec": "timm/test_vit", "pretrained": str(collection["checkpoint"].resolve())}
    # the digest of the weights: the same for the file loaded again
    assert digest == load_encoder("timm/test_vit", str(collection["checkpoint"])).weights_sha256()


def test_search_prints_the_query_image_itself_first(collection, capsys):
    query = collection["images"][9]  # class_001/0003.jpg
    code = main(["search", "--index", str(collection["index"]), "--model", "timm/test_vit",
                 "--pretrained", str(collection["checkpoint"]), str(query), "-k", "3"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{query}:"
    assert lines[1].split()[:3] == ["rank", "score", "key"]
    rank, score, key, *_ = lines[2].split()
    assert (rank, key) == ("1", "class_001/0003.jpg") and float(score) == pytest.approx(1.0, abs=1e-4)
    assert str(query) in lines[2] and len(lines) == 5


def test_search_json_lists_every_query_with_its_results(collection, capsys):
    first, second = collection["images"][0], collection["images"][20]
    code = main(["search", "--index", str(collection["index"]), str(first), str(second), "-k", "2", "--json"])
    assert code == 0  # the model comes from the index's record
    answer = json.loads(capsys.readouterr().out)
    assert [entry["query"] for entry in answer] == [str(first), str(second)]
    top = [entry["results"][0] for entry in answer]
    assert [hit["id"] for hit in top] == [0, 20]
    assert [hit["image_path"] for hit in top] == [str(first), str(second)]
    assert [hit["rank"] for hit in answer[0]["results"]] == [1, 2]
    assert answer[0]["results"][0]["score"] >= answer[0]["results"][1]["score"]


def test_the_table_has_one_line_per_result_whatever_its_keys_and_paths_hold():
    hits = [{"rank": 1, "score": 0.5, "id": 0, "key": 'p0\n"x\tü', "caption": "two\nlines", "image_path": "/data/a\rb.jpg"},
            {"rank": 2, "score": 0.25, "id": 1, "key": "plain", "caption": None, "url": "https://host/b.jpg"}]
    lines = format_table(hits).splitlines()
    assert len(lines) == 3
    assert re.split(r"\s{2,}", lines[1]) == ["1", "0.500", 'p0\\n"x\\tü', "two lines", "/data/a\\rb.jpg"]
    assert lines[2].split() == ["2", "0.250", "plain", "https://host/b.jpg"]


def test_the_table_names_the_shard_of_a_result_that_has_no_path_or_url():
    # webdataset keys repeat across shards: the shard tells the two results apart
    hits = [{"rank": 1, "score": 0.5, "id": 0, "key": "000001", "caption": "a", "shard": "00000.tar"},
            {"rank": 2, "score": 0.25, "id": 7, "key": "000001", "caption": "b", "shard": "00003.tar"},
            {"rank": 3, "score": 0.125, "id": 9, "key": "000002", "caption": "c", "shard": "00003.tar", "url": "https://host/c.jpg"}]
    lines = format_table(hits).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["rank", "score", "key", "caption", "path, url or shard"]
    assert [re.split(r"\s{2,}", line)[-1] for line in lines[1:]] == ["00000.tar", "00003.tar", "https://host/c.jpg"]


def test_the_table_prints_control_characters_of_captions_as_text_not_terminal_commands():
    # a caption that would clear the screen and turn the terminal red, or rub out what was printed
    hits = [{"rank": 1, "score": 0.5, "id": 0, "key": "a", "caption": "\x1b[2J\x1b[31mred car\x08\x08\x08boat\x00"}]
    lines = format_table(hits).splitlines()
    assert re.split(r"\s{2,}", lines[1]) == ["1", "0.500", "a", "\\x1b[2J\\x1b[31mred car\\x08\\x08\\x08boat\\x00"]
    assert all(character.isprintable() for character in "".join(lines))


def test_a_missing_query_file_is_named_before_the_model_loads(collection, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    code = main(["search", "--index", str(collection["index"]), "--model", "timm/no_such_net", str(missing)])
    assert code == 2
    assert f"{missing}: file not found" in capsys.readouterr().err


def test_a_query_image_too_thin_for_the_models_resize_is_named_by_its_file(collection, tmp_path, capsys):
    from PIL import Image

    line = tmp_path / "line.png"
    Image.new("RGB", (1, 5000), (9, 9, 9)).save(line)  # test_vit resizes the short side to 168: 168 x 840,000 pixels
    code = main(["search", "--index", str(collection["index"]), str(collection["images"][0]), str(line)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{line}: a 1x5000 image: resizing its short side to 168 would make 141,120,000 pixels" in err


def test_a_folder_given_as_a_query_image_says_to_give_its_files(collection, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    code = main(["search", "--index", str(collection["index"]), str(folder)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"unicom search: error: {folder}: a folder; a query is one image file (give several: {folder}/*.jpg)")


def test_the_help_says_what_search_takes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "query an index with images, texts or indexed items" in " ".join(capsys.readouterr().out.split())


@pytest.mark.filterwarnings("ignore:timm/test_resnet")
def test_a_model_of_another_dimension_is_refused(collection, capsys):
    code = main(["search", "--index", str(collection["index"]), "--model", "timm/test_resnet", str(collection["images"][0])])
    assert code == 2
    err = capsys.readouterr().err
    assert "was built from 64-dimensional ones; query with the model that embedded the collection (timm/test_vit)" in err


def test_index_command_adds_new_parts_on_a_second_run(collection, tmp_path, capsys):
    import shutil

    import numpy as np
    import pyarrow as pa

    shutil.copytree(collection["emb"], tmp_path / "emb")
    out = tmp_path / "index"
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(out), "--dims", "32"]) == 0
    capsys.readouterr()
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(out)]) == 0
    assert "up to date (24 vectors" in capsys.readouterr().out
    rows = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    write_part(tmp_path / "emb", 3, image=rows, metadata=pa.table({"key": [f"new{i}" for i in range(5)]}))
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "added parts [3]" in printed and "flat index (Flat) of 29 vectors, 32 dimensions" in printed
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(out), "--dims", "16"]) == 2
    assert "keeps 32 dimensions, not --dims 16" in capsys.readouterr().err


def test_the_summary_after_adding_parts_names_the_rows_its_recall_was_measured_on(tmp_path, capsys):
    import numpy as np

    rows = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=rows[:300])
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--type", "hnsw"]) == 0
    assert "on 30 held-out rows (target 0.9)" in capsys.readouterr().out  # a tenth of 300
    write_part(tmp_path / "emb", 1, image=rows[300:])
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--hnsw-m", "16"]) == 2
    assert "it was built with M 32, not --hnsw-m 16" in capsys.readouterr().err
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--hnsw-m", "32"]) == 0
    selection = Index.load(tmp_path / "index").config["selection"]
    assert (selection["heldout"], selection["heldout_after_add"]) == (30, 10)
    assert f"recall@10 {selection['recall']:.4f} on 10 held-out rows of the added parts" in capsys.readouterr().out


def test_the_command_that_built_an_index_adds_new_parts_to_it_when_run_again(tmp_path, capsys):
    import numpy as np

    rows = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=rows[:300])
    # the type is left to choose: 300 rows are searched exactly, and the options of the other types go unused
    command = ["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--nlist", "8", "--pq-m", "4",
               "--nbits", "6", "--hnsw-m", "16"]
    assert main(command) == 0
    assert Index.load(tmp_path / "index").type == "flat"
    write_part(tmp_path / "emb", 1, image=rows[300:])
    assert main(command) == 0
    assert "added parts [1] to" in capsys.readouterr().out
    assert len(Index.load(tmp_path / "index")) == 400
    # a type asked for by name has its own options: one it has no use for asks for another index
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "hnsw"), "--type", "hnsw"]) == 0
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "hnsw"), "--nlist", "8"]) == 2
    assert "a hnsw index has no nlist, which --nlist 8 sets" in capsys.readouterr().err


def test_a_type_asked_for_by_name_refuses_build_options_it_has_no_use_for(tmp_path, capsys):
    import numpy as np

    write_part(tmp_path / "emb", 0, image=np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    emb = ["index", "--emb", str(tmp_path / "emb")]
    for options, said in ((["--type", "flat", "--nlist", "8"], "--type flat has no use for --nlist (of the build options it takes none"),
                          (["--type", "hnsw", "--nlist", "8", "--pq-m", "4"], "--type hnsw has no use for --nlist, --pq-m (of the build options it takes --hnsw-m)"),
                          (["--type", "ivfsq", "--nbits", "6"], "--type ivfsq has no use for --nbits (of the build options it takes --nlist)"),
                          (["--type", "ivfpq", "--hnsw-m", "16"], "--type ivfpq has no use for --hnsw-m")):
        assert main([*emb, "--out", str(tmp_path / "index"), *options]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "index").exists()
    # the options of the type asked for are taken
    assert main([*emb, "--out", str(tmp_path / "index"), "--type", "hnsw", "--hnsw-m", "8"]) == 0
    assert Index.load(tmp_path / "index").config["params"]["M"] == 8


def test_index_command_refuses_options_of_another_index_than_the_one_it_holds(collection, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "--emb", str(collection["emb"]), "--out", str(out), "--type", "flat"]) == 0
    capsys.readouterr()
    for options, said in ((["--layout", "clip-retrieval"], "its layout is unicom, not --layout clip-retrieval"),
                          (["--type", "hnsw"], "it is a flat index, not --type hnsw"),
                          (["--memory", "1MB"], "it was built without a memory budget, not --memory 1MB"),
                          (["--target-recall", "0.99"], "it was built for recall 0.9, not --target-recall 0.99"),
                          (["-k", "50"], "its recall is measured at k 10, not -k 50"),
                          (["--nlist", "8"], "a flat index has no nlist, which --nlist 8 sets"),
                          (["--hnsw-m", "16"], "a flat index has no M, which --hnsw-m 16 sets")):
        assert main(["index", "--emb", str(collection["emb"]), "--out", str(out), *options]) == 2
        assert said in capsys.readouterr().err
    assert not (out / "image.index").exists()
    # the options it was built with are the same index: nothing new to add
    assert main(["index", "--emb", str(collection["emb"]), "--out", str(out), "--layout", "unicom", "--type", "flat",
                 "--target-recall", "0.9", "-k", "10"]) == 0
    assert "up to date (24 vectors" in capsys.readouterr().out
    assert main(["index", "--emb", str(collection["emb"]), "--out", str(out), "--layout", "clip-retrieval", "--rebuild"]) == 0
    assert (out / "image.index").is_file() and Index.load(out).layout == "clip-retrieval"


def test_search_images_takes_the_collections_model_only(collection):
    index = Index.load(collection["index"])
    same = load_encoder("timm/test_vit", str(collection["checkpoint"]))
    _, ids = index.search_images(same, [collection["images"][9]], k=1)
    assert ids.tolist() == [[9]]
    with pytest.warns(UserWarning, match="random weights"):
        other = load_encoder("timm/test_vit")  # the same network and size, other weights
    assert other.embedding_dim == same.embedding_dim
    with pytest.raises(InputError, match="the collection was embedded by timm/test_vit .* has other weights"):
        index.search_images(other, [collection["images"][9]], k=1)
