"""Decoding where the model runs: JPEG bytes -> torchvision's decoder -> resize, crop and
normalise on tensors.

On a GPU the decoder is nvJPEG; here the same path runs on the CPU (torchvision's
libjpeg-turbo), so everything but the decoder itself is checked against the Pillow path:
pixels within a stated tolerance, embeddings of a ViT-B/32-shaped model within cosine
0.999, the random crops of training drawn alike, and the per-sample fallbacks.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from support import HostSyncRecorder, class_image, encode_image

from unicom.data.transforms import (
    SplitTransform,
    TensorTransform,
    decode_image,
    decode_jpegs,
    jpeg_size,
    resolve_decode,
)
from unicom.errors import InputError

# The resize on tensors (torchvision, antialiased bicubic on float pixels, rounded) against
# Pillow's (antialiased bicubic on uint8): on these images the largest difference measured
# is 2 levels of 255 and the mean about 0.16 level.
MAX_LEVELS, MEAN_LEVELS = 3, 0.5


def clip_transform(size: int = 224):
    from open_clip.transform import image_transform

    return image_transform(size, is_train=False)


def photo(index: int, width: int, height: int) -> Image.Image:
    """A class image with noise and stripes, resized to ``width`` x ``height``."""
    return class_image(index % 7, index, size=max(width, height)).resize((width, height), Image.BICUBIC)


def sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    # smaller and larger than the model's 224 px, portrait and landscape
    return [(int(rng.integers(120, 900)), int(rng.integers(120, 900))) for _ in range(count)]


def as_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def to_levels(model_input: torch.Tensor, transform: TensorTransform) -> torch.Tensor:
    """Model input back to pixel levels 0..255."""
    mean = torch.tensor(transform.mean).view(-1, 1, 1)
    std = torch.tensor(transform.std).view(-1, 1, 1)
    return (model_input * std + mean) * 255


def as_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def damaged(data: bytes) -> bytes:
    """A JPEG whose header is whole (up to the start-of-scan marker) followed by noise and
    the end-of-image marker: it passes :func:`jpeg_size`; libjpeg-turbo and Pillow refuse it
    (nvJPEG does not check the image data: it decodes it into damaged pixels)."""
    return data[: data.index(b"\xff\xda")] + bytes(range(256)) * 3 + b"\xff\xd9"


def test_jpeg_size_reads_the_header_of_jpegs_the_device_decoder_takes():
    rgb = encode_image(photo(0, 300, 200))
    grey = io.BytesIO()
    photo(1, 64, 80).convert("L").save(grey, format="JPEG")
    cmyk = io.BytesIO()
    photo(2, 64, 64).convert("CMYK").save(cmyk, format="JPEG")
    assert jpeg_size(rgb) == (300, 200)
    assert jpeg_size(grey.getvalue()) == (64, 80)
    assert jpeg_size(cmyk.getvalue()) is None  # CMYK: Pillow decodes it on the CPU path
    assert jpeg_size(encode_image(photo(3, 50, 50), "PNG")) is None
    assert jpeg_size(b"\xff\xd8\xff" + b"\x00" * 20) is None
    assert jpeg_size(b"not an image") is None
    # cut short (no end-of-image marker), or with bytes after the image: the CPU path
    assert jpeg_size(rgb[: len(rgb) // 2]) is None and jpeg_size(rgb + b"trailing data") is None
    assert jpeg_size(rgb + b"\x00" * 16) == (300, 200)  # zero padding after the marker is fine


def test_images_shrunk_more_than_eight_times_are_left_to_the_cpu_decoder():
    evaluation, training = TensorTransform(clip_transform()), TensorTransform(_training_transform(64))
    assert evaluation.takes(8 * 224, 20_000) and not evaluation.takes(8 * 224 + 1, 20_000)  # the shorter side counts
    assert training.takes(8 * 64, 8 * 64) and not training.takes(8 * 64 + 1, 100)
    large = encode_image(photo(4, 8 * 224 + 8, 8 * 224 + 8))
    assert jpeg_size(large) is not None and evaluation.device_size(large) is None
    assert evaluation.device_size(encode_image(photo(4, 300, 200))) == (300, 200)


def test_device_decoders_refuse_a_jpeg_with_noise_for_image_data():
    data = damaged(encode_image(photo(5, 90, 80)))
    assert jpeg_size(data) == (90, 80)
    assert isinstance(decode_jpegs([as_bytes_tensor(data)], "cpu")[0], RuntimeError)


def test_torchvisions_cpu_decoder_gives_pillows_pixels():
    for i, (w, h) in enumerate(sizes(6)):
        data = encode_image(photo(i, w, h))
        decoded = decode_jpegs([as_bytes_tensor(data)], "cpu")[0]
        assert torch.equal(decoded, as_uint8_tensor(decode_image(data)[0]))


def squash_and_crop_transform():
    """Both sides resized, then the centre cropped (ALIGN's preprocessing, bilinear)."""
    from unicom.models.export import build_transform

    return build_transform({"size": 224, "resize_size": 268, "resize_mode": "squash", "interpolation": "bilinear",
                            "mean": [0.5] * 3, "std": [0.5] * 3})


@pytest.mark.parametrize("make", [clip_transform, squash_and_crop_transform])
def test_resize_and_crop_on_tensors_match_pillow_within_the_stated_tolerance(make):
    transform = make()
    split, tensor = SplitTransform(transform), TensorTransform(transform)
    images = [photo(i, w, h) for i, (w, h) in enumerate(sizes(16))]
    expected = torch.stack([split.on_worker(image) for image in images]).float()
    got = to_levels(tensor([as_uint8_tensor(image) for image in images], [()] * len(images)), tensor)
    difference = (got - expected).abs()
    assert got.shape == (16, 3, 224, 224)
    assert float(difference.max()) <= MAX_LEVELS
    assert float(difference.mean()) <= MEAN_LEVELS


def test_images_of_one_size_are_resized_together_with_the_same_result(monkeypatch):
    from unicom.data import transforms

    transform = TensorTransform(clip_transform())
    images = [as_uint8_tensor(photo(i, 320, 240)) for i in range(5)] + [as_uint8_tensor(photo(9, 500, 260))]
    together = transform(images, [()] * 6)
    alone = torch.cat([transform([image], [()]) for image in images])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    monkeypatch.setattr(transforms, "DEVICE_RESIZE_PIXELS", 2 * 3 * 320 * 240)  # stacks of two images at most
    torch.testing.assert_close(transform(images, [()] * 6), together, rtol=0, atol=0)


def test_training_crops_and_flips_are_drawn_as_the_pil_transform_draws_them():
    from unicom.engine.sections import AugmentConfig
    from unicom.data.transforms import seeded_draws

    transform = AugmentConfig().transform(64)
    tensor = TensorTransform(transform)
    flips = 0
    for seed, (w, h) in enumerate(sizes(24, seed=1)):
        image = photo(seed, w, h)
        with seeded_draws(seed):
            expected = transform(image)
        with seeded_draws(seed):
            plan = tensor.plan(w, h)
        flips += plan[-1]
        got = tensor([as_uint8_tensor(image)], [plan])[0]
        levels = ((got - expected) * torch.tensor(tensor.std).view(-1, 1, 1) * 255).abs()
        assert float(levels.max()) <= MAX_LEVELS, (seed, plan)
        assert float(levels.mean()) <= MEAN_LEVELS
    assert 0 < flips < 24


def test_transforms_that_do_not_run_on_tensors_are_named():
    from unicom.engine.sections import AugmentConfig

    jitter = AugmentConfig(color_jitter=0.4).transform(64)
    assert "colour jitter" in TensorTransform.unsupported(jitter)
    with pytest.raises(InputError, match="decode=gpu: the training transform"):
        resolve_decode("gpu", "cpu", jitter)
    assert resolve_decode("auto", "cpu", jitter) is False
    assert resolve_decode("auto", "cpu", clip_transform()) is False  # auto: the GPU path on CUDA only
    assert resolve_decode("gpu", "cpu", clip_transform()) is True
    with pytest.raises(InputError, match="decode='fast'"):
        resolve_decode("fast", "cpu", clip_transform())


def decoded_batches(kind: str, device: str):
    """Batches as :func:`assemble_model_input` takes them, their images made on ``device``:
    every JPEG decoded, some refused, some samples of the CPU path, images of several sizes;
    with what the first batch on a device does once (the normalisation's constants copied
    there) done first."""
    from unicom.data.transforms import EncodedJpegs, SplitTransform, assemble_model_input
    from unicom.engine.sections import AugmentConfig

    pil = clip_transform() if kind == "evaluation" else AugmentConfig().transform(224)
    tensor, split = TensorTransform(pil), SplitTransform(clip_transform())
    shapes = [(256, 300), (256, 300), (300, 256), (240, 240), (256, 300)]

    def batch(failed: set, on_cpu: set):
        slots = [i for i in range(len(shapes)) if i not in on_cpu]
        jpegs = EncodedJpegs([b"jpeg"] * len(slots), [tensor.plan(shapes[i][1], shapes[i][0]) for i in slots], slots,
                             ["part"] * len(slots))
        decoded = [RuntimeError("refused") if i in failed else torch.zeros(3, *shapes[i], dtype=torch.uint8,
                                                                             device=device) for i in slots]
        cpu = torch.zeros(len(on_cpu), 3, 224, 224, dtype=torch.uint8) if on_cpu else None
        if cpu is not None and device == "cuda":
            cpu = cpu.pin_memory()  # as the loader pins its batches for a GPU
        return (len(shapes), cpu, decoded, jpegs, device, split, tensor), failed

    assemble_model_input(*batch(set(), set())[0])
    for failed, on_cpu in ((set(), set()), ({1}, set()), (set(), {2}), ({0, 4}, {3})):
        yield batch(failed, on_cpu)


@pytest.mark.parametrize("kind", ["evaluation", "training"])
def test_decoded_images_become_model_input_without_waiting_for_the_device(kind):
    """From decoded JPEGs to the model's input (resize, crop, normalise, the batch put in
    order around failures and samples of the CPU path): nothing that makes the host wait for
    the device (no blocking copy from the host, no indexing by a Python list), after the
    first batch on a device; the "meta" device stands in for the GPU."""
    from unicom.data.transforms import assemble_model_input

    for arguments, failed in decoded_batches(kind, "meta"):
        with HostSyncRecorder() as recorder:
            images, failures = assemble_model_input(*arguments)
        assert recorder.recorded == [], failed
        assert images.shape == (5 - len(failed), 3, 224, 224) and sorted(failures) == sorted(failed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["evaluation", "training"])
def test_on_cuda_decoded_images_become_model_input_without_synchronising(kind):
    from unicom.data.transforms import assemble_model_input

    for arguments, failed in decoded_batches(kind, "cuda"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            images, failures = assemble_model_input(*arguments)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert images.shape == (5 - len(failed), 3, 224, 224) and sorted(failures) == sorted(failed)


@pytest.fixture(scope="module")
def vit_b32_encoder():
    """A ViT-B/32-shaped CLIP image tower with random weights and CLIP's preprocessing."""
    from unicom.models.encoders import ModelEncoder
    from unicom.models.vit import ClipViT, ClipViTSettings

    torch.manual_seed(0)
    model = ClipViT(ClipViTSettings(image_size=224, patch_size=32, width=768, depth=12, heads=12, embedding_dim=512))
    return ModelEncoder(model.eval(), clip_transform(), 512, "ViT-B-32 (random)")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (w, h) in enumerate(sizes(10, seed=2)):
        path = folder / f"{i:02d}.jpg"
        path.write_bytes(encode_image(photo(i, w, h)))
        paths.append(path)
    return paths


def test_embeddings_of_the_device_path_match_the_pillow_path(vit_b32_encoder, photo_files, monkeypatch):
    import threading

    from unicom.data.loading import BatchStream
    from unicom.embed import embed_images

    made_in = []
    model_input = BatchStream.model_input

    def recorded(self, batch, device):
        made_in.append(threading.current_thread().name)
        return model_input(self, batch, device)

    cpu = embed_images(vit_b32_encoder, photo_files, batch_size=4, num_workers=0, decode="cpu")
    monkeypatch.setattr(BatchStream, "model_input", recorded)
    device = embed_images(vit_b32_encoder, photo_files, batch_size=4, num_workers=0, decode="gpu")
    cosines = (cpu * device).sum(axis=1)
    assert cosines.min() >= 0.999
    assert not np.array_equal(cpu, device)  # the device path did run: its resize differs slightly
    # the three batches' input was made beside the model's thread, one batch ahead of it
    assert len(made_in) == 3 and all(name.startswith("unicom-made-ahead") for name in made_in)


def test_other_formats_take_the_cpu_path_and_broken_jpegs_are_reported(tmp_path, vit_b32_encoder, photo_files):
    import pyarrow.parquet as pq

    from unicom.embed import embed_parts
    from unicom.data.sources import open_parts
    from unicom.formats.embeddings import failures_path

    folder = tmp_path / "images"
    folder.mkdir()
    for path in photo_files[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "png.png").write_bytes(encode_image(photo(20, 300, 260), "PNG"))
    cmyk = io.BytesIO()
    photo(21, 260, 300).convert("CMYK").save(cmyk, format="JPEG")
    (folder / "cmyk.jpg").write_bytes(cmyk.getvalue())
    good = photo_files[4].read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])  # a JPEG header, then nothing

    runs = {}
    for decode in ("cpu", "gpu"):
        parts = open_parts([str(folder)], rows_per_part=100)
        summary = embed_parts(parts, vit_b32_encoder, tmp_path / decode, batch_size=3, num_workers=0,
                              dtype="float32", decode=decode)
        failures = pq.read_table(failures_path(tmp_path / decode, 0)).to_pylist()
        keys = pq.read_table(tmp_path / decode / "metadata" / "metadata_0.parquet").column("key").to_pylist()
        runs[decode] = (summary, failures, keys, np.load(tmp_path / decode / "img_emb" / "img_emb_0.npy"))
    (cpu_summary, cpu_failures, cpu_keys, cpu_emb), (gpu_summary, gpu_failures, gpu_keys, gpu_emb) = runs["cpu"], runs["gpu"]
    assert gpu_summary.samples == cpu_summary.samples == 6 and gpu_summary.failed == cpu_summary.failed == 1
    assert gpu_keys == cpu_keys and "png.png" in gpu_keys and "cmyk.jpg" in gpu_keys
    assert [f["key"] for f in gpu_failures] == [f["key"] for f in cpu_failures] == ["broken.jpg"]
    assert gpu_failures[0]["source"].endswith("broken.jpg")
    assert (cpu_emb * gpu_emb).sum(axis=1).min() >= 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_nvjpeg_and_the_tensor_path_match_pillow(vit_b32_encoder, photo_files):
    from unicom.embed import embed_images

    transform = TensorTransform(clip_transform())
    data = [path.read_bytes() for path in photo_files]
    decoded = decode_jpegs([as_bytes_tensor(d) for d in data], "cuda")
    for d, image in zip(data, decoded):
        reference = as_uint8_tensor(decode_image(d)[0])
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels
        assert image.shape == reference.shape
        assert float((image.cpu().float() - reference.float()).abs().mean()) <= 4.0
    got = transform(decoded, [()] * len(decoded))
    assert got.device.type == "cuda"
    # a JPEG nvJPEG refuses (its start marker, then noise), among good ones: Pillow is tried
    # in its place, and refuses it too: reported, never decoded into pixels
    from unicom.data.transforms import DecodeError, EncodedJpegs

    chunks = [data[0], data[1][:2] + bytes(range(256)) * 3 + b"\xff\xd9", data[2]]
    jpegs = EncodedJpegs(chunks, [()] * 3, [0, 1, 2], ["a", "b", "c"])
    images = jpegs.images("cuda")
    assert isinstance(images[1], DecodeError) and all(torch.is_tensor(images[i]) for i in (0, 2))
    encoder = vit_b32_encoder.to("cuda")
    try:
        cpu = embed_images(encoder, photo_files, batch_size=4, num_workers=0, decode="cpu", precision="fp32")
        gpu = embed_images(encoder, photo_files, batch_size=4, num_workers=0, decode="gpu", precision="fp32")
    finally:
        vit_b32_encoder.to("cpu")
    assert (cpu * gpu).sum(axis=1).min() >= 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_jpeg_bytes_in_pinned_memory_decode_as_from_pageable_memory(photo_files):
    """The DataLoader's pinning thread moves a batch's JPEG bytes to pinned memory. Decoded
    from there batch after batch, each batch's bytes freed before the next is pinned (the
    caching host allocator hands a freed block to the next batch) and nothing read back
    until the end, every image is bit-identical to its decoding from pageable memory."""
    from unicom.data.transforms import EncodedJpegs

    data = [path.read_bytes() for path in photo_files]

    def batch(order):
        return EncodedJpegs([data[i] for i in order], [()] * len(order), list(range(len(order))), ["x"] * len(order))

    pageable = batch(range(len(data)))
    assert not pageable.data.is_pinned()
    reference = [image.cpu() for image in pageable.images("cuda")]
    generator = np.random.default_rng(0)
    decoded = []
    for _ in range(40):
        order = generator.permutation(len(data))[: int(generator.integers(1, len(data) + 1))].tolist()
        jpegs = batch(order).pin_memory()
        assert jpegs.data.is_pinned()
        decoded.append((order, jpegs.images("cuda")))
        del jpegs
    for order, images in decoded:
        assert all(torch.equal(image.cpu(), reference[i]) for i, image in zip(order, images))


