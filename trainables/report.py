"""What a trial reports: one vocabulary for the trainables that say it and the study and analysis that read it.

A trial reports once per epoch (`EpochReport`); the last report of a trial that finished carries its compression
sweep (`SweepRow`s). `to_dict()` gives the flat dict `tune.report` takes, Parquet columns and MLflow metrics are
named after; `from_dict()` reads one back on the driver. Every metric, status and gate-column name the study and
the analysis use is a field or a constant here, so a rename is one edit.

Torch-free on purpose: the driver, the results dataset, MLflow and the notebooks import it without a model.

Gate saturation (the paper's Fig. 3; docs/design.md) is reported per recurrent layer k and gate g ∈ {i, f} as the
fractions of gate values below 0.1 and above 0.9, in columns `gate_l{k}_{g}_lt01` / `gate_l{k}_{g}_gt09`, and
as a histogram of `HIST_BINS` equal bins on [0, 1] under the key `l{k}_{g}`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

# --------------------------------------------------------------------------- statuses

RUNNING, OK, PRUNED, DIVERGED, ERROR = "running", "ok", "pruned", "diverged", "error"
STATUSES = (OK, PRUNED, DIVERGED, ERROR)     # how a trial ends: a results row's `status`
FAILED = (DIVERGED, ERROR)                   # ends that are no point of the front (Optuna FAIL, MLflow FAILED)
HIGHER_IS_BETTER = {"lm": False, "nmt": True}   # each task's metric: perplexity is minimised, BLEU maximised

# --------------------------------------------------------------------------- metric columns

# The task's metric (perplexity or BLEU, `metric_name` says which) and loss, by split. In a results row `val_metric`
# is that row's (compressed) model's; in an epoch report the uncompressed model's, `compressed_val_metric` the copy's
# under the trial's own setting (the study's default objective).
TRAIN_LOSS, VAL_LOSS, TEST_LOSS = "train_loss", "val_loss", "test_loss"
VAL_METRIC, TEST_METRIC = "val_metric", "test_metric"
COMPRESSED_VAL_METRIC, COMPRESSED_TEST_METRIC = "compressed_val_metric", "compressed_test_metric"
UNCOMPRESSED_VAL_METRIC, UNCOMPRESSED_TEST_METRIC = "uncompressed_val_metric", "uncompressed_test_metric"

# The other names a trial reports and a results row carries (each row also has every knob, by its dotted name).
TRIAL_ID, STATUS, FINISHED_AT = "trial_id", "status", "finished_at"   # the study's, on every row
TRAINING_KEY, REUSED_CHECKPOINT = "training_key", "reused_checkpoint"  # the trained model; re-scored, not trained
METHOD, IS_TRIAL_SETTING = "method", "is_trial_setting"               # a sweep row's compression; the trial's own
TRAIN_TOKENS = "train_tokens"                                          # tokens an epoch trained on

# --------------------------------------------------------------------------- gate saturation

HIST_BINS = 10
GATES = ("i", "f")
LOW, HIGH = "lt01", "gt09"                   # fraction of gate values < 0.1, > 0.9
_GATE_COLUMN = re.compile(r"^gate_l(\d+)_([if])_(lt01|gt09)$")
_HISTOGRAM_KEY = re.compile(r"^l(\d+)_([if])$")


class GateColumn(NamedTuple):
    """One gate-saturation column: layer k, gate i or f, side lt01 or gt09."""

    layer: int
    gate: str
    side: str

    @property
    def name(self) -> str:
        return f"gate_l{self.layer}_{self.gate}_{self.side}"

    @classmethod
    def parse(cls, name: str) -> GateColumn | None:
        """The column `name` names, or None if it is no gate-saturation column."""
        m = _GATE_COLUMN.match(name)
        return cls(int(m[1]), m[2], m[3]) if m else None


def gate_column(layer: int, gate: str, side: str) -> str:
    return GateColumn(layer, gate, side).name


def is_gate_column(name: str) -> bool:
    return _GATE_COLUMN.match(name) is not None


def gate_column_order(name: str) -> tuple:
    """Sort key: gate columns by layer (10 after 9, not after 1), i before f, lt01 before gt09; others after."""
    col = GateColumn.parse(name)
    return (0, col.layer, GATES.index(col.gate), col.side == HIGH) if col else (1, 0, 0, name)


def gate_layers(flat_config: Mapping[str, Any]) -> int | None:
    """How many recurrent layers a trial of this flat config reports gates for (`GateStatistics`): an LM's layers;
    NMT's encoder counts its bidirectional first layer twice. None when the config does not say."""
    try:
        if flat_config.get("task") == "lm":
            return int(flat_config["lm.num_layers"])
        if flat_config.get("task") == "nmt":
            return int(flat_config["nmt.encoder_layers"]) + 1 + int(flat_config["nmt.decoder_layers"])
    except (KeyError, TypeError, ValueError):
        pass
    return None


