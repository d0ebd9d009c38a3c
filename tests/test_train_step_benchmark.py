"""benchmarks/train_step.py: which attention backend earns a compiled step of its own."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from train_step import faster_attention  # noqa: E402


def test_a_backend_gets_its_own_step_only_when_clearly_faster_than_pytorchs_choice():
    assert faster_attention({"auto": 1.0, "cudnn": 1.0, "flash": 0.80, "efficient": 0.90}) == "flash"
    assert faster_attention({"auto": 1.0, "cudnn": 0.97, "flash": 0.99}) is None  # within 5%
    assert faster_attention({"auto": 1.0, "cudnn": 0.94}) == "cudnn"
    assert faster_attention({"auto": 1.0, "flash": 0.94}, margin=0.1) is None
    assert faster_attention({"cudnn": 0.5}) is None  # PyTorch's choice did not run: nothing to compare
    assert faster_attention({"auto": 1.0}) is None
