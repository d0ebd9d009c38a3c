"""Recipes: typed keys, overrides, validation before any work, the shipped configs."""

from __future__ import annotations


import pytest
import torch

from unicom.engine.recipe import RECIPE_FOLDER
from unicom.errors import InputError
from unicom.train.config import apply_overrides, from_dict, load_config, to_yaml

CONFIGS = RECIPE_FOLDER
SOURCE = ["out=/tmp/unused-run", "data.folder=/tmp/unused-images"]


def test_an_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(InputError) as error:
        from_dict({"optim": {"learning_rate": 0.1}})
    message = str(error.value)
    assert "unknown key 'optim.learning_rate'" in message
    assert "valid keys of section 'optim': lr, weight_decay, betas, eps, prototype_lr_scale" in message


def test_an_unknown_section_lists_the_sections():
    with pytest.raises(InputError, match="unknown key 'optimizer' \\(did you mean optim\\?\\); valid keys of the top level: out, seed, model, data"):
        from_dict({"optimizer": {"lr": 0.1}})


def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_value():
    with pytest.raises(InputError, match="data.batch_size must be an integer, got 'large'"):
        from_dict({"data": {"batch_size": "large"}})
    with pytest.raises(InputError, match="train.precision must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"):
        load_config(None, [*SOURCE, "train.precision=fp8"])
    with pytest.raises(InputError, match="'model' is a section; set its keys instead: model.name"):
        load_config(None, [*SOURCE, "model=ViT-B-32"])


def test_overrides_are_typed_by_their_key():
    config = load_config(None, [
        *SOURCE, "optim.lr=5e-4", "data.batch_size=64", "augment.crop_scale=[0.2, 1]",
        "data.shards=shards/{00000..00009}.tar", "data.folder=null", "data.labels=clusters",
        "model.init=null", "model.grad_checkpointing=true", "optim.clip_grad_norm=1",
    ])
    assert config.optim.lr == 5e-4
    assert config.data.batch_size == 64
    assert config.augment.crop_scale == [0.2, 1.0]
    assert config.data.shards == ["shards/{00000..00009}.tar"]  # a brace pattern is not a YAML mapping
    assert config.data.folder is None and config.model.init is None
    assert config.model.grad_checkpointing is True
    assert config.optim.clip_grad_norm == 1.0


