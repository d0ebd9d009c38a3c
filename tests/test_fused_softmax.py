"""The fused margin softmax of PartialFC (two Triton kernels) against its PyTorch twin.

On the CPU the kernels run through Triton's interpreter, in a process of their own (the
interpreter is chosen when Triton is imported); on CUDA in the GPU suite.
"""

import math

import pytest
import torch

import unicom.losses.partial_fc as partial_fc
from unicom.losses import ArcFace, CosFace, DynMArcFace, PartialFC
from unicom.losses.margins import AdaFace, CombinedMargin, MarginContext, fused_softmax_margin

HEADS = {
    "arcface": lambda: ArcFace(0.5, 16.0),
    "cosface": lambda: CosFace(0.35, 16.0),
    "combined": lambda: CombinedMargin(1.0, 0.3, 0.1, 16.0),
}


def _cosines(rows, columns, dtype, device):
    """Cosines in (-0.99, 0.99) with targets at +1 (clamped: slope 0), -1 and -0.995 (past
    π - m for ArcFace's margins: the fallback), 0.3 and the clamp's upper bound; none within
    1e-3 of the fallback's edge -cos m, where the kernel's test on the cosine and the twin's
    on the angle may round to different sides of a discontinuity."""
    generator = torch.Generator().manual_seed(3)
    cosines = torch.rand(rows, columns, generator=generator, dtype=torch.float64) * 1.98 - 0.99
    targets = torch.randint(0, columns, (rows,), generator=generator)
    for row, value in enumerate((1.0, -1.0, -0.995, 0.3, 1.0 - 1e-7)):
        cosines[row, targets[row]] = value
    for m in (0.5, 0.3):  # the margins of HEADS
        edge = -math.cos(m)
        near = (cosines - edge).abs() < 1e-3
        cosines[near] = edge + 2e-3
    return cosines.to(dtype).to(device), targets.to(device)


def _kernels_and_twin(pfc, cosines, targets, norms):
    """What the kernels compute from ``cosines``, (mean loss, G / norms, Σ_b G_bj cos_bj / norms_j²)
    for an incoming gradient of 3, and the same from the PyTorch twin's loss and autograd's G."""
    from unicom.kernels import margin_softmax_backward, margin_softmax_forward

    rows, columns = cosines.shape
    margin = fused_softmax_margin(pfc.margin)
    stats = torch.empty(5, rows, device=cosines.device)
    margin_softmax_forward(cosines, targets, margin, pfc.margin_gradient == "exact", stats)
    grad_loss = torch.tensor(3.0, device=cosines.device)
    scaled = torch.empty(rows, columns, dtype=cosines.dtype, device=cosines.device)
    row_term = torch.empty(columns, device=cosines.device)
    margin_softmax_backward(cosines, targets, stats, norms, grad_loss, margin, scaled, row_term)

    context = MarginContext(class_ids=targets, column_classes=torch.arange(columns, device=cosines.device),
                            all_targets_local=True)
    x = cosines.clone().requires_grad_()
    loss = pfc._loss_from_cosines(x, targets, context)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    grad, c = grad.float(), cosines.float()
    return (stats[0].mean(), scaled.float(), row_term), (loss.detach(), grad / norms, (grad * c).sum(dim=0) / (norms * norms))