# -- training batches ---------------------------------------------------------------------


def _training_transform(size: int):
    from unicom.engine.sections import AugmentConfig

    return AugmentConfig().transform(size)


def _training_stream(images, device_decode: bool, batch_size: int = 4):
    from unicom.train.data import ListSource, TrainStream

    labels = np.arange(len(images)) % 3
    source = ListSource(images, labels, [f"k{i}" for i in range(len(images))], 3, "list")
    return TrainStream(source, _training_transform(64), batch_size, seed=5, device_decode=device_decode)


def test_training_batches_decoded_on_the_device_match_the_pillow_batches(tmp_path):
    paths = []
    for i, (w, h) in enumerate(sizes(8, seed=3)):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(encode_image(photo(i, w, h)))
    paths.append(tmp_path / "png.png")  # a PNG in the batch: the CPU path, in its place
    paths[-1].write_bytes(encode_image(photo(30, 200, 150), "PNG"))
    cpu_stream, device_stream = _training_stream(paths, False), _training_stream(paths, True)
    for cpu_batch, device_batch in itertools.islice(zip(cpu_stream.reader(0), device_stream.reader(0)), 2):
        assert device_batch.jpegs is not None  # JPEGs left encoded (the PNG, when in the batch, decoded)
        cpu_images, cpu_labels = cpu_stream.to_device(cpu_batch, torch.device("cpu"))
        images, labels = device_stream.to_device(device_batch, torch.device("cpu"))
        assert torch.equal(labels, cpu_labels)
        std = torch.tensor(device_stream.tensor.std).view(-1, 1, 1)
        levels = ((images - cpu_images) * std * 255).abs()
        assert float(levels.max()) <= MAX_LEVELS and float(levels.mean()) <= MEAN_LEVELS


