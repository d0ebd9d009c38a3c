"""Small real inputs for tests: images with class-dependent content, webdataset tars.

Images are real encoded files (JPEG/PNG) written with Pillow. A class is a colour and a
stripe orientation plus per-image noise, so that even simple features separate classes.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def class_image(label: int, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image whose content depends on ``label`` (colour, stripes) and ``index`` (noise)."""
    rng = np.random.default_rng([seed, label, index])
    base = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 199 + 90) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = 4 + (label % 5) * 3
    stripes = ((xx if label % 2 else yy) // period % 2).astype(np.float32)[..., None]
    pixels = base * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_image(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_class_folder(root: Path, labels: list[int], per_class: int, size: int = 64, fmt: str = "JPEG") -> list[Path]:
    """``root/<label>/<i>.jpg`` for each label; returns the written paths in order."""
    paths = []
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for label in labels:
        folder = Path(root) / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:04d}{suffix}"
            path.write_bytes(encode_image(class_image(label, i, size), fmt))
            paths.append(path)
    return paths


def write_tar_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar: each sample ``{"key": ..., "jpg"|"png": bytes, "txt": str, "json": dict}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["key"]
            for ext, value in sample.items():
                if ext == "key":
                    continue
                if isinstance(value, dict):
                    value = json.dumps(value).encode()
                elif isinstance(value, str):
                    value = value.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return path


def captioned_samples(number: int, count: int) -> list[dict]:
    """The ``count`` samples of shard ``number`` for :func:`write_tar_shard`: a 40-pixel
    class image, a caption and a JSON with its url each, keyed ``{number}-{i}``."""
    return [{"key": f"{number}-{i}", "jpg": encode_image(class_image(i, number * 10 + i, 40)), "txt": f"caption {i}",
             "json": {"url": f"https://example.org/{number}/{i}.jpg"}} for i in range(count)]


def write_separated_embeddings(folder: Path, parts: dict[int, int], dim: int = 16, classes: int = 4) -> Path:
    """An embedding folder of ``classes`` well-separated classes: image and text embeddings
    (float16, ``dim`` wide) and metadata with ``key`` and ``label``; ``parts``: part number
    -> rows. The same arguments write the same bytes."""
    import pyarrow as pa

    from unicom.formats.embeddings import write_part

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim))
    for number, rows in parts.items():
        labels = rng.integers(0, classes, rows)
        image = centres[labels] + 0.3 * rng.standard_normal((rows, dim))
        text = centres[labels] + 0.3 * rng.standard_normal((rows, dim))
        keys = [f"{number}-{i}" for i in range(rows)]
        write_part(folder, number, image=image.astype(np.float16), text=text.astype(np.float16),
                   metadata=pa.table({"key": keys, "label": labels.astype(np.int64)}))
    return Path(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(fn, rank, world_size, port, args, queue, group_timeout=None):
    import os
    import traceback
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        timeout = {} if group_timeout is None else {"timeout": timedelta(seconds=group_timeout)}
        dist.init_process_group("gloo", rank=rank, world_size=world_size, **timeout)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as error:  # report every failure to the parent, with its trace
        queue.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 120.0, group_timeout: float | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return results by rank.

    ``fn`` must be a module-level function and return picklable values (numpy arrays, not
    tensors). A worker that raises makes this raise with its traceback; a hang is killed
    after ``timeout`` seconds and reported. ``group_timeout``: the process group's timeout
    in seconds (torch's default, 30 minutes, when None).
    """
    import multiprocessing as mp
    import queue as queue_module

    context = mp.get_context("spawn")
    results_queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker_entry, args=(fn, rank, world_size, port, args, results_queue, group_timeout))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, tuple[str, object]] = {}
    try:
        while len(results) < world_size:
            try:
                rank, status, value = results_queue.get(timeout=timeout)
            except queue_module.Empty:
                raise TimeoutError(f"workers {sorted(set(range(world_size)) - set(results))} did not finish in {timeout} s")
            results[rank] = (status, value)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world_size)]


def random_unicom_vit(settings, seed: int = 0):
    """An ``UnicomViT`` in eval mode with random weights and BatchNorm statistics.

    Every value is exactly representable in float16, so a float16 copy of its state dict
    (the released files' dtype) loads back to the very same module. ``mlp.fc1`` biases
    reach beyond ±6 so that ReLU6 clips on both sides; BatchNorm variances span 1e-4..2.
    """
    import torch

    from unicom.models.unicom_vit import UnicomViT

    model = UnicomViT(settings).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                # down to 1e-4, where BatchNorm's eps (2e-5) visibly matters
                values = 10 ** (torch.rand(tensor.shape, generator=generator) * 4.3 - 4)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                values = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
            elif name.endswith("fc1.bias"):
                values = torch.rand(tensor.shape, generator=generator) * 20 - 10
            else:
                values = 0.1 * torch.randn(tensor.shape, generator=generator)
            tensor.copy_(values.half().float())
    return model


def embedded_image_collection(root: Path, labels=(0, 1, 2, 3), per_class: int = 6, rows_per_part: int = 8) -> dict:
    """Class images embedded by ``unicom embed``'s library call with a random-weight timm
    ``test_vit`` saved as a local checkpoint (the ``--pretrained FILE`` path).

    Returns ``{"images": [paths], "checkpoint": path, "emb": embedding folder}``; the same
    checkpoint gives the same embeddings when a test loads it again.
    """
    import timm
    import torch

    from unicom.embed import embed_to_folder

    root = Path(root)
    torch.manual_seed(1)  # other weights than a model built without any (seeded by 0)
    checkpoint = root / "test_vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), checkpoint)
    images = write_class_folder(root / "images", list(labels), per_class)
    embed_to_folder([str(root / "images")], root / "emb", "timm/test_vit", pretrained=str(checkpoint),
                    rows_per_part=rows_per_part, num_workers=0, dtype="float32")
    return {"images": images, "checkpoint": checkpoint, "emb": root / "emb"}


def indexed_image_collection(root: Path) -> dict:
    """:func:`embedded_image_collection` plus its exact ``unicom.Index`` (``"index"``) and the
    reloaded model (``"encoder"``)."""
    from unicom.models.encoders import load_encoder
    from unicom.search.index import Index

    found = embedded_image_collection(root)
    index = Index.build(found["emb"], Path(root) / "index")
    return {**found, "index": index, "encoder": load_encoder("timm/test_vit", str(found["checkpoint"]))}


class HostSyncRecorder:
    """Records, while active, the operations that make the host wait for a CUDA device.

    On a GPU such an operation stops the CPU until every queued kernel has run, so the
    next kernels are launched late and the GPU idles. Here it is detected on any device
    (the CPU included), from the operator: reading a value on the host
    (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``float()``), operators whose
    output size depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean
    indexing, ``repeat_interleave`` without ``output_size``, ``bincount``, sparse
    ``coalesce``), comparisons returning a Python bool (``equal``), the Python-level
    reads ``.tolist()``, ``.numpy()``, ``.cpu()``, and what copies from the host with a
    blocking copy, after which PyTorch synchronises the stream: ``.to``/``copy_`` from host
    memory to another device without ``non_blocking`` (seen with the "meta" device standing
    in for a GPU) and indexing with a Python list or a NumPy array (its indices are such a
    copy, made below the dispatcher). ``recorded`` lists ``(name, where)`` pairs, ``where``
    being the innermost frame outside torch.
    """

    def __init__(self):
        self.recorded: list[tuple[str, str]] = []

    @staticmethod
    def _caller() -> str:
        import sys

        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if "/torch/" not in name and "support.py" not in name:
                return f"{name}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        always = {
            aten._local_scalar_dense.default, aten.nonzero.default, aten.argwhere.default, aten.masked_select.default,
            aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.unique_dim_consecutive.default, aten._coalesce.default, aten.bincount.default, aten.equal.default,
            aten.is_nonzero.default,
        }
        indexing = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = None
                if func in always:
                    name = str(func)
                elif func in indexing and any(
                    t is not None and t.dtype in (torch.bool, torch.uint8) for t in (args[1] if len(args) > 1 else [])
                ):
                    name = f"{func} with a boolean mask"
                elif func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) and kwargs.get("output_size") is None:
                    name = f"{func} without output_size"
                elif func in (aten._to_copy.default, aten.copy_.default):
                    source, target = (args[0], kwargs.get("device")) if func is aten._to_copy.default else (args[1], args[0].device)
                    blocking = not (kwargs.get("non_blocking") or (func is aten.copy_.default and len(args) > 2 and args[2]))
                    if blocking and source.device.type == "cpu" and target is not None and torch.device(target).type != "cpu":
                        name = f"{func} from the host, blocking"
                if name is not None:
                    recorder.recorded.append((name, recorder._caller()))
                return func(*args, **kwargs)

        reads = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy", torch.Tensor.cpu: "Tensor.cpu"}
        indexed = {torch.Tensor.__getitem__: "Tensor.__getitem__", torch.Tensor.__setitem__: "Tensor.__setitem__"}

        def host_made(index) -> bool:
            import numpy

            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(part, (list, numpy.ndarray)) for part in parts)

        class Calls(TorchFunctionMode):
            """The Python-level calls, seen through the torch-function protocol: patching the
            Tensor class instead would change it for the rest of the process (a ``__getitem__``
            set on it, even once, makes tensors sequences to CPython's C API)."""

            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in reads:
                    recorder.recorded.append((reads[func], recorder._caller()))
                elif func in indexed and len(args) > 1 and host_made(args[1]):
                    recorder.recorded.append((f"{indexed[func]} with a Python list", recorder._caller()))
                return func(*args, **(kwargs or {}))

        self._modes = [Mode(), Calls()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_open_clip(folder: Path, seed: int = 0, weights: bool = True) -> str:
    """A tiny CLIP (both towers) as an open_clip model folder (``local-dir:``) with random
    weights, saved in the folder unless ``weights`` is False. Returns the spec ``local-dir:FOLDER``."""
    import warnings

    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    spec = f"local-dir:{folder.resolve()}"
    if weights:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(spec)
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return spec


def open_clip_reference(spec: str):
    """open_clip's own (model, preprocess, tokenizer) for ``spec``, in eval mode: the reference."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


# captions in several languages and scripts: the small tokenizer of tiny_mclip is trained on them
MULTILINGUAL_CAPTIONS = [
    "a photo of a cat", "une photo d'un chat", "ein Foto einer Katze", "фотография кошки", "一只猫的照片",
    "a dog on the grass", "un chien sur l'herbe", "ein Hund auf dem Gras", "собака на траве", "草地上的狗",
    "a red car at night", "une voiture rouge la nuit", "ein rotes Auto bei Nacht", "красная машина ночью",
]


def xlm_roberta_tokenizer(corpus: list[str], vocabulary: int, max_length: int | None = None):
    """A tokenizer of XLM-RoBERTa's kind (sentencepiece's unigram pieces, ``<s>`` 0, ``<pad>`` 1,
    ``</s>`` 2) of ``vocabulary`` pieces, trained here on ``corpus``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.Unigram())
    words.normalizer = normalizers.NFKC()
    words.pre_tokenizer = pre_tokenizers.Metaspace()
    words.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=vocabulary, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    words.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # XLM-RoBERTa's ids of them
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>",
                                   **({"model_max_length": max_length} if max_length else {}))


def tiny_xlm_roberta(folder: Path, seed: int = 0, max_positions: int = 34, width: int = 32, layers: int = 2,
                     vocabulary: int = 160, corpus: list[str] | None = None):
    """A small XLM-RoBERTa (``layers`` layers of ``width``, a head per 64 of it, at least 2) with
    random weights and a tokenizer trained on ``corpus`` (default :data:`MULTILINGUAL_CAPTIONS`),
    saved in ``folder`` (a Hugging Face model folder). Returns the tokenizer."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tokenizer = xlm_roberta_tokenizer(corpus or MULTILINGUAL_CAPTIONS, vocabulary)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                              num_attention_heads=max(2, width // 64), intermediate_size=2 * width,
                              max_position_embeddings=max_positions, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    XLMRobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_mclip(folder: Path, dims: int = 16, seed: int = 0):
    """A small M-CLIP text model folder laid out as published (config.json, pytorch_model.bin,
    the tokenizer's files), built by M-CLIP's own model class (the ``multilingual-clip``
    package) over :func:`tiny_xlm_roberta` (its folder in ``folder/base``, named by
    modelBase), with random weights. Returns (the package's model, the tokenizer): the reference."""
    import torch
    from multilingual_clip import Config_MCLIP, pt_multilingual_clip

    folder = Path(folder)
    tokenizer = tiny_xlm_roberta(folder / "base", seed)
    config = Config_MCLIP.MCLIPConfig(modelBase=str(folder / "base"), transformerDimSize=32, imageDimSize=dims)
    model = pt_multilingual_clip.MultilingualCLIP(config).eval()  # reads its transformer from modelBase
    torch.nn.init.normal_(model.LinearTransformation.weight)
    config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def saved(folder: Path, *parts):
    """``parts`` (a model, its tokenizer, its image processor: transformers' objects) saved in
    ``folder`` as transformers saves them; returns them."""
    for part in parts:
        part.save_pretrained(folder)
    return parts


def _clip_byte_characters() -> list[str]:
    """The 256 characters CLIP's byte-level BPE writes bytes as (printable ones as themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [byte for byte in range(256) if byte not in kept]
    return [chr(byte) for byte in kept] + [chr(256 + n) for n in range(len(shifted))]


def clip_tokenizer(positions: int):
    """A tokenizer of CLIP's kind (transformers' ``CLIPTokenizer``): a byte-level BPE vocabulary
    with a few merges, texts of at most ``positions`` tokens."""
    from transformers import CLIPTokenizer

    characters = _clip_byte_characters()
    merges = [("a", "t</w>"), ("c", "at</w>"), ("r", "e"), ("d", "o"), ("do", "g</w>"), ("o", "n</w>")]
    vocabulary = characters + [c + "</w>" for c in characters] + [a + b for a, b in merges]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocabulary)}, merges=merges,
                         model_max_length=positions)


def tiny_hf_clip(folder: Path, dims: int = 16, seed: int = 0, positions: int = 16):
    """A small CLIP model as transformers saves one (config.json, model.safetensors, the
    tokenizer's files, preprocessor_config.json), with random weights: a byte-level BPE
    vocabulary of CLIP's kind with a few merges, towers of 2 layers of 32, 32-pixel images
    (the short side resized to 40, then cropped), ``dims``-dimensional embeddings. Returns
    (model, tokenizer, image processor), transformers' own objects: the reference."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer(positions)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=positions, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=dims)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    return saved(folder, model, tokenizer, processor)


def _siglip_sentencepiece(folder: Path, seed: int, positions: int):
    """SigLIP's tokenizer (transformers' ``SiglipTokenizer``) over a unigram vocabulary of 40
    pieces trained here by sentencepiece on captions of a few words; the end of text is also the
    padding, as in SigLIP's vocabulary."""
    import io
    import random

    import sentencepiece
    from transformers import SiglipTokenizer

    words = "a photo of the cat dog on mat red blue at night and with its tail in grass house car".split()
    rng = random.Random(seed)
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model_file, vocab_size=40, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    (folder / "spiece.model").write_bytes(model_file.getvalue())
    return SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=positions)


def _siglip2_gemma(positions: int):
    """SigLIP 2's kind of tokenizer (transformers' ``GemmaTokenizer``, byte-pair merges over
    "▁"-prefixed words, case-sensitive, punctuation kept) over a few hundred pieces."""
    import string

    from transformers import GemmaTokenizer

    characters = list(string.ascii_letters + string.digits + string.punctuation) + ["▁"]
    merges = [("▁", "a"), ("a", "t"), ("▁", "c"), ("▁c", "at"), ("▁", "d"), ("o", "g"), ("▁d", "og"), ("▁", "r"),
              ("e", "d"), ("▁r", "ed"), ("▁", "m"), ("▁m", "at"), ("▁", "o"), ("▁o", "n"), ("▁", "D"), ("▁D", "og")]
    vocabulary = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *characters]
    vocabulary += [a + b for a, b in merges if a + b not in vocabulary]
    return GemmaTokenizer(vocab={token: i for i, token in enumerate(vocabulary)}, merges=merges,
                          model_max_length=positions, padding_side="right")


def tiny_hf_siglip(folder: Path, dims: int = 32, seed: int = 0, positions: int = 16, gemma: bool = False,
                   naflex_patches: int = 0):
    """A small SigLIP model as transformers saves one (config.json, model.safetensors, the
    tokenizer's files, preprocessor_config.json), with random weights: SigLIP's sentencepiece
    tokenizer, or with ``gemma`` SigLIP 2's kind; towers of 2 layers of ``dims`` (SigLIP's
    embedding is the towers' width), 8-pixel patches of 32-pixel images (resized to 32 on both
    sides), ``positions`` text positions. With ``naflex_patches``, SigLIP 2's NaFlex kind
    (``Siglip2Model``, the Gemma tokenizer): position embeddings for a 4 x 4 grid (resized to each
    image's grid), images resized to at most that many patches at their own aspect ratio.
    Returns (model, tokenizer, image processor), transformers' own objects: the reference."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gemma = gemma or bool(naflex_patches)
    tokenizer = _siglip2_gemma(positions) if gemma else _siglip_sentencepiece(folder, seed, positions)
    torch.manual_seed(seed)
    tower = dict(hidden_size=dims, intermediate_size=2 * dims, num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **tower)
    if naflex_patches:
        config = transformers.Siglip2Config(text_config=text, vision_config=dict(num_patches=16, patch_size=8, **tower))
        model = transformers.Siglip2Model(config).eval()
        processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=naflex_patches)
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **tower))
        model = transformers.SiglipModel(config).eval()
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    return saved(folder, model, tokenizer, processor)


def bert_tokenizer(folder: Path, positions: int, characters: str = ""):
    """A BERT tokenizer (transformers' ``BertTokenizer``) of a few English words and ``characters``,
    its vocab.txt written in ``folder``, texts of at most ``positions`` tokens."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "cat", "dog", "red", "blue", "on", "the", "grass", "photo", "of", "##s", ",", "!", "."]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *characters])
                                      + "\n", encoding="utf-8")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=positions)


