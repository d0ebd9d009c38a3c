"""Multi-scale descriptors (``--scales``): each image embedding the mean of the L2-normalised
embeddings of the model input resized by each scale (cirtorch's ``--multiscale``), checked
against the networks themselves (a timm CNN, transformers' DINOv2, CLIP, SigLIP, Chinese-CLIP
and BLIP ViTs; open_clip's ViT made at each size, timm's ViTs resized by timm) on inputs resized by
``torch.nn.functional.interpolate`` as cirtorch resizes them; through `unicom embed`, `index`,
`search`, `evaluate` and `dedup`, and refused for networks of one input size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unicom.cli import main
from unicom.embed import embed_images
from unicom.errors import InputError
from unicom.evaluate.metrics import retrieval_metrics
from unicom.formats.embeddings import read_config, read_embedding_folder
from unicom.models.encoders import MultiScale, check_scales, load_encoder, with_views
from unicom.search.index import Index

from support import class_image, embedded_image_collection, write_class_folder

SCALES = (1.0, 0.7071, 0.5)


def cirtorch_reference(network, transform, images, scales=SCALES) -> np.ndarray:
    """cirtorch's multi-scale descriptor: for each scale s, the network's L2-normalised output
    for the model input given to ``interpolate(scale_factor=s, mode="bilinear",
    align_corners=False)``; their mean, L2-normalised."""
    rows = []
    with torch.no_grad():
        for image in images:
            x = transform(image).unsqueeze(0)
            total = torch.zeros(())
            for s in scales:
                resized = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                total = total + F.normalize(network(resized).double(), dim=-1)
            rows.append(F.normalize(total / len(scales), dim=-1)[0].numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A random timm test_resnet saved as a checkpoint, its class images, and a folder of them
    embedded with --scales 1,0.7071,0.5 and indexed."""
    import timm

    root = tmp_path_factory.mktemp("scales")
    torch.manual_seed(3)
    network = timm.create_model("test_resnet", num_classes=0).eval()
    torch.save(network.state_dict(), root / "resnet.pth")
    images = write_class_folder(root / "images", [0, 1, 2, 3], 5, size=72)
    model = ["--model", "timm/test_resnet", "--pretrained", str(root / "resnet.pth")]
    assert main(["embed", "--input", str(root / "images"), "--out", str(root / "scaled"), *model, "--scales",
                 "0.5,1,0.7071", "--dtype", "float32", "--workers", "0"]) == 0
    assert main(["index", "--emb", str(root / "scaled"), "--out", str(root / "index")]) == 0
    encoder = load_encoder("timm/test_resnet", str(root / "resnet.pth"))
    return {"root": root, "network": network, "images": images, "model": model, "encoder": encoder,
            "scaled": root / "scaled", "index": root / "index"}


def test_scales_are_parsed_sorted_and_checked():
    assert check_scales("1,0.7071,0.5") == (1.0, 0.7071, 0.5) == check_scales([0.5, 1, 0.7071])
    assert check_scales("1") is None and check_scales(None) is None and check_scales([1.0]) is None
    assert check_scales("1.4142, 1") == (1.4142, 1.0)
    assert check_scales(np.array([1, 0.5])) == (1.0, 0.5) and check_scales([np.int64(2), 1]) == (2.0, 1.0)
    for bad, message in (("0", "above 0"), ("1,-0.5", "above 0"), ("5", "at most 4"), ("1,x", "comma-separated"),
                         ("1,1", "twice"), ([True], "not a scale"), ([float("nan")], "not a scale")):
        with pytest.raises(InputError, match=message):
            check_scales(bad)


