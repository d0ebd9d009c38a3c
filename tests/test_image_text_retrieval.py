"""``unicom evaluate`` on image-text benchmarks (COCO captions, Flickr30k, a caption table),
scored against clip_benchmark's own ``zeroshot_retrieval.evaluate`` with its own readers
(its Flickr30k reader, torchvision's ``CocoCaptions``) and open_clip's own model.

clip_benchmark's modules are unpacked from its released wheel by
``scripts/install-clip-benchmark.sh`` (:func:`support.clip_benchmark_or_skip`); the tests
that compare with it skip when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unicom.cli import main
from unicom.data.benchmarks import load_caption_benchmark
from unicom.errors import InputError

from support import open_clip_reference, tiny_open_clip

KS = (1, 5, 10)
IMAGES = 16
WORDS = ["red", "green", "blue", "small", "large", "dog", "cat", "car", "tree", "house", "boat", "bird", "on", "near",
         "a", "the", "river", "road", "field", "city"]


def _clip_benchmark():
    from support import clip_benchmark_or_skip

    clip_benchmark_or_skip()
    from clip_benchmark.datasets.flickr import Flickr
    from clip_benchmark.metrics import zeroshot_retrieval

    return zeroshot_retrieval, Flickr


def _captions(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct captions of 4 to 7 words, one with commas (Flickr30k's lines hold them unquoted)."""
    made: list[str] = []
    while len(made) < count:
        text = " ".join(rng.choice(WORDS, rng.integers(4, 8)))
        if text not in made:
            made.append(text)
    made[0] = made[0].replace(" ", ", ", 1)
    return made


