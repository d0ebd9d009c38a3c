"""Locked layers (``model.lock``, ``model.unlocked_groups``, ``model.lock_bn_stats``): which
parameters train and which BatchNorm layers keep their statistics, against open_clip's own
``TimmModel.lock`` applied to the same timm trunk; a run's locked weights unchanged, its
resumption, and the refusals."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from support import write_class_folder
from test_layer_decay import TINY
from test_layer_decay import weights as last_weights

from unicom.cli import main
from unicom.engine.lock import lock_layers
from unicom.errors import InputError
from unicom.models.vit import ClipViT, ClipViTSettings, create_model


def clip_vit(seed: int = 0) -> ClipViT:
    torch.manual_seed(seed)
    return ClipViT(ClipViTSettings(image_size=16, patch_size=8, width=32, depth=3, heads=2, embedding_dim=8))


def open_clip_locked(network: torch.nn.Module, unlocked_groups: int, bn_stats: bool = False) -> torch.nn.Module:
    """A copy of ``network`` (a timm trunk and a projection) locked by open_clip's
    ``TimmModel.lock``, which reads only the ``trunk`` of the tower it locks."""
    from open_clip.timm_model import TimmModel

    locked = copy.deepcopy(network)
    tower = SimpleNamespace(trunk=locked.trunk)
    TimmModel.lock(tower, unlocked_groups=unlocked_groups, freeze_bn_stats=bn_stats)
    locked.trunk = tower.trunk  # open_clip may replace its BatchNorm layers
    return locked


def trained(network: torch.nn.Module) -> set[str]:
    return {name for name, param in network.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("unlocked_groups", [0, 1, 3])
def test_a_clip_vits_locked_parameters_are_open_clips(unlocked_groups):
    network = clip_vit()
    reference = open_clip_locked(network, unlocked_groups)
    locked = lock_layers(network, unlocked_groups)
    assert trained(network) == trained(reference)
    assert "projection.weight" in trained(network)  # after the trunk: always trained
    frozen = [param for param in network.parameters() if not param.requires_grad]
    assert locked.parameters == sum(param.numel() for param in frozen) > 0
    assert locked.total == 4  # the stem, then the three blocks (the final norm with the last)


@pytest.mark.parametrize("unlocked_groups", [0, 2])
def test_a_cnns_locked_batchnorm_keeps_its_statistics_as_open_clips_frozen_batchnorm(unlocked_groups):
    torch.manual_seed(0)
    network = create_model("timm/test_resnet", overrides={"embedding_dim": 8, "image_size": 32}).module.train()
    with torch.no_grad():  # statistics unlike a fresh BatchNorm's, so that holding them shows
        for layer in network.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
    reference = open_clip_locked(network, unlocked_groups, bn_stats=True).train()
    locked = lock_layers(network, unlocked_groups, bn_stats=True)
    assert trained(network) == trained(reference)
    held = {name for name, layer in network.named_modules() if isinstance(layer, torch.nn.BatchNorm2d) and not layer.training}
    assert set(locked.batchnorms) == held and held
    frozen = {name for name, layer in reference.named_modules() if type(layer).__name__ == "FrozenBatchNorm2d"}
    assert held == frozen
    before = {name: tensor.clone() for name, tensor in network.state_dict().items() if "running" in name}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(network(images), reference(images))
    after = network.state_dict()
    for name in before:  # held layers keep their statistics, the others update theirs
        assert torch.equal(before[name], after[name]) == (name.rsplit(".", 1)[0] in held), name


def test_locking_every_group_or_a_network_without_groups_is_refused():
    with pytest.raises(InputError, match="unlocks every one of the 4 layer groups"):
        lock_layers(clip_vit(), 4)
    with pytest.raises(InputError, match="does not say how its parameters form layers"):
        lock_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    from unicom.models.unicom_vit import build_unicom_vit

    settings = {"image_size": 16, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "embedding_dim": 8}
    with pytest.raises(InputError, match="leaves nothing of UnicomViT to train"):  # its head is in its matcher's groups
        lock_layers(build_unicom_vit(settings), 0)
    network = build_unicom_vit(settings)
    lock_layers(network, 1)  # its last group: what its matcher does not name, the head
    assert trained(network) == {name for name, _ in network.named_parameters()
                                if not name.startswith(("pos_embed", "patch_embed", "blocks", "norm"))} != set()


# ------------------------------------------------------------------------ unicom train


@pytest.mark.usefixtures("one_thread")
def test_a_locked_run_trains_only_its_unlocked_layers_and_may_lock_them_on_resume(tmp_path, capsys):
    write_class_folder(tmp_path / "images", list(range(4)), 8, size=16)
    common = [f"data.folder={tmp_path / 'images'}", *TINY]
    assert main(["train", *common, "train.steps=0", f"out={tmp_path / 'start'}"]) == 0
    start = load_file(str(tmp_path / "start" / "model" / "model.safetensors"))
    assert main(["train", *common, "model.lock=true", "model.unlocked_groups=1", "train.steps=2",
                 f"out={tmp_path / 'locked'}"]) == 0
    assert "model.lock: 2 of 3 layer groups locked" in capsys.readouterr().out
    trained_now = load_file(str(tmp_path / "locked" / "model" / "model.safetensors"))  # timm's names: the projection is head
    moved = {name for name in start if not torch.equal(start[name], trained_now[name])}
    # the last group (the last block, the final norm) and the projection
    assert moved == {name for name in start if name.startswith(("blocks.1.", "norm.", "head.weight"))}
    # trained unlocked first, then locked on resume: the locked weights stay where the checkpoint left them
    assert main(["train", *common, "train.steps=2", f"out={tmp_path / 'later'}"]) == 0
    halfway = last_weights(tmp_path / "later")
    assert main(["train", *common, "model.lock=true", "train.steps=4", f"out={tmp_path / 'later'}"]) == 0
    assert "model.lock false -> true" in capsys.readouterr().out
    end = last_weights(tmp_path / "later")
    assert {name for name in end if not torch.equal(end[name], halfway[name])} == {"projection.weight"}


@pytest.mark.parametrize("override, message", [
    ("model.unlocked_groups=2", "model.unlocked_groups and model.lock_bn_stats apply to a locked network"),
    ("model.lock_bn_stats=true", "model.unlocked_groups and model.lock_bn_stats apply to a locked network"),
    ("model.unlocked_groups=-1", "model.unlocked_groups must be 0 or more, got -1"),
])
def test_lock_settings_without_a_lock_or_out_of_range_are_refused(tmp_path, capsys, override, message):
    write_class_folder(tmp_path / "images", [0, 1], 2, size=16)
    assert main(["train", f"data.folder={tmp_path / 'images'}", *TINY, override, f"out={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
