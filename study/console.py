"""The study's console: lines for trial starts, epochs and ends, and a bar that ticks on a terminal.

    start   trial 3f2a_00002 starts: g2 τ=0.52 p=0.31 rank 8 bits 4; trains
            (or: re-scores the stored model; waits for the model trial 3f2a_00001 is training)
    epoch   trial 3f2a_00002 epoch 2/6: val ppl 412.31 | 10.4k tok/s | ETA 0:41
    live    trial 3f2a_00002 epoch 1/1: batch 312/1327, 10.4k tok/s | ETA 3:10      (no terminal: once a minute)
    end     [  1/2] 3f2a_00002 ok  g2 τ=0.52 ... -> val ppl ... | ok 1, running 1 | front so far: 12 point(s)
    bar     trials 1/2 ▕█████░░░░░▏ 1:12 elapsed, ETA 0:51 | 00001 batch 312/1327, 10.4k tok/s | ok 1, running 1 | …

On a terminal the bar is redrawn at least once a second by a ticker thread, from the driver's counts and the
running trials' live files (`study.live`), so it moves within an epoch. Where stdout is no terminal (CI logs,
nohup, a Ray Job's log) there is no bar and no control character: plain lines, one per event, and one line per
running trial per minute at most. `quiet` keeps only the end lines (and notices such as a lost worker).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from study.live import LiveProgress
from study.progress import TRAINS, WAITS, StudyProgress, TrialProgress, describe_plan, epoch_line, format_duration
from trainables.pulse import SCORE

DEFAULT_COLUMNS = 80        # a terminal that reports 0 columns (a pty without a size: `script`, some CI runners)
TICK_S = 0.5                # bar redraws: twice a second, so the elapsed time never skips a second
PLAIN_EVERY_S = 60.0        # without a terminal: one live line per running trial per minute at most
BAR_WIDTH = 10
# The console's lines (README.md's sample is checked against these, tests/test_readme.py)
START_LINE = "trial {trial_id} starts: {knobs}; {plan}"
LIVE_LINE = "trial {trial_id} epoch {epoch}/{epochs}: {progress} | ETA {eta}"
BAR_HEAD = "trials {done}/{total} ▕{bar}▏ {timing}"


@dataclass(frozen=True)
class RunningLine:
    """One running trial as the bar and the live lines show it."""

    progress: TrialProgress
    live: LiveProgress | None
    eta_s: float | None

    @property
    def short_id(self) -> str:
        return self.progress.trial_id.rsplit("_", 1)[-1]

    def describe(self) -> str:
        return self.live.describe() if self.live is not None else describe_plan(self.progress.plan,
                                                                                 self.progress.waits_for)

    def brief(self) -> str:
        """`17%` of its epoch, `sweep 21%`, or what it waits for: the bar's short form."""
        if self.live is None:
            return "starting" if self.progress.plan == TRAINS else "waits" if self.progress.plan == WAITS else "loads"
        percent = f"{100 * self.live.fraction():.0f}%"
        if self.live.phase == SCORE:
            return f"sweep {percent}"
        return "validating" if self.live.fraction() >= 1 else percent


@dataclass(frozen=True)
class Snapshot:
    study: StudyProgress
    running: tuple[RunningLine, ...] = ()


def terminal_columns(stream: TextIO) -> int:
    """The terminal's width; DEFAULT_COLUMNS when it reports none (0) or cannot be asked."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns if columns > 0 else DEFAULT_COLUMNS


def bar_line(snapshot: Snapshot, columns: int) -> str:
    """The bar: trials done, the clock and ETA (first: they tick), each running trial's progress within its epoch
    or sweep, then the counts; the trials in short (`1ce5cc6c 17%`) where in full they would not fit."""
    study = snapshot.study
    filled = round(BAR_WIDTH * study.done / study.total) if study.total else 0
    head = BAR_HEAD.format(done=study.done, total=study.total, bar="█" * filled + "░" * (BAR_WIDTH - filled),
                           timing=study.timing())
    for describe in (RunningLine.describe, RunningLine.brief):
        trials = ", ".join(f"{line.short_id} {describe(line)}" for line in snapshot.running)
        text = " | ".join(part for part in (head, trials, study.counts_text()) if part)
        if len(text) < columns:
            return text
    return text[:max(columns - 2, 1)] + "…"


def live_line(line: RunningLine) -> str:
    """A running trial's live progress as a plain line."""
    p = line.progress
    return LIVE_LINE.format(trial_id=p.trial_id, epoch=(line.live.epoch if line.live else p.epoch) or 1,
                            epochs=p.epochs or "?", progress=line.describe(), eta=format_duration(line.eta_s))


