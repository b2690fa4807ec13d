"""Typed, frozen configuration for the G2-LSTM layer and post-training gate compression.

Every default is stated once, here. Values are validated when a config is built, so nothing below this
module ever sees an invalid knob; each error names the dotted field (``g2.tau``) the user typed and the
allowed range. `TrialConfig` nests them all and converts to and from the flat, dotted form (`g2.tau`)
that the study, Ray Tune, MLflow and the results dataset use.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_type_hints

from trainables.fields import check_choice, check_range, coerce, reject_unknown
from trainables.presets import PRESETS

GATE_MODES = ("lstm", "sharpened", "g2")
EVAL_GATES = ("soft", "tempered", "hard")
# The paper's rounding at absolute steps, and the same at steps relative to each block's RMS (`_rel`): a fixed step
# means another relative error for each gate mode's weight scale (and mostly pruning where weights are small); a step
# at a multiple of the block's RMS quantises every block at one relative error, and its clip binds on every block.
ROUND_MODES = ("round", "round_clip", "round_rel", "round_clip_rel")
PAPER_MODES = ("none", *ROUND_MODES)
TARGETS = ("both", "recurrent", "input", "recurrent+context")
FULL_PRECISION_BITS = 32


# Bumped when the training loop changes what one set of knobs trains, so stored models of the old loop are not
# reused as if the new one had trained them. 2: the best epoch and NT-ASGD read the plain validation loss.
TRAINING_RECIPE = 2


@dataclass(frozen=True)
class G2Config:
    """Gate behaviour of a G2LSTM (docs/design.md §2). Only the input and forget gates are affected."""

    gate_mode: Literal["lstm", "sharpened", "g2"] = "g2"
    tau: float = 0.9            # temperature dividing i/f pre-activations in g2 training
    p: float = 0.2              # probability that an i/f element gets logistic noise (authors' README: 0.2)
    sharpen_tau: float = 0.2    # fixed temperature of the paper's `sharpened` ablation, train and eval
    eval_gate: Literal["soft", "tempered", "hard"] = "soft"   # g2 gates at evaluation: σ(a), σ(a/τ), 1[a≥0]
                                                              # (hard also binarises a sharpened model's gates)

    def __post_init__(self):
        check_choice("g2.gate_mode", self.gate_mode, GATE_MODES)
        check_range("g2.tau", self.tau, 0.0, 10.0, lo_open=True)
        check_range("g2.p", self.p, 0.0, 1.0)
        check_range("g2.sharpen_tau", self.sharpen_tau, 0.0, 10.0, lo_open=True)
        check_choice("g2.eval_gate", self.eval_gate, EVAL_GATES)


@dataclass(frozen=True)
class CompressConfig:
    """One post-training compression setting of the i/f gate blocks (docs/design.md §3).

    `rank` = 0 keeps full rank, `bits` = 32 keeps full precision; both may be combined (SVD, then the
    factors quantised). The rounding modes (`paper`) stand alone: the paper's `round` / `round_clip` at the absolute
    `step` / `clip`, and `round_rel` / `round_clip_rel` at `rel_step` / `rel_clip` times each block's RMS.
    """

    rank: int = 0               # truncated-SVD rank of each i/f block; 0 = no low-rank factorisation
    bits: int = 32              # bits per stored weight (per-row symmetric quantisation); 32 = float
    paper: Literal["none", "round", "round_clip", "round_rel", "round_clip_rel"] = "none"   # rounding (ROUND_MODES)
    step: float = 0.2           # rounding step r of the paper's modes (LM 0.2, NMT 0.5)
    clip: float = 0.4           # clip c of round_clip (LM 0.4, NMT 1.0)
    # The `_rel` modes: step and clip as multiples of each block's RMS. At 0.5 / 2.0 a Gaussian block keeps 9
    # levels (4 bits), about 20 % of its weights round to 0 and 5 % are clipped
    rel_step: float = 0.5       # rounding step of round_rel / round_clip_rel, in units of the block's RMS
    rel_clip: float = 2.0       # clip of round_clip_rel, in units of the block's RMS
    # Which matrices' i/f blocks: W_ih and W_hh, one of them, or (the authors' NMT choice, the NMT presets'
    # default) W_hh plus the input columns a translation decoder reads its attention context through.
    targets: Literal["both", "recurrent", "input", "recurrent+context"] = "both"

    def __post_init__(self):
        check_range("compress.rank", self.rank, 0, 65536, integer=True)
        if self.bits != FULL_PRECISION_BITS and (
                isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16):
            raise ValueError(f"compress.bits must be an integer in [1, 16] or 32 (full precision), got {self.bits!r}")
        check_choice("compress.paper", self.paper, PAPER_MODES)
        check_range("compress.step", self.step, 0.0, 100.0, lo_open=True)
        check_range("compress.clip", self.clip, 0.0, 100.0, lo_open=True)
        check_range("compress.rel_step", self.rel_step, 0.0, 100.0, lo_open=True)
        check_range("compress.rel_clip", self.rel_clip, 0.0, 100.0, lo_open=True)
        check_choice("compress.targets", self.targets, TARGETS)
        if self.paper != "none" and (self.rank or self.bits != FULL_PRECISION_BITS):
            raise ValueError(f"compress.paper={self.paper!r} stands alone: set compress.rank=0 and "
                             f"compress.bits=32 (got rank={self.rank}, bits={self.bits})")

    @property
    def is_identity(self) -> bool:
        return self.rank == 0 and self.bits == FULL_PRECISION_BITS and self.paper == "none"

    @property
    def method(self) -> str:
        """A short label for tables and plots: none, svd, quant, svd+quant, or the rounding mode (ROUND_MODES)."""
        if self.paper != "none":
            return self.paper
        parts = (["svd"] if self.rank else []) + (["quant"] if self.bits != FULL_PRECISION_BITS else [])
        return "+".join(parts) or "none"


# Field metadata for knobs left out of `TrialConfig.training_key`: they change evaluation, or where and how
# fast the same training runs, not what it computes (up to floating-point rounding and noise samples).
EVAL_ONLY = {"eval_only": True}


@dataclass(frozen=True)
class SweepConfig:
    """The compression grid every trained model is scored on: ranks × bits, plus rounding modes (ROUND_MODES)."""

    ranks: tuple[int, ...] = (0, 16, 32, 64, 128)
    bits: tuple[int, ...] = (32, 8, 4, 2, 1)
    paper: tuple[str, ...] = ("round", "round_clip")
    hard_gates: bool = True    # also score g2 and sharpened models with binary i/f gates (g2.eval_gate = hard)

    def __post_init__(self):
        for r in self.ranks:
            check_range("sweep.ranks[]", r, 0, 65536, integer=True)
        for b in self.bits:
            CompressConfig(bits=b)  # same rule as compress.bits
        for m in self.paper:
            check_choice("sweep.paper[]", m, ROUND_MODES)

    def settings(self, base: CompressConfig) -> list[CompressConfig]:
        """Every setting of the grid, the uncompressed one first; step, clip (absolute and relative) and targets
        come from `base`."""
        grid = [replace(base, rank=r, bits=b, paper="none") for r in self.ranks for b in self.bits]
        grid += [replace(base, rank=0, bits=FULL_PRECISION_BITS, paper=m) for m in self.paper]
        unique = list(dict.fromkeys([replace(base, rank=0, bits=FULL_PRECISION_BITS, paper="none"), *grid]))
        return unique


@dataclass(frozen=True)
class LMConfig:
    """AWD-LSTM language model (Merity et al. 2018) with G2LSTM layers; defaults are the paper's PTB setup."""

    embed_dim: int = 400
    hidden_size: int = 1150
    num_layers: int = 3
    dropout: float = 0.4            # locked dropout on the last layer's output
    dropout_hidden: float = 0.25    # locked dropout between recurrent layers
    dropout_input: float = 0.4      # locked dropout on the embedded input
    dropout_embed: float = 0.1      # drops whole word types from the embedding
    weight_drop: float = 0.5        # DropConnect on W_hh
    tie_weights: bool = True
    bptt: int = 70
    alpha: float = 2.0              # activation regularisation (AR)
    beta: float = 1.0               # temporal activation regularisation (TAR)
    eval_batch_size: int = field(default=10, metadata=EVAL_ONLY)
    test_batch_size: int = field(default=1, metadata=EVAL_ONLY)
    cache_window: int = field(default=0, metadata=EVAL_ONLY)    # neural cache pointer window; 0 = off
    cache_theta: float = field(default=1.0, metadata=EVAL_ONLY)
    cache_lambda: float = field(default=0.1, metadata=EVAL_ONLY)

    def __post_init__(self):
        for name in ("embed_dim", "hidden_size"):
            check_range(f"lm.{name}", getattr(self, name), 1, 1 << 16, integer=True)
        check_range("lm.num_layers", self.num_layers, 1, 16, integer=True)
        for name in ("dropout", "dropout_hidden", "dropout_input", "dropout_embed", "weight_drop"):
            check_range(f"lm.{name}", getattr(self, name), 0.0, 1.0, hi_open=True)
        check_range("lm.bptt", self.bptt, 2, 10_000, integer=True)
        check_range("lm.alpha", self.alpha, 0.0, 100.0)
        check_range("lm.beta", self.beta, 0.0, 100.0)
        check_range("lm.eval_batch_size", self.eval_batch_size, 1, 100_000, integer=True)
        check_range("lm.test_batch_size", self.test_batch_size, 1, 100_000, integer=True)
        check_range("lm.cache_window", self.cache_window, 0, 100_000, integer=True)
        check_range("lm.cache_theta", self.cache_theta, 0.0, 100.0)
        check_range("lm.cache_lambda", self.cache_lambda, 0.0, 1.0)


