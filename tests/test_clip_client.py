"""clip-retrieval's own ``ClipClient`` against `unicom serve` on a loopback socket, called as its
README shows; its answers are checked against the index searched directly.

The client is clip-retrieval's ``clip_client.py`` as released (it needs only ``requests``),
unpacked by ``scripts/install-clip-front.sh``; the tests skip when it is absent.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from unicom.embed import embed_to_folder
from unicom.models.encoders import load_encoder
from unicom.search.index import Index
from unicom.search.service import create_app

from support import LiveServer, brute_force, captioned_samples, open_clip_reference, tiny_open_clip, write_tar_shard

REPOSITORY = Path(__file__).resolve().parents[1]
CLIP_RETRIEVAL_VERSION = "2.45.0"
CLIP_CLIENT = REPOSITORY / ".cache" / "clip-retrieval-client" / CLIP_RETRIEVAL_VERSION / "clip_client.py"


def _clip_client_module():
    if not CLIP_CLIENT.is_file():
        subprocess.run(["bash", str(REPOSITORY / "scripts" / "install-clip-front.sh")],
                       env={**os.environ, "PYTHON": sys.executable, "CLIP_RETRIEVAL_VERSION": CLIP_RETRIEVAL_VERSION},
                       check=False, timeout=300)
    if not CLIP_CLIENT.is_file():
        pytest.skip(f"clip-retrieval's ClipClient is not in {CLIP_CLIENT}: run scripts/install-clip-front.sh")
    pytest.importorskip("requests")
    # the module itself, not the package: clip_retrieval/__init__.py imports its whole back end
    spec = importlib.util.spec_from_file_location("clip_client", CLIP_CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_client():
    return _clip_client_module()


@pytest.fixture(scope="module")
def served(tmp_path_factory, clip_client):
    """Three shards of 8 captioned samples with urls, embedded (images and captions) by a tiny
    CLIP into a clip-retrieval layout index ``laion`` (image.index and text.index), served with
    its shards for thumbnails and with image URLs allowed."""
    root = tmp_path_factory.mktemp("clip-client")
    spec = tiny_open_clip(root / "clip")
    for number in range(3):
        write_tar_shard(root / "shards" / f"{number:05d}.tar", captioned_samples(number, 8))
    embed_to_folder([str(root / "shards")], root / "emb", spec, modalities=("image", "text"), num_workers=0,
                    dtype="float32")
    index = Index.build(root / "emb", root / "index", layout="clip-retrieval")
    app = create_app({"laion": index}, load_encoder(spec), shards=root / "shards", allow_image_urls=True)
    with LiveServer(app) as url:
        yield {"url": url, "index": index, "spec": spec, "root": root, "emb": root / "emb"}


def client(served, clip_client, modality="IMAGE", **options):
    """A ClipClient as clip-retrieval's README makes one (its defaults ask for filters this server lacks)."""
    settings = dict(num_images=5, aesthetic_score=9, use_safety_model=True, use_violence_detector=True, deduplicate=False)
    settings.update(options)
    return clip_client.ClipClient(url=served["url"] + "/knn-service", indice_name="laion",
                                  modality=getattr(clip_client.Modality, modality), **settings)


