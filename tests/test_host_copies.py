"""Embeddings on their way back to the host: :class:`HostCopy` and :class:`HostCopies`.

A loop that reads each batch's embeddings a batch or two after it queued them keeps the GPU
busy while the host reads, decodes and writes; the values must be those the device computed,
in the order the batches came, with never more than ``depth`` batches unread. The batches of
one call also share one autocast region, so the weights are cast to the low precision once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unicom.engine.device import HostCopies, HostCopy


def test_a_host_copy_of_a_cpu_tensor_is_its_values():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    copy = HostCopy(tensor)
    assert copy.shape == (3, 4)
    np.testing.assert_array_equal(copy.array(), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_host_copies_read_the_oldest_batch_beyond_the_depth_in_order():
    read: list[int] = []
    copies = HostCopies(depth=2)
    for batch in range(5):
        values = torch.full((2, 3), float(batch))

        def then(array, batch=batch):
            assert (array == batch).all()
            read.append(batch)

        copies.add(HostCopy(values), then=then)
        assert read == list(range(max(0, batch - 1)))  # never more than two batches unread
    copies.finish()
    assert read == [0, 1, 2, 3, 4]
    assert not copies.waiting


def test_a_batch_of_several_copies_is_read_together_and_absent_ones_are_left_out():
    got = []
    copies = HostCopies(depth=0)
    copies.add(HostCopy(torch.ones(1, 2)), None, HostCopy(torch.zeros(1, 3)), then=lambda *arrays: got.append(arrays))
    assert len(got) == 1 and [a.shape for a in got[0]] == [(1, 2), (1, 3)]


def test_embed_images_places_each_batch_as_it_came(tmp_path):
    """More batches than the copies in flight, the last one short: every row lands at its
    image's place (against one batch holding every image)."""
    from support import class_image

    from unicom.embed import embed_images

    encoder = _tiny_encoder()
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        class_image(i, i, size=40).save(path)
        paths.append(path)
    one_batch = embed_images(encoder, paths, batch_size=7, num_workers=0, precision="fp32")
    batches = embed_images(encoder, paths, batch_size=2, num_workers=0, precision="fp32")
    np.testing.assert_allclose(batches, one_batch, atol=1e-5)
    apart = np.linalg.norm(one_batch[:, None] - one_batch[None], axis=-1)[~np.eye(7, dtype=bool)]
    assert apart.min() > 1e-3  # the rows differ far beyond the tolerance: a misplaced row shows


def _tiny_encoder():
    from open_clip.transform import image_transform

    from unicom.models.encoders import ModelEncoder
    from unicom.models.vit import ClipViT, ClipViTSettings

    torch.manual_seed(0)
    model = ClipViT(ClipViTSettings(image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16))
    return ModelEncoder(model.eval(), image_transform(32, is_train=False), 16, "tiny")


def test_a_call_casts_the_weights_to_the_low_precision_once_not_per_batch(tmp_path):
    """Under autocast each weight of the blocks and the projection is cast to bfloat16 in
    the first batch of a call and reused by the others: three batches cast as many as one.
    (The patch embedding's weight enters its product reshaped, a view, which autocast does
    not keep: one small cast per batch.)"""
    from support import class_image
    from torch.utils._python_dispatch import TorchDispatchMode

    from unicom.embed import embed_images, embed_to_folder

    encoder = _tiny_encoder()
    weights = {p.data_ptr() for name, p in encoder.model.named_parameters() if not name.startswith("trunk.patch_embed")}

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_to_copy", "to") and args[0].data_ptr() in weights:
                WeightCasts.count += 1
            return func(*args, **(kwargs or {}))

    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(6):
        paths.append(folder / f"{i}.png")
        class_image(i, i, size=40).save(paths[-1])
    for run in (
        lambda batch_size: embed_images(encoder, paths, batch_size=batch_size, num_workers=0, precision="bf16"),
        lambda batch_size: embed_to_folder(folder, tmp_path / f"out{batch_size}", encoder, batch_size=batch_size,
                                           num_workers=0, precision="bf16"),  # unicom embed
    ):
        counts = []
        for batch_size in (6, 2):
            WeightCasts.count = 0
            with WeightCasts():
                run(batch_size)
            counts.append(WeightCasts.count)
        assert counts[0] > 0 and counts[1] == counts[0]


def test_a_model_that_changes_its_input_in_place_embeds_on_either_decoding_path(tmp_path):
    """The batches run under no_grad, their input made under no_grad too (an inference
    tensor could not be changed in place outside inference mode)."""
    from support import class_image, encode_image

    from unicom.embed import embed_images
    from unicom.models.encoders import ModelEncoder

    tiny = _tiny_encoder()

    class ScalesItsInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny.model

        def forward(self, images):
            return self.inner(images.mul_(1.0))

    encoder = ModelEncoder(ScalesItsInput().eval(), tiny.image_transform, 16, "in place")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(encode_image(class_image(i, i, size=40)))
    for decode in ("cpu", "gpu"):  # gpu: the tensor path, with torchvision's CPU decoder here
        expected = embed_images(tiny, paths, batch_size=2, num_workers=0, decode=decode)
        got = embed_images(encoder, paths, batch_size=2, num_workers=0, decode=decode)
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_host_copies_hold_the_values_computed_before_them():
    """Copies queued behind long device work, their sources overwritten right after (the
    device runs in stream order, so each copy sees the values before), pinned blocks freed
    and reused batch after batch: every array is the value at the time of its copy."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(2048, 2048, device="cuda", generator=generator)
    expected, copies, arrays = [], HostCopies(depth=2), []
    for batch in range(12):
        values = a
        for _ in range(8):  # long enough that the host gets ahead of the device
            values = torch.tanh(values @ a) + batch
        expected.append(values[:64].clone())  # compared at the end: reading it now would wait
        source = values[:64].clone()
        copies.add(HostCopy(source), then=arrays.append)
        source.fill_(float("nan"))  # after the copy, in stream order
    copies.finish()
    assert len(arrays) == 12
    for got, want in zip(arrays, expected):
        np.testing.assert_array_equal(got, want.cpu().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_captions_go_to_the_device_from_page_locked_memory(tmp_path):
    """From pageable memory a copy to the GPU first waits for the work queued before it, so the
    host could not tokenise the next batch while the device encodes one; the tokens are pinned."""
    from support import tiny_open_clip

    from unicom.embed import embed_texts
    from unicom.models.encoders import load_encoder

    clip = load_encoder(tiny_open_clip(tmp_path / "clip"), device="cuda")
    captions = [f"a photo of thing {i}" for i in range(10)]
    expected = embed_texts(clip, captions, batch_size=4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        got = embed_texts(clip, captions, batch_size=4)
    copies = [event.key for event in profile.key_averages() if event.key.startswith("Memcpy HtoD")]
    assert copies and all("Pinned" in key for key in copies), copies
    np.testing.assert_array_equal(got, expected)
