"""The study converging, charted on its MLflow parent run as trials finish, and its front kept current there.

After each finished trial the parent run gets, at step = the number of finished trials:

    study/trials_done, study/trials_failed   how many trials ended, how many of them diverged or raised
    study/front_size                          points on the Pareto front of the study's objectives
    study/hypervolume                         the front's hypervolume against a fixed reference (below)
    best_val_metric/<b>bit                    the best compressed validation metric at each bit budget of the sweep

and (at most every `artifact_interval_s`) the front's `pareto_front.csv` / `pareto_front.png` artifacts, which
`close_study` replaces once more at the end. Everything is computed from the results dataset on disk, so a resumed
or extended study continues the same curves.

Hypervolume reference. A hypervolume curve only shows convergence if its reference point never moves, and one
taken from the worst row would move with every bad trial. Per objective column of the front:

    val_metric, uncompressed_val_metric   perplexity (minimised): 2 × the uncompressed validation perplexity of
                                          the first trial that finished ok (with its own evaluation gates);
                                          BLEU (maximised): 0
    gate_bits / model_bits                the uncompressed size, 32 bits × gate_params / model_params
    gate_compression / model_compression  1 (nothing compressed)

It is fixed when the first trial finishes ok and stored on the parent run as the tag `g2.hypervolume_reference`
(JSON), which later drivers of the study read back. Points no better than the reference in every objective add
nothing (the uncompressed model among them: only compression earns volume).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.pareto import hypervolume
from study import results
from study.config import StudyConfig
from study.front import front_objectives, front_plot, study_front
from study.tags import REFERENCE_TAG
from study.tracking import StudyTracker
from trainables.config import FULL_PRECISION_BITS
from trainables.report import (
    FAILED,
    FINISHED_AT,
    GATE_BITS,
    GATE_COMPRESSION,
    GATE_PARAMS,
    HIGHER_IS_BETTER,
    IS_TRIAL_SETTING,
    MODEL_BITS,
    MODEL_COMPRESSION,
    MODEL_PARAMS,
    OK,
    STATUS,
    TRIAL_ID,
    UNCOMPRESSED_VAL_METRIC,
    VAL_METRIC,
)

log = logging.getLogger(__name__)

TRIALS_DONE, TRIALS_FAILED = "study/trials_done", "study/trials_failed"
FRONT_SIZE, HYPERVOLUME = "study/front_size", "study/hypervolume"
BEST_AT_BITS = f"best_{VAL_METRIC}/{{bits}}bit"
# Results columns trainables/report.py names no constant for (study.results.rows writes them).
BITS, PAPER = "compress.bits", "compress.paper"


def hypervolume_reference(ok: pd.DataFrame, cfg: StudyConfig) -> dict[str, float] | None:
    """The fixed reference point (module docstring) from the rows of ok trials; None before the first one."""
    if ok.empty:
        return None
    first = ok[ok[TRIAL_ID] == ok.sort_values(FINISHED_AT, kind="stable")[TRIAL_ID].iloc[0]]
    first = first[first[IS_TRIAL_SETTING].astype(bool)].iloc[0] if IS_TRIAL_SETTING in first.columns else first.iloc[0]
    reference = {}
    for column, mode in front_objectives(cfg).items():
        if column in (VAL_METRIC, UNCOMPRESSED_VAL_METRIC):
            reference[column] = 0.0 if mode == "max" else 2.0 * float(first[UNCOMPRESSED_VAL_METRIC])
        elif column in (GATE_BITS, MODEL_BITS):
            reference[column] = float(FULL_PRECISION_BITS * first[GATE_PARAMS if column == GATE_BITS else MODEL_PARAMS])
        elif column in (GATE_COMPRESSION, MODEL_COMPRESSION):
            reference[column] = 1.0
    return reference if all(math.isfinite(v) for v in reference.values()) else None


def front_hypervolume(front: pd.DataFrame, cfg: StudyConfig, reference: dict[str, float]) -> float | None:
    """The hypervolume of `front` against `reference`; None where it is not defined (1 or > 3 objectives)."""
    objectives = front_objectives(cfg)
    if not 2 <= len(objectives) <= 3:
        return None
    if front.empty:
        return 0.0
    values = front[list(objectives)].to_numpy(dtype=float)
    return hypervolume(values, np.array([reference[c] for c in objectives]),
                       [mode == "min" for mode in objectives.values()])


def best_at_bits(ok: pd.DataFrame, cfg: StudyConfig) -> dict[int, float]:
    """{bits: the best compressed validation metric of any row quantised to that many bits} (paper modes apart)."""
    rows = ok[(ok[PAPER] == "none") & ok[VAL_METRIC].notna()] if PAPER in ok.columns else ok.iloc[:0]
    best = rows.groupby(BITS)[VAL_METRIC]
    best = best.max() if HIGHER_IS_BETTER[cfg.task] else best.min()
    return {int(bits): float(value) for bits, value in best.items()}


def convergence_metrics(df: pd.DataFrame, cfg: StudyConfig,
                        reference: dict[str, float] | None) -> tuple[int, dict[str, float]]:
    """(step, metrics) of the results so far: step is the number of finished trials."""
    per_trial = df.drop_duplicates(TRIAL_ID)
    ok = df[df[STATUS] == OK]
    front = study_front(ok, cfg)
    metrics = {TRIALS_DONE: len(per_trial), TRIALS_FAILED: int(per_trial[STATUS].isin(FAILED).sum()),
               FRONT_SIZE: len(front)}
    volume = front_hypervolume(front, cfg, reference) if reference is not None else None
    if volume is not None:
        metrics[HYPERVOLUME] = volume
    metrics |= {BEST_AT_BITS.format(bits=bits): value for bits, value in best_at_bits(ok, cfg).items()}
    return len(per_trial), metrics


class ConvergenceLog:
    """Charts the study on its parent run after each finished trial (the driver's callback calls `update`).

    Plain settings only: it is pickled with the callback when Tune saves the experiment.
    """

    def __init__(self, cfg: StudyConfig, root: str, *, artifact_interval_s: float = 30.0):
        self.cfg, self.root, self.artifact_interval_s = cfg, root, artifact_interval_s
        self._reference: dict[str, float] | None = None
        self._artifacts_at = -math.inf

    def reference(self, tracker: StudyTracker, ok: pd.DataFrame) -> dict[str, float] | None:
        """The study's reference point: the parent run's tag, or fixed now from the first ok trial."""
        if self._reference is None:
            stored = tracker.parent_tags().get(REFERENCE_TAG)
            if stored:
                self._reference = json.loads(stored)
            elif (fixed := hypervolume_reference(ok, self.cfg)) is not None:
                tracker.set_parent_tags({REFERENCE_TAG: json.dumps(fixed)})
                self._reference = fixed
        return self._reference

    def update(self, tracker: StudyTracker, *, force_artifacts: bool = False) -> dict[str, float]:
        """Log the metrics of the results so far; replace the front artifacts if due. Returns the metrics."""
        df = results.load(self.root)
        if df.empty:
            return {}
        step, metrics = convergence_metrics(df, self.cfg, self.reference(tracker, df[df[STATUS] == OK]))
        tracker.log_progress(step, metrics)
        now = time.monotonic()
        if force_artifacts or now - self._artifacts_at >= self.artifact_interval_s:
            self._artifacts_at = now
            tracker.log_front(study_front(df, self.cfg), front_plot(df, self.cfg, Path(self.root) / "pareto_front.png"))
        return metrics
