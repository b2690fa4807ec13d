"""The CPU path of noisy G2-LSTM training: one `autograd.Function` per layer with a hand-written backward through time.

Same maths and layout as `lstm_layer_reference` (`trainables/g2lstm.py`): time-major, weights in `nn.LSTM` layout,
gate rows [i, f, g, o]; i, f = σ((a + L·B)·s), g = tanh(a), o = σ(a) with a = x W_ih^T + b + h W_hh^T. The caller
draws the window's noise L·B (so this path and the reference consume the RNG alike: one seed, the same noise). The
design is the GPU path's (`trainables/g2lstm_kernels.py`) in stock PyTorch ops, since nothing here may need a C++
compiler at install time:

- The input GEMM runs once for the window, the noise and the temperature s are applied to its i/f columns once, and
  s is folded into the i/f rows of a copy of W_hh, so each step is an ordinary LSTM cell: one GEMM with the input part
  added in the same call, σ over all four blocks, tanh over g, and four ops for (c, h).
- Backward keeps gradients in the model's own coordinates (s goes into the gate derivatives), so the recurrent GEMM and
  dx use the weights as given, and dW_ih, dW_hh, db come out as single GEMMs or a reduction over the stacked
  pre-activation gradients dA (T, B, 4H) after the loop, with nothing to map back.
- Everything of the backward that does not depend on the gradients flowing in (σ', tanh', the products with g, c, i)
  is computed for the whole window before the reverse loop, leaving one GEMM and four small ops per step.
- The noise is not kept: backward needs only the activations, and those already contain it.
- GEMMs that reuse one weight (W_hh at every step) run on oneDNN with the weight packed once per window (`Linear`).

Buffers of one window:
    xw   (T, B, 4H)  x W_ih^T + b, then s·(· + n) on the i/f columns
    act  (T, B, 4H)  activations [i, f, g, o] (σ, σ, tanh, σ); saved
    c    (T+1, B, H) cell states, c[0] = c_0; saved
    tc   (T, B, H)   tanh c_1..c_T; saved
    y    (T, B, H)   outputs h_1..h_T; saved (with h_0, the operands of dW_hh)
    da   (T, B, 4H)  backward: dL/da, [i, f, g, o]
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from trainables.gates import GateMath


@functools.cache
def _onednn_linear() -> bool:
    """Whether PyTorch's oneDNN linear ops (the library behind `nn.LSTM` on the CPU) are there to call."""
    try:
        ops = (torch.ops.mkldnn._linear_pointwise.binary, torch.ops.mkldnn._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False
    return all(ops) and torch.backends.mkldnn.is_available()


# Per-step GEMMs (B rows) at least this big run on oneDNN: below it the general GEMM was faster in the loop (by ~12%
# at B = 20, H = 200), above it oneDNN with a packed weight (~25% at H = 650), on the CPU of docs/cpu_speed.md
ONEDNN_MIN_STEP_MACS = 1 << 23


class Linear:
    """x @ w.T for a weight w (N, K), on oneDNN for fp32 CPU tensors where it is the faster, else `torch.mm`.

    `per_step`: w serves many GEMMs of `rows` rows in a row (W_hh at every step of a window). With few rows the
    general GEMM repacks w on every call; oneDNN gets w packed once (when contiguous; W_hh^T as a view of W_hh is
    already in a layout it streams well), which made the per-step GEMMs ~1.4x faster at B = 20, H = 650.
    """

    def __init__(self, w: Tensor, rows: int, *, per_step: bool = False):
        self.onednn = (w.dtype == torch.float32 and w.device.type == "cpu" and _onednn_linear()
                       and (not per_step or rows * w.shape[0] * w.shape[1] >= ONEDNN_MIN_STEP_MACS))
        packed = self.onednn and per_step and w.is_contiguous()
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, rows) if packed else w

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, bias, "none", [], "")
        return x @ self.w.t() if bias is None else torch.addmm(bias, x, self.w.t())

    def add(self, x: Tensor, other: Tensor) -> Tensor:
        """other + x @ w.T in one call (a oneDNN post-op)."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.w, None, "add")
        return torch.addmm(other, x, self.w.t())


def _row_factors(hidden: int, scale: float, like: Tensor) -> Tensor:
    """(4H,) factors of the pre-activation rows [i, f, g, o]: [s, s, 2, 1]."""
    rows = like.new_ones(4 * hidden)
    rows[:2 * hidden] = scale
    rows[2 * hidden:3 * hidden] = 2.0
    return rows


class _CPULSTMLayer(torch.autograd.Function):
    """One layer over a window; see cpu_lstm_layer."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, noise, scale, record):
        steps, batch, _ = x.shape
        h = h0.shape[-1]
        xw = Linear(w_ih, steps * batch)(x.reshape(steps * batch, -1), b_ih + b_hh)
        xw = xw.view(steps, batch, 4 * h)                                    # (T, B, 4H), [i, f, g, o]
        if noise is not None:
            xw[..., :2 * h].add_(noise)
        # Pre-activation row factors [s, s, 2, 1]: σ((a + n)·s) for i, f, and σ(2a) for g, since tanh a = 2σ(2a) − 1
        # and PyTorch's tanh costs ~5x its sigmoid per element on the CPU: one σ over all four blocks per step.
        rows = _row_factors(h, scale, xw)
        xw.mul_(rows)
        recurrent = Linear(w_hh * rows[:, None], batch, per_step=True)
        act = xw                              # each step overwrites its xw[t] with the activations, in place
        # The cell state is kept as −2c and tanh c as q = σ(−2c), tanh c = 1 − 2q: then h = o − 2·o·q is one op.
        nc2 = x.new_empty(steps + 1, batch, h)                                # (T+1, B, H), −2c_0..−2c_T
        torch.mul(c0, -2.0, out=nc2[0])
        q = x.new_empty(steps, batch, h)                                      # (T, B, H), σ(−2c_1..−2c_T)
        y = x.new_empty(steps, batch, h)                                      # (T, B, H), h_1..h_T
        # per-step views made once: Python indexing inside the loop costs as much as a small op
        i, f, sg, o = (act[..., k * h:(k + 1) * h].unbind(0) for k in range(4))
        h_t = h0
        for t, (xw_t, c_t, c_next, q_t, y_t) in enumerate(zip(
                xw.unbind(0), nc2[:-1].unbind(0), nc2[1:].unbind(0), q.unbind(0), y.unbind(0))):
            a = recurrent.add(h_t, xw_t)                                      # (B, 4H), [i, f, g, o], scaled
            torch.sigmoid(a, out=xw_t)                                        # [i, f, σ(2a_g), o]
            torch.mul(f[t], c_t, out=c_next)                                  # −2c_t = f·(−2c_{t−1}) − 2i·g,
            c_next.addcmul_(i[t], sg[t], value=-4.0).add_(i[t], alpha=2.0)    # g = 2σ(2a_g) − 1
            torch.sigmoid(c_next, out=q_t)
            torch.addcmul(o[t], o[t], q_t, value=-2.0, out=y_t)               # h_t = o tanh c_t
            h_t = y_t
        ctx.save_for_backward(x, h0, w_ih, w_hh, act, nc2, q, y)
        ctx.scale = scale
        gates = act[..., :2 * h].clone() if record else None                 # (T, B, 2H), [i, f]
        if record:
            ctx.mark_non_differentiable(gates)
        return y, y[-1].clone(), nc2[-1] * -0.5, gates

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h, grad_c, _grad_gates):
        x, h0, w_ih, w_hh, act, nc2, q, y = ctx.saved_tensors
        steps, batch, h = y.shape
        need, scale = ctx.needs_input_grad, ctx.scale
        i_f, i, f, o = act[..., :2 * h], act[..., :h], act[..., h:2 * h], act[..., 3 * h:]
        g = act[..., 2 * h:3 * h] * 2.0 - 1.0                                     # (T, B, H), tanh a_g
        # Window-wide factors; with them each step is linear in (dh_t, dc_t), s being the i/f temperature:
        #   dc_t  = dc_{t+1} f_{t+1} + dh_t · o (1 − tanh² c_t)                          (dc_from_dh)
        #   dA_o  = dh_t · tanh c_t · o (1 − o)                                          (da_o_from_dh)
        #   dA_if = dc_t · s · [g i (1 − i), c_{t−1} f (1 − f)],  dA_g = dc_t · i (1 − g²)  (da_from_dc)
        # with tanh c = 1 − 2q and 1 − tanh² c = 4q(1 − q)
        dc_from_dh = torch.addcmul(q, q, q, value=-1).mul_(o).mul_(4.0)            # (T, B, H)
        da_o_from_dh = torch.addcmul(o, o, o, value=-1).mul_(q.mul(-2.0).add_(1.0))  # (T, B, H)
        da_from_dc = act.new_empty(steps, batch, 3 * h)                             # (T, B, 3H), [i, f, g]
        torch.addcmul(i_f, i_f, i_f, value=-1, out=da_from_dc[..., :2 * h])         # σ' = σ − σ²
        da_from_dc[..., :h].mul_(g)
        da_from_dc[..., h:2 * h].mul_(nc2[:-1])
        da_from_dc[..., h:2 * h].mul_(-0.5 * scale)                                 # nc2 is −2c
        if scale != 1.0:
            da_from_dc[..., :h].mul_(scale)
        torch.addcmul(i, i, g * g, value=-1, out=da_from_dc[..., 2 * h:])           # i (1 − g²)
        da = torch.empty_like(act)                                                  # (T, B, 4H), [i, f, g, o]
        grad_y = grad_y.contiguous()
        dc = grad_c.clone(memory_format=torch.contiguous_format)                    # dc_{t+1} f_{t+1}, carried
        dc_rows = dc.unsqueeze(1)                                                   # (B, 1, H), the same memory
        recurrent = Linear(w_hh.t(), batch, per_step=True)                          # dh_{t-1} = dy + dA_t W_hh
        da_steps, dy_steps, f_steps = da.unbind(0), grad_y.unbind(0), f.unbind(0)
        dc_from_dh, da_o_from_dh = dc_from_dh.unbind(0), da_o_from_dh.unbind(0)
        da_from_dc = da_from_dc.view(steps, batch, 3, h).unbind(0)
        da_ifg = da[..., :3 * h].view(steps, batch, 3, h).unbind(0)
        da_o = da[..., 3 * h:].unbind(0)
        dh = dy_steps[-1] + grad_h
        for t in reversed(range(steps)):
            if t < steps - 1:
                dh = recurrent.add(da_steps[t + 1], dy_steps[t])                    # (B, H)
            dc.addcmul_(dh, dc_from_dh[t])
            torch.mul(dh, da_o_from_dh[t], out=da_o[t])
            torch.mul(dc_rows, da_from_dc[t], out=da_ifg[t])
            dc.mul_(f_steps[t])                                                     # becomes dc_t f_t
        da_all = da.view(steps * batch, 4 * h)
        rows = steps * batch
        dx = Linear(w_ih.t(), rows)(da_all).view(x.shape) if need[0] else None
        dh0 = recurrent(da_steps[0]) if need[1] else None
        # dW = (X^T dA)^T: the fastest of the layouts measured (docs/cpu_speed.md); autograd makes it contiguous
        dw_ih = (x.reshape(rows, -1).t() @ da_all).t() if need[3] else None
        dw_hh = None
        if need[4]:
            h_prev = torch.cat([h0[None], y[:-1]]).view(rows, h)                     # (T·B, H), h_0..h_{T-1}
            dw_hh = (h_prev.t() @ da_all).t()
        db = da_all.sum(0) if need[5] or need[6] else None
        # two tensors: autograd may adopt a returned gradient as .grad, and b_ih, b_hh must not share storage
        return (dx, dh0, dc if need[2] else None, dw_ih, dw_hh, db if need[5] else None,
                db.clone() if need[6] else None, None, None, None)


