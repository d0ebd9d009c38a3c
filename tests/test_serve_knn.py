"""clip-retrieval's back-end API on `unicom serve`, near-duplicate removal, several indexes, OpenAPI."""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import socket
import threading

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from unicom.formats.embeddings import write_part
from unicom.search.index import Index
from unicom.search.queries import near_duplicates, score_digits
from unicom.search.service import MAX_METADATA_IDS, create_app
from unicom.search.uploads import MAX_REDIRECTS

from storage_servers import QuietHandler, serve
from support import indexed_image_collection


def plane(angle_degrees: float, axis: int, dims: int = 8) -> np.ndarray:
    """A unit vector at ``angle_degrees`` from e0 towards e_axis."""
    v = np.zeros(dims, dtype=np.float32)
    v[0], v[axis] = math.cos(math.radians(angle_degrees)), math.sin(math.radians(angle_degrees))
    return v


# A chain 0 - 1 - 2 (17° apart: cosine 0.956, above clip-retrieval's 0.94; 0 and 2 are 34°
# apart, cosine 0.83, linked only through 1), 3 and its near copy 4 (0.5° apart), and 5.
CHAIN = np.stack([plane(0, 1), plane(17, 1), plane(34, 1), plane(60, 2), plane(60.5, 2), plane(80, 3)])


def test_near_duplicates_drop_every_later_member_of_a_linked_group():
    assert near_duplicates(CHAIN).tolist() == [False, True, True, False, True, False]
    # with a stricter threshold only the near copy goes
    assert near_duplicates(CHAIN, threshold=0.99).tolist() == [False, False, False, False, True, False]


def _groups_by_union_find(vectors: np.ndarray, threshold: float) -> list[bool]:
    """The reference: every pair linked by its inner product, groups by union-find, later members repeat."""
    parent = list(range(len(vectors)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    similar = vectors @ vectors.T >= threshold
    for i, j in zip(*np.nonzero(similar)):
        a, b = root(int(i)), root(int(j))
        parent[max(a, b)] = min(a, b)
    return [root(i) != i for i in range(len(vectors))]


def test_near_duplicates_hold_a_bounded_number_of_links_for_many_copies(monkeypatch):
    """A result list of copies of one placeholder image links every pair (N² links): they are
    merged into groups as they come, never all held (20,000 copies took 19 GB and 80 s)."""
    from unicom.search import queries

    rng = np.random.default_rng(0)
    copies = rng.standard_normal(16) + 0.01 * rng.standard_normal((300, 16))  # one image, 300 times
    others = rng.standard_normal((300, 16))  # 300 unrelated ones, 50 of them with a near copy
    vectors = np.concatenate([copies, others, others[:50] + 0.05 * rng.standard_normal((50, 16))])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True))[rng.permutation(650)].astype(np.float32)
    held = []
    merged = queries._merged_groups
    monkeypatch.setattr(queries, "_SIMILARITIES", 4096)
    monkeypatch.setattr(queries, "_merged_groups", lambda group, sources, targets: (
        held.append(sum(len(part) for part in sources)), merged(group, sources, targets))[1])
    assert near_duplicates(vectors).tolist() == _groups_by_union_find(vectors, 0.94)
    assert len(held) > 1 and max(held) < 2 * 4096  # links merged as they come, at most a block past the bound


def test_a_deduplicated_search_reads_at_most_look_further_times_k(tmp_path, monkeypatch):
    """2,000 copies of one image: the 10 unique results asked for do not exist; the search stops
    after LOOK_FURTHER·k results instead of reading (and comparing) the whole index."""
    from unicom.search import queries

    rng = np.random.default_rng(0)
    copies = (rng.standard_normal(8) + 0.001 * rng.standard_normal((2000, 8))).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=copies, metadata=pa.table({"key": [f"k{i}" for i in range(2000)]}))
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    asked = []
    search = index.search
    monkeypatch.setattr(index, "search", lambda vectors, k, **options: (asked.append(k), search(vectors, k, **options))[1])
    with TestClient(create_app(index)) as client:
        best = client.post("/search", json={"embedding": copies[0].tolist(), "k": 1}).json()["results"][0]["id"]
        asked.clear()
        unique = client.post("/search", json={"embedding": copies[0].tolist(), "k": 10, "deduplicate": True}).json()
    assert [hit["id"] for hit in unique["results"]] == [best]
    assert max(asked) == queries.LOOK_FURTHER * 10  # not the whole index