def test_yaml_numbers_written_like_1e_3_are_numbers(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("out: run\noptim:\n  lr: 1e-3\ndata:\n  folder: images\n")
    assert load_config(path).optim.lr == 1e-3


def test_a_section_given_twice_in_a_recipe_is_an_error_naming_both_lines(tmp_path):
    """YAML readers keep the last of two equal keys: the second `optim:` would silently
    drop the learning rate of the first."""
    path = tmp_path / "recipe.yaml"
    path.write_text("out: run\noptim:\n  lr: 1e-3\ndata:\n  folder: images\noptim:\n  weight_decay: 0.05\n")
    with pytest.raises(InputError, match=rf"{path}: line 6: key 'optim' is given twice \(first on line 2\); "
                                         "a recipe gives each key once: merge the two"):
        load_config(path)


def test_a_key_given_twice_in_a_section_is_an_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("out: run\ndata:\n  folder: images\noptim:\n  lr: 1e-3\n  lr: 1e-4\n")
    with pytest.raises(InputError, match=r"line 6: key 'lr' is given twice \(first on line 5\)"):
        load_config(path)


def test_yaml_merge_keys_share_settings_and_the_keys_given_beside_them_win(tmp_path):
    """`<<:` (the YAML merge key, mostly `<<: *anchor`) copies a mapping in; a key given beside
    it replaces the copied one, which is no key given twice."""
    path = tmp_path / "recipe.yaml"
    text = ("out: run\ndata:\n  folder: images\nloss:\n  <<: {scale: 32.0, margin: 0.2}\n  margin: 0.3\n"
            "optim:\n  <<: {lr: 1.0e-3, weight_decay: 0.05}\n")
    path.write_text(text)
    config = load_config(path)
    assert (config.loss.scale, config.loss.margin) == (32.0, 0.3)
    assert (config.optim.lr, config.optim.weight_decay) == (1e-3, 0.05)


def test_a_list_as_a_key_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("out: run\n? [optim, lr]\n: 1.0e-3\n")
    with pytest.raises(InputError, match=rf"(?s){path}: not valid YAML \(while constructing a mapping.*"
                                         r"found unhashable key.*line 2, column 3"):
        load_config(path)


def test_every_problem_of_a_recipe_is_reported_at_once():
    with pytest.raises(InputError) as error:
        load_config(None, ["data.batch_size=0", "loss.sample_rate=1.5", "optim.lr=-1"])
    message = str(error.value)
    for part in ("exactly one training source", "data.batch_size must be at least 1", "loss.sample_rate must be in (0, 1]",
                 "optim.lr must be positive", "out is required"):
        assert part in message


def test_the_resolved_recipe_reads_back_identically(tmp_path):
    config = load_config(CONFIGS / "finetune_sop.yaml", ["model.init=ViT-B/32"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


TRAINING_RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml")
                          if p.name.startswith(("pretrain_", "finetune_", "scratch_", "demo")))


def test_the_training_recipes_are_shipped():
    assert len(TRAINING_RECIPES) == 12


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_every_shipped_training_recipe_is_valid(name):
    pseudo_labelled = "pretrain" in name or name in ("demo.yaml", "scratch_small.yaml")
    overrides = ["data.shards=shards/", "data.labels=clusters/"] if pseudo_labelled else []
    config = load_config(CONFIGS / name, [*overrides, "out=/tmp/unused-run"])
    assert config.loss.head == "arcface" and config.loss.margin in (0.25, 0.3, 0.35)


@pytest.mark.parametrize("name", ["pretrain_vit_b32.yaml", "pretrain_vit_b16.yaml", "pretrain_vit_l14.yaml"])
def test_pretraining_recipes_follow_the_paper(name):
    config = load_config(CONFIGS / name, ["data.shards=s/", "data.labels=c/"])
    assert (config.optim.lr, config.optim.weight_decay) == (1e-3, 0.05)
    assert (config.loss.scale, config.loss.sample_rate, config.loss.feature_rate) == (64.0, 0.1, 1.0)
    assert config.train.epochs == 32 and config.model.init is None
    assert config.augment.hflip == 0.5 and config.augment.randaugment is None
    assert config.schedule.kind == "cosine"


def test_the_compact_recipe_selects_half_of_the_features_for_one_epoch():
    config = load_config(CONFIGS / "pretrain_compact.yaml", ["data.shards=s/", "data.labels=c/"])
    assert config.loss.feature_rate == 0.5 and config.train.epochs == 1 and config.model.init is not None


# The authors' fine-tuning runs (deepglint/unicom): unicom/scripts/<dataset>_vit_b_16.sh for ViT-B/16, and for
# CUB and Cars, which have no script, the defaults of unicom/retrieval.py:
#   (batch per GPU, epochs, lr, lr_pfc_weight, margin m2, num_feat of 768, transform)
PUBLIC_RUNS = {
    "sop": (64, 64, 1e-5, 10.0, 0.25, 512, "origin_clip"),
    "inshop": (16, 128, 1e-5, 10.0, 0.25, 512, "timm"),
    "inaturalist": (128, 128, 4e-5, 10.0, 0.35, 512, "timm"),
    "cub": (128, 32, 1e-4, 5.0, 0.3, None, "timm"),
    "cars": (128, 32, 1e-4, 5.0, 0.3, None, "timm"),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_RUNS))
def test_fine_tuning_recipes_are_the_authors_fine_tuning_runs(name):
    batch, epochs, lr, pfc, margin, num_feat, transform = PUBLIC_RUNS[name]
    config = load_config(CONFIGS / f"finetune_{name}.yaml", ["model.init=ViT-B/16"])
    assert config.model.init == "ViT-B/16" and config.model.name is None and config.model.sync_batchnorm
    assert (config.data.batch_size, config.train.epochs) == (batch, epochs)
    assert (config.optim.lr, config.optim.prototype_lr_scale, config.optim.weight_decay) == (lr, pfc, 0.0)
    assert (config.loss.margin, config.loss.scale, config.loss.sample_rate) == (margin, 32.0, 1.0)
    assert round(config.loss.feature_rate * 768) == (num_feat or 768)
    assert config.loss.margin_gradient == "straight_through"  # their margin carries no gradient of its own
    assert (config.schedule.kind, config.schedule.warmup_fraction) == ("onecycle", 0.1)
    assert (config.schedule.onecycle_div, config.schedule.onecycle_final_div) == (25.0, 1e4)  # OneCycleLR's defaults
    assert config.train.precision == "fp32"  # autocast(False)
    if transform == "timm":  # their get_transform(224): timm's create_transform with these arguments
        assert config.augment.enabled and config.augment.randaugment == "rand-m9-mstd0.5-inc1"
        assert (config.augment.random_erasing, config.augment.random_erasing_mode, config.augment.color_jitter) == (0.25, "pixel", 0.4)
        assert (config.augment.crop_scale, config.augment.hflip) == ([0.08, 1.0], 0.5)  # timm's defaults
    else:  # origin_clip: the model's own transform
        assert not config.augment.enabled


def test_without_augmentation_training_images_get_the_clip_transform():
    from PIL import Image
    from torchvision import transforms as T

    from unicom.models.registry import CLIP_MEAN, CLIP_STD

    config = load_config(CONFIGS / "finetune_sop.yaml", ["model.init=ViT-B/16"])
    ours = config.augment.transform(224)
    # CLIP's own preprocessing (openai/CLIP's _transform), which the released models share
    clip = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    image = Image.new("RGB", (300, 180), (120, 30, 200))
    image.paste((10, 200, 40), (40, 20, 200, 120))
    assert torch.equal(ours(image), clip(image))


def test_a_bad_recipe_stops_the_command_before_anything_is_written(tmp_path, capsys):
    from unicom.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(CONFIGS / "finetune_sop.yaml"), f"out={out}", "optim.lr_backbone=1e-4"])
    assert code == 2
    assert "unknown key 'optim.lr_backbone'" in capsys.readouterr().err
    assert not out.exists()


