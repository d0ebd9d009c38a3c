"""Where a run computes and in which floating-point format: one choice for every program.

``precision`` is one of :data:`PRECISIONS`. ``auto`` is fp32 on the CPU; on a GPU it is
bf16 for training (fp16 on GPUs without bf16) and fp16 for inference (the backbone of
``unicom probe``, as ``unicom embed``). ``bf16`` and ``fp16`` run under
``torch.autocast``: matrix products in the low precision, reductions and the loss in
float32.

Importing this module does not import torch (recipes read :data:`PRECISIONS`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from unicom.errors import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# F.scaled_dot_product_attention's backends a run may pin (auto: PyTorch's choice per call)
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                  "math": "MATH"}


def made_ahead(items, make, device, ahead: bool = True):
    """``(item, make(item))`` for each of ``items``, in order.

    With ``ahead``, ``make`` runs in a thread one item ahead of the caller: while the caller
    works on one item (a forward pass, a training step), the next one is made (decoded,
    resized, moved to the device). On a CUDA device the thread works on a CUDA stream of its
    own, so the two overlap on the GPU too, and the caller's stream waits for the item's
    tensors before it uses them. ``make`` returns a tensor, a tuple of tensors or None
    values, or None. An item is handed to the caller after ``make`` is done with it (``make``
    may change it); an item made but never handed over (the caller stopped) is dropped.
    """
    import torch

    if not ahead:
        for item in items:
            yield item, make(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def made(item):
        if side is None:
            return make(item), None
        with torch.cuda.stream(side):
            result = make(item)
            ready = torch.cuda.Event()
            ready.record(side)
        return result, ready

    def handed_over(result, ready):
        if ready is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            for tensor in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(tensor, torch.Tensor):
                    tensor.record_stream(current)  # made on the side stream: kept until the caller's work is done
        return result

    grad_mode = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def in_caller_mode(item):  # autograd modes are per thread: the caller's apply
        with torch.set_grad_enabled(grad_mode[0]), torch.inference_mode(grad_mode[1]):
            return made(item)

    # the thread's current CUDA device is the caller's (a thread starts on device 0, where
    # switching streams would otherwise make a context of its own on another rank's GPU)
    pool = ThreadPoolExecutor(1, thread_name_prefix="unicom-made-ahead",
                              initializer=torch.cuda.set_device if side is not None else None,
                              initargs=(device,) if side is not None else ())
    try:
        pending = None
        for item in items:
            submitted = (item, pool.submit(in_caller_mode, item))
            if pending is not None:
                yield pending[0], handed_over(*pending[1].result())
            pending = submitted
        if pending is not None:
            yield pending[0], handed_over(*pending[1].result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class HostCopy:
    """A device tensor's values on their way to host memory, as a NumPy array when asked.

    On a GPU the copy is queued on the current stream, after the work that computes the
    tensor, into page-locked memory, and the host waits for it only in :meth:`array`: a
    loop that asks for each batch's result a batch or two later keeps the GPU busy while
    the host reads, decodes and writes, instead of both taking turns (a copy back to
    pageable memory waits for the device at once). Elsewhere the array is ready at once.
    """

    def __init__(self, tensor: "torch.Tensor"):
        import torch

        self.shape = tuple(tensor.shape)
        self._array = None
        self._host = self._done = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(self.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(tensor.device))
        else:
            self._array = tensor.detach().cpu().numpy()

    def array(self):
        """The values (``np.ndarray``), once the device has copied them."""
        if self._array is None:
            self._done.synchronize()
            # out of page-locked memory, which the caching host allocator takes back for the next copy
            self._array = self._host.numpy().copy()
            self._host = self._done = None
        return self._array


class HostCopies:
    """The batches of :class:`HostCopy` objects a loop has made but not read, at most
    ``depth`` batches: :meth:`add` reads the oldest beyond that, so the host stays that many
    batches ahead of the device and no further (the page-locked memory held stays bounded)."""

    def __init__(self, depth: int = 2):
        import collections

        self.depth = depth
        self.waiting: collections.deque = collections.deque()

    def add(self, *copies: HostCopy | None, then=None) -> None:
        """Queue one batch's ``copies`` (None ones left out); ``then(*arrays)``, if given, is
        called with their arrays once they are read."""
        self.waiting.append(([copy for copy in copies if copy is not None], then))
        while len(self.waiting) > self.depth:
            self._read(*self.waiting.popleft())

    def finish(self) -> None:
        """Read every copy still waiting, oldest first."""
        while self.waiting:
            self._read(*self.waiting.popleft())

    @staticmethod
    def _read(copies: list[HostCopy], then) -> None:
        arrays = [copy.array() for copy in copies]
        if then is not None:
            then(*arrays)


@contextlib.contextmanager
def exact_float32():
    """float32 matrix products in full float32 inside the block, whatever the process set
    (training allows TF32 on GPUs, a 10-bit mantissa): k-means and retrieval metrics, whose
    results are compared with exact ones, run inside it. The settings are restored after."""
    import torch

    matmul = torch.backends.cuda.matmul
    # recent torch's settings API where it exists (the legacy flag must not be mixed in), else the legacy flag
    name, exact = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, name)
    setattr(matmul, name, exact)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto``: this rank's GPU when CUDA is present, else the CPU; otherwise the named
    device, checked (``key`` names the recipe key in errors)."""
    import torch

    from unicom import distributed

    if name == "auto":
        return distributed.local_device()
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"{key}={name!r}: not a torch device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key}={name!r} but CUDA is not available; use {key}=cpu")
    return device