def test_score_digits_are_as_many_as_tell_the_scores_apart():
    assert score_digits([0.91, 0.85, 0.5]) == 3
    assert score_digits([0.91231, 0.91234, 0.5]) == 5  # 0.9123 twice at 4 decimals
    assert score_digits([0.7, 0.7, 0.7]) == 3  # equal scores need no more
    assert score_digits([0.123456781, 0.123456789]) == 6  # float32 cannot tell more: capped


@pytest.fixture(scope="module")
def chain_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    keys = [f"item{i}" for i in range(len(CHAIN))]
    write_part(root / "emb", 0, image=CHAIN, metadata=pa.table({"key": keys, "caption": [f"caption {i}" for i in range(6)],
                                                               "url": [f"http://images.example/{i}.jpg" for i in range(6)]}))
    return Index.build(root / "emb", root / "index")


def test_deduplicate_drops_near_duplicates_in_our_api_and_clip_retrievals(chain_index):
    with TestClient(create_app(chain_index)) as client:
        query = plane(0, 1).tolist()
        plain = client.post("/search", json={"embedding": query, "k": 3}).json()["results"]
        assert [hit["id"] for hit in plain] == [0, 1, 2]
        unique = client.post("/search", json={"embedding": query, "k": 3, "deduplicate": True}).json()["results"]
        assert [hit["id"] for hit in unique] == [0, 3, 5]
        assert [hit["rank"] for hit in unique] == [1, 2, 3]
        knn = client.post("/knn-service", json={"embedding_input": query, "modality": "image", "num_images": 2,
                                                "num_result_ids": 6, "indice_name": "index", "deduplicate": True}).json()
        assert [result["id"] for result in knn] == [0, 3, 5]
        assert knn[0]["caption"] == "caption 0" and knn[0]["url"] == "http://images.example/0.jpg" and "image" not in knn[0]
        assert "caption" not in knn[2]  # past num_images: id and similarity only
        np.testing.assert_allclose([result["similarity"] for result in knn], CHAIN[[0, 3, 5]] @ CHAIN[0], atol=1e-6)
        # an item without a local image links to its own url
        assert plain[0]["link"] == "http://images.example/0.jpg" and plain[0]["thumbnail"] is None


# --------------------------------------------------------------------------- clip-retrieval's API


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    found = indexed_image_collection(tmp_path_factory.mktemp("knn"))
    second = Index.build(found["emb"], found["index"].path.parent / "again", dims=32)
    app = create_app({"photos": found["index"], "small": second}, found["encoder"], allow_image_urls=True)
    with TestClient(app) as client:
        yield {**found, "client": client, "second": second}


def knn(client, **body):
    return client.post("/knn-service", content=json.dumps(body), headers={"content-type": "text/plain;charset=UTF-8"})


def test_indices_list_names_the_served_indexes(served):
    assert served["client"].get("/indices-list").json() == ["photos", "small"]


