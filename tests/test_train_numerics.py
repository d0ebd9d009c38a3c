"""One optimiser step: non-finite steps skipped, loss scaling, the global norm and clipping
with sparse prototype gradients, and the stop after repeated failures."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support import write_class_folder

from unicom.errors import InputError
from unicom.losses import ArcFace, PartialFC
from unicom.models.vit import ClipViT, ClipViTSettings
from unicom.optim import SparseAdamW
from unicom.engine.step import LossScaler, TrainStep, backbone_optimizer

CPU = torch.device("cpu")


def make_step(clip=None, sample_rate=0.5, seed=0) -> TrainStep:
    torch.manual_seed(seed)
    backbone = ClipViT(ClipViTSettings(image_size=16, patch_size=8, width=32, depth=1, heads=2, embedding_dim=8))
    partial_fc = PartialFC(8, 12, ArcFace(0.3, 16.0), sample_rate=sample_rate, seed=seed)
    return TrainStep(backbone, partial_fc, backbone_optimizer(backbone, 1e-2, 0.05, (0.9, 0.999), 1e-8, CPU),
                     SparseAdamW(partial_fc.parameters(), lr=1e-2), CPU, "fp32", clip)


def batch(seed=1, size=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 12, (size,), generator=generator)


def parameters(step: TrainStep) -> list[torch.Tensor]:
    return [p.detach().clone() for p in (*step.backbone.parameters(), *step.partial_fc.parameters())]


def test_a_non_finite_loss_skips_the_step_everywhere():
    step = make_step()
    before = parameters(step)
    images, labels = batch()
    images[2] = float("nan")
    result = step([(images, labels)])
    assert not result.finite
    for old, new in zip(before, parameters(step)):
        assert torch.equal(old, new)
    for optimizer in (step.backbone_optimizer, step.prototype_optimizer):  # no step counted, no moment moved
        for state in optimizer.state.values():
            assert torch.all(state["step"] == 0)
            assert torch.all(state["exp_avg"] == 0) and torch.all(state["exp_avg_sq"] == 0)
    assert all(p.grad is None for p in step.backbone.parameters())


def test_a_step_after_a_skipped_one_equals_a_first_step():
    skipped, fresh = make_step(sample_rate=1.0), make_step(sample_rate=1.0)  # no class sampling to advance
    images, labels = batch()
    broken = images.clone()
    broken[2] = float("nan")
    assert not skipped([(broken, labels)]).finite
    assert skipped([(images, labels)]).finite and fresh([(images, labels)]).finite
    for a, b in zip(parameters(skipped), parameters(fresh)):
        assert torch.equal(a, b)


def test_labels_out_of_range_skip_the_step_and_raise_when_the_result_is_read():
    step = make_step()
    before = parameters(step)
    images, labels = batch()
    labels[0], labels[3] = 0, 12  # 12 classes: 0..11
    result = step([(images, labels)])
    with pytest.raises(InputError, match="labels range from 0 to 12; they must lie in 0..11"):
        result.finite
    for old, new in zip(before, parameters(step)):
        assert torch.equal(old, new)


def test_an_overflowing_loss_scale_backs_off_and_scaled_steps_equal_unscaled_ones():
    reference, scaled = make_step(sample_rate=1.0), make_step(sample_rate=1.0)
    scaled.scaler = LossScaler(True, init_scale=2.0**127)  # loss x 2^127 overflows float32
    overflowed = scaled([batch()])
    assert not overflowed.finite
    assert scaled.scaler.scale == 2.0**126
    scaled.scaler.scale = 2.0**10  # powers of two scale and unscale exactly
    assert overflowed.loss_scale == 2.0**126  # read later, it is still the scale this step left
    assert scaled([batch()]).finite and reference([batch()]).finite
    for a, b in zip(parameters(reference), parameters(scaled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_scaler_that_is_off_keeps_its_scale_at_one():
    """bf16 and fp32 steps are unscaled: a scale set on their scaler would divide the reported
    norm and every gradient by it, so it is refused."""
    step = make_step()
    assert not step.scaler.enabled
    with pytest.raises(ValueError, match="the loss scaler is off"):
        step.scaler.scale = 2.0**8
    step.scaler.scale = 1.0
    assert step.scaler.scale == 1.0


def test_the_gradient_norm_covers_the_backbone_and_the_sampled_prototype_rows():
    step = make_step(clip=0.05)
    probe = copy.deepcopy(step)
    images, labels = batch()
    probe.partial_fc(probe.backbone(images), labels).backward()
    prototype_grad = probe.partial_fc.prototypes.grad
    assert prototype_grad.is_sparse
    dense = [p.grad for p in probe.backbone.parameters()] + [prototype_grad.to_dense()]
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dense]))
    result = step([(images, labels)])
    assert result.grad_norm == pytest.approx(float(expected_norm), rel=1e-5)
    assert result.clipped
    # AdamW's first moment after one step is (1 - beta1) times the (clipped) gradient
    coefficient = 0.05 / (float(expected_norm) + 1e-6)
    exp_avg = step.prototype_optimizer.state[step.partial_fc.prototypes]["exp_avg"]
    torch.testing.assert_close(exp_avg, 0.1 * coefficient * prototype_grad.to_dense(), rtol=1e-4, atol=1e-9)
    first = next(step.backbone.parameters())
    torch.testing.assert_close(step.backbone_optimizer.state[first]["exp_avg"],
                               0.1 * coefficient * next(probe.backbone.parameters()).grad, rtol=1e-4, atol=1e-9)


def test_accumulated_micro_batches_equal_one_large_batch():
    whole, split = make_step(sample_rate=1.0), make_step(sample_rate=1.0)
    images, labels = batch(size=8)
    a = whole([(images, labels)])
    b = split([(images[:4], labels[:4]), (images[4:], labels[4:])])
    # the loss of each half is the mean over its rows; their mean is the mean over all rows
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    # so are the gradients: compare AdamW's first moments, (1 - beta1) x gradient
    for optimizer in ("backbone_optimizer", "prototype_optimizer"):
        states_a, states_b = getattr(whole, optimizer).state, getattr(split, optimizer).state
        params_a = [p for group in getattr(whole, optimizer).param_groups for p in group["params"]]
        params_b = [p for group in getattr(split, optimizer).param_groups for p in group["params"]]
        for x, y in zip(params_a, params_b):
            torch.testing.assert_close(states_b[y]["exp_avg"], states_a[x]["exp_avg"], rtol=1e-4, atol=1e-9)


def test_repeated_non_finite_steps_stop_training_with_a_clear_message(tmp_path):
    from unicom.engine.step import TrainingStopped
    from unicom.train.config import load_config
    from unicom.train.trainer import train

    write_class_folder(tmp_path / "images", [0, 1, 2], 6, size=16)
    config = load_config(None, [
        f"out={tmp_path / 'run'}", f"data.folder={tmp_path / 'images'}", "data.batch_size=6", "data.workers=0",
        "model.image_size=16", "model.patch_size=8", "model.width=32", "model.depth=1", "model.heads=2",
        "model.embedding_dim=8", "optim.lr=1e30", "train.steps=50", "train.max_nonfinite_steps=3",
        "checkpoint.every=100", "log.tensorboard=false",
    ])
    with pytest.raises(TrainingStopped, match="the last 3 steps had a non-finite loss or gradient .* Lower optim.lr"):
        train(config)
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("skipped", "stopped")] == ["skipped"] * 3 + ["stopped"]
    assert not (tmp_path / "run" / "checkpoints").exists()
