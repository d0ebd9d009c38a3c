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


# -- margins that need more than the cosines ------------------------------------------------

from unicom.losses import AdaCos, AdaFace, CurricularFace, DynMArcFace, LiArcFace, MarginContext  # noqa: E402


def test_dynm_arcface_margins_follow_the_formula():
    counts = torch.tensor([1, 5, 10, 10])
    head = DynMArcFace(counts, m_max=0.6, m_min=0.2)
    normalised = [0.0, 4 / 9, 1.0, 1.0]
    expected = [0.2 + 0.5 * 0.4 * (1 + math.cos(math.pi * n)) for n in normalised]
    assert head.margins.tolist() == pytest.approx(expected, rel=1e-6)
    assert head.margins[0].item() == pytest.approx(0.6) and head.margins[2].item() == pytest.approx(0.2)


def test_dynm_arcface_uses_the_margin_of_each_rows_class():
    head = DynMArcFace(torch.tensor([1, 10]), scale=1.0)
    cosines = torch.tensor([[0.5, 0.2], [0.1, 0.7]])
    logits = head(cosines, torch.tensor([0, 1]))
    assert logits[0, 0].item() == pytest.approx(math.cos(math.acos(0.5) + 0.6), abs=1e-6)
    assert logits[1, 1].item() == pytest.approx(math.cos(math.acos(0.7) + 0.2), abs=1e-6)


def test_dynm_arcface_equal_counts_give_m_max():
    assert DynMArcFace([3, 3, 3]).margins.tolist() == pytest.approx([0.6] * 3)


def test_adacos_fixed_scale():
    head = AdaCos(num_classes=11, dynamic=False)
    cosines = torch.tensor([[0.3, -0.1, 0.2]])
    logits = head(cosines, torch.tensor([0]))
    s = math.sqrt(2) * math.log(10)
    torch.testing.assert_close(logits, cosines * s)


def test_adacos_dynamic_scale_update_by_hand():
    head = AdaCos(num_classes=3)
    s0 = math.sqrt(2) * math.log(2)
    cosines = torch.tensor([[0.8, 0.1, -0.2], [0.3, 0.6, 0.0]])
    labels = torch.tensor([0, 1])
    logits = head(cosines, labels)
    b_avg = ((math.exp(s0 * 0.1) + math.exp(s0 * -0.2)) + (math.exp(s0 * 0.3) + math.exp(s0 * 0.0))) / 2
    theta_median = min(math.acos(0.8), math.acos(0.6))  # lower median of two values
    s1 = math.log(b_avg) / math.cos(min(math.pi / 4, theta_median))
    assert head.scale == pytest.approx(s1, rel=1e-6)
    torch.testing.assert_close(logits, cosines * s1)
    head.eval()
    head(cosines, labels)
    assert head.scale == pytest.approx(s1, rel=1e-6)  # no update outside training


def test_adacos_dynamic_scale_past_float32s_exponent_range():
    # exp(100 · 0.95) is beyond float32 (about e^88.7): the update must not make the scale inf,
    # after which every logit, loss and step would be non-finite
    head = AdaCos(num_classes=3)
    head.scale_value.fill_(100.0)
    cosines = torch.tensor([[0.97, 0.95, 0.1], [0.9, 0.96, 0.2]])
    head(cosines, torch.tensor([0, 1]))
    b_avg = ((math.exp(95.0) + math.exp(10.0)) + (math.exp(90.0) + math.exp(20.0))) / 2
    s1 = math.log(b_avg) / math.cos(min(math.pi / 4, math.acos(0.97)))  # the lower of the two angles
    assert head.scale == pytest.approx(s1, rel=1e-6)


def test_adacos_keeps_its_scale_through_a_batch_of_non_finite_cosines():
    head = AdaCos(num_classes=3)
    before = head.scale
    head(torch.tensor([[float("nan"), 0.1, 0.2], [0.3, 0.4, 0.0]]), torch.tensor([0, 1]))
    assert head.scale == before


