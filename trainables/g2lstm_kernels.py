"""The fused G2-LSTM layer: one cuBLAS GEMM plus one Triton pointwise kernel per step, forward and backward.

Same maths and layout as `lstm_layer_reference` (DESIGN §2): time-major, weights in `nn.LSTM` layout, gate rows
in order [i, f, g, o]. DESIGN §8 explains the design: the input GEMM runs once for the window, each step runs
one GEMM `h @ W_hh.T` into a preallocated (B, 4H) buffer and one kernel that adds it to the input part and the
bias, adds the logistic noise to i/f, applies the gates and updates (c, h).
The noise is never stored: the kernels draw it from Philox with counter (state element, step) and key `seed`,
so backward regenerates exactly what forward added. Backward walks the window in reverse with one kernel and one
`dA_t @ W_hh` per step; dW_hh, dW_ih, db and dx are single GEMMs over the stacked dA (T, B, 4H) afterwards.

Buffers of one window (n = B·H state elements):
    xw, a  (T, B, 4H)  fp32  x W_ih^T, overwritten in place by the pre-activations x W_ih^T + b + h W_hh^T,
                             [i, f, g, o], saved for backward
    hw     (B, 4H)     fp32  h_{t-1} W_hh^T of the current step
    c      (T+1, B, H) fp32  cell states, c[0] = c_0, saved for backward
    y      (T, B, H)   fp32  outputs h_1..h_T
    hq     (T+1, B, H) bf16  h_0..h_T as GEMM operands (precision="bf16" only)

With precision="bf16" only GEMM *operands* are bf16: every GEMM accumulates in fp32 and writes fp32 (`_mm`), so
pre-activations, dh, dx and the weight gradients are never rounded to bf16. Every launch runs under the device
of its tensors (`_on_device`), not whichever CUDA device happens to be current.

Triton is imported and the kernels are jitted on first use (`_load_triton`), so this module imports on machines
without it. `TRITON_INTERPRET=1` (the CPU interpreter the tests use) is read twice: when the kernels are jitted
(`triton.jit` picks interpreter or compiler as it decorates, once per process), and by `interpreting()` when
`fused_lstm_layer` is handed CPU tensors.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from trainables.config import PRECISIONS
from trainables.fields import check_choice
from trainables.gates import NOISE_EPS, GateMath

MAX_BLOCK = 256        # state elements per program: enough programs to fill an H100 at B·H ≈ 16k

triton = tl = None     # bound by _load_triton(); the Triton functions below read them as module globals
_TRITON_FUNCTIONS: dict[str, dict] = {}   # name -> triton.jit options, filled by @_triton_fn


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def fused_available(device: torch.device) -> bool:
    """Whether fused_lstm_layer can run on `device`: triton is installed and the device is CUDA (or interpreted)."""
    return (device.type == "cuda" or interpreting()) and importlib.util.find_spec("triton") is not None


def _triton_fn(**options):
    """Marks a Triton function for `_load_triton`, which jits it in place on first use."""
    def mark(fn):
        _TRITON_FUNCTIONS[fn.__name__] = options
        return fn
    return mark


@functools.cache
def _load_triton() -> None:
    """Import triton and jit the marked functions, once.

    Late on purpose: `triton.jit` picks interpreter or compiler when it decorates, and both it and the
    interpreter resolve calls between Triton functions through this module's globals, hence the rebinding.
    """
    global triton, tl
    try:
        import triton
        import triton.language as tl
    except ImportError as err:
        raise RuntimeError("impl='fused' needs triton (pip install triton); use impl='auto' without it") from err
    for name, options in _TRITON_FUNCTIONS.items():
        globals()[name] = triton.jit(globals()[name], **options)


@_triton_fn()
def _tanh(x):
    # tl has no tanh and libdevice's does not run in the interpreter; below |x| = 1/8, where 1 - e^{-2|x|}
    # cancels, a Taylor series (error < 2e-9 relative) replaces the exponential form.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    t = tl.where(ax < 0.125, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@_triton_fn()
def _to_bf16(x):
    """x rounded to the nearest bf16, ties to even, by integer arithmetic: Triton's interpreter truncates in
    `.to(bf16)` while compiled kernels round, and the tests must check what the GPU computes."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)   # exact: the low 16 bits are zero


