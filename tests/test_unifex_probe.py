"""``unicom probe`` end to end on real images with a tiny random backbone: training, the cache,
direct mode, resuming, evaluation and the exported model."""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support import encode_image
from unicom.cli import main
from unicom.engine.recipe import RECIPE_FOLDER, shipped_recipes
from unicom.errors import InputError
from unicom.unifex.config import load_probe_config
from unicom.unifex.trainer import CHECKPOINT, probe

CONFIGS = RECIPE_FOLDER
CLASSES, PER_CLASS = 24, 6


def tinted_image(label: int, index: int, size: int = 48) -> Image.Image:
    """A class is a hue (evenly spaced over the colour circle); brightness, stripes and noise
    vary per image and dominate the pixels, so that an untrained projection of random
    features mixes classes and a head has to learn to look at the hue."""
    rng = np.random.default_rng([7, label, index])
    angle = 2 * np.pi * label / CLASSES
    chroma = np.cos([angle, angle - 2 * np.pi / 3, angle + 2 * np.pi / 3])
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.integers(3, 12)
    stripes = (((xx if rng.random() < 0.5 else yy) + rng.integers(0, period)) // period % 2)[..., None]
    pixels = rng.uniform(50, 205) + 60 * (stripes - 0.5) + 30 * chroma + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_list(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "path", "class"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """24 hues x 6 JPEGs in two datasets whose class values overlap (a: 0-11, b: 0-11), a
    random test_vit saved as a checkpoint file, and one cache folder shared by the runs."""
    import timm

    root = tmp_path_factory.mktemp("unifex")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), root / "test_vit.pth")
    rows = []
    for label in range(CLASSES):
        folder = root / "images" / f"hue_{label:02d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            (folder / f"{i}.jpg").write_bytes(encode_image(tinted_image(label, i)))
            rows.append(("a" if label < 12 else "b", f"images/hue_{label:02d}/{i}.jpg", label % 12))
    return {"root": root, "train": write_list(root / "train.csv", rows), "rows": rows, "weights": root / "test_vit.pth",
            "cache": root / "cache"}


def recipe(collection, out, *overrides):
    # on the CPU in fp32 wherever the tests run: the exactness checks compare float32 results
    return load_probe_config(CONFIGS / "unifex_tiny.yaml", [
        f"data.train=[{collection['train']}]", f"backbone.pretrained={collection['weights']}", f"out={out}",
        f"cache.folder={collection['cache']}", "train.device=cpu", *overrides,
    ])


def head_weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / CHECKPOINT, weights_only=True)
    return {**{f"neck.{k}": v for k, v in state["neck"].items()}, "prototypes": state["partial_fc"]["prototypes"]}


