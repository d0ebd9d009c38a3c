"""`unicom cluster show`: contact sheets of clusters beside their nearest clusters."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from support import encode_image, write_tar_shard
from unicom.cli import main
from unicom.cluster import load_labels

SHARDS, PER_SHARD, FAMILIES = 3, 10, 4
THUMB, SAMPLES, NEIGHBOURS = 32, 3, 2
# the documented geometry of the sheet (unicom.cluster.contact_sheet)
LABEL_WIDTH, GAP, BLOCK_GAP = 160, 4, 12


def colour(index: int) -> tuple[int, int, int]:
    """A solid colour per sample: four families of hues, each sample its own shade."""
    family = index % FAMILIES
    base = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][family]
    shade = index // FAMILIES
    return tuple(min(255, c + 3 * shade) if c > 100 else c + 2 * shade for c in base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Shards of solid-colour PNGs, embedded by `unicom embed`'s library call with a
    random-weight timm test_vit, clustered by `unicom cluster` into 4 clusters."""
    import timm
    import torch

    from unicom.embed import embed_to_folder

    root = tmp_path_factory.mktemp("show")
    samples = {}
    for number in range(SHARDS):
        shard = []
        for i in range(PER_SHARD):
            index = number * PER_SHARD + i
            key = f"{number:05d}{i:04d}"
            samples[key] = {"colour": colour(index), "caption": f"swatch number {index}"}
            image = Image.new("RGB", (48, 48), colour(index))
            shard.append({"key": key, "png": encode_image(image, "PNG"), "txt": samples[key]["caption"],
                          "json": {"url": f"http://example.com/{key}.png"}})
        write_tar_shard(root / "shards" / f"{number:05d}.tar", shard)
    torch.manual_seed(0)
    checkpoint = root / "test_vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), checkpoint)
    embed_to_folder([str(root / "shards")], root / "emb", "timm/test_vit", pretrained=str(checkpoint),
                    num_workers=0, dtype="float32")
    assert main(["cluster", "--embeddings", str(root / "emb"), "--fusion", "image", "--k", "4", "--init", "kmeans++",
                 "--out", str(root / "clusters")]) == 0
    return {"root": root, "samples": samples}


class Page(HTMLParser):
    """The sections, rows and figures of the sheet's HTML page."""

    def __init__(self):
        super().__init__()
        self.sections = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append({"cluster": int(attrs["data-cluster"]), "rows": []})
        elif tag == "div" and "row" in attrs.get("class", "").split():
            self.sections[-1]["rows"].append({"cluster": int(attrs["data-cluster"]),
                                              "similarity": attrs.get("data-similarity"), "keys": []})
        elif tag == "figure":
            self.sections[-1]["rows"][-1]["keys"].append(attrs["data-key"])

    def handle_data(self, data):
        self.text.append(data)


def show(run, *extra, sheet="sheet.png"):
    root = run["root"]
    return main(["cluster", "show", "--embeddings", str(root / "emb"), "--input", str(root / "shards"),
                 "--samples", str(SAMPLES), "--neighbours", str(NEIGHBOURS), "--thumbnail", str(THUMB),
                 "--out", str(root / "clusters"), "--sheet", str(root / sheet), *extra])


def nearest_by_numpy(centroids: np.ndarray, cluster: int, count: int):
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    cos = unit @ unit[cluster]
    others = [c for c in range(len(centroids)) if c != cluster]
    ranked = sorted(others, key=lambda c: (-cos[c], c))[:count]
    return ranked, cos[ranked]


