"""``unicom convert unicom-to-onnx``: a model's image encoder as one ONNX file, run by
onnxruntime (an independent runtime) on images prepared by the model's transform, against
``unicom.embed_images`` of the same images: CLIP-shaped ViTs, the released network and a
UniFEx model (a frozen timm backbone and its neck); any batch size; written to object storage;
refusals. Text towers against open_clip's and transformers' own text embeddings of the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import class_image

from unicom.cli import main
from unicom.embed import embed_images
from unicom.models import export
from unicom.models.registry import clip_preprocess

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZES = dict(image_size=32, patch_size=8, width=64, depth=2, heads=2, embedding_dim=24)


def clip_vit_folder(folder):
    from unicom.models.vit import ClipViT, ClipViTSettings

    torch.manual_seed(0)
    settings = ClipViTSettings(**SIZES)
    return export.save_model(folder, ClipViT(settings).eval(), "clip_vit", settings, clip_preprocess(32))


def released_folder(folder):
    from unicom.models.unicom_vit import build_unicom_vit

    torch.manual_seed(1)
    return export.save_model(folder, build_unicom_vit(SIZES).eval(), "unicom_vit", SIZES, clip_preprocess(32))


def unifex_folder(folder):
    """A UniFEx model: timm's test ViT (random weights, seeded) frozen, a linear neck to 8 dimensions."""
    from unicom.models.encoders import load_encoder
    from unicom.unifex.model import LinearNeck, describe_transform, unifex_settings

    backbone = load_encoder("timm/test_vit")
    settings = unifex_settings("timm/test_vit", None, backbone.embedding_dim,
                               {"kind": "linear", "embedding_dim": 8, "batchnorm": False})
    torch.manual_seed(2)
    neck = LinearNeck(backbone.embedding_dim, 8, batchnorm=False)
    return export.save_model(folder, {f"neck.{k}": v for k, v in neck.state_dict().items()}, "unifex", settings,
                             describe_transform(backbone.image_transform), embedding_dim=8)


def onnx_embeddings(path, transform, images) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = torch.stack([transform(image) for image in images]).numpy()
    return session.run(["embeddings"], {"pixels": pixels})[0]


