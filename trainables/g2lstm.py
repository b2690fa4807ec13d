"""G2LSTM: a drop-in `nn.LSTM` whose input and forget gates are pushed towards 0/1 (Li et al., ICML 2018).

Layout, shared with `nn.LSTM` so state dicts load both ways: input is time-major `(T, B, input_size)`;
layer k has `weight_ih_l{k}` (4H, in), `weight_hh_l{k}` (4H, H), `bias_ih_l{k}` (4H), `bias_hh_l{k}` (4H),
rows in gate order [i, f, g, o], so the i/f gates are the contiguous rows 0:2H.

Training in `g2` mode computes i, f = σ((a + L·B) / τ) with logistic noise L = log(U+ε) − log(1+ε−U),
U ~ U(0,1), B ~ Bernoulli(p), fresh for every element at every step (DESIGN §2). Whenever the maths is
that of a plain LSTM (no noise, no hard gates; a temperature is folded into the i/f rows of the weights)
the layer runs PyTorch's fused LSTM kernel (cuDNN on GPU); otherwise a pure-PyTorch reference recurrence,
or the fused Triton path (`trainables/g2lstm_kernels.py`). The i/f gate maths all paths share is in
`trainables/gates.py`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables import g2lstm_cpu, g2lstm_kernels
from trainables.config import IMPLS, PRECISIONS, G2Config
from trainables.fields import check_choice, check_range
from trainables.gates import GateMath, logistic_noise
from trainables.report import GATES, HIGH, HIST_BINS, LOW, gate_column, histogram_key


def lstm_layer_reference(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                         b_hh: Tensor, gate: GateMath, record_gates: bool = False):
    """One layer over a window in pure PyTorch; differentiable, gradcheck-able in float64.

    The input GEMM is hoisted out of the loop and the loop walks `unbind(0)` views: indexing `xw[t]`
    would make autograd accumulate a full-size gradient per step (quadratic in T).

    Returns (y (T, B, H), h_T, c_T, i/f gate values (T, B, 2H) or None).
    """
    hidden = h.shape[-1]
    xw = F.linear(x, w_ih, b_ih + b_hh)                       # (T, B, 4H), [i, f, g, o]
    steps = xw.shape[0]
    noise = window_noise(x, h, gate)
    noise_steps = noise.unbind(0) if noise is not None else (None,) * steps
    ys, gates = [], []
    for xw_t, noise_t in zip(xw.unbind(0), noise_steps):
        a = torch.addmm(xw_t, h, w_hh.t())                    # (B, 4H), [i, f, g, o]
        gate_if = gate.apply(a[:, :2 * hidden], noise_t)      # (B, 2H), [i, f]
        i, f = gate_if.chunk(2, dim=1)
        c = f * c + i * torch.tanh(a[:, 2 * hidden:3 * hidden])
        h = torch.sigmoid(a[:, 3 * hidden:]) * torch.tanh(c)
        ys.append(h)
        if record_gates:
            gates.append(gate_if)
    return torch.stack(ys), h, c, (torch.stack(gates) if record_gates else None)


def window_noise(x: Tensor, h: Tensor, gate: GateMath) -> Tensor | None:
    """The L·B of one layer's window, (T, B, 2H) [i, f], or None without noise. Every path but the fused one draws
    it here, in one call of the same shape and dtype: a seed gives the reference and the CPU path the same noise,
    and a checkpointed RNG state the same noise after a resume."""
    if gate.noise_p == 0:
        return None
    return logistic_noise((x.shape[0], *h.shape[:-1], 2 * h.shape[-1]), gate.noise_p, device=x.device, dtype=x.dtype)


def lstm_layer_cpu(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                   gate: GateMath, record_gates: bool = False):
    """The reference's maths and noise on the hand-written backward of `trainables/g2lstm_cpu.py`."""
    return g2lstm_cpu.cpu_lstm_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, gate, window_noise(x, h, gate), record_gates)


def _row_scale(hidden: int, scale: float, like: Tensor) -> Tensor:
    """Per-row factor multiplying the i/f rows by `scale`: σ(a·s) with a = Wx + b is σ((sW)x + sb)."""
    s = torch.ones(4 * hidden, device=like.device, dtype=like.dtype)
    s[:2 * hidden] = scale
    return s


