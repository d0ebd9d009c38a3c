"""The recipe engine shared by ``unicom train`` and ``unicom probe``."""

from __future__ import annotations

from unicom.engine.recipe import changed_keys
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
