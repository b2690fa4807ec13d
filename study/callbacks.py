"""The driver side of a study: a Ray Tune callback that records every report and every trial's end.

Trainables only call `tune.report`; this callback turns each result into an `EpochReport` and each end into a
`TrialEnd` once (`study.trial_end.TrialLedger`), and hands those records to the searcher (Optuna), the results
dataset (Parquet), the MLflow runs and the console and progress files, so their names cannot drift.

It is pickled with the experiment (Tune saves its run config for `Tuner.restore`, before any trial runs), so it
pickles its settings only and opens its writer, tracker, console and ledger again after a restore.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ray import tune

from study.board import ProgressBoard
from study.config import StudyConfig
from study.convergence import ConvergenceLog
from study.entrypoints import error_message
from study.results import ResultsWriter
from study.search import StudySearch
from study.tracking import StudyTracker, open_tracker, ui_server
from study.trial_end import TrialEnd, TrialLedger
from trainables.report import ERROR

log = logging.getLogger(__name__)
SETTINGS = ("cfg", "root", "total", "printer", "quiet")   # what is pickled; everything else is this driver's


def trial_error_text(trial) -> str:
    """Ray writes a trial's traceback to a local file first and syncs it to storage later: read what exists."""
    if trial.error_file and Path(trial.error_file).exists():
        return Path(trial.error_file).read_text()
    return str(trial.get_error() or "the trial failed without an error message")


class StudyCallback(tune.Callback):
    """Records reports and trial ends (results, MLflow, Optuna through `searcher`, `<study>/progress/`); shows them
    on the console (`study.console.Console`: trial starts, epochs and ends, or, `quiet`, the ends only)."""

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
        if self._recorded_before(trial) is None:
            number = self.searcher.asked.get(trial.trial_id) if self.searcher is not None else None
            self.tracker.trial_run_id(trial.trial_id, params={k: v for k, v in trial.config.items()
                                                              if not k.startswith("_")}, optuna_number=number)
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
        self.board.close()
        self.tracker.mark_stale_runs()

    # ----------------------------------------------------------------------- a trial's end, to every record

    def _ended(self, trial, trials, end: TrialEnd) -> None:
        """Optuna first (a recorded end is what Optuna was told), then the results file, MLflow and the console.

        An end an earlier driver recorded keeps its files; its MLflow run is closed if that driver died first.
        """
        if self.searcher is not None:
            run_id = self.tracker.find_trial_run_id(end.trial_id)
            link = self.tracker.run_url(ui_server(self.tracker.tracking_uri), run_id) if run_id else None
            self.searcher.tell(end, mlflow_run_id=run_id, mlflow_link=link)
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
