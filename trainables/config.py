"""Typed, frozen configuration for the G2-LSTM layer and post-training gate compression.

Every default is stated once, here. Values are validated when a config is built, so nothing below this
module ever sees an invalid knob; each error names the dotted field (``g2.tau``) the user typed and the
allowed range. The trial-level configuration that nests these lives in :mod:`trainables.trial_config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

GATE_MODES = ("lstm", "sharpened", "g2")
EVAL_GATES = ("soft", "tempered", "hard")
PAPER_MODES = ("none", "round", "round_clip")
TARGETS = ("both", "recurrent", "input")
FULL_PRECISION_BITS = 32


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False) -> None:
    """Raise ValueError naming `name` unless lo <(=) value <(=) hi (and an int when `integer`)."""
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")


def reject_unknown(section: str, cls: type, given: dict) -> None:
    """A typo in a knob name must not silently train the default."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        names = ", ".join(f"{section}.{k}" if section else k for k in unknown)
        raise ValueError(f"unknown field(s) {names}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class G2Config:
    """Gate behaviour of a G2LSTM (DESIGN §2). Only the input and forget gates are affected."""

    gate_mode: Literal["lstm", "sharpened", "g2"] = "g2"
    tau: float = 0.9            # temperature dividing i/f pre-activations in g2 training
    p: float = 0.2              # probability that an i/f element gets logistic noise (authors' README: 0.2)
    sharpen_tau: float = 0.2    # fixed temperature of the paper's `sharpened` ablation, train and eval
    eval_gate: Literal["soft", "tempered", "hard"] = "soft"   # g2 gates at evaluation: σ(a), σ(a/τ), 1[a≥0]

    def __post_init__(self):
        check_choice("g2.gate_mode", self.gate_mode, GATE_MODES)
        check_range("g2.tau", self.tau, 0.0, 10.0, lo_open=True)
        check_range("g2.p", self.p, 0.0, 1.0)
        check_range("g2.sharpen_tau", self.sharpen_tau, 0.0, 10.0, lo_open=True)
        check_choice("g2.eval_gate", self.eval_gate, EVAL_GATES)


@dataclass(frozen=True)
class CompressConfig:
    """One post-training compression setting of the i/f gate blocks (DESIGN §3).

    `rank` = 0 keeps full rank, `bits` = 32 keeps full precision; both may be combined (SVD, then the
    factors quantised). The paper's `round` / `round_clip` modes stand alone.
    """

    rank: int = 0               # truncated-SVD rank of each i/f block; 0 = no low-rank factorisation
    bits: int = 32              # bits per stored weight (per-row symmetric quantisation); 32 = float
    paper: Literal["none", "round", "round_clip"] = "none"   # the paper's rounding (Li et al. §5)
    step: float = 0.2           # rounding step r of the paper's modes (LM 0.2, NMT 0.5)
    clip: float = 0.4           # clip c of round_clip (LM 0.4, NMT 1.0)
    targets: Literal["both", "recurrent", "input"] = "both"   # which matrices' i/f blocks

    def __post_init__(self):
        check_range("compress.rank", self.rank, 0, 65536, integer=True)
        if self.bits != FULL_PRECISION_BITS and (
                isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16):
            raise ValueError(f"compress.bits must be an integer in [1, 16] or 32 (full precision), got {self.bits!r}")
        check_choice("compress.paper", self.paper, PAPER_MODES)
        check_range("compress.step", self.step, 0.0, 100.0, lo_open=True)
        check_range("compress.clip", self.clip, 0.0, 100.0, lo_open=True)
        check_choice("compress.targets", self.targets, TARGETS)
        if self.paper != "none" and (self.rank or self.bits != FULL_PRECISION_BITS):
            raise ValueError(f"compress.paper={self.paper!r} stands alone: set compress.rank=0 and "
                             f"compress.bits=32 (got rank={self.rank}, bits={self.bits})")

    @property
    def is_identity(self) -> bool:
        return self.rank == 0 and self.bits == FULL_PRECISION_BITS and self.paper == "none"

    @property
    def method(self) -> str:
        """A short label for tables and plots: none, svd, quant, svd+quant, round, round_clip."""
        if self.paper != "none":
            return self.paper
        parts = (["svd"] if self.rank else []) + (["quant"] if self.bits != FULL_PRECISION_BITS else [])
        return "+".join(parts) or "none"
