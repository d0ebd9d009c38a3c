"""CLIP models saved by Hugging Face transformers (``CLIPModel`` folders: OpenAI's models on the
Hub and their fine-tunes), against transformers' own model, tokenizer and image processor
on a small model built in the test: from a folder, from a Hub on 127.0.0.1 and then offline,
and through ``unicom embed``, ``index`` and ``search``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from unicom.cli import main
from unicom.embed import embed_images, embed_texts
from unicom.errors import InputError
from unicom.models.encoders import load_encoder
from unicom.models.hf_clip import HFClip

from support import class_image, tiny_hf_clip, write_class_folder

TEXTS = ["a cat", "a red dog on a mat", "Ünïcode text ✓ 猫", "a photo of a cat on a mat at night, and a dog"]


def built_model(tmp_path_factory, name: str, build) -> dict:
    """A small transformers model made by ``build(folder)`` (it returns the model, its tokenizer
    and its image processor: the reference) in a fresh folder, and the encoder loaded from it."""
    folder = tmp_path_factory.mktemp(name) / "model"
    model, tokenizer, processor = build(folder)
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "processor": processor,
            "encoder": load_encoder(str(folder))}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return built_model(tmp_path_factory, "hf-clip", tiny_hf_clip)


def features(output) -> torch.Tensor:
    """``get_*_features``' embeddings: a tensor (transformers 4), or its output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_texts(clip, texts: list[str]) -> np.ndarray:
    batch = clip["tokenizer"](texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return features(clip["model"].get_text_features(**batch)).numpy()


def reference_images(entry, images: list[Image.Image]) -> tuple[np.ndarray, torch.Tensor]:
    """transformers' image embeddings of ``images`` (``get_image_features``, or an image
    model's pooled output) and its processor's pixels."""
    pixels = entry["processor"](images=images, return_tensors="pt")["pixel_values"]
    model = entry["model"]
    with torch.no_grad():
        output = model.get_image_features(pixel_values=pixels) if hasattr(model, "get_image_features") \
            else model(pixel_values=pixels)
    return features(output).numpy(), pixels


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def loads_with_its_sizes(entry, kind: type, embedding_dim: int, max_tokens: int) -> None:
    encoder = entry["encoder"]
    assert isinstance(encoder, kind) and encoder.has_text
    assert encoder.embedding_dim == embedding_dim and encoder.max_tokens == max_tokens
    assert encoder.weights_sha256() == load_encoder(str(entry["folder"])).weights_sha256()  # the same at every load


def test_a_folder_loads_as_transformers_clip_with_its_sizes(clip):
    loads_with_its_sizes(clip, HFClip, 16, 16)


def test_texts_embed_as_transformers_embeds_them(clip):
    assert len(clip["tokenizer"](TEXTS[3])["input_ids"]) > 16  # the last one is cut to the positions
    np.testing.assert_allclose(embed_texts(clip["encoder"], TEXTS), unit(reference_texts(clip, TEXTS)), atol=2e-6)


def images_embed_as_transformers_embeds_them(entry, tmp_path, mean: float, most: float) -> torch.Tensor:
    """The network given the processor's pixels gives transformers' embeddings; our transform
    gives pixels within ``mean`` (on average) and ``most`` (at most) of the processor's, and
    ``embed_images`` embeddings of cosine 0.9999 at least with transformers'. Returns the
    processor's pixels."""
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48), (2, 90))]
    images.append(Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None], (50, 1, 3))))
    expected, pixels = reference_images(entry, images)
    with torch.no_grad():  # the network: the processor's pixels give transformers' embeddings
        np.testing.assert_allclose(entry["encoder"].encode_image(pixels).numpy(), expected, atol=1e-5)
    # the preprocessing: PIL's bicubic resize here, torchvision's on tensors in transformers 5's processor
    ours = torch.stack([entry["encoder"].image_transform(image) for image in images])
    difference = (ours - pixels).abs()  # in units of the normalised pixels
    assert ours.shape == pixels.shape and float(difference.mean()) < mean and float(difference.max()) < most
    paths = []
    for number, image in enumerate(images):
        paths.append(tmp_path / f"{number}.png")
        image.save(paths[-1])
    embedded = embed_images(entry["encoder"], [str(path) for path in paths], batch_size=2, num_workers=0)
    assert (np.sum(embedded * unit(expected), axis=1) >= 0.9999).all()
    return pixels


def test_images_embed_as_transformers_embeds_them(clip, tmp_path):
    # CLIP's std of about 0.27: a grey level is about 0.015 of a normalised pixel
    images_embed_as_transformers_embeds_them(clip, tmp_path, mean=1e-3, most=0.05)


