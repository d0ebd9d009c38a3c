"""Layer-wise learning-rate decay (``optim.layer_decay``): timm's layers, the rates a step
applies, and optimiser states that follow each parameter by name across groupings."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from support import write_class_folder

from unicom.cli import main
from unicom.engine.checkpoint import load_optimizer_state as load_optimizer_state_file
from unicom.engine.step import backbone_optimizer, build_train_step, layer_ids, layer_scales, load_optimizer_state
from unicom.errors import InputError
from unicom.losses import ArcFace, PartialFC
from unicom.models.unicom_vit import build_unicom_vit
from unicom.models.vit import ClipViT, ClipViTSettings, create_model
from unicom.train.config import TrainOptimConfig

CPU = torch.device("cpu")


def tiny_clip_vit(seed: int = 0, depth: int = 2) -> ClipViT:
    torch.manual_seed(seed)
    return ClipViT(ClipViTSettings(image_size=16, patch_size=8, width=32, depth=depth, heads=2, embedding_dim=8))


def test_a_unicom_vit_decays_its_layers_as_computed_by_hand():
    model = build_unicom_vit(dict(image_size=32, patch_size=16, width=64, depth=2, heads=1, mlp_dim=128,
                                  embedding_dim=32, in_chans=3))
    expected = {}  # stem 0, blocks 1 and 2 (the final norm with the last), the feature head 3
    for name, _ in model.named_parameters():
        layer = (0 if name.startswith(("pos_embed", "patch_embed")) else 1 if name.startswith("blocks.0.") else
                 2 if name.startswith(("blocks.1.", "norm.")) else 3 if name.startswith("feature.") else None)
        expected[name] = 0.5 ** (3 - layer)
    assert layer_scales(model, 0.5) == expected
    assert layer_ids(model)["feature.0.weight"] == 3 and layer_ids(model)["norm.bias"] == 2


def timm_groups(trunk: torch.nn.Module, embedding_dim: int, decay: float) -> dict[str, tuple[float, float]]:
    """timm's own layer-wise decay of the trunk with a classifier in the projection's place:
    each parameter's (rate factor, weight decay), under the names of our model."""
    from timm.optim import param_groups_layer_decay

    reference = copy.deepcopy(trunk)
    reference.reset_classifier(embedding_dim)
    head = {name for name, _ in reference.named_parameters()} - {name for name, _ in trunk.named_parameters()}
    names = {id(param): ("projection.weight" if name in head else f"trunk.{name}")
             for name, param in reference.named_parameters() if not (name in head and param.ndim == 1)}
    groups = param_groups_layer_decay(reference, weight_decay=0.05, no_weight_decay_list=getattr(reference, "no_weight_decay", set)(),
                                      layer_decay=decay)
    return {names[id(p)]: (group["lr_scale"], group["weight_decay"]) for group in groups for p in group["params"]
            if id(p) in names}


@pytest.mark.parametrize("name", ["timm/test_resnet", "timm/test_convnext", "timm/test_vit", "clip_vit",
                                  "timm/swin_tiny_patch4_window7_224"])
def test_the_layers_and_weight_decay_of_timm_networks_are_timms_own(name):
    """Swin: its relative position tables (2-D) are spared weight decay, as its no_weight_decay() says."""
    module = tiny_clip_vit() if name == "clip_vit" else create_model(name, overrides={"embedding_dim": 24}).module
    optimizer = backbone_optimizer(module, 1e-3, 0.05, (0.9, 0.999), 1e-8, CPU, layer_decay=0.7)
    ours = {param_name: (group["lr_scale"], group["weight_decay"])
            for group in optimizer.param_groups for param_name in group["param_names"]}
    theirs = timm_groups(module.trunk, module.projection.out_features, 0.7)
    assert ours.keys() == theirs.keys() == {n for n, p in module.named_parameters() if p.requires_grad}
    for param_name, (scale, decay) in theirs.items():
        assert ours[param_name] == (pytest.approx(scale, rel=1e-12), decay), param_name
    assert len({scale for scale, _ in ours.values()}) > 2  # several layers, the projection at 1
    assert ours["projection.weight"][0] == 1.0