def fused_against_torch(device):
    """The kernels against the twin for every head they compute, both margin gradients,
    float32 and bfloat16 cosines, 6 and 45 rows (one row block and two, the last part-filled),
    one column block of the forward and three; then whole PartialFC steps (every class,
    sampled classes, feature selection; bf16 autocast on CUDA). Returns the number of
    comparisons made."""
    compared = 0
    for name, make in HEADS.items():
        for gradient in ("exact", "straight_through"):
            pfc = PartialFC(4, 10, make(), margin_gradient=gradient, seed=0)
            for dtype in (torch.float32, torch.bfloat16):
                for rows, columns in ((6, 37), (45, 9000)):
                    cosines, targets = _cosines(rows, columns, dtype, device)
                    norms = torch.rand(columns, generator=torch.Generator().manual_seed(7)).add_(0.5).to(device)
                    (loss, scaled, row_term), (loss_ref, scaled_ref, row_term_ref) = _kernels_and_twin(
                        pfc, cosines, targets, norms)
                    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)  # a GPU's exp and log are approximate
                    # float32: rounding; bfloat16: one unit in the last place of G (2^-8 to 2^-7), which the
                    # twin rounds to bfloat16 before it divides and sums (the kernel sums in float32)
                    bf16 = dtype == torch.bfloat16
                    for value, expected in ((scaled, scaled_ref), (row_term, row_term_ref)):
                        largest = float(expected.abs().max())
                        torch.testing.assert_close(value, expected, rtol=2**-7 if bf16 else 1e-5,
                                                   atol=(1e-2 if bf16 else 1e-6) * largest)
                    compared += 1
    for settings in ({"sample_rate": 1.0}, {"sample_rate": 0.2}, {"sample_rate": 0.5, "feature_rate": 0.5}):
        losses, grads = [], []
        for fused in (True, False):
            partial_fc.FUSED_SOFTMAX = fused
            try:
                pfc = PartialFC(24, 500, ArcFace(0.3, 64.0), seed=1, **settings).to(device)
                x = torch.randn(16, 24, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
                labels = torch.randint(0, 500, (16,), generator=torch.Generator().manual_seed(5)).to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                    loss = pfc(x, labels)
                assert (type(loss.grad_fn).__name__ == "_FusedCosineSoftmaxBackward") == fused
                loss.backward()
            finally:
                partial_fc.FUSED_SOFTMAX = True
            losses.append(loss.detach())
            grads.append((x.grad, pfc.prototypes.grad.to_dense()))
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
        for fused_grad, grad in zip(*grads):
            scale = float(grad.abs().max())
            tolerance = 1e-6 * scale if device == "cpu" else 1e-2 * scale
            torch.testing.assert_close(fused_grad, grad, rtol=0, atol=tolerance)
        compared += 1
    return compared


@pytest.mark.slow
def test_the_fused_margin_softmax_is_its_pytorch_twin_under_tritons_interpreter():
    from support import under_triton_interpreter

    out = under_triton_interpreter("import warnings; warnings.simplefilter('error', RuntimeWarning); "
                                   "import test_fused_softmax as t; print('compared', t.fused_against_torch('cpu'))",
                                   warnings_ignored=False, timeout=600)
    assert out.split() == ["compared", "27"]  # 3 heads x 2 gradients x 2 dtypes x 2 sizes, 3 steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_fused_margin_softmax_is_its_pytorch_twin():
    assert fused_against_torch("cuda") == 27


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("cosine_type", ["*fp32", "*bf16", "*fp16"])
def test_the_fused_margin_softmax_compiles_for_ampere_and_hopper_gpus(cosine_type, arch):
    """Triton's compiler builds both kernels to cubins for sm_80 (A100) and sm_90 (H100, H200)
    in every form a step takes."""
    import inspect

    pytest.importorskip("triton")
    import triton
    from triton.compiler import ASTSource

    from unicom.kernels import _BACKWARD_TILE, _margin_softmax_kernels, _softmax_launch

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"Triton {triton.__version__} has an older ahead-of-time interface")
    from triton.backends.compiler import GPUTarget

    forward, backward = _margin_softmax_kernels()
    launch = _softmax_launch(100_000)  # the widest block, eight warps
    forms = [(forward, {"ANGULAR": angular, "EXACT": exact, "BLOCK": launch["BLOCK"]}, launch["num_warps"])
             for angular in (True, False) for exact in (True, False)]
    forms.append((backward, dict(_BACKWARD_TILE), 4))
    pointers = {"cosines": cosine_type, "targets": "*i64", "stats": "*fp32", "norms": "*fp32", "grad_loss": "*fp32",
                "scaled": cosine_type, "row_term": "*fp32"}
    for kernel, constexprs, warps in forms:
        signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32" if name in ("rows", "columns")
                                        else "fp32") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps})
        assert len(compiled.asm["cubin"]) > 1000 and kernel.__name__ in compiled.asm["ptx"]
        assert compiled.metadata.num_warps == warps