def all_gate_columns(layers: int) -> list[str]:
    """Every gate-saturation column of a model with `layers` recurrent layers, in `gate_column_order`."""
    return [gate_column(k, g, side) for k in range(layers) for g in GATES for side in (LOW, HIGH)]


def histogram_key(layer: int, gate: str) -> str:
    return f"l{layer}_{gate}"


def parse_histogram_key(key: str) -> tuple[int, str] | None:
    """(layer, gate) of a `gate_histograms` key, or None."""
    m = _HISTOGRAM_KEY.match(key)
    return (int(m[1]), m[2]) if m else None


# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Accounting:
    """Storage of one (compressed) model; the same columns for every task (`trainables.compress`)."""

    gate_params: int           # parameters in all i/f blocks of all recurrent layers
    gate_bits: int             # their stored size: compressed blocks as compressed, the rest as float32
    model_params: int
    model_bits: int            # gate_bits + 32 bits for every other parameter (embeddings included)
    gate_compression: float    # 32 · gate_params / gate_bits
    model_compression: float   # 32 · model_params / model_bits
    relative_error: float      # ‖W − Ŵ‖_F / ‖W‖_F over the compressed blocks (0 when nothing changed)
    fraction_zeroed: float     # share of the compressed blocks' nonzero weights that became exactly 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Accounting:
        """Read the fields back from a report, a results row or an export manifest; a field added after the record
        was written (`ADDED_LATER`) reads as NaN, never as a measured 0."""
        return cls(**{k: values.get(k, math.nan) if k in ADDED_LATER else values[k] for k in ACCOUNTING})


ACCOUNTING = tuple(f.name for f in fields(Accounting))
ADDED_LATER = ("fraction_zeroed",)   # absent from the reports, stored divergences and exports of older code
EVAL_GATE = "g2.eval_gate"   # a knob, set per sweep row like compress.*: the row's gates at inference
GATE_PARAMS, MODEL_PARAMS, GATE_BITS, MODEL_BITS = "gate_params", "model_params", "gate_bits", "model_bits"
GATE_COMPRESSION, MODEL_COMPRESSION = "gate_compression", "model_compression"   # with the bits: the size objectives
RELATIVE_ERROR, FRACTION_ZEROED = "relative_error", "fraction_zeroed"            # what a setting did to the weights
assert {GATE_PARAMS, MODEL_PARAMS, GATE_BITS, MODEL_BITS, GATE_COMPRESSION, MODEL_COMPRESSION, RELATIVE_ERROR,
        FRACTION_ZEROED} <= set(ACCOUNTING) and set(ADDED_LATER) <= set(ACCOUNTING)


def scored(split: str, scores: Mapping[str, float], metric: str) -> dict[str, float]:
    """A task's scores on a split as report keys: {"loss", "ppl"} on "val" -> val_loss, val_ppl and val_metric."""
    return {f"{split}_{k}": v for k, v in scores.items()} | {f"{split}_metric": scores[metric]}


@dataclass(frozen=True)
class SweepRow:
    """One compression setting of the final sweep, scored on validation and test (`scored` keys)."""

    rank: int
    bits: int
    paper: str
    method: str                # none, svd, quant, svd+quant, or a rounding mode (round, round_clip, *_rel)
    eval_gate: str             # the g2.eval_gate it was scored with: the trial's own, or hard (binary i/f gates)
    is_trial_setting: bool     # the trial's own `compress.*` and `g2.eval_gate`, the setting its objectives name
    accounting: Accounting
    scores: dict[str, float]   # val_loss, val_metric, test_metric, ... (task-specific names besides)

    @property
    def val_metric(self) -> float:
        return self.scores[VAL_METRIC]

    @property
    def test_metric(self) -> float:
        return self.scores[TEST_METRIC]

    def to_dict(self) -> dict[str, Any]:
        return {"compress.rank": self.rank, "compress.bits": self.bits, "compress.paper": self.paper,
                EVAL_GATE: self.eval_gate, METHOD: self.method, IS_TRIAL_SETTING: self.is_trial_setting,
                **asdict(self.accounting),
                **self.scores}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> SweepRow:
        setting = ("compress.rank", "compress.bits", "compress.paper", EVAL_GATE, METHOD, IS_TRIAL_SETTING)
        return cls(rank=row["compress.rank"], bits=row["compress.bits"], paper=row["compress.paper"],
                   eval_gate=row.get(EVAL_GATE, "soft"), method=row[METHOD], is_trial_setting=row[IS_TRIAL_SETTING],
                   accounting=Accounting.from_dict(row),
                   scores={k: v for k, v in row.items() if k not in setting and k not in ACCOUNTING})