def test_li_arcface_is_linear_in_the_angle():
    head = LiArcFace(margin=0.45, scale=2.0)
    cosines = torch.tensor([[0.5, -0.3]])
    logits = head(cosines, torch.tensor([0]))
    expected = [2 * (math.pi - 2 * (math.acos(0.5) + 0.45)) / math.pi, 2 * (math.pi - 2 * math.acos(-0.3)) / math.pi]
    assert logits[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_curricular_face_reweights_hard_negatives_by_hand():
    head = CurricularFace(margin=0.5, scale=1.0)
    cosines = torch.tensor([[0.5, 0.9, 0.01]])
    logits = head(cosines, torch.tensor([0]))
    t = 0.01 * 0.5
    target = math.cos(math.acos(0.5) + 0.5)  # 0.0236
    assert head.t.item() == pytest.approx(t)
    assert logits[0].tolist() == pytest.approx([target, 0.9 * (t + 0.9), 0.01], rel=1e-5)


def test_adaface_margin_by_hand():
    head = AdaFace(margin=0.4, h=0.333, scale=1.0, t_alpha=0.5)
    cosines = torch.tensor([[0.6, 0.1], [0.2, 0.7]])
    labels = torch.tensor([0, 1])
    norms = torch.tensor([30.0, 10.0])
    context = MarginContext(class_ids=labels, column_classes=torch.arange(2), norms=norms)
    logits = head(cosines, labels, context)
    mean = 0.5 * 20.0 + 0.5 * 20.0
    std = 0.5 * 100.0 + 0.5 * float(norms.std())
    assert head.batch_mean.item() == pytest.approx(mean) and head.batch_std.item() == pytest.approx(std)
    for row, (cos, norm) in enumerate([(0.6, 30.0), (0.7, 10.0)]):
        g = max(-1.0, min(1.0, 0.333 * (norm - mean) / (std + 1e-3)))
        expected = math.cos(math.acos(cos) - 0.4 * g) - (0.4 + 0.4 * g)
        assert logits[row, row].item() == pytest.approx(expected, rel=1e-5)
    assert logits[0, 1].item() == pytest.approx(0.1) and logits[1, 0].item() == pytest.approx(0.2)


def test_adaface_without_norms_is_a_clear_error():
    with pytest.raises(ValueError, match="AdaFace needs the embedding norms"):
        AdaFace()(torch.tensor([[0.5]]), torch.tensor([0]))


# -- the backward of MarginHead.forward: two passes over the logits, autograd's gradient ------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from unicom.losses.margins import MarginHead, _margin_logits  # noqa: E402

_B, _C = 7, 5


def _margin_case(name, all_local):
    """A head (eval: no buffer moves between evaluations), float64 cosines with entries in the
    fallback region and at +-1, labels (some -1 unless ``all_local``), a context."""
    head = {
        "arcface": lambda: ArcFace(0.5, 4.0),
        "cosface": lambda: CosFace(0.35, 4.0),
        "combined": lambda: CombinedMargin(1.2, 0.3, 0.1, 3.0),
        "dynm_arcface": lambda: DynMArcFace([3, 9, 1, 4, 4], scale=4.0),
        "adaface": lambda: AdaFace(scale=4.0),
    }[name]().eval()
    generator = torch.Generator().manual_seed(5)
    cosines = torch.rand(_B, _C, generator=generator, dtype=torch.float64) * 1.8 - 0.9
    cosines[0, 2], cosines[3, 0], cosines[5, 4] = -0.995, 1.0, -1.0
    labels = torch.tensor([2, 1, 4, 0, 3, 4, 1]) if all_local else torch.tensor([2, -1, 4, 0, -1, 4, 1])
    context = MarginContext(class_ids=labels.clamp_min(0), column_classes=torch.arange(_C),
                            norms=torch.rand(_B, generator=generator, dtype=torch.float64) * 40,
                            all_targets_local=all_local)
    return head, cosines, labels, context


@pytest.mark.parametrize("all_local", [False, True])
@pytest.mark.parametrize("name", ["arcface", "cosface", "combined", "dynm_arcface", "adaface"])
def test_the_margin_backward_is_autograds_through_the_forward(name, all_local):
    head, cosines, labels, context = _margin_case(name, all_local)
    _assert_the_backward_is_autograds(head, cosines, labels, context)
    # and against finite differences, away from +-1 and the fallback's edge (kinks there)
    smooth = cosines.clamp(-0.8, 0.8)
    assert torch.autograd.gradcheck(lambda c: head(c, labels, context), (smooth.requires_grad_(),), eps=1e-6, atol=1e-6)


def _assert_the_backward_is_autograds(head, cosines, labels, context):
    """``head``'s logits and gradient through its own backward equal autograd's through every
    operation of its forward (float64: to 1e-12)."""
    grad_out = torch.randn(_B, _C, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = cosines.clone().requires_grad_()
    logits = head(x, labels, context)
    assert type(logits.grad_fn).__name__ == "_TargetMarginBackward"
    (grad,) = torch.autograd.grad(logits, x, grad_out)
    x_ref = cosines.clone().requires_grad_()
    logits_ref = _margin_logits(head, x_ref, labels, context)[0]  # autograd through every operation
    (grad_ref,) = torch.autograd.grad(logits_ref, x_ref, grad_out)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_the_margin_backward_makes_two_passes_over_the_logits():
    head, cosines, labels, context = _margin_case("arcface", True)
    x = cosines.clone().requires_grad_()
    logits = head(x, labels, context)

    class Record(TorchDispatchMode):
        full = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == (_B, _C) and func.__name__.split(".")[0] not in ("detach", "view", "_to_copy"):
                Record.full.append(func.__name__)
            return out

    grad_out = torch.ones(_B, _C, dtype=torch.float64)
    with Record():
        torch.autograd.grad(logits, x, grad_out)
    assert Record.full == ["mul.Tensor", "index_put_.default"], Record.full


def test_a_head_with_a_trainable_parameter_gets_its_gradient():
    class LearnedCosFace(MarginHead):
        def __init__(self):
            super().__init__()
            self.margin = torch.nn.Parameter(torch.tensor(0.2))
            self.scale = 3.0

        def target_logit(self, cos_target, rows, context):
            return cos_target - self.margin

    head = LearnedCosFace()
    cosines = torch.rand(4, 3, requires_grad=True)
    head(cosines, torch.tensor([0, -1, 2, 1])).sum().backward()
    # d/dm of Σ s · (cos_target − m) over the three rows with a target
    assert head.margin.grad.item() == pytest.approx(-3 * 3.0)
    assert torch.equal(cosines.grad, torch.full((4, 3), 3.0))


@pytest.mark.parametrize("name, backward", [
    ("arcface", ["mul.Tensor", "index.Tensor", "mul.Tensor", "index_put_.default"]),
    ("combined", ["mul.Tensor", "index.Tensor", "mul.Tensor", "index_put_.default"]),
    ("cosface", ["mul.Tensor"]),  # d (cos − m) / d cos = 1: the target entries keep s · grad
])
def test_a_closed_form_margin_slope_leaves_autograd_out_of_the_backward(name, backward):
    head, cosines, labels, context = _margin_case(name, True)
    x = cosines.clone().requires_grad_()
    logits = head(x, labels, context)
    grad_out = torch.ones(_B, _C, dtype=torch.float64)

    class Record(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Record.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        torch.autograd.grad(logits, x, grad_out)
    assert Record.ops == backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.5, 0.0), (1.2, 0.3, 0.1), (1.0, "per row", 0.0)])
