"""The UniFEx authors' training, option by option, against what their code does.

Their code (morrisfl/UniFEx): Adam(model.parameters(), weight_decay) with coupled L2;
CosineAnnealingLR over all iterations dampened by pytorch_warmup's LinearWarmup, whose
``warmup_steps: 1`` means one epoch; xavier-uniform head weights; the backbone's raw pooled
features into a dropout + linear neck; Resize(short side) + CenterCrop for training; a
DataLoader that keeps the last partial batch; per-dataset class filters; lists with columns
``img_path,label``. Each test checks one of these against a reference (torch, pytorch_warmup,
torchvision, a DataLoader, the filter written out), and the shipped recipe against their config.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import encode_image
from unicom.engine.sections import OptimConfig, ScheduleConfig
from unicom.engine.recipe import RECIPE_FOLDER
from unicom.errors import InputError
from unicom.losses import PartialFC
from unicom.losses.margins import ArcFace
from unicom.losses.partial_fc import init_prototypes
from unicom.unifex.config import load_probe_config

CONFIGS = RECIPE_FOLDER


# ------------------------------------------------------------------ schedule


def test_the_multiplied_warm_up_of_one_epoch_is_the_unifex_codes_schedule():
    import pytorch_warmup

    per_epoch, epochs, lr = 7, 5, 2e-2
    total = per_epoch * epochs
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=1e-3)
    warmup = pytorch_warmup.LinearWarmup(optimizer, warmup_period=per_epoch)  # their warmup_steps: 1 -> one epoch
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        with warmup.dampening():
            cosine.step()
    schedule = ScheduleConfig(kind="cosine", warmup_epochs=1, warmup_mode="multiply", min_lr_ratio=0.05)
    ours = [lr * schedule.factor(step, total, per_epoch) for step in range(total)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_a_warm_up_in_epochs_is_that_many_epochs_of_steps():
    schedule = ScheduleConfig(warmup_epochs=1.5)
    assert schedule.warmup(total=1000, steps_per_epoch=40) == 60
    with pytest.raises(ValueError, match="steps per epoch"):
        schedule.warmup(total=1000)
    problems: list[str] = []
    ScheduleConfig(warmup_steps=3, warmup_epochs=1).check(problems)
    ScheduleConfig(kind="onecycle", warmup_mode="multiply").check(problems)
    assert any("not both" in p for p in problems) and any("onecycle has its own warm-up" in p for p in problems)


# ------------------------------------------------------------------ optimiser and prototypes


def test_adam_with_coupled_l2_trains_neck_and_prototypes_as_torch_adam():
    from unicom.engine.step import build_train_step

    torch.manual_seed(0)
    neck = torch.nn.Sequential(torch.nn.Linear(12, 6))
    reference_neck = copy.deepcopy(neck)
    # the same prototypes (same seed); ours takes row-sparse gradients, the reference dense ones
    ours_pfc = PartialFC(6, 5, ArcFace(0.5, 30.0), centers=3, seed=3, prototype_init="xavier")
    reference_pfc = PartialFC(6, 5, ArcFace(0.5, 30.0), centers=3, seed=3, prototype_init="xavier", sparse_gradient=False)
    optim = OptimConfig(optimizer="adam", lr=0.02, weight_decay=0.01, prototype_lr_scale=1.0)
    step = build_train_step(neck, ours_pfc, optim, torch.device("cpu"), "fp32")
    reference = torch.optim.Adam([*reference_neck.parameters(), *reference_pfc.parameters()], lr=0.02, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        features, labels = torch.randn(8, 12, generator=generator), torch.randint(0, 5, (8,), generator=generator)
        step([(features, labels)])
        reference.zero_grad()
        reference_pfc(reference_neck(features), labels).backward()
        reference.step()
    for ours, theirs in zip([*neck.parameters(), ours_pfc.prototypes], [*reference_neck.parameters(), reference_pfc.prototypes]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_xavier_prototypes_are_xavier_uniform_over_the_whole_matrix():
    pfc = PartialFC(64, 1000, centers=3, seed=1, prototype_init="xavier")
    reference = torch.nn.init.xavier_uniform_(torch.empty(3000, 64), generator=torch.Generator().manual_seed(0))
    ours = pfc.prototypes.detach()
    bound = math.sqrt(6 / (3000 + 64))
    assert reference.abs().max() <= bound and ours.abs().max() <= bound
    assert ours.abs().max() == pytest.approx(float(reference.abs().max()), rel=1e-3)  # both reach the bound
    assert ours.std() == pytest.approx(float(reference.std()), rel=1e-2)
    # a shard holds the rows of the whole matrix, whatever the split
    shard = torch.empty(4 * 3, 64)
    init_prototypes(shard, 600, 3, seed=1, kind="xavier", num_classes=1000)
    torch.testing.assert_close(shard, ours[600 * 3:604 * 3])


# ------------------------------------------------------------------ batches and transforms


@pytest.mark.parametrize("n", [9, 12, 13])
def test_keeping_the_last_batch_gives_the_dataloaders_batches(n):
    from unicom.unifex.data import epoch_batches

    theirs = [len(b) for b in torch.utils.data.DataLoader(range(n), batch_size=4, shuffle=False, drop_last=False)]
    ours = [len(b) for b in epoch_batches(np.arange(n), 4, keep_last=True, min_rows=1)]
    assert ours == theirs and len(ours) == math.ceil(n / 4)  # their batches_per_epoch
    assert [len(b) for b in epoch_batches(np.arange(n), 4)] == [4] * (n // 4)


def test_the_short_side_training_transform_is_theirs():
    from torchvision import transforms as T

    from unicom.unifex.trainer import training_transform

    siglip = {"size": 384, "resize_mode": "squash", "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    theirs = T.Compose([T.Resize(384, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(384),
                        T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8))

    class Encoder:
        image_transform = object()

    ours = training_transform(Encoder(), siglip, "shortest")
    assert torch.equal(ours(image), theirs(image))
    assert training_transform(Encoder(), siglip, "squash") is Encoder.image_transform  # already the model's own
    assert training_transform(Encoder(), siglip, "model") is Encoder.image_transform


# ------------------------------------------------------------------ their lists


def write_published_list(folder: Path, classes: dict[str, int]) -> Path:
    """A list as the UniFEx authors publish them: ``img_path,label``, paths relative to the
    list's folder (``<class folder>/<file>``), class ids from 0."""
    rows = ["img_path,label"]
    for label, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = Image.new("RGB", (8, 8), (label * 40, i * 30, 0))
            (folder / name / f"img_{i}.jpg").write_bytes(encode_image(image))
            rows.append(f"{name}/img_{i}.jpg,{label}")
    path = folder / f"{folder.name.replace('_', '')}_train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_published_lists_are_read_as_they_are_with_their_filters_per_list(tmp_path):
    from unicom.unifex.trainer import read_probe_data

    furniture = write_published_list(tmp_path / "furniture_180", {"air_condition": 2, "bed": 4})
    storefronts = write_published_list(tmp_path / "storefronts_146", {"7-Eleven": 3, "Boots": 2, "Costa Coffee": 5})
    config = load_probe_config(CONFIGS / "unifex_siglip_so400m_m4d35k.yaml", [
        f"data.train=[{furniture},{storefronts}]", "data.min_images_per_class=[1,3]", f"out={tmp_path / 'run'}"])
    data = read_probe_data(config)

    # their filter, written out: Storefronts146 keeps the classes of at least 3 images, Furniture180 all
    kept_storefronts = {label for label, count in enumerate([3, 2, 5]) if count >= 3}
    assert data.train.datasets == ["furniture180_train", "storefronts146_train"]
    assert data.train.class_values == ["0", "1"] + [str(v) for v in sorted(kept_storefronts)]
    assert data.train.class_counts().tolist() == [2, 4, 3, 5]
    assert data.train.images.paths[0] == str(tmp_path / "furniture_180" / "air_condition" / "img_0.jpg")
    assert all(Path(p).is_file() for p in data.train.images.paths)


