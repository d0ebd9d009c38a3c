"""``train.ema``: a moving average of the weights, against timm's ModelEmaV3; the run exports
it, keeps it in its checkpoints and resumes it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from support import write_class_folder

from unicom.cli import main
from unicom.engine.ema import WeightsEMA
from unicom.models.vit import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_is_timms_model_ema_over_steps_with_batchnorm(warmup):
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    network = create_model("timm/test_resnet", overrides={"embedding_dim": 8}).module.train()
    ours = WeightsEMA(network, 0.9, warmup=warmup)
    theirs = ModelEmaV3(copy.deepcopy(network), decay=0.9, use_warmup=warmup)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 6):  # the weights and BatchNorm's running statistics move
        optimizer.zero_grad()
        network(torch.randn(4, 3, 32, 32, generator=generator)).square().mean().backward()
        optimizer.step()
        ours.update(network, step)
        theirs.update(network, step if warmup else None)  # timm's warm-up counts the steps given
    reference = theirs.module.state_dict()
    assert ours.state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ours.state[key], value, atol=1e-7, rtol=1e-6, msg=key)
    moved = [key for key, value in network.state_dict().items() if value.is_floating_point()
             and not torch.allclose(value, ours.state[key])]
    assert "projection.weight" in moved and any(key.endswith("running_mean") for key in moved)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        WeightsEMA(network, 1.0)


@pytest.mark.parametrize("warmup, after, settings", [
    (True, 3, {"min_decay": 0.3, "warmup_gamma": 2.0, "warmup_power": 0.75}),
    (True, 0, {"min_decay": 0.5}),
    (False, 2, {}),
])
def test_a_delayed_and_shaped_average_is_timms_model_ema_given_the_step(warmup, after, settings):
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    ours = WeightsEMA(network, 0.9, warmup=warmup, update_after=after, **settings)
    # timm's average copies the network through its update_after_step + 1 (the warm-up's first
    # step, or with a constant decay the first step it is given): ours through update_after
    theirs = ModelEmaV3(copy.deepcopy(network), decay=0.9, use_warmup=warmup,
                        update_after_step=after if warmup else after - 1, **settings)
    generator = torch.Generator().manual_seed(1)
    decays = []
    for step in range(1, 9):
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        network(torch.randn(5, 3, generator=generator))  # BatchNorm's running statistics move
        decays.append(ours.decay_at(step))
        assert decays[-1] == pytest.approx(theirs.get_decay(step), abs=1e-12), step
        ours.update(network, step)
        theirs.update(network, step)
        for key, value in theirs.module.state_dict().items():
            torch.testing.assert_close(ours.state[key], value, atol=1e-7, rtol=1e-6, msg=f"{key} at step {step}")
    copied = after + 1 if warmup else after
    assert decays[:copied] == [0.0] * copied and all(0 < decay <= 0.9 for decay in decays[copied:])
    if "min_decay" in settings:
        assert min(decays[copied:]) == settings["min_decay"]


TINY = ["model.image_size=16", "model.patch_size=8", "model.width=48", "model.depth=2", "model.heads=2",
        "model.embedding_dim=16", "data.batch_size=16", "data.workers=0", "loss.scale=16", "loss.sample_rate=0.5",
        "optim.lr=0.003", "schedule.kind=constant", "log.tensorboard=false", "train.device=cpu"]


def checkpoint_weights(out, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / name))


def model_weights(folder) -> dict[str, torch.Tensor]:
    """An exported model's weights as the network names them (the checkpoints' keys)."""
    import unicom

    return {key: value.detach() for key, value in unicom.load(str(folder))[0].state_dict().items()}


def test_a_run_exports_the_average_of_its_weights_and_resumes_it_exactly(tmp_path, capsys):
    write_class_folder(tmp_path / "images", list(range(4)), 8, size=16)
    common = [f"data.folder={tmp_path / 'images'}", *TINY]
    # the weights after each step, without an average: the reference folds them by hand
    assert main(["train", *common, "train.steps=0", f"out={tmp_path / 'initial'}"]) == 0
    assert main(["train", *common, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=10",
                 f"out={tmp_path / 'plain'}"]) == 0
    expected = model_weights(tmp_path / "initial" / "model")
    for step in range(1, 5):
        weights = checkpoint_weights(tmp_path / "plain", step)
        expected = {key: torch.lerp(value, weights[key], 1 - 0.75) for key, value in expected.items()}
    assert main(["train", *common, "train.ema=0.75", "train.steps=4", "checkpoint.every=2",
                 f"out={tmp_path / 'averaged'}"]) == 0
    exported = model_weights(tmp_path / "averaged" / "model")
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=1e-5, msg=key)
    # the average changes nothing of the training: the checkpoint's own weights are the plain run's
    raw, plain = checkpoint_weights(tmp_path / "averaged", 4), checkpoint_weights(tmp_path / "plain", 4)
    assert all(torch.equal(raw[key], plain[key]) for key in raw)
    assert all(torch.equal(exported[key], value) for key, value in
               checkpoint_weights(tmp_path / "averaged", 4, "model_ema.safetensors").items())
    # stopped after 2 steps and resumed: the same average, bit for bit
    assert main(["train", *common, "train.ema=0.75", "train.steps=2", "checkpoint.every=2",
                 f"out={tmp_path / 'halves'}"]) == 0
    assert main(["train", *common, "train.ema=0.75", "train.steps=4", "checkpoint.every=2",
                 f"out={tmp_path / 'halves'}"]) == 0
    halves = model_weights(tmp_path / "halves" / "model")
    assert all(torch.equal(halves[key], exported[key]) for key in exported)
    # with the warm-up: the decay of step t is min(0.75, 1 - t^(-2/3)), 0 at the first
    assert main(["train", *common, "train.ema=0.75", "train.ema_warmup=true", "train.steps=4", "checkpoint.every=4",
                 f"out={tmp_path / 'warm'}"]) == 0
    warm = checkpoint_weights(tmp_path / "plain", 1)
    for step in range(2, 5):
        decay = min(0.75, 1 - (1 + (step - 1)) ** (-2 / 3))
        weights = checkpoint_weights(tmp_path / "plain", step)
        warm = {key: decay * value + (1 - decay) * weights[key] for key, value in warm.items()}
    for key, value in model_weights(tmp_path / "warm" / "model").items():
        torch.testing.assert_close(value, warm[key], atol=1e-6, rtol=1e-5, msg=key)
    # an average that starts after step 2 (a copy of the network through it), with the warm-up
    assert main(["train", *common, "train.ema=0.75", "train.ema_warmup=true", "train.ema_update_after=2",
                 "train.ema_min_decay=0.5", "train.steps=4", "checkpoint.every=4", f"out={tmp_path / 'late'}"]) == 0
    late = checkpoint_weights(tmp_path / "plain", 3)  # the warm-up's first step copies too
    decay = max(0.5, min(0.75, 1 - 2 ** (-2 / 3)))
    weights = checkpoint_weights(tmp_path / "plain", 4)
    late = {key: decay * value + (1 - decay) * weights[key] for key, value in late.items()}
    for key, value in model_weights(tmp_path / "late" / "model").items():
        torch.testing.assert_close(value, late[key], atol=1e-6, rtol=1e-5, msg=key)
    # unicom train --export-from exports the average too
    capsys.readouterr()
    assert main(["train", "--export-from", str(tmp_path / "averaged"), "--model-out", str(tmp_path / "again")]) == 0
    again = model_weights(tmp_path / "again")
    assert all(torch.equal(again[key], exported[key]) for key in exported)


def test_an_average_taken_up_on_resume_starts_there_and_a_decay_out_of_range_is_refused(tmp_path, capsys):
    write_class_folder(tmp_path / "images", list(range(4)), 8, size=16)
    common = [f"data.folder={tmp_path / 'images'}", *TINY]
    assert main(["train", *common, "train.steps=2", "checkpoint.every=2", f"out={tmp_path / 'run'}"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "train.ema=0.5", "train.steps=3", "checkpoint.every=2", f"out={tmp_path / 'run'}"]) == 0
    assert "note: train.ema averages the weights from step 2 on (the checkpoint kept no average)" in capsys.readouterr().out
    start, end = checkpoint_weights(tmp_path / "run", 2), checkpoint_weights(tmp_path / "run", 3)
    exported = model_weights(tmp_path / "run" / "model")
    for key, value in exported.items():
        torch.testing.assert_close(value, torch.lerp(start[key], end[key], 0.5), atol=1e-6, rtol=1e-5, msg=key)
    assert main(["train", *common, "train.ema=1", "train.steps=1", f"out={tmp_path / 'bad'}"]) == 2
    assert "train.ema must be in (0, 1), got 1" in capsys.readouterr().err
    assert main(["train", *common, "train.ema_warmup=true", "train.steps=1", f"out={tmp_path / 'bad'}"]) == 2
    assert "train.ema_warmup warms up train.ema: set it too" in capsys.readouterr().err
    assert main(["train", *common, "train.ema=0.9", "train.ema_min_decay=0.5", "train.ema_warmup_power=0.5",
                 "train.steps=1", f"out={tmp_path / 'bad'}"]) == 2
    assert ("train.ema_min_decay, train.ema_warmup_power shape the warm-up of train.ema: set train.ema_warmup=true too"
            in capsys.readouterr().err)
    assert main(["train", *common, "train.ema=0.9", "train.ema_warmup=true", "train.ema_min_decay=0.95",
                 "train.ema_update_after=-1", "train.steps=1", f"out={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "train.ema_min_decay must be in [0, train.ema], got 0.95" in err
    assert "train.ema_update_after must be 0 or more, got -1" in err
