"""SparseAdamW: untouched rows stay bit-identical; present rows follow AdamW exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F

from unicom.losses import PartialFC
from unicom.optim import SparseAdamW


def test_dense_gradients_give_plain_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 5))
    b = torch.nn.Parameter(a.detach().clone())
    bias_a = torch.nn.Parameter(torch.randn(5))
    bias_b = torch.nn.Parameter(bias_a.detach().clone())
    ours = SparseAdamW([a, bias_a], lr=1e-2, weight_decay=0.05)
    reference = torch.optim.AdamW([b, bias_b], lr=1e-2, weight_decay=0.05)
    for step in range(25):
        grad = torch.randn(7, 5)
        bias_grad = torch.randn(5)
        a.grad, b.grad = grad.clone(), grad.clone()
        bias_a.grad, bias_b.grad = bias_grad.clone(), bias_grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias_a, bias_b, rtol=1e-6, atol=1e-7)





def test_sparse_rows_follow_adamw_over_the_steps_they_take_part_in():
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = SparseAdamW([weight], lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    # row 2 takes part in steps 0, 1, 3; a separate AdamW sees only those gradients
    shadow = torch.nn.Parameter(weight.detach()[2].clone())
    shadow_optimizer = torch.optim.AdamW([shadow], lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    schedule = [[0, 2, 5], [2, 3], [1], [2, 4]]
    for rows in schedule:
        index = torch.tensor(rows)
        values = torch.randn(len(rows), 4)
        weight.grad = torch.sparse_coo_tensor(index[None], values, weight.shape, check_invariants=True)
        optimizer.step()
        if 2 in rows:
            shadow.grad = values[rows.index(2)].clone()
            shadow_optimizer.step()
    torch.testing.assert_close(weight.detach()[2], shadow.detach(), rtol=1e-6, atol=1e-7)
    assert optimizer.state[weight]["step"].tolist() == [1, 1, 3, 1, 1, 1]


def test_never_sampled_prototypes_stay_bit_identical():
    classes = 500
    pfc = PartialFC(16, classes, sample_rate=0.05, seed=3)
    backbone = torch.nn.Linear(16, 16)
    optimizer = SparseAdamW(pfc.parameters(), lr=0.1, weight_decay=0.5)
    initial = pfc.prototypes.detach().clone()
    ever_selected = torch.zeros(classes, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = backbone(torch.randn(8, 16, generator=generator))
        labels = torch.randint(0, 100, (8,), generator=generator)  # classes 100.. only ever negatives
        loss = pfc(x, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ever_selected[pfc.last_class_index] = True
    assert 0 < int(ever_selected[100:].sum()) < classes - 100
    untouched = ~ever_selected
    assert torch.equal(pfc.prototypes.detach()[untouched], initial[untouched])
    state = optimizer.state[pfc.prototypes]
    assert torch.all(state["exp_avg"][untouched] == 0) and torch.all(state["exp_avg_sq"][untouched] == 0)
    assert torch.all(state["step"][untouched] == 0)
    assert not torch.equal(pfc.prototypes.detach()[ever_selected], initial[ever_selected])


def test_sparse_gradient_with_every_row_equals_dense_adamw():
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(5, 3))
    reference = torch.nn.Parameter(weight.detach().clone())
    ours = SparseAdamW([weight], lr=1e-2, weight_decay=0.01)
    theirs = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.01)
    for _ in range(10):
        index = torch.arange(5)
        out = F.embedding(index, weight, sparse=True)
        target = torch.randn(5, 3)
        ((out - target) ** 2).sum().backward()
        ((reference - target) ** 2).sum().backward()
        assert weight.grad.is_sparse
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
    torch.testing.assert_close(weight, reference, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(4)
    w1 = torch.nn.Parameter(torch.randn(10, 3))
    opt1 = SparseAdamW([w1], lr=1e-2)
    grads = [(torch.tensor([1, 4]), torch.randn(2, 3)) for _ in range(6)]

    def apply(weight, optimizer, steps):
        for index, values in steps:
            weight.grad = torch.sparse_coo_tensor(index[None], values, weight.shape, check_invariants=True)
            optimizer.step()

    apply(w1, opt1, grads[:3])
    w2 = torch.nn.Parameter(w1.detach().clone())
    opt2 = SparseAdamW([w2], lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))  # as through a checkpoint file
    apply(w1, opt1, grads[3:])
    apply(w2, opt2, grads[3:])
    assert torch.equal(w1, w2)


def test_repeated_rows_of_an_uncoalesced_gradient_are_summed():
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    twin = torch.nn.Parameter(torch.zeros(4, 2))
    first, second = SparseAdamW([weight], lr=0.1, weight_decay=0.0), SparseAdamW([twin], lr=0.1, weight_decay=0.0)
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]]), torch.tensor([[1.0, -2.0], [0.5, 0.5], [1.0, 4.0]]), (4, 2),
                                          check_invariants=True)
    twin.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([[0.5, 0.5], [2.0, 2.0]]), (4, 2), check_invariants=True)
    first.step()
    second.step()
    assert torch.equal(weight, twin)
    assert weight[0].tolist() == [0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_state_saved_on_the_cpu_resumes_on_the_gpu():
    # torch.optim leaves "step" entries where they were saved; the per-row counts must follow
    torch.manual_seed(5)
    grads = [(torch.tensor([0, 3]), torch.randn(2, 3)) for _ in range(4)]
    cpu = torch.nn.Parameter(torch.randn(6, 3))
    opt_cpu = SparseAdamW([cpu], lr=1e-2)
    for index, values in grads[:2]:
        cpu.grad = torch.sparse_coo_tensor(index[None], values, cpu.shape, check_invariants=True)
        opt_cpu.step()
    gpu = torch.nn.Parameter(cpu.detach().cuda())
    opt_gpu = SparseAdamW([gpu], lr=1e-2)
    opt_gpu.load_state_dict(copy.deepcopy(opt_cpu.state_dict()))
    assert opt_gpu.state[gpu]["step"].device == gpu.device
    for index, values in grads[2:]:
        cpu.grad = torch.sparse_coo_tensor(index[None], values, cpu.shape, check_invariants=True)
        gpu.grad = torch.sparse_coo_tensor(index[None].cuda(), values.cuda(), gpu.shape, check_invariants=True)
        opt_cpu.step()
        opt_gpu.step()
    torch.testing.assert_close(gpu.cpu(), cpu.detach(), rtol=1e-5, atol=1e-6)


FUSED_STEPS = (  # (rows, grad_scale, found_inf) of each step; a resume from a saved state after the third
    ([1, 5, 7, 30], None, None),
    ([0, 5, 39], 4.0, 0.0),
    ([5, 7, 30], 2.0, 1.0),  # skipped: nothing changes, the counts included
    ([5, 7, 8, 9, 10], None, 0.0),
    ([0, 1, 5, 7], 0.5, None),
)


def fused_against_torch(device: str) -> None:
    """Five SparseAdamW steps over changing rows, with the fused row kernel and with the
    PyTorch ops (a loss scale dividing the gradient, a skipped step, a resume from a saved
    state, bias-correction tables that must grow): untouched rows stay bit-identical in
    both, touched rows and moments agree to float32 rounding, per-row step counts exactly
    (both weight-decay forms; a width that spans two column blocks of the kernel and one
    that does not fill its block)."""
    import unicom.optim as optim

    first_length = optim._CORRECTIONS_MIN
    for dim, decoupled in ((48, True), (1500, True), (48, False)):
        finals = []
        for fused in (True, False):
            optim.FUSED_ROWS, optim._CORRECTIONS_MIN = fused, 2
            try:
                torch.manual_seed(0)
                start = torch.randn(40, dim, device=device)
                weight = torch.nn.Parameter(start.clone())
                make = lambda: SparseAdamW([weight], lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)  # noqa: E731
                optimizer = make()
                generator = torch.Generator().manual_seed(1)
                for number, (rows, grad_scale, found_inf) in enumerate(FUSED_STEPS):
                    if number == 3:
                        optimizer, saved = make(), copy.deepcopy(optimizer.state_dict())
                        optimizer.load_state_dict(saved)
                    index = torch.tensor(rows, device=device)
                    values = torch.randn(len(rows), dim, generator=generator).to(device)
                    weight.grad = torch.sparse_coo_tensor(index[None], values, weight.shape, check_invariants=True).coalesce()
                    for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
                        if value is not None:
                            setattr(optimizer, name, torch.tensor(value, device=device))
                    optimizer.step()
                    optimizer.__dict__.pop("grad_scale", None), optimizer.__dict__.pop("found_inf", None)
                assert optim._ROW_UPDATE.enabled, "the fused kernel failed and the PyTorch update took over"
            finally:
                optim.FUSED_ROWS, optim._CORRECTIONS_MIN = True, first_length
            state = optimizer.state[weight]
            finals.append((weight.detach(), state["exp_avg"], state["exp_avg_sq"], state["step"]))
        (w, m, v, steps), (w_ref, m_ref, v_ref, steps_ref) = finals
        touched = (0, 1, 5, 7, 8, 9, 10, 30, 39)
        untouched = [r for r in range(40) if r not in touched]
        assert torch.equal(w[untouched], start[untouched]) and torch.equal(w_ref[untouched], start[untouched])
        assert not m[untouched].any() and not v[untouched].any()
        assert torch.equal(steps, steps_ref)
        assert {r: steps.tolist()[r] for r in touched} == {0: 2, 1: 2, 5: 4, 7: 3, 8: 1, 9: 1, 10: 1, 30: 1, 39: 1}
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-9)


def work_beside_the_fused_kernel() -> list[str]:
    """The operations other than the fused kernel that a fused training step of SparseAdamW
    (a loss scale and a skip flag on the device, as :class:`unicom.engine.step.TrainStep`
    gives) dispatches and that write or allocate memory: each would be one more kernel
    launched by the host, the cost of a step that the device does quickly."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def storages(tree) -> set[int]:
        found = set()
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                parts = (t._indices(), t._values()) if t.is_sparse else (t,)
                found |= {part.untyped_storage().data_ptr() for part in parts}
        return found

    import unicom.kernels

    class Record(TorchDispatchMode):
        work: list[str] = []
        in_kernel = False  # Triton's interpreter runs the kernel with operations of its own

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not Record.in_kernel and (func._schema.is_mutable or storages(out) - storages((args, kwargs))):
                Record.work.append(str(func))
            return out

    kernel = unicom.kernels.row_adamw

    def marked(*args, **kwargs):
        Record.in_kernel = True
        try:
            kernel(*args, **kwargs)
        finally:
            Record.in_kernel = False

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(50, 24))
    optimizer = SparseAdamW([weight], lr=1e-2)
    for _ in range(2):  # the first step creates the state and the tables of bias corrections
        weight.grad = torch.sparse_coo_tensor(torch.tensor([[2, 7, 30]]), torch.randn(3, 24), weight.shape,
                                              check_invariants=True).coalesce()
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0), torch.tensor(0.0)
        Record.work = []
        unicom.kernels.row_adamw = marked
        try:
            with Record():
                optimizer.step()
        finally:
            unicom.kernels.row_adamw = kernel
    assert optimizer.state[weight]["step"].tolist().count(2) == 3
    return Record.work