@pytest.mark.filterwarnings("ignore:timm/test_vit. no --pretrained given")  # the UniFEx backbone's random weights
@pytest.mark.parametrize("make", [clip_vit_folder, released_folder, unifex_folder], ids=["clip_vit", "released", "unifex"])
def test_the_onnx_graph_gives_the_embeddings_of_unicom_embed(tmp_path, capsys, make):
    import onnx

    import unicom

    folder = make(tmp_path / "model")
    assert main(["convert", "unicom-to-onnx", str(folder), str(tmp_path / "model.onnx")]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {tmp_path / 'model.onnx'} (") and "checked with onnxruntime" in said
    images = [class_image(label, label, size) for label, size in ((0, 40), (1, 64), (2, 90))]
    paths = []
    for number, image in enumerate(images):
        paths.append(tmp_path / f"{number}.png")
        image.save(paths[-1])
    expected = embed_images(str(folder), [str(path) for path in paths], num_workers=0)
    _, transform = unicom.load(str(folder))
    for batch in (images[:1], images):  # the batch size is free
        np.testing.assert_allclose(onnx_embeddings(tmp_path / "model.onnx", transform, batch), expected[:len(batch)],
                                   atol=2e-5)
    properties = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert properties["embedding_dim"] == str(expected.shape[1]) and "Normalize" in properties["transform"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_onnx_file_is_written_to_object_storage_whole(s3, tmp_path, capsys):
    folder = clip_vit_folder(tmp_path / "model")
    s3.bucket("models")
    assert main(["convert", "unicom-to-onnx", str(folder), "s3://models/vit/model.onnx"]) == 0
    assert s3.keys("models") == ["vit/model.onnx"]
    (tmp_path / "fetched.onnx").write_bytes(s3.get("models", "vit/model.onnx"))
    import unicom

    _, transform = unicom.load(str(folder))
    image = class_image(3, 3, 50)
    image.save(tmp_path / "a.png")
    np.testing.assert_allclose(onnx_embeddings(tmp_path / "fetched.onnx", transform, [image]),
                               embed_images(str(folder), [str(tmp_path / "a.png")], num_workers=0), atol=2e-5)


def test_what_cannot_be_exported_is_refused_before_writing(tmp_path, capsys):
    folder = clip_vit_folder(tmp_path / "model")
    assert main(["convert", "unicom-to-onnx", str(folder), str(tmp_path / "model.bin")]) == 2
    assert "model.bin: name the ONNX file to write with its suffix, .onnx" in capsys.readouterr().err
    (tmp_path / "there.onnx").write_bytes(b"an older file")
    assert main(["convert", "unicom-to-onnx", str(folder), str(tmp_path / "there.onnx")]) == 2
    assert "there.onnx exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "there.onnx").read_bytes() == b"an older file"
    assert main(["convert", "unicom-to-onnx", str(folder), str(tmp_path / "there.onnx"), "--overwrite"]) == 0
    assert main(["convert", "unicom-to-onnx", str(tmp_path / "missing"), str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()
    script = ("import sys; sys.modules['onnxscript'] = None\n"
              "from unicom.cli import main\n"
              "sys.exit(main(['convert', 'unicom-to-onnx', sys.argv[1], sys.argv[2]]))")
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "n.onnx")], capture_output=True,
                            text=True, env=dict(os.environ), timeout=120)
    assert result.returncode == 2 and "pip install 'unicom[onnx]'" in result.stderr


def image_files(tmp_path, count: int = 3) -> tuple[list, list[str]]:
    images = [class_image(label, label, size) for label, size in ((0, 40), (1, 64), (2, 90), (3, 50))[:count]]
    paths = []
    for number, image in enumerate(images):
        paths.append(str(tmp_path / f"{number}.png"))
        image.save(paths[-1])
    return images, paths


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_timm_network_exports_with_its_weights_mirror_and_scales(tmp_path, capsys):
    import json

    import onnx
    import timm

    from unicom.models.encoders import load_encoder

    torch.manual_seed(4)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "resnet.pth")
    assert main(["convert", "unicom-to-onnx", "timm/test_resnet", str(tmp_path / "r.onnx"), "--pretrained",
                 str(tmp_path / "resnet.pth"), "--flip", "--scales", "1,0.7071"]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    encoder = load_encoder("timm/test_resnet", str(tmp_path / "resnet.pth"))
    images, paths = image_files(tmp_path)
    expected = embed_images(encoder, paths, num_workers=0, flip=True, scales=(1, 0.7071))
    np.testing.assert_allclose(onnx_embeddings(tmp_path / "r.onnx", encoder.image_transform, images), expected,
                               atol=2e-5)
    plain = embed_images(encoder, paths, num_workers=0)
    assert (np.linalg.norm(plain - expected, axis=1) > 1e-3).all()  # the views are in the graph
    properties = {p.key: p.value for p in onnx.load(str(tmp_path / "r.onnx")).metadata_props}
    assert json.loads(properties["flip"]) is True and json.loads(properties["scales"]) == [1.0, 0.7071]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["open_clip", "unicom train"])
def test_vits_export_their_multi_scale_embeddings(family, tmp_path, capsys):
    """An open_clip ViT and a ViT of ``unicom train`` at scales whose sides are no multiple of
    the patch (22 px of 32, 8-px patches): the graph's position embeddings resampled per scale,
    onnxruntime's embeddings ``unicom embed --scales``' own."""
    from support import tiny_open_clip

    from unicom.models.encoders import load_encoder

    if family == "open_clip":
        spec = tiny_open_clip(tmp_path / "clip")
    else:
        from unicom.models.export import save_model
        from unicom.models.registry import clip_preprocess
        from unicom.models.vit import ClipViT, ClipViTSettings

        settings = ClipViTSettings(image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=8)
        torch.manual_seed(6)
        spec = str(save_model(tmp_path / "model", ClipViT(settings), "clip_vit", settings, clip_preprocess(32)))
    assert main(["convert", "unicom-to-onnx", spec, str(tmp_path / "v.onnx"), "--scales", "1,0.7071,0.5"]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    encoder = load_encoder(spec)
    images, paths = image_files(tmp_path)
    expected = embed_images(encoder, paths, num_workers=0, scales=(1, 0.7071, 0.5))
    np.testing.assert_allclose(onnx_embeddings(tmp_path / "v.onnx", encoder.image_transform, images), expected,
                               atol=2e-5)
    assert (np.linalg.norm(embed_images(encoder, paths, num_workers=0) - expected, axis=1) > 2e-4).all()  # the views


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_an_open_clip_and_a_transformers_clip_export_their_image_towers(tmp_path, capsys):
    from support import tiny_hf_clip, tiny_open_clip

    from unicom.models.encoders import load_encoder

    images, paths = image_files(tmp_path)
    spec = tiny_open_clip(tmp_path / "open_clip")
    tiny_hf_clip(tmp_path / "hf_clip")
    for model, name in ((spec, "oc.onnx"), (str(tmp_path / "hf_clip"), "hf.onnx")):
        assert main(["convert", "unicom-to-onnx", model, str(tmp_path / name)]) == 0
        encoder = load_encoder(model)
        np.testing.assert_allclose(onnx_embeddings(tmp_path / name, encoder.image_transform, images),
                                   embed_images(encoder, paths, num_workers=0), atol=2e-5)
    capsys.readouterr()
    # the image tower alone: the tiny CLIP's text tower holds 12.6 MB of token embeddings, not in the file
    assert (tmp_path / "oc.onnx").stat().st_size < 2 * 2**20


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_weights_beyond_one_file_are_kept_beside_the_graph(s3, tmp_path, capsys):
    from unicom.models.encoders import load_encoder
    from unicom.models.onnx_export import export_onnx

    folder = clip_vit_folder(tmp_path / "model")
    encoder = load_encoder(str(folder))
    images, paths = image_files(tmp_path, 2)
    expected = embed_images(encoder, paths, num_workers=0)
    # past the limit of one file (lowered here from 2 GiB), the weights go to OUTPUT.data
    done = export_onnx(str(folder), tmp_path / "big.onnx", external_above=10_000)
    assert done["data"] == f"{tmp_path / 'big.onnx'}.data" and done["weights_bytes"] > 10_000
    sizes = [(tmp_path / name).stat().st_size for name in ("big.onnx", "big.onnx.data")]
    assert sizes[1] >= 0.99 * done["weights_bytes"] and sum(sizes) == done["bytes"]  # all but a few 256-byte tensors
    np.testing.assert_allclose(onnx_embeddings(tmp_path / "big.onnx", encoder.image_transform, images), expected,
                               atol=2e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("big")) == ["big.onnx", "big.onnx.data"]
    # asked for, and written to object storage: both files
    s3.bucket("split")
    assert main(["convert", "unicom-to-onnx", str(folder), "s3://split/v/m.onnx", "--external-data"]) == 0
    assert "the weights in s3://split/v/m.onnx.data" in capsys.readouterr().out
    assert s3.keys("split") == ["v/m.onnx", "v/m.onnx.data"]
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        (fetched / name).write_bytes(s3.get("split", f"v/{name}"))
    np.testing.assert_allclose(onnx_embeddings(fetched / "m.onnx", encoder.image_transform, images), expected,
                               atol=2e-5)


def text_session_embeddings(path, tokens: dict) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {name: value.numpy() for name, value in tokens.items()})[0]


def normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.detach().float(), dim=-1).numpy()


