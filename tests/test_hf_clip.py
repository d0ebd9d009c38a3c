"""CLIP models saved by Hugging Face transformers (``CLIPModel`` folders: OpenAI's models on the
Hub and their fine-tunes), against transformers' own model, tokenizer and image processor
on a small model built in the test: from a folder, from a Hub on 127.0.0.1 and then offline,
and through ``unicom embed``, ``index`` and ``search``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-clip") / "model"
    model, tokenizer, processor = tiny_hf_clip(folder)
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "processor": processor,
            "encoder": load_encoder(str(folder))}


def features(output) -> torch.Tensor:
    """``get_*_features``' embeddings: a tensor (transformers 4), or its output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_texts(clip, texts: list[str]) -> np.ndarray:
    batch = clip["tokenizer"](texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return features(clip["model"].get_text_features(**batch)).numpy()


def reference_images(clip, images: list[Image.Image]) -> tuple[np.ndarray, torch.Tensor]:
    pixels = clip["processor"](images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return features(clip["model"].get_image_features(pixel_values=pixels)).numpy(), pixels


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_a_folder_loads_as_transformers_clip_with_its_sizes(clip):
    encoder = clip["encoder"]
    assert isinstance(encoder, HFClip) and encoder.has_text
    assert encoder.embedding_dim == 16 and encoder.max_tokens == 16
    assert encoder.weights_sha256() == load_encoder(str(clip["folder"])).weights_sha256()  # the same at every load


def test_texts_embed_as_transformers_embeds_them(clip):
    assert len(clip["tokenizer"](TEXTS[3])["input_ids"]) > 16  # the last one is cut to the positions
    np.testing.assert_allclose(embed_texts(clip["encoder"], TEXTS), unit(reference_texts(clip, TEXTS)), atol=2e-6)


def test_images_embed_as_transformers_embeds_them(clip, tmp_path):
    images = [class_image(label, label, size) for label, size in ((0, 64), (1, 48), (2, 90))]
    images.append(Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None], (50, 1, 3))))
    expected, pixels = reference_images(clip, images)
    with torch.no_grad():  # the network: the processor's pixels give transformers' embeddings
        np.testing.assert_allclose(clip["encoder"].encode_image(pixels).numpy(), expected, atol=1e-5)
    # the preprocessing: PIL's bicubic resize here, torchvision's on tensors in transformers 5's processor
    ours = torch.stack([clip["encoder"].image_transform(image) for image in images])
    difference = (ours - pixels).abs()  # in units of the normalised pixels: a grey level is about 0.015
    assert ours.shape == pixels.shape and float(difference.mean()) < 1e-3 and float(difference.max()) < 0.05
    paths = []
    for number, image in enumerate(images):
        paths.append(tmp_path / f"{number}.png")
        image.save(paths[-1])
    embedded = embed_images(clip["encoder"], [str(path) for path in paths], batch_size=2, num_workers=0)
    assert (np.sum(embedded * unit(expected), axis=1) >= 0.9999).all()


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

encoder = load_encoder("hf-hub:openai-like/clip-tiny")
print(type(encoder).__name__, encoder.image_transform.transforms[0].size)
np.save(sys.argv[-1], embed_texts(encoder, ["a cat", "a red dog"]))
"""


def test_a_repository_on_the_hub_loads_and_then_loads_offline(clip, tmp_path):
    from test_hf_hub import Hub

    files = {path.name: path.read_bytes() for path in clip["folder"].iterdir() if path.is_file()}
    hub = Hub({"openai-like/clip-tiny": files})
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for name in ("UNICOM_OFFLINE", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)

    def run(name: str, env: dict) -> tuple[np.ndarray, str]:
        result = subprocess.run([sys.executable, "-c", HUB_LOAD, str(tmp_path / name)], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return np.load(tmp_path / name), result.stdout

    try:
        online, said = run("online.npy", env)
    finally:
        hub.close()
    assert said.startswith("HFClip 40")  # its preprocessor_config.json came with it
    offline, _ = run("offline.npy", {**env, "UNICOM_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})  # the Hub is gone
    np.testing.assert_allclose(online, unit(reference_texts(clip, ["a cat", "a red dog"])), atol=2e-6)
    np.testing.assert_array_equal(offline, online)


def test_embed_index_and_search_with_a_transformers_clip_folder(clip, tmp_path, capsys):
    write_class_folder(tmp_path / "images", [0, 1, 2], 4)
    assert main(["embed", "--input", str(tmp_path / "images"), "--model", str(clip["folder"]), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32", "--workers", "0"]) == 0
    assert main(["index", "--emb", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--type", "flat"]) == 0
    capsys.readouterr()
    stored = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    # the model recorded by embed is loaded again by search, its weights checked
    assert main(["search", "--index", str(tmp_path / "index"), "--text", "a red dog", "-k", "4", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    query = unit(reference_texts(clip, ["a red dog"]))[0]
    assert [hit["id"] for hit in hits] == np.argsort(-(unit(stored) @ query), kind="stable")[:4].tolist()
