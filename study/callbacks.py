"""The driver side of a study: a Ray Tune callback that writes every report to Parquet and MLflow.

Trainables only call `tune.report`; this callback turns the same dicts into the results dataset and the MLflow
runs, so their names cannot drift. It is pickled with the experiment (Tune saves its run config for
`Tuner.restore`), so it holds plain settings and reopens its writer and tracker lazily after a restore.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from study.config import StudyConfig
from study.failures import error_message, is_error_report
from study.report import study_front
from study.results import ResultsWriter
from study.tracking import StudyTracker, open_tracker
from trainables.report import ERROR, OK

log = logging.getLogger(__name__)


def trial_error_text(trial) -> str:
    """Ray writes a trial's traceback to a local file first and syncs it to storage later: read what exists."""
    if trial.error_file and Path(trial.error_file).exists():
        return Path(trial.error_file).read_text()
    return str(trial.get_error() or "the trial failed without an error message")


def describe_trial(config: dict[str, Any]) -> str:
    mode = config.get("g2.gate_mode", "?")
    knobs = f" τ={config['g2.tau']:.2f} p={config['g2.p']:.2f}" if mode == "g2" else ""
    return f"{mode}{knobs} rank {config.get('compress.rank')} bits {config.get('compress.bits')}"


class StudyCallback(tune.Callback):
    """Records reports and trial ends; prints one progress line per finished trial."""

    def __init__(self, cfg: StudyConfig, root: str, *, total: int, printer: Callable[[str], None] = print):
        self.cfg, self.root, self.total, self.printer = cfg, root, total, printer
        self._writer: ResultsWriter | None = None
        self._tracker: StudyTracker | None = None
        self._statuses: Counter = Counter()
        self._ok_rows: list[dict] = []   # the results rows of the ok trials finished so far
        self._earlier: dict[str, list[dict] | None] = {}   # trial id -> rows recorded by an earlier driver
        self._measured: dict[str, dict] = {}   # trial id -> its last report that was a measurement, not an error

    def __getstate__(self):
        return {**self.__dict__, "_writer": None, "_tracker": None, "_earlier": {}, "_measured": {}}

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            self._writer = ResultsWriter(self.root, self.cfg.name)
        return self._writer

    @property
    def tracker(self) -> StudyTracker:
        if self._tracker is None:
            self._tracker = open_tracker(self.cfg, self.root)
            self._tracker.attach()   # the driver started the parent run before Tune started
        return self._tracker

    def _finished_before(self, trial) -> list[dict] | None:
        """The rows of a trial whose end an earlier driver of this study recorded (None for every other).

        Decided once per trial and driver, before this driver records anything of it.
        """
        if trial.trial_id not in self._earlier:
            self._earlier[trial.trial_id] = self.writer.recorded_rows(trial.trial_id)
        return self._earlier[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        if self._finished_before(trial) is None:
            self.tracker.trial_run_id(trial.trial_id, params={k: v for k, v in trial.config.items()
                                                              if not k.startswith("_")})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._finished_before(trial) is not None:   # what it says again was recorded already
            return
        if is_error_report(result):   # the trial's own exception (study.failures): recorded at its end
            return
        self._measured[trial.trial_id] = result
        self.writer.record_report(trial.trial_id, trial.config, result)
        self.tracker.log_epoch(trial.trial_id, result, step=int(result.get("epoch") or result["training_iteration"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (rows := self._finished_before(trial)) is not None:
            self._close_earlier(trial, rows, trials)
            return
        if is_error_report(trial.last_result):
            self._record_error(trial, trial.last_result["error"], trials)
            return
        rows = self.writer.record_end(trial.trial_id, trial.config)
        status = rows[0]["status"]
        self.tracker.end_trial(trial.trial_id, status, trial.last_result, rows[0].get("error"))
        self._finished(trial, status, rows, trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        message = error_message(trial_error_text(trial))
        if (rows := self._finished_before(trial)) is not None:   # its recorded results stand
            log.warning("trial %s, run again after a restart, failed (%s); its recorded end stands", trial.trial_id,
                        message)
            self._close_earlier(trial, rows, trials)
            return
        self._record_error(trial, message, trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Its worker process or node was lost (the trial's own exceptions are reports, `study.failures`)."""
        failures = trial.run_metadata.num_failures
        self.printer(f"[  -/{self.total}] {trial.trial_id} lost its worker ({error_message(trial_error_text(trial))});"
                     f" retrying from its last checkpoint (failure {failures} of {self.cfg.max_failures} allowed)")

    def _record_error(self, trial, message: str, trials) -> None:
        """A trial that raised (its own code) or whose retries ran out: one error row, its run FAILED."""
        rows = self.writer.record_end(trial.trial_id, trial.config, error=message)
        last = trial.last_result if not is_error_report(trial.last_result) else self._measured.get(trial.trial_id)
        self.tracker.end_trial(trial.trial_id, ERROR, last or None, message)
        self._finished(trial, ERROR, rows, trials)

    def _close_earlier(self, trial, rows: list[dict], trials) -> None:
        """A trial an earlier driver recorded: its files stay; its MLflow run is closed if that driver died first."""
        status = rows[0]["status"]
        if not self.tracker.is_trial_closed(trial.trial_id):
            self.tracker.end_trial(trial.trial_id, status, trial.last_result, rows[0].get("error"),
                                   metrics_logged=True)
        self._finished(trial, status, rows, trials, earlier=True)

    def on_experiment_end(self, trials, **info):
        self.tracker.mark_stale_runs()

    def _finished(self, trial, status: str, rows: list[dict], trials, *, earlier: bool = False) -> None:
        self._statuses[status] += 1
        if status == OK:
            self._ok_rows.extend(rows)
        front = len(study_front(pd.DataFrame(self._ok_rows), self.cfg))   # the front `close_study` will print
        running = sum(1 for t in trials if t.status == "RUNNING")
        done = sum(self._statuses.values())
        last = trial.last_result or {}
        name = last.get("metric_name", "metric")
        if earlier:
            outcome = "recorded before the restart"
        elif status == OK:
            outcome = (f"val {name} {last['val_metric']:.2f}, compressed {last['compressed_val_metric']:.2f} "
                       f"at gate ×{last['gate_compression']:.1f}"
                       + (" (reused model)" if last.get("reused_checkpoint") else ""))
        else:
            outcome = rows[0].get("error") or status
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self._statuses.items()))
        self.printer(f"[{done:>3}/{self.total}] {trial.trial_id} {status:<8} {describe_trial(trial.config)} -> "
                     f"{outcome} | {counts}, running {running} | front: {front} point(s)")