@_triton_fn()
def _if_noise(seed, step, k, p, EPS: tl.constexpr = NOISE_EPS):
    """L·B for the i and f gates of state elements k at `step`: one Philox call gives U_i, U_f, B_i, B_f."""
    zero = k * 0
    r_ui, r_uf, r_bi, r_bf = tl.philox(seed, k, zero + step, zero, zero)
    u_i = tl.uint_to_uniform_float(r_ui)
    u_f = tl.uint_to_uniform_float(r_uf)
    l_i = tl.log(u_i + EPS) - tl.log(1.0 + EPS - u_i)          # logistic, truncated by ε (DESIGN §2)
    l_f = tl.log(u_f + EPS) - tl.log(1.0 + EPS - u_f)
    keep_i = tl.uint_to_uniform_float(r_bi) < p
    keep_f = tl.uint_to_uniform_float(r_bf) < p
    return tl.where(keep_i, l_i, 0.0), tl.where(keep_f, l_f, 0.0)


@_triton_fn()
def _cell_gates(a_i, a_f, a_g, a_o, seed, step, k, scale, p, NOISE: tl.constexpr):
    """(i, f, g, o) from the pre-activations; forward and backward share it, so both see the same noise."""
    if NOISE:
        n_i, n_f = _if_noise(seed, step, k, p)
        a_i += n_i
        a_f += n_f
    i = tl.sigmoid(a_i * scale)
    f = tl.sigmoid(a_f * scale)
    return i, f, _tanh(a_g), tl.sigmoid(a_o)