def test_the_older_layout_loads_the_same_model(clip, tmp_path):
    """pytorch_model.bin (read with weights_only=True), the positions' ids saved as older
    transformers versions saved them, and no preprocessor_config.json (CLIP's defaults)."""
    import shutil

    from safetensors.torch import load_file

    older = tmp_path / "older"
    shutil.copytree(clip["folder"], older)
    state = load_file(older / "model.safetensors")
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, older / "pytorch_model.bin")
    (older / "model.safetensors").unlink()
    encoder = load_encoder(str(older))
    assert encoder.weights_sha256() == clip["encoder"].weights_sha256()
    np.testing.assert_array_equal(embed_texts(encoder, TEXTS), embed_texts(clip["encoder"], TEXTS))
    (older / "preprocessor_config.json").unlink()
    assert load_encoder(str(older)).image_transform(class_image(0, 0, 300)).shape == (3, 224, 224)


@pytest.mark.parametrize("projected", [True, False], ids=["with-projection", "without"])
def test_a_vision_tower_saved_alone_loads_as_an_image_encoder(clip, tmp_path, projected):
    """CLIPVisionModelWithProjection (CLIP's image embeddings) and CLIPVisionModel (the
    tower's pooled state) folders, as transformers saves a CLIP's vision tower alone."""
    import shutil

    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    from unicom.models.hf_clip import HFImageModel

    tower_class = CLIPVisionModelWithProjection if projected else CLIPVisionModel
    # the CLIP's own vision weights (its vision configuration does not carry the projection's size)
    tower = tower_class.from_pretrained(str(clip["folder"]), **({"projection_dim": 16} if projected else {})).eval()
    tower.save_pretrained(tmp_path / "tower")
    shutil.copy(clip["folder"] / "preprocessor_config.json", tmp_path / "tower")
    encoder = load_encoder(str(tmp_path / "tower"))
    assert isinstance(encoder, HFImageModel) and not encoder.has_text and encoder.embedding_dim == (16 if projected else 32)
    images = [class_image(label, label, 64) for label in range(3)]
    pixels = clip["processor"](images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = tower(pixel_values=pixels)
        expected = output.image_embeds if projected else output.pooler_output
        np.testing.assert_allclose(encoder.encode_image(pixels).numpy(), expected.numpy(), atol=1e-6)
    if projected:  # in the CLIP's space: its image embeddings
        np.testing.assert_allclose(expected.numpy(), reference_images(clip, images)[0], atol=1e-5)


@pytest.mark.slow  # long: the default run stays within its 10 minutes; CI runs it
def test_a_model_saved_in_shards_loads_the_same(clip, tmp_path):
    """transformers' shards (its index, model.safetensors.index.json, as save_pretrained writes
    a model over max_shard_size), from a folder and from the Hub; the older .bin shards too."""
    import shutil

    from safetensors.torch import load_file

    from test_hf_hub import COMMIT

    sharded = tmp_path / "sharded"
    clip["model"].save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(path.name for path in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    for path in clip["folder"].iterdir():
        if not (sharded / path.name).exists() and path.name != "model.safetensors":
            shutil.copy(path, sharded / path.name)
    entry = {**clip, "folder": sharded}
    encoder = load_encoder(str(sharded))
    assert encoder.weights_sha256() == clip["encoder"].weights_sha256()
    np.testing.assert_array_equal(embed_texts(encoder, TEXTS), embed_texts(clip["encoder"], TEXTS))
    hub, _ = from_the_hub_and_then_offline(entry, "openai-like/clip-sharded", reference_texts, tmp_path / "hub")
    assert {path for _, path in hub.requests} >= {  # every shard asked for, of the index's commit
        f"/openai-like/clip-sharded/resolve/{COMMIT}/{name}" for name in ("model.safetensors.index.json", *shards)}
    # the older layout: pytorch_model-*.bin shards and their index
    older = tmp_path / "older"
    shutil.copytree(sharded, older)
    index = json.loads((older / "model.safetensors.index.json").read_text())
    for shard in shards:
        torch.save(load_file(older / shard), older / shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin"))
        (older / shard).unlink()
    index["weight_map"] = {key: value.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                           for key, value in index["weight_map"].items()}
    (older / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (older / "model.safetensors.index.json").unlink()
    assert load_encoder(str(older)).weights_sha256() == clip["encoder"].weights_sha256()


def test_shards_that_do_not_match_their_index_are_named(clip, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    clip["model"].save_pretrained(bad, max_shard_size="40KB")
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "preprocessor_config.json"):
        if (clip["folder"] / name).exists():
            shutil.copy(clip["folder"] / name, bad / name)
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(bad / first)
    dropped = sorted(tensors)[0]
    save_file({key: value for key, value in tensors.items() if key != dropped}, bad / first)
    with pytest.raises(InputError, match=rf"model.safetensors.index.json .*missing keys: {re.escape(dropped)}"):
        load_encoder(str(bad))
    save_file(tensors, bad / first)
    (bad / first).rename(bad / "elsewhere.safetensors")
    with pytest.raises(InputError, match=rf"its shard {first} is not in"):
        load_encoder(str(bad))
    (bad / "elsewhere.safetensors").rename(bad / first)
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], dropped: "../" + first}}))
    with pytest.raises(InputError, match=r"is not a file name beside the index"):
        load_encoder(str(bad))
    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(InputError, match=r"no weight_map"):
        load_encoder(str(bad))