def test_a_jpeg_no_decoder_reads_is_replaced_in_its_training_batch_and_reported(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(encode_image(photo(i, 90, 80)))
    paths[1].write_bytes(damaged(paths[1].read_bytes()))  # the header is fine, then noise
    stream = _training_stream(paths, True)
    batch = next(stream.reader(0))
    assert len(batch.jpegs) == 4  # the reader only looked at the header and the end marker
    images, labels = stream.to_device(batch, torch.device("cpu"))
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4,)
    assert batch.failed == 1 and batch.failures[0]["source"].endswith("1.jpg")
    assert "replaced in its batch" in batch.failures[0]["reason"]
    copies = [i for i in range(4) for j in range(4) if i < j and torch.equal(images[i], images[j])]
    assert len(copies) == 1  # one image appears twice, with its own label both times
    i = copies[0]
    j = next(j for j in range(4) if j != i and torch.equal(images[i], images[j]))
    assert labels[i] == labels[j]


def test_training_with_decoding_on_the_device_runs_end_to_end(tmp_path):
    from support import write_class_folder

    from unicom.train.config import load_config
    from unicom.train.trainer import train

    write_class_folder(tmp_path / "images", [0, 1, 2], 6, size=40)
    config = load_config(None, [
        f"out={tmp_path / 'run'}", f"data.folder={tmp_path / 'images'}", "data.batch_size=6", "data.workers=0",
        "data.decode=gpu", "model.image_size=32", "model.patch_size=16", "model.width=32", "model.depth=1",
        "model.heads=2", "model.embedding_dim=8", "train.steps=3", "checkpoint.every=100", "log.tensorboard=false",
    ])
    summary = train(config, console=io.StringIO())
    assert summary["steps"] == 3 and summary["failed_images"] == 0