CHINESE_TEXTS_VOCABULARY = "猫狗红蓝色的一只在上草地房子照片和小大白黑"


def tiny_hf_chinese_clip(folder: Path, width: int = 32, seed: int = 0, positions: int = 24):
    """A small Chinese-CLIP as transformers saves one (``ChineseCLIPModel``: config.json,
    model.safetensors, a BERT tokenizer over a vocabulary written here, preprocessor_config.json
    resizing both sides to 32 pixels as OFA-Sys' folders do), with random weights: towers of 2
    layers of ``width``, 16-d embeddings, ``positions`` text positions. Returns (model, tokenizer,
    image processor), transformers' own: the reference."""
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel

    folder = Path(folder)
    tokenizer = bert_tokenizer(folder, positions, CHINESE_TEXTS_VOCABULARY)
    torch.manual_seed(seed)
    config = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=2 * width, max_position_embeddings=positions),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    model = ChineseCLIPModel(config).eval()
    processor = ChineseCLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                          do_center_crop=False)
    return saved(folder, model, tokenizer, processor)


XLM_ROBERTA_IDS = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}  # of xlm_roberta_tokenizer's tokens


def _clip_shaped_towers(tokenizer, width: int, positions: int, **text) -> dict:
    """The configurations of a text tower and a vision tower (32-pixel images, 8-pixel patches) of 2
    layers of ``width`` each, 16-d embeddings; ``text``: the text tower's own settings."""
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4)
    return dict(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=positions, **tower, **text),
                vision_config=dict(**tower, image_size=32, patch_size=8), projection_dim=16)