def test_a_cnns_multi_scale_embeddings_are_cirtorchs(cnn):
    encoder = cnn["encoder"]
    images = [class_image(label, i, size=size) for label, i, size in ((0, 1, 72), (2, 0, 90), (3, 4, 50))]
    reference = cirtorch_reference(cnn["network"], encoder.image_transform, images)
    scaled = embed_images(encoder, images, num_workers=0, scales=SCALES)
    np.testing.assert_allclose(scaled, reference, atol=1e-5)
    plain = embed_images(encoder, images, num_workers=0)
    assert (np.linalg.norm(plain - reference, axis=1) > 1e-3).all()  # the other scales change the embeddings
    # with the mirror too: the mean over scales of each scale's mirrored mean
    mirrored = cirtorch_reference(lambda x: cnn["network"](x) + cnn["network"](x.flip(-1)), encoder.image_transform,
                                  images)
    np.testing.assert_allclose(embed_images(encoder, images, num_workers=0, flip=True, scales=SCALES), mirrored,
                               atol=1e-5)
    wrapped = with_views(encoder, scales="1,0.5")
    assert isinstance(wrapped, MultiScale) and wrapped.scales == (1.0, 0.5)
    assert wrapped.weights_sha256() == encoder.weights_sha256() and with_views(encoder, scales="1") is encoder
    # views asked for of an encoder that has some replace them (an index's queries: its own views, once)
    again = with_views(wrapped, scales="1,0.5")
    assert isinstance(again, MultiScale) and again.encoder is encoder
    np.testing.assert_allclose(embed_images(again, images, num_workers=0),
                               embed_images(encoder, images, num_workers=0, scales=(1, 0.5)), atol=1e-6)
    assert with_views(wrapped) is wrapped  # none asked for: the encoder as given


def test_dinov2_embeds_each_scale_with_its_position_embeddings_interpolated(tmp_path):
    from support import tiny_hf_dinov2

    model, processor = tiny_hf_dinov2(tmp_path / "dinov2")
    encoder = load_encoder(str(tmp_path / "dinov2"))
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48))]
    reference = cirtorch_reference(lambda x: model(pixel_values=x).pooler_output, encoder.image_transform, images,
                                   scales=(1.0, 0.75))
    np.testing.assert_allclose(embed_images(encoder, images, num_workers=0, scales=(1.0, 0.75)), reference, atol=1e-5)


def test_embed_records_the_scales_and_refuses_another_way_into_the_folder(cnn, capsys):
    x, metadata = read_embedding_folder(cnn["scaled"])
    paths = metadata.column("image_path").to_pylist()
    reference = cirtorch_reference(cnn["network"], cnn["encoder"].image_transform,
                                   [Image.open(path).convert("RGB") for path in paths])
    np.testing.assert_allclose(x, reference, atol=1e-5)
    assert read_config(cnn["scaled"])["scales"] == list(SCALES)
    capsys.readouterr()
    assert main(["embed", "--input", str(cnn["root"] / "images"), "--out", str(cnn["scaled"]), *cnn["model"],
                 "--dtype", "float32", "--workers", "0"]) == 2
    assert "scales" in capsys.readouterr().err
    assert main(["embed", "--input", str(cnn["root"] / "images"), "--out", str(cnn["root"] / "t"), *cnn["model"],
                 "--modalities", "text", "--scales", "1,0.5"]) == 2
    assert "--scales" in capsys.readouterr().err


