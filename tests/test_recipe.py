"""The recipe engine shared by ``unicom train`` and ``unicom probe``."""

from __future__ import annotations

import pytest

from unicom.engine.recipe import apply_overrides, changed_keys
from unicom.errors import InputError
from unicom.train.config import TrainConfig
from unicom.unifex.config import load_probe_config

PROBE = ["out=/tmp/unused-run", "data.train=[lists/train.csv]"]


def test_a_stored_recipe_lacking_keys_added_since_counts_them_at_their_defaults():
    config = load_probe_config(None, PROBE)
    stored = config.to_dict()  # as a run written before loss.feature_rate and loss.margin_gradient existed
    del stored["loss"]["feature_rate"], stored["loss"]["margin_gradient"]
    assert changed_keys(stored, config) == []
    config.loss.feature_rate = 0.5
    assert changed_keys(stored, config) == [("loss.feature_rate", 1.0, 0.5)]


def test_keys_that_may_change_are_left_out():
    config = load_probe_config(None, PROBE)
    stored = config.to_dict()
    config.eval.ks, config.data.batch_size = [1], 64
    assert changed_keys(stored, config, ignore=("eval.",)) == [("data.batch_size", 128, 64)]


def test_a_recipe_in_object_storage_is_read_where_it_is(s3, tmp_path, capsys):
    from unicom.cli import main
    from unicom.engine.recipe import RECIPE_FOLDER
    from unicom.train.config import load_config, to_yaml

    url = s3.bucket("recipes") + "/mine/sop.yaml"
    text = (RECIPE_FOLDER / "finetune_sop.yaml").read_text().replace("lr: 1.0e-5", "lr: 1.25e-4")
    assert text != (RECIPE_FOLDER / "finetune_sop.yaml").read_text()
    s3.client().put_object(Bucket="recipes", Key="mine/sop.yaml", Body=text.encode())
    local = tmp_path / "sop.yaml"
    local.write_text(text)
    remote = load_config(url, validate=False)
    assert to_yaml(remote) == to_yaml(load_config(local, validate=False))
    assert remote.optim.lr == 1.25e-4
    assert main(["train", "--config", url, "--print-config"]) == 0
    assert capsys.readouterr().out == to_yaml(remote)
    missing = url.replace("sop.yaml", "missing.yaml")
    assert main(["train", "--config", missing, "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == f"unicom train: error: {missing}: recipe file not found"


def test_a_key_of_one_string_or_a_list_keeps_a_string_as_written():
    """``eval.benchmark`` / ``eval.root`` take one string or a list: a value that is not a
    ``[list]`` stays the string written (``yes`` is not YAML's true), a list is a list (its
    items read as YAML reads them), and null is none."""
    config = apply_overrides(TrainConfig(), ["eval.benchmark=yes", "eval.root=1e3"])
    assert (config.eval.benchmark, config.eval.root) == ("yes", "1e3")
    config = apply_overrides(TrainConfig(), ["eval.benchmark=[cub, cars196]", "eval.root=[data/cub,2024]"])
    assert (config.eval.benchmark, config.eval.root) == (["cub", "cars196"], ["data/cub", "2024"])
    assert config.eval.benchmarks() == [("cub", "data/cub"), ("cars196", "2024")]
    assert apply_overrides(TrainConfig(), ["eval.benchmark=null"]).eval.benchmark is None
    with pytest.raises(InputError, match=r"eval.benchmark must be a string or a list of strings or null, got \[\{"):
        apply_overrides(TrainConfig(), ["eval.benchmark=[{cub: 1}]"])