def test_sheet_shows_the_chosen_clusters_their_samples_and_their_nearest_clusters(run, capsys):
    root = run["root"]
    assert show(run, "--clusters", "1,3") == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "sheet.png" in printed and "sheet.html" in printed

    labels = load_labels(root / "clusters")
    label_of = dict(zip(labels.column("key").to_pylist(), labels.column("label").to_pylist()))
    sizes = np.bincount(list(label_of.values()), minlength=4)
    centroids = np.load(root / "clusters" / "centroids.npy")

    page = Page()
    page.feed((root / "sheet.html").read_text())
    assert [section["cluster"] for section in page.sections] == [1, 3]
    for section in page.sections:
        rows = section["rows"]
        assert rows[0]["cluster"] == section["cluster"] and rows[0]["similarity"] is None
        expected, cosines = nearest_by_numpy(centroids, section["cluster"], NEIGHBOURS)
        assert [row["cluster"] for row in rows[1:]] == expected
        np.testing.assert_allclose([float(row["similarity"]) for row in rows[1:]], cosines, atol=1e-5)
        for row in rows:
            assert len(row["keys"]) == min(SAMPLES, sizes[row["cluster"]])
            assert len(set(row["keys"])) == len(row["keys"])
            assert all(label_of[key] == row["cluster"] for key in row["keys"])
    text = "".join(page.text)
    shown = [key for section in page.sections for row in section["rows"] for key in row["keys"]]
    assert all(run["samples"][key]["caption"] in text for key in shown)

    sheet = Image.open(root / "sheet.png").convert("RGB")
    rows = sum(len(section["rows"]) for section in page.sections)
    cell = THUMB + GAP
    assert sheet.size == (LABEL_WIDTH + SAMPLES * cell + GAP, GAP + rows * cell + BLOCK_GAP * (len(page.sections) - 1))
    top = GAP
    for section in page.sections:
        for r, row in enumerate(section["rows"]):
            for j in range(SAMPLES):
                x = LABEL_WIDTH + GAP + j * cell + THUMB // 2
                y = top + r * cell + THUMB // 2
                pixel = sheet.getpixel((x, y))
                if j < len(row["keys"]):
                    assert pixel == run["samples"][row["keys"][j]]["colour"]
                else:
                    assert pixel == (255, 255, 255)  # a cluster with fewer samples leaves the cell empty
        top += len(section["rows"]) * cell + BLOCK_GAP


def test_random_clusters_are_a_seeded_draw(run):
    assert show(run, "--random", "2", "--seed", "5", sheet="a.png") == 0
    assert show(run, "--random", "2", "--seed", "5", sheet="b.png") == 0
    root = run["root"]
    assert (root / "a.png").read_bytes() == (root / "b.png").read_bytes()
    page = Page()
    page.feed((root / "a.html").read_text())
    assert len(page.sections) == 2 and len({s["cluster"] for s in page.sections}) == 2


def test_a_missing_cluster_id_is_named(run, capsys):
    assert show(run, "--clusters", "2,9") == 2
    err = capsys.readouterr().err
    assert "no cluster 9" in err and "k = 4" in err


@pytest.mark.parametrize("ids", [",", ""])
def test_a_list_of_clusters_without_an_id_is_refused(run, capsys, ids):
    assert show(run, "--clusters", ids, sheet="none.png") == 2
    assert "--clusters names no cluster id" in capsys.readouterr().err
    assert not (run["root"] / "none.png").exists()


def test_the_labels_of_centroids_trained_again_are_not_shown(run, capsys, tmp_path):
    # the run into OUT with another k after the centroids were deleted: refused before it labels, but the new
    # centroids are in place; the sheet drew their clusters' samples from the old labels
    root, out = run["root"], tmp_path / "clusters"
    shutil.copytree(root / "clusters", out)
    (out / "centroids.npy").unlink()
    (out / "centroids.json").unlink()
    assert main(["cluster", "--embeddings", str(root / "emb"), "--fusion", "image", "--k", "3", "--out", str(out)]) == 2
    capsys.readouterr()
    assert main(["cluster", "show", "--embeddings", str(root / "emb"), "--input", str(root / "shards"), "--clusters", "0",
                 "--out", str(out), "--sheet", str(tmp_path / "sheet.png")]) == 2
    assert f"{out / 'labels'}: the labels there were assigned with other centroids" in capsys.readouterr().err
    assert not (tmp_path / "sheet.png").exists()


def test_a_negative_seed_is_named(run, capsys):
    assert show(run, "--random", "2", "--seed", "-1") == 2
    assert f"a seed >= 0 (got {SAMPLES}, {NEIGHBOURS}, {THUMB}, -1)" in capsys.readouterr().err


def test_a_thumbnail_lower_than_a_rows_label_is_refused(run, capsys):
    # rows are thumbnail + GAP pixels high; a smaller thumbnail drew each label over the next row's
    assert show(run, "--clusters", "0", "--thumbnail", "12", sheet="tiny.png") == 2
    assert "a thumbnail of at least 24 pixels (the height of a row's two-line label)" in capsys.readouterr().err
    assert not (run["root"] / "tiny.png").exists()