def test_the_index_embeds_its_image_queries_at_the_collections_scales(cnn, capsys):
    index = Index.load(cnn["index"])
    assert index.config["model"]["scales"] == list(SCALES)
    query = cnn["images"][7]
    capsys.readouterr()
    assert main(["search", "--index", str(cnn["index"]), str(query), "-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert top["id"] == 7 and top["score"] == pytest.approx(1.0, abs=1e-4)
    scores, ids = index.search_images(cnn["encoder"], [query], k=1)
    assert ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    plain = embed_images(cnn["encoder"], [query], num_workers=0)[0]
    assert float(plain @ read_embedding_folder(cnn["scaled"])[0][7]) < 0.999


def test_evaluate_scales_scores_the_multi_scale_embeddings(cnn, tmp_path, capsys):
    root = cnn["root"] / "images"
    out = tmp_path / "eval"
    assert main(["evaluate", *cnn["model"], "--dataset", "folder", "--root", str(root), "--out", str(out),
                 "--scales", "1,0.7071,0.5", "--workers", "0", "--dims", "none"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["scales"] == list(SCALES)
    assert "at scales 1, 0.7071, 0.5" in (out / "metrics.md").read_text().splitlines()[0]
    x, metadata = read_embedding_folder(out / "embeddings" / "query")
    keys = metadata.column("key").to_pylist()
    reference = cirtorch_reference(cnn["network"], cnn["encoder"].image_transform,
                                   [Image.open(root / key).convert("RGB") for key in keys])
    np.testing.assert_allclose(x, reference, atol=1e-5)
    labels = np.array([int(key.split("/")[0].split("_")[1]) for key in keys])
    expected = retrieval_metrics(reference.astype(np.float32), labels, ks=(1, 2, 4, 8))
    for name in ("recall@1", "map@r"):
        assert report["metrics"][name] == pytest.approx(expected[name], abs=1e-9)
    capsys.readouterr()
    # the cache holds the multi-scale embeddings: a run without --scales does not read them back
    assert main(["evaluate", *cnn["model"], "--dataset", "folder", "--root", str(root), "--out", str(out),
                 "--workers", "0", "--dims", "none"]) == 2
    # embeddings already made are read as they are; a folder made with them says so
    assert main(["evaluate", "--embeddings", str(cnn["scaled"]), "--out", str(tmp_path / "a"), "--scales",
                 "1,0.5"]) == 2
    assert "unicom embed --scales" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(cnn["scaled"]), "--out", str(tmp_path / "b"), "--no-pca"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["scales"] == list(SCALES)


def test_folders_embedded_at_other_scales_are_not_compared(cnn, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["embed", "--input", str(cnn["root"] / "images"), "--out", str(plain), *cnn["model"], "--dtype",
                 "float32", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--embeddings", str(cnn["scaled"]), "--whiten", str(plain), "--out",
                 str(tmp_path / "w"), "--no-pca"]) == 2
    error = capsys.readouterr().err
    assert "--whiten" in error and "scales 1, 0.7071, 0.5" in error and "no --scales" in error
    assert main(["dedup", "--emb", str(cnn["scaled"]), "--against", str(plain), "--out", str(tmp_path / "d")]) == 2
    assert "scales 1, 0.7071, 0.5 (--scales)" in capsys.readouterr().err


def test_a_network_of_one_input_size_is_refused_before_anything_is_written(tmp_path, capsys):
    from test_evaluate_cli import tiny_model_file

    checkpoint = tiny_model_file(tmp_path / "model.pt")  # a released-style Unicom ViT: its head flattens 4 tokens
    write_class_folder(tmp_path / "images", [0, 1], 2)
    out = tmp_path / "scaled"
    assert main(["embed", "--input", str(tmp_path / "images"), "--out", str(out), "--model", str(checkpoint),
                 "--scales", "1,0.5", "--workers", "0"]) == 2
    error = capsys.readouterr().err
    assert "cannot embed its input resized by 0.5 (16 x 16 pixels" in error and "leave --scales out" in error
    assert not (out / "embed_config.json").exists()
    with pytest.raises(InputError, match="resized by 0.5"):
        with_views(load_encoder(str(checkpoint)), scales=(1.0, 0.5))
    # a timm ViT made with dynamic image sizes (timm's test_vit) takes them: its positions are interpolated
    (tmp_path / "vit").mkdir()
    found = embedded_image_collection(tmp_path / "vit")
    assert isinstance(with_views(load_encoder("timm/test_vit", str(found["checkpoint"])), scales="1,0.5"), MultiScale)


def features(output) -> torch.Tensor:
    """``get_image_features``' embeddings: a tensor (transformers 4), or its output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("kind", ["clip", "siglip", "chinese_clip", "blip", "dual_encoder-clip", "dual_encoder-vit"])
def test_transformers_vits_embed_each_scale_with_their_positions_interpolated(kind, tmp_path):
    """CLIP-like ViTs of transformers (and the CLIP or ViT tower of a VisionTextDualEncoder) take
    other sizes with interpolate_pos_encoding (their position embeddings resized to the grid, as
    transformers does it): against the models themselves, called so, on inputs resized by
    cirtorch's formula."""
    import support

    builder, _, vision = kind.partition("-")
    options = {"vision": vision, "text": "bert"} if vision else {}
    model = getattr(support, f"tiny_hf_{builder}")(tmp_path / kind, **options)[0]
    encoder = load_encoder(str(tmp_path / kind))
    if kind == "blip":
        network = lambda x: model.vision_proj(  # noqa: E731
            model.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0])
    else:
        network = lambda x: features(model.get_image_features(pixel_values=x, interpolate_pos_encoding=True))  # noqa: E731
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48))]
    reference = cirtorch_reference(network, encoder.image_transform, images, scales=(1.0, 0.75))
    np.testing.assert_allclose(embed_images(encoder, images, num_workers=0, scales=(1.0, 0.75)), reference, atol=1e-5)
    plain = embed_images(encoder, images, num_workers=0)  # at its own size, as it was
    np.testing.assert_allclose(plain, cirtorch_reference(network, encoder.image_transform, images, scales=(1.0,)),
                               atol=1e-5)
    assert (np.linalg.norm(plain - reference, axis=1) > 1e-3).all()