def resolve_precision(precision: str, device: torch.device, training: bool = True) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for ``precision`` on ``device`` (module docstring)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    if not training:
        return "fp16"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """A context that runs its block in ``precision`` (resolved: bf16, fp16 or fp32) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def attention_backend(name: str):
    """A context in which ``F.scaled_dot_product_attention`` runs with backend ``name`` only
    (one of :data:`ATTENTION_BACKENDS`; ``auto`` leaves PyTorch's choice). A call the backend
    cannot take fails inside it; :func:`check_attention_backend` finds that out beforehand."""
    if name == "auto":
        return contextlib.nullcontext()
    if name not in _SDPA_BACKENDS:
        raise InputError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA_BACKENDS[name], None)
    if backend is None:
        import torch

        raise InputError(f"attention backend {name!r}: torch {torch.__version__} does not have it; use auto")
    return sdpa_kernel([backend])


def attention_problem(name: str, device: torch.device, precision: str, heads: int, tokens: int,
                      head_dim: int) -> str | None:
    """Why backend ``name`` cannot run a model's attention (``heads`` x ``tokens`` x
    ``head_dim``, forward and backward, in ``precision`` on ``device``), or None when it can."""
    import warnings

    import torch
    import torch.nn.functional as F

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    q, k, v = (torch.zeros(1, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    try:
        with warnings.catch_warnings(record=True) as caught, attention_backend(name):
            warnings.simplefilter("always")
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    except InputError as error:
        return str(error)
    except RuntimeError as error:  # PyTorch says why in warnings, one per backend it could not take
        reasons = [str(w.message).strip() for w in caught if str(w.message).strip()]
        return ("; ".join(reasons) or str(error).strip().splitlines()[0]).rstrip(".")
    return None


def model_attention_shape(module, image: torch.Tensor) -> tuple[int, int, int] | None:
    """``(heads, tokens, head_dim)`` of the first ``F.scaled_dot_product_attention`` call of
    ``module`` on ``image`` (one image, ``(1, C, H, W)``): the module runs up to that call
    only, in eval mode and without gradients; its modes and the random number generators are
    as they were afterwards. None when it calls no SDPA."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Seen(Exception):
        pass

    class FirstAttention(TorchFunctionMode):
        shape = None

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                FirstAttention.shape = tuple(args[0].shape[1:])
                raise Seen
            return func(*args, **(kwargs or {}))

    modes = [(each, each.training) for each in module.modules()]
    devices = [image.device] if image.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), FirstAttention():
            module.eval()
            module(image)
    except Seen:
        pass
    finally:
        for each, training in modes:
            each.training = training
    return FirstAttention.shape


def check_attention_backend(name: str, module, image: torch.Tensor, precision: str,
                            key: str = "model.attention") -> None:
    """Refuse (:class:`InputError` naming ``key``) a backend that cannot run the attention
    of ``module`` (its shape found on ``image``, see :func:`model_attention_shape`) on the
    image's device, forward and backward, listing those that can, before a run starts."""
    if name == "auto":
        return
    shape = model_attention_shape(module, image)
    if shape is None:
        return  # no SDPA call: the backend changes nothing
    device = image.device
    problem = attention_problem(name, device, precision, *shape)
    if problem is None:
        return
    usable = [other for other in ATTENTION_BACKENDS[1:]
              if other != name and attention_problem(other, device, precision, *shape) is None]
    heads, tokens, head_dim = shape
    raise InputError(f"{key}={name}: PyTorch cannot run this attention backend on {device} in {precision} for the "
                     f"model's {heads} heads x {tokens} tokens x {head_dim}: {problem}. Use {key}=auto (PyTorch's "
                     "choice)" + (f" or one that runs here: {', '.join(usable)}" if usable else ""))


def compile_cache(folder: str | os.PathLike | None = None) -> Path:
    """Keep what ``torch.compile`` produces in a folder that outlives the process; returns it.

    Compiling a ViT step takes minutes; with the FX-graph and AOTAutograd caches in a
    persistent folder a later run (a restart, another job on the same storage) loads the
    compiled graphs and kernels instead. The folder is ``folder``, else
    ``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``inductor/`` in unicom's cache folder
    (:func:`unicom.models.hub.cache_dir`: ``$UNICOM_CACHE``, default ``~/.cache/unicom``);
    torch's own default lives in ``/tmp`` and is lost with the machine. Call it before the
    first compilation.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from unicom.models.hub import cache_dir

    if folder is None:
        given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # torch writes its default there when it first looks
        folder = given if given and given != default_cache_dir() else cache_dir() / "inductor"
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True  # the backward graphs too
    except (ImportError, AttributeError):
        pass
    return folder


__all__ = ["PRECISIONS", "ATTENTION_BACKENDS", "resolve_device", "resolve_precision", "autocast",
           "attention_backend", "attention_problem", "model_attention_shape",
           "check_attention_backend", "compile_cache"]
