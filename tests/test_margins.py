"""Margin heads: hand-computed logits, the fallback past π, dtype of the logits."""

import math

import pytest
import torch

from unicom.losses import ArcFace, CombinedMargin, CosFace


def test_arcface_logits_match_hand_computation():
    cosines = torch.tensor([[0.5, 0.1, -0.2], [0.3, 0.8, 0.0]])
    labels = torch.tensor([0, 1])
    logits = ArcFace(margin=0.3, scale=10.0)(cosines, labels)
    expected = [
        [10 * math.cos(math.acos(0.5) + 0.3), 10 * 0.1, 10 * -0.2],
        [10 * 0.3, 10 * math.cos(math.acos(0.8) + 0.3), 0.0],
    ]
    torch.testing.assert_close(logits, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_row_without_local_target_is_only_scaled():
    cosines = torch.tensor([[0.5, 0.1], [0.3, 0.8]])
    logits = ArcFace(margin=0.5, scale=2.0)(cosines, torch.tensor([-1, 1]))
    assert logits[0].tolist() == pytest.approx([1.0, 0.2])
    assert logits[1, 0].item() == pytest.approx(0.6)


def test_arcface_falls_back_to_monotonic_form_past_pi():
    # θ = acos(-0.99) ≈ 3.0 rad; θ + 0.5 > π: cos θ − m·sin m instead of cos(θ + m)
    margin = 0.5
    logits = ArcFace(margin=margin, scale=1.0)(torch.tensor([[-0.99, 0.0]]), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(-0.99 - margin * math.sin(margin), abs=1e-6)
    # just inside the threshold the exact form is used
    inside = math.cos(math.pi - margin) + 0.01
    logits = ArcFace(margin=margin, scale=1.0)(torch.tensor([[inside]]), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(math.cos(math.acos(inside) + margin), abs=1e-6)


def test_target_logit_decreases_with_angle_across_the_fallback():
    head = ArcFace(margin=0.5, scale=1.0)
    cos = torch.linspace(0.999, -0.999, 2001)[:, None]
    target = head(cos, torch.zeros(2001, dtype=torch.long))[:, 0]
    assert torch.all(target[1:] < target[:-1])


def test_cosface_subtracts_margin():
    logits = CosFace(margin=0.35, scale=30.0)(torch.tensor([[0.9, 0.2]]), torch.tensor([0]))
    torch.testing.assert_close(logits, torch.tensor([[30 * 0.55, 30 * 0.2]]))


def test_combined_margin_general_form():
    m1, m2, m3, s = 1.2, 0.2, 0.1, 8.0
    cos = 0.6
    logits = CombinedMargin(m1, m2, m3, s)(torch.tensor([[cos, 0.3]]), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(s * (math.cos(m1 * math.acos(cos) + m2) - m3), rel=1e-6)
    assert logits[0, 1].item() == pytest.approx(s * 0.3, rel=1e-6)


def test_combined_margin_equals_arcface_and_cosface():
    cosines = torch.rand(6, 5) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, -1])
    torch.testing.assert_close(CombinedMargin(1.0, 0.3, 0.0, 64.0)(cosines, labels), ArcFace(0.3, 64.0)(cosines, labels))
    torch.testing.assert_close(CombinedMargin(1.0, 0.0, 0.2, 64.0)(cosines, labels), CosFace(0.2, 64.0)(cosines, labels))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_logits_are_float32(dtype):
    cosines = (torch.rand(4, 3) * 2 - 1).to(dtype)
    logits = ArcFace()(cosines, torch.tensor([0, 1, 2, 0]))
    assert logits.dtype == torch.float32


def test_heads_do_not_modify_their_input():
    cosines = torch.tensor([[0.5, 0.1]])
    before = cosines.clone()
    ArcFace()(cosines, torch.tensor([0]))
    assert torch.equal(cosines, before)
