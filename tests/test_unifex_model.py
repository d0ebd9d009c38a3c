"""UniFEx model pieces: necks, the exported architecture, preprocessing as data, margin heads from a recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support import class_image
from unicom.errors import InputError
from unicom.models.export import build_transform, load_model, read_weights, save_model
from unicom.unifex.config import load_probe_config
from unicom.unifex.model import (
    LinearNeck,
    PoolingNeck,
    UniFExModel,
    backbone_features,
    describe_transform,
    unifex_settings,
)


@pytest.fixture(scope="module")
def test_vit_file(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), path)
    return path


def test_pooling_neck_averages_adaptive_bins():
    features = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    # AdaptiveAvgPool1d bins of 7 -> 3: [0, 3), [2, 5), [4, 7)
    assert PoolingNeck(3)(features).tolist() == [[2.0, 4.0, 6.0]]


def test_linear_neck_is_projection_then_batchnorm():
    torch.manual_seed(0)
    neck = LinearNeck(4, 2, batchnorm=True, dropout=0.5).eval()
    with torch.no_grad():
        neck.norm.running_mean.copy_(torch.tensor([0.5, -1.0]))
        neck.norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.randn(3, 4)
    projected = x @ neck.proj.weight.T + neck.proj.bias
    expected = (projected - torch.tensor([0.5, -1.0])) / torch.sqrt(torch.tensor([4.0, 0.25]) + 1e-5)
    torch.testing.assert_close(neck(x), expected)  # eval: no dropout, running statistics


def test_state_dict_holds_the_neck_only(test_vit_file):
    from unicom.models.encoders import load_encoder

    settings = unifex_settings("timm/test_vit", str(test_vit_file), 64, {"kind": "linear", "embedding_dim": 8})
    model = UniFExModel(settings, load_encoder("timm/test_vit", str(test_vit_file)))
    assert sorted(model.state_dict()) == ["neck.proj.bias", "neck.proj.weight"]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training  # frozen: stays in inference mode


def test_exported_model_rebuilds_backbone_and_neck(tmp_path, test_vit_file):
    from unicom.models.encoders import load_encoder

    backbone = load_encoder("timm/test_vit", str(test_vit_file))
    settings = unifex_settings("timm/test_vit", str(test_vit_file), 64,
                               {"kind": "linear", "embedding_dim": 8, "batchnorm": True})
    torch.manual_seed(1)
    neck = LinearNeck(64, 8, batchnorm=True)
    with torch.no_grad():
        neck.norm.running_mean.normal_()
        neck.norm.running_var.uniform_(0.5, 2.0)
    preprocess = describe_transform(backbone.image_transform)
    folder = save_model(tmp_path / "model", {f"neck.{k}": v for k, v in neck.state_dict().items()}, "unifex",
                        settings, preprocess, embedding_dim=8)
    assert sorted(read_weights(folder)) == ["neck.norm.bias", "neck.norm.num_batches_tracked", "neck.norm.running_mean",
                                            "neck.norm.running_var", "neck.norm.weight", "neck.proj.bias", "neck.proj.weight"]
    encoder = load_encoder(str(folder))
    assert encoder.embedding_dim == 8
    images = torch.stack([encoder.image_transform(class_image(c, 0, size=80)) for c in range(3)])
    with torch.no_grad():
        expected = neck.eval()(backbone_features(backbone, images))
        torch.testing.assert_close(encoder.encode_image(images), expected)
    model, _ = load_model(folder)
    assert isinstance(model, UniFExModel) and model.backbone is not None


def test_a_backbone_reference_that_changed_is_refused(tmp_path, test_vit_file):
    from unicom.models.encoders import load_encoder

    backbone = load_encoder("timm/test_vit", str(test_vit_file))
    settings = unifex_settings("timm/test_vit", str(test_vit_file), 32, {"kind": "linear", "embedding_dim": 4})
    folder = save_model(tmp_path / "model", {f"neck.{k}": v for k, v in LinearNeck(32, 4).state_dict().items()},
                        "unifex", settings, describe_transform(backbone.image_transform), embedding_dim=4)
    with pytest.raises(InputError, match="gives 64 features but the head was trained on 32"):
        load_model(folder)


def test_a_backbone_file_written_over_since_the_export_is_refused(tmp_path, test_vit_file):
    """Same architecture, same feature size, other weights at the path the folder names:
    the neck would embed with a backbone it was never trained on."""
    import shutil

    import timm

    from unicom.models.encoders import load_encoder

    weights = tmp_path / "backbone.pth"
    shutil.copy(test_vit_file, weights)
    backbone = load_encoder("timm/test_vit", str(weights))
    settings = unifex_settings("timm/test_vit", str(weights), 64, {"kind": "linear", "embedding_dim": 4},
                               backbone.weights_sha256())
    folder = save_model(tmp_path / "model", {f"neck.{k}": v for k, v in LinearNeck(64, 4).state_dict().items()},
                        "unifex", settings, describe_transform(backbone.image_transform), embedding_dim=4)
    assert load_encoder(str(folder)).embedding_dim == 4
    torch.manual_seed(3)
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), weights)  # retrained, saved over
    with pytest.raises(InputError, match=r"holds other weights than the backbone the head was trained on .*written "
                                         r"over; put the weights trained on back, or train the head again"):
        load_model(folder)


def _same_pixels(transform, image):
    described = describe_transform(transform)
    torch.testing.assert_close(build_transform(described)(image), transform(image), rtol=0, atol=0)
    return described


def test_timm_transform_with_crop_pct_is_described_exactly(test_vit_file):
    from unicom.models.encoders import load_encoder

    transform = load_encoder("timm/test_vit", str(test_vit_file)).image_transform
    described = _same_pixels(transform, class_image(3, 1, size=97))
    # test_vit: 160 px, crop_pct 0.95 -> short side resized to floor(160 / 0.95) = 168
    assert described == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "size": 160, "resize_mode": "shortest",
                         "resize_size": 168, "interpolation": "bicubic"}


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_open_clip_transforms_are_described_exactly(resize_mode):
    from open_clip import image_transform

    transform = image_transform(64, is_train=False, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), resize_mode=resize_mode)
    image = class_image(5, 2, size=90).crop((0, 0, 90, 70))  # not square: the two modes differ
    assert _same_pixels(transform, image)["resize_mode"] == resize_mode


def test_a_squash_and_centre_crop_is_described_exactly():
    """timm's crop_mode="squash" below a crop_pct of 1 (both sides resized, then the centre cropped)."""
    import timm.data

    transform = timm.data.create_transform(input_size=(3, 48, 48), crop_pct=0.8, crop_mode="squash",
                                           interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    described = _same_pixels(transform, class_image(5, 2, size=90).crop((0, 0, 90, 70)))
    assert (described["resize_mode"], described["size"], described["resize_size"]) == ("squash", 48, 60)


def test_an_undescribable_transform_is_refused_before_training():
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.Grayscale(3), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    with pytest.raises(InputError, match="cannot describe"):
        describe_transform(transform, "my-net")


def recipe(*overrides):
    return load_probe_config(None, ["out=/tmp/unused", "data.train=[l.csv]", *overrides])


def test_dynm_arcface_margins_follow_the_class_counts_of_the_data():
    counts = np.array([2, 10, 6, 2, 4])
    head = recipe("loss.head=dynm_arcface", "loss.m_max=0.5", "loss.m_min=0.1").loss.margin_head(len(counts), counts)
    normalised = (counts - 2) / (10 - 2)
    expected = [0.1 + 0.5 * (0.5 - 0.1) * (1 + math.cos(math.pi * n)) for n in normalised]
    np.testing.assert_allclose(head.margins.numpy(), expected, rtol=1e-6)
    assert head.margins[0] == pytest.approx(0.5) and head.margins[1] == pytest.approx(0.1)


def test_head_options_left_unset_keep_the_heads_defaults():
    from unicom.losses import AdaCos, AdaFace, CurricularFace

    adacos = recipe("loss.head=adacos", "loss.dynamic=false").loss.margin_head(9, np.ones(9, dtype=np.int64))
    assert isinstance(adacos, AdaCos) and adacos.num_classes == 9 and not adacos.dynamic
    assert adacos.scale == pytest.approx(math.sqrt(2) * math.log(8))
    adaface = recipe("loss.head=adaface", "loss.h=0.5").loss.margin_head(3)
    assert isinstance(adaface, AdaFace) and adaface.h == 0.5 and adaface.margin == AdaFace().margin
    curricular = recipe("loss.head=curricularface", "loss.scale=30").loss.margin_head(3)
    assert isinstance(curricular, CurricularFace) and curricular.scale == 30.0 and curricular.margin == 0.5


def test_an_option_of_another_head_is_refused_with_the_heads_options():
    with pytest.raises(InputError, match=r"loss.momentum does not apply to loss.head=cosface; its options are margin, scale "
                                         r"\(unset it: loss.momentum=null\)"):
        recipe("loss.head=cosface", "loss.momentum=0.1")


def test_a_views_transform_is_identified_the_same_in_every_run():
    from timm.data import create_transform

    from unicom.unifex.cache import transform_identity

    preprocess = {"size": 32, "resize_mode": "shortest", "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    # an exported model's transform holds a function, whose repr carries its address
    assert transform_identity(build_transform(preprocess)) == preprocess
    augmented = create_transform(32, is_training=True, scale=(0.5, 1.0))
    identity = transform_identity(augmented)
    assert "RandomResizedCrop" in identity and " at 0x" not in identity
    assert identity == transform_identity(create_transform(32, is_training=True, scale=(0.5, 1.0)))


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_a_backbone_named_by_a_tag_or_a_repository_that_changed_says_what_to_do(tmp_path):
    """Weights named rather than read from a file cannot be 'put back': a Hub repository named
    without a revision is pinned to the one trained on; weights of a tag (or the seeded random
    ones) are built by the installed library, whose version is what to check."""
    from unicom.models.encoders import load_encoder
    from unicom.unifex.model import changed_backbone_advice

    settings = unifex_settings("timm/test_vit", None, 64, {"kind": "linear", "embedding_dim": 4}, "0" * 64)
    backbone = load_encoder("timm/test_vit", None)
    folder = save_model(tmp_path / "model", {f"neck.{k}": v for k, v in LinearNeck(64, 4).state_dict().items()},
                        "unifex", settings, describe_transform(backbone.image_transform), embedding_dim=4)
    with pytest.raises(InputError, match=r"trained on \(weights_sha256 000000000000\.\.\. then, [0-9a-f]{12}\.\.\. now\): "
                                         r"the weights named so are built by the installed unicom, timm or open_clip, which may "
                                         r"be another version than the one the head was trained with: install that one, "
                                         r"or train the head again"):
        load_model(folder)
    assert changed_backbone_advice("hf-hub:org/unifex-backbone", None) == (
        "the repository was updated since; when it holds a unicom model folder, name the revision the head was trained "
        "on in settings.backbone of this model's unicom_model.json (hf-hub:org/unifex-backbone@<commit>), or train the "
        "head again")
    assert changed_backbone_advice("hf-hub:org/unifex-backbone@0123abc", None).startswith("the weights named so")