def test_trained_head_beats_the_untrained_projection_on_held_out_classes(collection, tmp_path):
    report = probe(recipe(collection, tmp_path / "run", "eval.every=0"))
    scores = report["evaluation"]
    assert scores["protocol"] == "12 queries against 24 index images"  # 6 held-out hues x (2 queries + 4 indexed)
    assert scores["trained"]["mmp@5"] > scores["untrained"]["mmp@5"] + 0.15
    assert scores["trained"]["map@r"] > scores["untrained"]["map@r"] + 0.15
    assert scores["trained"]["recall@1"] >= scores["untrained"]["recall@1"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluation"]["trained"] == scores["trained"]
    assert [row["dataset"] for row in report["datasets"]] == ["a", "b"]
    assert sum(row["classes"] for row in report["datasets"]) == 18  # 24 hues minus 6 held out


@pytest.mark.parametrize("weights", ["file", "random"])
def test_the_exported_model_is_the_trained_head_on_the_backbone(collection, tmp_path, weights):
    # random: a backbone without weights (the tiny recipe's default) is the same network when
    # the exported model is loaded again, whatever the caller's random state
    from unicom.embed import embed_images
    from unicom.models.encoders import load_encoder
    from unicom.unifex.cache import load_view, view_folder
    from unicom.unifex.data import read_domain_lists
    from unicom.unifex.model import LinearNeck

    out = tmp_path / "run"
    cache = collection["cache"] if weights == "file" else tmp_path / "cache"
    random_weights = [] if weights == "file" else ["backbone.pretrained=null", f"cache.folder={cache}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that the backbone has random weights
        probe(recipe(collection, out, "train.epochs=2", "eval.every=0", *random_weights))
        torch.manual_seed(1234)
        encoder = load_encoder(str(out / "model"))
    paths = [str(collection["root"] / row[1]) for row in collection["rows"][:12]]
    embedded = embed_images(encoder, paths, batch_size=8, num_workers=0, device="cpu")

    # the same images through the cache and the trained neck
    keys = read_domain_lists(collection["train"]).images.keys
    features, present = load_view(view_folder(cache, "train", 0), keys)
    neck = LinearNeck(64, 16, dropout=0.1).eval()
    neck.load_state_dict(torch.load(out / CHECKPOINT, weights_only=True)["neck"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(neck(torch.from_numpy(features[:12])), dim=-1).numpy()
    assert present.all()
    np.testing.assert_allclose(embedded, expected, atol=1e-5)


def test_the_host_reads_the_steps_results_once_the_epochs_steps_are_queued(collection, tmp_path, monkeypatch):
    from support import record_step_reads

    calls, read_at = record_step_reads(monkeypatch)
    probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.every=0"))
    assert calls[0] > 1 and read_at == [calls[0]] * calls[0]


def test_cache_mode_and_direct_mode_train_the_same_head(collection, tmp_path):
    # augmentation off and the same seed: the same batches, initialisation and dropout masks
    common = ("train.epochs=3", "eval.every=0", "neck.batchnorm=true", "loss.sample_rate=0.5")
    probe(recipe(collection, tmp_path / "cache_mode", "train.mode=cache", *common))
    probe(recipe(collection, tmp_path / "direct_mode", "train.mode=direct", *common))
    cached, direct = head_weights(tmp_path / "cache_mode"), head_weights(tmp_path / "direct_mode")
    assert sorted(cached) == sorted(direct)
    for name in cached:
        # tolerance: the backbone may round a feature differently in a batch of other images
        torch.testing.assert_close(direct[name], cached[name], rtol=0, atol=1e-5, msg=name)
    assert cached["neck.proj.weight"].abs().max() > 0.05  # trained, not a zero head


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_a_stopped_run_resumes_to_the_same_head(collection, tmp_path, device):
    # the neck's dropout (0.1) draws from the device's generator, which the checkpoint restores
    overrides = ("train.epochs=4", "eval.every=0", "loss.sample_rate=0.5", "loss.head=curricularface",
                 f"train.device={device}", "backbone.precision=fp32")
    probe(recipe(collection, tmp_path / "straight", *overrides))
    stopped = probe(recipe(collection, tmp_path / "resumed", *overrides), until_epoch=2)
    assert stopped["stopped_after_epoch"] == 2 and not (tmp_path / "resumed" / "model").exists()
    report = probe(recipe(collection, tmp_path / "resumed", *overrides))
    assert [record["epoch"] for record in report["history"]] == [1, 2, 3, 4]
    straight, resumed = head_weights(tmp_path / "straight"), head_weights(tmp_path / "resumed")
    exact = 0 if device == "cpu" else 1e-6  # GPU kernels may sum in another order
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=exact, atol=exact, msg=name)
    torch.testing.assert_close(  # CurricularFace's running t came back too
        torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["partial_fc"]["margin.t"],
        torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)["partial_fc"]["margin.t"])


def test_augmented_direct_mode_trains_the_same_head_whatever_the_workers(collection, tmp_path):
    """data.workers may change when a run resumes: the augmented views must not depend on
    which process decodes an image, nor draw from the generators the neck's dropout uses."""
    overrides = ("train.mode=direct", "train.augment=true", "augment.randaugment=rand-m9-mstd0.5", "train.epochs=2",
                 "eval.every=0")
    probe(recipe(collection, tmp_path / "straight", *overrides, "data.workers=0"))
    probe(recipe(collection, tmp_path / "resumed", *overrides, "data.workers=2"), until_epoch=1)
    probe(recipe(collection, tmp_path / "resumed", *overrides, "data.workers=0"))
    straight, resumed = head_weights(tmp_path / "straight"), head_weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_resuming_with_other_settings_is_refused(collection, tmp_path):
    probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.every=0"))
    with pytest.raises(InputError, match=r"other settings \(neck.embedding_dim: 16 -> 8\)"):
        probe(recipe(collection, tmp_path / "run", "train.epochs=1", "neck.embedding_dim=8"))


def test_resuming_after_the_list_changed_is_refused(collection, tmp_path):
    """One image moved to another class of the same list: as many images and classes as
    before, but the head's prototypes would no longer mean the same classes."""
    rows = [list(row) for row in collection["rows"]]
    listing = write_list(tmp_path / "train.csv", rows)
    changed = recipe(collection, tmp_path / "run", f"data.train=[{listing}]", f"data.root={collection['root']}",
                     "train.mode=direct", "train.epochs=2", "eval.holdout_classes=0")
    probe(changed, until_epoch=1)
    rows[0][2] = 1  # was class 0 of dataset a
    write_list(listing, rows)
    with pytest.raises(InputError, match=r"checkpoint.pt was written by a run whose lists of data.train held other "
                                         r"rows \(144 images of 24 classes then, 144 of 24 now\); use another out="):
        probe(changed)


def test_the_cache_is_built_once_and_refuses_other_weights(collection, tmp_path):
    import timm

    probe(recipe(collection, tmp_path / "first", "train.epochs=1", "eval.every=0"))
    part = collection["cache"] / "train" / "view_0" / "img_emb" / "img_emb_0.npy"
    written = part.stat().st_mtime_ns
    probe(recipe(collection, tmp_path / "second", "train.epochs=1", "eval.every=0", "loss.head=cosface"))
    assert part.stat().st_mtime_ns == written  # read back, not recomputed
    # a build killed inside part 1 (its metadata, written last, is missing) redoes that part only
    (collection["cache"] / "train" / "view_0" / "metadata" / "metadata_1.parquet").unlink()
    probe(recipe(collection, tmp_path / "third", "train.epochs=1", "eval.every=0"))
    assert part.stat().st_mtime_ns == written
    assert (collection["cache"] / "train" / "view_0" / "metadata" / "metadata_1.parquet").is_file()
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), other)
    with pytest.raises(InputError, match="holds embeddings of another configuration"):
        probe(recipe(collection, tmp_path / "fourth", f"backbone.pretrained={other}"))


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_cache_that_cannot_be_written_says_what_to_do_and_a_rerun_completes_it(collection, tmp_path):
    """A disk that refuses the writes (here a file-size limit, as a full disk would): an
    error naming the part and what to do, no traceback, no temporary left; a rerun with
    room writes the same features as a build that never failed."""
    import resource
    import signal
    import subprocess
    import sys

    from unicom.formats.embeddings import read_embedding_folder

    def limit_file_size():  # 8 KB: the run's small files fit, a part of 40 x 64 float32 features does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process

    cache = tmp_path / "cache"
    arguments = ["--config", str(CONFIGS / "unifex_tiny.yaml"), f"data.train=[{collection['train']}]",
                 f"backbone.pretrained={collection['weights']}", f"out={tmp_path / 'run'}", f"cache.folder={cache}",
                 "train.device=cpu", "--cache-only"]
    failed = subprocess.run([sys.executable, "-m", "unicom.cli", "probe", *arguments], capture_output=True, text=True,
                            preexec_fn=limit_file_size, timeout=300)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert f"{cache / 'train' / 'view_0'}: part 0 could not be written (" in failed.stderr
    assert "free space there or write to another folder, then run again" in failed.stderr
    assert [p.name for p in cache.rglob("*.tmp")] == []
    assert main(["probe", *arguments]) == 0
    probe(recipe(collection, tmp_path / "reference", f"cache.folder={tmp_path / 'reference'}"), cache_only=True)
    rebuilt, reference = (read_embedding_folder(folder / "train" / "view_0") for folder in (cache, tmp_path / "reference"))
    np.testing.assert_array_equal(rebuilt[0], reference[0])


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_checkpoint_the_disk_refuses_says_what_to_do_and_a_rerun_finishes_the_run(collection, tmp_path):
    """A disk that fills up during training (here a file-size limit of 4 KB: the run's small
    files fit, its checkpoint does not): torch's writer reports it as 'unexpected pos'; the
    error names the folder and the file and what to do, no traceback, no temporary left, and a
    rerun with room trains and exports the model. Epoch 1, logged before its checkpoint was
    refused and trained again, is in the log once."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process

    out = tmp_path / "run"
    arguments = ["--config", str(CONFIGS / "unifex_tiny.yaml"), f"data.train=[{collection['train']}]",
                 f"backbone.pretrained={collection['weights']}", f"out={out}", "train.mode=direct", "train.device=cpu",
                 "data.workers=0", "eval.every=0", "train.epochs=2"]
    failed = subprocess.run([sys.executable, "-m", "unicom.cli", "probe", *arguments], capture_output=True, text=True,
                            preexec_fn=limit_file_size, timeout=300)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert f"{out}: checkpoint.pt could not be written (" in failed.stderr
    assert ("free space there or write to another folder, then run again: with the same out= it resumes after the "
            "last epoch checkpointed") in failed.stderr
    assert [p.name for p in out.rglob("*.tmp")] == []
    assert main(["probe", *arguments]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]


def test_an_output_or_cache_folder_that_cannot_be_made_is_named(collection, tmp_path):
    """As a read-only disk: a folder under a file cannot be made; an error that names it and
    the key to change, not a traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match=r"a_file/out: the output folder cannot be written \(.*\); give out= a folder"):
        probe(recipe(collection, blocker / "out"), cache_only=True)
    with pytest.raises(InputError, match=r"feature cache .*a_file/cache: cannot be written \(.*\); give cache.folder= a"):
        probe(recipe(collection, tmp_path / "run", f"cache.folder={blocker / 'cache'}"), cache_only=True)