@_triton_fn(do_not_specialize=["step"])
def _forward_step(xw, hw, bias, a, c, y, hq, gates, seed_ptr, step, n, H, scale, p,
                  NOISE: tl.constexpr, LOWP: tl.constexpr, RECORD: tl.constexpr, BLOCK: tl.constexpr):
    """Step `step`: a = xw[t] + hw + b, gates, c[t+1] = f c[t] + i g, y[t] = o tanh(c[t+1])."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)       # state element (b, j), flattened
    mask = k < n
    j = k % H
    row = (k // H) * 4 * H + j                               # its i column in a (B, 4H) row block
    t = step.to(tl.int64)
    at = a + t * 4 * n
    xt = xw + t * 4 * n
    a_i = tl.load(xt + row, mask).to(tl.float32) + tl.load(hw + row, mask).to(tl.float32) + tl.load(bias + j, mask)
    a_f = (tl.load(xt + row + H, mask).to(tl.float32) + tl.load(hw + row + H, mask).to(tl.float32)
           + tl.load(bias + j + H, mask))
    a_g = (tl.load(xt + row + 2 * H, mask).to(tl.float32) + tl.load(hw + row + 2 * H, mask).to(tl.float32)
           + tl.load(bias + j + 2 * H, mask))
    a_o = (tl.load(xt + row + 3 * H, mask).to(tl.float32) + tl.load(hw + row + 3 * H, mask).to(tl.float32)
           + tl.load(bias + j + 3 * H, mask))
    tl.store(at + row, a_i, mask)
    tl.store(at + row + H, a_f, mask)
    tl.store(at + row + 2 * H, a_g, mask)
    tl.store(at + row + 3 * H, a_o, mask)
    i, f, g, o = _cell_gates(a_i, a_f, a_g, a_o, tl.load(seed_ptr), step, k, scale, p, NOISE)
    c_new = f * tl.load(c + t * n + k, mask) + i * g
    h = o * _tanh(c_new)
    tl.store(c + (t + 1) * n + k, c_new, mask)
    tl.store(y + t * n + k, h, mask)
    if LOWP:
        tl.store(hq + (t + 1) * n + k, _to_bf16(h), mask)
    if RECORD:
        g_row = gates + t * 2 * n + (k // H) * 2 * H + j
        tl.store(g_row, i, mask)
        tl.store(g_row + H, f, mask)


@_triton_fn(do_not_specialize=["step"])
def _backward_step(a, c, dy, dh, dc, da, daq, seed_ptr, step, n, H, scale, p,
                   NOISE: tl.constexpr, LOWP: tl.constexpr, BLOCK: tl.constexpr):
    """dA[t] (B, 4H) from dh = dy[t] + dA[t+1] W_hh and dc; dc becomes dc_{t-1} in place."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    j = k % H
    row = (k // H) * 4 * H + j
    t = step.to(tl.int64)
    at = a + t * 4 * n
    i, f, g, o = _cell_gates(tl.load(at + row, mask), tl.load(at + row + H, mask), tl.load(at + row + 2 * H, mask),
                            tl.load(at + row + 3 * H, mask), tl.load(seed_ptr), step, k, scale, p, NOISE)
    c_prev = tl.load(c + t * n + k, mask)
    tc = _tanh(tl.load(c + (t + 1) * n + k, mask))
    d_h = tl.load(dy + t * n + k, mask) + tl.load(dh + k, mask).to(tl.float32)
    d_c = tl.load(dc + k, mask) + d_h * o * (1.0 - tc * tc)
    # dσ(s·a)/da = s·σ(1 − σ); the noise shifts a but not this derivative, given the recomputed i, f.
    da_i = d_c * g * i * (1.0 - i) * scale
    da_f = d_c * c_prev * f * (1.0 - f) * scale
    da_g = d_c * i * (1.0 - g * g)
    da_o = d_h * tc * o * (1.0 - o)
    tl.store(dc + k, d_c * f, mask)
    dt = da + t * 4 * n
    tl.store(dt + row, da_i, mask)
    tl.store(dt + row + H, da_f, mask)
    tl.store(dt + row + 2 * H, da_g, mask)
    tl.store(dt + row + 3 * H, da_o, mask)
    if LOWP:
        qt = daq + t * 4 * n
        tl.store(qt + row, _to_bf16(da_i), mask)
        tl.store(qt + row + H, _to_bf16(da_f), mask)
        tl.store(qt + row + 2 * H, _to_bf16(da_g), mask)
        tl.store(qt + row + 3 * H, _to_bf16(da_o), mask)


def _mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b in fp32: accumulated and returned in fp32 whatever the operand dtype (bf16 operands stay bf16 on CUDA;
    elsewhere they are widened, which is exact: bf16 values and their products are exact in fp32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' own (cuda:1 is not cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(n: int) -> tuple[tuple[int], int]:
    """(grid, BLOCK) covering n state elements."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(n)))
    return (triton.cdiv(n, block),), block


def _seed_tensor(seed: int | Tensor, device: torch.device) -> Tensor:
    """The seed as a 1-element int64 tensor on `device`; kernels load it, so a CUDA graph can replay new seeds."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
            raise ValueError(f"seed tensor must be one int64 on {device}, got {seed.dtype} {tuple(seed.shape)} "
                             f"on {seed.device}")
        return seed.reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)


class _FusedLSTMLayer(torch.autograd.Function):
    """One layer over a window; see fused_lstm_layer."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, seed, scale, p, record, lowp):
        _load_triton()
        steps, batch, _ = x.shape
        hidden = h0.shape[-1]
        n = batch * hidden
        op = torch.bfloat16 if lowp else torch.float32     # GEMM operand dtype; everything else stays fp32
        x_op, w_ih_op, w_hh_op = x.to(op).contiguous(), w_ih.to(op), w_hh.to(op)
        xw = _mm(x_op.view(steps * batch, -1), w_ih_op.t()).view(steps, batch, 4 * hidden)  # (T, B, 4H) fp32
        a = xw                                                           # (T, B, 4H), [i, f, g, o], in place
        bias = (b_ih + b_hh).float().contiguous()                        # (4H,), added in the kernel
        c = x.new_empty(steps + 1, batch, hidden)                        # (T+1, B, H), c[0] = c_0
        c[0] = c0
        y = x.new_empty(steps, batch, hidden)                            # (T, B, H)
        hq = None
        if lowp:
            hq = torch.empty(steps + 1, batch, hidden, dtype=op, device=x.device)   # (T+1, B, H), GEMM operands
            hq[0] = h0
        gates = x.new_empty(steps, batch, 2 * hidden) if record else None          # (T, B, 2H), [i, f]
        hw = torch.empty(batch, 4 * hidden, device=x.device)                       # (B, 4H), h_{t-1} W_hh^T
        h_prev = hq[0] if lowp else h0
        grid, block = _grid(n)
        for t in range(steps):
            _mm(h_prev, w_hh_op.t(), out=hw)
            _forward_step[grid](xw, hw, bias, a, c, y, hq if lowp else y, gates if record else y, seed, t,
                                n, hidden, scale, p, NOISE=p > 0, LOWP=lowp, RECORD=record, BLOCK=block)
            h_prev = hq[t + 1] if lowp else y[t]
        ctx.save_for_backward(x_op, h0, w_ih_op, w_hh_op, a, c, y, hq, seed)
        ctx.scale, ctx.p, ctx.lowp = scale, p, lowp
        if record:
            ctx.mark_non_differentiable(gates)
        return y, y[-1].clone(), c[-1].clone(), gates

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h, grad_c, _grad_gates):
        # backward may run inside the caller's autocast, and on an autograd thread with another current device
        with torch.autocast(grad_y.device.type, enabled=False), _on_device(grad_y.device):
            return _FusedLSTMLayer._backward(ctx, grad_y, grad_h, grad_c)

    @staticmethod
    def _backward(ctx, grad_y, grad_h, grad_c):
        """Reverse-time loop, then the weight and input gradients as single GEMMs over the stacked dA."""
        x_op, h0, w_ih_op, w_hh_op, a, c, y, hq, seed = ctx.saved_tensors
        steps, batch, hidden = y.shape
        n = batch * hidden
        dy = grad_y.clone(memory_format=torch.contiguous_format)      # (T, B, H), dL/dh_t from above
        dy[-1] += grad_h
        dc = grad_c.clone(memory_format=torch.contiguous_format)      # (B, H), becomes dc_{t-1} step by step
        dh = torch.zeros(batch, hidden, device=y.device)              # (B, H), dA_{t+1} W_hh
        da = torch.empty_like(a)                                      # (T, B, 4H), [i, f, g, o]
        daq = torch.empty_like(a, dtype=torch.bfloat16) if ctx.lowp else da
        grid, block = _grid(n)
        for t in reversed(range(steps)):
            _backward_step[grid](a, c, dy, dh, dc, da, daq, seed, t, n, hidden, ctx.scale, ctx.p,
                                 NOISE=ctx.p > 0, LOWP=ctx.lowp, BLOCK=block)
            if t > 0 or ctx.needs_input_grad[1]:
                _mm(daq[t], w_hh_op, out=dh)
        da_op = daq.view(steps * batch, 4 * hidden)                   # (T·B, 4H) GEMM operand
        h_prev = hq[:-1] if ctx.lowp else torch.cat([h0[None], y[:-1]])   # (T, B, H), h_0..h_{T-1}
        need = ctx.needs_input_grad
        dx = _mm(da_op, w_ih_op).view(steps, batch, -1) if need[0] else None
        dw_ih = _mm(da_op.t(), x_op.view(steps * batch, -1)) if need[3] else None
        dw_hh = _mm(da_op.t(), h_prev.reshape(steps * batch, hidden)) if need[4] else None
        db = da.sum((0, 1))
        # Two tensors: autograd may adopt a returned gradient as .grad, and b_ih, b_hh must not share storage.
        return (dx, dh if need[1] else None, dc if need[2] else None, dw_ih, dw_hh,
                db if need[5] else None, db.clone() if need[6] else None, None, None, None, None, None)


def fused_lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                     gate: GateMath, seed: int | Tensor, record_gates: bool = False, precision: str = "fp32"):
    """One G2-LSTM layer over a window on the fused path; the contract of `lstm_layer_reference` plus a seed.

    Args:
        x: (T, B, in) float32; h0, c0: (B, H); w_ih (4H, in), w_hh (4H, H), b_ih, b_hh (4H,), rows [i, f, g, o].
            Weight-drop belongs to the caller: pass the dropped w_hh and its gradient flows back through it.
        gate: the i/f gate maths; `gate.hard` (evaluation only) is refused.
        seed: the noise key, an int or a 1-element int64 tensor on x's device (the form a CUDA graph can
            replay). Draw a fresh one per layer and forward: the same seed gives the same noise.
        precision: "fp32", or "bf16" for bf16 GEMM operands (cell state, gates, noise, accumulation and the
            returned gradients stay fp32).

    Returns (y (T, B, H), h_T (B, H), c_T (B, H), i/f gate values (T, B, 2H) or None).
    """
    if gate.hard:
        raise ValueError("fused_lstm_layer does not run hard gates (eval_gate='hard' is evaluation-only); "
                         "use lstm_layer_reference")
    check_choice("precision", precision, PRECISIONS)
    if x.dim() != 3 or h0.dim() != 2 or h0.shape != c0.shape or w_hh.shape != (4 * h0.shape[1], h0.shape[1]):
        raise ValueError(f"fused_lstm_layer: bad shapes x {tuple(x.shape)}, h0 {tuple(h0.shape)}, "
                         f"c0 {tuple(c0.shape)}, w_hh {tuple(w_hh.shape)}")
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if any(t.dtype != torch.float32 for t in tensors):
        raise TypeError("fused_lstm_layer takes float32 tensors (use precision='bf16' for bf16 GEMMs)")
    if not (x.is_cuda or interpreting()) or any(t.device != x.device for t in tensors):
        raise ValueError(f"fused_lstm_layer needs all tensors on one CUDA device (or TRITON_INTERPRET=1), "
                         f"got x on {x.device}")
    with torch.autocast(x.device.type, enabled=False), _on_device(x.device):   # our precision, the tensors' device
        return _FusedLSTMLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, _seed_tensor(seed, x.device),
                                     float(gate.scale), float(gate.noise_p), record_gates, precision == "bf16")