def lstm_layer_plain(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                     b_hh: Tensor, gate: GateMath, record_gates: bool = False):
    """The same layer through PyTorch's fused LSTM (cuDNN on GPU), valid when `gate.is_plain_lstm`."""
    hidden = h.shape[-1]
    if gate.scale != 1.0:
        s = _row_scale(hidden, gate.scale, w_ih)
        w_ih, w_hh, b_ih, b_hh = w_ih * s[:, None], w_hh * s[:, None], b_ih * s, b_hh * s
    # cuDNN refuses the backward of an RNN run with train=False, so the call runs in training mode whenever
    # autograd records it (dropout is 0 either way: the flag only makes cuDNN keep its workspace for backward)
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, c, w_ih, w_hh, b_ih, b_hh))
    y, h_n, c_n = torch._VF.lstm(x, (h[None], c[None]), [w_ih, w_hh, b_ih, b_hh],
                                 True, 1, 0.0, records, False, False)   # bias, layers, dropout, train, bidir, batch_first
    gates = None
    if record_gates:  # recompute i/f from the outputs: one GEMM pair instead of a Python loop
        h_prev = torch.cat([h[None], y[:-1]])               # (T, B, H)
        rows = slice(0, 2 * hidden)
        gates = torch.sigmoid(F.linear(x, w_ih[rows], b_ih[rows] + b_hh[rows]) + F.linear(h_prev, w_hh[rows]))
    return y, h_n[0], c_n[0], gates


class G2LSTM(nn.Module):
    """Multi-layer G2-LSTM, a drop-in for `nn.LSTM(input_size, hidden_size, num_layers)` (time-major).

    Args:
        dropout: dropout on the outputs of every layer but the last (as `nn.LSTM`).
        weight_drop: DropConnect on every `weight_hh`, one mask per forward (AWD-LSTM).
        impl: "auto" (plain-LSTM maths on PyTorch's fused kernel (cuDNN), noisy g2 training on the fused
            Triton path on CUDA and on the hand-written backward of `trainables/g2lstm_cpu.py` on the CPU, the
            reference recurrence elsewhere), "reference" (always the pure-PyTorch autograd recurrence, the
            oracle) or "fused" (the Triton path for every non-hard gate; CUDA, or Triton's interpreter).
        precision: "fp32" or "bf16" GEMM operands on the fused path (cell state, gates, noise stay fp32).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, g2: G2Config = G2Config(),
                 dropout: float = 0.0, weight_drop: float = 0.0, impl: str = "auto", precision: str = "fp32"):
        super().__init__()
        check_range("input_size", input_size, 1, 1 << 20, integer=True)
        check_range("hidden_size", hidden_size, 1, 1 << 20, integer=True)
        check_range("num_layers", num_layers, 1, 64, integer=True)
        check_range("dropout", dropout, 0.0, 1.0, hi_open=True)
        check_range("weight_drop", weight_drop, 0.0, 1.0, hi_open=True)
        check_choice("impl", impl, IMPLS)
        check_choice("precision", precision, PRECISIONS)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.g2, self.dropout, self.weight_drop, self.impl = g2, dropout, weight_drop, impl
        self.precision = precision
        for k in range(num_layers):
            layer_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, layer_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)   # nn.LSTM's initialisation
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def layer_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of layer k."""
        return tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, *,
                weight_hh: Sequence[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Args: x (T, B, input_size); state (h_0, c_0), each (num_layers, B, H), zeros if None; weight_hh: each
        layer's recurrent weights to use instead of its own, already dropped (a decoder that runs one step per call
        drops them once per sequence).

        Returns (y (T, B, H), (h_n, c_n)), as nn.LSTM.
        """
        y, state, _ = self._run(x, state, weight_hh, return_gates=False)
        return y, state

    def forward_with_gates(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, *,
                           weight_hh: Sequence[Tensor] | None = None
                           ) -> tuple[Tensor, tuple[Tensor, Tensor], list[Tensor]]:
        """`forward`, and a list with each layer's i/f gate values (T, B, 2H), [i, f], as used in this forward."""
        return self._run(x, state, weight_hh, return_gates=True)

    def _run(self, x: Tensor, state: tuple[Tensor, Tensor] | None, weight_hh: Sequence[Tensor] | None, *,
             return_gates: bool) -> tuple[Tensor, tuple[Tensor, Tensor], list[Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"G2LSTM expects input (T, B, {self.input_size}), got {tuple(x.shape)}")
        batch = x.shape[1]
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        gate = GateMath.of(self.g2, self.training)
        layer_fn = self._layer_fn(x.device)
        h_n, c_n, all_gates = [], [], []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(k)
            if weight_hh is not None:
                w_hh = weight_hh[k]
            elif self.weight_drop:
                w_hh = F.dropout(w_hh, self.weight_drop, self.training)
            x, h, c, gates = layer_fn(x, state[0][k], state[1][k], w_ih, w_hh, b_ih, b_hh, gate, return_gates)
            h_n.append(h)
            c_n.append(c)
            if return_gates:
                all_gates.append(gates)
            if self.dropout and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, self.training)
        return x, (torch.stack(h_n), torch.stack(c_n)), all_gates

    def path(self, training: bool, device: torch.device) -> str:
        """Which implementation runs a forward in this mode on `device`: "plain", "fused", "cpu" or "reference"."""
        gate = GateMath.of(self.g2, training)
        if self.impl == "reference" or gate.hard:
            return "reference"
        if self.impl == "auto" and gate.is_plain_lstm:
            return "plain"
        if self.impl == "fused":
            return "fused"
        # `auto` takes the Triton path on CUDA only; the CPU interpreter is for tests that ask for "fused"
        if device.type == "cuda" and g2lstm_kernels.fused_available(device):
            return "fused"
        return "cpu" if device.type == "cpu" else "reference"

    def _layer_fn(self, device: torch.device):
        """The function computing one layer in this forward (see `impl`)."""
        path = self.path(self.training, device)
        if path == "plain":
            return lstm_layer_plain
        if path == "reference":
            return lstm_layer_reference
        if path == "cpu":
            return lstm_layer_cpu

        # a fresh noise seed per layer and forward, drawn on the device: it follows torch.manual_seed and
        # the checkpointed RNG state, and stays valid inside a captured CUDA graph
        def fused(x, h, c, w_ih, w_hh, b_ih, b_hh, gate, record_gates):
            seed = torch.randint(0, 2**62, (1,), device=x.device)
            return g2lstm_kernels.fused_lstm_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, gate, seed, record_gates,
                                                   self.precision)
        return fused

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, g2={self.g2}, "
                f"dropout={self.dropout}, weight_drop={self.weight_drop}, impl={self.impl!r}, "
                f"precision={self.precision!r}")