# ------------------------------------------------------------------ a share of the JPEGs decoded by the workers


def test_the_workers_share_is_spread_evenly_over_the_samples_and_checked():
    from unicom.data.transforms import check_workers_share, decoded_by_workers

    def taken(share, count=12):
        return [i for i in range(count) if decoded_by_workers(i, share)]

    assert taken(0.0) == [] and taken(1.0) == list(range(12))
    assert taken(0.25) == [3, 7, 11] and taken(0.5) == [1, 3, 5, 7, 9, 11]
    assert sum(decoded_by_workers(i, 0.3) for i in range(1000)) == 300  # exactly the share of every 1,000
    assert check_workers_share(1 / 3) == 0.333
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(InputError, match=r"--decode-workers-share=.*: give a share of the JPEGs from 0 to 1"):
            check_workers_share(bad, "--decode-workers-share")


@pytest.fixture(scope="module")
def tiny_encoder():
    from unicom.models.encoders import ModelEncoder
    from unicom.models.vit import ClipViT, ClipViTSettings

    torch.manual_seed(0)
    model = ClipViT(ClipViTSettings(image_size=64, patch_size=16, width=32, depth=1, heads=2, embedding_dim=16))
    return ModelEncoder(model.eval(), clip_transform(64), 16, "tiny")


