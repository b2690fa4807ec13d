"""The rows of a study's datasets, made from a trial's typed reports: a row per sweep point, per epoch, per bin."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any

from study.results.schema import SETTING_KNOBS, SWEEP_COLUMNS, knob_types
from trainables.config import CompressConfig
from trainables.report import (
    CURVE_FIELDS,
    ERROR,
    FINISHED_AT,
    GATE_COMPRESSION,
    GATES,
    IS_TRIAL_SETTING,
    METHOD,
    OK,
    REUSED_CHECKPOINT,
    STATUS,
    STATUSES,
    TRAIN_LOSS,
    TRAINING_KEY,
    TRIAL_ID,
    UNCOMPRESSED_TEST_METRIC,
    UNCOMPRESSED_VAL_METRIC,
    VAL_LOSS,
    VAL_METRIC,
    EpochReport,
    all_gate_columns,
    gate_layers,
    parse_histogram_key,
)

log = logging.getLogger(__name__)


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


def trial_rows(study: str, trial_id: str, config: Mapping[str, Any], report: EpochReport | None, *,
               status: str, error: str | None, finished_at: datetime) -> list[dict[str, Any]]:
    """The results rows of one finished trial: one per sweep point if `ok`, else a single row.

    Args:
        config: the flat trial config (`TrialConfig.to_flat()` keys); `_`-prefixed study keys are dropped.
        report: the trial's last measurement (with its `sweep` when ok), or None if it never reported one.
        status: how it ended (`study.trial_end.end_status`).
        finished_at: a timezone-aware time; a naive one would silently be local time in a UTC column.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if finished_at.tzinfo is None:
        raise ValueError("finished_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    knobs = _knobs(config)
    reported = {k: getattr(report, k) if report else None
                for k in ("metric_name", "device", "node_id", TRAINING_KEY, "epoch", "best_epoch")}
    base = {**knobs, "study": study, TRIAL_ID: trial_id, STATUS: status, FINISHED_AT: finished_at,
            "error": error if error is not None else (report.error if report and status != OK else None), **reported,
            REUSED_CHECKPOINT: report.reused_checkpoint if report else None,
            "wall_time_s": report.train_time_s if report else None,
            # every gate column of the model, so each trial's file has the same columns whatever it reported
            # (a re-scored model, a divergence, an error): a whole directory reads as one table anywhere
            **dict.fromkeys(all_gate_columns(gate_layers(knobs) or 0)), **(report.gate_saturation if report else {})}
    base["task"] = knobs.get("task")

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


def _pick(row: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: row.get(k) for k in keys}


def _measured(value: float) -> float | None:
    """A report's metric, None where it was never measured (a record's NaN default)."""
    return None if value is None or math.isnan(value) else value


def curve_rows(study: str, trial_id: str, config: Mapping[str, Any], reports: Iterable[EpochReport]
               ) -> list[dict[str, Any]]:
    """One row per epoch reported, the last report of an epoch winning (a trial re-entered at its end says it again).

    A reused checkpoint did not train, so it has no curve. Every row has every gate column of the model (null in a
    diverged epoch, and in the last epoch when a final report measured the best epoch's model in its place), so
    every curves file has the same columns.
    """
    gates = dict.fromkeys(all_gate_columns(gate_layers(config) or 0))
    by_epoch: dict[int, dict[str, Any]] = {}
    for report in reports:
        if report.epoch is None or report.reused_checkpoint:
            continue
        row = {name: getattr(report, name) for name in CURVE_FIELDS}
        row |= {TRAIN_LOSS: report.train.get(TRAIN_LOSS), VAL_LOSS: report.val.get(VAL_LOSS),
                GATE_COMPRESSION: report.accounting.gate_compression if report.accounting else None}
        other_model = report.sweep is not None and report.best_epoch not in (None, report.epoch)
        by_epoch[report.epoch] = {"study": study, TRIAL_ID: trial_id, **row, **gates,
                                  **({} if other_model else report.gate_saturation)}
    return [by_epoch[e] for e in sorted(by_epoch)]


def gate_rows(study: str, trial_id: str, config: Mapping[str, Any], report: EpochReport | None
              ) -> list[dict[str, Any]]:
    """The tidy rows of one report's `gate_histograms` (layer, i before f, bin); none if it carries none.

    `fraction` is the share of the layer's gate values in bin `bin` of the equal bins on [0, 1]
    (`trainables.report`).
    """
    histograms = report.gate_histograms if report is not None else None
    if not histograms:
        return []
    keys = {}
    for key in histograms:
        if not (layer_gate := parse_histogram_key(key)):
            raise ValueError(f"gate histogram key {key!r} is not of the form l<k>_i or l<k>_f")
        keys[key] = (layer_gate[0], GATES.index(layer_gate[1]))
    base = {"study": study, TRIAL_ID: trial_id, "g2.gate_mode": config.get("g2.gate_mode"), "epoch": report.epoch}
    return [{**base, "layer": keys[key][0], "gate": key[-1], "bin": b, "fraction": float(fraction)}
            for key in sorted(keys, key=keys.get) for b, fraction in enumerate(histograms[key])]