TEXTS = ["a photo of a cat", "a red car beside a tall house", "dogs"]


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_text_towers_export_with_their_tokens_as_inputs(tmp_path, capsys):
    """onnxruntime against the models' own libraries: open_clip's tokenizer and encode_text, transformers'
    tokenizer and get_text_features (SigLIP: its canonical texts padded to the context)."""
    import onnx
    import open_clip
    from support import tiny_hf_chinese_clip, tiny_hf_clip, tiny_hf_siglip
    from open_clip.tokenizer import canonicalize_text
    from support import tiny_open_clip

    spec = tiny_open_clip(tmp_path / "open_clip")
    assert main(["convert", "unicom-to-onnx", spec, str(tmp_path / "oc.onnx"), "--tower", "text"]) == 0
    assert "input_ids (batch, 77) int64 of the open_clip.get_tokenizer(" in capsys.readouterr().out
    model = open_clip.create_model(spec).eval()
    ids = open_clip.get_tokenizer(spec)(TEXTS)
    with torch.no_grad():
        expected = normalised(model.encode_text(ids))
    np.testing.assert_allclose(text_session_embeddings(tmp_path / "oc.onnx", {"input_ids": ids}), expected, atol=2e-6)

    references = {"hf": tiny_hf_clip(tmp_path / "hf"), "siglip": tiny_hf_siglip(tmp_path / "siglip"),
                  "chinese": tiny_hf_chinese_clip(tmp_path / "chinese")}
    texts = {"hf": TEXTS, "siglip": [canonicalize_text(t) for t in TEXTS], "chinese": ["一只猫的照片", "红色的房子", "狗"]}
    inputs = {"hf": ["input_ids", "attention_mask"], "siglip": ["input_ids"],
              "chinese": ["input_ids", "attention_mask", "token_type_ids"]}
    for name, (model, tokenizer, _) in references.items():
        assert main(["convert", "unicom-to-onnx", str(tmp_path / name), str(tmp_path / f"{name}.onnx"), "--tower",
                     "text"]) == 0
        assert "-> L2-normalised" in capsys.readouterr().out
        padding = {"padding": "max_length", "max_length": 16} if name == "siglip" else {"padding": True}
        batch = tokenizer(texts[name], return_tensors="pt", truncation=True, **padding)
        given = {key: batch[key] for key in inputs[name]}  # SigLIP: the ids alone, as it was trained
        with torch.no_grad():
            output = model.get_text_features(**given)
        expected = normalised(output if isinstance(output, torch.Tensor) else output.pooler_output)
        np.testing.assert_allclose(text_session_embeddings(tmp_path / f"{name}.onnx", given), expected, atol=2e-6)
        for one in range(len(texts[name])):  # a text alone: its own length (padded to the longest, or the context)
            alone = tokenizer(texts[name][one:one + 1], return_tensors="pt", truncation=True, **padding)
            got = text_session_embeddings(tmp_path / f"{name}.onnx", {key: alone[key] for key in inputs[name]})
            np.testing.assert_allclose(got[0], expected[one], atol=2e-6)
        properties = {p.key: p.value for p in onnx.load(str(tmp_path / f"{name}.onnx")).metadata_props}
        assert properties["tower"] == "text" and json.loads(properties["inputs"]) == inputs[name]
        assert properties["length"] == ("16" if name == "siglip" else "free")
        assert properties["tokenizer"].startswith(f"transformers {type(tokenizer).__name__} of ")


def test_a_text_tower_that_is_not_there_or_with_image_views_is_refused(tmp_path, capsys):
    with pytest.warns(UserWarning, match="timm/test_vit: no --pretrained given, the model has random weights"):
        assert main(["convert", "unicom-to-onnx", "timm/test_vit", str(tmp_path / "t.onnx"), "--tower", "text"]) == 2
    assert "has no text tower to export" in capsys.readouterr().err
    assert main(["convert", "unicom-to-onnx", "timm/test_vit", str(tmp_path / "t.onnx"), "--tower", "text",
                 "--flip"]) == 2
    assert "--flip and --scales are views of images; a text tower has none" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
