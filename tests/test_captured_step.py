"""A classification step captured as a CUDA graph (:class:`unicom.engine.graph.CapturedStep`).

A graph replays the kernels of the step it recorded with the values that are in device
memory when it replays: anything the step took from the host (a learning rate, a step
count) is what it was at the capture. The CPU tests check that a step of PartialFC and
SparseAdamW in capture mode (:meth:`unicom.optim.SparseAdamW.capturing`) dispatches the
very same operations, with the same host values, on the same persistent tensors, from one
step to the next while the learning rate changes (what a replay needs), that it computes
what the eager step computes, and that the fused row update reads the learning rate from
the device (Triton's interpreter). The CUDA tests (GPU suite) capture and replay it.
"""

from __future__ import annotations

import pytest
import torch
from support import HostSyncRecorder

from unicom.engine.graph import CapturedStep
from unicom.errors import InputError
from unicom.losses import ArcFace, PartialFC
from unicom.optim import SparseAdamW

DIM, CLASSES, BATCH = 16, 400, 8


def head_and_optimizer(device="cpu"):
    """PartialFC (10% of the classes per step) and a dense parameter beside it (a bias on
    the features), both under one SparseAdamW."""
    torch.manual_seed(0)
    pfc = PartialFC(DIM, CLASSES, ArcFace(0.3, 16.0), sample_rate=0.1, seed=0, check_inputs=False).to(device)
    shift = torch.nn.Parameter(torch.zeros(DIM, device=device))
    groups = [{"params": pfc.parameters()}, {"params": [shift], "weight_decay": 0.0}]
    return pfc, shift, SparseAdamW(groups, lr=1e-2, weight_decay=0.05)