def test_a_cache_made_in_another_precision_or_decoder_is_refused(collection, tmp_path):
    cache = tmp_path / "cache"
    probe(recipe(collection, tmp_path / "fp32", f"cache.folder={cache}", "train.epochs=1", "eval.every=0",
                 "backbone.precision=fp32", "data.decode=cpu"))
    config = json.loads((cache / "train" / "view_0" / "embed_config.json").read_text())
    assert (config["precision"], config["decode"]) == ("fp32", "cpu")
    with pytest.raises(InputError, match=r"precision: 'fp32' before, 'bf16' now\); .*another cache\.folder"):
        probe(recipe(collection, tmp_path / "bf16", f"cache.folder={cache}", "train.epochs=1", "eval.every=0",
                     "backbone.precision=bf16", "data.decode=cpu"))
    with pytest.raises(InputError, match=r"decode: 'cpu' before, 'gpu' now"):
        probe(recipe(collection, tmp_path / "gpu", f"cache.folder={cache}", "train.epochs=1", "eval.every=0",
                     "backbone.precision=fp32", "data.decode=gpu"))


def test_a_cache_made_before_precision_was_recorded_is_read_as_it_is(collection, tmp_path):
    cache = tmp_path / "cache"
    overrides = (f"cache.folder={cache}", "train.epochs=1", "eval.every=0", "backbone.precision=fp32")
    probe(recipe(collection, tmp_path / "first", *overrides))
    view = cache / "train" / "view_0"
    older = {k: v for k, v in json.loads((view / "embed_config.json").read_text()).items()
             if k not in ("precision", "decode")}
    (view / "embed_config.json").write_text(json.dumps(older))
    part = view / "img_emb" / "img_emb_0.npy"
    written = part.stat().st_mtime_ns
    probe(recipe(collection, tmp_path / "second", *overrides))
    assert part.stat().st_mtime_ns == written


