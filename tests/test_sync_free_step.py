"""A classification step never makes the host wait for the device.

On a GPU every such wait (a value read on the host, an operator whose output size depends
on the data) stalls the CPU until all queued kernels have run, then leaves the GPU idle
while the next ones are launched. The CPU tests detect the operators that would wait
(:class:`support.HostSyncRecorder`); the CUDA test asks CUDA itself
(``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import pytest
import torch
from support import HostSyncRecorder

from unicom.engine.step import TrainStep, backbone_optimizer
from unicom.losses import AdaCos, AdaFace, ArcFace, CosFace, CurricularFace, DynMArcFace, LiArcFace, PartialFC
from unicom.models.vit import ClipViT, ClipViTSettings
from unicom.optim import SparseAdamW

CLASSES, BATCH = 40, 8


def make_step(device: torch.device, precision: str = "fp32", sample_rate: float = 0.5, clip: float | None = 1.0) -> TrainStep:
    torch.manual_seed(0)
    backbone = ClipViT(ClipViTSettings(image_size=16, patch_size=8, width=32, depth=1, heads=2, embedding_dim=8)).to(device)
    partial_fc = PartialFC(8, CLASSES, ArcFace(0.3, 16.0), sample_rate=sample_rate, seed=0).to(device)
    return TrainStep(backbone, partial_fc, backbone_optimizer(backbone, 1e-2, 0.05, (0.9, 0.999), 1e-8, device),
                     SparseAdamW(partial_fc.parameters(), lr=1e-2, weight_decay=0.05), device, precision, clip)


def batch(device: torch.device, seed: int = 1, size: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    labels = torch.randint(0, CLASSES, (size,), generator=generator)
    return images.to(device), labels.to(device)


def test_the_recorder_sees_the_operations_that_wait():
    x = torch.randn(10)
    with HostSyncRecorder() as recorder:
        torch.unique(x)
        _ = x[x > 0]
        float(x.sum())
        x.tolist()
        _ = x[torch.tensor([1, 2])]  # integer indexing by a tensor does not wait
        _ = x[[1, 2]]  # by a list: a copy to the device first
        device = torch.empty(4, device="meta")  # standing in for a GPU
        device[1:3] = x[:2]  # a blocking copy from the host
        _ = x.to("meta")
        _ = x.to("meta", non_blocking=True)  # from pinned memory, as loaders pin batches: the host goes on
    names = [name for name, _ in recorder.recorded]
    assert names == ["aten._unique2.default", "aten.index.Tensor with a boolean mask",
                     "aten._local_scalar_dense.default", "Tensor.tolist", "Tensor.__getitem__ with a Python list",
                     "aten.copy_.default from the host, blocking", "aten._to_copy.default from the host, blocking"]


def test_the_recorder_leaves_tensors_as_it_found_them():
    with HostSyncRecorder():
        pass
    assert not {"__getitem__", "__setitem__", "tolist", "numpy", "cpu"} & set(vars(torch.Tensor))
    marks = torch.zeros(3, 2, dtype=torch.bool)
    marks[torch.arange(3), list(torch.arange(3) % 2)] = True  # a list of 0-d tensors as an index
    assert marks.tolist() == [[True, False], [False, True], [True, False]]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_training_step_makes_the_host_wait_nowhere(precision):
    cpu = torch.device("cpu")
    step = make_step(cpu, precision)
    if step.scaler.enabled:
        step.scaler.scale = 2.0**8  # fp16: a scale at which this tiny model's gradients do not overflow
    step([batch(cpu, 0)])  # the first step creates the optimiser states
    with HostSyncRecorder() as recorder:
        result = step([batch(cpu, 1)])
    assert recorder.recorded == []
    assert result.finite  # read afterwards: the one read of the step


def test_a_skipped_step_makes_the_host_wait_nowhere():
    cpu = torch.device("cpu")
    step = make_step(cpu)
    images, labels = batch(cpu)
    images[0] = float("nan")
    with HostSyncRecorder() as recorder:
        result = step([(images, labels)])
    assert recorder.recorded == []
    assert not result.finite


@pytest.mark.parametrize("head", [
    ArcFace(0.3, 16.0), CosFace(0.35, 16.0), DynMArcFace(torch.arange(1, CLASSES + 1)), AdaCos(CLASSES),
    CurricularFace(), AdaFace(), LiArcFace(),
], ids=lambda head: type(head).__name__)
@pytest.mark.parametrize("margin_gradient", ["exact", "straight_through"])
def test_every_margin_head_runs_without_waiting(head, margin_gradient):
    if margin_gradient == "straight_through" and isinstance(head, AdaCos):
        pytest.skip("AdaCos's scale is updated by the step: the straight-through gradient reads it")
    pfc = PartialFC(8, CLASSES, head, sample_rate=0.5, feature_rate=0.5, seed=0, check_inputs=False,
                    margin_gradient=margin_gradient)
    x = torch.randn(BATCH, 8, requires_grad=True)
    labels = torch.randint(0, CLASSES, (BATCH,))
    with HostSyncRecorder() as recorder:
        pfc(x, labels).backward()
    assert recorder.recorded == []


def test_more_rows_than_sampled_classes_count_the_positives_once():
    # ceil(0.1 · 40) = 4 sampled classes for 8 rows: the positives may be more, so they are counted
    pfc = PartialFC(8, CLASSES, sample_rate=0.1, seed=0, check_inputs=False)
    with HostSyncRecorder() as recorder:
        pfc(torch.randn(BATCH, 8), torch.arange(BATCH))
    assert [name for name, _ in recorder.recorded] == ["aten._local_scalar_dense.default"]
    assert pfc.last_class_index.tolist() == list(range(BATCH))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_on_cuda_a_training_step_never_synchronises(precision):
    cuda = torch.device("cuda")
    step = make_step(cuda, precision)
    if step.scaler.enabled:  # fp16; bf16 runs unscaled
        step.scaler.scale = 2.0**8
    step([batch(cuda, 0)]).finite
    inputs = batch(cuda, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = step([inputs])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.finite
