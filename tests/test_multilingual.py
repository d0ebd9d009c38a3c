"""Multilingual text queries: M-CLIP's and sentence-transformers' multilingual text models
(``unicom.models.multilingual``) against M-CLIP's own model class (the ``multilingual-clip``
package) and the ``sentence-transformers`` package on small models built in the test, and
their use by ``unicom search --multilingual-model``, ``/search``'s ``multilingual`` and
``/knn-service``'s ``use_mclip``, against brute force over the collection."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from support import MULTILINGUAL_CAPTIONS, tiny_mclip, tiny_sentence_transformer

from unicom.cli import main
from unicom.embed import embed_texts
from unicom.errors import InputError
from unicom.models.multilingual import load_multilingual
from unicom.search.index import Index
from unicom.search.service import UNSUPPORTED_HEADER, create_app

from test_index_clip_retrieval import write_collection

DIMS = 16
QUERIES = ["une photo d'un chat", "собака на траве", "一只红色的车", "a red car at night"]


@pytest.fixture(scope="module")
def mclip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mclip") / "model"
    reference, tokenizer = tiny_mclip(folder, dims=DIMS)
    return {"folder": folder, "reference": reference, "tokenizer": tokenizer, "model": load_multilingual(folder)}


def reference_embeddings(mclip, texts: list[str], max_length: int | None = None) -> np.ndarray:
    """M-CLIP's own forward pass (its tokenization, mean over the tokens, projection), unit rows."""
    tokenizer = mclip["tokenizer"]
    tokenize = tokenizer if max_length is None else (
        lambda batch, **options: tokenizer(batch, truncation=True, max_length=max_length, **options))
    with torch.no_grad():
        embedded = mclip["reference"].forward(texts, tokenize)
    return torch.nn.functional.normalize(embedded, dim=-1).numpy()


def copy_model(mclip, target):
    shutil.copytree(mclip["folder"], target)
    return target


def test_texts_in_many_languages_embed_as_m_clip_s_own_model_embeds_them(mclip):
    texts = MULTILINGUAL_CAPTIONS[:5] + ["<pad> un chat", "猫"]  # a text may hold the padding token itself
    assert max(len(ids) for ids in mclip["tokenizer"](texts)["input_ids"]) <= 32  # the reference cuts no text
    expected = reference_embeddings(mclip, texts)
    # in batches of two and of all: the padding each batch adds changes nothing
    for batch_size in (2, 64):
        embedded = embed_texts(mclip["model"], texts, batch_size=batch_size)
        assert embedded.shape == (len(texts), DIMS)
        np.testing.assert_allclose(embedded, expected, atol=2e-6)
    assert mclip["model"].embedding_dim == DIMS and mclip["model"].has_text


def test_a_text_longer_than_the_transformer_s_positions_is_cut_to_them(mclip):
    long = " ".join(MULTILINGUAL_CAPTIONS) * 3
    tokens = mclip["tokenizer"]([long])["input_ids"][0]
    assert len(tokens) > 32  # the small model's 34 positions hold 32 tokens (RoBERTa's start after the padding index)
    assert mclip["model"].max_tokens == 32
    embedded = embed_texts(mclip["model"], [long, "un chien"])
    np.testing.assert_allclose(embedded, reference_embeddings(mclip, [long, "un chien"], max_length=32), atol=2e-6)


def test_safetensors_weights_and_older_checkpoints_load_the_same_model(mclip, tmp_path):
    from safetensors.torch import save_file

    expected = embed_texts(mclip["model"], QUERIES)
    state = torch.load(mclip["folder"] / "pytorch_model.bin", weights_only=True)
    safetensors = copy_model(mclip, tmp_path / "safetensors")
    (safetensors / "pytorch_model.bin").unlink()
    save_file({key: value.contiguous() for key, value in state.items()}, safetensors / "model.safetensors")
    np.testing.assert_array_equal(embed_texts(load_multilingual(safetensors), QUERIES), expected)
    # older transformers versions saved the positions' ids with the weights
    older = copy_model(mclip, tmp_path / "older")
    torch.save({**state, "transformer.embeddings.position_ids": torch.arange(34)[None]}, older / "pytorch_model.bin")
    np.testing.assert_array_equal(embed_texts(load_multilingual(older), QUERIES), expected)


