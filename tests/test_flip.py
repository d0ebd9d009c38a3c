"""Test-time mirroring (``--flip``): each image embedding the mean of the image's features and
its mirror image's, checked against images mirrored by Pillow, through `unicom embed`,
`index`, `search`, `serve` and `evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageOps

from unicom.cli import main
from unicom.embed import embed_images
from unicom.evaluate.metrics import retrieval_metrics
from unicom.formats.embeddings import read_config, read_embedding_folder
from unicom.models.encoders import FlipAveraged, load_encoder, with_flip
from unicom.search.index import Index

from support import class_image, embedded_image_collection, free_port


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mirrored_reference(encoder, images: list[Image.Image]) -> np.ndarray:
    """The mean of the features of each image and of its mirror made by Pillow (before the
    transform), L2-normalised: what mirroring the model input must give when the transform
    commutes with mirroring (square images, or an even margin cropped)."""
    plain = embed_images(encoder, images, num_workers=0, normalize=False)
    mirrored = embed_images(encoder, [ImageOps.mirror(image) for image in images], num_workers=0, normalize=False)
    return _unit((plain.astype(np.float64) + mirrored) / 2)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("flip")
    found = embedded_image_collection(root)  # the plain embeddings, in found["emb"]
    encoder = load_encoder("timm/test_vit", str(found["checkpoint"]))
    flipped = root / "flipped"
    assert main(["embed", "--input", str(root / "images"), "--out", str(flipped), "--model", "timm/test_vit",
                 "--pretrained", str(found["checkpoint"]), "--flip", "--dtype", "float32", "--workers", "0"]) == 0
    assert main(["index", "--emb", str(flipped), "--out", str(root / "index")]) == 0
    return {**found, "root": root, "encoder": encoder, "flipped": flipped, "index": root / "index"}


def test_flipped_embeddings_are_the_mean_of_each_image_and_its_mirror_made_by_pillow(collection):
    encoder = collection["encoder"]
    # square images, and 96 x 64 ones whose 32-pixel margin the centre crop splits evenly
    images = [class_image(label, i) for label, i in ((1, 0), (3, 2), (4, 1))]
    images += [class_image(label, i, size=96).crop((0, 16, 96, 80)) for label, i in ((5, 0), (2, 3))]
    reference = mirrored_reference(encoder, images)
    flipped = embed_images(encoder, images, num_workers=0, flip=True)
    np.testing.assert_allclose(flipped, reference, atol=2e-5)
    # the same through the wrapper given as the model, and averaged once when wrapped twice
    np.testing.assert_allclose(embed_images(FlipAveraged(FlipAveraged(encoder)), images, num_workers=0), reference,
                               atol=2e-5)
    # an image and its mirror have one embedding
    mirrors = embed_images(encoder, [ImageOps.mirror(image) for image in images], num_workers=0, flip=True)
    np.testing.assert_allclose(mirrors, flipped, atol=2e-5)
    plain = embed_images(encoder, images, num_workers=0)
    assert (np.linalg.norm(plain - reference, axis=1) > 1e-3).all()  # mirroring changes these images' embeddings
    assert with_flip(encoder, False) is encoder
    assert FlipAveraged(encoder).weights_sha256() == encoder.weights_sha256()


def test_embed_flip_writes_the_mirrored_mean_and_records_it(collection, capsys):
    x, metadata = read_embedding_folder(collection["flipped"])
    paths = metadata.column("image_path").to_pylist()
    reference = mirrored_reference(collection["encoder"], [Image.open(path).convert("RGB") for path in paths])
    np.testing.assert_allclose(x, reference, atol=2e-5)
    config = read_config(collection["flipped"])
    assert config["flip"] is True
    assert "flip" not in read_config(collection["emb"])  # a folder embedded without it records nothing new
    capsys.readouterr()
    # a rerun without --flip would mix two ways of embedding in one folder
    assert main(["embed", "--input", str(collection["root"] / "images"), "--out", str(collection["flipped"]),
                 "--model", "timm/test_vit", "--pretrained", str(collection["checkpoint"]), "--dtype", "float32",
                 "--workers", "0"]) == 2
    assert "flip" in capsys.readouterr().err
    assert main(["embed", "--input", str(collection["root"] / "images"), "--out", str(collection["root"] / "texts"),
                 "--model", "timm/test_vit", "--modalities", "text", "--flip"]) == 2
    assert "--flip" in capsys.readouterr().err


def test_the_index_embeds_its_image_queries_as_its_collection_was(collection, capsys):
    index = Index.load(collection["index"])
    assert index.config["model"]["flip"] is True
    query = collection["images"][21]  # vertical stripes: its mirror is another image to the model
    capsys.readouterr()
    assert main(["search", "--index", str(collection["index"]), str(query), "-k", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert top["id"] == 21 and top["score"] == pytest.approx(1.0, abs=1e-4)
    scores, ids = index.search_images(collection["encoder"], [query], k=1)  # the Python API alike
    assert ids[0, 0] == 21 and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    # without the mirror the query would not find its own embedding at 1
    plain = embed_images(collection["encoder"], [query], num_workers=0)[0]
    assert float(plain @ read_embedding_folder(collection["flipped"])[0][21]) < 0.999


def test_serve_embeds_uploads_as_its_index_was(collection):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "unicom", "serve", "--index", str(collection["index"]), "--port",
                               str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        import base64

        query = collection["images"][19]
        body = json.dumps({"image": base64.b64encode(query.read_bytes()).decode(), "k": 1}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/search", data=body,
                                         headers={"Content-Type": "application/json"})
        top = json.loads(urllib.request.urlopen(request, timeout=60).read())["results"][0]
        assert top["id"] == 19 and top["score"] == pytest.approx(1.0, abs=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_evaluate_flip_scores_the_mirrored_means(collection, tmp_path):
    root = collection["root"] / "images"
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "timm/test_vit", "--pretrained", str(collection["checkpoint"]),
                 "--dataset", "folder", "--root", str(root), "--out", str(out), "--flip", "--workers", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["flip"] is True
    assert "each image averaged with its mirror" in (out / "metrics.md").read_text().splitlines()[0]
    x, metadata = read_embedding_folder(out / "embeddings" / "query")
    keys = metadata.column("key").to_pylist()
    images = [Image.open(root / key).convert("RGB") for key in keys]
    reference = mirrored_reference(collection["encoder"], images)
    np.testing.assert_allclose(x, reference, atol=2e-5)
    labels = np.array([int(key.split("/")[0].split("_")[1]) for key in keys])
    expected = retrieval_metrics(reference.astype(np.float32), labels, ks=(1, 2, 4, 8))
    for name in ("recall@1", "recall@2", "map@r"):
        assert report["metrics"][name] == pytest.approx(expected[name], abs=1e-9)
    # the cached embeddings are of the mirrored means: a run without --flip does not read them back
    assert main(["evaluate", "--model", "timm/test_vit", "--pretrained", str(collection["checkpoint"]),
                 "--dataset", "folder", "--root", str(root), "--out", str(out), "--workers", "0"]) == 2


def test_flip_is_refused_for_embeddings_already_made(collection, tmp_path, capsys):
    assert main(["evaluate", "--embeddings", str(collection["flipped"]), "--out", str(tmp_path / "a"),
                 "--flip"]) == 2
    assert "unicom embed --flip" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(collection["flipped"]), "--dataset", "folder", "--root",
                 str(collection["root"] / "images"), "--out", str(tmp_path / "b"), "--flip"]) == 2
    assert "unicom embed --flip" in capsys.readouterr().err


def test_a_whitening_learned_on_embeddings_made_otherwise_is_refused(collection, tmp_path, capsys):
    # the flipped folder whitened by a PCA of the plain one: the same weights, another way of embedding
    assert main(["evaluate", "--embeddings", str(collection["flipped"]), "--whiten", str(collection["emb"]),
                 "--out", str(tmp_path / "w"), "--no-pca"]) == 2
    error = capsys.readouterr().err
    assert "--whiten" in error and "mirror" in error and "no --flip" in error
    # the report of a flipped folder says so
    assert main(["evaluate", "--embeddings", str(collection["flipped"]), "--out", str(tmp_path / "f"),
                 "--no-pca"]) == 0
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["flip"] is True
