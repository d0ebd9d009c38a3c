"""Text, combined and "more like this" queries: the CLI, `/search` and `/knn-service` against
brute force with open_clip's own embeddings of a tiny CLIP whose random weights are saved."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from unicom.cli import main
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.search.service import create_app

from support import brute_force, clip_image_collection, encode_image, indexed_image_collection, open_clip_reference, stored_embeddings

TEXTS = ["a red car", "a dog on a beach", "stripes"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    found = clip_image_collection(tmp_path_factory.mktemp("clip"))
    model, preprocess, tokenizer = open_clip_reference(found["spec"])
    with torch.no_grad():
        texts = model.encode_text(tokenizer(TEXTS)).numpy()
        images = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in found["images"]])).numpy()
    encoder = load_encoder(found["spec"])
    with TestClient(create_app(found["index"], encoder)) as client:
        yield {**found, "client": client, "encoder": encoder, "stored": stored_embeddings(found["emb"]),
               "text_embeddings": texts, "image_embeddings": images}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def test_the_cli_answers_texts_as_brute_force_with_the_models_text_embedding(clip, capsys):
    code = main(["search", "--index", str(clip["index"].path), "--text", TEXTS[0], "--text", TEXTS[1], "-k", "5", "--json"])
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert [entry["query"] for entry in answer] == [repr(TEXTS[0]), repr(TEXTS[1])]
    for entry, text in zip(answer, clip["text_embeddings"]):
        scores, ids = brute_force(clip["stored"], text, 5)
        assert [hit["id"] for hit in entry["results"]] == ids.tolist()
        np.testing.assert_allclose([hit["score"] for hit in entry["results"]], scores, atol=1e-5)


def test_search_json_text_equals_brute_force(clip):
    response = clip["client"].post("/search", json={"text": TEXTS[2], "k": 6})
    assert response.status_code == 200
    answer = response.json()
    scores, ids = brute_force(clip["stored"], clip["text_embeddings"][2], 6)
    assert [hit["id"] for hit in answer["results"]] == ids.tolist()
    np.testing.assert_allclose([hit["score"] for hit in answer["results"]], scores, atol=1e-5)
    # as many decimals as tell the scores apart
    digits = answer["score_digits"]
    shown = [f"{hit['score']:.{digits}f}" for hit in answer["results"]]
    assert len(set(shown)) == len({float(s) for s in scores}) and 3 <= digits <= 6


def test_knn_service_text_equals_brute_force_in_clip_retrievals_shape(clip):
    body = {"text": TEXTS[0], "modality": "image", "num_images": 3, "num_result_ids": 8, "indice_name": "index",
            "deduplicate": False, "use_safety_model": False, "use_violence_detector": False, "aesthetic_score": "",
            "aesthetic_weight": "0.5", "use_mclip": False}
    # clip-retrieval's front end posts JSON as text/plain
    response = clip["client"].post("/knn-service", content=json.dumps(body), headers={"content-type": "text/plain;charset=UTF-8"})
    assert response.status_code == 200 and "X-Unsupported-Options" not in response.headers
    results = response.json()
    scores, ids = brute_force(clip["stored"], clip["text_embeddings"][0], 8)
    assert [result["id"] for result in results] == ids.tolist()
    np.testing.assert_allclose([result["similarity"] for result in results], scores, atol=1e-5)
    # the first num_images come with their metadata and the image as base64 JPEG
    first = results[0]
    assert first["image_path"] == str(clip["images"][ids[0]]) and first["key"].endswith(".jpg")
    thumbnail = Image.open(__import__("io").BytesIO(base64.b64decode(first["image"])))
    assert thumbnail.format == "JPEG"
    assert all("image" not in result and set(result) == {"id", "similarity"} for result in results[3:])


def test_an_image_and_a_text_combine_with_the_text_weight(clip):
    path, weight = clip["images"][7], 0.3
    query = unit((1 - weight) * unit(clip["image_embeddings"][7]) + weight * unit(clip["text_embeddings"][1]))
    scores, ids = brute_force(clip["stored"], query, 5)
    png = encode_image(Image.open(path), "PNG")  # the same pixels
    response = clip["client"].post("/search", files={"image": ("q.png", png, "image/png")},
                                   data={"text": TEXTS[1], "text_weight": str(weight), "k": "5"})
    assert response.status_code == 200
    hits = response.json()["results"]
    assert [hit["id"] for hit in hits] == ids.tolist()
    np.testing.assert_allclose([hit["score"] for hit in hits], scores, atol=1e-4)


def test_the_cli_combines_an_item_with_a_text(clip, capsys):
    weight = 0.6
    query = unit((1 - weight) * unit(clip["stored"][3]) + weight * unit(clip["text_embeddings"][0]))
    scores, ids = brute_force(clip["stored"], query, 4)
    code = main(["search", "--index", str(clip["index"].path), "--like", "3", "--text", TEXTS[0],
                 "--text-weight", str(weight), "-k", "4", "--json"])
    assert code == 0
    entry = json.loads(capsys.readouterr().out)[0]
    assert entry["query"] == f"item 3 + {TEXTS[0]!r} (text weight 0.6)"
    assert [hit["id"] for hit in entry["results"]] == ids.tolist()


def test_more_like_this_searches_with_the_stored_item(clip):
    response = clip["client"].post("/search", json={"like": 11, "k": 4})
    assert response.status_code == 200
    hits = response.json()["results"]
    scores, ids = brute_force(clip["stored"], clip["stored"][11], 4)
    assert hits[0]["id"] == 11 and [hit["id"] for hit in hits] == ids.tolist()
    np.testing.assert_allclose([hit["score"] for hit in hits], scores, atol=1e-5)
    missing = clip["client"].post("/search", json={"like": 24})
    assert missing.status_code == 404 and missing.json()["detail"] == "no item 24 in this index (ids 0..23)"


def test_conflicting_or_empty_queries_are_400(clip):
    client = clip["client"]
    both = client.post("/search", json={"like": 1, "embedding": [0.1] * 32})
    assert both.status_code == 400 and "not like and embedding" in both.json()["detail"]
    nothing = client.post("/search", json={"text": "  ", "k": 3})
    assert nothing.status_code == 400 and nothing.json()["detail"].startswith("nothing to search for")
    typo = client.post("/search", json={"txt": "a red car"})
    assert typo.status_code == 400 and typo.json()["detail"].startswith("txt: unknown key; the keys are text, image, like")
    weight = client.post("/search", json={"text": "a", "like": 1, "text_weight": 2})
    assert weight.status_code == 400 and "text_weight must be between 0 and 1, got 2.0" in weight.json()["detail"]


# --------------------------------------------------------------------------- models without a text tower


@pytest.fixture(scope="module")
def image_only(tmp_path_factory):
    return indexed_image_collection(tmp_path_factory.mktemp("image_only"))


def test_a_model_without_a_text_tower_is_refused_with_its_name_and_reason(image_only):
    with TestClient(create_app(image_only["index"], image_only["encoder"])) as client:
        response = client.post("/search", json={"text": "a red car"})
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert "timm/test_vit" in detail and "timm's image models have no text tower" in detail
        knn = client.post("/knn-service", json={"text": "a red car", "modality": "image", "num_images": 5, "indice_name": None})
        assert knn.status_code == 400 and "has none (timm's image models have no text tower)" in knn.json()["detail"]
        health = client.get("/healthz").json()
        assert health["text_search"] is False and "no text tower" in health["indices"][0]["text_search_reason"]


def test_the_cli_refuses_a_text_for_a_model_without_a_text_tower(image_only, capsys):
    code = main(["search", "--index", str(image_only["index"].path), "--text", "a red car"])
    assert code == 2
    assert "has none (timm's image models have no text tower)" in capsys.readouterr().err


def test_a_unifex_neck_that_keeps_the_backbone_space_embeds_texts(clip, tmp_path):
    import torch.nn.functional as F

    from unicom.models.export import save_model
    from unicom.unifex.model import UniFExModel, unifex_settings

    preprocess = {"size": 32, "resize_mode": "shortest", "interpolation": "bicubic",
                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    pooled = unifex_settings(clip["spec"], None, 32, {"kind": "pooling", "embedding_dim": 16})
    save_model(tmp_path / "pooling", UniFExModel(pooled), "unifex", pooled, preprocess, embedding_dim=16)
    encoder = load_encoder(str(tmp_path / "pooling"))
    assert encoder.has_text
    with torch.no_grad():
        got = encoder.encode_text(encoder.tokenize(TEXTS)).numpy()
    # pooling 32 -> 16 averages neighbouring pairs of the normalised text embedding
    normalised = F.normalize(torch.from_numpy(clip["text_embeddings"]), dim=-1).numpy()
    np.testing.assert_allclose(got, normalised.reshape(3, 16, 2).mean(axis=2), atol=1e-6)

    linear = unifex_settings(clip["spec"], None, 32, {"kind": "linear", "embedding_dim": 16})
    save_model(tmp_path / "linear", UniFExModel(linear), "unifex", linear, preprocess, embedding_dim=16)
    projected = load_encoder(str(tmp_path / "linear"))
    assert not projected.has_text
    assert "linear neck projects" in projected.no_text_reason and clip["spec"] in projected.no_text_reason


# --------------------------------------------------------------------------- the weights of the model


@pytest.fixture(scope="module")
def unsaved(tmp_path_factory):
    """A collection embedded by a tiny CLIP with random weights that were never saved."""
    return clip_image_collection(tmp_path_factory.mktemp("unsaved"), weights=False)


def test_an_index_of_unsaved_random_weights_is_queried_by_the_same_network_built_again(unsaved, capsys):
    """A model without weights is built seeded (the same network at every load of the same
    library versions), so the smoke-test collection it embedded can be searched without saving it."""
    rebuilt = load_encoder(unsaved["spec"])
    assert rebuilt.weights_sha256() == unsaved["index"].config["model"]["weights_sha256"]
    assert main(["search", "--index", str(unsaved["index"].path), "--text", "a red car", "-k", "1", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert len(reply) == 1 and len(reply[0]["results"]) == 1
    create_app(unsaved["index"], rebuilt)


def test_an_index_of_random_weights_that_the_installed_library_builds_otherwise_says_what_to_do(unsaved, tmp_path, capsys):
    """As if timm or open_clip drew random weights otherwise since the collection was embedded
    (another version): the recorded digest is another one's."""
    import shutil

    folder = shutil.copytree(unsaved["index"].path, tmp_path / "index")
    config = json.loads((folder / "index.json").read_text())
    config["model"]["weights_sha256"] = "0" * 64
    (folder / "index.json").write_text(json.dumps(config))
    assert main(["search", "--index", str(folder), "--text", "a red car"]) == 2
    err = capsys.readouterr().err
    assert f"the collection was embedded by {unsaved['spec']} with weights sha256 0000000000000000…" in err
    assert ("if those were random weights (no --pretrained), they are not the ones built now (another timm or open_clip "
            "version builds them otherwise, and earlier unicom versions drew them unseeded): save the model's weights, "
            "embed the collection with them and index it again") in err