def test_an_image_as_base64_finds_itself(served):
    data = base64.b64encode(served["images"][5].read_bytes()).decode()
    response = knn(served["client"], image=data, modality="image", num_images=2, indice_name="photos")
    assert response.status_code == 200
    results = response.json()
    assert results[0]["id"] == 5 and results[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert len(results) == 2  # num_result_ids defaults to num_images


def test_an_image_as_a_wrapped_data_url_finds_itself_and_url_safe_base64_is_refused(served):
    data = served["images"][5].read_bytes()
    wrapped = "data:image/png;base64," + base64.encodebytes(data).decode()  # lines of 76 characters
    response = knn(served["client"], image=wrapped, modality="image", num_images=1, indice_name="photos")
    assert response.status_code == 200 and response.json()[0]["id"] == 5
    url_safe = base64.urlsafe_b64encode(data).decode()
    assert "-" in url_safe or "_" in url_safe
    response = knn(served["client"], image=url_safe, modality="image", num_images=1, indice_name="photos")
    assert response.status_code == 400
    assert "of URL-safe base64; send standard base64" in response.json()["detail"]


def test_flags_that_need_models_this_server_lacks_are_answered_unsupported(served):
    response = knn(served["client"], embedding_input=np.ones(64).tolist(), modality="image", num_images=3,
                   indice_name="photos", use_safety_model=True, use_violence_detector=True, aesthetic_score="9")
    assert response.status_code == 200 and len(response.json()) == 3
    unsupported = response.headers["X-Unsupported-Options"]
    assert unsupported.startswith("use_safety_model (no safety model: results are not filtered; --safety-column names "
                                  "the metadata column that marks them)")
    assert "use_violence_detector" in unsupported and "aesthetic_score" in unsupported


def test_unknown_keys_are_ignored_as_clip_retrieval_does_but_named_in_the_header(served):
    response = knn(served["client"], embedding_input=np.ones(64).tolist(), indice_name="photos", num_image=3, **{"größe": 1})
    assert response.status_code == 200 and len(response.json()) == 24  # the default num_images, 100: every item
    assert response.headers["X-Unsupported-Options"] == '"gr\\u00f6\\u00dfe", "num_image" (unknown keys: ignored)'


def test_the_text_modality_and_unknown_indexes_are_refused(served):
    body = dict(embedding_input=np.ones(64).tolist(), num_images=3)
    text = knn(served["client"], modality="text", indice_name="photos", **body)
    assert text.status_code == 400 and text.json()["detail"] == (
        "modality 'text': photos searches image embeddings only; search modality 'image', or build the index with "
        "`unicom index --layout clip-retrieval` from embeddings with captions (text_emb/) to search their captions")
    missing = knn(served["client"], modality="image", indice_name="laion5B", **body)
    assert missing.status_code == 404 and missing.json()["detail"] == "indice_name 'laion5B': no such index; the indexes are photos, small"
    empty = knn(served["client"], modality="image", num_images=3)
    assert empty.status_code == 400 and "must fill one of text, image, image_url and embedding_input" in empty.json()["detail"]


def test_knn_errors_name_clip_retrievals_keys(served):
    short = knn(served["client"], embedding_input=[0.1] * 8, modality="image", num_images=3, indice_name="photos")
    assert short.status_code == 400 and short.json()["detail"] == '"embedding_input" has 8 numbers, the index needs at least 64'
    zero = knn(served["client"], embedding_input=[0.0] * 64, modality="image", num_images=3, indice_name="photos")
    assert zero.status_code == 400 and zero.json()["detail"].startswith('"embedding_input" is zero in its first 64 numbers')
    blank = knn(served["client"], text="   ", modality="image", num_images=3, indice_name="photos")
    assert blank.status_code == 400 and "must fill one of text, image, image_url and embedding_input" in blank.json()["detail"]
    # a blank text gives way to the query that follows it, as an absent one does
    vector = np.random.default_rng(2).standard_normal(64)
    after_blank = knn(served["client"], text=" ", embedding_input=vector.tolist(), modality="image", num_images=2,
                      indice_name="photos")
    assert [result["id"] for result in after_blank.json()] == served["index"].search(vector, 2)[1][0].tolist()
    # ClipClient sends num_result_ids equal to num_images: the error names the key its user set
    many = knn(served["client"], text="a cat", modality="image", num_images=20_000, num_result_ids=20_000,
               indice_name="photos")
    assert many.status_code == 400
    assert many.json()["detail"] == "num_images must be between 1 and 10000 (the server's --max-result-ids), got 20000"
    download = knn(served["client"], text="a cat", modality="image", num_images=40, num_result_ids=20_000,
                   indice_name="photos")
    assert download.json()["detail"] == "num_result_ids must be between 1 and 10000 (the server's --max-result-ids), got 20000"


def test_indice_name_chooses_the_index(served):
    vector = np.random.default_rng(1).standard_normal(64)
    answer = knn(served["client"], embedding_input=vector.tolist(), modality="image", num_images=4, indice_name="small").json()
    scores, ids = served["second"].search(vector, 4)
    assert [result["id"] for result in answer] == ids[0].tolist()
    hits = served["client"].post("/search", json={"embedding": vector.tolist(), "k": 4, "index": "small"}).json()
    assert hits["index"] == "small" and [hit["id"] for hit in hits["results"]] == ids[0].tolist()
    assert hits["results"][0]["thumbnail"] == f"/thumbnail/{ids[0][0]}?index=small"
    assert served["client"].get(hits["results"][0]["thumbnail"]).status_code == 200


def test_metadata_answers_ids_in_clip_retrievals_shape(served):
    response = served["client"].post("/metadata", content=json.dumps({"ids": [3, 0], "indice_name": "photos"}))
    assert response.status_code == 200
    items = response.json()
    assert [item["id"] for item in items] == [3, 0]
    assert items[0]["metadata"]["image_path"] == str(served["images"][3])
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(items[0]["metadata"]["image"]))).format == "JPEG"
    assert served["client"].post("/metadata", json={"ids": []}).json() == []
    bad = served["client"].post("/metadata", json={"ids": [99]})
    assert bad.status_code == 404 and bad.json()["detail"] == "no item 99 in photos (ids 0..23)"