def test_the_fused_row_update_is_the_pytorch_one_under_tritons_interpreter():
    """The Triton kernel itself (not its PyTorch twin) on the CPU, through Triton's
    interpreter, which runs in a process of its own (it is chosen when Triton is imported)."""
    from support import under_triton_interpreter

    lines = under_triton_interpreter(
        "import unicom.optim as optim, unicom.kernels as k, test_sparse_adamw as t; called = []; original = k.row_adamw; "
        "k.row_adamw = lambda *a, **kw: (called.append(1), original(*a, **kw)); "
        "t.fused_against_torch('cpu'); assert called, 'the kernel was not used'; print('ok', len(called)); "
        "called.clear(); print('beside', t.work_beside_the_fused_kernel(), len(called))").splitlines()
    assert lines[0].split() == ["ok", "15"]  # five steps for each of the three settings
    # a training step of the fused update: the kernel (once per step) and nothing else that computes
    assert lines[1] == "beside [] 2"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("grad_type", ["*fp32", "*bf16", "*fp16"])
def test_the_fused_row_update_compiles_for_ampere_and_hopper_gpus(grad_type, arch):
    """Triton's compiler, not its interpreter, builds the kernel to a cubin for sm_80 (A100)
    and sm_90 (H100, H200) in every form a step can take; no GPU is needed to compile, only
    to run."""
    import inspect

    pytest.importorskip("triton")
    import triton
    from triton.compiler import ASTSource

    from unicom.kernels import _row_adamw_kernel

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip(f"Triton {triton.__version__} has an older ahead-of-time interface")
    from triton.backends.compiler import GPUTarget

    kernel = _row_adamw_kernel()
    pointers = {"param": "*fp32", "exp_avg": "*fp32", "exp_avg_sq": "*fp32", "grad": grad_type, "rows": "*i64",
                "steps": "*i64", "correction1": "*fp32", "correction2": "*fp32", "grad_scale": "*fp32", "found_inf": "*fp32"}
    flags = ("DECOUPLED", "SCALED", "SKIPPABLE", "LR_LOADED", "BLOCK")
    for decoupled in (True, False):
        # the benchmark's step, a training step, a step captured in a CUDA graph (lr on the device)
        for scaled, skippable, loaded in ((False, False, False), (True, True, False), (False, False, True)):
            signature = {name: pointers.get(name, "constexpr" if name in flags else "i32" if name == "dim"
                                            else "*fp32" if name == "lr" and loaded else "fp32")
                         for name in kernel.arg_names}
            source = ASTSource(kernel, signature, constexprs={"DECOUPLED": decoupled, "SCALED": scaled,
                                                              "SKIPPABLE": skippable, "LR_LOADED": loaded, "BLOCK": 512})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
            assert len(compiled.asm["cubin"]) > 1000 and "row_adamw" in compiled.asm["ptx"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_fused_row_update_is_the_pytorch_one():
    fused_against_torch("cuda")


def test_a_fused_update_that_cannot_be_built_falls_back_to_the_pytorch_ops(monkeypatch):
    """Triton without a C compiler (or on a GPU it does not support) fails when it first builds
    the kernel: the step warns once, turns the fused update off and updates with PyTorch."""
    import unicom.kernels
    import unicom.optim as optim

    def cannot_build(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(optim, "_ROW_UPDATE", optim.Fused(optim._ROW_UPDATE.what, optim._ROW_UPDATE.instead))
    monkeypatch.setattr(unicom.kernels, "row_adamw", cannot_build)
    monkeypatch.setattr(optim, "_fused_rows", lambda *args: optim._ROW_UPDATE.enabled)
    torch.manual_seed(0)
    start = torch.randn(6, 3)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    index, values = torch.tensor([[1, 4]]), torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match="cannot run here .*C compiler"):
        weights[0].grad = torch.sparse_coo_tensor(index, values, (6, 3), check_invariants=True)
        SparseAdamW([weights[0]], lr=1e-2).step()
    assert optim._ROW_UPDATE.enabled is False
    monkeypatch.setattr(optim, "_fused_rows", lambda *args: False)
    weights[1].grad = torch.sparse_coo_tensor(index, values, (6, 3), check_invariants=True)
    SparseAdamW([weights[1]], lr=1e-2).step()
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], start)