def test_at_the_smallest_thumbnail_a_rows_label_stays_in_its_row():
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (400, 100)))
    for label in ("cluster 999999\n1,234,567 images", "  near 999999, cos -0.263\n  1,234,567 images"):
        bottom = draw.multiline_textbbox((GAP, 2), label)[3]  # drawn 2 pixels below the row's top
        assert bottom <= 24 + GAP


def test_a_sheet_too_large_to_open_is_refused_before_any_shard_is_read(run, capsys):
    assert show(run, "--clusters", "0,1", "--samples", "100000", "--thumbnail", "1024", sheet="huge.png") == 2
    assert "the sheet would be 102,800,164 x " in capsys.readouterr().err
    assert not (run["root"] / "huge.png").exists()


def test_a_sheet_name_that_is_not_a_png_is_refused_before_any_label_or_shard_is_read(run, capsys, tmp_path, monkeypatch):
    import unicom.cluster.contact_sheet as contact_sheet

    def no_reading(*args, **kwargs):
        raise AssertionError("the labels were read before the sheet's name was checked")

    monkeypatch.setattr(contact_sheet, "draw_samples", no_reading)
    assert show(run, "--clusters", "0", sheet="sheet.jpg") == 2
    assert "sheet.jpg: the contact sheet is a PNG; give a path ending in .png" in capsys.readouterr().err
    assert not (run["root"] / "sheet.jpg").exists()