def test_metadata_refuses_more_ids_than_its_limit_before_reading_any(served, monkeypatch):
    def unread(*args, **kwargs):
        raise AssertionError("metadata read for a refused request")

    ids = [item % 24 for item in range(MAX_METADATA_IDS + 1)]
    monkeypatch.setattr(Index, "metadata", unread)
    refused = served["client"].post("/metadata", json={"ids": ids})
    assert refused.status_code == 400
    assert refused.json()["detail"] == f"ids: {MAX_METADATA_IDS + 1} ids, more than the limit of {MAX_METADATA_IDS} per " \
                                       "request; ask for them in several requests"
    monkeypatch.undo()
    allowed = served["client"].post("/metadata", json={"ids": ids[:MAX_METADATA_IDS]})
    assert allowed.status_code == 200 and len(allowed.json()) == MAX_METADATA_IDS


def test_an_image_url_is_fetched_only_when_allowed(served, tmp_path):
    (tmp_path / "q.jpg").write_bytes(served["images"][9].read_bytes())
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/q.jpg"
        try:
            fetched = knn(served["client"], image_url=url, modality="image", num_images=1, indice_name="photos")
            assert fetched.status_code == 200 and fetched.json()[0]["id"] == 9
            with TestClient(create_app(served["index"], served["encoder"])) as closed:
                refused = knn(closed, image_url=url, modality="image", num_images=1)
                assert refused.status_code == 400 and "does not fetch URLs" in refused.json()["detail"]
        finally:
            server.shutdown()
    assert knn(served["client"], image_url="file:///etc/passwd", num_images=1).status_code == 400


def test_an_image_url_follows_a_few_redirects_to_http_only(served, tmp_path):
    image = served["images"][9].read_bytes()
    listener = socket.create_server(("127.0.0.1", 0))  # stands for an FTP server: nothing may connect to it
    listener.settimeout(0.2)
    ftp = f"ftp://127.0.0.1:{listener.getsockname()[1]}/q.jpg"

    class Redirects(QuietHandler):
        def do_GET(self):
            if self.path == "/q.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
                return
            hops = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/hop/") else 0
            target = {"/ftp": ftp, "/file": "file:///etc/passwd"}.get(self.path) or (
                f"/hop/{hops - 1}" if hops > 0 else "/q.jpg")
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = serve(Redirects)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        def ask(path):
            return knn(served["client"], image_url=base + path, num_images=1, indice_name="photos")

        followed = ask(f"/hop/{MAX_REDIRECTS - 1}")  # MAX_REDIRECTS redirects in all
        assert followed.status_code == 200 and followed.json()[0]["id"] == 9
        too_many = ask(f"/hop/{MAX_REDIRECTS}")
        assert too_many.status_code == 400
        assert too_many.json()["detail"].startswith(f"image_url: more than {MAX_REDIRECTS} redirects")
        to_ftp = ask("/ftp")
        assert to_ftp.status_code == 400
        assert to_ftp.json()["detail"] == f"image_url: {base}/ftp redirects to {ftp}; only http and https URLs are fetched"
        with pytest.raises(TimeoutError):
            listener.accept()
        to_file = ask("/file")
        assert to_file.status_code == 400 and "file:///etc/passwd" in to_file.json()["detail"]
    finally:
        server.shutdown()
        server.server_close()
        listener.close()