def tiny_hf_altclip(folder: Path, width: int = 32, seed: int = 0, positions: int = 18):
    """A small AltCLIP as transformers saves one (``AltCLIPModel``: config.json, model.safetensors,
    an XLM-RoBERTa tokenizer trained here on :data:`MULTILINGUAL_CAPTIONS`, CLIP's
    preprocessor_config.json for 32-pixel images), with random weights: towers of 2 layers of
    ``width``, 16-d embeddings, ``positions`` text positions (RoBERTa's: two fewer for a text).
    Returns (model, tokenizer, image processor), transformers' own: the reference."""
    import torch
    from transformers import AltCLIPConfig, AltCLIPModel, CLIPImageProcessor

    folder = Path(folder)
    tokenizer = xlm_roberta_tokenizer(MULTILINGUAL_CAPTIONS, 160)  # no model_max_length: the tower's positions bound
    torch.manual_seed(seed)
    config = AltCLIPConfig(**_clip_shaped_towers(tokenizer, width, positions, project_dim=width, **XLM_ROBERTA_IDS))
    model = AltCLIPModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return saved(folder, model, tokenizer, processor)


def tiny_hf_align(folder: Path, width: int = 32, seed: int = 0, positions: int = 24):
    """A small ALIGN as transformers saves one (``AlignModel``: config.json, model.safetensors, a
    BERT tokenizer over the vocabulary of :func:`tiny_hf_chinese_clip`, preprocessor_config.json as
    ALIGN's published one, scaled down: both sides to 40 pixels, the centre 32, values / 127.5 - 1),
    with random weights: a text tower of 2 layers of ``width``, a two-block EfficientNet whose last
    block has 16 channels, 16-d embeddings. Returns (model, tokenizer, image processor),
    transformers' own: the reference."""
    import torch
    from transformers import AlignConfig, AlignModel, EfficientNetImageProcessor

    folder = Path(folder)
    tokenizer = bert_tokenizer(folder, positions)
    torch.manual_seed(seed)
    config = AlignConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=2 * width, max_position_embeddings=positions),
        vision_config=dict(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=16,
                           kernel_sizes=[3, 3], in_channels=[32, 8], out_channels=[8, 16], strides=[1, 2],
                           num_block_repeats=[1, 1], expand_ratios=[1, 2], depthwise_padding=[]),
        projection_dim=16)
    model = AlignModel(config).eval()
    with torch.no_grad():  # convolutions that keep the images apart (transformers' initialisation all but
        for module in model.vision_model.modules():  # erases them), batch norms of other statistics than 0 and 1
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    processor = EfficientNetImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                                           do_center_crop=True, rescale_factor=1 / 127.5, rescale_offset=True,
                                           do_normalize=False, include_top=False, resample=2)
    return saved(folder, model, tokenizer, processor)


