"""The one table of margin heads and the shared recipe sections: both recipes reach every head
with the same options, the same checks and the same defaults."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from support import write_class_folder

from unicom.errors import InputError
from unicom.losses import margins
from unicom.losses.heads import HEADS, build_margin_head, head_class
from unicom.train.config import load_config
from unicom.unifex.config import load_probe_config

TRAIN = ["out=/tmp/unused-run", "data.folder=/tmp/unused-images"]
PROBE = ["out=/tmp/unused-run", "data.train=[lists/train.csv]"]


def test_the_table_holds_every_margin_head_of_the_library():
    defined = {cls.__name__ for _, cls in inspect.getmembers(margins, inspect.isclass)
               if issubclass(cls, margins.MarginHead) and cls is not margins.MarginHead}
    assert {entry.cls for entry in HEADS.values()} == defined


@pytest.mark.parametrize("name", list(HEADS))
def test_a_heads_options_and_data_are_its_constructor_arguments(name):
    parameters = set(inspect.signature(head_class(name)).parameters)
    assert parameters == set(HEADS[name].options) | set(HEADS[name].data)


@pytest.mark.parametrize("name", list(HEADS))
def test_both_recipes_build_every_head(name):
    counts = np.array([4, 2, 9, 1])
    for config in (load_config(None, [*TRAIN, f"loss.head={name}", "loss.centers=2"]),
                   load_probe_config(None, [*PROBE, f"loss.head={name}", "loss.centers=2"])):
        pfc = config.loss.partial_fc(8, len(counts), counts, seed=0)
        assert isinstance(pfc.margin, head_class(name)) and pfc.centers == 2


def test_an_option_of_another_head_is_refused_by_both_recipes():
    for load, base in ((load_config, TRAIN), (load_probe_config, PROBE)):
        with pytest.raises(InputError, match="loss.margin does not apply to loss.head=adacos; its options are dynamic"):
            load(None, [*base, "loss.head=adacos", "loss.margin=0.3"])


def test_unset_options_are_the_heads_own_defaults_in_both_recipes():
    for config in (load_config(None, TRAIN), load_probe_config(None, PROBE)):
        head = config.loss.margin_head(3)
        assert (type(head).__name__, head.margin, head.scale) == ("ArcFace", 0.3, 64.0)


@pytest.mark.parametrize("override, message", [
    ("augment.crop_ratio=[2.0,1.0]", "augment.crop_ratio must be [low, high] with 0 < low <= high, got [2.0, 1.0]"),
    ("augment.randaugment=m9", "augment.randaugment must be a timm RandAugment string"),
    ("optim.eps=0", "optim.eps must be positive"),
    ("schedule.onecycle_div=0.5", "schedule.onecycle_div and schedule.onecycle_final_div must be at least 1"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps must be non-negative"),
    ("loss.feature_rate=0", "loss.feature_rate must be in (0, 1], got 0.0"),
    ("loss.margin_gradient=none", "loss.margin_gradient must be one of 'exact', 'straight_through', got 'none'"),
])
def test_the_shared_sections_are_checked_alike_in_both_recipes(override, message):
    for load, base in ((load_config, TRAIN), (load_probe_config, PROBE)):
        with pytest.raises(InputError) as error:
            load(None, [*base, override])
        assert message in str(error.value)


def test_each_recipe_keeps_its_own_default_sample_rate():
    assert load_config(None, TRAIN).loss.sample_rate == 0.1  # the paper's r1 for pre-training
    assert load_probe_config(None, PROBE).loss.sample_rate == 1.0  # UniFEx: every class


def test_probe_recipes_select_features_and_take_the_straight_through_gradient():
    from unicom.unifex.trainer import build_head

    config = load_probe_config(None, [*PROBE, "neck.embedding_dim=16", "loss.feature_rate=0.5",
                                      "loss.margin_gradient=straight_through"])
    head = build_head(config, 32, np.array([3, 3, 4]), torch.device("cpu"))
    assert head.partial_fc.num_features == 8 and head.partial_fc.margin_gradient == "straight_through"


def test_unicom_train_takes_dynm_arcface_margins_from_the_training_labels(tmp_path):
    from unicom.train.trainer import prepare

    counts = {0: 2, 1: 8, 2: 5}  # images per class folder
    for label, count in counts.items():
        write_class_folder(tmp_path / "images", [label], count, size=16)
    config = load_config(None, [
        f"out={tmp_path / 'run'}", f"data.folder={tmp_path / 'images'}", "data.batch_size=4", "data.workers=0",
        "model.image_size=16", "model.patch_size=8", "model.width=32", "model.depth=1", "model.heads=2",
        "model.embedding_dim=8", "loss.head=dynm_arcface", "loss.m_max=0.5", "loss.m_min=0.1",
        "loss.margin_gradient=straight_through", "train.device=cpu",
    ])
    run = prepare(config)
    # m(n) = m_min + (m_max - m_min)/2 (1 + cos(pi (n - n_min)/(n_max - n_min)))
    expected = [0.1 + 0.2 * (1 + math.cos(math.pi * (n - 2) / 6)) for n in counts.values()]
    np.testing.assert_allclose(run.partial_fc.margin.margins.numpy(), expected, rtol=1e-6)
    assert run.partial_fc.margin_gradient == "straight_through"


def test_a_head_that_needs_class_counts_says_so():
    with pytest.raises(InputError, match="the dynm_arcface head needs the number of training images of every class"):
        build_margin_head("dynm_arcface", num_classes=3)


def test_the_probe_lists_the_new_loss_keys(capsys):
    from unicom.cli import main

    assert main(["probe", "--list-keys"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "loss.feature_rate = 1.0" in listed and "loss.margin_gradient = exact" in listed


@pytest.mark.parametrize("name", list(HEADS))
def test_a_built_heads_settings_rebuild_the_same_head(name):
    from unicom.losses.heads import head_settings

    options = {"scale": 20.0} if "scale" in HEADS[name].options else {"dynamic": False}
    settings = head_settings(build_margin_head(name, options, num_classes=4, class_counts=[1, 2, 3, 4]))
    assert settings["head"] == name and {k: settings[k] for k in options} == options
    rebuilt = build_margin_head(name, {k: v for k, v in settings.items() if k != "head"}, num_classes=4,
                                class_counts=[1, 2, 3, 4])
    assert head_settings(rebuilt) == settings
