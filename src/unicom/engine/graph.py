"""Training steps captured as CUDA graphs: the host launches a whole step at once.

A step of a classification head alone (PartialFC over features already computed, a neck
over cached features) is about a hundred small kernels that the GPU runs in a fraction of
the time the host takes to launch them one by one. :class:`CapturedStep` records the step
once as a CUDA graph and then replays it: one launch per step, whatever the kernel count.

What a captured step may do is what CUDA graphs allow: no value read on the host, no
shape that depends on the data (a step that passes ``torch.cuda.set_sync_debug_mode("error")``
qualifies), random numbers from PyTorch's default generator or from the generators given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from unicom.errors import InputError


class CapturedStep:
    """``step(*inputs)`` run as one CUDA graph per call after ``warmup`` eager calls.

    ``step`` is a whole optimiser step (forward, ``zero_grad(set_to_none=True)``, backward,
    ``optimizer.step()``) returning a tensor or a tuple of tensors (the loss, ...). The first
    ``warmup`` calls run it eagerly on a side stream: the first as it is (it makes the
    optimiser's state), the others in the optimiser's capture mode, so that every kernel the
    capture records is built before it (nothing is compiled while capturing); the next call
    captures it (``torch.cuda.CUDAGraph``) and every later
    call copies its inputs into the graph's and replays it. Every call is a real step, and
    returns that step's outputs (copies: they stay valid after the next call).

    The graph is captured again when the inputs' shapes or dtypes change, when a
    hyperparameter other than the learning rate changes, and after ``replays`` replays (the
    optimiser's tables of bias corrections are made for that many). The learning rate is
    read from ``optimizer.param_groups`` at every call, so schedules work unchanged.

    Args:
        step: the step; it must not make the host wait for the device.
        optimizer: an optimiser whose steps can be captured (:class:`unicom.optim.SparseAdamW`:
            :meth:`~unicom.optim.SparseAdamW.capturing`).
        generators: the CUDA generators the step draws from besides PyTorch's default one
            (:meth:`unicom.losses.PartialFC.generators`); their sequences continue across
            replays as across eager calls.
        warmup: eager calls before the capture (at least 2).
        replays: replays of one capture.
    """

    def __init__(self, step: Callable, optimizer, generators: Sequence[torch.Generator] = (), warmup: int = 3,
                 replays: int = 1000):
        if not (hasattr(optimizer, "capturing") and hasattr(optimizer, "load_learning_rates")):
            raise TypeError(f"CapturedStep: {type(optimizer).__name__} cannot take part in a captured step; "
                            "use unicom.optim.SparseAdamW")
        if int(warmup) < 2 or int(replays) < 1:
            raise ValueError(f"CapturedStep: warmup must be at least 2 and replays at least 1, got {warmup} and {replays}")
        self.step, self.optimizer, self.generators = step, optimizer, tuple(generators)
        self.warmup, self.replays = int(warmup), int(replays)
        self.calls = 0
        self.captures = 0  # how many times the step was captured (for reports and tests)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = None
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._single = True
        self._signature: tuple = ()
        self._settings: list = []
        self._replays_left = 0
        self._side: torch.cuda.Stream | None = None

    def __call__(self, *inputs: torch.Tensor):
        device = self._device(inputs)
        self.calls += 1
        if self.calls <= self.warmup:
            if self._side is None:
                self._side = torch.cuda.Stream(device)
            self._side.wait_stream(torch.cuda.current_stream(device))
            mode = self.optimizer.capturing(self.replays) if self.calls > 1 else contextlib.nullcontext()
            with torch.cuda.stream(self._side), mode:
                outputs = self.step(*inputs)
            torch.cuda.current_stream(device).wait_stream(self._side)
            return outputs
        if (self._graph is None or self._replays_left == 0 or self._signature != _signature(inputs)
                or self._settings != self._hyperparameters()):
            self._capture(inputs)
        else:
            with torch.no_grad():  # the step may have made an input a leaf that requires grad
                for static, given in zip(self._inputs, inputs):
                    static.copy_(given, non_blocking=True)
        self.optimizer.load_learning_rates()
        self._graph.replay()
        self._replays_left -= 1
        outputs = [t.clone() for t in self._outputs]
        return outputs[0] if self._single else tuple(outputs)

    def _device(self, inputs) -> torch.device:
        if not inputs or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            found = ", ".join(str(t.device) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)
            raise InputError(f"CapturedStep: the inputs must be CUDA tensors (got {found or 'none'}); "
                             "on other devices call the step itself")
        return inputs[0].device

    def _hyperparameters(self) -> list:
        return [sorted((k, v) for k, v in group.items() if k not in ("params", "lr")) for group in self.optimizer.param_groups]

    def _capture(self, inputs) -> None:
        self._graph = None  # its memory goes back to the pool the new one is captured in
        graph = torch.cuda.CUDAGraph()
        if self.generators and not hasattr(graph, "register_generator_state"):
            raise RuntimeError(f"CapturedStep: PyTorch {torch.__version__} cannot capture steps that draw from "
                               "generators of their own (it lacks CUDAGraph.register_generator_state)")
        for generator in self.generators:
            graph.register_generator_state(generator)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._inputs = [t.detach().clone() for t in inputs]
        try:
            with self.optimizer.capturing(self.replays):
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    outputs = self.step(*self._inputs)
        except RuntimeError as error:
            raise RuntimeError(f"CapturedStep: the step cannot be captured as a CUDA graph ({error}). A captured step "
                               "reads no value on the host and makes no shape from data: run it eagerly under "
                               "torch.cuda.set_sync_debug_mode('error') to see where it does") from error
        self._single = isinstance(outputs, torch.Tensor)
        self._outputs = [outputs] if self._single else list(outputs)
        if not all(isinstance(t, torch.Tensor) for t in self._outputs):
            raise TypeError("CapturedStep: the step must return a tensor or a tuple of tensors")
        self._graph, self._replays_left = graph, self.replays
        self._signature, self._settings = _signature(inputs), self._hyperparameters()
        self.captures += 1


def _signature(inputs) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