def test_the_kernels_take_arcface_cosface_and_the_combined_margin_with_m1_one():
    arcface = fused_softmax_margin(ArcFace(0.3, 64.0))
    assert arcface["angular"] and arcface["values"]["scale"] == 64.0
    assert arcface["values"]["floor"] == pytest.approx(-math.cos(0.3))
    assert arcface["values"]["fallback_shift"] == pytest.approx(0.3 * math.sin(0.3))
    cosface = fused_softmax_margin(CosFace(0.35, 30.0))
    assert not cosface["angular"] and cosface["values"]["m3"] == 0.35
    assert fused_softmax_margin(CombinedMargin(1.0, 0.2, 0.1))["angular"]
    for other in (CombinedMargin(1.2, 0.3, 0.1), ArcFace(3.5), DynMArcFace([1, 2]), AdaFace()):
        assert fused_softmax_margin(other) is None


def _a_cpu_step(monkeypatch, **broken):
    """A PartialFC step on the CPU taken as if the kernels could run (Triton usable), with the
    kernels named in ``broken`` failing as a kernel that cannot be built does."""
    import unicom.kernels

    def cannot_build(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    for switch in ("_FUSED_FORWARD", "_FUSED_BACKWARD"):
        old = getattr(partial_fc, switch)
        monkeypatch.setattr(partial_fc, switch, partial_fc.Fused(old.what, old.instead))
    monkeypatch.setattr(partial_fc, "triton_usable", lambda *tensors: True)
    for name in broken:
        monkeypatch.setattr(unicom.kernels, name, cannot_build)
    pfc = PartialFC(8, 50, ArcFace(0.3, 16.0), sample_rate=0.5, seed=2)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss = pfc(x, torch.arange(6) * 7)
    loss.backward()
    return loss.detach(), x.grad, pfc.prototypes.grad.to_dense()


@pytest.mark.parametrize("broken", ["margin_softmax_forward", "margin_softmax_backward"])
def test_kernels_that_cannot_be_built_leave_the_step_to_the_pytorch_operations(monkeypatch, broken):
    """Triton without a C compiler (or on a GPU it does not support) fails when it first builds
    a kernel: the step warns, turns the fused softmax off and computes the same loss and
    gradient with PyTorch; later steps do not try again."""
    with monkeypatch.context() as patch:
        patch.setattr(partial_fc, "FUSED_SOFTMAX", False)
        expected_loss, *expected_grads = _a_cpu_step(patch)
    if broken == "margin_softmax_backward":  # the forward kernel must run: the interpreter's stand-in
        import unicom.kernels

        monkeypatch.setattr(unicom.kernels, "margin_softmax_forward", _forward_by_torch)
    with pytest.warns(RuntimeWarning, match="cannot run here .*C compiler"):
        loss, *grads = _a_cpu_step(monkeypatch, **{broken: True})
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    for grad, expected in zip(grads, expected_grads):  # the embeddings' and the prototypes'
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert not (partial_fc._FUSED_FORWARD.enabled and partial_fc._FUSED_BACKWARD.enabled)
    assert partial_fc._fused_softmax(ArcFace(), torch.zeros(2, 3), torch.zeros(5, 3)) is None  # later steps: PyTorch


def _forward_by_torch(cosines, targets, margin, exact, stats):
    """What the forward kernel writes, computed with PyTorch (float64): losses, maxima, sums
    (and NaN for the target logits and slopes, which only the backward kernel reads)."""
    values = margin["values"]
    c = cosines.double()
    target = c.gather(1, targets[:, None])[:, 0]
    inside = target.clamp(values["lower"], values["upper"])
    angular = inside * values["cos_m"] - (1 - inside**2).sqrt() * values["sin_m"] - values["m3"]
    value = torch.where(inside >= values["floor"], angular, target - values["fallback_shift"])
    z = (c * values["scale"]).scatter(1, targets[:, None], (value * values["scale"])[:, None])
    row_max = z.max(dim=1).values
    row_sum = (z - row_max[:, None]).exp().sum(dim=1)
    unread = torch.full_like(row_max, float("nan"))
    stats.copy_(torch.stack([row_max + row_sum.log() - value * values["scale"], row_max, row_sum, unread, unread]))