@dataclass(frozen=True)
class NMTConfig:
    """LSTM encoder-decoder with additive attention and input feeding (docs/design.md §4)."""

    embed_dim: int = 256
    hidden_size: int = 256
    encoder_layers: int = 2         # the first is bidirectional
    decoder_layers: int = 2
    dropout: float = 0.2
    weight_drop: float = 0.0
    label_smoothing: float = 0.0
    # Std σ of the shared embedding's N(0, σ²) init. 0.01 is the authors' NMT scale (their `normal_weight(V, E,
    # scale=0.01)`, after dl4mt's 0.01·N(0, 1); their copy in fact orthonormalises the columns: std 1/√V, 0.006 at
    # V = 30k); 1.0 is PyTorch's nn.Embedding default. The LM keeps AWD's U(±0.1).
    embed_init_std: float = 0.01
    beam_size: int = field(default=5, metadata=EVAL_ONLY)
    length_penalty: float = field(default=1.0, metadata=EVAL_ONLY)   # score / length^α
    max_decode_ratio: float = field(default=1.5, metadata=EVAL_ONLY)  # output length ≤ ratio·source + 10

    def __post_init__(self):
        for name in ("embed_dim", "hidden_size"):
            check_range(f"nmt.{name}", getattr(self, name), 1, 1 << 16, integer=True)
        check_range("nmt.encoder_layers", self.encoder_layers, 1, 16, integer=True)
        check_range("nmt.decoder_layers", self.decoder_layers, 1, 16, integer=True)
        check_range("nmt.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("nmt.weight_drop", self.weight_drop, 0.0, 1.0, hi_open=True)
        check_range("nmt.label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        check_range("nmt.embed_init_std", self.embed_init_std, 0.0, 10.0, lo_open=True)
        check_range("nmt.beam_size", self.beam_size, 1, 100, integer=True)
        check_range("nmt.length_penalty", self.length_penalty, 0.0, 10.0)
        check_range("nmt.max_decode_ratio", self.max_decode_ratio, 0.1, 10.0)


OPTIMIZERS = ("sgd", "adam", "adadelta")
DEVICES = ("auto", "cpu", "cuda")
IMPLS = ("auto", "reference", "fused")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop shared by both tasks."""

    epochs: int = 500
    optimizer: Literal["sgd", "adam", "adadelta"] = "sgd"
    lr: float = 30.0
    weight_decay: float = 1.2e-6
    clip: float = 0.25              # gradient-norm clip; 0 = off
    batch_size: int = 20            # LM: streams; NMT: sentence pairs
    nt_asgd: bool = True            # SGD → averaged SGD when validation stops improving (AWD-LSTM)
    nonmono: int = 5
    finetune_epochs: int = 0        # AWD's fine-tune stage: ASGD restarted from the best model
    max_batches: int = 0            # cap on training batches per epoch; 0 = all (smoke runs)
    max_eval_batches: int = field(default=0, metadata=EVAL_ONLY)   # 0 = all; NMT: spread over lengths
    device: str = field(default="auto", metadata=EVAL_ONLY)
    impl: Literal["auto", "reference", "fused"] = field(default="auto", metadata=EVAL_ONLY)   # G2LSTM's path
    precision: Literal["fp32", "bf16"] = "fp32"       # GEMM operands on the fused path (state stays fp32)
    cuda_graphs: bool = field(default=False, metadata=EVAL_ONLY)   # replay LM training windows as CUDA graphs

    def __post_init__(self):
        check_range("train.epochs", self.epochs, 1, 100_000, integer=True)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_range("train.lr", self.lr, 0.0, 1000.0, lo_open=True)
        check_range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("train.clip", self.clip, 0.0, 1000.0)
        check_range("train.batch_size", self.batch_size, 1, 100_000, integer=True)
        check_range("train.nonmono", self.nonmono, 1, 1000, integer=True)
        check_range("train.finetune_epochs", self.finetune_epochs, 0, 100_000, integer=True)
        check_range("train.max_batches", self.max_batches, 0, 10_000_000, integer=True)
        check_range("train.max_eval_batches", self.max_eval_batches, 0, 10_000_000, integer=True)
        check_choice("train.device", self.device, DEVICES)
        check_choice("train.impl", self.impl, IMPLS)
        check_choice("train.precision", self.precision, PRECISIONS)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"train.cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.precision == "bf16" and self.impl == "reference":
            raise ValueError("train.precision='bf16' runs on the fused path only; set train.impl to 'auto' or "
                             "'fused' (CUDA), or train.precision='fp32'")


@dataclass(frozen=True)
class DataConfig:
    """Where a trial's corpus comes from, and how translation text is segmented."""

    corpus: str = "ptb"             # ptb | wikitext-2 | multi30k | toy | toy-copy | toy-reverse | a directory
    data_dir: str = field(default="", metadata=EVAL_ONLY)    # overrides $G2_DATA_DIR and ../shared/data
    src_ext: str = "de"
    tgt_ext: str = "en"
    bpe_vocab_size: int = 8000      # joint sentencepiece BPE
    max_len: int = 80               # training pairs longer than this (BPE tokens) are dropped
    cache_dir: str = field(default="", metadata=EVAL_ONLY)   # BPE models, generated corpora; "" = ~/.cache/g2-study

    def __post_init__(self):
        if not self.corpus:
            raise ValueError("data.corpus must name a corpus (ptb, wikitext-2, multi30k, toy, ...) or a directory")
        check_range("data.bpe_vocab_size", self.bpe_vocab_size, 50, 1_000_000, integer=True)
        check_range("data.max_len", self.max_len, 1, 10_000, integer=True)


SECTIONS = {"g2": G2Config, "compress": CompressConfig, "sweep": SweepConfig, "lm": LMConfig, "nmt": NMTConfig,
            "train": TrainConfig, "data": DataConfig}
TASKS = ("lm", "nmt")
# `--smoke`: a few batches of two epochs and a small sweep, to check that a setup runs end to end.
SMOKE = {"train.epochs": 2, "train.max_batches": 8, "train.max_eval_batches": 4,
         "sweep.ranks": [0, 8], "sweep.bits": [32, 4], "sweep.paper": ["round_clip"]}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs. Flat, dotted names (`g2.tau`) are the same in the study's TOML, the
    search space, MLflow params and the results columns."""

    task: Literal["lm", "nmt"] = "lm"
    seed: int = 1111
    g2: G2Config = G2Config()
    compress: CompressConfig = CompressConfig()
    sweep: SweepConfig = SweepConfig()
    lm: LMConfig = LMConfig()
    nmt: NMTConfig = NMTConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        if self.task == "lm" and self.compress.targets == "recurrent+context":
            raise ValueError("compress.targets='recurrent+context' is for translation: a language model has no "
                             "context inputs; use one of 'both', 'recurrent', 'input'")

    @classmethod
    def preset(cls, task: str, name: str) -> TrialConfig:
        check_choice("task", task, TASKS)
        check_choice("preset", name, tuple(PRESETS[task]))
        return cls.from_flat({"task": task, **PRESETS[task][name]})

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: TrialConfig | None = None) -> TrialConfig:
        """Build from dotted keys over `base` (defaults if None); unknown keys and bad values raise ValueError."""
        base = base or cls()
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if name and section in SECTIONS:
                sections[section][name] = value
            elif not name and key in ("task", "seed"):
                top[key] = coerce(key, value, int if key == "seed" else str)
            else:
                raise ValueError(f"unknown field {key!r}; fields are task, seed and "
                                 f"{', '.join(s + '.*' for s in SECTIONS)}")
        for section, values in sections.items():
            cls_ = SECTIONS[section]
            reject_unknown(section, cls_, values)
            hints = get_type_hints(cls_)
            coerced = {k: coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
            top[section] = replace(getattr(base, section), **coerced)
        return replace(base, **top)

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {"task": self.task, "seed": self.seed}
        for section in SECTIONS:
            for f in fields(SECTIONS[section]):
                flat[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return flat

    def training_key(self) -> str:
        """A digest of every knob that changes the trained weights: trials sharing it share a checkpoint.

        Compression, the sweep and evaluation-only fields are left out, so a trial that differs from an
        earlier one only in those re-scores the earlier model instead of training again.
        """
        knobs = {"task": self.task, "seed": self.seed, "recipe": TRAINING_RECIPE}
        for section in ("g2", "lm" if self.task == "lm" else "nmt", "train", "data"):
            for f in fields(SECTIONS[section]):
                if not f.metadata.get("eval_only") and not (section == "g2" and f.name == "eval_gate"):
                    knobs[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return hashlib.sha256(json.dumps(knobs, sort_keys=True, default=list).encode()).hexdigest()[:16]