def test_the_angular_margins_slope_is_autograds(dtype, m1, m2, m3):
    from unicom.losses.margins import _ACOS_MARGIN, angular_margin

    eps = _ACOS_MARGIN[dtype]
    # both clamp bounds exactly, beyond them, the fallback past pi, and ordinary cosines
    cos = torch.tensor([1.0, 1.0 - eps, -1.0 + eps, -1.0, -0.999, -0.95, -0.3, 0.0, 0.4, 0.97], dtype=dtype)
    if m2 == "per row":
        m2 = torch.linspace(0.1, 0.7, cos.numel(), dtype=dtype)
    x = cos.clone().requires_grad_()
    (expected,) = torch.autograd.grad(angular_margin(x, m1, m2, m3).sum(), x)
    value, slope = angular_margin(cos, m1, m2, m3, slope=True)
    torch.testing.assert_close(value, angular_margin(cos, m1, m2, m3), rtol=0, atol=0)
    torch.testing.assert_close(slope, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    assert slope[0] == slope[1] == 0 and slope[-1] != 0  # clamped, or at the bound: autograd's clamp passes nothing


def test_a_subclass_that_changes_the_target_logit_is_differentiated_by_autograd():
    """Its parent's closed-form slope belongs to the parent's target logit, not to its own."""

    class SquaredArcFace(ArcFace):
        def target_logit(self, cos_target, rows, context):
            return super().target_logit(cos_target, rows, context) ** 2

    head, cosines, labels, context = _margin_case("arcface", True)
    _assert_the_backward_is_autograds(SquaredArcFace(head.margin, head.scale).eval(), cosines, labels, context)
