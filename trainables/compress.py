"""Post-training compression of the i/f gate blocks (docs/design.md §3), as pure tensor functions plus one handler.

The targets are the input- and forget-gate blocks (rows 0:H and H:2H) of `weight_ih_l{k}` / `weight_hh_l{k}`
of every recurrent layer, each block compressed on its own; biases are never touched. `compress.targets`
picks the matrices: both, only W_ih (`input`), only W_hh (`recurrent`), or W_hh plus the columns of W_ih that
carry a translation decoder's attention context into its gates (`recurrent+context`, the authors' NMT choice:
their code compressed the recurrent `U` and context-to-gate `Wc` matrices, never the embedding weights). A
model names those columns with `context_columns() -> {parameter name: column slice}`. `compress_model` works
on a deep copy, so the model being trained or checkpointed is never changed.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from trainables.config import FULL_PRECISION_BITS, CompressConfig
from trainables.report import Accounting

FLOAT_BITS = 32


def gate_rows(hidden_size: int) -> tuple[slice, slice]:
    """Row slices of the input and forget gates in the [i, f, g, o] layout."""
    return slice(0, hidden_size), slice(hidden_size, 2 * hidden_size)


def low_rank_factors(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: (U_r S_r (m, r), V_r (n, r)) with w ≈ (U_r S_r) V_rᵀ, optimal in Frobenius norm."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).to(w.dtype), vh[:r].t().to(w.dtype)


def low_rank(w: Tensor, rank: int) -> Tensor:
    """The best rank-`rank` approximation of w (Eckart–Young)."""
    a, b = low_rank_factors(w, rank)
    return a @ b.t()


def quantize(w: Tensor, bits: int) -> Tensor:
    """Symmetric uniform quantisation per row, dequantised: at most 2^bits − 1 levels per row.

    bits = 1 is binarisation, sign(w)·mean|w_row| (two levels).
    """
    if bits >= FULL_PRECISION_BITS:
        return w.clone()
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean(dim=1, keepdim=True)
    scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)    # (m, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))         # all-zero rows stay zero
    return torch.round(w / scale) * scale


def round_to_step(w: Tensor, step: float, clip: float | None = None) -> Tensor:
    """The paper's `round` (multiples of `step`) and `round_clip` (first clamped to [−clip, clip])."""
    if clip is not None:
        w = w.clamp(-clip, clip)
    return torch.round(w / step) * step


def rounding(w: Tensor, cfg: CompressConfig) -> tuple[float, float | None]:
    """(step, clip or None) of a rounding mode on block w: absolute, or relative to the block's RMS (`_rel`)."""
    clips = cfg.paper.startswith("round_clip")
    if not cfg.paper.endswith("_rel"):
        return cfg.step, cfg.clip if clips else None
    rms = float(w.double().pow(2).mean().sqrt()) or 1.0          # an all-zero block stays zero at any step
    return cfg.rel_step * rms, cfg.rel_clip * rms if clips else None


def compress_block(w: Tensor, cfg: CompressConfig) -> tuple[Tensor, int]:
    """One m×n block compressed as `cfg` says, and the bits needed to store it (docs/design.md §3 table)."""
    m, n = w.shape
    if cfg.paper != "none":
        out = round_to_step(w, *rounding(w, cfg))
        levels = torch.unique(out).numel()
        return out, m * n * max(1, math.ceil(math.log2(levels)))
    if cfg.rank:
        a, b = low_rank_factors(w, cfg.rank)
        r = a.shape[1]
        if cfg.bits == FULL_PRECISION_BITS:
            return a @ b.t(), r * (m + n) * FLOAT_BITS
        return quantize(a, cfg.bits) @ quantize(b, cfg.bits).t(), r * (m + n) * cfg.bits + FLOAT_BITS * (m + n)
    if cfg.bits != FULL_PRECISION_BITS:
        return quantize(w, cfg.bits), m * n * cfg.bits + FLOAT_BITS * m
    return w.clone(), m * n * FLOAT_BITS


def account(gate_params: int, gate_bits: int, model_params: int) -> Accounting:
    """The one accounting function: bits of the gates and of the model, and both compression ratios."""
    model_bits = gate_bits + FLOAT_BITS * (model_params - gate_params)
    return Accounting(
        gate_params=gate_params, gate_bits=gate_bits, model_params=model_params, model_bits=model_bits,
        gate_compression=FLOAT_BITS * gate_params / gate_bits,
        model_compression=FLOAT_BITS * model_params / model_bits, relative_error=0.0, fraction_zeroed=0.0)


def recurrent_layers(model: nn.Module):
    """Yield (qualified name, module) for every LSTM-like module: G2LSTM and nn.LSTM alike."""
    for prefix, module in model.named_modules():
        if hasattr(module, "weight_hh_l0") and hasattr(module, "num_layers"):
            yield prefix, module


def _target_columns(name: str, targets: str, context: slice | None) -> slice | None:
    """The columns of an i/f block of matrix `name` ("weight_ih" / "weight_hh") that `targets` compresses."""
    if name == "weight_hh":
        return None if targets == "input" else slice(None)
    if targets in ("both", "input"):
        return slice(None)
    return context if targets == "recurrent+context" else None


def compress_model(model: nn.Module, cfg: CompressConfig) -> tuple[nn.Module, Accounting]:
    """Return a compressed deep copy of `model` and its accounting; `model` itself is left untouched.

    Bidirectional `nn.LSTM` layers (`*_reverse` weights) are compressed too. Gate parameters and bits always
    cover every i/f block; the parts `cfg.targets` leaves alone are counted as float32.
    """
    context = model.context_columns() if hasattr(model, "context_columns") else {}
    if cfg.targets == "recurrent+context" and not context:
        raise ValueError(f"compress.targets='recurrent+context' needs a model with context inputs (a translation "
                         f"decoder); {type(model).__name__} has none: use 'both', 'recurrent' or 'input'")
    compressed = copy.deepcopy(model)
    gate_params = gate_bits = 0
    err_sq = norm_sq = 0.0
    zeroed = nonzero = 0
    with torch.no_grad():
        for prefix, module in recurrent_layers(compressed):
            suffixes = ("", "_reverse") if getattr(module, "bidirectional", False) else ("",)
            for k, name, suffix in itertools.product(range(module.num_layers), ("weight_ih", "weight_hh"), suffixes):
                param = f"{name}_l{k}{suffix}"
                w = getattr(module, param)
                cols = _target_columns(name, cfg.targets, context.get(f"{prefix}.{param}" if prefix else param))
                for rows in gate_rows(module.hidden_size):
                    block = w[rows]
                    gate_params += block.numel()
                    if cols is None or cfg.is_identity:
                        gate_bits += block.numel() * FLOAT_BITS
                        continue
                    part = block[:, cols]                                   # (H, columns compressed)
                    new_part, bits = compress_block(part, cfg)
                    err_sq += float((new_part - part).double().pow(2).sum())
                    norm_sq += float(part.double().pow(2).sum())
                    zeroed += int(((new_part == 0) & (part != 0)).sum())
                    nonzero += int((part != 0).sum())
                    gate_bits += bits + (block.numel() - part.numel()) * FLOAT_BITS
                    w[rows, cols] = new_part
    if gate_params == 0:
        raise ValueError("compress_model found no LSTM layer (no `weight_hh_l0`) in the model")
    model_params = sum(p.numel() for p in compressed.parameters())
    report = account(gate_params, gate_bits, model_params)
    return compressed, replace(report, relative_error=math.sqrt(err_sq / norm_sq) if norm_sq else 0.0,
                               fraction_zeroed=zeroed / nonzero if nonzero else 0.0)