def _images(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        h, w = rng.integers(36, 60, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=95)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 images with 2 or 3 captions each, the same data in every layout read here."""
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(1)
    counts = [2 + (i % 2) for i in range(IMAGES)]
    captions = _captions(rng, sum(counts))
    per_image, start = [], 0
    for count in counts:
        per_image.append(captions[start:start + count])
        start += count
    names = [f"{1000 + 37 * i}.jpg" for i in range(IMAGES)]
    spec = tiny_open_clip(root / "clip")

    flickr = root / "flickr"  # clip_benchmark's layout: the list and the images in one folder
    _images(flickr, names)
    lines = ["image,caption"] + [f"{name},{c}" for name, cs in zip(names, per_image) for c in cs]
    (flickr / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")

    coco = root / "coco"  # COCO captions format (clip_benchmark's coco_test_karpathy.json), ids out of order
    coco_names = [f"COCO_val2014_{1000 + 37 * i:012d}.jpg" for i in range(IMAGES)]
    _images(coco / "val2014", coco_names)
    ids = rng.permutation(np.arange(100, 100 + IMAGES)).tolist()
    annotations = [{"image_id": ids[i], "id": 10 * i + j, "caption": c}
                   for i in reversed(range(IMAGES)) for j, c in enumerate(per_image[i])]
    (coco / "coco_test_karpathy.json").write_text(json.dumps({
        "images": [{"id": ids[i], "file_name": coco_names[i]} for i in range(IMAGES)], "annotations": annotations}))

    karpathy = root / "karpathy"  # Karpathy's dataset_coco.json, with train images that are not scored
    (karpathy / "val2014").mkdir(parents=True)
    for name in coco_names:
        os.link(coco / "val2014" / name, karpathy / "val2014" / name)
    entries = [{"filepath": "val2014", "filename": coco_names[i], "split": "test", "cocoid": ids[i],
                "sentences": [{"raw": c, "tokens": c.split()} for c in per_image[i]]} for i in range(IMAGES)]
    entries.insert(3, {"filepath": "train2014", "filename": "absent.jpg", "split": "train",
                       "sentences": [{"raw": "not scored"}]})
    (karpathy / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))

    blip = root / "blip"  # BLIP's/LAVIS's test files: a list of {"image", "caption": [...]}
    (blip / "flickr30k-images").mkdir(parents=True)
    for name in names:
        os.link(flickr / name, blip / "flickr30k-images" / name)
    (blip / "flickr30k_test.json").write_text(json.dumps(
        [{"image": f"flickr30k-images/{name}", "caption": cs, "img_id": i}
         for i, (name, cs) in enumerate(zip(names, per_image))]))

    table = root / "table"  # one row per caption, and the parquet form with a list per image
    table.mkdir()
    for name in names:
        os.link(flickr / name, table / name)
    (table / "captions.csv").write_text("path,caption\n" + "".join(
        f'{name},"{c}"\n' for name, cs in zip(names, per_image) for c in cs))
    pq.write_table(pa.table({"path": names, "caption": per_image}), table / "captions.parquet")
    return {"root": root, "spec": spec, "flickr": flickr, "coco": coco, "karpathy": karpathy, "table": table, "blip": blip,
            "per_image": per_image, "names": names}


def _reference(dataset, images) -> dict:
    """clip_benchmark's retrieval metrics of open_clip's own model on ``images`` (a dataset of
    (image tensor, list of captions)), without mixed precision."""
    import torch
    from torch.utils.data import DataLoader, default_collate

    zeroshot_retrieval, _ = _clip_benchmark()
    model, _, tokenizer = open_clip_reference(dataset["spec"])

    def collate(batch):  # clip_benchmark's image_captions_collate_fn
        transposed = list(zip(*batch))
        return default_collate(transposed[0]), transposed[1]

    loader = DataLoader(images, batch_size=5, collate_fn=collate)
    with torch.no_grad():
        return zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=list(KS))


def _evaluate(dataset, name: str, root: Path, out: Path) -> dict:
    assert main(["evaluate", "--model", dataset["spec"], "--dataset", name, "--root", str(root), "--out", str(out),
                 "--workers", "0", "--batch-size", "8"]) == 0
    return json.loads((out / "metrics.json").read_text())


def _refused(args: list[str], capsys) -> str:
    """``unicom evaluate ARGS`` exits with status 2; its error message."""
    assert main(["evaluate", *args]) == 2
    return capsys.readouterr().err


def _assert_same(report: dict, reference: dict) -> None:
    for k in KS:  # clip_benchmark names directions by what is retrieved; its means are float32
        assert report["text_to_image"][f"recall@{k}"] == pytest.approx(reference[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert report["image_to_text"][f"recall@{k}"] == pytest.approx(reference[f"text_retrieval_recall@{k}"], abs=1e-6)


def test_flickr30k_scores_as_clip_benchmark_does(dataset, tmp_path, capsys):
    _, Flickr = _clip_benchmark()
    _, preprocess, _ = open_clip_reference(dataset["spec"])
    ann = dataset["flickr"] / "flickr30k_test_karpathy.txt"
    reference = _reference(dataset, Flickr(str(dataset["flickr"]), str(ann), transform=preprocess))
    report = _evaluate(dataset, "flickr30k", dataset["flickr"], tmp_path / "out")
    _assert_same(report, reference)
    recalls = [report[d][f"recall@{k}"] for d in ("text_to_image", "image_to_text") for k in KS]
    assert 0 < min(recalls) and max(recalls) < 1  # a test that could fail: neither nothing nor everything found
    assert report["mean_recall"] == pytest.approx(np.mean(recalls))
    assert report["protocol"]["images"] == IMAGES and report["protocol"]["captions"] == sum(map(len, dataset["per_image"]))
    assert report["text_to_image"]["n_queries"] == report["protocol"]["captions"]
    assert report["image_to_text"]["n_queries"] == IMAGES
    table = capsys.readouterr().out
    assert "| text → image |" in table and f"{100 * report['text_to_image']['recall@5']:.2f}" in table
    assert (tmp_path / "out" / "metrics.md").read_text() in table


def test_coco_captions_score_as_clip_benchmark_with_torchvisions_reader(dataset, tmp_path):
    pytest.importorskip("pycocotools")
    from torchvision.datasets import CocoCaptions

    _, preprocess, _ = open_clip_reference(dataset["spec"])
    coco = CocoCaptions(str(dataset["coco"] / "val2014"), str(dataset["coco"] / "coco_test_karpathy.json"),
                        transform=preprocess)
    reference = _reference(dataset, coco)
    _assert_same(_evaluate(dataset, "coco-captions", dataset["coco"], tmp_path / "out"), reference)


def test_karpathys_and_blips_files_and_caption_tables_give_the_same_scores(dataset, tmp_path):
    flickr = _evaluate(dataset, "flickr", dataset["flickr"], tmp_path / "flickr")
    for name, root in (("coco", dataset["karpathy"]), ("flickr30k", dataset["blip"]),
                       ("captions", dataset["table"] / "captions.csv"),
                       ("captions", dataset["table"] / "captions.parquet")):
        report = _evaluate(dataset, name, root, tmp_path / f"{name}-{Path(root).name}")
        for direction in ("text_to_image", "image_to_text"):
            for k in KS:
                assert report[direction][f"recall@{k}"] == pytest.approx(flickr[direction][f"recall@{k}"], abs=1e-9), (name, root)


def test_the_split_lists_each_image_once_with_its_captions_in_order(dataset):
    split = load_caption_benchmark("flickr30k", dataset["flickr"])
    assert split.images.keys == dataset["names"]
    assert split.captions == [c for cs in dataset["per_image"] for c in cs]
    assert "," in split.captions[0]  # the first comma ends the image name, the others are the caption's
    assert split.caption_image.tolist() == [i for i, cs in enumerate(dataset["per_image"]) for _ in cs]
    karpathy = load_caption_benchmark("coco-captions", dataset["karpathy"])
    assert karpathy.images.keys[0] == "val2014/" + "COCO_val2014_000000001000.jpg" and len(karpathy.images) == IMAGES


def test_a_rerun_reads_the_cached_embeddings_and_other_captions_are_refused(dataset, tmp_path, capsys):
    import shutil

    root = tmp_path / "flickr"
    shutil.copytree(dataset["flickr"], root)
    first = _evaluate(dataset, "flickr30k", root, tmp_path / "out")
    images = tmp_path / "out" / "embeddings" / "images" / "img_emb" / "img_emb_0.npy"
    texts = tmp_path / "out" / "embeddings" / "captions" / "text_emb" / "text_emb_0.npy"
    stamps = images.stat().st_mtime_ns, texts.stat().st_mtime_ns
    assert _evaluate(dataset, "flickr30k", root, tmp_path / "out") == first
    assert (images.stat().st_mtime_ns, texts.stat().st_mtime_ns) == stamps
    ann = root / "flickr30k_test_karpathy.txt"
    ann.write_text(ann.read_text().replace("\n", " again\n").replace("caption again\n", "caption\n", 1))
    err = _refused(["--model", dataset["spec"], "--dataset", "flickr30k", "--root", str(root), "--out",
                    str(tmp_path / "out"), "--workers", "0"], capsys)
    assert "embeddings made otherwise (captions_sha256:" in err  # the cache names what changed


def test_a_model_without_a_text_tower_is_refused_naming_it(dataset, tmp_path, capsys):
    with pytest.warns(UserWarning, match="random weights"):
        err = _refused(["--model", "timm/test_vit", "--dataset", "flickr30k", "--root", str(dataset["flickr"]),
                        "--out", str(tmp_path / "out"), "--workers", "0"], capsys)
    assert "timm/test_vit has no text tower (timm's image models have no text tower)" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--dims", "none"], "--dims: --dataset flickr30k scores image-text retrieval at the full dimension"),
    (["--no-pca", "--pca-samples", "10"], "--no-pca, --pca-samples: --dataset flickr30k"),
    (["--knn-k", "5"], "--knn-k: --dataset flickr30k"),
    (["--classes", "a"], "--dataset flickr30k has images and captions, not classes"),
])
def test_options_that_do_not_apply_are_refused(dataset, tmp_path, capsys, extra, message):
    assert message in _refused(["--model", dataset["spec"], "--dataset", "flickr30k", "--root", str(dataset["flickr"]),
                                "--out", str(tmp_path / "out"), *extra], capsys)


def test_embeddings_instead_of_a_model_are_refused(dataset, tmp_path, capsys):
    err = _refused(["--embeddings", str(tmp_path), "--dataset", "coco", "--root", str(dataset["coco"]),
                    "--out", str(tmp_path / "out")], capsys)
    assert "--dataset coco-captions embeds its images and captions with --model" in err


def test_a_missing_annotation_file_names_every_place_looked(tmp_path):
    with pytest.raises(InputError) as error:
        load_caption_benchmark("coco-captions", tmp_path)
    assert "coco_test_karpathy.json" in str(error.value) and "dataset_coco.json" in str(error.value)
    assert "annotations/captions_val2017.json" in str(error.value)


def test_missing_images_are_named_with_the_file_that_lists_them(dataset, tmp_path):
    import shutil

    root = tmp_path / "flickr"
    shutil.copytree(dataset["flickr"], root)
    (root / dataset["names"][2]).unlink()
    with pytest.raises(InputError, match=r"flickr30k_test_karpathy.txt: 1 of the images it lists are missing"):
        load_caption_benchmark("flickr30k", root)


@pytest.mark.parametrize("content, message", [
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]},
     r"annotations\[0\] names image 2, which 'images' does not list"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []},
     "image id 1 is listed twice"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": " "}]},
     r"annotations\[0\]: a caption must be non-empty text"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
      "annotations": [{"image_id": 1, "caption": "x"}]}, r"1 images have no caption, e.g. \['b.jpg'\]"),
    ([1, 2], "not a COCO captions file"),
])
def test_a_malformed_coco_file_is_refused_naming_the_entry(tmp_path, content, message):
    (tmp_path / "coco_test_karpathy.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        load_caption_benchmark("coco-captions", tmp_path, check_images=False)


def test_a_caption_table_that_gives_one_key_two_images_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption,key\na.jpg,one,k\nb.jpg,two,k\n")
    with pytest.raises(InputError, match=r"row 2: key 'k' names .*b.jpg, an earlier row .*a.jpg"):
        load_caption_benchmark("captions", tmp_path / "t.csv", check_images=False)


def test_a_list_of_captions_is_refused_where_one_caption_a_row_is_read(tmp_path):
    from unicom.data.lists import read_table

    pq.write_table(pa.table({"path": ["a.jpg"], "caption": [["one", "two"]]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"column 'caption' holds list<.*>, not one caption per row"):
        read_table(tmp_path / "t.parquet")


def test_a_flickr_list_without_its_header_line_keeps_its_first_caption(dataset, tmp_path):
    import shutil

    root = tmp_path / "flickr"
    shutil.copytree(dataset["flickr"], root)
    ann = root / "flickr30k_test_karpathy.txt"
    ann.write_text(ann.read_text().split("\n", 1)[1].replace("\n", "\r\n"))  # no header, Windows line ends
    split = load_caption_benchmark("flickr30k", root)
    assert split.captions == [c for cs in dataset["per_image"] for c in cs]


@pytest.mark.parametrize("content, message", [
    ([{"image": "a.jpg"}], r"entry 0 has no 'image' path and 'caption'"),
    ([{"image": "a.jpg", "caption": []}], r"entry 0 \(a.jpg\) has an empty list of captions"),
    ([{"image": "a.jpg", "caption": ["fine", ""]}], r"entry 0: a caption must be non-empty text"),
    ({"images": []}, "not a list of {'image', 'caption'} entries"),
])
def test_a_malformed_blip_file_is_refused_naming_the_entry(tmp_path, content, message):
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        load_caption_benchmark("flickr30k", tmp_path, check_images=False)


def test_a_caption_table_keeps_its_captions_as_written_and_needs_the_column(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\na.jpg,1984\na.jpg,007\nb.jpg,\"a, comma\"\n")
    split = load_caption_benchmark("captions", tmp_path / "t.csv", check_images=False)
    assert split.captions == ["1984", "007", "a, comma"] and split.caption_image.tolist() == [0, 0, 1]
    (tmp_path / "u.csv").write_text("path,text\na.jpg,one\n")
    with pytest.raises(InputError, match=r"u.csv: no 'caption' column; columns are \['path', 'text'\]"):
        load_caption_benchmark("captions", tmp_path / "u.csv", check_images=False)


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_several_caption_benchmarks_at_once_are_summarised_by_the_recall_at_1_of_each_direction(dataset, tmp_path,
                                                                                                capsys):
    out = tmp_path / "both"
    assert main(["evaluate", "--model", dataset["spec"], "--dataset", "flickr30k,coco-captions", "--root",
                 f"{dataset['flickr']},{dataset['coco']}", "--out", str(out), "--workers", "0", "--batch-size", "8"]) == 0
    summary = json.loads((out / "benchmarks.json").read_text())
    roots = {"flickr30k": dataset["flickr"], "coco-captions": dataset["coco"]}
    for row, name in zip(summary["benchmarks"], roots):
        alone = _evaluate(dataset, name, roots[name], tmp_path / name)
        assert json.loads((out / name / "metrics.json").read_text())["text_to_image"] == alone["text_to_image"]
        assert row == {"dataset": name, "task": "image-text", "report": f"{name}/metrics.md", "scores": {
            "text → image recall@1": alone["text_to_image"]["recall@1"],
            "image → text recall@1": alone["image_to_text"]["recall@1"]}}
    assert "| flickr30k | image-text | text → image recall@1 " in (out / "benchmarks.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", "--model", dataset["spec"], "--dataset", "flickr30k,coco-captions", "--root",
                 f"{dataset['flickr']},{dataset['coco']}", "--out", str(tmp_path / "x"), "--dims", "none"]) == 2
    assert ("--dims: for retrieval and classification benchmarks; --dataset flickr30k,coco-captions has none"
            in capsys.readouterr().err)