class HeldFiles(QuietHandler):
    """Answers every GET with ``data``: its headers at once (its length unless ``chunked``),
    its bytes once ``gate`` is set; counts the GETs in ``asked``."""

    data, chunked, gate, asked = b"", False, threading.Event(), [0]

    def do_GET(self):
        self.asked[0] += 1
        self.send_response(200)
        if self.chunked:  # HTTP/1.1 without a length: the bytes as one chunk
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.flush()
        self.gate.wait(30)
        if self.chunked:
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.data), self.data))
        else:
            self.wfile.write(self.data)


def held_files(data: bytes, chunked: bool = False):
    handler = type("Files", (HeldFiles,), {"data": data, "chunked": chunked, "gate": threading.Event(), "asked": [0]})
    return serve(handler), handler


def test_concurrent_image_urls_hold_at_most_the_fetches_budget_and_are_all_answered(served):
    """Twelve image_url queries at once to a server whose fetches budget (--max-bodies-mb)
    has room for three files, each counted twice its Content-Length while it arrives: three
    are read while the others wait with their bodies unread, each is answered as alone, and
    nothing stays held."""
    import asyncio

    import httpx

    data = served["images"][5].read_bytes()
    server, handler = held_files(data)
    url = f"http://127.0.0.1:{server.server_address[1]}/q.jpg"
    app = create_app(served["index"], served["encoder"], allow_image_urls=True, max_body_bytes=3 * 2 * len(data))
    fetches = app.state.fetches
    query = {"image_url": url, "modality": "image", "num_images": 3}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            sent = [asyncio.ensure_future(client.post("/knn-service", json=query)) for _ in range(12)]
            for _ in range(400):  # until every request has its headers, and three their shares
                await asyncio.sleep(0.025)
                if handler.asked[0] == 12 and len(fetches._waiting) == 9:
                    break
            waiting = (fetches.used, len(fetches._waiting))
            handler.gate.set()
            return waiting, await asyncio.gather(*sent)

    try:
        waiting, responses = asyncio.run(asyncio.wait_for(scenario(), 60))
        alone = knn(served["client"], **query)
    finally:
        server.shutdown()
        server.server_close()
    assert waiting == (3 * 2 * len(data), 9)
    assert [r.status_code for r in responses] == [200] * 12
    assert alone.json()[0]["id"] == 5 and all(r.json() == alone.json() for r in responses)
    assert fetches.peak == 3 * 2 * len(data) and fetches.used == 0


def test_image_urls_whose_server_stalls_do_not_hold_up_uploads(served):
    """36 image_url queries whose server sends its headers and then nothing for a while: the
    fetches wait in threads of their own (FETCH_THREADS), so an upload sent meanwhile, whose
    decoding needs a thread of the loop's own pool, is answered at once and as alone."""
    import asyncio

    import httpx

    from unicom.search.uploads import FETCH_THREADS

    data = served["images"][5].read_bytes()
    server, handler = held_files(data)
    url = f"http://127.0.0.1:{server.server_address[1]}/q.jpg"
    app = create_app(served["index"], served["encoder"], allow_image_urls=True)
    sent = httpx.Request("POST", "http://served/search", files={"image": ("q.jpg", served["images"][7].read_bytes(),
                                                                           "image/jpeg")})
    upload = sent.read()
    alone = served["client"].post("/search", content=upload, headers={"content-type": sent.headers["content-type"]})

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            fetches = [asyncio.ensure_future(client.post("/knn-service", json={
                "image_url": url, "modality": "image", "num_images": 1})) for _ in range(36)]
            for _ in range(400):
                await asyncio.sleep(0.025)
                if handler.asked[0] >= FETCH_THREADS:
                    break
            searched = await asyncio.wait_for(client.post("/search", content=upload, headers={
                "content-type": sent.headers["content-type"]}), 20)
            stalled = sum(not fetch.done() for fetch in fetches)
            handler.gate.set()
            return searched, stalled, await asyncio.gather(*fetches)

    try:
        searched, stalled, fetched = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        handler.gate.set()
        server.shutdown()
        server.server_close()
    assert searched.status_code == 200 and searched.json()["results"] == alone.json()["results"] and stalled == 36
    assert [r.status_code for r in fetched] == [200] * 36 and all(r.json()[0]["id"] == 5 for r in fetched)