def test_a_folder_that_cannot_be_read_is_named(clip, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(clip["folder"], bad)
    state = load_file(bad / "model.safetensors")
    save_file({**state, "text_projection.weight": torch.zeros(8, 32)}, bad / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors .*wrong shapes.*text_projection.weight"):
        load_encoder(str(bad))
    (bad / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        load_encoder(str(bad))
    save_file(state, bad / "model.safetensors")
    processor = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**processor, "do_center_crop": False}))
    with pytest.raises(InputError, match="do_center_crop false"):
        load_encoder(str(bad))
    (bad / "preprocessor_config.json").write_text(json.dumps({**processor, "crop_size": {"height": 32, "width": 24}}))
    with pytest.raises(InputError, match="read are a square crop"):
        load_encoder(str(bad))


HUB_LOAD = """
import sys
import numpy as np
from unicom.embed import embed_texts
from unicom.models.encoders import load_encoder

encoder = load_encoder(sys.argv[-2])
print(type(encoder).__name__, encoder.image_transform.transforms[0].size)
np.save(sys.argv[-1], embed_texts(encoder, ["a cat", "a red dog"]))
"""


def from_the_hub_and_then_offline(entry, repo: str, reference_texts, tmp_path) -> tuple:
    """The model folder of ``entry`` published as ``repo`` on a Hub served here, loaded by
    ``hf-hub:REPO`` in a child process and then again offline: the same text embeddings as
    transformers' both times. Returns the Hub (its requests) and what the first run printed
    (the encoder's class and its first resize)."""
    from test_hf_hub import online_then_offline

    files = {path.name: path.read_bytes() for path in entry["folder"].iterdir() if path.is_file()}
    hub, ((online, said), (offline, _)) = online_then_offline({repo: files}, HUB_LOAD, [f"hf-hub:{repo}"], tmp_path)
    np.testing.assert_allclose(online, unit(reference_texts(entry, ["a cat", "a red dog"])), atol=2e-6)
    np.testing.assert_array_equal(offline, online)  # the second run, the Hub gone
    return hub, said


@pytest.mark.slow
def test_a_repository_on_the_hub_loads_and_then_loads_offline(clip, tmp_path):
    _, said = from_the_hub_and_then_offline(clip, "openai-like/clip-tiny", reference_texts, tmp_path)
    assert said.startswith("HFClip 40")  # its preprocessor_config.json came with it


