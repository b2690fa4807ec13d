"""The driver side of a study: a Ray Tune callback that records every report and every trial's end.

Trainables only call `tune.report`; this callback turns each result into an `EpochReport` and each end into a
`TrialEnd` once (`study.trial_end.TrialLedger`), and hands those records to the searcher (Optuna), the results
dataset (Parquet), the MLflow runs and the console and progress files, so their names cannot drift.

It is pickled with the experiment (Tune saves its run config for `Tuner.restore`, before any trial runs), so it
pickles its settings only and opens its writer, tracker, console and ledger again after a restore.
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
from study.entrypoints import error_message
from study.front import study_front
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
from study.results import ResultsWriter
from study.search import StudySearch
from study.tracking import StudyTracker, open_tracker
from study.trial_end import TrialEnd, TrialLedger
from trainables.report import ERROR, FAILED, OK, RUNNING, EpochReport

log = logging.getLogger(__name__)
SETTINGS = ("cfg", "root", "total", "printer", "quiet")   # what is pickled; everything else is this driver's


def trial_error_text(trial) -> str:
    """Ray writes a trial's traceback to a local file first and syncs it to storage later: read what exists."""
    if trial.error_file and Path(trial.error_file).exists():
        return Path(trial.error_file).read_text()
    return str(trial.get_error() or "the trial failed without an error message")


