"""Learning-rate factors against hand-computed values and torch's OneCycleLR."""

from __future__ import annotations

import math

import pytest
import torch

from unicom.engine.schedule import lr_factor, warmup_steps


def test_cosine_warms_up_linearly_then_follows_half_a_cosine_to_the_floor():
    total, warmup = 11, 2
    factors = [lr_factor(step, total, "cosine", warmup, min_ratio=0.1) for step in range(total)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)  # (step + 1) / warmup
    # step 2 starts the cosine at 1; the last step (10) ends at the floor; halfway (step 6) is the mean
    assert lr_factor(2, total, "cosine", warmup, 0.1) == pytest.approx(1.0)
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[-1] == pytest.approx(0.1)
    assert factors[3] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 8)) / 2)


def test_onecycle_matches_torchs_one_cycle_schedule():
    total, pct = 100, 0.1
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=total, pct_start=pct,
                                                    anneal_strategy="cos", cycle_momentum=False)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    # torch peaks at step pct * total - 1
    ours = [lr_factor(step, total, "onecycle", warmup=int(pct * total) - 1) for step in range(total)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_constant_is_one_after_the_warm_up():
    assert [lr_factor(s, 5, "constant", 2) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_warm_up_length_from_steps_or_fraction():
    assert warmup_steps(1000, 0.05, None) == 50
    assert warmup_steps(1000, 0.05, 7) == 7