def cpu_lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                   gate: GateMath, noise: Tensor | None, record_gates: bool = False):
    """One G2-LSTM layer over a window on the CPU path; the contract of `lstm_layer_reference` with the noise given.

    Args:
        x: (T, B, in); h0, c0: (B, H); w_ih (4H, in), w_hh (4H, H), b_ih, b_hh (4H,), rows [i, f, g, o], one
            floating dtype (float32, or float64 for gradcheck). Weight-drop belongs to the caller: pass the dropped
            w_hh and its gradient flows back through it.
        gate: the i/f gate maths; `gate.hard` (evaluation only) is refused.
        noise: (T, B, 2H) [i, f], the window's L·B (`logistic_noise`), or None for none.

    Returns (y (T, B, H), h_T (B, H), c_T (B, H), i/f gate values (T, B, 2H) or None).
    """
    if gate.hard:
        raise ValueError("cpu_lstm_layer does not run hard gates (eval_gate='hard' is evaluation-only); "
                         "use lstm_layer_reference")
    hidden = h0.shape[-1]
    if (x.dim() != 3 or h0.dim() != 2 or h0.shape != c0.shape or x.shape[1] != h0.shape[0]
            or w_ih.shape != (4 * hidden, x.shape[2]) or w_hh.shape != (4 * hidden, hidden)
            or b_ih.shape != (4 * hidden,) or b_hh.shape != (4 * hidden,)
            or (noise is not None and noise.shape != (*x.shape[:2], 2 * hidden))):
        raise ValueError(f"cpu_lstm_layer: bad shapes x {tuple(x.shape)}, h0 {tuple(h0.shape)}, c0 {tuple(c0.shape)}, "
                         f"w_ih {tuple(w_ih.shape)}, w_hh {tuple(w_hh.shape)}, "
                         f"noise {None if noise is None else tuple(noise.shape)}")
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh) + ((noise,) if noise is not None else ())
    if not x.dtype.is_floating_point or any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        raise TypeError(f"cpu_lstm_layer takes tensors of one floating dtype on one device, got x {x.dtype} on "
                        f"{x.device}")
    with torch.autocast(x.device.type, enabled=False):   # the recurrence in the tensors' own precision
        return _CPULSTMLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, noise, float(gate.scale), record_gates)