class StudyCallback(tune.Callback):
    """Records reports and trial ends (results, MLflow, Optuna through `searcher`, `<study>/progress/`); shows them
    on the console (`study.progress.Console`: trial starts, epochs and ends, or, `quiet`, the ends only)."""

    def __init__(self, cfg: StudyConfig, root: str, *, total: int, printer: Callable[[str], None] = print,
                 quiet: bool = False, searcher: StudySearch | None = None):
        self.cfg, self.root, self.total, self.printer, self.quiet = cfg, root, total, printer, quiet
        self._open(searcher)

    def _open(self, searcher: StudySearch | None) -> None:
        self.searcher = searcher   # told each end; linked again after a restore (`attach`)
        self.ledger = TrialLedger(self.cfg.name)
        self._board: ProgressBoard | None = None
        self.convergence = ConvergenceLog(self.cfg, self.root)   # the study's curves and front on the MLflow parent
        self._writer: ResultsWriter | None = None
        self._tracker: StudyTracker | None = None
        self._earlier: dict[str, list[dict] | None] = {}   # trial id -> rows recorded by an earlier driver

    def __getstate__(self):
        return {name: getattr(self, name) for name in SETTINGS}

    def __setstate__(self, state):
        """Settings only; a callback pickled by an older version (with its driver's state too) resumes as well."""
        for name in SETTINGS:
            setattr(self, name, state[name])
        self._open(None)

    def attach(self, searcher: StudySearch | None, printer: Callable[[str], None], quiet: bool) -> None:
        """A restored experiment brings this callback back unpickled: this driver's searcher and console."""
        self.printer, self.quiet = printer, quiet
        self._open(searcher)

    @property
    def board(self) -> ProgressBoard:
        """The console and progress files, made on first use: with the printer set by then."""
        if self._board is None:
            self._board = ProgressBoard(self.cfg, self.root, self.total, self.printer, self.quiet)
        return self._board

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

    def _recorded_before(self, trial) -> TrialEnd | None:
        """The end of a trial that an earlier driver of this study recorded (None for every other).

        Decided once per trial and driver, before this driver records anything of it.
        """
        if trial.trial_id not in self._earlier:
            self._earlier[trial.trial_id] = self.writer.recorded_rows(trial.trial_id)
        rows = self._earlier[trial.trial_id]
        return None if rows is None else self.ledger.recorded(trial.trial_id, rows)

    # ----------------------------------------------------------------------- Tune's hooks

    def on_step_end(self, iteration, trials, **info):
        """What the search did without a Ray trial (a suggestion answered from the results), as it happens."""
        if self.searcher is not None:
            for line in self.searcher.take_unshown():
                self.board.console.search(line)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.board.first_start = self.board.first_start or time.time()
        if self._recorded_before(trial) is None:
            self.tracker.trial_run_id(trial.trial_id, params={k: v for k, v in trial.config.items()
                                                              if not k.startswith("_")})
            self.board.started(trial, trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._recorded_before(trial) is not None:   # what it says again was recorded already
            return
        report = self.ledger.report(trial.trial_id, trial.config, result)
        if report.status == ERROR:   # the trial's own exception (study.entrypoints): recorded at its end
            return
        self.writer.record_report(trial.trial_id, trial.config, report)
        self.tracker.log_epoch(trial.trial_id, report)
        self.board.reported(trial, report, trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, trials, self._recorded_before(trial) or self.ledger.end(trial.trial_id, trial.config))

    def on_trial_error(self, iteration, trials, trial, **info):
        message = error_message(trial_error_text(trial))
        if (earlier := self._recorded_before(trial)) is not None:   # its recorded results stand
            log.warning("trial %s, run again after a restart, failed (%s); its recorded end stands", trial.trial_id,
                        message)
        self._ended(trial, trials, earlier or self.ledger.end(trial.trial_id, trial.config, error=message))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Its worker process or node was lost (the trial's own exceptions are reports, `study.entrypoints`)."""
        failures = trial.run_metadata.num_failures
        self.board.console.notice(f"[  -/{self.total}] {trial.trial_id} lost its worker "
                                  f"({error_message(trial_error_text(trial))}); retrying from its last checkpoint "
                                  f"(failure {failures} of {self.cfg.max_failures} allowed)")

    def on_experiment_end(self, trials, **info):
        self.board.console.close()
        self.tracker.mark_stale_runs()

    # ----------------------------------------------------------------------- a trial's end, to every record

    def _ended(self, trial, trials, end: TrialEnd) -> None:
        """Optuna first (a recorded end is what Optuna was told), then the results file, MLflow and the console.

        An end an earlier driver recorded keeps its files; its MLflow run is closed if that driver died first.
        """
        if self.searcher is not None:
            self.searcher.tell(end, mlflow_run_id=self.tracker.find_trial_run_id(end.trial_id))
        if not end.recorded_before:
            self.writer.record_end(end.trial_id, trial.config, end.rows)
        if not end.recorded_before or not self.tracker.is_trial_closed(end.trial_id):
            self.tracker.end_trial(end)
        if not end.recorded_before:
            self._chart()
        self.board.ended(trial, end, trials)

    def _chart(self) -> None:
        """The parent run's convergence metrics and front; charting must never stop the study."""
        try:
            self.convergence.update(self.tracker)
        except Exception as err:   # MLflow down, a plot failing: the trial's own records are written already
            log.warning("could not chart the study's progress on MLflow: %s", err)


class ProgressBoard:
    """What the study shows while it runs: the console's lines and bar, and one progress file per trial."""

    def __init__(self, cfg: StudyConfig, root: str, total: int, printer: Callable[[str], None], quiet: bool):
        self.root, self.total, self.cfg = root, total, cfg
        self.console = Console(total, quiet=quiet, printer=printer)
        self.progress: dict[str, TrialProgress] = {}   # trial id -> what the console and `g2-study status` show
        self.training: dict[str, str] = {}   # trial id -> training key, of the trials this driver saw start training
        self.first_start: float | None = None   # this driver's first trial start
        self.ended_earlier = 0   # trials an earlier driver finished: no measure of this driver's pace
        self.carried = 0.0   # the epochs (in trials) earlier drivers trained of the trials this one went on with
        self.statuses: Counter = Counter()
        self.ok_rows: list[dict] = []   # the results rows of the ok trials finished so far
        self.front = 0

    @property
    def progress_dir(self) -> Path:
        return StudyPaths(Path(self.root)).progress

    def started(self, trial, trials) -> None:
        """What the trial does with its training knobs, on the console and in its progress file."""
        cfg = trial_config(trial.config)
        key = cfg.training_key() if cfg is not None else None
        running = {t.trial_id for t in trials if t.status == "RUNNING"}
        training_now = {t: k for t, k in self.training.items() if t in running and t != trial.trial_id}
        plan, waits_for = training_plan(key, StudyPaths(Path(self.root)).models, training_now)
        if plan == TRAINS and key is not None:
            self.training[trial.trial_id] = key
        earlier = TrialProgress.read(self.progress_dir / f"{trial.trial_id}.json")   # a driver before a restart
        resumed_at = earlier.epoch if earlier else 0
        progress = TrialProgress(trial.trial_id, describe_trial(trial.config), plan, waits_for,
                                 epoch=resumed_at, resumed_at=resumed_at, epochs=total_epochs(cfg),
                                 started=time.time(), updated=time.time(), host=socket.gethostname(),
                                 driver_pid=os.getpid())
        self.progress[trial.trial_id] = progress
        self.carried += progress.carried()
        self._write(progress)
        self.console.trial_started(trial.trial_id, progress.knobs, plan, waits_for)
        self._show(trials)

    def reported(self, trial, report: EpochReport, trials) -> None:
        if (progress := self.progress.get(trial.trial_id)) is None:
            return
        self._write(epoch_progress(progress, report, time.time()))
        if report.status == RUNNING or (report.status == OK and not report.reused_checkpoint):
            self.console.epoch(progress)   # the last epoch too, then its end line; a re-scored model trained none
        self._show(trials)

    def ended(self, trial, end: TrialEnd, trials) -> None:
        self.statuses[end.status] += 1
        self.ended_earlier += end.recorded_before
        if end.status == OK:
            self.ok_rows.extend(end.rows)
            self.front = len(study_front(pd.DataFrame(self.ok_rows), self.cfg))   # what `close_study` prints
        if (progress := self.progress.pop(trial.trial_id, None)) is not None:
            progress.state, progress.updated = end.status, time.time()
            self._write(progress)
        self.console.trial_finished(finished_line(
            end, trial.config, done=sum(self.statuses.values()), total=self.total, statuses=self.statuses,
            running=sum(1 for t in trials if t.status == "RUNNING"), front=self.front))
        self._show(trials)

    def _write(self, progress: TrialProgress) -> None:
        try:
            progress.write(self.progress_dir)
        except OSError as err:   # a full disk must not end the study; `status` then shows less
            log.warning("could not write the progress of trial %s: %s", progress.trial_id, err)

    def _show(self, trials) -> None:
        """The study-wide bar (on a terminal): counts, front, elapsed and ETA at this driver's pace."""
        elapsed = time.time() - (self.first_start or time.time())
        done = sum(self.statuses.values())
        eta = study_eta(elapsed, self.total - self.ended_earlier, done - self.ended_earlier,
                        [p.fraction() for p in self.progress.values()], self.carried)
        self.console.update(StudyProgress(total=self.total, done=done,
                                          running=sum(1 for t in trials if t.status == "RUNNING"),
                                          failed=sum(self.statuses[s] for s in FAILED), front=self.front,
                                          elapsed_s=elapsed, eta_s=eta))