def test_weights_in_shards_load_the_same_model_and_shards_unlike_their_index_are_named(mclip, tmp_path):
    """M-CLIP's weights (a layout transformers does not read) split into shards with transformers'
    index, as save_pretrained writes them: read shard by shard, each checked against the index."""
    from safetensors.torch import save_file

    expected = embed_texts(mclip["model"], QUERIES)
    state = torch.load(mclip["folder"] / "pytorch_model.bin", weights_only=True)
    sharded = copy_model(mclip, tmp_path / "sharded")
    (sharded / "pytorch_model.bin").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({key: state[key].contiguous() for key in keys}, sharded / shard)
    index = {"metadata": {}, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(embed_texts(load_multilingual(sharded), QUERIES), expected)
    first = shards["model-00001-of-00002.safetensors"]
    save_file({key: state[key].contiguous() for key in first[1:]}, sharded / "model-00001-of-00002.safetensors")
    with pytest.raises(InputError, match=rf"model-00001-of-00002.safetensors: no tensor {re.escape(first[0])}, which "
                                         r"model.safetensors.index.json places there"):
        load_multilingual(sharded)
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match=r"its shard model-00001-of-00002.safetensors is not in"):
        load_multilingual(sharded)


def test_a_folder_that_is_not_an_m_clip_model_is_named_with_what_it_lacks(mclip, tmp_path):
    with pytest.raises(InputError, match="no such folder.*hf-hub:M-CLIP/XLM-Roberta-Large-Vit-L-14"):
        load_multilingual(tmp_path / "absent")
    base = mclip["folder"] / "base"  # an XLM-RoBERTa folder: no M-CLIP
    with pytest.raises(InputError, match="model_type 'xlm-roberta', not 'M-CLIP'"):
        load_multilingual(base)
    folder = copy_model(mclip, tmp_path / "config")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({key: value for key, value in config.items() if key != "numDims"}))
    with pytest.raises(InputError, match="config.json: no numDims"):
        load_multilingual(folder)
    (folder / "config.json").write_text(json.dumps({**config, "numDims": 24}))
    with pytest.raises(InputError, match=r"wrong shapes: LinearTransformation.weight \(16, 32\) \(expected \(24, 32\)\)"):
        load_multilingual(folder)
    (folder / "config.json").write_text(json.dumps({**config, "numDims": "16"}))
    with pytest.raises(InputError, match="the projection's sizes are whole numbers above 0"):
        load_multilingual(folder)
    (folder / "config.json").write_text(json.dumps({**config, "transformerDimensions": 48}))
    with pytest.raises(InputError, match="transformerDimensions 48, but .* has 32-wide states"):
        load_multilingual(folder)
    (folder / "config.json").write_text(json.dumps({**config, "modelBase": str(tmp_path / "no-base")}))
    with pytest.raises(InputError, match="modelBase .*no-base.*: its configuration could not be read"):
        load_multilingual(folder)
    (folder / "config.json").write_text(json.dumps(config))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({key: value for key, value in state.items() if not key.startswith("LinearTransformation")},
               folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="missing keys: LinearTransformation.weight, LinearTransformation.bias"):
        load_multilingual(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(InputError, match=r"no weights \(model.safetensors or pytorch_model.bin, whole or in shards"):
        load_multilingual(folder)


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentence-transformers") / "model"
    return {"folder": folder, "reference": tiny_sentence_transformer(folder, dims=DIMS, bias=True, tanh=True)}


def sentence_reference(model, texts: list[str]) -> np.ndarray:
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def test_a_sentence_transformers_model_embeds_texts_as_the_package_embeds_them(sentence_model, tmp_path):
    texts = MULTILINGUAL_CAPTIONS[5:10] + ["<pad> un chat", " ".join(MULTILINGUAL_CAPTIONS)]  # the last cut to 20 tokens
    model = load_multilingual(sentence_model["folder"])
    assert model.max_tokens == 20 and model.embedding_dim == DIMS
    for batch_size in (3, 64):
        np.testing.assert_allclose(embed_texts(model, texts, batch_size=batch_size),
                                   sentence_reference(sentence_model["reference"], texts), atol=2e-6)
    # clip-ViT-B-32-multilingual-v1's Dense: no bias, no activation
    plain = tiny_sentence_transformer(tmp_path / "plain", dims=DIMS, seed=3)
    np.testing.assert_allclose(embed_texts(load_multilingual(tmp_path / "plain"), texts),
                               sentence_reference(plain, texts), atol=2e-6)


def test_the_layout_of_sentence_transformers_before_5_loads_as_the_package_loads_it(sentence_model, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    older = copy_model({"folder": sentence_model["folder"]}, tmp_path / "older")
    (older / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    (older / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": True}))
    (older / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    for folder in (older, older / "2_Dense"):  # the weights as PyTorch files
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    texts = MULTILINGUAL_CAPTIONS[:4] + ["Une PHOTO d'un Chat", " ".join(MULTILINGUAL_CAPTIONS)]
    model = load_multilingual(older)
    assert model.max_tokens == 12 and model.lowercase
    np.testing.assert_array_equal(*embed_texts(model, ["Une PHOTO d'un Chat", "une photo d'un chat"]))
    np.testing.assert_allclose(embed_texts(model, texts), sentence_reference(SentenceTransformer(str(older)), texts),
                               atol=2e-6)


def test_sentence_transformers_modules_that_are_not_read_are_named(sentence_model, tmp_path):
    folder = copy_model({"folder": sentence_model["folder"]}, tmp_path / "cls")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"}))
    with pytest.raises(InputError, match="pooling 'cls'; only the mean of the token states"):
        load_multilingual(folder)
    folder = copy_model({"folder": sentence_model["folder"]}, tmp_path / "gelu")
    dense = json.loads((folder / "2_Dense" / "config.json").read_text())
    (folder / "2_Dense" / "config.json").write_text(json.dumps({**dense, "activation_function": "torch.nn.modules.activation.GELU"}))
    with pytest.raises(InputError, match="activation_function 'torch.nn.modules.activation.GELU'"):
        load_multilingual(folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules + [{"path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(InputError, match=r"modules \['Transformer', 'Pooling', 'Dense', 'LayerNorm'\]"):
        load_multilingual(folder)


def test_a_checkpoint_holding_python_objects_is_refused_unread(mclip, tmp_path):
    folder = copy_model(mclip, tmp_path / "pickled")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({"state": state, "note": InputError("a Python object")}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="holds Python objects besides tensors.*not unpickled"):
        load_multilingual(folder)


def test_without_transformers_the_error_says_what_to_install(mclip, monkeypatch):
    for name in [name for name in sys.modules if name == "transformers" or name.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r"need the transformers package.*pip install 'unicom\[multilingual\]'"):
        load_multilingual(mclip["folder"])


def test_the_text_model_embeds_no_images(mclip):
    with pytest.raises(InputError, match="embeds texts only"):
        mclip["model"].encode_image(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------- search and serve


@pytest.fixture(scope="module")
def collection(tmp_path_factory, mclip):
    """A collection of 16-d image and caption embeddings (clip-retrieval's layout), no model recorded."""
    root = tmp_path_factory.mktemp("multilingual-index")
    parts = write_collection(root / "emb", {0: 40, 1: 30}, d=DIMS)
    index = Index.build(root / "emb", root / "index", layout="clip-retrieval", index_type="flat")
    return {"root": root, "index": index, "images": np.concatenate([parts[0][0], parts[1][0]]),
            "texts": np.concatenate([parts[0][1], parts[1][1]])}


def ranked(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return np.argsort(-(vectors @ query), kind="stable")[:k].tolist()


def test_the_command_searches_with_the_multilingual_model(mclip, collection, capsys):
    expected = reference_embeddings(mclip, QUERIES[:2])
    code = main(["search", "--index", str(collection["root"] / "index"), "--text", QUERIES[0], "--text", QUERIES[1],
                 "--multilingual-model", str(mclip["folder"]), "-k", "5", "--json"])
    assert code == 0
    answers = json.loads(capsys.readouterr().out)
    for answer, query in zip(answers, expected):
        assert [hit["id"] for hit in answer["results"]] == ranked(collection["images"], query, 5)
        np.testing.assert_allclose([hit["score"] for hit in answer["results"]],
                                   np.sort(collection["images"] @ query)[::-1][:5], atol=1e-5)
    # the caption embeddings, with --modality text
    code = main(["search", "--index", str(collection["root"] / "index"), "--text", QUERIES[2], "--modality", "text",
                 "--multilingual-model", str(mclip["folder"]), "-k", "4", "--json"])
    assert code == 0
    query = reference_embeddings(mclip, QUERIES[2:3])[0]
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)[0]["results"]] == ranked(collection["texts"], query, 4)


def test_the_command_refuses_a_multilingual_model_without_texts_or_of_other_dimensions(mclip, collection, tmp_path, capsys):
    index = str(collection["root"] / "index")
    assert main(["search", "--index", index, "--like", "3", "--multilingual-model", str(mclip["folder"])]) == 2
    assert "--multilingual-model embeds the --text" in capsys.readouterr().err
    other = tmp_path / "other"
    tiny_mclip(other, dims=DIMS + 8)
    assert main(["search", "--index", index, "--text", "un chat", "--multilingual-model", str(other)]) == 2
    assert "gives 24-dimensional text embeddings, but" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(mclip, collection):
    with_model = TestClient(create_app(collection["index"], multilingual=mclip["model"]))
    without = TestClient(create_app(collection["index"]))
    return {"with": with_model, "without": without}


def test_search_embeds_texts_with_the_multilingual_model(served, mclip, collection):
    client = served["with"]
    for text, query in zip(QUERIES, reference_embeddings(mclip, QUERIES)):
        for body in ({"text": text, "k": 6, "multilingual": True}, {"text": text, "k": 6}):  # its only text model
            answer = client.post("/search", json=body)
            assert answer.status_code == 200, answer.text
            assert [hit["id"] for hit in answer.json()["results"]] == ranked(collection["images"], query, 6)
    query = reference_embeddings(mclip, QUERIES[1:2])[0]
    answer = client.post("/search", files={"text": (None, QUERIES[1]), "multilingual": (None, "true"), "k": (None, "5"),
                                           "modality": (None, "text")})
    assert answer.status_code == 200, answer.text
    assert [hit["id"] for hit in answer.json()["results"]] == ranked(collection["texts"], query, 5)
    health = client.get("/healthz").json()
    assert health["multilingual"] is True and health["text_search"] is True and health["image_search"] is False


def test_a_multilingual_text_combines_with_an_item(served, mclip, collection):
    text = reference_embeddings(mclip, QUERIES[:1])[0]
    mixed = 0.6 * collection["images"][9] + 0.4 * text
    answer = served["with"].post("/search", json={"like": 9, "text": QUERIES[0], "text_weight": 0.4, "multilingual": True})
    assert answer.status_code == 200, answer.text
    assert [hit["id"] for hit in answer.json()["results"]] == ranked(collection["images"], mixed / np.linalg.norm(mixed), 10)


def test_knn_service_honours_use_mclip(served, mclip, collection):
    query = reference_embeddings(mclip, QUERIES[3:4])[0]
    body = {"text": QUERIES[3], "use_mclip": True, "num_images": 7, "modality": "image"}
    answer = served["with"].post("/knn-service", content=json.dumps(body))
    assert answer.status_code == 200, answer.text
    assert UNSUPPORTED_HEADER not in answer.headers
    assert [hit["id"] for hit in answer.json()] == ranked(collection["images"], query, 7)
    np.testing.assert_allclose([hit["similarity"] for hit in answer.json()],
                               np.sort(collection["images"] @ query)[::-1][:7], atol=1e-5)


def test_without_a_multilingual_model_the_server_says_so(served):
    client = served["without"]
    answer = client.post("/search", json={"text": "un chat", "multilingual": True})
    assert answer.status_code == 400
    assert "has no multilingual text model (start the server with --multilingual-model" in answer.json()["detail"]
    answer = client.post("/search", json={"embedding": [0.25] * DIMS, "multilingual": True})  # refused, not ignored
    assert answer.status_code == 400 and "has no multilingual text model" in answer.json()["detail"]
    assert client.get("/healthz").json()["multilingual"] is False
    # clip-retrieval's front end sends use_mclip from its box: named as unsupported; here no model embeds the text at all
    answer = client.post("/knn-service", content=json.dumps({"text": "un chat", "use_mclip": True}))
    assert answer.status_code == 400 and "no model to embed texts" in answer.json()["detail"]
    answer = client.post("/knn-service", content=json.dumps({"embedding_input": [0.25] * DIMS, "use_mclip": True,
                                                             "text": ""}))
    assert answer.status_code == 200 and UNSUPPORTED_HEADER not in answer.headers


def test_the_server_refuses_a_multilingual_model_of_other_dimensions(mclip, collection, tmp_path):
    other = tmp_path / "other"
    tiny_mclip(other, dims=DIMS * 2)
    with pytest.raises(InputError, match="gives 32-dimensional text embeddings, but .* 16-dimensional ones"):
        create_app(collection["index"], multilingual=load_multilingual(other))


def test_beside_the_collection_s_own_text_tower_the_multilingual_model_embeds_the_texts_that_ask_for_it(tmp_path):
    from support import clip_collection_with_texts

    from unicom.models.encoders import load_encoder

    text = QUERIES[0]
    found = clip_collection_with_texts(tmp_path / "clip", [text])  # a tiny open_clip CLIP, 32-d
    mclip = {"folder": tmp_path / "mclip"}
    mclip["reference"], mclip["tokenizer"] = tiny_mclip(mclip["folder"], dims=32)
    own, multilingual = found["texts"][0], reference_embeddings(mclip, [text])[0]
    assert ranked(found["stored"], own, 5) != ranked(found["stored"], multilingual, 5)  # the two models tell apart
    client = TestClient(create_app(found["index"], load_encoder(found["spec"]), multilingual=load_multilingual(mclip["folder"])))
    for body, query in (({"text": text, "k": 5}, own), ({"text": text, "k": 5, "multilingual": True}, multilingual)):
        answer = client.post("/search", json=body)
        assert answer.status_code == 200, answer.text
        assert [hit["id"] for hit in answer.json()["results"]] == ranked(found["stored"], query, 5)
    for use_mclip, query in ((False, own), (True, multilingual)):
        answer = client.post("/knn-service", content=json.dumps({"text": text, "use_mclip": use_mclip, "num_images": 5}))
        assert answer.status_code == 200, answer.text
        assert [hit["id"] for hit in answer.json()] == ranked(found["stored"], query, 5)


HUB_LOAD = """
import json, sys
import numpy as np
from unicom.embed import embed_texts
from unicom.models.multilingual import load_multilingual

texts = json.loads(sys.argv[-2])
np.save(sys.argv[-1], np.stack([embed_texts(load_multilingual(spec), texts) for spec in ("hf-hub:org/mclip", "hf-hub:org/st")]))
"""


@pytest.mark.slow
def test_models_on_the_hub_load_and_then_load_offline(mclip, sentence_model, tmp_path):
    from test_hf_hub import COMMIT, online_then_offline

    files = {path.name: path.read_bytes() for path in mclip["folder"].iterdir() if path.is_file()}
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "modelBase": "org/xlm-roberta-small"}).encode()  # a Hub name
    base = {"config.json": (mclip["folder"] / "base" / "config.json").read_bytes()}  # its configuration alone
    # a sentence-transformers model's files, its modules' in folders
    nested = {path.relative_to(sentence_model["folder"]).as_posix(): path.read_bytes()
              for path in sentence_model["folder"].rglob("*") if path.is_file()}
    repos = {"org/mclip": files, "org/xlm-roberta-small": base, "org/st": nested}
    hub, ((online, _), (offline, _)) = online_then_offline(repos, HUB_LOAD, [json.dumps(QUERIES)], tmp_path)
    assert {path for _, path in hub.requests if "/resolve/" in path} >= {
        "/org/mclip/resolve/main/config.json", "/org/xlm-roberta-small/resolve/main/config.json",
        f"/org/st/resolve/{COMMIT}/2_Dense/model.safetensors"}
    np.testing.assert_allclose(online[0], reference_embeddings(mclip, QUERIES), atol=2e-6)
    np.testing.assert_allclose(online[1], sentence_reference(sentence_model["reference"], QUERIES), atol=2e-6)
    np.testing.assert_array_equal(offline, online)  # the second run, the Hub gone


# ---------------------------------------------------------------------- unicom embed --text-model


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Two shards whose captions are in several languages (one of them broken: no image), a tiny
    open_clip CLIP (32-d) and an M-CLIP model into 32 dimensions."""
    from support import class_image, encode_image, tiny_open_clip, write_tar_shard

    root = tmp_path_factory.mktemp("embed-text-model")
    captions = {}
    for number in range(2):
        samples = []
        for i, caption in enumerate(MULTILINGUAL_CAPTIONS[number * 7:number * 7 + 7]):
            key = f"{number}-{i}"
            image = b"\xff\xd8\xff\xe0 truncated" if (number, i) == (1, 2) else encode_image(class_image(i, number * 10 + i, 40))
            samples.append({"key": key, "jpg": image, "txt": caption})
            captions[key] = caption
        write_tar_shard(root / "shards" / f"{number:05d}.tar", samples)
    mclip = {"folder": root / "mclip"}
    mclip["reference"], mclip["tokenizer"] = tiny_mclip(mclip["folder"], dims=32)
    return {"root": root, "spec": tiny_open_clip(root / "clip"), "mclip": mclip, "captions": captions,
            "input": str(root / "shards" / "{00000..00001}.tar")}


def embed(captioned, out, *extra) -> int:
    return main(["embed", "--input", captioned["input"], "--model", captioned["spec"], "--modalities", "image,text",
                 "--out", str(out), "--dtype", "float32", "--batch-size", "4", *extra])


def stored(out, kind: str) -> tuple[np.ndarray, list[str]]:
    import pyarrow.parquet as pq

    vectors = np.concatenate([np.load(out / f"{kind}_emb" / f"{kind}_emb_{n}.npy") for n in range(2)])
    keys = [row["key"] for n in range(2) for row in pq.read_table(out / "metadata" / f"metadata_{n}.parquet").to_pylist()]
    return vectors, keys


@pytest.mark.parametrize("workers", ["0", "2"])
def test_embed_writes_the_captions_as_the_text_model_embeds_them_and_the_images_as_before(captioned, tmp_path, workers):
    out = tmp_path / "EMB"
    assert embed(captioned, out, "--text-model", str(captioned["mclip"]["folder"]), "--workers", workers) == 0
    texts, keys = stored(out, "text")
    assert len(keys) == 13  # the broken image's sample is left out of both
    np.testing.assert_allclose(texts, reference_embeddings(captioned["mclip"], [captioned["captions"][k] for k in keys]),
                               atol=2e-6)
    plain = tmp_path / "plain"  # the images as the model alone embeds them
    assert embed(captioned, plain, "--workers", workers) == 0
    np.testing.assert_array_equal(stored(out, "img")[0], stored(plain, "img")[0])
    assert not np.allclose(stored(plain, "text")[0], texts, atol=1e-2)  # its own text tower gives others
    config = json.loads((out / "embed_config.json").read_text())
    assert config["text_model"] == str(captioned["mclip"]["folder"])
    assert config["text_model_sha256"] == load_multilingual(captioned["mclip"]["folder"]).weights_sha256()
    assert config["weights_sha256"] == json.loads((plain / "embed_config.json").read_text())["weights_sha256"]


def test_embed_refuses_to_mix_captions_of_another_text_model(captioned, tmp_path, capsys):
    out = tmp_path / "EMB"
    folder = str(captioned["mclip"]["folder"])
    assert embed(captioned, out, "--text-model", folder, "--workers", "0") == 0
    capsys.readouterr()
    assert embed(captioned, out, "--workers", "0") == 2  # the model's own text tower now
    assert "text_model: " in capsys.readouterr().err
    other = tmp_path / "other"  # the same folder name, other weights
    shutil.copytree(folder, other)
    state = torch.load(other / "pytorch_model.bin", weights_only=True)
    torch.save({key: value + 0.01 if key.startswith("LinearTransformation") else value for key, value in state.items()},
               other / "pytorch_model.bin")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    for kind in ("img_emb", "text_emb", "metadata"):  # an unfinished part, to embed again with the other weights
        next((moved / kind).glob("*_1.*")).unlink()
    config = json.loads((moved / "embed_config.json").read_text())
    (moved / "embed_config.json").write_text(json.dumps({**config, "text_model": str(other)}))
    assert embed(captioned, moved, "--text-model", str(other), "--workers", "0") == 2
    assert "text_model_sha256" in capsys.readouterr().err


def test_embed_refuses_a_text_model_without_captions_or_of_other_dimensions(captioned, mclip, tmp_path, capsys):
    code = main(["embed", "--input", captioned["input"], "--model", captioned["spec"], "--out", str(tmp_path / "a"),
                 "--text-model", str(mclip["folder"])])
    assert code == 2 and "--text-model embeds the captions: give --modalities image,text" in capsys.readouterr().err
    assert embed(captioned, tmp_path / "b", "--text-model", str(mclip["folder"]), "--workers", "0") == 2  # 16-d into 32-d
    assert "gives 16-dimensional text embeddings" in capsys.readouterr().err


# ------------------------------------- the captions' text model, recorded by the index


@pytest.fixture(scope="module")
def recorded(captioned, tmp_path_factory):
    """The captioned shards embedded with ``--text-model`` and indexed: the index records the
    text model; the reference rankings of its caption embeddings."""
    root = tmp_path_factory.mktemp("recorded-text-model")
    assert embed(captioned, root / "EMB", "--text-model", str(captioned["mclip"]["folder"]), "--workers", "0") == 0
    assert main(["index", "--emb", str(root / "EMB"), "--out", str(root / "index"), "--type", "flat",
                 "--layout", "clip-retrieval"]) == 0
    return {"root": root, "index": root / "index", "texts": stored(root / "EMB", "text")[0]}


def own_text_tower(captioned, texts: list[str]) -> np.ndarray:
    from unicom.models.encoders import load_encoder

    return embed_texts(load_encoder(captioned["spec"]), texts)


def assert_ranked(ids: list[int], vectors: np.ndarray, query: np.ndarray, k: int) -> None:
    """``ids`` rank ``vectors`` by similarity to ``query`` as :func:`ranked` does, but for the
    order of equal scores, which the index's search leaves to faiss: captions that the small
    tokenizer cuts into the same pieces (unknown characters) have the same embedding."""
    scores = vectors @ query
    assert len(set(ids)) == len(ids) == k
    np.testing.assert_allclose(scores[ids], np.sort(scores)[::-1][:k], atol=1e-6)


def search_ids(index, *options: str, capsys) -> list[int]:
    assert main(["search", "--index", str(index), "--modality", "text", "-k", "5", "--json", *options]) == 0
    return [hit["id"] for hit in json.loads(capsys.readouterr().out)[0]["results"]]


def test_the_index_records_the_captions_text_model_and_search_uses_it_when_asked(captioned, recorded, capsys):
    folder = captioned["mclip"]["folder"]
    config = json.loads((recorded["index"] / "index.json").read_text())
    assert config["text_model"] == {"spec": str(folder), "weights_sha256": load_multilingual(folder).weights_sha256()}
    assert main(["index", "--emb", str(recorded["root"] / "EMB"), "--out", str(recorded["root"] / "again"),
                 "--type", "flat"]) == 0  # the command says so
    assert f"captions embedded by the text model {folder} (its multilingual queries' model)" in capsys.readouterr().out
    multilingual = reference_embeddings(captioned["mclip"], QUERIES[:1])[0]
    own = own_text_tower(captioned, QUERIES[:1])[0]
    assert ranked(recorded["texts"], multilingual, 5) != ranked(recorded["texts"], own, 5)  # the two models tell apart
    assert_ranked(search_ids(recorded["index"], "--text", QUERIES[0], "--multilingual", capsys=capsys),
                  recorded["texts"], multilingual, 5)
    # without --multilingual, the collection's model's own text tower, as before
    assert_ranked(search_ids(recorded["index"], "--text", QUERIES[0], capsys=capsys), recorded["texts"], own, 5)
    assert main(["search", "--index", str(recorded["index"]), "--text", QUERIES[0], "--multilingual",
                 "--multilingual-model", "none"]) == 2
    assert "--multilingual asks for a multilingual model and --multilingual-model none" in capsys.readouterr().err


def test_search_without_a_recorded_text_model_names_what_to_give(mclip, collection, capsys):
    assert main(["search", "--index", str(collection["root"] / "index"), "--text", "un chat", "--multilingual"]) == 2
    assert "records no multilingual text model (its captions were not embedded with `unicom embed --text-model`)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_serve_loads_the_recorded_text_model_unless_told_none(captioned, recorded):
    import httpx
    from test_serve_live import started_serve

    query = reference_embeddings(captioned["mclip"], QUERIES[1:2])[0]
    body = {"text": QUERIES[1], "use_mclip": True, "num_images": 5, "modality": "text"}
    for options, multilingual in (((), True), (("--multilingual-model", "none"), False)):
        process, url = started_serve("--index", str(recorded["index"]), *options)
        try:
            health = httpx.get(url + "/healthz").json()
            assert health["multilingual"] is multilingual
            assert health["multilingual_model"] == (f"M-CLIP {captioned['mclip']['folder']}" if multilingual else None)
            answer = httpx.post(url + "/knn-service", content=json.dumps(body))
            assert answer.status_code == 200, answer.text
            expected = query if multilingual else own_text_tower(captioned, QUERIES[1:2])[0]
            assert_ranked([hit["id"] for hit in answer.json()], recorded["texts"], expected, 5)
            assert (UNSUPPORTED_HEADER in answer.headers) is not multilingual
        finally:
            process.terminate()
            _, errors = process.communicate(timeout=30)
        assert ("multilingual text queries embedded by M-CLIP" in errors) is multilingual


def test_a_recorded_text_model_with_other_weights_or_gone_is_refused_named(captioned, recorded, tmp_path, capsys):
    other = copy_model(captioned["mclip"], tmp_path / "changed")
    state = torch.load(other / "pytorch_model.bin", weights_only=True)
    torch.save({key: value + 0.01 if key.startswith("LinearTransformation") else value for key, value in state.items()},
               other / "pytorch_model.bin")
    index = tmp_path / "index"
    shutil.copytree(recorded["index"], index)
    config = json.loads((index / "index.json").read_text())
    for spec, message in ((other, "now has other weights (sha256"), (tmp_path / "gone", "its captions were embedded by "
                                                                    f"the text model {tmp_path / 'gone'}, which")):
        (index / "index.json").write_text(json.dumps({**config, "text_model": {**config["text_model"], "spec": str(spec)}}))
        assert main(["search", "--index", str(index), "--text", QUERIES[0], "--multilingual"]) == 2
        assert message in capsys.readouterr().err
        assert main(["serve", "--index", str(index)]) == 2
        error = capsys.readouterr().err
        assert message in error and "--multilingual-model none" in error
    # --multilingual-model none: the model's own text tower, the record unread
    own = own_text_tower(captioned, QUERIES[:1])[0]
    assert_ranked(search_ids(index, "--text", QUERIES[0], "--multilingual-model", "none", capsys=capsys),
                  recorded["texts"], own, 5)


def test_an_index_without_a_model_of_its_own_embeds_texts_with_the_recorded_text_model(captioned, recorded, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(recorded["index"], index)
    config = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**config, "model": None}))  # as a collection embedded elsewhere
    query = reference_embeddings(captioned["mclip"], QUERIES[2:3])[0]
    assert_ranked(search_ids(index, "--text", QUERIES[2], capsys=capsys), recorded["texts"], query, 5)
    assert main(["search", "--index", str(index), "--text", QUERIES[2], "--multilingual-model", "none"]) == 2
    assert "does not record the model of its embeddings; pass --model" in capsys.readouterr().err