class Console:
    """Args:
        total: the trials of this run.
        quiet: only one line per finished trial (and notices).
        printer: where lines go where there is no bar (a test passes `list.append`).
        stream: the terminal of the bar; a bar is drawn only if it is a TTY and `printer` is `print`.
    """

    def __init__(self, total: int, *, quiet: bool = False, printer: Callable[[str], None] = print,
                 stream: TextIO | None = None):
        self.total, self.quiet, self.printer = total, quiet, printer
        self.stream = stream if stream is not None else sys.stdout
        self.live = printer is print and not quiet and _isatty(self.stream)
        self._lock = threading.Lock()   # the ticker thread and Tune's callbacks draw on one stream
        self._bar: str | None = None
        self._said: dict[str, float] = {}   # trial id -> when its last live line was printed
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------- lines

    def _line(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self.stream.write(f"\r\x1b[K{text}\n{self._bar}")   # above the bar, which is drawn again below it
                self.stream.flush()
            elif self.printer is print:
                print(text, file=self.stream, flush=True)
            else:
                self.printer(text)

    def trial_started(self, trial_id: str, knobs: str, plan: str, waits_for: str | None) -> None:
        if not self.quiet:
            self._line(START_LINE.format(trial_id=trial_id, knobs=knobs, plan=describe_plan(plan, waits_for)))

    def epoch(self, progress: TrialProgress) -> None:
        if not self.quiet:
            self._line(epoch_line(progress))

    def search(self, text: str) -> None:
        """What the search did without a Ray trial (a suggestion answered from the results)."""
        if not self.quiet:
            self._line(text)

    def trial_finished(self, text: str) -> None:
        self._line(text)

    def notice(self, text: str) -> None:
        """Printed even when quiet: something the user should know (a lost worker, a retry)."""
        self._line(text)

    # ----------------------------------------------------------------------- the bar and the live lines

    def update(self, snapshot: Snapshot | StudyProgress) -> None:
        """Redraw the bar (a terminal only; elsewhere the end lines carry the counts)."""
        if not self.live:
            return
        snapshot = snapshot if isinstance(snapshot, Snapshot) else Snapshot(snapshot)
        with self._lock:
            self._bar = bar_line(snapshot, terminal_columns(self.stream))
            self.stream.write(f"\r\x1b[K{self._bar}")
            self.stream.flush()

    def tick(self, snapshot: Snapshot, now: float | None = None) -> None:
        """What the ticker does: the bar on a terminal; elsewhere a live line per trial once a minute at most."""
        if self.quiet:
            return
        if self.live:
            self.update(snapshot)
            return
        now = time.time() if now is None else now
        for line in snapshot.running:
            if line.live is None:
                continue
            last = self._said.get(line.progress.trial_id)
            if last is None:   # a trial's first minute is its start line's
                self._said[line.progress.trial_id] = now
            elif now - last >= PLAIN_EVERY_S:
                self._said[line.progress.trial_id] = now
                self._line(live_line(line))

    def start_ticking(self, snapshot: Callable[[], Snapshot]) -> None:
        """Tick from a thread until `close`: every TICK_S on a terminal, every few seconds elsewhere."""
        if self.quiet or self._thread is not None:
            return
        self._stop = threading.Event()
        interval = TICK_S if self.live else 5.0

        def run() -> None:
            while True:
                try:
                    self.tick(snapshot())
                except Exception:   # a figure that cannot be drawn must never stop the study
                    pass
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=run, name="g2-study-console", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._stop = self._thread = None
        with self._lock:
            if self._bar is not None:
                self.stream.write("\n")
                self.stream.flush()
                self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no such method, or a closed stream
        return False