def test_an_image_url_without_a_length_holds_the_largest_upload_while_it_arrives(served):
    """A file sent without a Content-Length (chunked) is counted as --max-upload-mb, twice,
    until it has arrived, and as its own length then; one that turns out longer than that is
    413, naming the option, and gives its share back."""
    data = served["images"][5].read_bytes()
    server, handler = held_files(data, chunked=True)
    handler.gate.set()
    url = f"http://127.0.0.1:{server.server_address[1]}/q.jpg"
    try:
        with TestClient(create_app(served["index"], served["encoder"], allow_image_urls=True,
                                   max_upload_bytes=len(data) + 1000)) as client:
            fetched = knn(client, image_url=url, modality="image", num_images=1)
            assert fetched.status_code == 200 and fetched.json()[0]["id"] == 5
            assert client.app.state.fetches.peak == 2 * (len(data) + 1000) and client.app.state.fetches.used == 0
        with TestClient(create_app(served["index"], served["encoder"], allow_image_urls=True,
                                   max_upload_bytes=len(data) - 1)) as client:
            longer = knn(client, image_url=url, modality="image", num_images=1)
            assert longer.status_code == 413 and client.app.state.fetches.used == 0
            assert longer.json()["detail"] == f"image_url: {url} is larger than the limit of {len(data) - 1} bytes " \
                                              "(--max-upload-mb)"
    finally:
        server.shutdown()
        server.server_close()


def test_an_image_url_longer_than_the_limit_is_refused_from_its_length(served):
    data = served["images"][5].read_bytes()
    server, handler = held_files(data)  # the gate stays shut: its bytes would never come
    url = f"http://127.0.0.1:{server.server_address[1]}/q.jpg"
    try:
        with TestClient(create_app(served["index"], served["encoder"], allow_image_urls=True,
                                   max_upload_bytes=len(data) - 1)) as client:
            refused = knn(client, image_url=url, modality="image", num_images=1)
            assert refused.status_code == 413 and client.app.state.fetches.peak == 0
            assert refused.json()["detail"] == f"image_url: {url} is {len(data)} bytes, larger than the limit of " \
                                               f"{len(data) - 1} bytes (--max-upload-mb)"
    finally:
        handler.gate.set()
        server.shutdown()
        server.server_close()


def test_an_image_url_that_arrives_too_slowly_is_400_and_gives_its_share_back():
    """A file still arriving ``seconds`` after its share was granted is answered 400 naming
    the URL; its share (twice its length) is given back."""
    import asyncio

    from fastapi import HTTPException

    from unicom.search.batching import ByteBudget
    from unicom.search.uploads import fetch_held

    class Trickle(QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                time.sleep(0.05)

    import time

    server = serve(Trickle)
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
    budget = ByteBudget(10_000)
    try:
        with pytest.raises(HTTPException) as refused:
            asyncio.run(fetch_held(url, 5000, budget, seconds=0.3))
    finally:
        server.shutdown()
        server.server_close()
    assert refused.value.status_code == 400 and refused.value.detail == f"image_url: {url} did not arrive within 0.3 s"
    assert budget.peak == 2 * 1000 and budget.used == 0


async def read_slowly(app, path: str, body: bytes, stalled):
    """POST ``body`` to ``path`` of the ASGI ``app`` as a client that reads two pieces of the
    reply, then nothing for 2 s, then the rest: ``(stalled(), reply)``, ``stalled`` called at
    the end of the 2 s."""
    import asyncio

    sent, reading = [], asyncio.Event()

    async def receive():
        if not sent:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) == 2:
            await reading.wait()  # the client reads nothing more for now

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    answering = asyncio.ensure_future(app(scope, receive, send))
    for _ in range(200):
        await asyncio.sleep(0.01)
    seen = stalled()
    reading.set()
    await asyncio.wait_for(answering, 30)
    return seen, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_replies_with_pictures_are_made_as_the_client_reads_them(served, monkeypatch):
    """A /knn-service reply is made while it is sent: a client that reads nothing past the
    first items has only those pictures made (the server holds no more of its reply); once
    it reads on, it gets the same bytes as JSONResponse writes for the whole list."""
    import asyncio

    import httpx

    from unicom.search import service
    from unicom.search.item_images import ItemImages

    monkeypatch.setattr(service, "REPLY_CHUNK", 1)  # each item sent on its own
    made = []
    thumbnail = ItemImages.thumbnail

    async def counted(self, *args):
        made.append(args[2])
        return await thumbnail(self, *args)

    monkeypatch.setattr(ItemImages, "thumbnail", counted)
    count = len(served["images"])
    query = {"embedding_input": [0.5] * served["index"].dims, "num_images": count}
    app = create_app(served["index"], served["encoder"])
    body = json.dumps(query).encode()

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            whole = await client.post("/knn-service", content=body)
        made.clear()
        return whole, *await read_slowly(app, "/knn-service", body, lambda: len(made))

    whole, before, reply = asyncio.run(scenario())
    assert whole.status_code == 200 and sum("image" in item for item in whole.json()) == count
    assert before <= 3 and len(made) == count
    assert reply == whole.content == json.dumps(whole.json(), ensure_ascii=False, allow_nan=False,
                                                 separators=(",", ":")).encode()


