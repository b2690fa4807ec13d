"""The noise the fused G2-LSTM kernels add, read back for tests and benchmarks/gpu_checks.py (not a test module).

The kernels never store their noise: they draw it from Philox in `_if_noise` (trainables/g2lstm_kernels.py).
`_noise_window` calls that same production function, so what it writes is what `fused_lstm_layer` adds with the
same seed and p. Triton resolves calls between Triton functions through the caller's module globals, so this
module binds `_if_noise` to the production function once `_load_triton` has jitted it, and jits `_noise_window`
in the mode the production kernels were jitted in (interpreter or compiler), whatever TRITON_INTERPRET says now.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from trainables import g2lstm_kernels

triton = tl = _if_noise = None   # bound by _noise_kernel(), as g2lstm_kernels binds its own


def _noise_window(out, seed_ptr, n, H, p, BLOCK: tl.constexpr):
    """out (T, B, 2H), [i, f]: the noise forward_step adds at step program_id(1)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    step = tl.program_id(1)
    n_i, n_f = _if_noise(tl.load(seed_ptr), step, k, p)
    o_row = out + step.to(tl.int64) * 2 * n + (k // H) * 2 * H + k % H
    tl.store(o_row, n_i, mask)
    tl.store(o_row + H, n_f, mask)


@functools.cache
def _noise_kernel():
    """`_noise_window` jitted like the production kernels, calling their jitted `_if_noise`."""
    global triton, tl, _if_noise
    g2lstm_kernels._load_triton()
    triton, tl, _if_noise = g2lstm_kernels.triton, g2lstm_kernels.tl, g2lstm_kernels._if_noise
    if isinstance(_if_noise, triton.runtime.JITFunction):
        return triton.jit(_noise_window)
    # what triton.jit returned for the production kernels under TRITON_INTERPRET (and imported to do so)
    return triton.runtime.interpreter.InterpretedFunction(_noise_window)


def gate_noise(seed: int | Tensor, steps: int, batch: int, hidden: int, p: float,
               device: torch.device | str | None = None) -> Tensor:
    """The noise L·B (T, B, 2H), [i, f], that fused_lstm_layer adds with this seed and p."""
    kernel = _noise_kernel()
    out = torch.zeros(steps, batch, 2 * hidden, device=device)
    if p > 0:
        (blocks,), block = g2lstm_kernels._grid(batch * hidden)
        kernel[(blocks, steps)](out, g2lstm_kernels._seed_tensor(seed, out.device), batch * hidden, hidden, float(p),
                                BLOCK=block)
    return out