@contextlib.contextmanager
def evaluation_gates(model: nn.Module, eval_gate: str) -> Iterator[nn.Module]:
    """`model` with every G2LSTM's `g2.eval_gate` set to `eval_gate` inside the block: the sweep scores binary gates
    of a model trained with soft ones, and training decisions read soft gates whatever the trial evaluates with."""
    layers = [m for m in model.modules() if isinstance(m, G2LSTM)]
    saved = [m.g2 for m in layers]
    for m in layers:
        m.g2 = replace(m.g2, eval_gate=eval_gate)
    try:
        yield model
    finally:
        for m, g2 in zip(layers, saved):
            m.g2 = g2


class GateStatistics:
    """Accumulates i/f gate histograms per layer over held-out batches (DESIGN §2, the paper's Fig. 3).

    Ten bins on [0, 1]; `summary()` gives the fractions < 0.1 and > 0.9 per layer and gate.
    """

    def __init__(self, num_layers: int):
        self.counts = torch.zeros(num_layers, 2, HIST_BINS, dtype=torch.float64)   # [layer, i/f, bin]
        self.low = torch.zeros(num_layers, 2, dtype=torch.float64)
        self.high = torch.zeros(num_layers, 2, dtype=torch.float64)
        self.total = torch.zeros(num_layers, 2, dtype=torch.float64)

    @torch.no_grad()
    def update(self, gates: list[Tensor], mask: Tensor | None = None) -> None:
        """gates: per layer (T, B, 2H) [i, f]; mask: optional (T, B) bool of real (non-pad) positions."""
        for k, layer_gates in enumerate(gates):
            if mask is not None:
                layer_gates = layer_gates[mask]
            for j, g in enumerate(layer_gates.float().chunk(2, dim=-1)):
                self.counts[k, j] += torch.histc(g, bins=HIST_BINS, min=0.0, max=1.0).double().cpu()
                self.low[k, j] += (g < 0.1).sum().item()
                self.high[k, j] += (g > 0.9).sum().item()
                self.total[k, j] += g.numel()

    def histograms(self) -> dict[str, list[float]]:
        """{"l{k}_{i|f}": fraction of gate values in each of the 10 bins}."""
        frac = self.counts / self.total.clamp(min=1)[..., None]
        return {histogram_key(k, g): frac[k, j].tolist() for k in range(frac.shape[0]) for j, g in enumerate(GATES)}

    def summary(self) -> dict[str, float]:
        """{"gate_l{k}_{i|f}_lt01": fraction < 0.1, "gate_l{k}_{i|f}_gt09": fraction > 0.9}."""
        total = self.total.clamp(min=1)
        out = {}
        for k in range(total.shape[0]):
            for j, g in enumerate(GATES):
                out[gate_column(k, g, LOW)] = float(self.low[k, j] / total[k, j])
                out[gate_column(k, g, HIGH)] = float(self.high[k, j] / total[k, j])
        return out