def test_a_class_above_its_lists_maximum_keeps_a_seeded_subset(tmp_path):
    from unicom.unifex.data import read_domain_lists, select_training

    landmarks = write_published_list(tmp_path / "gld", {"a": 6, "b": 2})
    data = read_domain_lists(landmarks)
    first = select_training(data, max_images_per_class=3, seed=4)
    again = select_training(data, max_images_per_class=3, seed=4)
    assert first.class_counts().tolist() == [3, 2]
    assert first.images.keys == again.images.keys
    assert set(first.images.keys) <= set(data.images.keys)
    with pytest.raises(InputError, match="gives 2 values for 1 lists"):
        select_training(data, min_images_per_class=[1, 3])


# ------------------------------------------------------------------ their recipe


def test_the_shipped_siglip_recipe_is_the_authors_configuration():
    # configs/lp_siglip-sovit400m_arcface3_m4d35k.yaml and src/ of morrisfl/UniFEx
    config = load_probe_config(CONFIGS / "unifex_siglip_so400m_m4d35k.yaml", ["data.train=[m4d-35k_train.csv]", "out=x"])
    assert (config.neck.kind, config.neck.embedding_dim, config.neck.dropout, config.neck.batchnorm) == ("linear", 64, 0.2, False)
    assert config.neck.features == "raw"  # proj_layer: False, the pooled 1152 features into the neck
    assert (config.loss.head, config.loss.centers, config.loss.scale, config.loss.margin) == ("arcface", 3, 30.0, 0.5)
    assert config.loss.sample_rate == 1.0 and config.loss.prototype_init == "xavier"
    assert (config.optim.optimizer, config.optim.lr, config.optim.weight_decay) == ("adam", 2e-2, 1e-4)
    assert config.optim.prototype_lr_scale == 1.0
    schedule = config.schedule
    assert (schedule.kind, schedule.warmup_epochs, schedule.warmup_mode) == ("cosine", 1, "multiply")
    assert config.optim.lr * schedule.min_lr_ratio == pytest.approx(1e-3)  # min_lr: 1e-3
    assert (config.data.batch_size, config.data.sampling, config.data.last_batch) == (128, "instance", "keep")
    assert config.data.resize == "shortest" and config.train.epochs == 10
    assert config.backbone.precision == "fp32"
    assert (config.backbone.model, config.backbone.pretrained) == ("ViT-SO400M-14-SigLIP-384", "webli")


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """8 classes x 5 non-square JPEGs in a published-style list, and a random test_vit file."""
    import timm

    root = tmp_path_factory.mktemp("reproduction")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), root / "test_vit.pth")
    rows = ["img_path,label"]
    rng = np.random.default_rng(0)
    for label in range(8):
        (root / f"c{label}").mkdir()
        for i in range(5):
            pixels = rng.normal(60 + 20 * label, 40, (90, 150, 3)).clip(0, 255).astype(np.uint8)
            (root / f"c{label}" / f"{i}.jpg").write_bytes(encode_image(Image.fromarray(pixels)))
            rows.append(f"c{label}/{i}.jpg,{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


AUTHORS = ("neck.features=raw", "data.resize=shortest", "data.last_batch=keep", "optim.optimizer=adam",
           "loss.prototype_init=xavier", "schedule.warmup_epochs=1", "schedule.warmup_mode=multiply",
           "schedule.warmup_fraction=0", "data.batch_size=12", "neck.dropout=0.2")


def authors_recipe(root: Path, out: Path, *extra: str):
    return load_probe_config(CONFIGS / "unifex_tiny.yaml", [
        f"data.train=[{root / 'train.csv'}]", f"backbone.pretrained={root / 'test_vit.pth'}", f"out={out}",
        "train.device=cpu", "train.epochs=3", "eval.every=0", *AUTHORS, *extra])


def test_the_authors_options_train_the_same_head_from_the_cache_and_in_the_loop(collection, tmp_path):
    from unicom.unifex.cache import load_view, view_folder
    from unicom.unifex.trainer import CHECKPOINT, probe

    cached = probe(authors_recipe(collection, tmp_path / "cache", "train.mode=cache"))
    direct = probe(authors_recipe(collection, tmp_path / "direct", "train.mode=direct"))
    # 30 training images (2 of 8 classes held out), batch 12: 12, 12 and the kept 6
    assert [h["steps"] for h in cached["history"]] == [3, 3, 3] == [h["steps"] for h in direct["history"]]
    assert [h["images"] for h in cached["history"]] == [30, 30, 30]
    ours = torch.load(tmp_path / "cache" / CHECKPOINT, weights_only=True)
    theirs = torch.load(tmp_path / "direct" / CHECKPOINT, weights_only=True)
    for key, value in ours["neck"].items():
        torch.testing.assert_close(value, theirs["neck"][key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["partial_fc"]["prototypes"], theirs["partial_fc"]["prototypes"], atol=1e-5, rtol=1e-4)

    # the cache holds the raw features of the short-side crop; evaluation views are the model's own
    views = sorted(p.name for p in (tmp_path / "cache" / "cache").iterdir() if p.is_dir())
    assert views == ["index", "query", "train"]
    splits = json.loads((tmp_path / "cache" / "cache" / "cache.json").read_text())["splits"]
    assert (tmp_path / "cache" / "cache" / splits["query"]["folder"] / "view_0" / "img_emb").is_dir()
    from unicom.unifex.data import read_domain_lists

    keys = read_domain_lists(collection / "train.csv").images.keys
    features, present = load_view(view_folder(tmp_path / "cache" / "cache", "train", 0), keys)
    norms = np.linalg.norm(features[present], axis=1)
    assert not np.allclose(norms, 1.0)


def test_the_exported_model_applies_the_neck_to_the_raw_features(collection, tmp_path):
    import timm

    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder
    from unicom.unifex.model import LinearNeck
    from unicom.unifex.trainer import CHECKPOINT, probe

    out = tmp_path / "run"
    probe(authors_recipe(collection, out, "train.epochs=1"))
    encoder = load_encoder(str(out / "model"))
    paths = [str(collection / "c0" / f"{i}.jpg") for i in range(3)]
    embedded = embed_images(encoder, paths, batch_size=3, num_workers=0, device="cpu")

    backbone = timm.create_model("test_vit", num_classes=0)
    backbone.load_state_dict(torch.load(collection / "test_vit.pth", weights_only=True))
    neck = LinearNeck(backbone.num_features, 16, dropout=0.2).eval()
    neck.load_state_dict(torch.load(out / CHECKPOINT, weights_only=True)["neck"])
    images = torch.stack([encoder.image_transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(neck(backbone.eval()(images)), dim=-1).numpy()
    np.testing.assert_allclose(embedded, expected, atol=1e-5)
