"""``model.attention``: the backend of the training step's scaled-dot-product attention.

On the CPU PyTorch has two backends, flash and math (its default there is flash); the
tests pin each and look at the operators that ran (forward, backward, and the forward
again under gradient checkpointing), compare the step's loss and gradient norm with
PyTorch's choice, and check that a backend the device lacks is refused before a run.
"""

from __future__ import annotations

import pytest
import torch
from support import write_class_folder

from unicom.engine.device import attention_problem, check_attention_backend, model_attention_shape
from unicom.engine.step import TrainStep, backbone_optimizer
from unicom.errors import InputError
from unicom.losses import ArcFace, PartialFC
from unicom.models.unicom_vit import UnicomViT, ViTSettings
from unicom.models.vit import ClipViT, ClipViTSettings
from unicom.optim import SparseAdamW

CLASSES, BATCH = 40, 8
FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"
CPU = torch.device("cpu")


def make_step(attention: str, checkpointing: bool = False) -> TrainStep:
    torch.manual_seed(0)
    backbone = ClipViT(ClipViTSettings(image_size=16, patch_size=4, width=32, depth=2, heads=2, embedding_dim=8))
    backbone.set_grad_checkpointing(checkpointing)
    partial_fc = PartialFC(8, CLASSES, ArcFace(0.3, 16.0), sample_rate=0.5, seed=0)
    return TrainStep(backbone, partial_fc, backbone_optimizer(backbone, 1e-2, 0.05, (0.9, 0.999), 1e-8, CPU),
                     SparseAdamW(partial_fc.parameters(), lr=1e-2, weight_decay=0.05), CPU, "fp32", attention=attention)


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 16, 16, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator)