def stored(served, folder: str) -> np.ndarray:
    parts = sorted((served["emb"] / folder).glob("*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return np.concatenate([np.load(p) for p in parts]).astype(np.float32)


def sample(item_id: int) -> tuple[int, int]:
    """(shard, position) of an id: 8 samples per shard, in order."""
    return divmod(item_id, 8)


def test_a_text_query_answers_the_nearest_images_with_their_caption_url_and_picture(served, clip_client):
    import base64
    import io

    import torch
    from PIL import Image

    results = client(served, clip_client).query(text="caption 3")
    model, _, tokenizer = open_clip_reference(served["spec"])
    with torch.no_grad():
        query = model.encode_text(tokenizer(["caption 3"]))[0].numpy()
    scores, ids = brute_force(stored(served, "img_emb"), query, 5)
    assert [result["id"] for result in results] == ids.tolist()
    np.testing.assert_allclose([result["similarity"] for result in results], scores, atol=1e-5)
    for result in results:
        shard, position = sample(result["id"])
        assert result["caption"] == f"caption {position}"
        assert result["url"] == f"https://example.org/{shard}/{position}.jpg"
        assert Image.open(io.BytesIO(base64.b64decode(result["image"]))).size == (40, 40)  # the sample's image, as JPEG


def test_an_image_file_finds_itself_first(served, clip_client, tmp_path):
    query = tmp_path / "query.jpg"
    query.write_bytes(captioned_samples(1, 8)[3]["jpg"])  # id 11
    results = client(served, clip_client).query(image=str(query))
    scores, ids = brute_force(stored(served, "img_emb"), stored(served, "img_emb")[11], 5)
    assert [result["id"] for result in results] == ids.tolist() and results[0]["id"] == 11
    np.testing.assert_allclose([result["similarity"] for result in results], scores, atol=1e-4)


def test_an_image_url_is_fetched_by_the_server(served, clip_client, tmp_path):
    (tmp_path / "query.jpg").write_bytes(captioned_samples(2, 8)[6]["jpg"])  # id 22

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        try:
            results = client(served, clip_client).query(image=f"http://127.0.0.1:{files.server_address[1]}/query.jpg")
        finally:
            files.shutdown()
    assert results[0]["id"] == 22 and results[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_an_embedding_is_searched_in_the_image_or_the_caption_embeddings(served, clip_client):
    images, captions = stored(served, "img_emb"), stored(served, "text_emb")
    query = captions[13] + 0.2 * images[2]  # not a unit vector: the similarity is the cosine
    results = client(served, clip_client, "IMAGE").query(embedding_input=query.tolist())
    scores, ids = brute_force(images, query, 5)
    assert [result["id"] for result in results] == ids.tolist()
    np.testing.assert_allclose([result["similarity"] for result in results], scores, atol=1e-5)
    # each shard has the captions "caption 0".."caption 7": ids 5, 13 and 21 share one caption embedding
    results = client(served, clip_client, "TEXT").query(embedding_input=query.tolist())
    scores, _ = brute_force(captions, query, 5)
    np.testing.assert_allclose([result["similarity"] for result in results], scores, atol=1e-5)
    assert sorted(result["id"] for result in results[:3]) == [5, 13, 21]
    assert {result["caption"] for result in results[:3]} == {"caption 5"}


def test_deduplicate_leaves_out_near_copies_and_still_answers_num_images(served, clip_client):
    # the captions "caption 3" of the three shards are the same text: one caption embedding, three times
    captions = stored(served, "text_emb")
    everything = client(served, clip_client, "TEXT", num_images=3).query(embedding_input=captions[3].tolist())
    assert sorted(result["id"] for result in everything) == [3, 11, 19]
    unique = client(served, clip_client, "TEXT", num_images=3, deduplicate=True).query(embedding_input=captions[3].tolist())
    assert len(unique) == 3 and unique[0]["caption"] == "caption 3"
    assert len({3, 11, 19} & {result["id"] for result in unique}) == 1  # the copies are left out
    assert len({result["caption"] for result in unique}) == 3


def test_errors_come_back_as_a_detail_the_caller_can_read(served, clip_client):
    answer = clip_client.ClipClient(url=served["url"] + "/knn-service", indice_name="laion5B-L-14").query(text="a cat")
    assert answer == {"detail": "indice_name 'laion5B-L-14': no such index; the indexes are laion"}


def test_through_a_reverse_proxy_under_a_prefix_the_answers_are_those_of_the_server(served, clip_client, tmp_path):
    from test_serve_prefix import PREFIX, PrefixProxy

    query = tmp_path / "query.jpg"
    query.write_bytes(captioned_samples(1, 8)[3]["jpg"])  # id 11
    asks = [dict(text="caption 3"), dict(image=str(query)), dict(embedding_input=stored(served, "text_emb")[5].tolist())]
    direct = [client(served, clip_client).query(**ask) for ask in asks]
    with PrefixProxy(served["url"]) as url:
        proxied = [client({**served, "url": url}, clip_client).query(**ask) for ask in asks]
        missing = clip_client.ClipClient(url=url + "/knn-service", indice_name="nope").query(text="a cat")
    assert url.endswith(PREFIX)
    assert [[r["id"] for r in answer] for answer in proxied] == [[r["id"] for r in answer] for answer in direct]
    assert proxied == direct  # captions, urls, similarities and the pictures themselves
    assert missing == {"detail": "indice_name 'nope': no such index; the indexes are laion"}


def test_its_default_aesthetic_rating_and_violence_detector_are_honoured_with_laions_files(served, clip_client, tmp_path):
    """ClipClient asks by default for aesthetic_score 9 at weight 0.5, the violence detector and
    deduplication:
    with LAION's files for the model given to the server, its answer is clip-retrieval's back
    end's: the text's embedding + 0.5 x rating 9's, re-normalised, and no result whose nearest
    violence prompt is prompt 1 (replaced by the next ones)."""
    import torch

    from unicom.search.queries import load_aesthetic_embeddings, load_violence_prompts, near_duplicates

    rng = np.random.default_rng(5)
    (tmp_path / "aesthetic").mkdir()
    ratings = rng.normal(size=(10, 32)).astype(np.float32)
    ratings /= np.linalg.norm(ratings, axis=1, keepdims=True)
    for rating in range(10):
        np.save(tmp_path / "aesthetic" / f"rating{rating}.npy", ratings[rating][None, :])
    images = stored(served, "img_emb")
    prompts = np.stack([images[:12].mean(0), images[12:].mean(0)]).astype(np.float32)  # prompt 1 marks the later ids
    np.save(tmp_path / "violence.npy", prompts)
    app = create_app({"laion": served["index"]}, load_encoder(served["spec"]), shards=served["root"] / "shards",
                     aesthetic_embeddings=load_aesthetic_embeddings(str(tmp_path / "aesthetic")),
                     violence_prompts=load_violence_prompts(str(tmp_path / "violence.npy")))
    with LiveServer(app) as url:
        results = clip_client.ClipClient(url=url + "/knn-service", indice_name="laion", num_images=6).query(
            text="caption 3")
    model, _, tokenizer = open_clip_reference(served["spec"])
    with torch.no_grad():
        text = model.encode_text(tokenizer(["caption 3"]))[0].numpy()
    query = text / np.linalg.norm(text) + 0.5 * ratings[9]
    scores, ids = brute_force(images, query / np.linalg.norm(query), len(images))
    violent = np.argmax(images @ prompts.T, axis=1) == 1
    assert 0 < violent.sum() < len(images) - 6

    def kept(candidates):  # ClipClient also asks to deduplicate: near copies and violent results go
        left_out = near_duplicates(images[candidates]) | violent[candidates]
        return candidates[~left_out].tolist()

    expected = kept(ids[:12])  # the server reads twice num_images, then all 24 when fewer than 6 remain
    expected = expected if len(expected) >= 6 else kept(ids)
    assert [result["id"] for result in results] == expected[:6]
    assert set(expected[:6]).isdisjoint(np.flatnonzero(violent))
