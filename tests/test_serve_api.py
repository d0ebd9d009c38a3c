"""The HTTP API of `unicom serve`: good and bad requests, thumbnails, batching of concurrent queries."""

from __future__ import annotations

import asyncio
import contextlib
import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from unicom.search.index import Index
from unicom.search.batching import QueryBatcher
from unicom.search.service import create_app
from unicom.search.uploads import DECODER_OVERHEAD

from support import class_image, encode_image, indexed_image_collection, write_class_folder, write_tar_shard


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    found = indexed_image_collection(tmp_path_factory.mktemp("serve"))
    app = create_app(found["index"], found["encoder"], max_upload_bytes=200_000, max_k=20)
    with TestClient(app) as client:
        yield {**found, "client": client}


def thumbnail_held(width: int, height: int) -> int:
    """What making the thumbnail of an RGB image of width x height pixels counts: its pixels
    (four bytes each), the decoder's fixed overhead, and the thumbnail's resize (a quarter of
    the pixels, a first pass 256 wide, the thumbnail)."""
    return 4 * width * height + DECODER_OVERHEAD + 4 * (width * height // 4 + 256 * height + 256 * 256)


def upload(client, data: bytes, name: str = "query.jpg", kind: str = "image/jpeg", field: str = "image", **form):
    return client.post("/search", files={field: (name, data, kind)}, data=form)


def test_healthz_describes_the_index_and_model(served):
    health = served["client"].get("/healthz").json()
    assert health["status"] == "ok"
    assert (health["count"], health["dims"], health["type"]) == (24, 64, "flat")
    assert health["model"].startswith("timm/test_vit") and health["image_search"] is True


def test_an_uploaded_image_finds_itself_first(served):
    path = served["images"][14]
    response = upload(served["client"], path.read_bytes(), k="4")
    assert response.status_code == 200
    answer = response.json()
    assert answer["k"] == 4 and len(answer["results"]) == 4
    top = answer["results"][0]
    assert top["id"] == 14 and top["rank"] == 1 and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["key"] == "class_002/0002.jpg" and top["image_path"] == str(path)
    assert top["thumbnail"] == "/thumbnail/14"
    assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3, 4]


def test_a_png_upload_is_accepted(served):
    response = upload(served["client"], encode_image(class_image(1, 0), "PNG"), "q.png", "image/png")
    assert response.status_code == 200 and len(response.json()["results"]) == 10


def test_an_embedding_query_equals_the_python_api(served):
    index = served["index"]
    vector = np.random.default_rng(0).standard_normal(64)
    response = served["client"].post("/search", json={"embedding": vector.tolist(), "k": 5})
    assert response.status_code == 200
    scores, ids = index.search(vector, 5)
    assert [hit["id"] for hit in response.json()["results"]] == ids[0].tolist()
    np.testing.assert_allclose([hit["score"] for hit in response.json()["results"]], scores[0], rtol=1e-5)


