"""benchmarks/partial_fc_step.py: which step its GPU targets are stated for."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from partial_fc_step import gpu_target_lines  # noqa: E402


def ran(variant: str, ms: float) -> dict:
    return {"variant": variant, "seconds_per_step": ms / 1000}


def test_the_gpu_targets_take_the_faster_of_the_eager_and_the_captured_step():
    assert gpu_target_lines(1_000_000, {"a": ran("a", 4.33), "e": ran("e", 1.9), "c": None}) == [
        "target on the GPU at K = 1M: <= 4 ms per step (met: 1.90 ms (e))"]
    assert gpu_target_lines(1_000_000, {"a": ran("a", 4.33), "e": None}) == [
        "target on the GPU at K = 1M: <= 4 ms per step (NOT met: 4.33 ms (a))"]
    assert gpu_target_lines(100_000, {"a": ran("a", 4.2), "c": ran("c", 5.23), "e": ran("e", 2.0)}) == [
        "target on the GPU at K = 100,000: <= 0.5x (c)'s time (met: 0.382 (e))"]
    assert gpu_target_lines(100_000, {"a": ran("a", 2.0), "c": ran("c", 3.0), "e": ran("e", 2.5)}) == [
        "target on the GPU at K = 100,000: <= 0.5x (c)'s time (NOT met: 0.667 (a))"]
    assert gpu_target_lines(100_000, {"a": ran("a", 2.0), "c": None, "e": None}) == []  # nothing to compare with
    assert gpu_target_lines(20_000, {"a": ran("a", 2.0), "c": ran("c", 9.0)}) == []  # no target at that size