def test_a_shard_that_is_gone_is_named(run, capsys, tmp_path):
    root = run["root"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "shards", moved)
    (moved / "00001.tar").unlink()
    code = main(["cluster", "show", "--embeddings", str(root / "emb"), "--input", str(moved), "--clusters", "0,1,2,3",
                 "--samples", "10", "--neighbours", "0", "--out", str(root / "clusters"), "--sheet",
                 str(tmp_path / "s.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "00001.tar" in err and "--input" in err
    assert not (tmp_path / "s.png").exists()


def test_shards_are_needed_to_show_samples_read_from_shards(run, capsys, tmp_path):
    root = run["root"]
    code = main(["cluster", "show", "--embeddings", str(root / "emb"), "--clusters", "0", "--out", str(root / "clusters"),
                 "--sheet", str(tmp_path / "s.png")])
    assert code == 2
    assert "give --input with the shards" in capsys.readouterr().err


def test_a_shard_that_is_not_the_one_embedded_is_named(run, capsys, tmp_path):
    root = run["root"]
    other = tmp_path / "other"
    shutil.copytree(root / "shards", other)
    write_tar_shard(other / "00002.tar", [{"key": "unrelated", "png": encode_image(Image.new("RGB", (8, 8)), "PNG")}])
    code = main(["cluster", "show", "--embeddings", str(root / "emb"), "--input", str(other), "--clusters", "0,1,2,3",
                 "--samples", "10", "--neighbours", "0", "--out", str(root / "clusters"), "--sheet",
                 str(tmp_path / "s.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "00002.tar: no sample with key 00002" in err


def test_image_folder_samples_are_read_from_their_paths(tmp_path):
    """Embeddings of an image folder record each image's path; the sheet shows those files."""
    from support import embedded_image_collection

    found = embedded_image_collection(tmp_path, labels=(0, 1), per_class=4, rows_per_part=3)
    assert main(["cluster", "--embeddings", str(found["emb"]), "--fusion", "image", "--k", "2", "--init", "kmeans++",
                 "--out", str(tmp_path / "clusters")]) == 0
    assert main(["cluster", "show", "--embeddings", str(found["emb"]), "--clusters", "0,1", "--samples", "8",
                 "--neighbours", "1", "--out", str(tmp_path / "clusters")]) == 0
    page = Page()
    page.feed((tmp_path / "clusters" / "contact_sheet.html").read_text())
    labels = load_labels(tmp_path / "clusters")
    label_of = dict(zip(labels.column("key").to_pylist(), labels.column("label").to_pylist()))
    shown = {row["cluster"]: row["keys"] for section in page.sections for row in section["rows"][:1]}
    assert sorted(k for keys in shown.values() for k in keys) == sorted(label_of)  # every image, each once
    assert all(label_of[key] == cluster for cluster, keys in shown.items() for key in keys)
    assert json.loads((tmp_path / "clusters" / "clusters.json").read_text())["k"] == 2


def test_remote_shards_give_the_sheet_of_local_ones(run, monkeypatch, capsys):
    from storage_servers import FileServer

    root = run["root"]
    monkeypatch.setenv("UNICOM_IO_ATTEMPTS", "1")
    assert show(run, "--clusters", "0,2", sheet="local.png") == 0
    with FileServer(root) as server:
        remote = f"{server.url}/shards/{{00000..00002}}.tar"
        assert main(["cluster", "show", "--embeddings", str(root / "emb"), "--input", remote, "--clusters", "0,2",
                     "--samples", str(SAMPLES), "--neighbours", str(NEIGHBOURS), "--thumbnail", str(THUMB),
                     "--out", str(root / "clusters"), "--sheet", str(root / "remote.png")]) == 0
        assert (root / "remote.png").read_bytes() == (root / "local.png").read_bytes()
        assert (root / "remote.html").read_text() == (root / "local.html").read_text()

        server.fault("shards/00001.tar", missing=10)
        code = main(["cluster", "show", "--embeddings", str(root / "emb"), "--input", remote, "--clusters", "0,1,2,3",
                     "--samples", "10", "--neighbours", "0", "--out", str(root / "clusters"), "--sheet",
                     str(root / "gone.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{server.url}/shards/00001.tar: the shard cannot be read" in err and "404" in err
    assert not (root / "gone.png").exists()


def test_an_http_shard_is_found_by_its_name_as_written_in_metadata_embedded_before_names_were_unquoted(tmp_path):
    from storage_servers import FileServer

    from unicom.cluster.contact_sheet import _shard_locations

    write_tar_shard(tmp_path / "shard 00012.tar", [{"key": "a", "txt": "x"}])
    with FileServer(tmp_path) as server:
        url = f"{server.url}/shard%2000012.tar"
        assert _shard_locations([url], {"shard 00012.tar"}) == {"shard 00012.tar": url, "shard%2000012.tar": url}
        assert _shard_locations([url], {"shard%2000012.tar"})["shard%2000012.tar"] == url


def test_an_image_the_store_refuses_is_named_with_the_stores_advice_once(s3, monkeypatch):
    # S3 refusing the credentials says what to check; the sheet adds no second, generic advice
    import moto.settings

    from unicom.cluster.contact_sheet import Sample, _read_file
    from unicom.errors import InputError

    s3.bucket("photos")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the credentials are checked: unknown
    with pytest.raises(InputError) as error:
        _read_file(Sample(part=0, row=0, key="a"), "s3://photos/a.jpg", 32)
    assert str(error.value).startswith("s3://photos/a.jpg: refused (HTTP 403 Forbidden); S3 refused the request: check "
                                       "the credentials (AWS_* variables, --storage-options)")
    assert str(error.value).count("check") == 1


SWATCHES = [(200, 0, 0), (220, 0, 0), (240, 0, 0), (0, 0, 200), (0, 0, 220), (0, 0, 240)]


def show_two_clusters_of_swatches(tmp_path, keys, metadata, label_keys, key_column):
    """Six swatches in one shard under ``keys`` (three reds, three blues), embedded with
    ``metadata``, labelled by ``label_keys`` (the ``key_column`` values): reds cluster 0,
    blues cluster 1. Returns the colours each of the sheet's two rows shows."""
    import pyarrow as pa

    from unicom.formats.clusters import ClusterFolder
    from unicom.formats.embeddings import write_part

    write_tar_shard(tmp_path / "shards" / "00000.tar", [
        {"key": key, "png": encode_image(Image.new("RGB", (24, 24), rgb), "PNG")} for key, rgb in zip(keys, SWATCHES)])
    write_part(tmp_path / "emb", 0, image=np.zeros((6, 4), np.float32),
               metadata=pa.table({"key": keys, **metadata, "shard": ["00000.tar"] * 6}))
    clusters = ClusterFolder(tmp_path / "clusters")
    clusters.write_centroids(np.eye(2, 4, dtype=np.float32), {"k": 2, "dimension": 4, "fusion": "image"})
    clusters.write_labels(0, pa.array(label_keys), np.array([0, 0, 0, 1, 1, 1]), np.ones(6, np.float32),
                          {"rows": 6, "invalid": 0, "key_column": key_column})
    assert main(["cluster", "show", "--embeddings", str(tmp_path / "emb"), "--input", str(tmp_path / "shards"),
                 "--clusters", "0", "--samples", "3", "--neighbours", "1", "--thumbnail", "24",
                 "--out", str(tmp_path / "clusters"), "--sheet", str(tmp_path / "sheet.png")]) == 0
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    cell = 24 + GAP
    return [{sheet.getpixel((LABEL_WIDTH + GAP + j * cell + 12, GAP + r * cell + 12)) for j in range(3)} for r in range(2)]


def test_samples_of_a_shard_that_share_a_key_each_show_their_own_image(tmp_path):
    """A shard holding the keys k0, k1, k2 twice: the first three samples (reds) are cluster 0,
    the last three (blues) cluster 1. The n-th label row of a key is the n-th sample of that key
    in the shard, so each cluster shows its own three swatches, not the first sample of each key."""
    keys = ["k0", "k1", "k2", "k0", "k1", "k2"]
    assert show_two_clusters_of_swatches(tmp_path, keys, {}, keys, "key") == [set(SWATCHES[:3]), set(SWATCHES[3:])]


def test_labels_keyed_by_caption_show_each_sample_from_its_shard(tmp_path):
    """`unicom cluster --key-column caption`: the labels name samples by caption, which two
    samples share ("a photo", one red, one blue). Each label row is shown with its own sample,
    found in the shard by that sample's key, not refused as labels of other shards."""
    captions = ["a photo", "b", "c", "a photo", "e", "f"]
    shown = show_two_clusters_of_swatches(tmp_path, [f"k{i}" for i in range(6)], {"caption": captions}, captions, "caption")
    assert shown == [set(SWATCHES[:3]), set(SWATCHES[3:])]


def test_samples_of_a_key_show_their_own_images_when_one_of_the_key_failed_to_embed(tmp_path):
    """The shard's first sample (k0) could not be embedded; then k0, k1, k2 reds (cluster 0)
    and k0, k1, k2 blues (cluster 1). The metadata and label rows name each sample by its
    occurrence of its key in the shard (the reds' k0 is the key's second sample), so each
    cluster shows its own swatches: not the broken sample, nor a red among the blues."""
    import pyarrow as pa

    from unicom.formats.clusters import ClusterFolder
    from unicom.formats.embeddings import write_part

    keys = ["k0", "k1", "k2", "k0", "k1", "k2"]
    occurrences = pa.array([1, 0, 0, 2, 1, 1], pa.int32())
    write_tar_shard(tmp_path / "shards" / "00000.tar", [{"key": "k0", "png": b"broken"}] + [
        {"key": key, "png": encode_image(Image.new("RGB", (24, 24), rgb), "PNG")} for key, rgb in zip(keys, SWATCHES)])
    write_part(tmp_path / "emb", 0, image=np.zeros((6, 4), np.float32),
               metadata=pa.table({"key": keys, "shard": ["00000.tar"] * 6, "occurrence": occurrences}))
    clusters = ClusterFolder(tmp_path / "clusters")
    clusters.write_centroids(np.eye(2, 4, dtype=np.float32), {"k": 2, "dimension": 4, "fusion": "image"})
    clusters.write_labels(0, pa.array(keys), np.array([0, 0, 0, 1, 1, 1]), np.ones(6, np.float32),
                          {"rows": 6, "invalid": 0, "key_column": "key"}, occurrences)
    assert main(["cluster", "show", "--embeddings", str(tmp_path / "emb"), "--input", str(tmp_path / "shards"),
                 "--clusters", "0", "--samples", "3", "--neighbours", "1", "--thumbnail", "24",
                 "--out", str(tmp_path / "clusters"), "--sheet", str(tmp_path / "sheet.png")]) == 0
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    cell = 24 + GAP
    shown = [{sheet.getpixel((LABEL_WIDTH + GAP + j * cell + 12, GAP + r * cell + 12)) for j in range(3)} for r in range(2)]
    assert shown == [set(SWATCHES[:3]), set(SWATCHES[3:])]