def test_augmented_views_are_cached_beside_the_plain_one(collection, tmp_path):
    from unicom.unifex.cache import load_view, view_folder
    from unicom.unifex.data import read_domain_lists

    cache = tmp_path / "cache"
    report = probe(recipe(collection, tmp_path / "run", f"cache.folder={cache}", "cache.augmented_views=2",
                          "train.augment=true", "train.epochs=2", "eval.every=0", "augment.crop_scale=[0.5,1.0]"))
    keys = read_domain_lists(collection["train"]).images.keys
    views = [load_view(view_folder(cache, "train", v), keys) for v in range(3)]
    assert all(present.all() for _, present in views)
    plain, first, second = (features for features, _ in views)
    assert not np.allclose(plain, first, atol=1e-3) and not np.allclose(first, second, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert json.loads((cache / "cache.json").read_text())["splits"]["train"] == {"images": 144, "views": 3}
    assert len(report["history"]) == 2


def test_an_augmented_view_killed_mid_build_is_completed_with_the_same_draws(collection, tmp_path):
    """A part redone after a kill (its metadata, written last, missing), with other decoding
    workers, holds the views an uninterrupted build drew."""
    from unicom.formats.embeddings import read_embedding_folder

    cache = tmp_path / "cache"
    overrides = (f"cache.folder={cache}", "cache.augmented_views=1", "augment.randaugment=rand-m9-mstd0.5")
    probe(recipe(collection, tmp_path / "run", *overrides, "data.workers=0"), cache_only=True)
    view = cache / "train" / "view_1"
    uninterrupted, _ = read_embedding_folder(view)
    (view / "metadata" / "metadata_3.parquet").unlink()  # the last part of 144 images in parts of 40
    probe(recipe(collection, tmp_path / "run", *overrides, "data.workers=2"), cache_only=True)
    completed, _ = read_embedding_folder(view)
    np.testing.assert_array_equal(completed, uninterrupted)


def test_an_augmented_view_decoded_on_the_device_is_completed_with_the_same_draws(collection, tmp_path):
    """As above with the JPEGs decoded where the model runs (data.decode=gpu; auto on CUDA):
    each image's crop and flip are planned in the workers, and must be its own draws too."""
    from unicom.formats.embeddings import read_embedding_folder

    cache = tmp_path / "cache"
    overrides = (f"cache.folder={cache}", "cache.augmented_views=1", "data.decode=gpu")
    probe(recipe(collection, tmp_path / "run", *overrides, "data.workers=0"), cache_only=True)
    view = cache / "train" / "view_1"
    uninterrupted, _ = read_embedding_folder(view)
    (view / "metadata" / "metadata_3.parquet").unlink()
    probe(recipe(collection, tmp_path / "run", *overrides, "data.workers=2"), cache_only=True)
    completed, _ = read_embedding_folder(view)
    np.testing.assert_array_equal(completed, uninterrupted)


def test_query_and_index_lists_are_scored_with_classes_matched_by_dataset(collection, tmp_path):
    rows = collection["rows"]
    query = write_list(tmp_path / "query.csv", [(d, str(collection["root"] / p), c) for d, p, c in rows[::6]])
    index = write_list(tmp_path / "index.csv", [(d, str(collection["root"] / p), c) for i, (d, p, c) in enumerate(rows)
                                                if i % 6])
    report = probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.holdout_classes=0",
                          f"eval.query=[{query}]", f"eval.index=[{index}]"))
    # one query per hue against the other 5 images of each of the 24 hues: a:0 and b:0 are different classes
    assert report["evaluation"]["protocol"] == "24 queries against 120 index images"
    assert report["evaluation"]["trained"]["n_queries"] == 24
    folder = json.loads((collection["cache"] / "cache.json").read_text())["splits"]["query"]["folder"]
    assert (collection["cache"] / folder / "view_0" / "img_emb").is_dir()