def test_open_clip_vits_embed_each_scale_as_open_clip_made_at_that_size(tmp_path):
    """An open_clip ViT takes other sizes with its position embeddings resampled to the grid:
    against open_clip's own model made with ``force_image_size`` at each resized side (its
    loader resamples the checkpoint's embeddings), pixels past the last whole patch unseen (22 px
    with 8-px patches); at its own size it is open_clip's model as it was."""
    import warnings

    import open_clip
    from support import tiny_open_clip

    spec = tiny_open_clip(tmp_path / "clip")  # 32 px, 8-px patches
    encoder = load_encoder(spec)
    made = {}

    def open_clip_at(x):
        side = x.shape[-1]
        if side not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                made[side] = open_clip.create_model(spec, force_image_size=side).eval()
        return made[side].encode_image(x)

    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48))]
    scales = (1.0, 0.75, 0.7071, 0.5)
    reference = cirtorch_reference(open_clip_at, encoder.image_transform, images, scales=scales)
    assert sorted(made) == [16, 22, 24, 32]
    np.testing.assert_allclose(embed_images(encoder, images, num_workers=0, scales=scales), reference, atol=1e-6)
    plain = embed_images(encoder, images, num_workers=0)  # the tower is left as it was at its own size
    np.testing.assert_allclose(plain, cirtorch_reference(open_clip_at, encoder.image_transform, images, scales=(1.0,)),
                               atol=1e-6)
    assert (np.linalg.norm(plain - reference, axis=1) > 1e-3).all()
    assert "positional_embedding" not in vars(encoder.model.visual)  # resampled for a view of it only


def test_the_vits_unicom_train_makes_embed_each_scale_as_timm_resizes_them(tmp_path):
    """A ViT of ``unicom train`` (a timm VisionTransformer of one input size) takes other sizes
    as timm's ``dynamic_img_size`` and ``dynamic_img_pad`` make it: against timm's
    ``set_input_size`` (the position embeddings resampled at that size) on inputs whose sides are
    multiples of the patch, and on an input padded with zeros to the next multiple by hand."""
    import copy

    from unicom.models.export import save_model
    from unicom.models.registry import clip_preprocess
    from unicom.models.vit import ClipViT, ClipViTSettings

    settings = ClipViTSettings(image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=8)
    torch.manual_seed(5)
    model = ClipViT(settings).eval()
    save_model(tmp_path / "model", model, "clip_vit", settings, clip_preprocess(32))
    encoder = load_encoder(str(tmp_path / "model"))
    made = {}

    def timm_at(x):
        side = x.shape[-1]
        padded = -(-side // 8) * 8
        if padded not in made:
            made[padded] = copy.deepcopy(model)
            made[padded].trunk.set_input_size(img_size=(padded, padded))
        return made[padded](F.pad(x, (0, padded - side, 0, padded - side)))

    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48))]
    scales = (1.0, 0.75, 0.7071, 0.5)
    reference = cirtorch_reference(timm_at, encoder.image_transform, images, scales=scales)
    assert sorted(made) == [16, 24, 32]  # 22 px padded to 24
    np.testing.assert_allclose(embed_images(encoder, images, num_workers=0, scales=scales), reference, atol=1e-6)
    plain = embed_images(encoder, images, num_workers=0)
    np.testing.assert_allclose(plain, cirtorch_reference(model, encoder.image_transform, images, scales=(1.0,)),
                               atol=1e-6)
    assert (np.linalg.norm(plain - reference, axis=1) > 1e-3).all()


def test_a_timm_vit_with_dynamic_sizes_is_padded_as_timm_pads_it(tmp_path):
    """timm's test_vit (made with ``dynamic_img_size``) at a side that is no multiple of its
    patch: as timm's model made with ``dynamic_img_pad`` too embeds it."""
    import timm

    found = embedded_image_collection(tmp_path)
    encoder = load_encoder("timm/test_vit", str(found["checkpoint"]))
    padding = timm.create_model("test_vit", num_classes=0, dynamic_img_pad=True).eval()
    padding.load_state_dict(torch.load(found["checkpoint"], weights_only=True))
    images = [Image.open(path) for path in found["images"][:3]]
    scales = (1.0, 0.7071)  # 160 px (16-px patches): 113 px padded to 128
    reference = cirtorch_reference(padding, encoder.image_transform, images, scales=scales)
    np.testing.assert_allclose(embed_images(encoder, images, num_workers=0, scales=scales), reference, atol=1e-6)