def embed_index_and_search(entry, reference_texts, tmp_path, capsys) -> None:
    """``unicom embed`` of a class folder with the model folder, ``index`` and ``search --text``:
    the hits are the brute-force ranking of the stored embeddings by transformers' text embedding."""
    write_class_folder(tmp_path / "images", [0, 1, 2], 4)
    assert main(["embed", "--input", str(tmp_path / "images"), "--model", str(entry["folder"]), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32", "--workers", "0"]) == 0
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--type", "flat"]) == 0
    capsys.readouterr()
    stored = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    # the model recorded by embed is loaded again by search, its weights checked
    assert main(["search", "--index", str(tmp_path / "index"), "--text", "a red dog", "-k", "4", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    query = unit(reference_texts(entry, ["a red dog"]))[0]
    assert [hit["id"] for hit in hits] == np.argsort(-(unit(stored) @ query), kind="stable")[:4].tolist()


def test_embed_index_and_search_with_a_transformers_clip_folder(clip, tmp_path, capsys):
    embed_index_and_search(clip, reference_texts, tmp_path, capsys)


SUBFOLDER_LOAD = """
import sys
import numpy as np
import torch
from PIL import Image
from unicom.errors import InputError
from unicom.models.encoders import load_encoder

spec = sys.argv[-2]
encoder = load_encoder(spec)
images = [Image.new("RGB", (50 + 10 * i, 40), (40 * i, 200 - 30 * i, 90)) for i in range(3)]
for wrong in (spec.rsplit("/", 1)[0] + "/text_encoder", spec.split("/models/")[0]):
    try:
        load_encoder(wrong)
    except InputError as error:
        print(str(error).splitlines()[0])
print(load_encoder(spec.split("/models/")[0] + "/search/unicom").weights_sha256())
print(type(encoder).__name__, encoder.embedding_dim)
with torch.no_grad():
    np.save(sys.argv[-1], encoder.encode_image(torch.stack([encoder.image_transform(image) for image in images])).numpy())
"""


@pytest.mark.slow
def test_a_model_in_a_folder_of_a_hub_repository_loads_and_then_loads_offline(clip, tmp_path):
    """``hf-hub:org/repo/models/image_encoder``: a CLIP vision tower kept in a folder of a larger
    repository (as image-generation pipelines keep their image encoders), its files of one commit,
    online and then offline, and a unicom model folder in another folder of it; a folder without a
    model, and the repository's root, are named."""
    import shutil

    from transformers import CLIPVisionModelWithProjection

    from test_hf_hub import online_then_offline
    from unicom.models import export
    from unicom.models.registry import clip_preprocess
    from unicom.models.vit import ClipViT, ClipViTSettings

    CLIPVisionModelWithProjection.from_pretrained(str(clip["folder"]), projection_dim=16).save_pretrained(tmp_path / "tower")
    shutil.copy(clip["folder"] / "preprocessor_config.json", tmp_path / "tower")
    files = {f"models/image_encoder/{path.name}": path.read_bytes() for path in (tmp_path / "tower").iterdir()}
    files.update({"README.md": b"a pipeline", "models/text_encoder/notes.txt": b"no model here"})
    # and a unicom model folder under search/unicom/
    torch.manual_seed(0)
    settings = ClipViTSettings(image_size=32, patch_size=8, width=64, depth=2, heads=2, embedding_dim=24)
    export.save_model(tmp_path / "unicom", ClipViT(settings).eval(), "clip_vit", settings, clip_preprocess(32))
    files.update({f"search/unicom/{path.name}": path.read_bytes() for path in (tmp_path / "unicom").iterdir()})
    hub, ((online, said), (offline, said_offline)) = online_then_offline(
        {"org/pipeline": files}, SUBFOLDER_LOAD, ["hf-hub:org/pipeline/models/image_encoder"], tmp_path)
    local = load_encoder(str(tmp_path / "tower"))
    images = [Image.new("RGB", (50 + 10 * i, 40), (40 * i, 200 - 30 * i, 90)) for i in range(3)]
    with torch.no_grad():
        expected = local.encode_image(torch.stack([local.image_transform(image) for image in images])).numpy()
    np.testing.assert_allclose(online, expected, atol=1e-6)
    np.testing.assert_array_equal(offline, online)
    assert said.splitlines()[-1] == "HFImageModel 16"
    assert said.splitlines()[-2] == load_encoder(str(tmp_path / "unicom")).weights_sha256()
    assert said.splitlines()[1].startswith("hf-hub:org/pipeline: the repository holds no unicom model folder "
                                           "(unicom_model.json), no transformers model read here (config.json of "
                                           "model type clip, siglip, ")
    assert said.splitlines()[1].endswith("and no open_clip model (open_clip_config.json); a timm repository is "
                                         "timm/hf-hub:org/pipeline, a model in a folder of it hf-hub:org/pipeline/<folder>")
    assert said.splitlines()[0] == ("hf-hub:org/pipeline/models/text_encoder: the folder models/text_encoder of "
                                    "org/pipeline holds neither a unicom model folder (unicom_model.json) nor a "
                                    "transformers model read here (config.json of model type clip, siglip, dinov2, "
                                    "dinov2_with_registers, clip_vision_model, siglip_vision_model, siglip2, "
                                    "siglip2_vision_model, chinese_clip, altclip, align, metaclip_2, blip, "
                                    "vision-text-dual-encoder, aimv2, aimv2_vision_model)")
    fetched = {path.split("/resolve/")[1].split("/", 1)[1] for method, path in hub.requests}
    assert "models/image_encoder/model.safetensors" in fetched and "model.safetensors" not in fetched
    assert said_offline.splitlines()[-1] == "HFImageModel 16"


def test_a_hub_spec_names_a_repository_and_a_folder_in_it():
    from unicom.models.hub import split_hf_spec

    assert split_hf_spec("hf-hub:org/repo") == ("org/repo", "", None)
    assert split_hf_spec("hf-hub:org/repo/models/image_encoder@v1") == ("org/repo", "models/image_encoder", "v1")
    assert split_hf_spec("hf-hub:org/repo@refs/pr/3") == ("org/repo", "", "refs/pr/3")
    for wrong in ("hf-hub:org", "hf-hub:org//x", "hf-hub:org/repo/../other", "hf-hub:org/repo/"):
        with pytest.raises(InputError, match=r"expected hf-hub:<owner>/<repository>\[/<folder>\]\[@<revision>\]"):
            split_hf_spec(wrong)


def sentence_transformers_clip(clip, folder, *more: dict):
    """``clip``'s folder as sentence-transformers lays out its CLIP models in ``folder``:
    ``0_CLIPModel/`` and ``modules.json`` naming it, then the modules ``more``."""
    import shutil

    shutil.copytree(clip["folder"], folder / "0_CLIPModel")
    modules = [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]
    modules += [{"idx": i + 1, "name": str(i + 1), **module} for i, module in enumerate(more)]
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


@pytest.mark.parametrize("more", [[], [{"path": "1_Normalize", "type": "sentence_transformers.models.Normalize"}]])
def test_a_sentence_transformers_clip_embeds_as_sentence_transformers_embeds(clip, tmp_path, more):
    from sentence_transformers import SentenceTransformer

    folder = sentence_transformers_clip(clip, tmp_path / "st", *more)
    encoder = load_encoder(str(folder))
    assert encoder.weights_sha256() == clip["encoder"].weights_sha256()
    reference = SentenceTransformer(str(folder), device="cpu")
    texts = TEXTS[:3]
    np.testing.assert_allclose(embed_texts(encoder, texts), reference.encode(texts, normalize_embeddings=True),
                               atol=2e-6)
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48), (2, 90))]
    for number, image in enumerate(images):
        image.save(tmp_path / f"{number}.png")
    embedded = embed_images(encoder, [str(tmp_path / f"{n}.png") for n in range(3)], batch_size=2, num_workers=0)
    expected = reference.encode(images, normalize_embeddings=True)
    assert (np.sum(embedded * expected, axis=1) >= 0.9999).all()


def test_a_sentence_transformers_model_of_other_modules_is_not_taken_for_its_clip(clip, tmp_path):
    folder = sentence_transformers_clip(clip, tmp_path / "st", {"path": "1_Pooling",
                                                                 "type": "sentence_transformers.models.Pooling"})
    with pytest.raises(InputError, match="not a unicom model folder"):
        load_encoder(str(folder))


SENTENCE_HUB_LOAD = """
import sys
import numpy as np
import torch
from PIL import Image
from unicom.models.encoders import load_encoder

encoder = load_encoder(sys.argv[-2])
print(encoder.name)
images = [Image.new("RGB", (50 + 10 * i, 40), (40 * i, 200 - 30 * i, 90)) for i in range(3)]
with torch.no_grad():
    np.save(sys.argv[-1], encoder.encode_image(torch.stack([encoder.image_transform(image) for image in images])).numpy())
"""


@pytest.mark.slow
def test_a_sentence_transformers_clip_repository_loads_online_and_offline(clip, tmp_path):
    """``hf-hub:sentence-transformers/clip-ViT-B-32``'s layout: its CLIPModel folder is loaded."""
    from test_hf_hub import online_then_offline

    folder = sentence_transformers_clip(clip, tmp_path / "st")
    files = {"modules.json": (folder / "modules.json").read_bytes(), "README.md": b"a sentence-transformers model"}
    files.update({f"0_CLIPModel/{path.name}": path.read_bytes() for path in (folder / "0_CLIPModel").iterdir()})
    _, ((online, said), (offline, said_offline)) = online_then_offline(
        {"org/st-clip": files}, SENTENCE_HUB_LOAD, ["hf-hub:org/st-clip"], tmp_path)
    images = [Image.new("RGB", (50 + 10 * i, 40), (40 * i, 200 - 30 * i, 90)) for i in range(3)]
    encoder = clip["encoder"]
    with torch.no_grad():
        expected = encoder.encode_image(torch.stack([encoder.image_transform(image) for image in images])).numpy()
    np.testing.assert_allclose(online, expected, atol=1e-6)
    np.testing.assert_array_equal(offline, online)
    assert said.strip() == said_offline.strip() == "transformers CLIP hf-hub:org/st-clip/0_CLIPModel"