def test_query_and_index_lists_that_share_an_image_are_refused_before_any_work(collection, tmp_path):
    # a query that is also an index image is its own nearest neighbour: Recall@1 would be 100% whatever the head
    rows = collection["rows"]
    query = write_list(tmp_path / "query.csv", [(d, str(collection["root"] / p), c) for d, p, c in rows[::6]])
    index = write_list(tmp_path / "index.csv", [(d, str(collection["root"] / p), c) for i, (d, p, c) in enumerate(rows)
                                                if i % 6 or i == 6])
    shared = f"a/{collection['root'] / rows[6][1]}"
    with pytest.raises(InputError, match=re.escape(
            f"eval.query and eval.index share 1 of the 24 query images (e.g. {shared}): each would find itself first "
            "and lift every score; give lists without common images")):
        probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.holdout_classes=0",
                     f"eval.query=[{query}]", f"eval.index=[{index}]"))
    assert not (tmp_path / "run").exists()


def test_an_image_shared_under_another_spelling_of_its_path_is_refused_too(collection, tmp_path):
    # images/hue_01/../hue_01/0.jpg in the index is the query's images/hue_01/0.jpg
    rows = collection["rows"]
    query = write_list(tmp_path / "query.csv", [(d, str(collection["root"] / p), c) for d, p, c in rows[::6]])
    folder, name = rows[6][1].rsplit("/", 1)
    respelt = [(d, f"{collection['root']}/{folder}/../{folder.split('/')[-1]}/{name}" if i == 6
                else str(collection["root"] / p), c) for i, (d, p, c) in enumerate(rows)]
    index = write_list(tmp_path / "index.csv", [row for i, row in enumerate(respelt) if i % 6 or i == 6])
    assert "/../" in respelt[6][1]
    with pytest.raises(InputError, match=r"eval.query and eval.index share 1 of the 24 query images"):
        probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.holdout_classes=0",
                     f"eval.query=[{query}]", f"eval.index=[{index}]"))
    assert not (tmp_path / "run").exists()


def test_query_and_index_lists_without_a_dataset_column_share_their_classes(collection, tmp_path):
    # the authors' format (img_path,label): each list is one benchmark, query class 3 is index class 3
    rows = [(str(collection["root"] / p), label) for label in range(CLASSES) for i, (_, p, _) in
            enumerate(collection["rows"][label * PER_CLASS:(label + 1) * PER_CLASS])]
    for name, part in (("query", rows[::PER_CLASS]), ("index", [r for i, r in enumerate(rows) if i % PER_CLASS])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("img_path", "label"), *part])
    cache = tmp_path / "cache"
    report = probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.holdout_classes=0", f"cache.folder={cache}",
                          f"eval.query=[{tmp_path / 'query.csv'}]", f"eval.index=[{tmp_path / 'index.csv'}]"))
    scores = report["evaluation"]["backbone"]
    assert report["evaluation"]["protocol"] == "24 queries against 120 index images"
    assert scores["n_queries"] == 24  # every query has its 5 relevant index images

    # the backbone's own scores, from the cached features with the hue as the class
    from unicom.evaluate import retrieval_metrics
    from unicom.formats.embeddings import read_embedding_folder

    splits = json.loads((cache / "cache.json").read_text())["splits"]
    query, _ = read_embedding_folder(cache / splits["query"]["folder"] / "view_0")
    index, _ = read_embedding_folder(cache / splits["index"]["folder"] / "view_0")
    labels = np.arange(CLASSES)
    expected = retrieval_metrics(query, labels, index, np.repeat(labels, PER_CLASS - 1), ks=(1, 5))
    assert scores["mmp@5"] == pytest.approx(expected["mmp@5"])
    assert scores["map@r"] == pytest.approx(expected["map@r"])


def test_another_evaluation_split_adds_its_own_views_to_the_cache(collection, tmp_path):
    # training images squashed, evaluation images the model's own way: the held-out images get views
    # of their own; runs sharing the cache with another split, or resumed with other queries, score theirs
    cache = tmp_path / "cache"
    squashed = ["train.epochs=1", "data.resize=squash", f"cache.folder={cache}"]
    first = probe(recipe(collection, tmp_path / "a", *squashed))
    second = probe(recipe(collection, tmp_path / "b", *squashed, "eval.holdout_classes=0.5"))
    third = probe(recipe(collection, tmp_path / "a", *squashed, "eval.queries_per_class=3"))
    assert first["evaluation"]["protocol"] == "12 queries against 24 index images"  # 6 held-out hues x (2 + 4)
    assert second["evaluation"]["protocol"] == "24 queries against 48 index images"  # 12 held-out hues
    assert third["evaluation"]["protocol"] == "18 queries against 18 index images"  # 6 held-out hues x (3 + 3)
    assert len(list((cache / "query").iterdir())) == len(list((cache / "index").iterdir())) == 3
    again = probe(recipe(collection, tmp_path / "a", *squashed))
    assert len(list((cache / "query").iterdir())) == 3  # the first split's views are read again
    assert again["evaluation"]["backbone"] == first["evaluation"]["backbone"]


