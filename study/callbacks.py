"""The driver side of a study: a Ray Tune callback that writes every report to Parquet and MLflow.

Trainables only call `tune.report`; this callback turns the same dicts into the results dataset and the MLflow
runs, so their names cannot drift. It is pickled with the experiment (Tune saves its run config for
`Tuner.restore`), so it holds plain settings and reopens its writer and tracker lazily after a restore.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from ray import tune

from study.config import StudyConfig
from study.convergence import ConvergenceLog
from study.failures import error_message, is_error_report
from study.paths import StudyPaths
from study.progress import (
    TRAINS,
    Console,
    StudyProgress,
    TrialProgress,
    describe_trial,
    epoch_progress,
    finished_line,
    study_eta,
    total_epochs,
    training_plan,
    trial_config,
)
from study.report import study_front
from study.results import ResultsWriter
from study.tracking import StudyTracker, open_tracker
from trainables.report import ERROR, FAILED, OK, REUSED_CHECKPOINT, RUNNING, STATUS

log = logging.getLogger(__name__)


def trial_error_text(trial) -> str:
    """Ray writes a trial's traceback to a local file first and syncs it to storage later: read what exists."""
    if trial.error_file and Path(trial.error_file).exists():
        return Path(trial.error_file).read_text()
    return str(trial.get_error() or "the trial failed without an error message")


