"""Inference of an exported model whose i/f gate blocks are low rank, run as their two factors.

A rank-r block W ≈ a bᵀ (a (H, r), b (n, r)) turns x Wᵀ into two thin GEMMs, (x b) aᵀ: 2·r·(H + n) multiply-adds
per row of x instead of 2·H·n for the i and f blocks together. The input projection is hoisted out of the time loop
as in `lstm_layer_reference`; each step then runs one GEMM of h against [b_i b_f | W_go]ᵀ and one small one of its
first 2r columns against the block-diagonal [a_i 0; 0 a_f]. Whether that beats PyTorch's fused LSTM on the dense
matrices depends on r, H and the batch: `benchmarks/bench_export.py` measures it. Layout and gate order are
`nn.LSTM`'s (`trainables/g2lstm.py`); the i/f rows come first.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.g2lstm import G2LSTM
from trainables.gates import GateMath
from trainables.packing import BlockCode, low_rank_of

LOW_RANK = ("svd", "svd+quant")


class FactoredMatrix(nn.Module):
    """A (4H, n) gate matrix, [i, f, g, o] rows, whose i and f blocks are low rank: x ↦ x Wᵀ as thin GEMMs."""

    def __init__(self, factors: Sequence[tuple[Tensor, Tensor]], rows_go: Tensor):
        super().__init__()
        (a_i, b_i), (a_f, b_f) = factors                                         # a (H, r), b (n, r)
        hidden = rows_go.shape[0] // 2
        self.rank_i = b_i.shape[1]
        self.right = nn.Parameter(torch.cat([b_i.t(), b_f.t(), rows_go]), requires_grad=False)   # (2r + 2H, n)
        left = torch.zeros(2 * hidden, b_i.shape[1] + b_f.shape[1])                            # (2H, 2r)
        left[:hidden, : self.rank_i] = a_i
        left[hidden:, self.rank_i:] = a_f
        self.left = nn.Parameter(left, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., n) -> (..., 4H), [i, f, g, o]."""
        z = F.linear(x, self.right)                                               # (..., 2r + 2H)
        r2 = self.left.shape[1]
        return torch.cat([F.linear(z[..., :r2], self.left), z[..., r2:]], dim=-1)


class FactoredLSTM(nn.Module):
    """The evaluation forward of a `G2LSTM` whose low-rank gate blocks stay factored (time-major, `nn.LSTM` API)."""

    def __init__(self, source: G2LSTM, factored: Mapping[str, tuple[list[tuple[Tensor, Tensor]], Tensor]]):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = source.input_size, source.hidden_size, source.num_layers
        self.gate = GateMath.of(source.g2, training=False)
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        self.bias = nn.ParameterList()
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = source.layer_weights(k)
            for name, w, out in (("weight_ih", w_ih, self.ih), ("weight_hh", w_hh, self.hh)):
                key = f"{name}_l{k}"
                out.append(FactoredMatrix(*factored[key]) if key in factored else _Dense(w.detach()))
            self.bias.append(nn.Parameter((b_ih + b_hh).detach(), requires_grad=False))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, *,
                weight_hh: Sequence[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y, state, _ = self._run(x, state, weight_hh, record_gates=False)
        return y, state

    def forward_with_gates(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, *,
                           weight_hh: Sequence[Tensor] | None = None):
        return self._run(x, state, weight_hh, record_gates=True)

    def _run(self, x: Tensor, state, weight_hh, *, record_gates: bool):
        if weight_hh is not None:
            raise ValueError("a FactoredLSTM evaluates its own weights; it takes no weight_hh")
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.shape[1], self.hidden_size)
            state = (zeros, zeros)
        hidden = self.hidden_size
        h_n, c_n, all_gates = [], [], []
        for k in range(self.num_layers):
            xw = self.ih[k](x) + self.bias[k]                                     # (T, B, 4H), [i, f, g, o]
            h, c = state[0][k], state[1][k]
            ys, gates = [], []
            for xw_t in xw.unbind(0):
                a = xw_t + self.hh[k](h)                                          # (B, 4H)
                gate_if = self.gate.apply(a[:, : 2 * hidden])                     # (B, 2H), [i, f]
                i, f = gate_if.chunk(2, dim=1)
                c = f * c + i * torch.tanh(a[:, 2 * hidden: 3 * hidden])
                h = torch.sigmoid(a[:, 3 * hidden:]) * torch.tanh(c)
                ys.append(h)
                if record_gates:
                    gates.append(gate_if)
            x = torch.stack(ys)
            h_n.append(h)
            c_n.append(c)
            if record_gates:
                all_gates.append(torch.stack(gates))
        return x, (torch.stack(h_n), torch.stack(c_n)), all_gates


class _Dense(nn.Module):
    def __init__(self, w: Tensor):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def factor_layers(model: nn.Module, blocks: Sequence[Mapping[str, Any]], tensors: Mapping[str, Tensor],
                  scale: float) -> list[str]:
    """Replace, in place, every G2LSTM of `model` with low-rank blocks spanning all columns by a `FactoredLSTM`.

    `scale` is the temperature already folded into the dense weights; the factors `a` get it too. Returns the
    names of the modules replaced.
    """
    by_param: dict[str, dict[str, Mapping[str, Any]]] = {}
    for block in blocks:
        n = block["shape"][1]
        if block["method"] in LOW_RANK and block["cols"] == [0, n]:
            by_param.setdefault(block["param"], {})[block["gate"]] = block
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, G2LSTM):
            continue
        factored = {}
        for k in range(module.num_layers):
            for matrix in ("weight_ih", "weight_hh"):
                key = f"{matrix}_l{k}"
                gates = by_param.get(f"{name}.{key}" if name else key, {})
                if set(gates) != {"i", "f"}:
                    continue
                pairs = []
                for g in "if":
                    prefix = f"{gates[g]['param']}/{g}/"
                    fields = {k2[len(prefix):]: t for k2, t in tensors.items() if k2.startswith(prefix)}
                    a, b = low_rank_of(BlockCode.from_json(gates[g]), fields)
                    pairs.append((a * scale, b))
                w = getattr(module, key)
                factored[key] = (pairs, w[2 * module.hidden_size:].detach())
        if factored:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, FactoredLSTM(module, factored))
            replaced.append(name)
    return replaced
