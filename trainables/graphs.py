"""CUDA graphs of a recurrent training window: forward and backward replayed as two graphs (DESIGN §8).

A window of the fused G2-LSTM path launches two small kernels per step and layer (a GEMM and the cell), so
at AWD shapes the GPU waits on Python launch overhead; replaying captured graphs removes it. One pair of
graphs (forward, backward) is captured per input shape with `torch.cuda.make_graphed_callables`, because
AWD-LSTM's BPTT length varies from window to window. The optimiser stays outside the graphs.

Why this is safe here:
- Parameters are passed to the graphed callable as inputs, so their gradients flow back through autograd
  into `.grad` as usual, and the graph reads the parameters' own storage (no copies). The optimisers
  update in place; if a parameter's storage is ever replaced, every graph is dropped and recaptured.
- All graphs share one memory pool. A forward replay is always followed by its own backward replay before
  another graph runs (one training step at a time), and what one graph keeps between its forward and
  backward replay is exactly what another graph's capture could not have reused.
- Dropout masks, weight-drop and the noise seeds are drawn from the CUDA generator, which hands every
  replay fresh random numbers; the results are samples of the same distribution as the eager window's,
  not the same samples.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Window = Callable[..., tuple[Tensor, ...]]


class WindowGraphs:
    """Runs `window(*tensors) -> tuple of tensors` as replayed CUDA graphs while training on CUDA.

    Args:
        window: the training forward of the window; it may read `params` but no other tensor that requires
            grad, must not synchronise with the host, and must return a tuple of tensors.
        params: the parameters `window` reads; their gradients accumulate into `.grad` on backward.
        warmup: eager iterations before each capture (Triton compiles, cuBLAS picks its kernels).
        module: while it is in eval mode, calls run `window` eagerly (as they do under `torch.no_grad()`).
        capture, device_type: the capturing function (`torch.cuda.make_graphed_callables`) and the device
            whose tensors it takes; tests substitute a stand-in on "cpu". Other tensors run eagerly.
    """

    def __init__(self, window: Window, params: Sequence[nn.Parameter], *, module: nn.Module | None = None,
                 warmup: int = 3, capture: Callable | None = None, device_type: str = "cuda"):
        self.window, self.params, self.module = window, tuple(params), module
        self.warmup, self.device_type = warmup, device_type
        self.capture = capture or torch.cuda.make_graphed_callables
        self.graphs: dict[tuple, Window] = {}
        self.pool = None
        self._storage = self._param_storage()

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        if not self._graphable(args):
            return self.window(*args)
        storage = self._param_storage()
        if storage != self._storage:   # a parameter's storage was replaced: the graphs read stale memory
            self.graphs.clear()
            self._storage = storage
        key = tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args)
        graphed = self.graphs.get(key)
        if graphed is None:
            graphed = self.graphs[key] = self._capture(args)
        return graphed(*args, *self.params)

    def _graphable(self, args: tuple[Tensor, ...]) -> bool:
        training = self.module is None or self.module.training
        return training and torch.is_grad_enabled() and all(a.device.type == self.device_type for a in args)

    def _param_storage(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.params)

    def _capture(self, args: tuple[Tensor, ...]) -> Window:
        """Capture forward and backward for this input shape, into the pool every capture shares."""
        if self.pool is None and args[0].is_cuda:
            self.pool = torch.cuda.graph_pool_handle()
        count = len(args)
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)

        def window(*inputs: Tensor) -> tuple[Tensor, ...]:
            return self.window(*inputs[:count])      # the trailing inputs are `params`, read by `window` itself

        options = {"num_warmup_iters": self.warmup}
        if "pool" in inspect.signature(self.capture).parameters:   # shared pools need PyTorch >= 2.5
            options["pool"] = self.pool
        return self.capture(window, sample + self.params, **options)