class StudyCallback(tune.Callback):
    """Records reports and trial ends (results, MLflow, `<study>/progress/`); shows them on the console
    (`study.progress.Console`: trial starts, epochs and ends, or, `quiet`, the ends only)."""

    def __init__(self, cfg: StudyConfig, root: str, *, total: int, printer: Callable[[str], None] = print,
                 quiet: bool = False):
        self.cfg, self.root, self.total, self.printer, self.quiet = cfg, root, total, printer, quiet
        self._writer: ResultsWriter | None = None
        self._tracker: StudyTracker | None = None
        self._console: Console | None = None
        self._front = 0
        self._progress: dict[str, TrialProgress] = {}   # trial id -> what the console and `g2-study status` show
        self._keys: dict[str, str] = {}   # trial id -> training key, of the trials this driver saw start training
        self._started: float | None = None   # this driver's first trial start
        self._ended_earlier = 0   # trials an earlier driver finished: no measure of this driver's pace
        self._carried = 0.0   # the epochs (in trials) earlier drivers trained of the trials this one went on with
        self._statuses: Counter = Counter()
        self._ok_rows: list[dict] = []   # the results rows of the ok trials finished so far
        self._earlier: dict[str, list[dict] | None] = {}   # trial id -> rows recorded by an earlier driver
        self._measured: dict[str, dict] = {}   # trial id -> its last report that was a measurement, not an error
        self.convergence = ConvergenceLog(cfg, root)   # the study's curves and front on the MLflow parent run

    def __getstate__(self):
        return {**self.__dict__, "_writer": None, "_tracker": None, "_earlier": {}, "_measured": {},
                "_console": None, "_progress": {}, "_keys": {}, "_started": None, "_carried": 0.0}

    def __setstate__(self, state):
        self.__dict__.update({"_carried": 0.0, **state})   # a callback saved before a field existed resumes too

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = Console(self.total, quiet=self.quiet, printer=self.printer)
        return self._console

    @property
    def progress_dir(self) -> Path:
        return StudyPaths(Path(self.root)).progress

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
        self._started = self._started or time.time()
        if self._finished_before(trial) is None:
            self.tracker.trial_run_id(trial.trial_id, params={k: v for k, v in trial.config.items()
                                                              if not k.startswith("_")})
            self._start_progress(trial, trials)

    def _start_progress(self, trial, trials) -> None:
        """What the trial does with its training knobs, on the console and in its progress file."""
        cfg = trial_config(trial.config)
        key = cfg.training_key() if cfg is not None else None
        running = {t.trial_id for t in trials if t.status == "RUNNING"}
        training_now = {t: k for t, k in self._keys.items() if t in running and t != trial.trial_id}
        plan, waits_for = training_plan(key, StudyPaths(Path(self.root)).models, training_now)
        if plan == TRAINS and key is not None:
            self._keys[trial.trial_id] = key
        earlier = TrialProgress.read(self.progress_dir / f"{trial.trial_id}.json")   # a driver before a restart
        resumed_at = earlier.epoch if earlier else 0
        progress = TrialProgress(trial.trial_id, describe_trial(trial.config), plan, waits_for,
                                 epoch=resumed_at, resumed_at=resumed_at, epochs=total_epochs(cfg),
                                 started=time.time(), updated=time.time(), host=socket.gethostname(),
                                 driver_pid=os.getpid())
        self._progress[trial.trial_id] = progress
        self._carried += progress.carried()
        self._write_progress(progress)
        self.console.trial_started(trial.trial_id, progress.knobs, plan, waits_for)
        self._show(trials)

    def _write_progress(self, progress: TrialProgress) -> None:
        try:
            progress.write(self.progress_dir)
        except OSError as err:   # a full disk must not end the study; `status` then shows less
            log.warning("could not write the progress of trial %s: %s", progress.trial_id, err)

    def _show(self, trials) -> None:
        """The study-wide bar (on a terminal): counts, front, elapsed and ETA at this driver's pace."""
        elapsed = time.time() - (self._started or time.time())
        done = sum(self._statuses.values())
        eta = study_eta(elapsed, self.total - self._ended_earlier, done - self._ended_earlier,
                        [p.fraction() for p in self._progress.values()], self._carried)
        self.console.update(StudyProgress(total=self.total, done=done,
                                          running=sum(1 for t in trials if t.status == "RUNNING"),
                                          failed=sum(self._statuses[s] for s in FAILED), front=self._front,
                                          elapsed_s=elapsed, eta_s=eta))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._finished_before(trial) is not None:   # what it says again was recorded already
            return
        if is_error_report(result):   # the trial's own exception (study.failures): recorded at its end
            return
        self._measured[trial.trial_id] = result
        self.writer.record_report(trial.trial_id, trial.config, result)
        self.tracker.log_epoch(trial.trial_id, result, step=int(result.get("epoch") or result["training_iteration"]))
        if (progress := self._progress.get(trial.trial_id)) is not None:
            self._write_progress(epoch_progress(progress, result, time.time()))
            if result.get(STATUS) == RUNNING or (result.get(STATUS) == OK and not result.get(REUSED_CHECKPOINT)):
                self.console.epoch(progress)   # the last epoch too, then its end line; a re-scored model trained none
            self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (rows := self._finished_before(trial)) is not None:
            self._close_earlier(trial, rows, trials)
            return
        if is_error_report(trial.last_result):
            self._record_error(trial, trial.last_result["error"], trials)
            return
        rows = self.writer.record_end(trial.trial_id, trial.config)
        status = rows[0][STATUS]
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
        self.console.notice(f"[  -/{self.total}] {trial.trial_id} lost its worker ({error_message(trial_error_text(trial))});"
                     f" retrying from its last checkpoint (failure {failures} of {self.cfg.max_failures} allowed)")

    def _record_error(self, trial, message: str, trials) -> None:
        """A trial that raised (its own code) or whose retries ran out: one error row, its run FAILED."""
        rows = self.writer.record_end(trial.trial_id, trial.config, error=message)
        last = trial.last_result if not is_error_report(trial.last_result) else self._measured.get(trial.trial_id)
        self.tracker.end_trial(trial.trial_id, ERROR, last or None, message)
        self._finished(trial, ERROR, rows, trials)

    def _close_earlier(self, trial, rows: list[dict], trials) -> None:
        """A trial an earlier driver recorded: its files stay; its MLflow run is closed if that driver died first."""
        status = rows[0][STATUS]
        if not self.tracker.is_trial_closed(trial.trial_id):
            self.tracker.end_trial(trial.trial_id, status, trial.last_result, rows[0].get("error"),
                                   metrics_logged=True)
        self._finished(trial, status, rows, trials, earlier=True)

    def _chart(self) -> None:
        """The parent run's convergence metrics and front; charting must never stop the study."""
        try:
            self.convergence.update(self.tracker)
        except Exception as err:   # MLflow down, a plot failing: the trial's own records are written already
            log.warning("could not chart the study's progress on MLflow: %s", err)

    def on_experiment_end(self, trials, **info):
        self.console.close()
        self.tracker.mark_stale_runs()

    def _finished(self, trial, status: str, rows: list[dict], trials, *, earlier: bool = False) -> None:
        self._statuses[status] += 1
        if not earlier:
            self._chart()
        self._ended_earlier += earlier
        if status == OK:
            self._ok_rows.extend(rows)
            self._front = len(study_front(pd.DataFrame(self._ok_rows), self.cfg))   # what `close_study` prints
        if (progress := self._progress.pop(trial.trial_id, None)) is not None:
            progress.state, progress.updated = status, time.time()
            self._write_progress(progress)
        self.console.trial_finished(finished_line(
            trial, status, rows[0].get("error"), earlier=earlier, done=sum(self._statuses.values()),
            total=self.total, statuses=self._statuses, running=sum(1 for t in trials if t.status == "RUNNING"),
            front=self._front))
        self._show(trials)