@dataclass(frozen=True)
class EpochReport:
    """One report of a trial. Epoch reports are `running`; the last one says how the trial ended.

    `val_metric` is the uncompressed model's validation metric and `compressed_val_metric` that of a compressed
    copy under the trial's own setting: the study's default objective. On an `ok` end both are the best epoch's,
    scored on the whole splits by the sweep, and `test_metric` / `compressed_test_metric` join them.
    """

    epoch: int | None = None
    status: str = RUNNING
    done: bool = False
    metric_name: str = ""                          # the task's metric: ppl (lower is better) or bleu
    device: str = ""
    training_key: str = ""                         # trials that share it share one trained model
    node_id: str | None = None                     # the Ray node that ran it
    error: str | None = None
    reused_checkpoint: bool = False                # scored a stored model; trained nothing
    train: dict[str, float] = field(default_factory=dict)    # train_loss, ...
    val: dict[str, float] = field(default_factory=dict)      # scored("val", ...): val_loss, val_metric, ...
    val_metric: float = math.nan
    compressed_val_metric: float = math.nan
    accounting: Accounting | None = None           # of the trial's own compression setting
    gate_saturation: dict[str, float] = field(default_factory=dict)        # gate_column(...) -> fraction
    gate_histograms: dict[str, list[float]] = field(default_factory=dict)  # histogram_key(...) -> HIST_BINS fractions
    epoch_time_s: float | None = None
    train_time_s: float | None = None
    best_epoch: int | None = None                  # the rest: the final report of an `ok` trial
    test_metric: float | None = None
    compressed_test_metric: float | None = None
    sweep: tuple[SweepRow, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The flat dict for `tune.report`: None fields left out, gate columns and scores at the top level."""
        out: dict[str, Any] = {"epoch": self.epoch, STATUS: self.status, "done": self.done,
                               "metric_name": self.metric_name, "device": self.device,
                               TRAINING_KEY: self.training_key, "node_id": self.node_id, "error": self.error,
                               REUSED_CHECKPOINT: self.reused_checkpoint, **self.train, **self.val,
                               VAL_METRIC: self.val_metric, COMPRESSED_VAL_METRIC: self.compressed_val_metric,
                               **(asdict(self.accounting) if self.accounting else {}), **self.gate_saturation,
                               "gate_histograms": self.gate_histograms or None, "epoch_time_s": self.epoch_time_s,
                               "train_time_s": self.train_time_s, "best_epoch": self.best_epoch,
                               TEST_METRIC: self.test_metric, COMPRESSED_TEST_METRIC: self.compressed_test_metric,
                               "sweep": [row.to_dict() for row in self.sweep] if self.sweep is not None else None}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> EpochReport:
        """Read back what `to_dict` made (Tune adds its own keys, such as training_iteration: they are ignored)."""
        known = {f.name for f in fields(cls)} - {"train", "val", "accounting", "gate_saturation", "sweep"}
        values = {k: report[k] for k in known if k in report}
        if report.get("sweep") is not None:
            values["sweep"] = tuple(SweepRow.from_dict(r) for r in report["sweep"])
        if all(k in report for k in ACCOUNTING if k not in ADDED_LATER):
            values["accounting"] = Accounting.from_dict(report)
        return cls(**values, train={k: v for k, v in report.items() if k.startswith("train_") and k != "train_time_s"},
                   val={k: v for k, v in report.items() if k.startswith("val_") and k != VAL_METRIC},
                   gate_saturation={k: v for k, v in report.items() if is_gate_column(k)})

    def metrics(self) -> dict[str, float]:
        """The measurements of this report by their flat names, as `to_dict` has them (the epoch, status and text
        left out): what a tracker logs at its epoch."""
        values = {**self.train, **self.val, VAL_METRIC: self.val_metric,
                  COMPRESSED_VAL_METRIC: self.compressed_val_metric,
                  **(asdict(self.accounting) if self.accounting else {}), **self.gate_saturation,
                  "epoch_time_s": self.epoch_time_s, "train_time_s": self.train_time_s, "best_epoch": self.best_epoch,
                  TEST_METRIC: self.test_metric, COMPRESSED_TEST_METRIC: self.compressed_test_metric}
        return {k: float(v) for k, v in values.items() if v is not None}

    @property
    def finished(self) -> bool:
        """An `ok` end: the sweep was scored."""
        return self.status == OK and self.sweep is not None

    def own_setting(self) -> SweepRow:
        """The sweep row of the trial's own compression setting."""
        return next(row for row in self.sweep or () if row.is_trial_setting)

    def uncompressed(self) -> SweepRow:
        """The uncompressed model's row, with the trial's own evaluation gates."""
        own_gate = self.own_setting().eval_gate
        return next(row for row in self.sweep or () if row.method == "none" and row.eval_gate == own_gate)


CURVE_FIELDS = ("epoch", VAL_METRIC, COMPRESSED_VAL_METRIC, "epoch_time_s", "train_time_s")   # per-epoch curves keep
assert set(CURVE_FIELDS) <= {f.name for f in fields(EpochReport)}
