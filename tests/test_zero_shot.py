"""``unicom evaluate --zero-shot``: classification by a CLIP's text tower, scored against
clip_benchmark's own ``zeroshot_classification`` (its classifier from the prompts, its
accuracy, scikit-learn's balanced accuracy) with open_clip's own model and templates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unicom.cli import main
from unicom.data.benchmarks import load_classification_benchmark

from support import clip_benchmark_or_skip, open_clip_reference, tiny_open_clip

CLASSES = ["Forest", "River", "SeaLake", "Highway", "AnnualCrop", "Pasture"]
PER_CLASS = 6


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    """EuroSAT's layout (``eurosat/2750/<class>/``), 6 classes of 6 images, each class tinted
    its own colour; a tiny CLIP with random weights."""
    root = tmp_path_factory.mktemp("eurosat")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / "eurosat" / "2750" / name
        folder.mkdir(parents=True)
        tint = rng.integers(0, 256, size=3)
        for i in range(PER_CLASS):
            pixels = np.clip(tint + rng.normal(0, 40, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.jpg", quality=95)
    return {"root": root, "spec": tiny_open_clip(root / "clip")}


def _evaluate(eurosat, out: Path, *options: str) -> dict:
    assert main(["evaluate", "--model", eurosat["spec"], "--dataset", "eurosat", "--root", str(eurosat["root"]),
                 "--out", str(out), "--workers", "0", "--zero-shot", *options]) == 0
    return json.loads((out / "metrics.json").read_text())


def _reference(eurosat, prompts: dict[str, list[str]] | list[str], names: list[str]) -> dict:
    """clip_benchmark's zero-shot accuracy (top-1, top-5) and mean per-class recall of the
    test split, with class-specific prompts ``prompts`` (its dict form) in label order, or
    templates (its list form, filled in by clip_benchmark)."""
    import torch
    from sklearn.metrics import balanced_accuracy_score

    clip_benchmark_or_skip()
    from clip_benchmark.metrics import zeroshot_classification as zsc

    model, preprocess, tokenizer = open_clip_reference(eurosat["spec"])
    _, test, _ = load_classification_benchmark("eurosat", eurosat["root"])
    images = [(preprocess(Image.open(p).convert("RGB")), int(y)) for p, y in zip(test.images, test.labels)]
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    classifier = zsc.zero_shot_classifier(model, tokenizer, names, prompts, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    top5 = logits.topk(5, dim=1).indices == target[:, None]  # its accuracy(), whose float() of an array NumPy 2 refuses
    return {"accuracy": top5[:, 0].double().mean().item(), "top5": top5.any(dim=1).double().mean().item(),
            "mean_per_class": balanced_accuracy_score(target.numpy(), logits.argmax(dim=1).numpy())}


def _assert_same(scores: dict, reference: dict) -> None:
    for key in ("accuracy", "top5", "mean_per_class"):
        assert scores[key] == pytest.approx(reference[key], abs=1e-9), key


def test_zero_shot_with_open_clips_templates_scores_as_clip_benchmark(eurosat, tmp_path, capsys):
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    report = _evaluate(eurosat, tmp_path / "out", "--templates", "simple", "--no-probe", "--no-knn")
    _, test, _ = load_classification_benchmark("eurosat", eurosat["root"])
    names = test.class_names  # label order: the folders sorted
    prompts = {name: [template(name) for template in SIMPLE_IMAGENET_TEMPLATES] for name in names}
    _assert_same(report["zero_shot"], _reference(eurosat, prompts, names))
    assert 0 < report["zero_shot"]["top5"] and report["zero_shot"]["accuracy"] < 1
    assert report["zero_shot"]["prompts_per_class"] == len(SIMPLE_IMAGENET_TEMPLATES) == 7
    assert report["zero_shot"]["class_names"] == names
    assert "linear_probe" not in report and "knn" not in report
    assert report["protocol"]["train"] == 0 and report["protocol"]["test"] == len(test)
    assert not (tmp_path / "out" / "embeddings" / "train").exists()  # zero-shot alone embeds no train split
    table = capsys.readouterr().out
    assert "| zero-shot |" in table and "7 prompts a class (simple)" in table


def test_class_names_and_templates_from_files(eurosat, tmp_path):
    _, test, _ = load_classification_benchmark("eurosat", eurosat["root"])
    names = [f"satellite view of {name.lower()}" for name in test.class_names]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    templates = ["a picture of {c}.", "{c}, from above"]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n\n")
    report = _evaluate(eurosat, tmp_path / "out", "--class-names", str(tmp_path / "names.txt"),
                       "--templates", str(tmp_path / "templates.txt"))
    prompts = {name: [t.replace("{c}", name) for t in templates] for name in names}
    _assert_same(report["zero_shot"], _reference(eurosat, prompts, names))
    assert report["zero_shot"]["templates"] == str((tmp_path / "templates.txt").resolve())
    assert "linear_probe" in report and "knn" in report  # beside the probe and kNN, as asked


def test_clip_benchmarks_own_templates_of_the_dataset_score_as_clip_benchmark_with_them(eurosat, tmp_path, capsys):
    clip_benchmark_or_skip()  # its package on the path: the templates are read from it as from an installed one
    import clip_benchmark

    path = Path(clip_benchmark.__file__).parent / "datasets" / "en_zeroshot_classification_templates.json"
    templates = json.loads(path.read_text())["eurosat"]
    report = _evaluate(eurosat, tmp_path / "out", "--templates", "clip_benchmark", "--no-probe", "--no-knn")
    _, test, _ = load_classification_benchmark("eurosat", eurosat["root"])
    _assert_same(report["zero_shot"], _reference(eurosat, templates, test.class_names))
    assert report["zero_shot"]["templates"] == "clip_benchmark"
    assert report["zero_shot"]["prompts_per_class"] == len(templates) == 3  # EuroSAT's own, not ImageNet's 80
    assert "3 prompts a class (clip_benchmark)" in capsys.readouterr().out


def test_clip_benchmark_templates_name_what_is_missing(tmp_path):
    import subprocess
    import sys

    from unicom.errors import InputError
    from unicom.evaluate.zero_shot import read_templates

    clip_benchmark_or_skip()
    with pytest.raises(InputError, match="clip_benchmark: clip_benchmark has none for birdsnap .it has caltech101, cars, cifar10"):
        read_templates("clip_benchmark", "birdsnap")
    assert len(read_templates("clip_benchmark", "imagenet")) == 80 and len(read_templates("clip_benchmark", "cifar10")) == 18
    # a Python without clip_benchmark on its path: what to install, or which other templates to give
    code = ("from unicom.evaluate.zero_shot import read_templates\n"
            "try:\n    read_templates('clip_benchmark', 'cifar10')\nexcept Exception as error:\n    print(error)")
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "lists from clip_benchmark, which is not installed: pip install clip-benchmark" in answer.stdout


EUROSAT_CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                   "Residential", "River", "SeaLake"]


def test_clip_benchmarks_names_and_templates_of_eurosat_score_as_clip_benchmark_does(tmp_path, capsys):
    clip_benchmark_or_skip()
    import clip_benchmark

    rng = np.random.default_rng(1)
    for name in EUROSAT_CLASSES:  # all ten classes: clip_benchmark's list names them in torchvision's label order
        folder = tmp_path / "data" / "eurosat" / "2750" / name
        folder.mkdir(parents=True)
        tint = rng.integers(0, 256, size=3)
        for i in range(3):
            pixels = np.clip(tint + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.jpg", quality=95)
    data = {"root": tmp_path / "data", "spec": tiny_open_clip(tmp_path / "clip")}
    report = _evaluate(data, tmp_path / "out", "--templates", "clip_benchmark", "--class-names", "clip_benchmark",
                       "--no-probe", "--no-knn")
    folder = Path(clip_benchmark.__file__).parent / "datasets"
    names = json.loads((folder / "en_classnames.json").read_text())["eurosat"]
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())["eurosat"]
    assert report["zero_shot"]["class_names"] == names and names[0] == "annual crop land"
    _assert_same(report["zero_shot"], _reference(data, templates, names))


def test_clip_benchmarks_names_of_another_count_of_classes_are_refused(eurosat, tmp_path, capsys):
    clip_benchmark_or_skip()
    code = main(["evaluate", "--model", eurosat["spec"], "--dataset", "eurosat", "--root", str(eurosat["root"]), "--out",
                 str(tmp_path / "out"), "--workers", "0", "--zero-shot", "--class-names", "clip_benchmark",
                 "--no-probe", "--no-knn"])
    assert code == 2  # six of EuroSAT's ten classes here: a list of ten is not matched to them by guessing
    assert "names 10 classes for eurosat, which has 6 here" in capsys.readouterr().err


def test_the_default_templates_are_open_clips_eighty(eurosat, tmp_path):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    _, test, _ = load_classification_benchmark("eurosat", eurosat["root"])
    report = _evaluate(eurosat, tmp_path / "out", "--no-probe", "--no-knn")
    prompts = {name: [template(name) for template in OPENAI_IMAGENET_TEMPLATES] for name in test.class_names}
    _assert_same(report["zero_shot"], _reference(eurosat, prompts, test.class_names))
    assert report["zero_shot"]["prompts_per_class"] == 80 and report["zero_shot"]["templates"] == "openai"


def test_names_take_spaces_for_underscores_and_imagenet_takes_open_clips_names():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from unicom.evaluate.zero_shot import class_names

    assert class_names("food101", ["apple_pie", "baby_back_ribs"], 2) == ["apple pie", "baby back ribs"]
    torchvision_names = [(f"synonym{i}", "other") for i in range(1000)]  # torchvision's ImageNet.classes: tuples
    assert class_names("imagenet", torchvision_names, 1000) == [name.replace("_", " ") for name in IMAGENET_CLASSNAMES]
    assert class_names("dtd", [("banded", "striped")], 1) == ["banded"]


def _refused(args: list[str], capsys) -> str:
    assert main(["evaluate", *args]) == 2
    return capsys.readouterr().err


def test_a_model_without_a_text_tower_is_refused(eurosat, tmp_path, capsys):
    with pytest.warns(UserWarning, match="random weights"):
        err = _refused(["--model", "timm/test_vit", "--dataset", "eurosat", "--root", str(eurosat["root"]),
                        "--out", str(tmp_path / "out"), "--zero-shot", "--workers", "0"], capsys)
    assert "zero-shot classification needs a text tower: timm/test_vit has none" in err
    assert not (tmp_path / "out" / "embeddings").exists()  # refused before any image is embedded


@pytest.mark.parametrize("options, message", [
    (["--templates", "simple"], "--templates: the prompts of zero-shot classification; add --zero-shot"),
    (["--zero-shot", "--templates", "TEMPLATES"], "template 2 ('plain') has no {c}, where the class name goes"),
    (["--zero-shot", "--class-names", "NAMES"], "2 names for the 6 classes of eurosat"),
    (["--zero-shot", "--no-probe", "--no-knn", "--class-names", "MISSING"], "--class-names MISSING: cannot be read"),
    (["--no-probe", "--no-knn"], "there is nothing to compute; add --zero-shot"),
])
def test_wrong_prompts_are_refused_naming_them(eurosat, tmp_path, capsys, options, message):
    (tmp_path / "templates.txt").write_text("{c} again\nplain\n")
    (tmp_path / "names.txt").write_text("one\ntwo\n")
    files = {"TEMPLATES": str(tmp_path / "templates.txt"), "NAMES": str(tmp_path / "names.txt"),
             "MISSING": str(tmp_path / "missing.txt")}
    options = [files.get(option, option) for option in options]
    message = message.replace("MISSING", files["MISSING"])
    err = _refused(["--model", eurosat["spec"], "--dataset", "eurosat", "--root", str(eurosat["root"]),
                    "--out", str(tmp_path / "out"), "--workers", "0", *options], capsys)
    assert message in err


@pytest.mark.parametrize("options, message", [
    (["--dataset", "cub", "--root", "DATA"], "--zero-shot: for classification (linear probe, kNN, zero-shot); "
     "--dataset cub is a retrieval benchmark, which classifies nothing"),
    (["--dataset", "flickr30k", "--root", "DATA"], "--zero-shot: --dataset flickr30k scores image-text retrieval"),
])
def test_zero_shot_on_a_retrieval_benchmark_is_refused(tmp_path, capsys, options, message):
    spec = tiny_open_clip(tmp_path / "clip")
    options = [str(tmp_path) if option == "DATA" else option for option in options]
    assert message in _refused(["--model", spec, "--out", str(tmp_path / "out"), "--zero-shot", *options], capsys)


def test_zero_shot_without_a_model_is_refused(tmp_path, capsys):
    err = _refused(["--embeddings", str(tmp_path), "--dataset", "eurosat", "--root", str(tmp_path),
                    "--out", str(tmp_path / "out"), "--zero-shot"], capsys)
    assert "--zero-shot classifies the images of a classification dataset" in err and "give --model" in err