def test_a_client_reading_its_reply_slowly_holds_no_share_of_the_bodies_budget(served, monkeypatch):
    """The bodies budget holds a request's share until its reply starts: by then the body has
    been read and parsed, so a client that reads slowly (here a query by an image as base64,
    whose reply of pictures it stops reading) does not keep others' uploads waiting."""
    import asyncio

    from unicom.search import service

    monkeypatch.setattr(service, "REPLY_CHUNK", 1)
    app = create_app(served["index"], served["encoder"])
    body = json.dumps({"image": base64.b64encode(served["images"][5].read_bytes()).decode(),
                       "num_images": len(served["images"])}).encode()
    held, reply = asyncio.run(read_slowly(app, "/knn-service", body, lambda: app.state.bodies.used))
    assert held == 0 and app.state.bodies.peak == 2 * len(body)
    assert json.loads(reply)[0]["id"] == 5


def test_cors_headers_only_for_the_origins_given(served):
    with TestClient(create_app(served["index"], cors_origins=["http://127.0.0.1:3005"])) as client:
        allowed = client.get("/indices-list", headers={"Origin": "http://127.0.0.1:3005"})
        assert allowed.headers["access-control-allow-origin"] == "http://127.0.0.1:3005"
        other = client.get("/indices-list", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    plain = served["client"].get("/indices-list", headers={"Origin": "http://127.0.0.1:3005"})
    assert "access-control-allow-origin" not in plain.headers


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_declares_the_requests_and_replies(served):
    spec = served["client"].get("/openapi.json").json()
    assert {"/search", "/knn-service", "/indices-list", "/metadata", "/healthz", "/thumbnail/{item_id}", "/image/{item_id}"} <= set(spec["paths"])
    search = spec["paths"]["/search"]["post"]
    json_body = search["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "image", "like", "embedding", "text_weight", "k", "deduplicate", "index"} <= set(json_body["properties"])
    assert "multipart/form-data" in search["requestBody"]["content"]
    assert search["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SearchReply")
    knn_body = spec["paths"]["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "image", "image_url", "embedding_input", "modality", "num_images", "num_result_ids", "indice_name",
            "deduplicate", "use_safety_model", "use_violence_detector"} <= set(knn_body["properties"])
    assert {"SearchReply", "Hit", "KnnResult", "MetadataItem", "Health"} <= set(spec["components"]["schemas"])


def test_the_docs_page_is_served_without_a_cdn(served):
    page = served["client"].get("/docs")
    assert page.status_code == 200 and "url: 'openapi.json'" in page.text  # relative: it works under a proxy's prefix
    assert 'src="docs-assets/swagger-ui-bundle.js"' in page.text and "cdn" not in page.text.lower()
    assert served["client"].get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_the_full_image_route_serves_the_original_file(served):
    response = served["client"].get("/image/4")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == served["images"][4].read_bytes()
    assert served["client"].get("/image/4?index=nope").status_code == 404


def test_the_full_image_of_a_tiff_item_is_served_as_stored(tmp_path):
    """An image folder may hold TIFF files (unicom embed reads them); their page link is /image/{id}."""
    from support import class_image

    paths = [tmp_path / "scan.tif", tmp_path / "scan.tiff"]
    class_image(0, 0).save(paths[0])
    class_image(1, 0).save(paths[1], compression="tiff_lzw")
    rows = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": ["a", "b"], "image_path": [str(p) for p in paths]}))
    with TestClient(create_app(Index.build(tmp_path / "emb", tmp_path / "index"))) as client:
        for item, path in enumerate(paths):
            response = client.get(f"/image/{item}")
            assert response.status_code == 200 and response.headers["content-type"] == "image/tiff"
            assert response.content == path.read_bytes()
            assert client.get(f"/thumbnail/{item}").headers["content-type"] == "image/jpeg"


def test_a_form_may_name_an_item_instead_of_an_image(served):
    response = served["client"].post("/search", files={"like": (None, "7"), "k": (None, "2")})  # curl -F like=7 -F k=2
    assert response.status_code == 200
    assert [hit["id"] for hit in response.json()["results"]][0] == 7


def test_knn_service_searches_the_caption_embeddings_of_a_clip_retrieval_folder(tmp_path):
    # image and caption embeddings point in different directions, so each modality's answer is its own
    rng = np.random.default_rng(3)
    image, text = (rng.normal(size=(40, 16)).astype(np.float32) for _ in range(2))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    write_part(tmp_path / "emb", 0, image=image, text=text,
               metadata=pa.table({"key": [f"k{i}" for i in range(40)], "caption": [f"caption {i}" for i in range(40)]}))
    Index.build(tmp_path / "emb", tmp_path / "index", layout="clip-retrieval")
    index = Index.load(tmp_path / "index")
    assert index.modalities == ("image", "text")
    query = text[11] + 0.1 * image[5]
    with TestClient(create_app(index)) as client:
        replies = {}
        for modality, rows in (("image", image), ("text", text)):
            reply = client.post("/knn-service", json={"embedding_input": query.tolist(), "modality": modality,
                                                      "num_images": 5, "num_result_ids": 5, "indice_name": "index"})
            assert reply.status_code == 200, reply.text
            expected = np.argsort(-(rows @ (query / np.linalg.norm(query))), kind="stable")[:5]
            assert [hit["id"] for hit in reply.json()] == expected.tolist()
            replies[modality] = reply.json()
        assert replies["text"][0]["id"] == 11 and replies["text"][0]["caption"] == "caption 11"
        assert replies["image"][0]["id"] != 11
        # deduplication reads back the vectors of the modality it searched
        unique = client.post("/knn-service", json={"embedding_input": text[11].tolist(), "modality": "text",
                                                   "num_images": 3, "indice_name": "index", "deduplicate": True})
        assert unique.status_code == 200 and unique.json()[0]["id"] == 11


def test_images_of_a_knn_answer_are_bounded_and_the_rest_carry_their_metadata(served, monkeypatch):
    """clip-retrieval's download button asks for 10,000 results: thumbnails for the first
    MAX_METADATA_IDS only, each later result with its columns, and the header says so."""
    import unicom.search.service

    monkeypatch.setattr(unicom.search.service, "MAX_METADATA_IDS", 5)
    vector = np.random.default_rng(2).standard_normal(64)
    response = knn(served["client"], embedding_input=vector.tolist(), modality="image", num_images=10, indice_name="photos")
    assert response.status_code == 200
    results = response.json()
    assert len(results) == 10 and ["image" in result for result in results] == [True] * 5 + [False] * 5
    assert all(result["image_path"] == str(served["images"][result["id"]]) for result in results)
    assert "num_images above 5 (results past the 5th carry their metadata without an image)" in \
        response.headers["X-Unsupported-Options"]
    few = knn(served["client"], embedding_input=vector.tolist(), modality="image", num_images=5, indice_name="photos")
    assert "X-Unsupported-Options" not in few.headers and all("image" in result for result in few.json())
