"""The study's Pareto front over the results dataset: computed, printed, and attached to the MLflow parent run.

Objectives are named as the trials report them (`compressed_val_metric`, `gate_bits`); in the results dataset
each row is one compression setting, so they map onto its columns (`study.results.schema.OBJECTIVE_COLUMN`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.pareto import pareto_front, same_model_columns
from study import results
from study.config import StudyConfig
from study.results.schema import OBJECTIVE_COLUMN
from study.tracking import open_tracker
from study.vocabulary import blank_inapplicable, metric_label
from trainables.report import (
    FAILED,
    FINISHED_AT,
    GATE_BITS,
    GATE_COMPRESSION,
    HIGHER_IS_BETTER,
    METHOD,
    MODEL_COMPRESSION,
    OK,
    STATUS,
    TEST_METRIC,
    TRIAL_ID,
    VAL_METRIC,
)

log = logging.getLogger(__name__)
SHOWN = [TRIAL_ID, "g2.gate_mode", "g2.tau", "g2.p", METHOD, "compress.rank", "compress.bits", GATE_BITS,
         GATE_COMPRESSION, MODEL_COMPRESSION, VAL_METRIC, TEST_METRIC]


def front_objectives(cfg: StudyConfig) -> dict[str, str]:
    """{results column: "min" | "max"} for the study's objectives."""
    return {OBJECTIVE_COLUMN[name]: mode for name, mode in zip(cfg.objectives, cfg.modes())}


def study_front(df: pd.DataFrame, cfg: StudyConfig) -> pd.DataFrame:
    """The non-dominated rows (ok trials only) over every scored compression setting of every trial.

    Trials that share a trained model (same training key) score the same compressed models: each such
    point is listed once, under the first trial that reached it.
    """
    if df.empty:
        return df
    front = pareto_front(df, front_objectives(cfg))
    return front.sort_values([FINISHED_AT, TRIAL_ID], kind="stable").drop_duplicates(
        same_model_columns(front)).sort_values(
        list(front_objectives(cfg)), kind="stable")


def metric_name_of(df: pd.DataFrame) -> str:
    """"ppl" or "bleu", as the trials reported it ("metric" before any trial has)."""
    names = df["metric_name"].dropna() if "metric_name" in df.columns else df.iloc[:0]
    return str(names.iloc[0]) if len(names) else "metric"


def format_front(front: pd.DataFrame, metric_name: str) -> str:
    if front.empty:
        return "(no finished trial yet: the front is empty)"
    shown = blank_inapplicable(front[[c for c in SHOWN if c in front.columns]]).rename(
        columns={VAL_METRIC: metric_label(metric_name, compressed=True),
                 TEST_METRIC: metric_label(metric_name, compressed=True, split="test"),
                 GATE_COMPRESSION: "gate ×", MODEL_COMPRESSION: "model ×"})
    return readable_floats(shown).to_string(index=False, na_rep="")


def readable_floats(df: pd.DataFrame, *, significant: int = 3, most: int = 8) -> pd.DataFrame:
    """A copy with every float column as fixed-point text, with the fewest decimals that keep `significant`
    digits of its smallest value and tell its distinct values apart (1567.81 and 1568.24 are not both "1568")."""
    out = df.copy()
    for name in out.columns:
        if not pd.api.types.is_float_dtype(out[name]):
            continue
        values = out[name].to_numpy(dtype="float64", na_value=np.nan)
        finite = np.unique(values[np.isfinite(values)])
        decimals = _decimals(finite, significant, most)
        out[name] = ["" if np.isnan(v) else f"{v:.{decimals}f}" if np.isfinite(v) else str(v) for v in values]
    return out


def _decimals(values: np.ndarray, significant: int, most: int) -> int:
    nonzero = np.abs(values[values != 0])
    if len(nonzero) == 0:
        return 0
    decimals = min(max(significant - 1 - int(np.floor(np.log10(nonzero.min()))), 0), most)
    while decimals < most and len(np.unique(np.round(values, decimals))) < len(values):
        decimals += 1
    return decimals


def front_plot(df: pd.DataFrame, cfg: StudyConfig, path: Path) -> Path | None:
    """The front as a PNG (Agg backend, no display needed); None when there is nothing to draw."""
    ok = df[df[STATUS] == OK] if not df.empty else df
    if ok.empty:
        return None
    direction = "max" if HIGHER_IS_BETTER[cfg.task] else "min"
    fig = plots.plot_front(ok, x=GATE_COMPRESSION, y=VAL_METRIC, metric_direction=direction)
    return Path(plots.save(fig, path))


def close_study(cfg: StudyConfig, root: str, tracking_uri: str, printer: Callable[[str], None]) -> tuple[int, int]:
    """Print the outcome and the front, attach them to the MLflow parent run; returns (trials, failed)."""
    df = results.load(root)
    per_trial = df.drop_duplicates(TRIAL_ID) if not df.empty else df
    counts = per_trial[STATUS].value_counts().to_dict() if not df.empty else {}
    failed = int(sum(counts.get(status, 0) for status in FAILED))
    front = study_front(df, cfg)
    metric = metric_name_of(df)
    figure = front_plot(df, cfg, Path(root) / "pareto_front.png") if not df.empty else None
    tracker = open_tracker(cfg, root)
    tracker.attach()
    all_failed = len(per_trial) > 0 and failed == len(per_trial)
    tracker.end("failed" if all_failed else "finished", front=front, figure_path=figure)
    printer(f"\nstudy {cfg.name}: {len(per_trial)} trial(s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    printer(f"Pareto front ({', '.join(f'{c} {m}' for c, m in front_objectives(cfg).items())}):")
    printer(format_front(front, metric))
    printer(f"\nresults    {Path(root) / 'results'}   (g2-study results {cfg.name} --storage {cfg.storage} --front)")
    printer(f"MLflow     {tracking_uri}   (g2-study ui {cfg.name} --storage {cfg.storage})")
    if figure is not None:
        printer(f"front plot {figure}")
    return len(per_trial), failed