def test_the_workers_decode_their_share_of_the_jpegs_as_the_cpu_path_does(tiny_encoder, tmp_path):
    """Samples 1, 3, 5 ... (share 0.5) are decoded by the workers: their model input is that of
    decode=cpu bit for bit, the others' that of the device path without a share; a PNG takes
    the CPU path whatever its index. embed_images embeds that input."""
    from unicom.data.loading import BatchStream, plan_units
    from unicom.data.sources import ItemsPart
    from unicom.embed import embed_images

    paths = []
    for i, (width, height) in enumerate([(120, 90), (90, 160), (200, 150), (75, 75), (130, 100), (160, 300),
                                         (96, 128), (250, 180)]):  # within the device path's 8x downscale of 64 px
        paths.append(tmp_path / (f"{i}.png" if i == 4 else f"{i}.jpg"))
        paths[-1].write_bytes(encode_image(photo(i, width, height), "PNG" if i == 4 else "JPEG"))

    def model_input(**options):
        stream = BatchStream(plan_units([ItemsPart(paths)], 0), 8, tiny_encoder.image_transform, **options)
        batch, _end = list(stream)
        return batch, stream.model_input(batch, torch.device("cpu"))

    _, on_cpu = model_input()
    _, on_device = model_input(device_decode=True)
    batch, shared = model_input(device_decode=True, workers_share=0.5)
    assert batch.jpegs.slots == [0, 2, 6] and len(batch.images) == 5  # slots: the JPEGs left encoded
    by_workers, by_device = [1, 3, 4, 5, 7], [0, 2, 6]
    assert torch.equal(shared[by_workers], on_cpu[by_workers]) and torch.equal(shared[by_device], on_device[by_device])
    assert (on_cpu[by_device] - on_device[by_device]).abs().max() > 1e-3  # the two paths do differ there
    embedded = embed_images(tiny_encoder, paths, batch_size=8, num_workers=0, decode="gpu", decode_workers_share=0.5)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(tiny_encoder.encode_image(shared), dim=-1).numpy()
    np.testing.assert_allclose(embedded, expected, atol=1e-7)