def tiny_hf_metaclip2(folder: Path, width: int = 32, seed: int = 0, positions: int = 16):
    """A small MetaCLIP 2 as transformers saves one (``MetaClip2Model``: CLIP's towers of 2 layers
    of ``width``, an XLM-V-like tokenizer trained here on :data:`MULTILINGUAL_CAPTIONS`, CLIP's
    preprocessor_config.json for 32-pixel images), with random weights. Returns (model,
    tokenizer, image processor), transformers' own: the reference."""
    import torch
    from transformers import CLIPImageProcessor, MetaClip2Config, MetaClip2Model

    tokenizer = xlm_roberta_tokenizer(MULTILINGUAL_CAPTIONS, 160, max_length=positions)
    torch.manual_seed(seed)
    config = MetaClip2Config(**_clip_shaped_towers(tokenizer, width, positions, **XLM_ROBERTA_IDS))
    model = MetaClip2Model(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    return saved(folder, model, tokenizer, processor)


def tiny_hf_aimv2(folder: Path, width: int = 32, seed: int = 0, positions: int = 16):
    """A small AIMv2 LiT model as transformers saves one (``Aimv2Model``: CLIP's tokenizer of
    :func:`clip_tokenizer`, towers of 2 layers of ``width`` with RMSNorm and SwiGLU, the vision
    tower's attention-pooling head, CLIP's preprocessor_config.json for 32-pixel images), with
    random weights. Returns (model, tokenizer, image processor), transformers' own: the reference."""
    import torch
    from transformers import Aimv2Config, Aimv2Model, CLIPImageProcessor

    tokenizer = clip_tokenizer(positions)
    torch.manual_seed(seed)
    config = Aimv2Config(**_clip_shaped_towers(tokenizer, width, positions, eos_token_id=tokenizer.eos_token_id))
    model = Aimv2Model(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    return saved(folder, model, tokenizer, processor)


def tiny_hf_aimv2_vision(folder: Path, width: int = 32, seed: int = 0, head: bool = False):
    """A small AIMv2 image encoder as transformers saves one (``Aimv2VisionModel``, model type
    ``aimv2_vision_model``: 2 layers of ``width``, 32-pixel images of 8-pixel patches, with the
    attention-pooling head when ``head``, else without, as Apple's pre-trained encoders), random
    weights, CLIP's preprocessor_config.json. Returns (model, image processor)."""
    import torch
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, CLIPImageProcessor

    torch.manual_seed(seed)
    config = Aimv2VisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8, use_head=head)
    model = Aimv2VisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    return saved(folder, model, processor)


def tiny_hf_dual_encoder(folder: Path, vision: str, text: str, width: int = 32, seed: int = 0, positions: int = 20):
    """A small ``VisionTextDualEncoderModel`` as transformers' training example saves one: a
    ``vision`` tower (``"clip"``: CLIP's with CLIP's image processor, short side 40 and the centre
    32; ``"vit"``: ViT's with ViT's processor, both sides to 32) beside a ``text`` tower
    (``"bert"``: :func:`bert_tokenizer`'s; ``"roberta"``: XLM-RoBERTa's of :func:`xlm_roberta_tokenizer`),
    2 layers of ``width`` each, 16-d projections, random weights. Returns (model, tokenizer, image
    processor), transformers' own: the reference."""
    import torch
    import transformers

    folder = Path(folder)
    if text == "bert":
        tokenizer = bert_tokenizer(folder, positions, CHINESE_TEXTS_VOCABULARY)
        text_config = transformers.BertConfig
    else:
        tokenizer = xlm_roberta_tokenizer(MULTILINGUAL_CAPTIONS, 160)
        text_config = transformers.XLMRobertaConfig
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4)
    if vision == "clip":
        vision_config = transformers.CLIPVisionConfig(**tower, image_size=32, patch_size=8)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    else:
        vision_config = transformers.ViTConfig(**tower, image_size=32, patch_size=8)
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_config, text_config(vocab_size=len(tokenizer), max_position_embeddings=positions, **tower,
                                   pad_token_id=tokenizer.pad_token_id), projection_dim=16)
    model = transformers.VisionTextDualEncoderModel(config).eval()
    return saved(folder, model, tokenizer, processor)