def test_the_same_saved_weights_pass_and_other_weights_are_refused(clip, tmp_path, capsys):
    from support import tiny_open_clip

    other = tiny_open_clip(tmp_path / "other", seed=1)
    code = main(["search", "--index", str(clip["index"].path), "--model", other, "--text", "a red car"])
    assert code == 2
    assert f"Query with the weights that embedded it (--model {clip['spec']})" in capsys.readouterr().err
    assert main(["search", "--index", str(clip["index"].path), "--text", "a red car", "-k", "1"]) == 0


def test_an_index_of_a_unicom_vit_refuses_texts_naming_the_network(tmp_path):
    from unicom.embed import embed_to_folder
    from unicom.models.unicom_vit import ViTSettings
    from unicom.search.index import Index

    from support import random_unicom_vit, write_class_folder

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=2, mlp_dim=128, embedding_dim=16)
    checkpoint = tmp_path / "FP16-ViT-tiny.pt"
    torch.save({k: v.half() for k, v in random_unicom_vit(settings).state_dict().items()}, checkpoint)
    write_class_folder(tmp_path / "images", [0, 1], per_class=2, size=40)
    embed_to_folder([str(tmp_path / "images")], tmp_path / "emb", str(checkpoint), num_workers=0, dtype="float32")
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    with TestClient(create_app(index, load_encoder(str(checkpoint)))) as client:
        response = client.post("/search", json={"text": "a red car"})
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert str(checkpoint) in detail and "(its UnicomViT network embeds images only)" in detail
        # its images are still answered
        assert client.post("/search", json={"like": 0, "k": 2}).json()["results"][0]["id"] == 0


def test_resuming_an_embedding_with_other_weights_is_refused(tmp_path):
    from unicom.embed import embed_to_folder

    from support import tiny_open_clip, write_class_folder

    spec = tiny_open_clip(tmp_path / "clip", seed=1)
    write_class_folder(tmp_path / "images", [0, 1], per_class=4)
    embed_to_folder([str(tmp_path / "images")], tmp_path / "emb", spec, rows_per_part=4, num_workers=0)
    (tmp_path / "emb" / "metadata" / "metadata_1.parquet").unlink()  # as if the run had been killed
    (tmp_path / "clip" / "open_clip_pytorch_model.bin").unlink()  # the folder's weights replaced meanwhile
    assert tiny_open_clip(tmp_path / "clip", seed=2) == spec
    with pytest.raises(InputError, match=r"weights_sha256: '[0-9a-f]{64}' before, '[0-9a-f]{64}' now"):
        embed_to_folder([str(tmp_path / "images")], tmp_path / "emb", spec, rows_per_part=4, num_workers=0)