def test_the_thumbnail_is_a_small_jpeg_of_the_indexed_image(served):
    response = served["client"].get("/thumbnail/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and max(image.size) <= 256
    original = np.asarray(Image.open(served["images"][3]).convert("RGB").resize(image.size), dtype=float)
    assert np.abs(np.asarray(image, dtype=float) - original).mean() < 12


def test_the_page_and_its_assets_are_served(served):
    page = served["client"].get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="static/app.js">' in page.text  # relative: the page works under a proxy's path prefix and "http" not in page.text.replace("http-equiv", "")
    for asset in ("/static/app.js", "/static/style.css"):
        assert served["client"].get(asset).status_code == 200


# --------------------------------------------------------------------------- bad requests


def test_a_non_image_upload_is_415(served):
    response = upload(served["client"], b"%PDF-1.4 not an image", "doc.jpg")
    assert response.status_code == 415
    assert response.json()["detail"].startswith("doc.jpg: not an image; upload a JPEG, PNG")


def test_a_declared_non_image_type_is_415(served):
    response = upload(served["client"], b"hello", "notes.txt", "text/plain")
    assert response.status_code == 415 and "content type text/plain is not an image" in response.json()["detail"]


def test_an_image_format_outside_the_list_is_415(served):
    buffer = io.BytesIO()
    class_image(0, 0).save(buffer, format="TIFF")
    response = upload(served["client"], buffer.getvalue(), "scan.tif", "image/tiff")
    assert response.status_code == 415 and "TIFF images are not accepted" in response.json()["detail"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (RGB, 8 bits): enough for Pillow to open it."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_413_with_the_pixel_limit(served):
    response = upload(served["client"], _png_header(20000, 20000), "bomb.png", "image/png")
    assert response.status_code == 413
    assert response.json()["detail"] == "bomb.png: 400,000,000 pixels, more than the limit of 40,000,000 pixels"


def test_an_image_over_the_pixel_limit_is_413_before_decoding(served):
    response = upload(served["client"], _png_header(8000, 6000), "large.png", "image/png")
    assert response.status_code == 413
    assert response.json()["detail"] == "large.png: 8000x6000 = 48,000,000 pixels, more than the limit of 40,000,000 pixels"
    assert served["client"].get("/healthz").json()["max_pixels"] == 40_000_000


def test_an_empty_body_is_400(served):
    response = served["client"].post("/search", content=b"", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 400 and response.json()["detail"].startswith("empty request body")
    response = served["client"].post("/search", content=b"", headers={"content-type": "application/json"})
    assert response.status_code == 400


def test_an_empty_file_is_400(served):
    response = upload(served["client"], b"", "empty.jpg")
    assert response.status_code == 400 and "the uploaded file is empty" in response.json()["detail"]


def test_an_oversized_upload_is_413_before_decoding(served):
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    data = encode_image(Image.fromarray(big), "PNG")
    assert len(data) > 200_000 + 64 * 1024
    response = upload(served["client"], data, "big.png", "image/png")
    assert response.status_code == 413 and "larger than the limit" in response.json()["detail"]
    assert response.json()["detail"].endswith(": an image of at most 200000 bytes (--max-upload-mb) and the form")


def test_a_file_just_over_the_limit_is_413(served):
    data = encode_image(class_image(0, 0, size=64), "PNG") + b"\0" * 200_000  # trailing bytes: still a PNG
    response = upload(served["client"], data, "padded.png", "image/png")
    assert response.status_code == 413 and "larger than the limit of 200000 bytes" in response.json()["detail"]


def test_a_base64_image_too_large_for_the_body_is_413_naming_the_image_limit(served):
    """The JSON body that carries an image as base64 is a third larger than the file: the
    answer says that the limit is --max-upload-mb's, for the file before its base64."""
    data = encode_image(class_image(0, 0, size=64), "PNG") + b"\0" * 300_000
    body = json.dumps({"image": base64.b64encode(data).decode()})
    for route in ("/search", "/knn-service"):
        response = served["client"].post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["detail"] == (
            f"request body of {len(body)} bytes is larger than the limit of 332202 bytes: an image of at most 200000 "
            "bytes (--max-upload-mb) as base64")


def test_a_wrong_field_name_is_400_naming_the_fields(served):
    response = upload(served["client"], served["images"][0].read_bytes(), field="file")
    assert response.status_code == 400
    assert response.json()["detail"] == "no field 'image' in the form (got ['file']); send the image as the field 'image'"


def test_a_form_with_an_empty_text_alone_says_there_is_nothing_to_search_for(served):
    # as curl -F text= sends it: multipart fields without a file; the k that came with them is not empty
    for form, empty in (({"text": ""}, "field text"), ({"text": "   ", "k": "3"}, "field text"),
                        ({"like": "", "text": " ", "k": "3"}, "fields like, text")):
        response = served["client"].post("/search", files={key: (None, value) for key, value in form.items()})
        assert response.status_code == 400
        assert response.json()["detail"] == (f"nothing to search for: the {empty} came empty; send a text, an image as "
                                             "the field 'image', or an item id as 'like'")


def test_a_form_field_given_twice_is_400_instead_of_one_being_dropped(served):
    data = served["images"][0].read_bytes()
    # curl -F image=@q.jpg -F text="at night" -F text="in snow"
    response = served["client"].post("/search", files=[("image", ("q.jpg", data, "image/jpeg")), ("text", (None, "at night")),
                                                       ("text", (None, "in snow"))])
    assert (response.status_code, response.json()) == (400, {"detail": "form field 'text' given more than once; give each "
                                                                       "field once (one query per request)"})


def test_an_unknown_form_field_is_400_naming_it_instead_of_being_ignored(served):
    data = served["images"][0].read_bytes()
    # curl -F image=@q.jpg -F query="at night" -F topk=5: the text and the k would be dropped unseen
    response = upload(served["client"], data, query="at night", topk="5")
    assert response.status_code == 400
    assert response.json()["detail"] == ("unknown form field 'query', 'topk'; the fields are image, text, like, "
                                         "text_weight, k, min_score, deduplicate, hide_duplicate_urls, safe, index, "
                                         "modality, aesthetic_score, aesthetic_weight, multilingual (an embedding is "
                                         "sent as JSON)")
    embedding = served["client"].post("/search", data={"embedding": "[0.1, 0.2]", "text": "x"},
                                      files={"image": ("q.jpg", data, "image/jpeg")})
    assert embedding.status_code == 400 and "'embedding'" in embedding.json()["detail"]
    assert upload(served["client"], data, k="3", deduplicate="true").status_code == 200


def test_a_damaged_file_of_the_served_index_is_a_json_500_that_says_so_and_its_log_names_it(tmp_path, caplog):
    """The index's own files are the server's input, not the request's: a 500 without the
    server's paths (not a 400), the file named in the server's log."""
    found = indexed_image_collection(tmp_path)
    part = sorted((tmp_path / "index" / "metadata").glob("*.parquet"))[1]
    part.write_bytes(b"damaged")  # ids 8..15 have no readable metadata any more
    with TestClient(create_app(found["index"], found["encoder"]), raise_server_exceptions=False) as client:
        for response in (client.post("/search", json={"like": 10, "k": 3}),
                         client.post("/metadata", json={"ids": [9]}), client.get("/thumbnail/12")):
            assert response.status_code == 500 and response.headers["content-type"] == "application/json"
            assert response.json()["detail"] == "the server failed on this request (FolderError); its log says why"
            assert str(tmp_path) not in response.text
        assert f"POST /metadata: {part}: not a readable parquet file" in caplog.text
        # items of the intact parts still answer (the 3 nearest of item 2 lie in part 0, ids 0..7)
        assert client.post("/search", json={"like": 2, "k": 3}).status_code == 200
        assert client.get("/thumbnail/2").status_code == 200


def test_a_text_field_instead_of_a_file_is_400(served):
    response = served["client"].post("/search", data={"image": "cat.jpg"}, files={"other": ("x", b"1", "text/plain")})
    assert response.status_code == 400 and "must be a file upload" in response.json()["detail"]


def test_a_bad_k_is_400(served):
    data = served["images"][0].read_bytes()
    assert upload(served["client"], data, k="0").status_code == 400
    response = upload(served["client"], data, k="21")
    assert response.status_code == 400 and response.json()["detail"] == "k must be between 1 and 20, got 21"
    assert upload(served["client"], data, k="ten").status_code == 400


def test_a_default_k_outside_the_allowed_ks_is_refused_when_the_app_is_made(served):
    from unicom.errors import InputError

    for default_k in (0, 21):
        with pytest.raises(InputError, match=f"default_k {default_k} \\(-k\\) must be between 1 and max_k 20"):
            create_app(served["index"], default_k=default_k, max_k=20)


def test_bad_embeddings_are_400(served):
    client = served["client"]
    short = client.post("/search", json={"embedding": [0.1] * 10})
    assert short.status_code == 400 and "has 10 numbers, the index needs at least 64" in short.json()["detail"]
    assert client.post("/search", json={"vector": [0.1] * 64}).status_code == 400
    assert client.post("/search", json={"embedding": ["a"] * 64}).status_code == 400
    assert client.post("/search", json={"embedding": [0.0] * 64}).status_code == 400
    broken = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["detail"]


def test_true_or_false_where_a_number_is_expected_is_400_not_read_as_1_or_0(served):
    client = served["client"]
    for route, body, said in (
        ("/search", {"like": True}, "like: expected a number, got true"),  # not item 1
        ("/search", {"text": "x", "k": True}, "k: expected a number, got true"),
        ("/search", {"embedding": [False] + [0.5] * 63}, "embedding.0: expected a number, got false"),
        ("/knn-service", {"text": "x", "num_images": True}, "num_images: expected a number, got true"),
        ("/metadata", {"ids": [2, True]}, "ids.1: expected a number, got true"),
    ):
        response = client.post(route, json=body)
        assert (response.status_code, response.json()) == (400, {"detail": said})


def test_a_json_body_of_more_values_than_any_request_needs_is_413_unparsed(served, monkeypatch):
    """A JSON body parsed takes 30 to 60 bytes a value (a body of numbers would take about 16
    times its length): one of more than 65,536 values is refused before it is parsed; an
    embedding longer than the index's dims but within that is searched by its first dims
    numbers; commas inside strings are not values."""
    import json as json_module

    from unicom.search.service import MAX_JSON_VALUES

    client = served["client"]
    parsed = []  # the lengths of the large bodies parsed (not the small replies read here)
    loads = json_module.loads
    monkeypatch.setattr(json_module, "loads", lambda body, *a, **k: (
        parsed.append(len(body)) if len(body) > 100_000 else None) or loads(body, *a, **k))
    too_many = [0.5] * 70_000
    refused = client.post("/search", json={"embedding": too_many})
    assert refused.status_code == 413 and parsed == []
    assert refused.json()["detail"] == (
        f"the JSON body holds {70_000 + 2:,} values, more than the {MAX_JSON_VALUES:,} a request may have (an "
        "embedding needs as many numbers as its index's dims, /metadata at most 1,000 ids); send fewer")
    ids = client.post("/metadata", json={"ids": list(range(70_000))})
    assert ids.status_code == 413 and parsed == []
    knn = client.post("/knn-service", json={"embedding_input": too_many, "num_images": 1})
    assert knn.status_code == 413 and parsed == []
    longer = client.post("/search", json={"embedding": [0.0] * 3 + [1.0] + [0.0] * 59_996, "k": 3})
    first = client.post("/search", json={"embedding": [0.0] * 3 + [1.0] + [0.0] * 60, "k": 3})
    assert longer.status_code == 200 and longer.json()["results"] == first.json()["results"]
    commas = client.post("/knn-service", json={"text": "a dog", "note": "," * 100_000, "num_images": 3})  # parsed
    assert len(parsed) == 2 and "text tower" in commas.json()["detail"]  # the longer embedding and the text


def test_a_text_longer_than_any_model_reads_is_400_before_it_is_tokenized(served):
    """The tokenizer reads a whole text (~0.4 s a megabyte for open_clip's) in the thread that
    runs every batch: a text over 10,000 characters is refused before anything else is asked
    of it (this model has no text tower: a text of 10,000 gets that answer instead)."""
    client = served["client"]
    message = ("text: 10,001 characters, more than the 10,000 a query may have (the model reads only its first words); "
               "send a shorter text")
    for response in (client.post("/search", json={"text": "a" * 10_001}),
                     client.post("/search", files={"text": (None, "a" * 10_001)}),
                     client.post("/knn-service", json={"text": "a" * 10_001, "num_images": 1})):
        assert response.status_code == 400 and response.json()["detail"] == message
    within = client.post("/search", json={"text": "a" * 10_000})
    assert within.status_code == 400 and "text tower" in within.json()["detail"]


def test_embeddings_that_are_not_finite_or_zero_are_400_naming_the_number(served):
    client = served["client"]
    rest = b", 0.1" * 62
    for body, said in (
        (b'{"embedding": [0.5, 1e39' + rest + b"]}", '"embedding": number 1 (1e+39) is not a finite float32 number'),
        (b'{"embedding": [NaN, 0.5' + rest + b"]}", '"embedding": number 0 (nan) is not a finite float32 number'),
        (b'{"embedding": [' + b"0, " * 64 + b"5]}", '"embedding" is zero in its first 64 numbers: it has no direction to search'),
    ):
        response = client.post("/search", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["detail"] == said
    knn = client.post("/knn-service", content=b'{"embedding_input": [Infinity, 0.5' + rest + b'], "num_images": 1}')
    assert knn.status_code == 400 and knn.json()["detail"] == '"embedding_input": number 0 (inf) is not a finite float32 number'


def test_json_nested_too_deeply_is_400(served):
    deep = b"[" * 60_000 + b"]" * 60_000  # within the values a body may hold (MAX_JSON_VALUES)
    for route in ("/search", "/knn-service", "/metadata"):
        response = served["client"].post(route, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 400, route
        assert response.json()["detail"] == "the body is JSON nested too deeply; send a flat JSON object"


def test_another_content_type_is_415(served):
    response = served["client"].post("/search", content=b"x", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]


def test_path_traversal_on_the_thumbnail_route_reads_no_file(served):
    client = served["client"]
    for attempt in ("/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd", "/thumbnail/%2e%2e/%2e%2e/etc/passwd",
                    "/thumbnail/-1", "/thumbnail/1.jpg", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                    "/thumbnail/" + str(served["images"][0])):
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert b"root:" not in response.content and b"JFIF" not in response.content
    missing = client.get("/thumbnail/24")
    assert missing.status_code == 404 and missing.json()["detail"] == "no item 24 in this index (ids 0..23)"


def test_a_deleted_or_damaged_image_file_is_404_naming_the_item(tmp_path):
    found = indexed_image_collection(tmp_path)
    found["images"][3].unlink()
    found["images"][5].write_bytes(found["images"][5].read_bytes()[:40])  # a JPEG cut after its header
    with TestClient(create_app(found["index"], found["encoder"])) as client:
        deleted, damaged = client.get("/thumbnail/3"), client.get("/thumbnail/5")
        assert deleted.status_code == 404 and deleted.json()["detail"] == "the image file of item 3 is missing"
        assert damaged.status_code == 404
        assert damaged.json()["detail"].startswith("the image file of item 5 cannot be read (")
        whole = client.get("/thumbnail/4")
        assert whole.status_code == 200 and Image.open(io.BytesIO(whole.content)).format == "JPEG"


def test_an_item_without_a_local_image_has_no_thumbnail(tmp_path):
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    rows = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": ["a", "b"], "url": ["http://x/a.jpg", None]}))
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    with TestClient(create_app(index)) as client:
        response = client.get("/thumbnail/1")
        assert response.status_code == 404 and response.json()["detail"] == "item 1 has no local image in the index metadata"
        hits = client.post("/search", json={"embedding": rows[0].tolist(), "k": 1}).json()["results"]
        assert hits[0]["url"] == "http://x/a.jpg" and hits[0]["thumbnail"] is None
        # without a model, image queries are refused with a hint
        refused = upload(client, encode_image(class_image(0, 0)))
        assert refused.status_code == 503 and '{"embedding": [...]}' in refused.json()["detail"]


def test_a_file_url_image_path_is_the_local_file_it_names(tmp_path):
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    image = tmp_path / "images" / "cat one.jpg"
    image.parent.mkdir()
    image.write_bytes(encode_image(class_image(2, 0)))
    rows = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": ["a"], "image_path": [f"file://{image}"]}))
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    with TestClient(create_app(index, image_root=tmp_path / "elsewhere")) as client:
        assert client.get("/image/0").content == image.read_bytes()
        assert client.get("/thumbnail/0").status_code == 200


def test_thumbnails_are_decoded_within_the_decoding_budget_sized_from_their_headers(tmp_path):
    """Thumbnails (/thumbnail, and the pictures of /knn-service and /metadata) take their
    decoded size, read from the image header, from the budget that uploads use
    (--max-decode-mb): with room for one big PNG, two are never decoded at once; a JPEG
    counts at its draft size. The thumbnails are those Pillow makes of the files."""
    import httpx
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    gradient = np.add.outer(np.arange(1200), np.arange(1600)) % 256
    files = []
    for name, image in (("a.png", np.stack([gradient, gradient * 2 % 256, 255 - gradient], -1)),
                        ("b.png", np.stack([255 - gradient, gradient, gradient // 2], -1)),
                        ("c.jpg", np.stack([gradient] * 3, -1).repeat(2, 0)[:1536].repeat(2, 1)[:, :2048])):
        files.append(tmp_path / name)
        Image.fromarray(image.astype(np.uint8)).save(files[-1])
    rows = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": ["a", "b", "c"], "image_path": [str(f) for f in files]}))
    png_bytes = thumbnail_held(1600, 1200)  # RGB: no copy when converted
    jpeg_bytes = thumbnail_held(512, 384)  # 2048x1536 drafted towards 256x256: 1/4 (1536 // 256 = 6, rounded down to a power of 2)
    app = create_app(Index.build(tmp_path / "emb", tmp_path / "index"), max_decode_bytes=png_bytes * 3 // 2)
    budget = app.state.decoding

    def reference(path) -> np.ndarray:  # Pillow's thumbnail, a JPEG decoded in draft mode
        image = Image.open(path)
        image.draft("RGB", (256, 256))
        image = image.convert("RGB")
        image.thumbnail((256, 256))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return np.asarray(Image.open(buffer))

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            jpeg = await client.get("/thumbnail/2")
            assert budget.peak == jpeg_bytes
            return jpeg, await asyncio.gather(
                client.get("/thumbnail/0"), client.get("/thumbnail/1"),
                client.post("/knn-service", json={"embedding_input": rows[0].tolist(), "modality": "image", "num_images": 3}),
                client.post("/metadata", json={"ids": [1, 0]}))

    jpeg, (first, second, knn, metadata) = asyncio.run(scenario())
    assert budget.peak == png_bytes and budget.used == 0
    for response in (jpeg, first, second, knn, metadata):
        assert response.status_code == 200, response.text
    assert np.array_equal(pixels(jpeg.content), reference(files[2]))
    assert np.array_equal(pixels(first.content), reference(files[0]))
    assert np.array_equal(pixels(second.content), reference(files[1]))
    pictures = {hit["id"]: base64.b64decode(hit["image"]) for hit in knn.json()}
    pictures.update({item["id"]: base64.b64decode(item["metadata"]["image"]) for item in metadata.json()})
    for item, path in enumerate(files):
        assert np.array_equal(pixels(pictures[item]), reference(path))


@pytest.mark.parametrize("where", ["url", "shard", "compressed shard"])
def test_thumbnails_of_remote_images_hold_their_fetched_bytes_in_the_decoding_budget(tmp_path, where):
    """An item's image at a URL (or in a shard at a URL) is held twice while its thumbnail is
    made: the fetched file and its decoded pixels. Both come from the decoding budget
    (--max-decode-mb) before the file is fetched, so concurrent thumbnails of big remote
    images never hold more fetched files than the budget has room for: with room for one,
    they are fetched one at a time."""
    import httpx
    import pyarrow as pa
    from storage_servers import FileServer

    from unicom.formats.embeddings import write_part

    (tmp_path / "photos").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (3, 600, 800, 3), dtype=np.uint8)  # barely compressed
    for i, image in enumerate(noise):
        Image.fromarray(image).save(tmp_path / "photos" / f"{i}.png")
    files = [(tmp_path / "photos" / f"{i}.png").read_bytes() for i in range(3)]
    held = [len(data) + thumbnail_held(800, 600) for data in files]  # the file, and its decoding
    assert min(map(len, files)) > 1_000_000
    shard = "00000.tar.gz" if where == "compressed shard" else "00000.tar"
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": f"{i:04d}", "png": data} for i, data in enumerate(files)])
    if where == "compressed shard":
        import gzip

        (tmp_path / "shards" / shard).write_bytes(gzip.compress((tmp_path / "shards" / "00000.tar").read_bytes()))
    with FileServer(tmp_path) as server:
        rows = np.eye(8, dtype=np.float32)[:3]
        if where == "url":
            metadata = {"image_path": [f"{server.url}/photos/{i}.png" for i in range(3)]}
        else:
            metadata = {"shard": [shard] * 3, "key": [f"{i:04d}" for i in range(3)]}
        write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table(metadata))
        index = Index.build(tmp_path / "emb", tmp_path / "index")
        app = create_app(index, shards=f"{server.url}/shards",
                         max_decode_bytes=min(held) * 3 // 2)  # room for one image and its file
        budget = app.state.decoding

        async def scenario():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
                return await asyncio.gather(*(client.get(f"/thumbnail/{i}") for i in range(3)))

        responses = asyncio.run(scenario())
        assert budget.peak == max(held) and budget.used == 0
        for i, response in enumerate(responses):  # the thumbnails Pillow makes of the files
            assert response.status_code == 200, response.text
            image = Image.open(tmp_path / "photos" / f"{i}.png")
            image.thumbnail((256, 256))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            assert response.content == buffer.getvalue()


def test_after_the_thumbnail_of_a_large_image_freed_memory_goes_back_to_the_system(tmp_path, monkeypatch):
    """The thumbnail of an image of at least 4 megapixels as decoded hands the freed heap
    back to the system (glibc's malloc_trim), as a large upload does; a small one does not."""
    import pyarrow as pa

    from unicom.formats.embeddings import write_part
    from unicom.search import uploads

    gradient = (np.add.outer(np.arange(1800), np.arange(2400)) % 256).astype(np.uint8)
    Image.fromarray(np.stack([gradient] * 3, -1)).save(tmp_path / "large.png")  # 4.32 megapixels
    Image.fromarray(np.stack([gradient[:600, :800]] * 3, -1)).save(tmp_path / "small.png")
    rows = np.eye(8, dtype=np.float32)[:2]
    write_part(tmp_path / "emb", 0, image=rows,
               metadata=pa.table({"image_path": [str(tmp_path / "large.png"), str(tmp_path / "small.png")]}))
    trims = []
    monkeypatch.setattr(uploads, "_TRIM", trims.append)  # malloc_trim(0), recorded
    with TestClient(create_app(Index.build(tmp_path / "emb", tmp_path / "index"))) as client:
        assert client.get("/thumbnail/1").status_code == 200
        assert trims == []
        assert client.get("/thumbnail/0").status_code == 200
        assert trims == [0]


def test_thumbnails_of_shard_samples_come_from_their_tar(tmp_path):
    import gzip

    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    samples = [{"key": f"{i:09d}", "jpg": encode_image(class_image(i, 0)), "txt": f"caption {i}"} for i in range(3)]
    write_tar_shard(tmp_path / "shards" / "00007.tar", samples)
    plain = (tmp_path / "shards" / "00007.tar").read_bytes()
    (tmp_path / "shards" / "00008.tar.gz").write_bytes(gzip.compress(plain))
    rows = np.random.default_rng(0).standard_normal((7, 8)).astype(np.float32)
    shards = ["00007.tar"] * 3 + ["00008.tar.gz"] * 2 + ["00007.tar", "../shards/00007.tar"]
    keys = [f"{i:09d}" for i in (0, 1, 2, 1, 2)] + ["missing", "000000000"]
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": keys, "shard": shards}))
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    with TestClient(create_app(index, shards=tmp_path / "shards")) as client:
        for item, label in ((1, 1), (2, 2), (4, 2)):
            response = client.get(f"/thumbnail/{item}")
            assert response.status_code == 200
            got = np.asarray(Image.open(io.BytesIO(response.content)), dtype=float)
            assert np.abs(got - np.asarray(class_image(label, 0), dtype=float)).mean() < 12
        assert client.get("/thumbnail/5").json()["detail"] == "the image of item 5 is not in its shard 00007.tar"
        assert client.get("/thumbnail/6").status_code == 404  # a shard name that is a path is never opened
        hits = client.post("/search", json={"embedding": rows[3].tolist(), "k": 1}).json()["results"]
        assert hits[0]["id"] == 3 and hits[0]["thumbnail"] == "/thumbnail/3"


@pytest.mark.parametrize("where", ["s3", "http"])
def test_thumbnails_of_samples_in_remote_shards_equal_those_of_local_shards(tmp_path, where, request, monkeypatch):
    """``--shards`` in S3 (moto's server) or over HTTP: the listing streams the tar once, the
    member is a ranged read (a compressed tar is read up to it); the JPEGs are the ones the
    same shards on disk give, and a shard the store cannot give names the reason."""
    import gzip

    import pyarrow as pa
    from storage_servers import FileServer

    from unicom.formats.embeddings import write_part

    samples = [{"key": f"{i:09d}", "jpg": encode_image(class_image(i, 0, 48)), "txt": f"caption {i}"} for i in range(4)]
    write_tar_shard(tmp_path / "shards" / "00007.tar", samples)
    (tmp_path / "shards" / "00008.tar.gz").write_bytes(gzip.compress((tmp_path / "shards" / "00007.tar").read_bytes()))
    rows = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    shards = ["00007.tar"] * 4 + ["00008.tar.gz", "00009.tar"]
    keys = [f"{i:09d}" for i in (0, 1, 2, 3, 2, 0)]
    write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"key": keys, "shard": shards}))
    index = Index.build(tmp_path / "emb", tmp_path / "index")
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.bucket("thumbs")
        remote, server = s3.upload_folder(tmp_path / "shards", "thumbs", "shards"), None
    else:
        server = FileServer(tmp_path / "shards")
        remote = server.url
    try:
        with TestClient(create_app(index, shards=tmp_path / "shards")) as local, \
                TestClient(create_app(index, shards=remote)) as client:
            for item in range(5):
                response = client.get(f"/thumbnail/{item}")
                assert response.status_code == 200, response.text
                assert response.content == local.get(f"/thumbnail/{item}").content
            missing = client.get("/thumbnail/5")
            assert missing.status_code == 404
            assert missing.json()["detail"].startswith("the shard 00009.tar of item 5 cannot be fetched (not found")
            if server is not None:  # a missing file is answered at once: asked for once, not retried
                asked = [asked for asked in server.state.requests if "00009" in asked]
                assert asked and len(set(asked)) == len(asked), asked
    finally:
        if server is not None:
            server.stop()


def test_an_item_image_gone_from_its_url_is_404_at_once(tmp_path):
    """An item whose image URL answers 404 (deleted since it was indexed) is answered 404 with
    one request, not after the retries that a transient failure gets: a page waits for it."""
    import pyarrow as pa
    from storage_servers import FileServer

    from unicom.formats.embeddings import write_part

    (tmp_path / "photos").mkdir()
    for i in range(2):
        (tmp_path / "photos" / f"{i}.png").write_bytes(encode_image(class_image(i, 0, 48), "PNG"))
    with FileServer(tmp_path / "photos") as server:
        rows = np.eye(8, dtype=np.float32)[:2]
        paths = [f"{server.url}/{i}.png" for i in range(2)]
        write_part(tmp_path / "emb", 0, image=rows, metadata=pa.table({"image_path": paths}))
        with TestClient(create_app(Index.build(tmp_path / "emb", tmp_path / "index"))) as client:
            assert client.get("/image/0").content == (tmp_path / "photos" / "0.png").read_bytes()
            (tmp_path / "photos" / "1.png").unlink()
            for route in ("image", "thumbnail"):
                missing = client.get(f"/{route}/1")
                assert missing.status_code == 404 and missing.json()["detail"].startswith(
                    "the image of item 1 cannot be fetched (not found")
            assert [asked for asked in server.state.requests if asked.endswith("1.png")] == ["GET 1.png"] * 2


# --------------------------------------------------------------------------- batching


def test_concurrent_queries_share_batches_and_keep_their_own_results():
    calls = []

    def double(items):
        calls.append(list(items))
        return [2 * item for item in items]

    async def scenario():
        batcher = QueryBatcher(double, max_batch=4, max_wait=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        return results, batcher

    results, batcher = asyncio.run(scenario())
    assert results == [2 * i for i in range(10)]
    assert [len(batch) for batch in calls] == [4, 4, 2]
    assert (batcher.queries, batcher.batches, batcher.largest_batch) == (10, 3, 4)


def test_a_lone_client_is_answered_at_once_and_queries_that_come_together_wait_for_companions():
    """With a wait of 30 s: a query at an idle batcher runs at once, and so does the next one
    right after (the last batch held one query); after a batch of several, a query waits for
    a companion (here until the batch is full)."""
    calls = []

    def same(items):
        calls.append(list(items))
        return items

    async def scenario():
        batcher = QueryBatcher(same, max_batch=2, max_wait=30)
        alone = [await asyncio.wait_for(batcher.submit(item), 5) for item in "ab"]
        together = await asyncio.wait_for(asyncio.gather(batcher.submit("c"), batcher.submit("d")), 5)
        after = asyncio.ensure_future(batcher.submit("e"))
        await asyncio.sleep(0.1)
        waited = not after.done()
        last = await asyncio.wait_for(asyncio.gather(after, batcher.submit("f")), 5)
        await batcher.close()
        return alone, together, waited, last

    assert asyncio.run(scenario()) == (["a", "b"], ["c", "d"], True, ["e", "f"])
    assert calls == [["a"], ["b"], ["c", "d"], ["e", "f"]]


def test_a_failing_batch_fails_each_of_its_queries():
    def broken(items):
        raise RuntimeError("model crashed")

    async def scenario():
        batcher = QueryBatcher(broken, max_batch=4, max_wait=0.01)
        outcome = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        await batcher.close()
        return outcome

    assert [str(error) for error in asyncio.run(scenario())] == ["model crashed", "model crashed"]


def test_images_of_a_collection_embedded_from_a_folder_in_s3_are_read_from_s3(s3, tmp_path):
    """`unicom embed` of an image folder in S3 records each image's URL as its image_path:
    thumbnails and full images come from there, the same as for the folder on disk."""
    import timm
    import torch

    from unicom.embed import embed_to_folder

    torch.manual_seed(0)
    checkpoint = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), checkpoint)
    images = write_class_folder(tmp_path / "images", [0, 1], 2)
    s3.bucket("photos")
    remote = s3.upload_folder(tmp_path / "images", "photos", "images")
    for name, root in (("local", str(tmp_path / "images")), ("remote", remote)):
        embed_to_folder([root], tmp_path / f"emb-{name}", "timm/test_vit", pretrained=str(checkpoint), num_workers=0,
                        dtype="float32")
    local, index = (Index.build(tmp_path / f"emb-{name}", tmp_path / f"index-{name}") for name in ("local", "remote"))
    assert index.metadata(3)["image_path"] == f"{remote}/class_001/0001.jpg"
    with TestClient(create_app(local)) as on_disk, TestClient(create_app(index)) as client:
        vector = np.eye(64)[0].tolist()
        hits = client.post("/search", json={"embedding": vector, "k": 4}).json()["results"]
        assert [(hit["thumbnail"], hit["link"]) for hit in hits] == \
            [(f"/thumbnail/{hit['id']}", f"/image/{hit['id']}") for hit in hits]
        for item in range(4):
            thumbnail = client.get(f"/thumbnail/{item}")
            assert thumbnail.status_code == 200, thumbnail.text
            assert thumbnail.content == on_disk.get(f"/thumbnail/{item}").content
            full = client.get(f"/image/{item}")
            assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
            assert full.content == images[item].read_bytes()
        s3.client().delete_object(Bucket="photos", Key="images/class_001/0001.jpg")
        missing = client.get("/image/3")  # the thumbnail is cached; the full image is read again
        assert missing.status_code == 404 and missing.json()["detail"].startswith("the image of item 3 cannot be fetched")


def test_a_cancelled_decoding_holds_its_bytes_until_its_thread_ends():
    """A caller cancelled (a request given up) while its image is decoded in a worker
    thread: the thread goes on holding the memory, so its share of the decoding budget is
    given back when the thread ends, not when the caller is cancelled."""
    import threading

    from unicom.search.batching import ByteBudget

    async def scenario():
        budget = ByteBudget(100)
        started, finish = threading.Event(), threading.Event()

        def decode():
            started.set()
            finish.wait(10)
            return "decoded"

        caller = asyncio.ensure_future(budget.run(60, decode))
        await asyncio.to_thread(started.wait, 10)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        held_while_decoding = budget.used
        finish.set()
        while budget.used:  # the thread ends; its bytes come back
            await asyncio.sleep(0.01)
        return held_while_decoding, budget.used

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == (60, 0)


async def settle():
    """Let every task that can run reach its next wait (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_concurrent_uploads_hold_at_most_the_bodies_budget_and_are_all_answered(served):
    """Twelve uploads sent at once, each body counted twice its Content-Length, to a
    server whose bodies budget (--max-bodies-mb) has room for three: each is answered as
    alone, the budget never holds more than three at once and nothing after."""
    import httpx

    data = served["images"][5].read_bytes()
    sent = httpx.Request("POST", "http://served/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
    body = sent.read()
    app = create_app(served["index"], served["encoder"], max_upload_bytes=200_000, max_body_bytes=3 * 2 * len(body))
    alone = served["client"].post("/search", content=body, headers={"content-type": sent.headers["content-type"]})

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            return await asyncio.gather(*(client.post("/search", content=body, headers={
                "content-type": sent.headers["content-type"]}) for _ in range(12)))

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 12
    assert all([hit["id"] for hit in r.json()["results"]] == [hit["id"] for hit in alone.json()["results"]]
               for r in responses)
    assert app.state.bodies.peak == 3 * 2 * len(body) and app.state.bodies.used == 0


def test_a_body_without_a_length_holds_the_largest_body_a_route_accepts(served):
    """A chunked upload (no Content-Length) is counted as the largest body a route accepts
    (a base64 image of --max-upload-mb in JSON), twice over, however small it turns out."""
    import httpx

    from unicom.search.service import MULTIPART_OVERHEAD

    app = create_app(served["index"], served["encoder"], max_upload_bytes=200_000)
    sent = httpx.Request("POST", "http://served/search", files={"image": ("q.jpg", served["images"][5].read_bytes(),
                                                                           "image/jpeg")})
    body = sent.read()

    async def chunks():
        yield body[:1000]
        yield body[1000:]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            return await client.post("/search", content=chunks(), headers={"content-type": sent.headers["content-type"]})

    response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    assert app.state.bodies.peak == 2 * (200_000 * 4 // 3 + MULTIPART_OVERHEAD) and app.state.bodies.used == 0

    async def long_chunks():
        for _ in range(5):
            yield b"x" * 100_000

    async def too_long():  # read no further than the limit, answered with the option that sets it
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
            return await client.post("/search", content=long_chunks(), headers={"content-type": "application/json"})

    response = asyncio.run(too_long())
    assert (response.status_code, response.json()["detail"]) == (413, (
        f"request body is larger than the limit of {200_000 * 4 // 3 + MULTIPART_OVERHEAD} bytes: an image of at most "
        "200000 bytes (--max-upload-mb) as base64"))
    assert response.headers["x-content-type-options"] == "nosniff" and app.state.bodies.used == 0


def echo_app():
    """An ASGI app that answers a request with the body it reads (and says how it read it)."""
    seen = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append(message)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message.get("body", b"")})

    return app, seen


def asgi_post(app, chunks, headers=(), pause: float = 0.0):
    """POST ``chunks`` to ``app`` (pausing ``pause`` s before each after the first); the
    messages it sent back."""
    sent = []

    async def scenario():
        pending = list(chunks)

        async def receive():
            if not pending:
                await asyncio.sleep(3600)  # the client waits for the answer
            if len(pending) < len(chunks):
                await asyncio.sleep(pause)
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in headers]}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(scenario())
    return sent


def test_a_body_that_arrives_too_slowly_is_answered_408_and_gives_its_share_back():
    from unicom.search.batching import ByteBudget, HeldBodies

    inner, seen = echo_app()
    budget = ByteBudget(10_000)
    app = HeldBodies(inner, budget, limit=1000, seconds=0.2)
    sent = asgi_post(app, [b"a" * 10, b"b" * 10], headers=[("content-length", "20")], pause=0.5)
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"]) == {
        "detail": "the request body did not arrive within 0.2 s; send it again"}
    assert seen == [] and budget.used == 0 and budget.peak == 2 * 20
    sent = asgi_post(app, [b"a" * 10, b"b" * 10], headers=[("content-length", "20")], pause=0.05)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"a" * 10 + b"b" * 10  # given whole, at once
    assert seen == [{"type": "http.request", "body": b"a" * 10 + b"b" * 10, "more_body": False}]


def test_a_chunked_body_longer_than_any_route_accepts_is_answered_413_unread_past_the_limit():
    from unicom.search.batching import ByteBudget, HeldBodies

    inner, seen = echo_app()
    budget = ByteBudget(10_000)
    sent = asgi_post(HeldBodies(inner, budget, limit=100), [b"a" * 60, b"b" * 60, b"c" * 60])
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"]) == {
        "detail": "request body is larger than the limit of 100 bytes"}
    assert seen == [] and budget.used == 0 and budget.peak == 200  # no length: counted as the limit
    # a Content-Length over the limit is the route's to refuse, from the header: nothing held
    sent = asgi_post(HeldBodies(inner, budget, limit=100), [b"a" * 120], headers=[("content-length", "120")])
    assert sent[0]["status"] == 200 and budget.peak == 200


def test_an_image_larger_than_the_decoding_budget_is_not_overtaken_by_smaller_ones_that_came_after_it():
    from unicom.search.batching import ByteBudget

    async def scenario():
        budget, granted = ByteBudget(100), []

        async def request(name: str, size: int) -> int:
            held = await budget.acquire(size)
            granted.append(name)
            return held

        first = await budget.acquire(30)  # a small image being decoded
        big = asyncio.ensure_future(request("big", 500))  # more than the whole budget: decoded alone
        await settle()
        small = [asyncio.ensure_future(request(f"small {i}", 30)) for i in range(3)]  # each would fit beside the first
        await settle()
        assert granted == []  # they wait behind the big one
        await budget.release(first)
        await settle()
        assert granted == ["big"] and budget.used == 100
        await budget.release(await big)
        await settle()
        assert granted == ["big", "small 0", "small 1", "small 2"] and budget.used == 90
        for request in small:
            await budget.release(await request)
        return budget.used, budget.peak

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == (0, 100)


def test_a_waiting_request_given_up_lets_the_ones_behind_it_go():
    from unicom.search.batching import ByteBudget

    async def scenario():
        budget = ByteBudget(100)
        first = await budget.acquire(60)
        big = asyncio.ensure_future(budget.acquire(100))
        await settle()
        small = asyncio.ensure_future(budget.acquire(40))
        await settle()
        assert not small.done()  # behind the big one
        big.cancel()  # its client went away
        await settle()
        assert small.done() and budget.used == 100
        await budget.release(await small)
        await budget.release(first)
        return budget.used

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == 0


@pytest.mark.parametrize("name", ["00000.tar", "00000.tar.gz"])
def test_the_head_of_a_shard_member_is_its_first_bytes_compressed_or_not(tmp_path, name):
    """A thumbnail reads a member's first bytes for its header before the decoding budget
    holds the whole member: a compressed shard too gives those bytes only (decompressed up to
    them), so requests waiting for their share do not each hold a whole image."""
    import gzip

    from unicom.search.item_images import HEAD_BYTES, ShardImages

    member = np.random.default_rng(0).bytes(3 * HEAD_BYTES)
    write_tar_shard(tmp_path / "plain.tar", [{"key": "a", "txt": "before"}, {"key": "b", "png": member}])
    (tmp_path / "shards").mkdir()
    plain = (tmp_path / "plain.tar").read_bytes()
    (tmp_path / "shards" / name).write_bytes(gzip.compress(plain) if name.endswith(".gz") else plain)
    shards = ShardImages(tmp_path / "shards")
    assert shards.size(name, "b") == len(member)
    assert shards.read(name, "b", first=HEAD_BYTES) == member[:HEAD_BYTES]
    assert shards.read(name, "b") == member


@pytest.mark.parametrize("where", ["url", "shard"])
def test_full_images_at_urls_and_in_shards_are_fetched_within_the_decoding_budget(tmp_path, where):
    """GET /image/{id} of an image at a URL (or in a shard at a URL) holds its length in the
    decoding budget (--max-decode-mb) while it is fetched, so with room for one file
    concurrent requests fetch them one at a time. The
    answers are the files as stored; a file that is not an image is 404 from its first bytes
    (never fetched whole), a missing one 404, and afterwards nothing is held."""
    import httpx
    import pyarrow as pa
    from storage_servers import FileServer

    from unicom.formats.embeddings import write_part
    from unicom.search.item_images import HEAD_BYTES

    (tmp_path / "photos").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (3, 600, 800, 3), dtype=np.uint8)  # barely compressed
    for i, image in enumerate(noise):
        Image.fromarray(image).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "photos" / "3.png").write_bytes(b"not an image " * HEAD_BYTES)
    files = [(tmp_path / "photos" / f"{i}.png").read_bytes() for i in range(4)]
    assert min(map(len, files)) > 1_000_000
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": f"{i:04d}", "png": data} for i, data in enumerate(files)])
    with FileServer(tmp_path) as server:
        if where == "url":
            metadata = {"image_path": [f"{server.url}/photos/{i}.png" for i in range(5)]}
        else:
            metadata = {"shard": ["00000.tar"] * 5, "key": [f"{i:04d}" for i in range(5)]}
        write_part(tmp_path / "emb", 0, image=np.eye(8, dtype=np.float32)[:5], metadata=pa.table(metadata))
        app = create_app(Index.build(tmp_path / "emb", tmp_path / "index"), shards=f"{server.url}/shards",
                         max_decode_bytes=min(map(len, files[:3])) * 3 // 2)  # room for one file
        budget = app.state.decoding

        async def scenario():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
                return await asyncio.gather(*(client.get(f"/image/{i}") for i in [0, 1, 2, 3, 4] * 2))

        responses = asyncio.run(scenario())
        assert budget.peak == max(map(len, files[:3])) and budget.used == 0
        for i, response in enumerate(responses[:3] + responses[5:8]):
            assert response.status_code == 200, response.text
            assert response.content == files[i % 3] and response.headers["content-type"] == "image/png"
        for response in responses[3], responses[8]:
            assert (response.status_code, response.json()) == (404, {"detail": "the image file of item 3 is not an image"})
        assert responses[4].status_code == responses[9].status_code == 404
        unranged = [asked for asked in server.state.asked if asked.startswith("GET ") and asked.endswith(" ")]
        assert "GET photos/3.png " not in unranged


def test_a_full_image_being_fetched_does_not_hold_up_other_requests(tmp_path):
    """GET /image/{id} of an image at a URL whose server takes its time: the fetch runs in a
    worker thread, so the server answers other requests meanwhile (here /healthz, while
    the image server holds its answer until /healthz has been answered)."""
    import threading

    import httpx
    import pyarrow as pa
    from storage_servers import QuietHandler, serve

    from unicom.formats.embeddings import write_part

    data = encode_image(class_image(1, 0))
    asked, answered = threading.Event(), threading.Event()

    class Slow(QuietHandler):
        def do_GET(self):
            asked.set()
            answered.wait(20)  # the bound of a server that would wait for ever
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = serve(Slow)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/0.jpg"
        write_part(tmp_path / "emb", 0, image=np.eye(8, dtype=np.float32)[:1], metadata=pa.table({"image_path": [url]}))
        app = create_app(Index.build(tmp_path / "emb", tmp_path / "index"))

        async def scenario():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://served") as client:
                image = asyncio.ensure_future(client.get("/image/0"))
                await asyncio.to_thread(asked.wait, 20)  # the image is being fetched
                health = await client.get("/healthz")
                image_pending = not image.done()
                answered.set()
                return health.status_code, image_pending, await image

        health, image_pending, image = asyncio.run(scenario())
        assert (health, image_pending) == (200, True)
        assert image.status_code == 200 and image.content == data
    finally:
        answered.set()
        server.shutdown()
        server.server_close()


def test_an_image_longer_than_its_server_said_is_never_held_beyond_its_share(tmp_path):
    """The length of an image at a URL, asked for first (HEAD), is what the decoding budget
    holds for its fetching: a server whose whole answer is longer than that (a file replaced
    meanwhile, a HEAD that disagrees with its GET) gets 502 naming it, rather than a file
    held beyond its share; and nothing is held afterwards."""
    import re

    import pyarrow as pa
    from storage_servers import QuietHandler, serve

    from unicom.formats.embeddings import write_part

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(buffer, "PNG")
    data, said = buffer.getvalue(), 300_000
    assert len(data) > 1_000_000

    class Disagreeing(QuietHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", str(said))
            self.end_headers()

        def do_GET(self):
            ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            start, stop = (int(ranged.group(1)), min(len(data), int(ranged.group(2)) + 1)) if ranged else (0, len(data))
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(stop - start))
            self.end_headers()
            try:
                self.wfile.write(data[start:stop])
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = serve(Disagreeing)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/0.png"
        write_part(tmp_path / "emb", 0, image=np.eye(8, dtype=np.float32)[:1], metadata=pa.table({"image_path": [url]}))
        app = create_app(Index.build(tmp_path / "emb", tmp_path / "index"))
        said_message = ("the image of item 0 is longer than the 300,000 bytes its server gave as its length (it changed "
                        "meanwhile, or the server's answers disagree); try again")
        with TestClient(app) as client:
            for route in ("/thumbnail/0", "/image/0"):
                response = client.get(route)
                assert (response.status_code, response.json()) == (502, {"detail": said_message})
        assert app.state.decoding.used == 0 and app.state.decoding.peak == said + thumbnail_held(800, 600)
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_image_whose_header_lies_beyond_its_first_bytes_is_decoded_alone(tmp_path):
    """A JPEG whose size comes after 400 kB of ICC profile: its first 256 KiB (read before the
    decoding budget is asked) do not tell its decoded size, so its thumbnail holds the whole
    budget (it is decoded alone) rather than counting its pixels as nothing; the thumbnail
    is the one Pillow makes of the file."""
    import pyarrow as pa
    from storage_servers import FileServer

    from unicom.formats.embeddings import write_part
    from unicom.search.item_images import HEAD_BYTES
    from unicom.search.uploads import read_header

    (tmp_path / "photos").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photos" / "0.jpg", icc_profile=b"\0" * 400_000)
    data = (tmp_path / "photos" / "0.jpg").read_bytes()
    with pytest.raises(OSError):
        read_header(data[:HEAD_BYTES])
    with FileServer(tmp_path / "photos") as server:
        write_part(tmp_path / "emb", 0, image=np.eye(8, dtype=np.float32)[:1],
                   metadata=pa.table({"image_path": [f"{server.url}/0.jpg"]}))
        app = create_app(Index.build(tmp_path / "emb", tmp_path / "index"), max_decode_bytes=50_000_000)
        with TestClient(app) as client:
            response = client.get("/thumbnail/0")
    assert response.status_code == 200
    image = Image.open(tmp_path / "photos" / "0.jpg")
    image.draft("RGB", (256, 256))
    image = image.convert("RGB")
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    assert response.content == buffer.getvalue()
    assert app.state.decoding.peak == 50_000_000 and app.state.decoding.used == 0


def test_a_server_started_before_a_rebuild_with_the_same_row_counts_refuses_the_rebuilt_metadata(tmp_path, caplog):
    """The vectors a server loaded stay in memory; the metadata files it reads later are the
    rebuild's: with the same rows per part their counts match, the build id does not."""
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    def write(tag: str, seed: int):
        vectors = np.random.default_rng(seed).standard_normal((12, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for number in (0, 1):
            write_part(tmp_path / "emb", number, image=vectors[6 * number:6 * number + 6],
                       metadata=pa.table({"key": [f"{tag}-{number}-{row}" for row in range(6)]}))

    write("old", seed=0)
    loaded = Index.build(tmp_path / "emb", tmp_path / "index")
    with TestClient(create_app(loaded, None), raise_server_exceptions=False) as client:
        write("new", seed=1)
        Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True)  # 6 rows in each part again
        for response in (client.post("/metadata", json={"ids": [3]}), client.post("/search", json={"like": 8, "k": 2})):
            assert response.status_code == 503
            assert response.json()["detail"] == ("index 'index' was rebuilt since this server loaded it; restart "
                                                  "`unicom serve` to serve the rebuilt index")
        metadata = tmp_path / "index" / "metadata"
        assert f"POST /metadata: {metadata / 'metadata_0.parquet'}: written by another build of the index" in caplog.text
        assert "load it again (restart `unicom serve`)" in caplog.text
    with TestClient(create_app(Index.load(tmp_path / "index"), None)) as client:  # restarted: the rebuilt rows
        assert client.post("/metadata", json={"ids": [3, 8]}).json()[1]["metadata"]["key"] == "new-1-2"


def test_a_server_that_has_read_a_metadata_file_refuses_it_once_rebuilt_with_the_same_row_counts(tmp_path, monkeypatch):
    """A server that has been answering has opened its metadata files and read some of their
    row groups; a rebuild afterwards (same rows per part) is refused at the next row group it
    reads, not paired with the vectors it loaded."""
    import pyarrow as pa

    from unicom.formats.embeddings import write_part
    from unicom.search import index as index_module

    monkeypatch.setattr(index_module, "ROW_GROUP_ROWS", 2)  # rows 0-1, 2-3, 4-5: one row group read, two not yet

    def write(tag: str, seed: int):
        vectors = np.random.default_rng(seed).standard_normal((6, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_part(tmp_path / "emb", 0, image=vectors, metadata=pa.table({"key": [f"{tag}-{row}" for row in range(6)]}))

    write("old", seed=0)
    with TestClient(create_app(Index.build(tmp_path / "emb", tmp_path / "index"), None),
                    raise_server_exceptions=False) as client:
        assert client.post("/metadata", json={"ids": [0]}).json()[0]["metadata"]["key"] == "old-0"
        write("new", seed=1)
        Index.build(tmp_path / "emb", tmp_path / "index", overwrite=True)
        assert client.post("/metadata", json={"ids": [1]}).json()[0]["metadata"]["key"] == "old-1"  # held in memory
        response = client.post("/metadata", json={"ids": [5]})
        assert response.status_code == 503
        assert response.json()["detail"] == ("index 'index' was rebuilt since this server loaded it; restart "
                                              "`unicom serve` to serve the rebuilt index")


@pytest.mark.parametrize("where", ["s3", "http"])
def test_a_server_that_has_read_a_remote_metadata_file_refuses_it_once_rebuilt_as_a_rebuild(where, request, tmp_path,
                                                                                             monkeypatch, caplog):
    """A remote metadata file is read at the offsets of the footer read at its first lookup: a
    rebuild afterwards (same rows per part, longer rows) is caught as a changed file, and answered
    as a rebuilt index once its footer records another build."""
    import pyarrow as pa

    from storage_servers import FileServer
    from unicom.formats.embeddings import write_part
    from unicom.search import index as index_module

    monkeypatch.setenv("UNICOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UNICOM_IO_RETRY_DELAY", "0.01")
    monkeypatch.setattr(index_module, "ROW_GROUP_ROWS", 4)

    def write(tag: str, seed: int):
        vectors = np.random.default_rng(seed).standard_normal((40, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_part(tmp_path / "emb", 0, image=vectors, metadata=pa.table({"key": [f"{tag}-{row}" for row in range(40)]}))

    write("old", seed=0)
    Index.build(tmp_path / "emb", tmp_path / "index")
    with contextlib.ExitStack() as stack:
        if where == "s3":
            s3 = request.getfixturevalue("s3")
            s3.bucket("rebuilt-served")
            url = s3.upload_folder(tmp_path / "index", "rebuilt-served", "index")
        else:
            url = f"{stack.enter_context(FileServer(tmp_path)).url}/index/"
        client = stack.enter_context(TestClient(create_app(Index.load(url), None), raise_server_exceptions=False))
        assert client.post("/metadata", json={"ids": [0]}).json()[0]["metadata"]["key"] == "old-0"
        write("a much longer key, so that the row groups move", seed=1)
        Index.build(tmp_path / "emb", url if where == "s3" else tmp_path / "index", overwrite=True)
        response = client.post("/metadata", json={"ids": [37]})
        assert response.status_code == 503
        assert response.json()["detail"] == ("index 'index' was rebuilt since this server loaded it; restart "
                                              "`unicom serve` to serve the rebuilt index")
        assert "metadata_0.parquet: written by another build of the index" in caplog.text


def test_an_index_written_without_a_build_id_serves_its_metadata_as_before(tmp_path):
    import pyarrow.parquet as pq

    found = indexed_image_collection(tmp_path)
    config = json.loads((tmp_path / "index" / "index.json").read_text())
    del config["build"]  # as unicom wrote index.json before it recorded build ids, and its metadata files
    (tmp_path / "index" / "index.json").write_text(json.dumps(config))
    for part in (tmp_path / "index" / "metadata").glob("*.parquet"):
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    with TestClient(create_app(Index.load(tmp_path / "index"), found["encoder"])) as client:
        response = client.post("/metadata", json={"ids": [14]})
        assert response.status_code == 200 and "class_002/0002.jpg" in response.text


def test_a_metadata_file_rewritten_with_pandas_to_add_a_column_is_served_not_refused_as_rebuilt(tmp_path):
    """pandas keeps no parquet key-value metadata, so the rewritten file records no build: it is
    the folder's file as its owner made it, not another build of the index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = indexed_image_collection(tmp_path)
    file = tmp_path / "index" / "metadata" / "metadata_0.parquet"
    table = pq.read_table(file)
    table = table.append_column("note", pa.array([f"note {row}" for row in range(table.num_rows)]))
    pq.write_table(table.replace_schema_metadata(None), file)  # as pandas writes it: no key-value metadata
    with TestClient(create_app(Index.load(tmp_path / "index"), found["encoder"])) as client:
        response = client.post("/metadata", json={"ids": [2]})
        assert response.status_code == 200 and response.json()[0]["metadata"]["note"] == "note 2"


def test_a_full_image_from_a_url_stays_in_the_decoding_budget_until_a_slow_client_has_received_it(tmp_path):
    """GET /image/{id} of an image at a URL: its bytes are in the server's memory until they
    are sent, so their share of the budget is held until then, not only while fetching."""
    import socket

    import pyarrow as pa
    from storage_servers import FileServer

    from support import LiveServer
    from unicom.formats.embeddings import write_part

    data = encode_image(class_image(1, 0), "PNG") + bytes(32 * 2**20)  # far more than the sockets buffer
    (tmp_path / "big.png").write_bytes(data)
    with FileServer(tmp_path) as files:
        write_part(tmp_path / "emb", 0, image=np.eye(8, dtype=np.float32)[:1],
                   metadata=pa.table({"image_path": [f"{files.url}/big.png"]}))
        app = create_app(Index.build(tmp_path / "emb", tmp_path / "index"))
        budget = app.state.decoding
        with LiveServer(app) as url, socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 30) as client:
            client.sendall(b"GET /image/0 HTTP/1.1\r\nHost: served\r\nConnection: close\r\n\r\n")
            answer = client.recv(1024)  # the answer has begun: the image was fetched; the client reads no more
            assert answer.startswith(b"HTTP/1.1 200")
            assert budget.used == len(data)  # held while the body waits to be sent
            while chunk := client.recv(2**20):
                answer += chunk
        assert answer.endswith(data)
        for _ in range(1000):  # the server's send has ended once the client read it all (bounded)
            if budget.used == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert budget.used == 0