def tiny_hf_blip(folder: Path, width: int = 32, seed: int = 0, positions: int = 24):
    """A small BLIP retrieval model as transformers saves one (``BlipForImageTextRetrieval``: a
    vision tower of 8-pixel patches of 32-pixel images and a text encoder, 2 layers of ``width``
    each, 16-d embeddings; :func:`bert_tokenizer`'s BERT tokenizer; ``BlipImageProcessor``
    resizing both sides to 32), with random weights. Returns (model, tokenizer, image processor),
    transformers' own: the reference."""
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    folder = Path(folder)
    tokenizer = bert_tokenizer(folder, positions)
    torch.manual_seed(seed)
    towers = _clip_shaped_towers(tokenizer, width, positions, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    config = BlipConfig(text_config=towers["text_config"], vision_config=towers["vision_config"],
                        image_text_hidden_size=16)
    model = BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():  # weights of unit gain (transformers' initialisation of 0.02 makes every embedding alike)
        for name, weight in model.named_parameters():
            if weight.dim() >= 2:
                torch.nn.init.normal_(weight, std=weight[0].numel() ** -0.5)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    return saved(folder, model, tokenizer, processor)


def tiny_hf_dinov2(folder: Path, width: int = 32, seed: int = 0, registers: int = 0):
    """A small DINOv2 as transformers saves one (config.json, model.safetensors,
    preprocessor_config.json), with random weights: 2 layers of ``width``, 8-pixel patches of
    32-pixel images (the short side resized to 40, then cropped, ImageNet's mean and std as
    DINOv2's processor has them), ``registers`` register tokens (``Dinov2WithRegistersModel``
    where there are some). Returns (model, image processor), transformers' own: the reference."""
    import torch
    from transformers import BitImageProcessor

    torch.manual_seed(seed)
    sizes = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8)
    if registers:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes)).eval()
    else:
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(**sizes)).eval()
    processor = BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=3,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def tiny_sentence_transformer(folder: Path, dims: int = 16, bias: bool = False, tanh: bool = False, seed: int = 0,
                              max_seq_length: int = 20):
    """A small multilingual CLIP text model as sentence-transformers saves one (modules.json: a
    Transformer over :func:`tiny_xlm_roberta`, a mean Pooling, a Dense layer to ``dims``),
    saved in ``folder`` by the ``sentence-transformers`` package. Returns its model: the reference."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    folder = Path(folder)
    tiny_xlm_roberta(folder.parent / f"{folder.name}-base", seed)
    torch.manual_seed(seed + 1)
    transformer = Transformer(str(folder.parent / f"{folder.name}-base"), max_seq_length=max_seq_length)
    dense = Dense(32, dims, bias=bias, activation_function=torch.nn.Tanh() if tanh else torch.nn.Identity())
    model = SentenceTransformer(modules=[transformer, Pooling(32, "mean"), dense]).eval()
    model.save(str(folder))
    return model


CLIP_BENCHMARK_VERSION = "1.6.2"


def clip_benchmark_or_skip() -> None:
    """Make clip_benchmark's scoring modules importable (``clip_benchmark.metrics.zeroshot_retrieval``,
    ``...zeroshot_classification``, ``clip_benchmark.datasets.flickr``; its per-dataset prompts beside them), unpacked from its
    released wheel by ``scripts/install-clip-benchmark.sh`` (run here when they are absent),
    or skip the test saying why."""
    import os
    import subprocess
    import sys

    repository = Path(__file__).resolve().parents[1]
    folder = repository / ".cache" / "clip-benchmark" / CLIP_BENCHMARK_VERSION
    needed = [folder / "clip_benchmark" / "metrics" / name for name in ("zeroshot_retrieval.py", "zeroshot_classification.py")]
    needed += [folder / "clip_benchmark" / "datasets" / name
               for name in ("en_zeroshot_classification_templates.json", "en_classnames.json")]
    if not all(path.is_file() for path in needed):
        subprocess.run(["bash", str(repository / "scripts" / "install-clip-benchmark.sh")],
                       env={**os.environ, "PYTHON": sys.executable, "CLIP_BENCHMARK_VERSION": CLIP_BENCHMARK_VERSION},
                       check=False, timeout=300)
    if not all(path.is_file() for path in needed):
        import pytest

        pytest.skip(f"clip_benchmark is not in {folder}: run scripts/install-clip-benchmark.sh")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def clip_image_collection(root: Path, labels=(0, 1, 2, 3), per_class: int = 6, weights: bool = True) -> dict:
    """Class images embedded by ``unicom embed``'s library call with :func:`tiny_open_clip`,
    and their exact index. Returns ``{"images", "spec", "emb", "index"}``."""
    from unicom.embed import embed_to_folder
    from unicom.search.index import Index

    root = Path(root)
    spec = tiny_open_clip(root / "clip", weights=weights)
    images = write_class_folder(root / "images", list(labels), per_class)
    embed_to_folder([str(root / "images")], root / "emb", spec, rows_per_part=8, num_workers=0, dtype="float32")
    index = Index.build(root / "emb", root / "index")
    return {"images": images, "spec": spec, "emb": root / "emb", "index": index}


def clip_collection_with_texts(root: Path, texts: list[str]) -> dict:
    """:func:`clip_image_collection`, with its stored embeddings (``stored``) and the
    embeddings of ``texts`` by open_clip's own text tower (``texts``), all of unit length."""
    import numpy as np
    import torch

    found = clip_image_collection(root)
    model, _, tokenizer = open_clip_reference(found["spec"])
    with torch.no_grad():
        embedded = model.encode_text(tokenizer(texts)).numpy()
    stored = stored_embeddings(found["emb"])
    return {**found, "stored": stored / np.linalg.norm(stored, axis=1, keepdims=True),
            "texts": embedded / np.linalg.norm(embedded, axis=1, keepdims=True)}


