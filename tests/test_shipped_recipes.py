"""Every recipe shipped in unicom/configs/ builds what it describes, with random weights instead of downloads.

Default run, for every recipe: the data section reads small real data in the recipe's own
source format (benchmark folders as downloaded, a UniFEx list as published), the model is
built on the meta device (its real architecture and output size, no weights, no memory:
ViT-L/14 and SigLIP SoViT-400m fit any machine that way), and the loss, optimisers,
schedule and augmentation are built from the recipe. Where the size allows on 2 CPU cores
a real step runs: the demo trains end to end, every UniFEx head takes real steps on
features of its backbone's size, and the tiny backbone runs for real.

With --run-heavy (``make test-all``) every recipe also runs for real end to end with random weights: one
training step of each backbone (ViT-B/16 to ViT-L/14), and ``unicom probe`` on the full
SigLIP SoViT-400m and CLIP ViT-B/16 (each image through the random backbone).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from benchmark_layouts import WRITERS, imagenet
from PIL import Image

from support import encode_image, write_class_folder
from unicom.engine.recipe import RECIPE_FOLDER

CONFIGS = RECIPE_FOLDER
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
PROBE = [name for name in RECIPES if name.startswith("unifex_")]
TRAINING = [name for name in RECIPES if name not in PROBE]
BENCHMARK_WRITERS = {**WRITERS, "imagenet": imagenet}


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_every_recipe_is_a_training_or_a_probe_recipe():
    assert TRAINING and PROBE
    for name in TRAINING:
        assert {"model", "data", "loss", "optim"} <= set(raw(name))
    for name in PROBE:
        assert {"backbone", "neck", "data", "loss"} <= set(raw(name))


# ----------------------------------------------------------------------------- training recipes


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    write_class_folder(root, [0, 1, 2], 2, size=40)
    return root


def training_overrides(name: str, folder: Path, tmp: Path) -> list[str]:
    """The recipe with small real data of its own kind and random weights of its architecture."""
    recipe = raw(name)
    data, model = recipe["data"], recipe["model"]
    overrides = [f"out={tmp / 'run'}", "data.batch_size=2", "data.workers=0", "train.steps=1", "log.tensorboard=false",
                 "train.device=cpu", "checkpoint.every=1"]
    if data.get("benchmark"):
        benchmark = data["benchmark"]
        root = BENCHMARK_WRITERS["cars196" if benchmark == "cars" else benchmark](tmp / "data", "download")
        overrides.append(f"data.root={root}")
    else:  # pre-training reads shards and pseudo-labels: a labelled folder stands in for them here
        overrides += ["data.shards=null", "data.labels=null", f"data.folder={folder}"]
    init = model.get("init")
    if init is not None:  # released weights or a run: the same architecture with random weights
        architecture = init if init.startswith("ViT-") else "ViT-B-32"
        overrides += [f"model.name={architecture}", "model.init=null"]
    return overrides


@pytest.mark.parametrize("name", TRAINING)
def test_a_training_recipe_builds_its_model_loss_optimisers_and_augmentation(name, folder, tmp_path):
    from unicom.engine.step import build_train_step
    from unicom.models.vit import create_model
    from unicom.train.config import load_config
    from unicom.train.data import build_source, steps_per_epoch

    (tmp_path / "data").mkdir()
    config = load_config(CONFIGS / name, training_overrides(name, folder, tmp_path))
    source = build_source(config)  # the recipe's own data format, read and checked
    with torch.device("meta"):
        created = create_model(config.model.name, overrides=config.model.overrides(),
                               drop_path_rate=config.model.drop_path_rate)
    size = created.image_size
    images = torch.empty(2, 3, size, size, device="meta")
    if created.architecture == "unicom_vit":  # its head runs under autocast, which the meta device lacks
        tokens = created.module.forward_features(images)
        with torch.no_grad():
            embeddings = created.module.feature(tokens.flatten(1))
    else:
        embeddings = created.module(images)
    assert embeddings.shape == (2, created.embedding_dim)
    class_counts = source.class_counts() if config.loss.needs_class_counts else None
    partial_fc = config.loss.partial_fc(created.embedding_dim, source.num_classes, class_counts, seed=config.seed)
    step = build_train_step(created.module, partial_fc, config.optim, torch.device("cpu"), "fp32")
    assert step.prototype_optimizer.param_groups[0]["lr"] == pytest.approx(config.optim.lr * config.optim.prototype_lr_scale)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    assert config.augment.transform(size)(image).shape == (3, size, size)
    per_epoch = steps_per_epoch(source, 1, config.data.batch_size, config.train.accumulation)
    total = 50 * per_epoch
    factors = [config.schedule.factor(t, total, per_epoch) for t in range(total)]
    assert all(0 <= f <= 1 for f in factors) and max(factors) == pytest.approx(1.0, abs=0.05)


def test_the_demo_recipe_trains_a_step(folder, tmp_path):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    config = load_config(CONFIGS / "demo.yaml", training_overrides("demo.yaml", folder, tmp_path))
    summary = train(config, console=io.StringIO())
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])


@pytest.mark.heavy
@pytest.mark.parametrize("name", [n for n in TRAINING if n != "demo.yaml"])
def test_a_training_recipe_runs_a_step_with_random_weights(name, folder, tmp_path):
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    (tmp_path / "data").mkdir()
    config = load_config(CONFIGS / name, training_overrides(name, folder, tmp_path))
    summary = train(config, console=io.StringIO())
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- probe recipes


@pytest.fixture(scope="module")
def published_list(tmp_path_factory) -> Path:
    """A list as the UniFEx authors publish theirs (img_path,label; paths relative to it):
    3 classes x 3 non-square JPEGs."""
    root = tmp_path_factory.mktemp("m4d")
    rows = ["img_path,label"]
    rng = np.random.default_rng(1)
    for label in range(3):
        (root / f"class_{label}").mkdir()
        for i in range(3):
            pixels = rng.normal(70 * label + 40, 30, (60, 90, 3)).clip(0, 255).astype(np.uint8)
            (root / f"class_{label}" / f"{i}.jpg").write_bytes(encode_image(Image.fromarray(pixels)))
            rows.append(f"class_{label}/{i}.jpg,{label}")
    path = root / "m4d-35k_train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def probe_recipe(name: str, listing: Path, out: Path, *extra: str):
    from unicom.unifex.config import load_probe_config

    return load_probe_config(CONFIGS / name, [f"data.train=[{listing}]", f"out={out}", "backbone.pretrained=null",
                                              "train.device=cpu", *extra])


@pytest.mark.parametrize("name", PROBE)
def test_a_probe_recipe_builds_its_backbone_and_its_head_trains(name, published_list, tmp_path):
    from unicom.models.encoders import load_encoder
    from unicom.unifex.model import describe_transform
    from unicom.unifex.trainer import FeatureBatches, build_head, read_probe_data, train_epoch, training_transform

    config = probe_recipe(name, published_list, tmp_path / "run")
    data = read_probe_data(config)  # the published list, read as it is
    assert data.all_train.num_classes == 3
    small = name == "unifex_tiny.yaml"
    with warnings.catch_warnings(), torch.device("cpu" if small else "meta"):
        warnings.simplefilter("ignore")  # random weights
        encoder = load_encoder(config.backbone.model, None, "cpu" if small else "meta")
    preprocess = describe_transform(encoder.image_transform, config.backbone.model)  # what the export writes
    size = preprocess["size"]
    image = Image.open(data.all_train.images.paths[0]).convert("RGB")
    assert training_transform(encoder, preprocess, config.data.resize)(image).shape == (3, size, size)
    images = torch.empty(2, 3, size, size, device="cpu" if small else "meta")
    with torch.no_grad():
        assert encoder.encode_image(images).shape == (2, encoder.embedding_dim)

    # the head of the recipe on features of the backbone's size: real steps
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 1])  # 9 rows: batches of 4, 4 and (kept or not) 1
    features = torch.randn(1, 9, encoder.embedding_dim, generator=generator)
    if config.neck.features == "normalized":
        features = torch.nn.functional.normalize(features, dim=-1)
    head = build_head(config, encoder.embedding_dim, np.bincount(labels.numpy()), torch.device("cpu"))
    keep = {"keep_last": config.data.last_batch == "keep", "min_rows": 1 if config.data.last_batch == "keep" else 2}
    batches = FeatureBatches(features, labels, 4, config.data.sampling, config.seed, **keep)
    steps = len(batches)
    record = train_epoch(head, batches.epoch(0), config, 0, 10 * steps, check_first=True, steps_per_epoch=steps)
    assert record["steps"] == steps and np.isfinite(record["loss"]) and record["lr"] > 0


@pytest.mark.heavy
@pytest.mark.parametrize("name", [n for n in PROBE if n != "unifex_tiny.yaml"])
def test_a_probe_recipe_runs_end_to_end_with_random_weights(name, published_list, tmp_path):
    from unicom.cli import main

    out = tmp_path / "run"
    code = main(["probe", "--config", str(CONFIGS / name), f"data.train=[{published_list}]", "backbone.pretrained=null",
                 f"out={out}", "train.epochs=1", "data.batch_size=4", "cache.batch_size=2", "data.workers=0",
                 "train.device=cpu"])
    assert code == 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "metrics.json").is_file()
