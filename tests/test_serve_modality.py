"""`/search`'s ``modality``: the caption embeddings of an index that holds them (clip-retrieval's
text.index), searched by embedding, by item and from a form, against brute force over the
stored caption embeddings; `/healthz` says which an index has."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from unicom.search.index import Index
from unicom.search.service import create_app

from test_index_clip_retrieval import write_collection


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("modality")
    parts = write_collection(root / "emb", {0: 40, 1: 30})
    images = np.concatenate([parts[0][0], parts[1][0]])
    texts = np.concatenate([parts[0][1], parts[1][1]])
    both = Index.build(root / "emb", root / "both", layout="clip-retrieval", index_type="flat")
    only_images = Index.build(root / "emb", root / "images", index_type="flat")
    client = TestClient(create_app({"both": both, "images": only_images}))
    return {"client": client, "images": images, "texts": texts}


def form(**fields) -> dict:
    """Multipart form fields, as the page sends them."""
    return {key: (None, value) for key, value in fields.items()}


def ranked(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return np.argsort(-(vectors @ query), kind="stable")[:k].tolist()


def test_healthz_names_the_embeddings_each_index_searches(served):
    health = served["client"].get("/healthz").json()
    assert {entry["name"]: entry["modalities"] for entry in health["indices"]} == {"both": ["image", "text"],
                                                                                  "images": ["image"]}


def test_the_caption_embeddings_are_searched_by_embedding_item_and_form(served):
    client, images, texts = served["client"], served["images"], served["texts"]
    query = texts[12] + 0.3 * images[50]
    query = query / np.linalg.norm(query)
    for modality, vectors in ((None, images), ("image", images), ("text", texts)):
        body = {"embedding": query.tolist(), "k": 6, **({"modality": modality} if modality else {})}
        answer = client.post("/search", json=body)
        assert answer.status_code == 200, answer.text
        assert [hit["id"] for hit in answer.json()["results"]] == ranked(vectors, query, 6)
    # more like item 7, by its caption: its own caption embedding searches the captions
    answer = client.post("/search", files=form(like="7", k="5", modality="text"))
    assert answer.status_code == 200, answer.text
    assert [hit["id"] for hit in answer.json()["results"]] == ranked(texts, texts[7], 5)
    assert answer.json()["results"][0]["caption"] == "caption p0-r7"
    answer = client.post("/search", files=form(like="7", k="5"))  # by its image, as before
    assert [hit["id"] for hit in answer.json()["results"]] == ranked(images, images[7], 5)


@pytest.mark.parametrize("index, modality, message", [
    ("images", "text", "modality 'text': images searches image embeddings only; search modality 'image', or build the "
                       "index with `unicom index --layout clip-retrieval`"),
    ("both", "audio", "modality 'audio': both searches image and text embeddings only"),
])
def test_a_modality_the_index_does_not_hold_is_refused(served, index, modality, message):
    for request in ({"json": {"like": 1, "modality": modality, "index": index}},
                    {"files": form(like="1", modality=modality, index=index)}):
        answer = served["client"].post("/search", **request)
        assert answer.status_code == 400 and message in answer.json()["detail"]