def stored_embeddings(emb: Path) -> "np.ndarray":
    """The image embeddings of an embedding folder, parts in order (the ids' order): float32 (N, D)."""
    parts = sorted((Path(emb) / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return np.concatenate([np.load(p) for p in parts]).astype(np.float32)


def brute_force(embeddings: "np.ndarray", query: "np.ndarray", k: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Exact top-k by inner product of unit rows: (scores, ids), best first."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    scores = x @ q
    ids = np.argsort(-scores, kind="stable")[:k]
    return scores[ids], ids


CHROMIUM = Path("/usr/bin/chromium")
# Without the networking switches Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def browser_or_skip():
    """Playwright's ``sync_playwright``, or a skip saying what is missing."""
    import pytest

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install 'unicom[dev]')")
    if not CHROMIUM.exists():
        pytest.skip("no Chromium found at /usr/bin/chromium; run scripts/install-browser.sh (Debian: apt-get install chromium)")
    return sync_playwright


def under_triton_interpreter(code: str, warnings_ignored: bool = True, timeout: int = 300) -> str:
    """The standard output of Python ``code`` run under Triton's interpreter (it is chosen when
    Triton is imported, so in a process of its own) with the tests' folder on ``sys.path``;
    skips where the interpreter cannot run (:func:`triton_interpreter_or_skip`)."""
    import os
    import subprocess
    import sys

    triton_interpreter_or_skip()
    env = dict(os.environ, TRITON_INTERPRET="1", **({"PYTHONWARNINGS": "ignore"} if warnings_ignored else {}))
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " + code
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def triton_interpreter_or_skip() -> None:
    """Skip unless Triton's interpreter can run here: before Triton 3.7 it turns 1-element
    NumPy arrays into Python numbers, which NumPy 2.4 refuses (seen with Triton 3.5.1 and
    3.6.0; both run under NumPy 2.3)."""
    import pytest

    triton = pytest.importorskip("triton")

    def version(text: str) -> tuple[int, int]:
        return tuple(int(part) for part in text.split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run under NumPy {np.__version__} "
                    "(Triton 3.7 can, as NumPy 2.3 can with it)")


def wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression until it is true (page.evaluate is not subject to the page's
    Content-Security-Policy, whereas wait_for_function's polling evaluates strings in the page)."""
    import time

    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        time.sleep(0.05)


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread: ``with LiveServer(app) as url: ...``."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()

    def __enter__(self) -> str:
        import threading
        import time

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def record_step_reads(monkeypatch) -> tuple[list[int], list[int]]:
    """Count training steps and, for each step result, how many steps had run when the host
    first read it: ``([steps so far], [steps run at each first read])``."""
    import torch

    from unicom.engine import step as step_module

    calls, read_at = [0], []
    call, read = step_module.TrainStep.__call__, step_module.StepResult._read

    def counted(self, micro_batches):
        calls[0] += 1
        return call(self, micro_batches)

    def recorded(self):
        if isinstance(self._values, torch.Tensor):  # the first read of this result
            read_at.append(calls[0])
        return read(self)

    monkeypatch.setattr(step_module.TrainStep, "__call__", counted)
    monkeypatch.setattr(step_module.StepResult, "_read", recorded)
    return calls, read_at


def without_build_id(files: dict, build: str) -> dict:
    """The files of an index folder (relative name -> bytes) with the build id taken out of
    each parquet file, after checking it is ``build`` (the id in that index's index.json): two
    builds of the same data differ in that id only, each file then compared by its rows and
    its other key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unicom.search.metadata_rows import BUILD_KEY

    compared = {}
    for name, data in files.items():
        if name.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data))
            metadata = dict(table.schema.metadata or {})
            assert metadata.pop(BUILD_KEY, b"").decode() == build, name
            data = (table.to_pydict(), metadata)
        compared[name] = data
    return compared


# ------------------------------------------------------------ W&B's offline run files

BLOCK = 32 * 1024  # wandb's run files are LevelDB logs: 32 KiB blocks of records with a 7-byte header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path) -> list:
    """The records of a ``.wandb`` run file, decoded with wandb's protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no wandb run file"
    records, pieces, position = [], b"", 7  # the file's own header: ":W&B", magic, version
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zeros to the block's end
            position += left
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_runs(out) -> list[dict]:
    """Each offline W&B run under ``out/wandb`` (one per start of the run), in the order they
    started (the folders' names hold the second only): its id, project, name, config, history
    rows ``{step: {key: value}}`` and exit code.

    wandb's service writes a run file in blocks and closes it after ``finish`` returns, on its
    own time; ``wandb.teardown`` waits for that, as the end of a ``unicom train`` process does
    (its exit hook), so that a run started in this process is read whole."""
    import wandb

    wandb.teardown()
    runs = []
    for folder in (out / "wandb").glob("offline-run-*"):
        (path,) = folder.glob("run-*.wandb")
        found = {"history": {}, "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                             started=(record.run.start_time.seconds, record.run.start_time.nanos))
                found["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                found["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "exit":
                found["exit_code"] = record.exit.exit_code
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                found["history"].setdefault(int(record.history.step.num), {}).update(row)
        runs.append(found)
    return sorted(runs, key=lambda run: run["started"])