def test_a_step_moves_each_layer_at_its_rate():
    """One step against torch's AdamW with a group per layer at lr · 0.5^(2 - layer), by hand:
    the stem at a quarter, the block and the final norm at a half, the projection at lr."""
    lr, decay = 1e-2, 0.5
    backbone = tiny_clip_vit(depth=1)
    partial_fc = PartialFC(8, 12, ArcFace(0.3, 16.0), sample_rate=1.0, seed=0)
    reference, reference_fc = copy.deepcopy(backbone), copy.deepcopy(partial_fc)
    step = build_train_step(backbone, partial_fc, TrainOptimConfig(lr=lr, weight_decay=0.05, layer_decay=decay), CPU,
                            "fp32")
    step.set_learning_rates(lr * 0.8, lr * 0.8)  # a schedule's factor
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 3, 16, 16, generator=generator), torch.randint(0, 12, (6,), generator=generator)
    step([(images, labels)])

    groups = []
    for name, param in reference.named_parameters():
        layer = 2 if name.startswith("projection") else 1 if name.startswith(("trunk.blocks.0.", "trunk.norm.")) else 0
        plain = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        groups.append({"params": [param], "lr": lr * 0.8 * decay ** (2 - layer), "weight_decay": 0.0 if plain else 0.05})
    assert {g["lr"] for g in groups} == {lr * 0.8, lr * 0.8 * 0.5, lr * 0.8 * 0.25}
    optimizer = torch.optim.AdamW(groups, lr=lr, eps=1e-8, foreach=False)
    reference_fc(reference(images), labels).backward()
    optimizer.step()
    for (name, ours), theirs in zip(backbone.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
    moved = {name: (ours - before).abs().max() for (name, ours), before in
             zip(backbone.named_parameters(), tiny_clip_vit(depth=1).parameters())}
    assert moved["trunk.patch_embed.proj.weight"] < 0.3 * moved["projection.weight"]  # the stem at a quarter


def stepped(optimizer: torch.optim.Optimizer, module: torch.nn.Module, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in module.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def test_an_optimiser_state_follows_each_parameter_by_name_into_another_grouping():
    saved_model = tiny_clip_vit()
    saved_optimizer = backbone_optimizer(saved_model, 1e-3, 0.05, (0.9, 0.999), 1e-8, CPU)
    stepped(saved_optimizer, saved_model, 3, seed=2)
    saved = saved_optimizer.state_dict()
    moments = {name: saved_optimizer.state[param] for name, param in saved_model.named_parameters()}
    # written before groups carried names: two groups, the weights and then the undecayed
    legacy = copy.deepcopy(saved)
    for group in legacy["param_groups"]:
        del group["param_names"], group["lr_scale"]
    for state in (saved, legacy):
        model = tiny_clip_vit()
        optimizer = backbone_optimizer(model, 1e-3, 0.1, (0.9, 0.99), 1e-8, CPU, layer_decay=0.5)
        load_optimizer_state(optimizer, copy.deepcopy(state), model)  # as read from a file: no tensor shared
        for name, param in model.named_parameters():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer.state[param][key], moments[name][key]), (name, key)
        # the recipe now sets the groups: its weight decay, betas and rates per layer
        assert {(g["lr_scale"], g["weight_decay"], g["betas"]) for g in optimizer.param_groups} == {
            (scale, decay, (0.9, 0.99)) for scale in (1.0, 0.5, 0.25, 0.125) for decay in (0.1, 0.0)} - {(1.0, 0.0, (0.9, 0.99))}
        stepped(optimizer, model, 1, seed=3)  # and it steps
    deeper = tiny_clip_vit(depth=3)
    with pytest.raises(InputError, match="belongs to another model"):
        load_optimizer_state(backbone_optimizer(deeper, 1e-3, 0.05, (0.9, 0.999), 1e-8, CPU), legacy, deeper)
    with pytest.raises(InputError, match="parameters this model does not train: trunk.blocks.1"):
        shallow = tiny_clip_vit(depth=1)
        load_optimizer_state(backbone_optimizer(shallow, 1e-3, 0.05, (0.9, 0.999), 1e-8, CPU), saved, shallow)


# ------------------------------------------------------------------------ unicom train


TINY = ["model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=2", "model.heads=2",
        "model.embedding_dim=16", "data.batch_size=16", "data.workers=0", "loss.scale=16", "loss.sample_rate=0.5",
        "optim.lr=0.003", "schedule.kind=constant", "log.tensorboard=false", "checkpoint.every=2", "train.device=cpu"]


def weights(out) -> dict[str, torch.Tensor]:
    (checkpoint,) = sorted((out / "checkpoints").glob("step_*"))[-1:]
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.mark.usefixtures("one_thread")
def test_a_run_with_layer_decay_resumes_to_the_same_weights_and_may_take_it_up_later(tmp_path, capsys):
    write_class_folder(tmp_path / "images", list(range(4)), 8, size=16)
    common = [f"data.folder={tmp_path / 'images'}", *TINY]
    assert main(["train", *common, "optim.layer_decay=0.5", "train.steps=4", f"out={tmp_path / 'whole'}"]) == 0
    assert main(["train", *common, "optim.layer_decay=0.5", "train.steps=2", f"out={tmp_path / 'halves'}"]) == 0
    assert main(["train", *common, "optim.layer_decay=0.5", "train.steps=4", f"out={tmp_path / 'halves'}"]) == 0
    whole, halves = weights(tmp_path / "whole"), weights(tmp_path / "halves")
    assert whole.keys() == halves.keys() and all(torch.equal(whole[k], halves[k]) for k in whole)
    # without decay first, then with it: the moments follow their parameters, the note says so
    assert main(["train", *common, "train.steps=2", f"out={tmp_path / 'later'}"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "optim.layer_decay=0.5", "train.steps=4", f"out={tmp_path / 'later'}"]) == 0
    assert "optim.layer_decay null -> 0.5" in capsys.readouterr().out
    (checkpoint,) = sorted((tmp_path / "later" / "checkpoints").glob("step_*"))[-1:]
    state = load_optimizer_state_file(checkpoint)
    assert {group["lr_scale"] for group in state["param_groups"]} == {1.0, 0.5, 0.25, 0.125}
    # every parameter took its four steps: the two before the change were kept
    assert {int(s["step"]) for s in state["state"].values()} == {4} and len(state["state"]) == len(whole)


@pytest.mark.parametrize("override, message", [
    ("optim.layer_decay=1.5", "optim.layer_decay must be in (0, 1], got 1.5"),
    ("optim.optimizer=adam", "optim.layer_decay applies to optim.optimizer=adamw"),
])
def test_a_layer_decay_out_of_range_or_with_adam_is_refused(tmp_path, capsys, override, message):
    write_class_folder(tmp_path / "images", [0, 1], 2, size=16)
    args = ["train", f"data.folder={tmp_path / 'images'}", *TINY, "optim.layer_decay=0.8", override,
            f"out={tmp_path / 'run'}"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