def make_step(pfc, shift, optimizer):
    def step(features, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = pfc(features + shift, labels)
        loss.backward()
        pfc.flag_sorted_gradient()
        optimizer.step()
        return loss.detach(), pfc.take_label_bounds()

    return step


def inputs(number: int, device="cpu", batch: int = BATCH):
    generator = torch.Generator().manual_seed(100 + number)
    features = torch.randn(batch, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return features.to(device), labels.to(device)


def schedule(number: int) -> float:
    return 1e-2 * (0.7 ** number)


def trace(step, features, labels, persistent: list[torch.Tensor]) -> list[tuple]:
    """The operations a step dispatches: name, host values, and each tensor argument as its
    shape, dtype and where it lives: one of ``persistent`` (by position), made by this step,
    or made before it otherwise (a tensor left from an earlier
    step: a replay would not see the new one)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    known = {t.untyped_storage().data_ptr(): f"persistent {i}" for i, t in enumerate(persistent)}
    made: set[int] = set()
    records = []

    def place(t: torch.Tensor):
        if t.is_sparse:
            return ("sparse", place(t._indices()), place(t._values()))
        pointer = t.untyped_storage().data_ptr()
        return (tuple(t.shape), t.dtype, known.get(pointer) or ("made" if pointer in made else "from an earlier step"))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func).startswith("profiler."):  # the optimiser's record_function marks
                return out
            leaves, _ = tree_flatten((args, kwargs or {}))
            described = tuple(place(x) if isinstance(x, torch.Tensor)
                              else ("generator", x.initial_seed()) if isinstance(x, torch.Generator) else x for x in leaves)
            records.append((str(func), described))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    for part in ((t._indices(), t._values()) if t.is_sparse else (t,)):
                        pointer = part.untyped_storage().data_ptr()
                        if pointer not in known:
                            made.add(pointer)
            return out

    with Record():
        step(features, labels)
    return records


def persistent_tensors(pfc, shift, optimizer) -> list[torch.Tensor]:
    tensors = [pfc.prototypes.detach(), shift.detach()]
    for param in (pfc.prototypes, shift):
        state = optimizer.state[param]
        tensors += [state["step"], state["exp_avg"], state["exp_avg_sq"]]
    return tensors + [t for t in optimizer._device_lrs if t is not None] + [
        t for tables in optimizer._corrections.values() for t in tables]


def test_in_capture_mode_consecutive_steps_are_the_same_work_whatever_the_learning_rate():
    pfc, shift, optimizer = head_and_optimizer()
    step = make_step(pfc, shift, optimizer)
    step(*inputs(0))  # the optimiser's state
    traces = []
    with optimizer.capturing(replays=10), HostSyncRecorder() as recorder:
        persistent = persistent_tensors(pfc, shift, optimizer)
        for number in (1, 2):
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = schedule(number)
            optimizer.load_learning_rates()
            traces.append(trace(step, *inputs(number), persistent))
    assert recorder.recorded == []
    assert len(traces[0]) > 50 and traces[0] == traces[1]
    used = {place[2] for _, described in traces[0] for place in described if isinstance(place, tuple) and len(place) == 3}
    assert {f"persistent {i}" for i in range(8)} <= used  # parameters and moments are read where they live
    # out of capture mode the learning rate and the dense parameter's count are host values:
    # a graph captured from such a step would replay the first step's
    eager = []
    for number in (3, 4):
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = schedule(number)
        eager.append(trace(step, *inputs(number), persistent_tensors(pfc, shift, optimizer)))
    assert eager[0] != eager[1]


def test_a_step_in_capture_mode_computes_what_the_eager_step_computes():
    results = []
    for captured in (False, True):
        pfc, shift, optimizer = head_and_optimizer()
        step = make_step(pfc, shift, optimizer)
        losses = []
        for number in range(6):
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = schedule(number)
            if captured and number > 0:
                with optimizer.capturing(replays=3):
                    optimizer.load_learning_rates()
                    losses.append(step(*inputs(number))[0])
            else:
                losses.append(step(*inputs(number))[0])
        results.append((torch.stack(losses), pfc.prototypes.detach(), shift.detach(),
                        optimizer.state[pfc.prototypes]["step"], optimizer.state[shift]["step"]))
    (losses, prototypes, bias, counts, bias_counts), (losses_c, prototypes_c, bias_c, counts_c, bias_counts_c) = results
    assert torch.equal(counts, counts_c) and counts.max() >= 2  # some classes were sampled more than once
    assert bias_counts_c.tolist() == [6] * DIM and torch.equal(bias_counts.expand(DIM), bias_counts_c)
    torch.testing.assert_close(losses_c, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prototypes_c, prototypes, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias_c, bias, rtol=1e-6, atol=1e-7)
    assert not torch.equal(prototypes, head_and_optimizer()[0].prototypes.detach())


def fused_with_learning_rate_on_the_device(device: str) -> None:
    """SparseAdamW's fused row update reading the learning rate from the device (capture
    mode) against the PyTorch update in the same mode, over steps with changing rows and
    learning rates, both weight-decay forms: rows, moments and counts agree."""
    import unicom.optim as optim

    for decoupled in (True, False):
        finals = []
        for fused in (True, False):
            optim.FUSED_ROWS = fused
            try:
                torch.manual_seed(0)
                weight = torch.nn.Parameter(torch.randn(40, 24, device=device))
                optimizer = SparseAdamW([weight], lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
                generator = torch.Generator().manual_seed(1)
                for number, rows in enumerate(([1, 5, 7], [0, 5, 39], [5, 7, 30], [0, 1, 5, 7])):
                    index = torch.tensor(rows, device=device)
                    values = torch.randn(len(rows), 24, generator=generator).to(device)
                    weight.grad = torch.sparse_coo_tensor(index[None], values, weight.shape, check_invariants=True).coalesce()
                    optimizer.param_groups[0]["lr"] = schedule(number)
                    if number == 0:
                        optimizer.step()
                        continue
                    with optimizer.capturing(replays=2):
                        optimizer.load_learning_rates()
                        optimizer.step()
                assert optim._ROW_UPDATE.enabled, "the fused kernel failed and the PyTorch update took over"
            finally:
                optim.FUSED_ROWS = True
            state = optimizer.state[weight]
            finals.append((weight.detach(), state["exp_avg"], state["exp_avg_sq"], state["step"]))
        (w, m, v, steps), (w_ref, m_ref, v_ref, steps_ref) = finals
        assert torch.equal(steps, steps_ref) and steps[5].item() == 4
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-9)


def test_the_fused_row_update_reads_the_learning_rate_from_the_device_under_tritons_interpreter():
    from support import under_triton_interpreter

    out = under_triton_interpreter(
        "import unicom.kernels as k, test_captured_step as t; called = []; original = k.row_adamw; "
        "k.row_adamw = lambda *a, **kw: (called.append(isinstance(a[10], k.torch.Tensor)), original(*a, **kw)); "
        "t.fused_with_learning_rate_on_the_device('cpu'); print(called)")
    # per weight-decay form: the first step with a host learning rate, three from the device
    assert out.split() == ["[False,", "True,", "True,", "True,", "False,", "True,", "True,", "True]"]


def test_a_captured_step_refuses_what_it_cannot_capture():
    pfc, shift, optimizer = head_and_optimizer()
    with pytest.raises(InputError, match="inputs must be CUDA tensors .got cpu, cpu.; on other devices call the step"):
        CapturedStep(make_step(pfc, shift, optimizer), optimizer)(*inputs(0))
    with pytest.raises(TypeError, match="AdamW cannot take part in a captured step; use unicom.optim.SparseAdamW"):
        CapturedStep(lambda: None, torch.optim.AdamW([shift]))
    with pytest.raises(ValueError, match="warmup must be at least 2"):
        CapturedStep(lambda: None, optimizer, warmup=1)
    with pytest.raises(RuntimeError, match="without optimiser state in a captured step; take one step before"):
        with optimizer.capturing(replays=1):
            make_step(pfc, shift, optimizer)(*inputs(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_captured_step_is_the_eager_step():
    """Nine steps with a changing learning rate, two eager (warm-up), then replays; the
    graph is captured again after three replays (the tables of bias corrections) and when
    the batch grows: losses, label bounds, prototypes and counts as the eager steps give,
    the class sampling included (the generators continue across replays)."""
    results = []
    for captured in (False, True):
        pfc, shift, optimizer = head_and_optimizer("cuda")
        step = make_step(pfc, shift, optimizer)
        runner = CapturedStep(step, optimizer, generators=pfc.generators(torch.device("cuda")), warmup=2, replays=3) \
            if captured else step
        losses, bounds = [], []
        for number in range(9):
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = schedule(number)
            loss, bound = runner(*inputs(number, "cuda", BATCH if number < 7 else 2 * BATCH))
            losses.append(loss)
            bounds.append(bound)
        results.append((torch.stack(losses), torch.stack(bounds), pfc.prototypes.detach().clone(),
                        optimizer.state[pfc.prototypes]["step"].clone()))
        if captured:
            assert runner.captures == 3  # at the third call, after three replays, for the larger batch
    (losses, bounds, prototypes, counts), (losses_c, bounds_c, prototypes_c, counts_c) = results
    assert torch.equal(bounds_c, bounds)
    assert torch.equal(counts_c, counts)
    torch.testing.assert_close(losses_c, losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prototypes_c, prototypes, rtol=1e-5, atol=1e-6)
