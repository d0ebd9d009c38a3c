"""``unicom.embed_images``: order kept, rows normalised, failures named, specs or encoders."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from support import class_image, encode_image, random_unicom_vit

import unicom
from unicom.errors import InputError
from unicom.models.encoders import load_encoder


@pytest.fixture(scope="module")
def encoder_and_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return load_encoder("timm/test_vit", str(path)), path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(7):
        path = folder / (f"{i}.jpg" if i % 2 else f"{i}.png")
        path.write_bytes(encode_image(class_image(i, i, 48), "JPEG" if i % 2 else "PNG"))
        paths.append(path)
    return paths


def _reference(encoder, images):
    with torch.no_grad():
        features = encoder.encode_image(torch.stack([encoder.image_transform(i) for i in images]))
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_rows_follow_the_input_order_with_any_workers_and_batches(encoder_and_file, image_files):
    encoder, _ = encoder_and_file
    from PIL import Image

    expected = _reference(encoder, [Image.open(p).convert("RGB") for p in image_files])
    for workers, batch_size in ((0, 7), (2, 2), (1, 3)):
        got = unicom.embed_images(encoder, image_files, batch_size=batch_size, num_workers=workers)
        assert got.shape == (7, encoder.embedding_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_pil_images_strings_and_a_spec_with_weights(encoder_and_file, image_files):
    encoder, path = encoder_and_file
    from_paths = unicom.embed_images(encoder, [str(p) for p in image_files[:3]])
    from_spec = unicom.embed_images("timm/test_vit", image_files[:3], pretrained=str(path), device="cpu")
    np.testing.assert_array_equal(from_paths, from_spec)
    images = [class_image(9, i, 40) for i in range(2)]
    np.testing.assert_allclose(unicom.embed_images(encoder, images), _reference(encoder, images), atol=1e-5)


def test_a_model_folder_written_again_is_loaded_again(image_files, tmp_path):
    from unicom.models.export import save_model
    from unicom.models.registry import clip_preprocess
    from unicom.models.unicom_vit import ViTSettings

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=2, heads=1, mlp_dim=256, embedding_dim=24)
    folder = tmp_path / "model"
    embeddings = []
    for seed in (0, 1):  # the same folder trained on, as `unicom train` exports it again
        save_model(folder, random_unicom_vit(settings, seed), "unicom_vit", settings, clip_preprocess(32))
        embeddings.append(unicom.embed_images(str(folder), image_files[:2], device="cpu"))
        fresh = unicom.embed_images(load_encoder(str(folder)), image_files[:2], device="cpu")
        np.testing.assert_array_equal(embeddings[-1], fresh)
    assert not np.allclose(embeddings[0], embeddings[1])


def test_a_model_folder_and_weights_file_may_be_given_as_paths(image_files, tmp_path, encoder_and_file):
    from unicom.embed import embed_to_folder
    from unicom.formats.embeddings import read_config
    from unicom.models.export import save_model
    from unicom.models.registry import clip_preprocess
    from unicom.models.unicom_vit import ViTSettings

    settings = ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=64, embedding_dim=8)
    save_model(tmp_path / "model", random_unicom_vit(settings), "unicom_vit", settings, clip_preprocess(32))
    by_path = unicom.embed_images(tmp_path / "model", image_files[:2], device="cpu")
    np.testing.assert_array_equal(by_path, unicom.embed_images(str(tmp_path / "model"), image_files[:2], device="cpu"))
    _, weights = encoder_and_file
    np.testing.assert_array_equal(unicom.embed_images("timm/test_vit", image_files[:1], pretrained=weights, device="cpu"),
                                  unicom.embed_images(encoder_and_file[0], image_files[:1]))
    embed_to_folder([str(image_files[0].parent)], tmp_path / "emb", tmp_path / "model", num_workers=0, device="cpu")
    assert read_config(tmp_path / "emb")["model"] == str(tmp_path / "model")  # the folder, not its name
    with pytest.raises(InputError, match="gone"):
        load_encoder(tmp_path / "gone")


def test_an_open_clip_local_dir_written_again_is_loaded_again(image_files, tmp_path):
    from support import tiny_open_clip

    spec = tiny_open_clip(tmp_path / "clip")
    before = unicom.embed_images(spec, image_files[:1], device="cpu")
    weights = tmp_path / "clip" / "open_clip_pytorch_model.bin"
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in torch.load(weights).items()}, weights)
    after = unicom.embed_images(spec, image_files[:1], device="cpu")
    np.testing.assert_array_equal(after, unicom.embed_images(load_encoder(spec), image_files[:1]))
    assert not np.allclose(before, after)


def test_a_device_that_is_not_one_is_named(encoder_and_file, image_files):
    encoder, _ = encoder_and_file
    with pytest.raises(InputError, match=r"device='gpu': not a torch device"):
        unicom.embed_images(encoder, image_files[:1], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"device='cuda' but CUDA is not available; use device=cpu"):
            unicom.embed_images("timm/test_vit", image_files[:1], device="cuda")


@pytest.mark.parametrize("load", [unicom.load, unicom.load_encoder])
def test_loading_onto_a_device_that_is_not_one_is_named(load):
    with pytest.raises(InputError, match=r"device='gpu': not a torch device"):
        load("timm/test_vit" if load is unicom.load_encoder else "ViT-B/32", device="gpu")


def test_a_single_path_gives_one_row(encoder_and_file, image_files):
    encoder, _ = encoder_and_file
    assert unicom.embed_images(encoder, image_files[0]).shape == (1, encoder.embedding_dim)


def test_no_images_give_an_empty_matrix(encoder_and_file):
    encoder, _ = encoder_and_file
    assert unicom.embed_images(encoder, []).shape == (0, encoder.embedding_dim)


@pytest.mark.parametrize("embed", [unicom.embed_images, unicom.embed_texts])
def test_a_batch_size_below_one_is_refused(encoder_and_file, image_files, embed):
    encoder, _ = encoder_and_file
    with pytest.raises(InputError, match="batch size must be at least 1, got 0"):
        embed(encoder, [str(image_files[0])] if embed is unicom.embed_images else ["a caption"], batch_size=0)


def test_an_undecodable_file_is_named(encoder_and_file, image_files, tmp_path):
    encoder, _ = encoder_and_file
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="bad.jpg: image 2 cannot be used: not an image"):
        unicom.embed_images(encoder, [*image_files[:2], bad], num_workers=0)
    with pytest.raises(InputError, match="gone.jpg: image 0 cannot be used: file not found"):
        unicom.embed_images(encoder, [tmp_path / "gone.jpg"])


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)  # 8 bits: 0, 1, 128, 255


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped_to_white(suffix, tmp_path):
    from PIL import Image

    from unicom.data.transforms import decode_image

    path = tmp_path / f"depth.{suffix}"
    Image.fromarray(SIXTEEN_BIT).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image, size = decode_image(str(path))
    assert image.mode == "RGB" and size == (4, 4)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(decode_image(Image.open(path))[0])[0, :, 0].tolist() == [0, 1, 128, 255]


def test_embeddings_of_a_16_bit_image_are_those_of_its_8_bit_copy(encoder_and_file, tmp_path):
    from PIL import Image

    encoder, _ = encoder_and_file
    samples = np.random.default_rng(0).integers(0, 65536, (40, 50), dtype=np.uint16)
    Image.fromarray(samples).save(tmp_path / "sixteen.png")
    eight_bit = Image.fromarray(((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    expected = _reference(encoder, [eight_bit])
    np.testing.assert_array_equal(unicom.embed_images(encoder, [tmp_path / "sixteen.png"]), expected)
    np.testing.assert_array_equal(unicom.embed_images(encoder, [Image.open(tmp_path / "sixteen.png")]), expected)


def test_a_model_folders_transform_reads_16_bit_images_as_8_bit():
    from PIL import Image

    from unicom.models.export import build_transform
    from unicom.models.registry import clip_preprocess

    transform = build_transform(clip_preprocess(4))
    sixteen = Image.fromarray(np.full((6, 6), 32896, dtype=np.uint16))
    eight = Image.fromarray(np.full((6, 6), 128, dtype=np.uint8)).convert("RGB")
    assert torch.equal(transform(sixteen), transform(eight))


def test_a_tensor_or_array_in_place_of_an_image_is_named(encoder_and_file, image_files):
    encoder, _ = encoder_and_file
    with pytest.raises(InputError, match=r"image 1 is a Tensor: embed_images takes PIL images, file paths"):
        unicom.embed_images(encoder, [image_files[0], torch.rand(3, 32, 32)])
    with pytest.raises(InputError, match=r"image 0 is a ndarray: .*encoder.encode_image"):
        unicom.embed_images(encoder, [np.zeros((32, 32, 3), dtype=np.uint8)])


def test_a_missing_caption_is_named_by_its_position(tmp_path):
    from support import tiny_open_clip

    clip = load_encoder(tiny_open_clip(tmp_path / "clip"))
    with pytest.raises(InputError, match=r"text 1 is a NoneType, not a string: embed_texts takes strings"):
        unicom.embed_texts(clip, ["a cat", None])


def test_a_loaded_module_in_place_of_an_encoder_says_what_to_give(image_files):
    from unicom.models.unicom_vit import ViTSettings

    model = random_unicom_vit(ViTSettings(image_size=32, patch_size=16, width=64, depth=1, heads=1, mlp_dim=64, embedding_dim=8))
    with pytest.raises(TypeError, match=r"got a UnicomViT module: give the spec it was loaded from"):
        unicom.embed_images(model, image_files[:1])


def test_a_resize_is_refused_past_the_pixel_limit_of_an_image():
    from unicom.data.transforms import MAX_RESIZED_PIXELS, DecodeError, check_resized_pixels

    assert 224 * int(224 * 1783) <= MAX_RESIZED_PIXELS < 224 * int(224 * 1784)
    check_resized_pixels(224, (1, 1783))  # 224 x 399,392: 89,463,808 pixels
    with pytest.raises(DecodeError, match=r"a 1784x1 image: resizing its short side to 224 would make 89,513,984 pixels"):
        check_resized_pixels(224, (1784, 1))
    check_resized_pixels(None, (1, 10**7))  # a transform that does not resize the short side


def test_a_thin_image_is_refused_before_its_resize_takes_gigabytes(encoder_and_file, image_files, tmp_path):
    from PIL import Image

    encoder, _ = encoder_and_file
    Image.new("RGB", (100_000, 1), (200, 10, 10)).save(tmp_path / "line.png")  # 0.3 MB decoded, 10 GB resized
    with pytest.raises(InputError, match=r"line.png: image 1 cannot be used: a 100000x1 image: resizing its short side"):
        unicom.embed_images(encoder, [image_files[0], tmp_path / "line.png"], num_workers=0)


def test_an_uploaded_thin_image_is_refused_before_its_resize():
    import io

    from fastapi import HTTPException
    from PIL import Image
    from torchvision import transforms as T

    from unicom.search.uploads import ModelInput, decode_for_model

    data = io.BytesIO()
    Image.new("RGB", (1, 100_000)).save(data, "PNG")
    with pytest.raises(HTTPException) as error:
        decode_for_model(data.getvalue(), "image", ModelInput(T.Compose([T.Resize(224), T.CenterCrop(224)])), 100_000)
    assert error.value.status_code == 415 and "a 1x100000 image: resizing its short side to 224" in error.value.detail


def test_draft_decoding_keeps_embeddings_close_on_large_jpegs(encoder_and_file, tmp_path):
    encoder, _ = encoder_and_file
    path = tmp_path / "large.jpg"
    path.write_bytes(encode_image(class_image(3, 0, 800), "JPEG"))
    exact = unicom.embed_images(encoder, [path], draft=False)
    fast = unicom.embed_images(encoder, [path], draft=True)
    assert float(exact[0] @ fast[0]) > 0.99


def test_the_summary_separates_the_start_up_from_the_steady_rate(encoder_and_file, image_files, tmp_path):
    """The start-up ends when the first batch is through the model: its images and seconds
    are left out of the steady rate, which a long extraction runs at."""
    from unicom.embed import embed_to_folder

    encoder, _ = encoder_and_file
    summary = embed_to_folder([str(image_files[0].parent)], tmp_path / "emb", encoder, batch_size=3, num_workers=0,
                              rows_per_part=100)
    assert summary.samples == 7 and summary.startup_images == 3  # the first batch of 3
    assert 0 < summary.startup_seconds < summary.seconds
    expected = (7 - 3) / (summary.seconds - summary.startup_seconds)
    assert summary.steady_images_per_second == pytest.approx(expected)


def test_an_image_that_cannot_be_used_is_named_with_what_to_do(encoder_and_file, image_files, tmp_path):
    from PIL import Image

    encoder, _ = encoder_and_file
    cut = tmp_path / "cut.jpg"
    with open(image_files[0], "rb") as image:
        cut.write_bytes(image.read()[:200])  # a download cut short
    with pytest.raises(InputError, match=r"cut.jpg: image 1 cannot be used: .*; download the image again \(it may be "
                                         r"damaged, cut short or missing\), or remove it from the images given"):
        unicom.embed_images(encoder, [image_files[0], cut], num_workers=0)
    Image.new("RGB", (100_000, 1)).save(tmp_path / "line.png")  # over MAX_RESIZED_PIXELS once resized
    with pytest.raises(InputError, match=r"line.png: image 0 cannot be used: .*more than the 89,478,485 an image may "
                                         r"have.*ratio above .*; no option raises that limit: give a copy of the image within it \(smaller, or "
                                         r"cropped where the limit is on the ratio of its sides\)"):
        unicom.embed_images(encoder, [tmp_path / "line.png"], num_workers=0)


class _Slowed(torch.nn.Module):
    """A model that takes ``seconds`` per batch more than ``inner``."""

    def __init__(self, inner, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, images):
        import time

        time.sleep(self.seconds)
        return self.inner(images)


def test_the_summary_says_whether_the_model_waited_for_its_input(encoder_and_file, image_files, tmp_path):
    """After the start-up, the time spent waiting for the next decoded batch: most of it when
    decoding is slow and the model fast, little when the model is the slow one."""
    import time

    from unicom.commands.embed import input_wait_line
    from unicom.progress import INPUT_BOUND_SHARE
    from unicom.embed import embed_to_folder
    from unicom.models.encoders import ModelEncoder

    encoder, _ = encoder_and_file

    def slow_decoding(image):
        time.sleep(0.2)
        return encoder.image_transform(image)

    def run(model, transform, name):
        slowed = ModelEncoder(model, transform, encoder.embedding_dim, name)
        return embed_to_folder([str(image_files[0].parent)], tmp_path / name, slowed, batch_size=1, num_workers=0,
                               rows_per_part=100)

    input_bound = run(encoder.model, slow_decoding, "slow-input")  # 6 batches after the first, 0.2 s each to decode
    assert input_bound.input_wait_seconds >= 6 * 0.2
    assert input_bound.input_wait_share > 0.6, input_bound
    model_bound = run(_Slowed(encoder.model, 0.2), encoder.image_transform, "slow-model")
    assert model_bound.input_wait_share < 0.2, model_bound
    assert input_wait_line(input_bound.input_wait_share).endswith("the images limit this run; more --workers, or "
                                                                  "--decode gpu on a GPU (JPEGs decoded there), may "
                                                                  "feed it faster")
    assert input_bound.decode == "cpu" and input_wait_line(0.9, on_device=True).endswith(
        ": decoding the JPEGs in this process, or the workers' reading, limits this run; --decode-workers-share (the "
        "workers decode a share of the JPEGs) or more --workers may feed it faster")
    assert input_wait_line(INPUT_BOUND_SHARE / 2) == (
        f"after the start-up the model waited {100 * INPUT_BOUND_SHARE / 2:.0f}% of the time for its next batch")


def test_the_input_wait_share_is_of_the_time_after_the_start_up_and_the_most_of_any_rank():
    from unicom.embed import EmbedSummary

    one = EmbedSummary(samples=7, startup_images=3, seconds=3.0, startup_seconds=1.0, input_wait_seconds=0.5)
    assert one.input_wait_share == 0.25  # 0.5 s of the 2 s after the start-up
    assert EmbedSummary(samples=3, startup_images=3, seconds=2.0, startup_seconds=1.0).input_wait_share is None
    other = EmbedSummary(samples=5, startup_images=2, seconds=2.0, startup_seconds=0.5, input_wait_seconds=1.5)
    merged = one.merge(other)
    assert merged.input_wait_seconds == 1.5 and merged.input_wait_share == 0.75  # 1.5 s of max(3) - max(1) s
