"""CUDA graphs of a recurrent training window: forward and backward replayed as two graphs (docs/design.md §8).

A window of the fused G2-LSTM path launches two small kernels per step and layer (a GEMM and the cell), so
at AWD shapes the GPU waits on Python launch overhead; replaying captured graphs removes it. One pair of
graphs (forward, backward) is captured per input shape with `torch.cuda.make_graphed_callables`, because
AWD-LSTM's BPTT length varies from window to window. The optimiser stays outside the graphs.

The contract, and how it is kept:
- Parameters are passed to the graphed callable as inputs, so the graphs read their own storage (no copies)
  and their gradients flow back through autograd. The graphs write those gradients into fixed buffers;
  each is cloned on its way to `.grad`, so accumulating over several windows sums as it does eagerly. The
  optimisers update in place; if a parameter's storage is replaced, every graph is dropped and recaptured.
  The parameter objects themselves are fixed at construction.
- All graphs share one memory pool, so a backward replay finds its forward's saved activations intact only
  if no other graphed forward ran in between. One training step at a time keeps that; a backward that
  comes too late raises instead of returning silently wrong gradients.
- Dropout masks, weight-drop and the noise seeds are drawn from the CUDA generator, which hands every
  replay fresh random numbers: samples of the same distribution as the eager window's, not the same
  samples, so a run with graphs is not bit-identical to one without (or to itself after a resume).
- Each captured shape keeps parameter-sized gradient buffers (~80 MB at AWD sizes), so at most
  `max_graphs` shapes are captured, the first ones met (AWD's common lengths); rarer ones run eagerly.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Window = Callable[..., tuple[Tensor, ...]]
MAX_GRAPHS = 32
GRAPHED_DEVICE = "cuda"    # the device type whose windows are captured; windows on any other run eagerly


class _FreshGrad(torch.autograd.Function):
    """Identity whose backward clones: a graph's gradient buffer must never become a parameter's `.grad`."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)        # same storage, so the graph reads the parameter without copying it

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clone()


class WindowGraphs:
    """Runs `window(*tensors) -> tuple of tensors` as replayed CUDA graphs while training on CUDA.

    Args:
        window: the training forward of the window; it may read `params` but no other tensor that requires
            grad, must not synchronise with the host, and must return a tuple of tensors.
        params: the parameters `window` reads; their gradients accumulate into `.grad` on backward.
        module: while it is in eval mode, calls run `window` eagerly (as they do under `torch.no_grad()`).
        warmup: eager iterations before each capture (Triton compiles, cuBLAS picks its kernels).
        max_graphs: input shapes captured at most; calls with other shapes run eagerly.
    """

    def __init__(self, window: Window, params: Sequence[nn.Parameter], *, module: nn.Module | None = None,
                 warmup: int = 3, max_graphs: int = MAX_GRAPHS):
        self.window, self.params, self.module = window, tuple(params), module
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: dict[tuple, Window] = {}
        self.pool = None
        self.replays = 0           # graphed forwards so far; a backward checks that its own was the last
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
            if len(self.graphs) >= self.max_graphs:
                return self.window(*args)
            graphed = self.graphs[key] = self._capture(args)
        self.replays += 1
        outputs = graphed(*args, *(_FreshGrad.apply(p) for p in self.params))
        self._guard_backward(outputs, self.replays)
        return outputs

    def _graphable(self, args: tuple[Tensor, ...]) -> bool:
        training = self.module is None or self.module.training
        return training and torch.is_grad_enabled() and all(a.device.type == GRAPHED_DEVICE for a in args)

    def _param_storage(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.params)

    def _guard_backward(self, outputs: tuple[Tensor, ...], replay: int) -> None:
        """Make this window's backward raise if another graphed forward has overwritten its saved activations."""
        def check(_grads):
            if self.replays != replay:
                raise RuntimeError("backward through a CUDA-graphed window after another graphed forward: its "
                                   "saved activations were overwritten (run backward before the next window's "
                                   "forward, or set train.cuda_graphs=false)")
        needing = [o for o in outputs if o.requires_grad]
        if needing:
            torch.autograd.graph.register_multi_grad_hook(needing, check, mode="any")

    def _capture(self, args: tuple[Tensor, ...]) -> Window:
        """Capture forward and backward for this input shape, into the pool every capture shares."""
        if self.pool is None and args[0].is_cuda:
            self.pool = torch.cuda.graph_pool_handle()
        count = len(args)
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)

        def window(*inputs: Tensor) -> tuple[Tensor, ...]:
            return self.window(*inputs[:count])      # the trailing inputs are `params`, read by `window` itself

        capture = torch.cuda.make_graphed_callables
        options = {"num_warmup_iters": self.warmup}
        if "pool" in inspect.signature(capture).parameters:   # shared pools need PyTorch >= 2.3
            options["pool"] = self.pool
        return capture(window, sample + self.params, **options)
