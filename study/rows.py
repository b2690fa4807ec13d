"""The rows of a study's datasets, made from what a trial reported: a row per sweep point, per epoch, per bin."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any

from study.schema import CURVE_COLUMNS, SETTING_KNOBS, SWEEP_COLUMNS, knob_types
from trainables.config import CompressConfig
from trainables.report import (
    DIVERGED,
    ERROR,
    FINISHED_AT,
    GATES,
    IS_TRIAL_SETTING,
    METHOD,
    OK,
    PRUNED,
    REUSED_CHECKPOINT,
    STATUS,
    STATUSES,
    TRAINING_KEY,
    TRIAL_ID,
    UNCOMPRESSED_TEST_METRIC,
    UNCOMPRESSED_VAL_METRIC,
    VAL_LOSS,
    VAL_METRIC,
    EpochReport,
    all_gate_columns,
    gate_layers,
    is_gate_column,
    parse_histogram_key,
)

log = logging.getLogger(__name__)


def gate_columns(report: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (report or {}).items() if is_gate_column(k)}


def _knobs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat config minus study-private `_` keys; tuples become lists for Arrow, numpy scalars plain Python."""
    known = knob_types()
    out = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in known:
            log.warning("config key %r is not a TrialConfig knob; it is not recorded in the results", key)
            continue
        if hasattr(value, "item") and not isinstance(value, (list, tuple)):
            value = value.item()
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def trial_status(last_report: Mapping[str, Any] | None, error: str | None = None) -> str:
    """A finished trial's status: `error` if it raised, `diverged` if it said so, `ok` only with a sweep, else `pruned`.

    A trial stopped before its last epoch (a scheduler, a stopper) has no sweep; calling it `ok` would let a truncated
    model into a front.
    """
    if error is not None:
        return ERROR
    if last_report and last_report.get(STATUS) == DIVERGED:
        return DIVERGED
    return OK if last_report and last_report.get("sweep") else PRUNED


def trial_rows(study: str, trial_id: str, config: Mapping[str, Any], last_report: Mapping[str, Any] | None, *,
               status: str, error: str | None, finished_at: datetime) -> list[dict[str, Any]]:
    """The results rows of one finished trial: one per sweep point if `ok`, else a single row.

    Args:
        config: the flat trial config (`TrialConfig.to_flat()` keys); `_`-prefixed study keys are dropped.
        last_report: the trial's last report (with `sweep` when ok), or None if it never reported.
        finished_at: a timezone-aware time; a naive one would silently be local time in a UTC column.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if finished_at.tzinfo is None:
        raise ValueError("finished_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    report = EpochReport.from_dict(last_report) if last_report else None
    knobs = _knobs(config)
    said = {k: getattr(report, k) if report else None
            for k in ("metric_name", "device", "node_id", TRAINING_KEY, "epoch", "best_epoch")}
    base = {**knobs, "study": study, TRIAL_ID: trial_id, STATUS: status, FINISHED_AT: finished_at,
            "error": error if error is not None else (report.error if report and status != OK else None), **said,
            REUSED_CHECKPOINT: report.reused_checkpoint if report else None,
            "wall_time_s": report.train_time_s if report else None,
            # every gate column of the model, so each trial's file has the same columns whatever it reported
            # (a re-scored model, a divergence, an error): a whole directory reads as one table anywhere
            **dict.fromkeys(all_gate_columns(gate_layers(knobs) or 0)), **(report.gate_saturation if report else {})}
    base["task"] = knobs.get("task", (last_report or {}).get("task"))

    if status == OK:
        if not (report and report.sweep):
            raise ValueError(f"trial {trial_id}: an ok trial's last report must carry its `sweep`")
        plain = {r.eval_gate: r for r in report.sweep if r.method == "none"}   # each row's, with the row's gates
        return [{**base, UNCOMPRESSED_VAL_METRIC: plain[r.eval_gate].val_metric,
                 UNCOMPRESSED_TEST_METRIC: plain[r.eval_gate].test_metric,
                 **_pick(r.to_dict(), (*SETTING_KNOBS, *SWEEP_COLUMNS))} for r in report.sweep]

    # One row at the trial's own setting. Its metrics are the last epoch's where known (a failure has none):
    # the report's compressed metric is this row's metric, its plain val metric the uncompressed one.
    row = {**base, IS_TRIAL_SETTING: True}
    try:
        row[METHOD] = CompressConfig(**{k.split(".")[1]: knobs[k] for k in SETTING_KNOBS
                                          if k in knobs and k.startswith("compress.")}).method
    except (TypeError, ValueError):   # the very setting may be what made the trial fail
        row[METHOD] = None
    if status != ERROR and report is not None:
        row |= {VAL_METRIC: _measured(report.compressed_val_metric),
                UNCOMPRESSED_VAL_METRIC: _measured(report.val_metric),
                **(asdict(report.accounting) if report.accounting else {})}
        if row[METHOD] == "none":   # the reported val_loss is the uncompressed model's: only then this row's
            row[VAL_LOSS] = report.val.get(VAL_LOSS)
    else:   # how far it got is known; what it measured is not
        row |= {k: None for k in (report.gate_saturation if report else {})}
    return [row]


def _pick(said: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: said.get(k) for k in keys}


def _measured(value: float) -> float | None:
    """A report's metric, None where it was never measured (a record's NaN default)."""
    return None if value is None or math.isnan(value) else value


def curve_rows(study: str, trial_id: str, config: Mapping[str, Any], reports: Iterable[Mapping[str, Any]]
               ) -> list[dict[str, Any]]:
    """One row per epoch reported, the last report of an epoch winning (a trial re-entered at its end says it again).

    A reused checkpoint did not train, so it has no curve. Every row has every gate column of the model (null in a
    diverged epoch), so every curves file has the same columns.
    """
    gates = dict.fromkeys(all_gate_columns(gate_layers(config) or 0))
    by_epoch: dict[int, dict[str, Any]] = {}
    for report in reports:
        if report.get("epoch") is None or report.get(REUSED_CHECKPOINT):
            continue
        row = {k: report.get(k) for k in CURVE_COLUMNS if k not in ("study", TRIAL_ID)}
        by_epoch[int(report["epoch"])] = {"study": study, TRIAL_ID: trial_id, **row, **gates, **gate_columns(report)}
    return [by_epoch[e] for e in sorted(by_epoch)]


def gate_rows(study: str, trial_id: str, config: Mapping[str, Any], report: Mapping[str, Any] | None
              ) -> list[dict[str, Any]]:
    """The tidy rows of one report's `gate_histograms` (layer, i before f, bin); none if it carries none.

    `fraction` is the share of the layer's gate values in bin `bin` of the equal bins on [0, 1] (DESIGN §2).
    """
    histograms = (report or {}).get("gate_histograms")
    if not histograms:
        return []
    keys = {}
    for key in histograms:
        if not (layer_gate := parse_histogram_key(key)):
            raise ValueError(f"gate histogram key {key!r} is not of the form l<k>_i or l<k>_f")
        keys[key] = (layer_gate[0], GATES.index(layer_gate[1]))
    base = {"study": study, TRIAL_ID: trial_id, "g2.gate_mode": config.get("g2.gate_mode"),
            "epoch": report.get("epoch")}
    return [{**base, "layer": keys[key][0], "gate": key[-1], "bin": b, "fraction": float(fraction)}
            for key in sorted(keys, key=keys.get) for b, fraction in enumerate(histograms[key])]


