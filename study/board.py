"""What the study shows while it runs: the console's lines and ticking bar, one progress file per trial, and the
estimate `g2-study status` repeats.

The driver's callback (`study.callbacks`) tells the board each trial's start, reports and end; a ticker thread
(`study.console`) asks it for a `Snapshot` twice a second, which reads the running trials' live files
(`study.live`) and measures the study's `Pace` from them. Everything here is this driver's: nothing is pickled.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from study.config import StudyConfig
from study.console import Console, RunningLine, Snapshot
from study.eta import PaceMeter, RunningTrial, TrialShape, passing_epoch_s, running_left, study_eta, trial_shape
from study.front import study_front
from study.live import LiveProgress, read_live
from study.paths import StudyPaths, write_json
from study.progress import (
    TRAINS,
    StudyProgress,
    TrialProgress,
    describe_trial,
    epoch_progress,
    finished_line,
    total_epochs,
    training_plan,
    trial_config,
)
from study.trial_end import TrialEnd
from study.vocabulary import ended_word
from trainables.report import FAILED, OK, RUNNING, EpochReport

log = logging.getLogger(__name__)
ESTIMATE_EVERY_S = 5.0   # how often the estimate file `g2-study status` reads is rewritten


class ProgressBoard:
    def __init__(self, cfg: StudyConfig, root: str, total: int, printer: Callable[[str], None], quiet: bool):
        self.cfg, self.paths, self.total = cfg, StudyPaths(Path(root)), total
        self.console = Console(total, quiet=quiet, printer=printer)
        self._lock = threading.Lock()   # Tune's callbacks and the console's ticker
        self.progress: dict[str, TrialProgress] = {}   # running trials this driver started, by trial id
        self.shapes: dict[str, TrialShape] = {}
        self.training: dict[str, str] = {}   # trial id -> training key, of the trials this driver saw start training
        self.first_start: float | None = None
        self.statuses: Counter = Counter()   # ended trials by `study.vocabulary` word
        self.ok_rows: list[dict] = []
        self.front = 0
        self.meter = PaceMeter()
        self._most_running = 0
        self._estimate_at = -float("inf")
        try:
            self.pending_shape = trial_shape(cfg.base_trial())
        except (TypeError, ValueError):
            self.pending_shape = TrialShape(1, 1)

    # ----------------------------------------------------------------------- the callback's events

    def started(self, trial, trials) -> None:
        """What the trial does with its training knobs, on the console and in its progress file."""
        now = time.time()
        cfg = trial_config(trial.config)
        key = cfg.training_key() if cfg is not None else None
        running = {t.trial_id for t in trials if t.status == "RUNNING"}
        with self._lock:
            self.first_start = self.first_start or now
            training_now = {t: k for t, k in self.training.items() if t in running and t != trial.trial_id}
            plan, waits_for = training_plan(key, self.paths.models, training_now)
            if plan == TRAINS and key is not None:
                self.training[trial.trial_id] = key
            earlier = TrialProgress.read(self.paths.progress / f"{trial.trial_id}.json")   # a driver before a restart
            resumed_at = earlier.epoch if earlier else 0
            progress = TrialProgress(trial.trial_id, describe_trial(trial.config), plan, waits_for,
                                     epoch=resumed_at, resumed_at=resumed_at, epochs=total_epochs(cfg),
                                     started=now, updated=now, host=socket.gethostname(), driver_pid=os.getpid())
            self.progress[trial.trial_id] = progress
            self.meter.started(trial.trial_id, now)
            self.shapes[trial.trial_id] = trial_shape(cfg) if cfg is not None else self.pending_shape
            self._most_running = max(self._most_running, len(self.progress))
        self._write(progress)
        self.console.trial_started(trial.trial_id, progress.knobs, plan, waits_for)
        self.console.start_ticking(self.snapshot)
        self._show()

    def reported(self, trial, report: EpochReport, trials) -> None:
        with self._lock:
            if (progress := self.progress.get(trial.trial_id)) is None:
                return
            trained_epoch = report.status == RUNNING or (report.status == OK and not report.reused_checkpoint)
            epoch_progress(progress, report, time.time())
            if trained_epoch and report.epoch_time_s and report.epoch:
                self.meter.epoch(trial.trial_id, report.epoch, report.epoch_time_s, self._live(trial.trial_id),
                                 time.time(), progress.tokens_per_s)
        self._write(progress)
        if trained_epoch:
            self.console.epoch(progress)   # the last epoch too, then its end line; a re-scored model trained none
        self._show()

    def ended(self, trial, end: TrialEnd, trials) -> None:
        word = ended_word(end.status, end.reused)
        with self._lock:
            self.statuses[word] += 1
            if end.status == OK:
                self.ok_rows.extend(end.rows)
                self.front = len(study_front(pd.DataFrame(self.ok_rows), self.cfg))   # what `close_study` prints
            progress = self.progress.pop(trial.trial_id, None)
            if progress is not None and not end.recorded_before:
                self.meter.ended(trial.trial_id, ok=end.status == OK, reused=end.reused,
                                 rows=self.shapes[trial.trial_id].settings, live=self._live(trial.trial_id),
                                 now=time.time(), whole=progress.resumed_at == 0)
        if progress is not None:
            progress.state, progress.updated = end.status, time.time()
            self._write(progress)
        self.paths.live.joinpath(f"{trial.trial_id}.json").unlink(missing_ok=True)
        done = sum(self.statuses.values())
        self.console.trial_finished(finished_line(
            end, trial.config, done=done, total=self.total, statuses=self.statuses,
            running=len(self.progress), front=self.front))
        self._show()

    def close(self) -> None:
        """The run is over (a search that had nothing left to ask ends before `total`): no trial is pending."""
        with self._lock:
            self.total = sum(self.statuses.values()) + len(self.progress)
        self.console.update(self.snapshot(event=True))
        self.console.close()

    # ----------------------------------------------------------------------- measuring the pace

    def _live(self, trial_id: str) -> LiveProgress | None:
        return read_live(self.paths.live, [trial_id]).get(trial_id)

    # ----------------------------------------------------------------------- what the console shows

    def snapshot(self, *, event: bool = False) -> Snapshot:
        """The study now: counts, front, elapsed, the ETA and each running trial's live progress. Its estimate
        goes to `status` at every `event` (a start, report or end), else every ESTIMATE_EVERY_S."""
        now = time.time()
        with self._lock:
            running = list(self.progress.values())
            live = read_live(self.paths.live, [p.trial_id for p in running])
            for trial_id, found in live.items():
                self.meter.saw(trial_id, found)
            trials = [RunningTrial(p, live.get(p.trial_id), self.shapes[p.trial_id]) for p in running]
            done = sum(self.statuses.values())
            pending = max(self.total - done - len(running), 0)
            slots = min(self.cfg.max_concurrent, self._most_running) if self._most_running else self.cfg.max_concurrent
            pace, rate = self.meter.pace, self.meter.train_rate
            left = running_left(trials, pace, now, rate)
            eta = study_eta(left, pending, self.pending_shape, pace, slots, rate, passing_epoch_s(trials, pace),
                            [t.progress.plan for t in trials])
            lines = tuple(RunningLine(t.progress, t.live, left[t.progress.trial_id]) for t in trials)
            study = StudyProgress(total=self.total, done=done, running=len(running),
                                  failed=sum(self.statuses[s] for s in FAILED), front=self.front,
                                  elapsed_s=now - (self.first_start or now), eta_s=eta,
                                  counts=tuple(self.statuses.items()))
        snapshot = Snapshot(study, lines)
        self._write_estimate(snapshot, force=event)
        return snapshot

    def _show(self) -> None:
        self.console.update(self.snapshot(event=True))

    # ----------------------------------------------------------------------- files

    def _write(self, progress: TrialProgress) -> None:
        try:
            progress.write(self.paths.progress)
        except OSError as err:   # a full disk must not end the study; `status` then shows less
            log.warning("could not write the progress of trial %s: %s", progress.trial_id, err)

    def _write_estimate(self, snapshot: Snapshot, force: bool = False) -> None:
        """`<study>/estimate.json`: the ETA as this driver computes it, for `g2-study status` to repeat."""
        now = time.time()
        if not force and now - self._estimate_at < ESTIMATE_EVERY_S:
            return
        self._estimate_at = now
        try:
            write_json(self.paths.estimate, {
                "at": now, "pid": os.getpid(), "eta_s": snapshot.study.eta_s, "elapsed_s": snapshot.study.elapsed_s,
                "trials": {line.progress.trial_id: line.eta_s for line in snapshot.running}})
        except OSError:
            pass

