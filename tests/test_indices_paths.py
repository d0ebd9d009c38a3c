"""`unicom serve --indices-paths`: clip-retrieval's indices_paths.json (clip back's
configuration), read as clip back reads it, its clip_model names turned into open_clip's
(checked against open_clip's own list of weights), and a server started from it answering
clip-retrieval's API with each index's model and columns."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from unicom.cli import main
from unicom.errors import InputError
from unicom.search.index import Index
from unicom.search.indices_paths import OPENAI_MODELS, clip_model_spec, mclip_spec, read_indices_paths
from unicom.search.service import HIT_KEYS

from support import brute_force, clip_collection_with_texts
from test_index_clip_retrieval import write_collection
from test_serve_live import started_serve


def write(tmp_path, content) -> str:
    path = tmp_path / "indices_paths.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_each_entry_is_a_folder_or_clip_back_s_options(tmp_path):
    entries = read_indices_paths(write(tmp_path, {
        "laion5B": {"indice_folder": "laion5B-index", "clip_model": "ViT-L/14", "enable_mclip_option": True,
                    "provide_safety_model": True, "enable_faiss_memory_mapping": True, "use_arrow": True,
                    "enable_hdf5": False, "reorder_metadata_by_ivf_index": False, "columns_to_return": ["url", "caption"]},
        "mine": "/data/my_index"}))
    assert list(entries) == ["laion5B", "mine"]  # the file's order: the first is the default index
    laion = entries["laion5B"]
    assert (laion.folder, laion.model, laion.multilingual, laion.columns, laion.server_options) == (
        "laion5B-index", ("ViT-L-14", "openai"), "hf-hub:M-CLIP/XLM-Roberta-Large-Vit-L-14", ("url", "caption"),
        ("provide_safety_model",))
    mine = entries["mine"]  # the options of the entry before do not carry over
    assert (mine.folder, mine.model, mine.multilingual, mine.columns, mine.server_options) == (
        "/data/my_index", None, None, None, ())
    # clip back's default model is ViT-B/32, and so its M-CLIP model
    assert mclip_spec(None) == "hf-hub:M-CLIP/XLM-Roberta-Large-Vit-B-32"


def test_clip_models_are_named_as_open_clip_names_them():
    import open_clip

    listed = set(open_clip.list_pretrained())
    for name in OPENAI_MODELS:  # OpenAI's clip.load names: open_clip has each with OpenAI's weights
        assert clip_model_spec(name) in listed, name
    assert clip_model_spec("ViT-L/14@336px") == ("ViT-L-14-336", "openai")
    assert clip_model_spec("open_clip:ViT-B-32/laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    # without a tag, the one clip-retrieval's loader takes
    assert clip_model_spec("open_clip:ViT-B-16") == ("ViT-B-16", dict(open_clip.list_pretrained())["ViT-B-16"])
    assert clip_model_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == (
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    assert clip_model_spec("hf_clip:patrickjohncyh/fashion-clip") == ("hf-hub:patrickjohncyh/fashion-clip", None)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    (["a", "b"], "expected a JSON object of index names and folders"),
    ({}, "expected a JSON object of index names and folders"),
    ({"a": 3}, "'a': give the index folder, or an object of options"),
    ({"a/b": "x"}, "an index name is a word without '/'"),
    ({"a": {"clip_model": "ViT-B/32"}}, "'a': no indice_folder"),
    ({"a": {"indice_folder": "x", "colums_to_return": ["url"]}}, "unknown option 'colums_to_return'"),
    ({"a": {"indice_folder": "x", "use_arrow": "yes"}}, "use_arrow is true or false"),
    ({"a": {"indice_folder": "x", "columns_to_return": "url"}}, "columns_to_return is a list of metadata column names"),
    ({"a": {"indice_folder": "x", "clip_model": "nm:mgoin/CLIP-ViT-B-32-laion2b_s34b_b79k-ds"}},
     "is not one this server loads"),
    ({"a": {"indice_folder": "x", "clip_model": "open_clip:no-such-net"}}, "open_clip has no weights for 'no-such-net'"),
    ({"a": {"indice_folder": "x", "clip_model": "RN50", "enable_mclip_option": True}}, "M-CLIP has a model for"),
])
def test_a_file_clip_back_would_not_read_is_refused_naming_the_entry_and_key(tmp_path, content, message):
    with pytest.raises(InputError, match="--indices-paths .*" + message.replace("(", r"\(").replace("'", ".")):
        read_indices_paths(write(tmp_path, content))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tiny open_clip CLIP's collection whose index records no model (as clip-retrieval's do),
    and a collection of captions with key, caption and url columns in clip-retrieval's layout."""
    root = tmp_path_factory.mktemp("indices-paths")
    clip = clip_collection_with_texts(root / "clip", ["a red car", "stripes"])
    shutil.copytree(clip["index"].path, root / "photos")
    config = json.loads((root / "photos" / "index.json").read_text())
    (root / "photos" / "index.json").write_text(json.dumps({**config, "model": None}))
    parts = write_collection(root / "emb", {0: 20, 1: 10}, d=16)
    Index.build(root / "emb", root / "captions", layout="clip-retrieval", index_type="flat")
    vectors = np.concatenate([parts[0][0], parts[1][0]])
    return {"root": root, "clip": clip, "vectors": vectors}


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_server_started_from_the_file_serves_each_index_with_its_model_and_columns(two, tmp_path):
    clip = two["clip"]
    path = write(tmp_path, {
        "photos": {"indice_folder": str(two["root"] / "photos"), "clip_model": "open_clip:" + clip["spec"],
                   "enable_hdf5": False, "use_jit": True},
        "captions": {"indice_folder": str(two["root"] / "captions"), "columns_to_return": ["url"],
                     "provide_safety_model": True}})
    process, url = started_serve("--indices-paths", path)
    try:
        assert httpx.get(url + "/indices-list").json() == ["photos", "captions"]
        # the text embedded by clip_model's model: the index records none
        answer = httpx.post(url + "/knn-service", json={"text": "a red car", "indice_name": "photos", "num_images": 5,
                                                        "modality": "image"})
        assert answer.status_code == 200, answer.text
        assert [hit["id"] for hit in answer.json()] == brute_force(clip["stored"], clip["texts"][0], 5)[1].tolist()
        assert "image_path" in answer.json()[0]  # every column without columns_to_return
        query = two["vectors"][3]
        answer = httpx.post(url + "/knn-service", json={"embedding_input": query.tolist(), "indice_name": "captions",
                                                        "num_images": 4})
        assert answer.status_code == 200, answer.text
        assert [hit["id"] for hit in answer.json()] == brute_force(two["vectors"], query, 4)[1].tolist()
        assert [sorted(hit) for hit in answer.json()] == [["id", "similarity", "url"]] * 4
        answer = httpx.post(url + "/metadata", json={"ids": [0, 25], "indice_name": "captions"})
        assert [item["metadata"] for item in answer.json()] == [{"url": "https://x/p0-r0.jpg"},
                                                               {"url": "https://x/p1-r5.jpg"}]
        answer = httpx.post(url + "/search", json={"like": 3, "k": 3, "index": "captions"})
        assert answer.status_code == 200, answer.text
        assert {key for hit in answer.json()["results"] for key in hit} == {*HIT_KEYS, "url"}
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
    assert "captions: provide_safety_model is given by --safety-column" in errors


def test_the_file_s_mistakes_stop_the_server_before_it_starts(two, tmp_path, capsys):
    path = write(tmp_path, {"captions": {"indice_folder": str(two["root"] / "captions"),
                                         "columns_to_return": ["url", "NSFW"]}})
    assert main(["serve", "--indices-paths", path]) == 2
    assert "captions: columns_to_return names 'NSFW', which its metadata lacks (its columns: " in capsys.readouterr().err
    assert main(["serve", "--indices-paths", path, "--index", f"captions={two['root'] / 'captions'}"]) == 2
    assert "--index captions: the name is taken by --indices-paths" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "no index to serve: give --index DIR (or --indices-paths" in capsys.readouterr().err
    assert main(["serve", "--indices-paths", str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
