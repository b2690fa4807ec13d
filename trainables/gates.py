"""The i/f gate maths of the G2-LSTM (Li et al., ICML 2018; docs/design.md §2), shared by every path that runs a layer.

The reference recurrence (`trainables/g2lstm.py`) and the fused Triton kernels (`trainables/g2lstm_kernels.py`)
both compute i, f from the pre-activations a of the contiguous rows 0:2H, [i, f], as `GateMath` says:
σ((a + L·B) · scale) in training with logistic noise L = log(U+ε) − log(1+ε−U), U ~ U(0,1), B ~ Bernoulli(p),
or 1[a ≥ 0] for hard evaluation gates. ε is `NOISE_EPS` in both, so the two paths draw the same distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trainables.config import G2Config

NOISE_EPS = 1e-3          # ε of the logistic noise, as in the authors' code


def logistic_noise(shape: tuple[int, ...], p: float, *, device=None, dtype=None) -> Tensor:
    """L·B of docs/design.md §2: logistic noise (a difference of two Gumbels), kept with probability p.

    Drawn sparsely, as the training paths consume it on the CPU (docs/cpu_speed.md): the kept elements (in row-major
    order) are a Bernoulli(p) process, so the steps between them are geometric, ⌊log(1−U)/log(1−p)⌋ + 1, and only the
    ≈ pN kept elements draw their U for L = log(U+ε) − log(1+ε−U). About 2pN uniforms instead of 2N.
    """
    n = math.prod(shape)
    noise = torch.zeros(n, device=device, dtype=dtype)
    if p <= 0.0 or n == 0:
        return noise.view(shape)
    log_miss = math.log1p(-p) if p < 1.0 else -math.inf
    chunk = int(n * p + 6.0 * math.sqrt(n * p * (1.0 - p))) + 16     # enough steps to pass n but once in ~1e9
    steps, last = [], -1
    while last < n:                                                    # the process continues past the last kept
        u = torch.rand(chunk, device=device, dtype=dtype)
        step = u.neg_().log1p_().div_(log_miss).floor_().to(torch.int64).add_(1)
        positions = step.cumsum_(0).add_(last)
        steps.append(positions)
        last = int(positions[-1])
    positions = steps[0] if len(steps) == 1 else torch.cat(steps)
    positions = positions[:int(torch.searchsorted(positions, n))]
    u = torch.rand(positions.shape, device=device, dtype=dtype)
    noise[positions] = torch.add(u, NOISE_EPS).div_(u.neg_().add_(1.0 + NOISE_EPS)).log_()
    return noise.view(shape)


@dataclass(frozen=True)
class GateMath:
    """What the i/f gates compute in one forward: σ((a + noise) · scale), or 1[a ≥ 0] when `hard`."""

    scale: float = 1.0
    noise_p: float = 0.0
    hard: bool = False

    @classmethod
    def of(cls, g2: G2Config, training: bool) -> GateMath:
        if g2.gate_mode == "lstm":
            return cls()
        if not training and g2.eval_gate == "hard":   # binary gates at inference, for g2 and sharpened models
            return cls(hard=True)
        if g2.gate_mode == "sharpened":
            return cls(scale=1.0 / g2.sharpen_tau)
        if training:
            return cls(scale=1.0 / g2.tau, noise_p=g2.p)
        return {"soft": cls(), "tempered": cls(scale=1.0 / g2.tau), "hard": cls(hard=True)}[g2.eval_gate]

    @property
    def is_plain_lstm(self) -> bool:
        """True when a (row-scaled) standard LSTM computes exactly this, so cuDNN can run it."""
        return not self.hard and self.noise_p == 0.0

    def apply(self, a_if: Tensor, noise: Tensor | None = None) -> Tensor:
        if self.hard:
            return (a_if >= 0).to(a_if.dtype)
        if noise is not None:
            a_if = a_if + noise
        if self.scale != 1.0:
            a_if = a_if * self.scale
        return torch.sigmoid(a_if)
