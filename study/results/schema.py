"""The schema of a study's Parquet datasets, derived from the TrialConfig dataclasses and the trial report.

Columns are the flat knob names (`g2.tau`), the names a trial reports (`trainables.report`) and a few of the
study's own (`trial_id`, `finished_at`). Only the gate-saturation columns (`gate_l{k}_{i|f}_{lt01|gt09}`) vary,
with the number of layers, and are float64 wherever they appear.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pyarrow as pa

from trainables.config import TrialConfig
from trainables.report import (
    ACCOUNTING,
    COMPRESSED_VAL_METRIC,
    CURVE_FIELDS,
    EVAL_GATE,
    FINISHED_AT,
    GATE_BITS,
    GATE_COMPRESSION,
    IS_TRIAL_SETTING,
    METHOD,
    MODEL_BITS,
    MODEL_COMPRESSION,
    REUSED_CHECKPOINT,
    STATUS,
    TEST_LOSS,
    TEST_METRIC,
    TRAIN_LOSS,
    TRAINING_KEY,
    TRIAL_ID,
    UNCOMPRESSED_TEST_METRIC,
    UNCOMPRESSED_VAL_METRIC,
    VAL_LOSS,
    VAL_METRIC,
    Accounting,
    EpochReport,
    gate_column_order,
    is_gate_column,
)

SETTING_KNOBS = ("compress.rank", "compress.bits", "compress.paper", EVAL_GATE)   # per row: the sweep point, not the trial's
# The study's objectives are named as trials report them; each is a column of the results rows, where every row is
# one compression setting (`val_metric` of a row *is* the compressed validation metric of that setting).
OBJECTIVE_COLUMN = {COMPRESSED_VAL_METRIC: VAL_METRIC, VAL_METRIC: UNCOMPRESSED_VAL_METRIC, GATE_BITS: GATE_BITS,
                    MODEL_BITS: MODEL_BITS, GATE_COMPRESSION: GATE_COMPRESSION, MODEL_COMPRESSION: MODEL_COMPRESSION}

def _arrow_type(name: str, hint: Any) -> pa.DataType:
    """The Arrow type of one dataclass annotation; a new kind of knob must be mapped here, not guessed."""
    if get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint):   # `float | None`: nullable anyway
        (hint,) = (a for a in get_args(hint) if a is not type(None))
    if hint is bool:
        return pa.bool_()
    if hint is int:
        return pa.int64()
    if hint is float:
        return pa.float64()
    if hint is str or (get_origin(hint) is Literal and all(isinstance(a, str) for a in get_args(hint))):
        return pa.string()
    if get_origin(hint) is tuple:
        return pa.list_(_arrow_type(f"{name}[]", get_args(hint)[0]))
    raise TypeError(f"no Arrow type for knob {name!r} annotated {hint!r}")


_IDENTITY = {"study": pa.string(), TRIAL_ID: pa.string(), STATUS: pa.string(), "error": pa.string(),
             "task": pa.string(), "metric_name": pa.string(), FINISHED_AT: pa.timestamp("us", tz="UTC"),
             "device": pa.string(), "node_id": pa.string(), TRAINING_KEY: pa.string(),
             REUSED_CHECKPOINT: pa.bool_()}   # node_id: the Ray node that ran the trial's last report
_SETTING = {"method": pa.string(), IS_TRIAL_SETTING: pa.bool_(), "epoch": pa.int64(), "best_epoch": pa.int64(),
            "wall_time_s": pa.float64()}
_METRICS = {**dict.fromkeys((VAL_METRIC, TEST_METRIC, VAL_LOSS, TEST_LOSS, UNCOMPRESSED_VAL_METRIC,
                             UNCOMPRESSED_TEST_METRIC), pa.float64()),
            **{name: _arrow_type(name, hint) for name, hint in get_type_hints(Accounting).items()}}
_REPORT_TYPES = get_type_hints(EpochReport)
CURVE_COLUMNS = {"study": pa.string(), TRIAL_ID: pa.string(),
                 **{name: _arrow_type(name, _REPORT_TYPES[name]) for name in CURVE_FIELDS},
                 TRAIN_LOSS: pa.float64(), VAL_LOSS: pa.float64(), GATE_COMPRESSION: pa.float64()}
_GATES = {"study": pa.string(), TRIAL_ID: pa.string(), "g2.gate_mode": pa.string(), "epoch": pa.int64(),
          "layer": pa.int64(), "gate": pa.string(), "bin": pa.int64(), "fraction": pa.float64()}
SWEEP_COLUMNS = (METHOD, IS_TRIAL_SETTING, VAL_METRIC, TEST_METRIC, VAL_LOSS, TEST_LOSS, *ACCOUNTING)


# --------------------------------------------------------------------------- schemas

def knob_types(cls: type = TrialConfig, prefix: str = "") -> dict[str, pa.DataType]:
    """Flat knob name -> Arrow type, from the dataclass annotations (the same walk as `TrialConfig.to_flat`)."""
    hints = get_type_hints(cls)
    out: dict[str, pa.DataType] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out |= knob_types(hint, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = _arrow_type(prefix + f.name, hint)
    return out


def _with_extras(base: Mapping[str, pa.DataType], extra_columns: Iterable[str], *, saturation: bool = True
                 ) -> pa.Schema:
    """`base`, then the gate-saturation columns among `extra_columns` (if the dataset has them); others are refused."""
    extras = set(extra_columns) - set(base)
    unknown = sorted(n for n in extras if not (saturation and is_gate_column(n)))
    if unknown:
        also = " and gate_l{k}_{i|f}_{lt01|gt09}" if saturation else ""
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; columns are {', '.join(base)}{also}")
    return pa.schema([*base.items(), *((name, pa.float64()) for name in sorted(extras, key=gate_column_order))])


def results_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """Identity, every TrialConfig knob, the row's setting and metrics, then `extra_columns` (gate saturation)."""
    knobs = {k: t for k, t in knob_types().items() if k not in _IDENTITY}   # `task` is an identity column too
    return _with_extras({**_IDENTITY, **knobs, **_SETTING, **_METRICS}, extra_columns)


def curves_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """One row per epoch; `extra_columns` (gate saturation) as float64."""
    return _with_extras(CURVE_COLUMNS, extra_columns)


def gates_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """One row per (layer, gate, bin) of a trial's gate histograms; the dataset takes no extra columns."""
    return _with_extras(_GATES, extra_columns, saturation=False)