def test_resuming_with_other_held_out_classes_is_refused(collection, tmp_path):
    probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.every=0"), until_epoch=1)
    with pytest.raises(InputError, match=r"other settings \(eval.holdout_classes: 0.25 -> 0.5\)"):
        probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.holdout_classes=0.5"))


def test_evaluation_images_that_cannot_be_decoded_are_left_out_with_a_note(collection, tmp_path, capsys):
    rows = collection["rows"]
    query = write_list(tmp_path / "query.csv", [(d, str(collection["root"] / p), c) for d, p, c in rows[::6]]
                       + [("a", str(tmp_path / "missing.jpg"), 0)])
    index = write_list(tmp_path / "index.csv", [(d, str(collection["root"] / p), c) for i, (d, p, c) in enumerate(rows)
                                                if i % 6])
    report = probe(recipe(collection, tmp_path / "run", "train.epochs=1", "eval.holdout_classes=0",
                          f"cache.folder={tmp_path / 'cache'}", f"eval.query=[{query}]", f"eval.index=[{index}]"))
    assert report["evaluation"]["protocol"] == "24 queries against 120 index images"
    assert "note: 1 query images could not be decoded and are left out of the evaluation" in capsys.readouterr().out


def test_a_pooling_neck_is_exported_without_training(collection, tmp_path):
    from unicom.models.encoders import load_encoder

    report = probe(recipe(collection, tmp_path / "run", "neck.kind=pooling", "neck.embedding_dim=8", "neck.dropout=0"))
    assert report["epochs"] == 0 and report["history"] == []
    assert load_file(str(tmp_path / "run" / "model" / "model.safetensors")) == {}
    assert load_encoder(str(tmp_path / "run" / "model")).embedding_dim == 8


def test_the_run_folder_or_its_checkpoint_given_as_the_model_names_the_exported_model(collection, tmp_path):
    from unicom.models.encoders import load_encoder

    out = tmp_path / "run"
    probe(recipe(collection, out, "train.epochs=1"))
    with pytest.raises(InputError, match=f"{out}: no unicom_model.json; not a unicom model folder .*; it holds the "
                                         f"model folder {out / 'model'}: give that$"):
        load_encoder(str(out))
    with pytest.raises(InputError, match=f"{out / CHECKPOINT}: expected a state dict .*; the model trained from it is "
                                         f"the model folder {out / 'model'}: give that$"):
        load_encoder(str(out / CHECKPOINT))
    assert load_encoder(str(out / "model")).embedding_dim == 16


def test_a_backbone_folder_given_relative_is_exported_loadable_from_anywhere(collection, tmp_path, monkeypatch):
    from unicom.models.encoders import load_encoder

    pooling = ["neck.kind=pooling", "neck.dropout=0", "train.epochs=0", "eval.holdout_classes=0"]
    probe(recipe(collection, tmp_path / "base", *pooling, "neck.embedding_dim=8"))
    monkeypatch.chdir(tmp_path)
    probe(recipe(collection, tmp_path / "run", *pooling, "neck.embedding_dim=4", "backbone.model=base/model",
                 "backbone.pretrained=null", f"cache.folder={tmp_path / 'cache'}"))
    settings = json.loads((tmp_path / "run" / "model" / "unicom_model.json").read_text())["settings"]
    assert settings["backbone"] == str(tmp_path / "base" / "model")
    monkeypatch.chdir(collection["root"])
    encoder = load_encoder(str(tmp_path / "run" / "model"))
    image = encoder.image_transform(Image.open(collection["root"] / collection["rows"][0][1]))[None]
    timm_vit = load_encoder("timm/test_vit", str(collection["weights"]))
    with torch.no_grad():  # pooling of pooling: 64 features -> 8 -> 4, each bin the mean of 16 features
        expected = torch.nn.functional.normalize(timm_vit.encode_image(image).reshape(1, 4, 16).mean(-1))
        torch.testing.assert_close(torch.nn.functional.normalize(encoder.encode_image(image)), expected)