def test_overrides_must_be_key_value_pairs():
    config = from_dict({})
    with pytest.raises(InputError, match="expected key=value"):
        apply_overrides(config, ["optim.lr"])


def test_the_library_and_the_losses_do_not_import_the_trainer():
    import subprocess
    import sys

    code = ("import sys, unicom, unicom.losses, unicom.models.vit; "
            "print(sorted(m for m in sys.modules if m.startswith('unicom.train')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_key_is_listed_with_its_default(capsys):
    from unicom.cli import main

    assert main(["train", "--list-keys"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "optim.lr = 0.001" in listed and "loss.sample_rate = 0.1" in listed


def test_listed_defaults_are_written_as_yaml_and_read_back_as_overrides(capsys):
    import yaml

    from unicom.cli import main
    from unicom.train.config import default_values, load_config

    assert main(["train", "--list-keys"]) == 0
    listed = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert listed["data.shards"] == "null" and listed["model.sync_batchnorm"] == "true"
    assert listed["model.compile"] == "false" and listed["optim.betas"] == "[0.9, 0.999]"
    assert {key: yaml.safe_load(text) for key, text in listed.items()} == default_values()
    overrides = [f"{key}={text}" for key, text in listed.items()]
    assert load_config(None, overrides, validate=False).to_dict() == load_config(None, [], validate=False).to_dict()


def test_print_config_needs_no_data_source_and_says_what_is_missing(capsys):
    import yaml

    from unicom.cli import main

    assert main(["train", "--print-config", "optim.lr=5e-4"]) == 0
    captured = capsys.readouterr()
    printed = yaml.safe_load(captured.out)
    assert printed["optim"]["lr"] == 5e-4 and printed["data"]["folder"] is None and printed["out"] is None
    assert "give exactly one training source" in captured.err and "out is required" in captured.err


def test_print_config_still_refuses_an_unknown_key(capsys):
    from unicom.cli import main

    assert main(["train", "--print-config", "optim.lr_backbone=1e-4"]) == 2
    assert "unknown key 'optim.lr_backbone'" in capsys.readouterr().err


def test_an_output_url_is_refused_before_any_work():
    """`out=s3://…` was written to a local folder named 's3:'."""
    with pytest.raises(InputError, match=r"out must be a local folder, got the URL 's3://bucket/run'"):
        load_config(None, ["out=s3://bucket/run", "data.folder=s3://bucket/images", "model.name=ViT-B-32"])
    load_config(None, ["out=/tmp/unused-run", "data.folder=s3://bucket/images", "model.name=ViT-B-32"])  # data may be URLs
