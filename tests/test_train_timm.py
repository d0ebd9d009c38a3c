"""`unicom train` with ``model.name=timm/<name>``: any timm image model, its pooled features
through a projection, trained, exported and embedded; checked against timm's own model,
weights loader and evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from support import class_image, write_class_folder
from unicom.cli import main
from unicom.embed import embed_images
from unicom.errors import InputError
from unicom.models.export import build_transform
from unicom.models.vit import create_model


def timm_reference(name: str, seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=0).eval()


def timm_transform(name: str, size: int):
    """timm's own evaluation transform of ``name`` at ``size``."""
    import timm
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    config["input_size"] = (3, size, size)
    return create_transform(**config, is_training=False)


def test_a_timm_model_is_built_with_timms_sizes_and_preprocessing():
    created = create_model("timm/test_resnet")
    assert created.architecture == "timm" and created.settings["timm_model"] == "test_resnet"
    network = timm_reference("test_resnet", 0)
    assert created.settings["embedding_dim"] == network.num_features  # the features' width by default
    assert created.settings["image_size"] == 160 == network.pretrained_cfg["input_size"][-1]
    images = [class_image(label, label, size) for label, size in ((0, 200), (1, 90), (2, 161))]
    for size in (160, 64):
        ours = build_transform(create_model("timm/test_resnet", overrides={"image_size": size}).preprocess())
        theirs = timm_transform("test_resnet", size)
        for image in images:  # timm's crop_pct, interpolation, mean and std
            np.testing.assert_allclose(ours(image).numpy(), theirs(image).numpy(), atol=1e-6)


def test_weights_of_the_timm_model_start_its_trunk_and_the_projection_starts_afresh(tmp_path):
    network = timm_reference("test_resnet", 5)
    torch.save(network.state_dict(), tmp_path / "resnet.pth")
    created = create_model("timm/test_resnet", init=str(tmp_path / "resnet.pth"), overrides={"embedding_dim": 24})
    assert created.reinitialised == ["projection.weight"] and created.init_kind == "timm"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    module = created.module.eval()
    with torch.no_grad():
        np.testing.assert_allclose(module(pixels).numpy(), (network(pixels) @ module.projection.weight.T).numpy(),
                                   atol=1e-5)
    other = timm_reference("test_efficientnet", 0)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError, match="not weights of timm's test_resnet"):
        create_model("timm/test_resnet", init=str(tmp_path / "other.pth"))
    with pytest.raises(InputError, match="has no model 'no_such_net'"):
        create_model("timm/no_such_net")
    with pytest.raises(InputError, match="the timm architecture has no setting 'patch_size'"):
        create_model("timm/test_resnet", overrides={"patch_size": 8})


def test_a_trained_timm_model_exports_a_folder_that_embeds_as_timm_computes_it(tmp_path, capsys):
    import unicom

    network = timm_reference("test_resnet", 6)
    torch.save(network.state_dict(), tmp_path / "resnet.pth")
    write_class_folder(tmp_path / "images", [0, 1, 2, 3], 4)
    common = ["model.name=timm/test_resnet", "model.image_size=64", "model.embedding_dim=32",
              f"data.folder={tmp_path / 'images'}", "data.batch_size=8", "data.workers=0", "loss.scale=16"]
    assert main(["train", *common, f"model.init={tmp_path / 'resnet.pth'}", "train.steps=2",
                 f"out={tmp_path / 'run'}"]) == 0
    assert "weights: timm" in capsys.readouterr().out
    folder = tmp_path / "run" / "model"
    import timm
    from PIL import Image

    # timm reads the folder as its own model, the projection its classifier (in timm's layout, its keys)
    trained = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    weights = load_file(str(folder / "model.safetensors"))
    assert not torch.equal(weights["conv1.0.weight"], network.conv1[0].weight)  # two steps moved the trunk
    assert not weights["fc.bias"].count_nonzero() and weights["fc.weight"].shape == (32, network.num_features)
    paths = sorted(str(p) for p in (tmp_path / "images").rglob("*.jpg"))[:5]
    transform = timm_transform("test_resnet", 64)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = torch.nn.functional.normalize(trained(pixels), dim=-1).numpy()
    np.testing.assert_allclose(embed_images(str(folder), paths, num_workers=0), expected, atol=1e-5)
    model, _ = unicom.load(str(folder))
    assert type(model).__name__ == "TimmBackbone"
    # the compact epoch, continuing the run: the trunk and the projection as trained
    assert main(["train", *common, f"model.init={tmp_path / 'run'}", "train.steps=1", f"out={tmp_path / 'more'}"]) == 0
    assert main(["train", *common[1:], "model.name=timm/test_efficientnet", f"model.init={tmp_path / 'run'}",
                 "train.steps=1", f"out={tmp_path / 'other'}"]) == 2
    assert "does not describe the weights" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_the_folder_of_a_timm_model_is_one_timm_loads_with_the_same_embeddings_and_pixels(name, tmp_path):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    import unicom
    from unicom.models.export import save_model

    torch.manual_seed(7)
    created = create_model(f"timm/{name}", overrides={"embedding_dim": 24})
    folder = save_model(tmp_path / name, created.module.eval(), "timm", created.settings, created.preprocess())
    model, transform = unicom.load(str(folder))
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # its classifier is the projection
    size = created.settings["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(theirs(pixels).numpy(), model(pixels).numpy(), atol=1e-6)
        np.testing.assert_allclose(model(pixels).numpy(), created.module(pixels).numpy(), atol=1e-6)
    timm_pixels = create_transform(**resolve_model_data_config(theirs), is_training=False)
    for image in (class_image(0, 0, 200), class_image(1, 1, 90)):
        np.testing.assert_allclose(transform(image).numpy(), timm_pixels(image).numpy(), atol=1e-6)