def test_command_line_runs_a_recipe_with_overrides(collection, tmp_path, capsys):
    code = main(["probe", "--config", str(CONFIGS / "unifex_tiny.yaml"), f"data.train=[{collection['train']}]",
                 f"backbone.pretrained={collection['weights']}", f"cache.folder={collection['cache']}",
                 "train.epochs=1", "data.sampling=class_balanced", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "images/class min/med/max" in printed and "final evaluation:" in printed
    assert (tmp_path / "run" / "model" / "unicom_model.json").is_file()
    assert json.loads((tmp_path / "run" / "datasets.json").read_text())["train"][0]["dataset"] == "a"


def test_command_line_takes_overrides_before_and_after_options(capsys):
    code = main(["probe", "--config", str(CONFIGS / "unifex_tiny.yaml"), "data.train=[a.csv]", "--out", "runs/x",
                 "neck.embedding_dim=8", "--print-config", "loss.centers=2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "out: runs/x" in printed and "embedding_dim: 8" in printed and "centers: 2" in printed


def test_command_line_rejects_an_unknown_key_listing_the_valid_ones(capsys):
    assert main(["probe", "--config", str(CONFIGS / "unifex_tiny.yaml"), "neck.size=8", "out=x", "data.train=[a.csv]"]) == 2
    assert "unknown key 'neck.size'; valid keys of section 'neck': kind, embedding_dim, batchnorm, dropout" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name", ["unifex_siglip_so400m_m4d35k.yaml", "unifex_clip_b16.yaml", "unifex_tiny.yaml"])
def test_shipped_recipes_are_valid(name):
    config = load_probe_config(CONFIGS / name, ["data.train=[lists/train.csv]", "out=runs/x"])
    assert config.neck.embedding_dim in (16, 64)


def documented_probe_commands():
    """The ``unicom probe --config NAME`` lines of docs/unifex.md, ``unicom probe --help``
    and the recipes' comments, NAME a shipped recipe."""
    root = Path(__file__).resolve().parents[1]
    sources = [root / "docs" / "unifex.md", root / "src" / "unicom" / "commands" / "probe.py",
               *sorted(CONFIGS.glob("unifex_*.yaml"))]
    text = "\n".join(path.read_text() for path in sources).replace("\\\n", " ")
    lines = [line.split("unicom probe", 1)[1].split("#")[0].split() for line in text.splitlines()
             if "unicom probe --config " in line]
    return [words for words in lines if words[words.index("--config") + 1] in shipped_recipes()]


@pytest.mark.parametrize("words", documented_probe_commands(), ids=" ".join)
def test_documented_commands_are_valid_recipes(words):
    config_path = words[words.index("--config") + 1]  # a shipped recipe's name
    overrides = [word for word in words if "=" in word and not word.startswith("-")]
    config = load_probe_config(config_path, ["data.train=[lists/train.csv]", "out=runs/x", *overrides])
    assert config.out and config.data.train


def test_every_bad_value_of_a_recipe_is_reported_at_once():
    with pytest.raises(InputError) as caught:
        load_probe_config(CONFIGS / "unifex_tiny.yaml", [
            "out=x", "data.train=[a.csv]", "train.augment=true", "eval.holdout_classes=1.5", "loss.sample_rate=0"])
    message = str(caught.value)
    assert "train.augment in cache mode draws among augmented views: set cache.augmented_views" in message
    assert "eval.holdout_classes must be in [0, 1), got 1.5" in message
    assert "loss.sample_rate must be in (0, 1], got 0.0" in message


def test_an_output_url_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL read as a path would be the local folder s3:/bucket/run
    with pytest.raises(InputError, match=r"out must be a local folder, got the URL 's3://bucket/run'"):
        load_probe_config(CONFIGS / "unifex_tiny.yaml", ["out=s3://bucket/run", "data.train=[a.csv]"])
    assert list(tmp_path.iterdir()) == []


def test_the_images_data_exclude_lists_are_not_trained_on(collection, tmp_path, capsys):
    table = tmp_path / "overlap.csv"
    table.write_text("key\nimages/hue_00/0.jpg\nimages/hue_13/5.jpg\n")  # the paths as the list writes them
    probe(recipe(collection, tmp_path / "run", "eval.every=0", "train.epochs=1", f"data.exclude=[{table}]"))
    assert "data.exclude: 2 of the 144 images of data.train left out" in capsys.readouterr().out
    from unicom.unifex.trainer import read_probe_data

    trained = json.loads(torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["train_rows"])
    whole = read_probe_data(recipe(collection, tmp_path / "other", "eval.every=0")).train.images.keys
    listed = [key for key in whole if key in ("a/images/hue_00/0.jpg", "b/images/hue_13/5.jpg")]  # unless held out
    assert listed and trained["images"] == len(whole) - len(listed)


def test_the_best_scored_epoch_is_exported_beside_the_last_across_a_resume(collection, tmp_path, capsys):
    """``eval.keep_best``: out/model_best holds the neck of the epoch with the highest mMP@5
    (the first of equals), its score in the provenance; a resumed run compares with the epochs
    before its checkpoint (the history)."""
    from safetensors.torch import load_file

    overrides = ("train.epochs=5", "eval.every=1", "eval.keep_best=true", "optim.lr=0.05")
    stopped = probe(recipe(collection, tmp_path / "run", *overrides), until_epoch=2)
    assert stopped["stopped_after_epoch"] == 2
    report = probe(recipe(collection, tmp_path / "run", *overrides))
    scores = [record["metrics"]["mmp@5"] for record in report["history"]]
    best = max(range(5), key=lambda i: (scores[i], -i))
    flags = [record["best"] for record in report["history"]]
    assert flags == [scores[i] > max(scores[:i], default=-1) for i in range(5)] and not all(flags)
    provenance = json.loads((tmp_path / "run" / "model_best" / "unicom_model.json").read_text())["provenance"]
    assert provenance["epochs"] == best + 1 and provenance["eval"] == {"metric": "mmp@5", "value": scores[best]}
    # its neck is that epoch's: a run of the same recipe stopped there checkpoints the same weights
    probe(recipe(collection, tmp_path / "until", *overrides), until_epoch=best + 1)
    kept, expected = load_file(str(tmp_path / "run" / "model_best" / "model.safetensors")), head_weights(tmp_path / "until")
    for name, value in kept.items():
        assert torch.equal(value, expected[name]), name
    assert "the best so far: exported to" in capsys.readouterr().out


def test_the_epochs_and_their_scores_go_to_tensorboard_and_wandb_and_a_resumed_run_continues_them(
        collection, tmp_path, wandb_offline):
    pytest.importorskip("wandb")
    from support import wandb_runs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ("train.epochs=3", "eval.every=1", "log.wandb=true", "log.wandb_name=probe")
    assert probe(recipe(collection, tmp_path / "run", *overrides), until_epoch=2)["stopped_after_epoch"] == 2
    report = probe(recipe(collection, tmp_path / "run", *overrides))
    runs = wandb_runs(tmp_path / "run")
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert [(run["project"], run["name"], run["exit_code"]) for run in runs] == [("unicom", "probe", 0)] * 2
    assert runs[0]["config"]["loss"] == json.loads(json.dumps(recipe(collection, tmp_path, *overrides).loss.__dict__))
    history = {**runs[0]["history"], **runs[1]["history"]}
    assert sorted(history) == [1, 2, 3]
    for record in report["history"]:
        row = history[record["epoch"]]
        assert row["train/loss"] == pytest.approx(record["loss"], rel=1e-12)
        assert row["train/images_per_second"] == pytest.approx(record["images"] / record["seconds"], rel=1e-9)
        for name in ("mmp@5", "recall@1", "map@r"):
            assert row[f"eval/{name}"] == pytest.approx(record["metrics"][name], rel=1e-12), name
    # OUT/curves.png draws log.jsonl's epochs: the loss, and the evaluations' mMP@5 and MAP@R
    from PIL import Image as PILImage

    from unicom.evaluate.plots import training_curves

    curves = training_curves(tmp_path / "run" / "log.jsonl")
    assert curves["x"] == "epoch" and curves["loss"] == [(r["epoch"], r["loss"]) for r in report["history"]]
    assert curves["eval"]["metric"] == "mmp@5"
    for name in ("mmp@5", "map@r"):
        assert curves["eval"][name] == [(r["epoch"], r["metrics"][name]) for r in report["history"]]
    with PILImage.open(tmp_path / "run" / "curves.png") as drawn:
        assert drawn.format == "PNG" and drawn.size == (672, 720)  # two panels: the loss, the scores
    # TensorBoard holds the same, each epoch once (float32)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    for tag, values in (("train/loss", [r["loss"] for r in report["history"]]),
                        ("eval/mmp@5", [r["metrics"]["mmp@5"] for r in report["history"]])):
        assert [event.step for event in events.Scalars(tag)] == [1, 2, 3]
        assert [event.value for event in events.Scalars(tag)] == pytest.approx(values, rel=1e-6)


def test_the_best_epoch_of_another_metric_is_exported_and_a_metric_not_reported_is_refused(collection, tmp_path):
    overrides = ("train.epochs=4", "eval.every=1", "eval.keep_best=true", "eval.metric=map@r", "optim.lr=0.05")
    report = probe(recipe(collection, tmp_path / "run", *overrides))
    scores = [record["metrics"]["map@r"] for record in report["history"]]
    assert [record["best"] for record in report["history"]] == [scores[i] > max(scores[:i], default=-1) for i in range(4)]
    best = max(range(4), key=lambda i: (scores[i], -i))
    provenance = json.loads((tmp_path / "run" / "model_best" / "unicom_model.json").read_text())["provenance"]
    assert provenance["epochs"] == best + 1 and provenance["eval"] == {"metric": "map@r", "value": scores[best]}
    with pytest.raises(InputError, match=re.escape("eval.metric=recall@2: the evaluation reports recall@1, recall@5, "
                                                   "map@r, r_precision, map@100, mmp@5 (recall@K for each K of "
                                                   "eval.ks); give one of them")):
        recipe(collection, tmp_path / "other", "eval.metric=recall@2")
    # a run resumed to keep the best of another metric is refused (its best model is of the first)
    with pytest.raises(InputError, match=re.escape("eval.metric: 'map@r' -> 'mmp@5'")):
        probe(recipe(collection, tmp_path / "run", *overrides[:-2], "optim.lr=0.05", "eval.metric=mmp@5",
                     "train.epochs=4"))


def test_keep_best_without_evaluations_to_compare_is_refused(collection, tmp_path):
    with pytest.raises(InputError, match="set eval.every to 1 or more"):
        recipe(collection, tmp_path / "run", "eval.keep_best=true", "eval.every=0")