def test_a_folder_records_the_workers_share_and_the_command_refuses_it_without_device_decoding(tiny_encoder, tmp_path,
                                                                                                  capsys, caplog):
    import logging

    from unicom.cli import main
    from unicom.embed import embed_to_folder
    from unicom.formats.embeddings import PART_SETTINGS, read_config

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(encode_image(photo(i, 90, 80), "JPEG"))
    embed_to_folder(str(folder), tmp_path / "shared", tiny_encoder, batch_size=2, num_workers=0, decode="gpu",
                    decode_workers_share=0.25, rows_per_part=2)
    assert read_config(tmp_path / "shared")[PART_SETTINGS] == [
        {"precision": "fp32", "decode": "gpu", "decode_workers_share": 0.25}]
    (tmp_path / "shared" / "img_emb" / "img_emb_1.npy").unlink()  # part 1 again, with another share
    with caplog.at_level(logging.WARNING, logger="unicom"):
        embed_to_folder(str(folder), tmp_path / "shared", tiny_encoder, batch_size=2, num_workers=0, decode="gpu",
                        decode_workers_share=0.5, rows_per_part=2)
    assert ("parts [0] with decode gpu, decode_workers_share 0.25, precision fp32); this run embeds parts [1] with decode "
            "gpu, decode_workers_share 0.5, precision fp32") in caplog.text
    embed_to_folder(str(folder), tmp_path / "plain", tiny_encoder, batch_size=2, num_workers=0, decode="gpu")
    assert read_config(tmp_path / "plain")[PART_SETTINGS] == [{"precision": "fp32", "decode": "gpu"}]
    assert main(["embed", "--input", str(folder), "--model", "ViT-B-32", "--out", str(tmp_path / "refused"),
                 "--decode", "cpu", "--decode-workers-share", "0.5"]) != 0
    assert ("--decode-workers-share 0.5 shares the JPEGs that the GPU would decode; with --decode cpu the workers "
            "decode every image: leave one of them out") in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(InputError, match=r"--decode-workers-share=1.5: give a share"):
        embed_to_folder(str(folder), tmp_path / "bad", tiny_encoder, decode_workers_share=1.5)
    from unicom.embed import embed_images

    with pytest.raises(InputError, match=r"decode_workers_share=-0.5: give a share"):  # checked where it does nothing too
        embed_images(tiny_encoder, sorted(folder.iterdir()), num_workers=0, decode="cpu", decode_workers_share=-0.5)