def attention_operators(step: TrainStep) -> tuple[dict[str, int], object]:
    """The attention operators one step ran, with their counts, and the step's result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = step([batch()])
    counts = {event.key: event.count for event in profile.key_averages() if "_attention" in event.key}
    return counts, result


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_backend_runs_the_forward_and_backward_of_every_block(checkpointing):
    depth = 2
    forwards = depth * (2 if checkpointing else 1)  # checkpointing runs each block's forward again in the backward
    flash, flash_result = attention_operators(make_step("flash", checkpointing))
    assert flash.get(FLASH_CPU) == forwards and flash.get(FLASH_CPU + "_backward") == depth, flash
    assert MATH not in flash, flash
    math, math_result = attention_operators(make_step("math", checkpointing))
    assert math.get(MATH) == forwards and not any("flash" in key for key in math), math
    chosen, chosen_result = attention_operators(make_step("auto", checkpointing))
    for result in (flash_result, math_result):  # the same step in another order of sums
        assert result.loss == pytest.approx(chosen_result.loss, rel=1e-6)
        assert result.grad_norm == pytest.approx(chosen_result.grad_norm, rel=1e-5)
        assert result.finite


def test_the_first_attention_gives_the_models_shape_and_leaves_modes_and_random_numbers_alone():
    clip = ClipViT(ClipViTSettings(image_size=32, patch_size=8, width=48, depth=2, heads=3, embedding_dim=8)).train()
    clip.trunk.blocks[1].eval()  # a mixture of modes comes back as it was
    torch.manual_seed(5)
    assert model_attention_shape(clip, torch.zeros(1, 3, 32, 32)) == (3, 16 + 1, 16)  # class token + 4x4 patches
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert clip.training and clip.trunk.blocks[0].training and not clip.trunk.blocks[1].training
    released = UnicomViT(ViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128,
                                     embedding_dim=16))
    assert model_attention_shape(released, torch.zeros(1, 3, 32, 32)) == (4, 16, 16)  # no class token
    assert model_attention_shape(torch.nn.Linear(4, 2), torch.zeros(1, 4)) is None


def test_a_backend_the_device_lacks_is_refused_with_the_ones_that_run():
    model = ClipViT(ClipViTSettings(image_size=16, patch_size=4, width=32, depth=1, heads=2, embedding_dim=8))
    image = torch.zeros(1, 3, 16, 16)
    for name in ("flash", "math", "auto"):
        check_attention_backend(name, model, image, "fp32")
    assert attention_problem("cudnn", CPU, "fp32", 2, 17, 16) is not None
    with pytest.raises(InputError, match=r"model.attention=cudnn: .* on cpu in fp32 for the model's 2 heads x 17 "
                                         r"tokens x 16: .*Use model.attention=auto \(PyTorch's choice\) or one that "
                                         r"runs here: flash, math$"):
        check_attention_backend("cudnn", model, image, "fp32")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_class_folder(root, list(range(4)), 8, size=16)
    return root


def run_overrides(images, out, *extra):
    return [f"out={out}", f"data.folder={images}", "model.image_size=16", "model.patch_size=8", "model.width=32",
            "model.depth=1", "model.heads=2", "model.embedding_dim=8", "data.batch_size=8", "data.workers=0",
            "loss.sample_rate=1.0", "train.steps=2", "log.every=1", "log.tensorboard=false", "train.device=cpu",
            "checkpoint.every=2", *extra]


def test_a_run_takes_the_recipes_backend_and_refuses_one_it_cannot_run(images, tmp_path):
    import json

    from unicom.train.config import load_config
    from unicom.train.trainer import train

    def first_loss(out):
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in records if r["event"] == "step")

    train(load_config(None, run_overrides(images, tmp_path / "auto")))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        train(load_config(None, run_overrides(images, tmp_path / "math", "model.attention=math")))
    ran = {event.key for event in profile.key_averages()}
    assert MATH in ran and FLASH_CPU not in ran  # PyTorch's choice on the CPU is flash
    assert first_loss(tmp_path / "math") == pytest.approx(first_loss(tmp_path / "auto"), rel=1e-5)
    with pytest.raises(InputError, match="model.attention=cudnn: PyTorch cannot run"):
        train(load_config(None, run_overrides(images, tmp_path / "cudnn", "model.attention=cudnn")))
    assert not (tmp_path / "cudnn" / "checkpoints").exists()
    with pytest.raises(InputError, match="model.attention"):
        load_config(None, run_overrides(images, tmp_path / "bad", "model.attention=fast"))


CUDA_OPERATORS = {"flash": "aten::_scaled_dot_product_flash_attention",
                  "efficient": "aten::_scaled_dot_product_efficient_attention",
                  "cudnn": "aten::_scaled_dot_product_cudnn_attention", "math": MATH}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_each_backend_that_runs_is_the_one_the_step_takes():
    """bf16 steps of a ViT with 64-wide heads: each backend that can run it is the operator
    of the step (forward, backward and checkpointing's recomputation), with PyTorch's choice's
    loss to bf16 rounding; one that cannot is refused by the check."""
    cuda = torch.device("cuda")
    image = torch.zeros(1, 3, 32, 32, device=cuda)

    def step_and_operators(attention):
        torch.manual_seed(0)
        backbone = ClipViT(ClipViTSettings(image_size=32, patch_size=8, width=128, depth=2, heads=2,
                                           embedding_dim=16)).to(cuda)
        backbone.set_grad_checkpointing(True)
        partial_fc = PartialFC(16, CLASSES, ArcFace(0.3, 16.0), sample_rate=0.5, seed=0).to(cuda)
        step = TrainStep(backbone, partial_fc, backbone_optimizer(backbone, 1e-2, 0.05, (0.9, 0.999), 1e-8, cuda),
                         SparseAdamW(partial_fc.parameters(), lr=1e-2, weight_decay=0.05), cuda, "bf16",
                         attention=attention)
        images, labels = batch()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            result = step([(images.repeat(1, 1, 2, 2).to(cuda), labels.to(cuda))])
        return backbone, {e.key: e.count for e in profile.key_averages() if "_attention" in e.key}, result.loss

    _, _, chosen_loss = step_and_operators("auto")
    ran = []
    for name, operator in CUDA_OPERATORS.items():
        backbone = ClipViT(ClipViTSettings(image_size=32, patch_size=8, width=128, depth=2, heads=2,
                                           embedding_dim=16)).to(cuda)
        if attention_problem(name, cuda, "bf16", 2, 17, 64) is not None:
            with pytest.raises(InputError, match=f"model.attention={name}: PyTorch cannot run"):
                check_attention_backend(name, backbone, image, "bf16")
            continue
        check_attention_backend(name, backbone, image, "bf16")
        _, operators, loss = step_and_operators(name)
        assert operators.get(operator) == 4, (name, operators)  # 2 blocks, each run again by checkpointing
        others = [key for key in CUDA_OPERATORS.values() if key != operator and key in operators]
        assert not others, (name, operators)
        assert loss == pytest.approx(chosen_loss, rel=2e-2)
        ran.append(name)
    assert "math" in ran and len(ran) >= 2, ran  # a GPU runs the math backend and at least one fused one


def test_the_recipe_offers_the_backends_the_step_knows():
    import dataclasses
    import typing

    from unicom.engine.device import ATTENTION_BACKENDS
    from unicom.train.config import ModelConfig

    (field,) = [f for f in dataclasses.fields(ModelConfig) if f.name == "attention"]
    assert typing.get_args(typing.get_type_hints(ModelConfig)["attention"]) == ATTENTION_BACKENDS
    assert field.default == "auto"
