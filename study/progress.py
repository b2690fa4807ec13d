"""What a running study shows on its console, and the per-trial progress it keeps on disk for `g2-study status`.

The driver callback (`study.callbacks`) records; this module presents. Three kinds of lines and one bar:

    start   trial 3f2a_00002 starts: g2 τ=0.52 p=0.31 rank 8 bits 4; trains
            (or: re-scores the stored model; waits for the model trial 3f2a_00001 is training)
    epoch   trial 3f2a_00002 epoch 2/6: val ppl 412.31 | 10.4k tok/s | ETA 0:41
    end     [  3/6] 3f2a_00002 ok  g2 τ=0.52 ... -> val ppl ... | ok 3, running 2 | front: 2 point(s)
    bar     done 3/6 | running 2, failed 0, pending 1 | front 2 | 1:12 elapsed, ETA 0:51   (a terminal only)

`quiet` keeps only the end lines (and warnings such as a lost worker). Where stdout is no terminal (CI logs,
nohup, a Ray Job's log) the lines are plain text, one per event, and there is no bar: nothing is redrawn.

Each running trial also has a small JSON file, `<study>/progress/<trial_id>.json` (`TrialProgress`), rewritten
whole on every report: what it does, its epoch out of how many, its last validation metric and timings. Together
with the results (finished trials) it is what `study.status` reads, with no Ray and no MLflow.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from study.paths import StudyPaths, write_json
from study.trial_end import TrialEnd
from trainables.config import TrialConfig
from trainables.report import OK, RUNNING, TRAIN_TOKENS, EpochReport

TRAINS, RESCORES, WAITS = "trains", "re-scores", "waits"   # what a starting trial does with its training knobs


def describe_trial(config: Mapping[str, Any]) -> str:
    """The searched knobs of a trial, short: gate mode (τ and p for g2), rank and bits."""
    mode = config.get("g2.gate_mode", "?")
    knobs = f" τ={config['g2.tau']:.2f} p={config['g2.p']:.2f}" if mode == "g2" else ""
    return f"{mode}{knobs} rank {config.get('compress.rank')} bits {config.get('compress.bits')}"


def format_duration(seconds: float | None) -> str:
    """h:mm:ss or m:ss; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def format_rate(per_s: float) -> str:
    return f"{per_s / 1e6:.1f}M" if per_s >= 1e6 else f"{per_s / 1e3:.1f}k" if per_s >= 1e3 else f"{per_s:.0f}"


# --------------------------------------------------------------------------- what a trial does

def trial_config(config: Mapping[str, Any]) -> TrialConfig | None:
    """The TrialConfig of a trial's flat Tune config (study keys `_*` dropped); None if it is invalid (the trial
    will say why when it runs)."""
    try:
        return TrialConfig.from_flat({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError):
        return None


def total_epochs(cfg: TrialConfig | None) -> int | None:
    """How many epoch reports a trial that trains makes (the fine-tuning epochs count, as in the trainable)."""
    return cfg.train.epochs + cfg.train.finetune_epochs if cfg is not None else None


def training_plan(key: str | None, store_root: str | Path | None, training_now: Mapping[str, str]
                  ) -> tuple[str, str | None]:
    """What a trial with training key `key` does as it starts: (TRAINS | RESCORES | WAITS, the trial it waits for).

    A stored model (or a stored divergence) is re-scored; a key whose lock another process holds, or that a trial
    this driver started earlier is training (`training_now`: trial id -> key; it may not have taken the lock
    yet), is waited for; else the trial trains. The trainable decides for itself (`trainables.store`): this is
    the same question asked a moment earlier, for the console.
    """
    if key is None:
        return TRAINS, None
    other = next((trial_id for trial_id, k in training_now.items() if k == key), None)
    if store_root is not None:
        from trainables.store import ModelStore  # torch: only a driver with a model store pays for it

        store = ModelStore(store_root)
        if store.meta(key) is not None or store.diverged(key) is not None:
            return RESCORES, None
        if other is None and store.is_training(key):
            return WAITS, None
    return (WAITS, other) if other is not None else (TRAINS, None)


def describe_plan(plan: str, other: str | None) -> str:
    if plan == RESCORES:
        return "re-scores the stored model"
    if plan == WAITS:
        return f"waits for the model trial {other} is training" if other else "waits for the model another trial " \
                                                                                 "is training"
    return "trains"


def finished_line(end: TrialEnd, config: Mapping[str, Any], *, done: int, total: int,
                  statuses: Mapping[str, int], running: int, front: int) -> str:
    """The line of a finished trial (its end and config), with the study's counts."""
    last = end.last
    if end.recorded_before:
        outcome = "recorded before the restart"
    elif end.status == OK and last is not None:
        name = last.metric_name or "metric"
        gate = last.accounting.gate_compression if last.accounting else math.nan
        outcome = (f"val {name} {last.val_metric:.2f}, compressed {last.compressed_val_metric:.2f} "
                   f"at gate ×{gate:.1f}" + (" (reused model)" if last.reused_checkpoint else ""))
    else:
        outcome = end.error or end.status
    counts = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    return (f"[{done:>3}/{total}] {end.trial_id} {end.status:<8} {describe_trial(config)} -> {outcome} | "
            f"{counts}, running {running} | front: {front} point(s)")


# --------------------------------------------------------------------------- per-trial progress on disk

@dataclass
class TrialProgress:
    """The last thing the driver heard of one trial; `<study>/progress/<trial_id>.json`."""

    trial_id: str
    knobs: str                          # describe_trial
    plan: str = TRAINS
    waits_for: str | None = None
    state: str = RUNNING                # running, or the status it ended with (trainables.report.STATUSES)
    epoch: int = 0                      # epochs reported so far
    resumed_at: int = 0                 # the epoch it went on from in this driver (an earlier one's checkpoint)
    epochs: int | None = None           # of how many
    metric_name: str = ""
    val_metric: float | None = None
    epoch_time_s: float | None = None
    tokens_per_s: float | None = None
    started: float = 0.0                # time.time() of its start in this driver
    updated: float = 0.0                # of the last report
    host: str = ""                      # the driver's
    driver_pid: int = 0

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds until its last epoch, at the pace of its epochs so far (the final sweep not counted)."""
        if self.epochs is None or self.epoch <= 0:
            return None
        per_epoch = self.epoch_time_s or (self.updated - self.started) / self.epoch
        return max(self.epochs - self.epoch, 0) * per_epoch

    def fraction(self) -> float:
        """How far it is, in epochs (0 for a trial that re-scores or waits: its time is not in epochs)."""
        return min(self.epoch / self.epochs, 1.0) if self.epochs else 0.0

    def carried(self) -> float:
        """The fraction an earlier driver trained: not this driver's work, so not its pace."""
        return min(self.resumed_at / self.epochs, 1.0) if self.epochs else 0.0

    @classmethod
    def read(cls, path: Path) -> TrialProgress | None:
        try:
            stored = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):   # gone (a restart), or written by something else
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / f"{self.trial_id}.json", asdict(self))


def read_progress(study_root: Path) -> dict[str, TrialProgress]:
    """Every trial's progress file in a study directory, by trial id."""
    found = {}
    for path in sorted(StudyPaths(Path(study_root)).progress.glob("*.json")):
        if (progress := TrialProgress.read(path)) is not None:
            found[progress.trial_id] = progress
    return found


# --------------------------------------------------------------------------- the study as a whole

def study_eta(elapsed_s: float, total: int, done: int, running: list[float], carried: float = 0.0) -> float | None:
    """Seconds left at the pace so far: finished trials count whole, running ones by their fraction of epochs.

    `carried` is what earlier drivers trained of the trials this one went on with: it is left out of the pace
    (a trial resumed at epoch 3 of 4 did not take this driver three epochs' time).
    """
    reached = done + sum(running)
    made = reached - carried
    if made <= 0 or elapsed_s <= 0:
        return None
    return max(total - reached, 0.0) * elapsed_s / made


@dataclass(frozen=True)
class StudyProgress:
    total: int
    done: int
    running: int
    failed: int
    front: int
    elapsed_s: float
    eta_s: float | None

    @property
    def pending(self) -> int:
        return max(self.total - self.done - self.running, 0)

    def summary(self) -> str:
        return (f"running {self.running}, failed {self.failed}, pending {self.pending} | front {self.front} | "
                f"{format_duration(self.elapsed_s)} elapsed, ETA {format_duration(self.eta_s)}")


# --------------------------------------------------------------------------- the console

class Console:
    """The study's console: lines for trial starts, epochs and ends, and a bar on a terminal.

    Args:
        total: the trials of this run.
        quiet: only one line per finished trial (and warnings).
        printer: where lines go where there is no bar (a test passes `list.append`).
        stream: the terminal of the bar; a bar is drawn only if it is a TTY and `printer` is `print`.
    """

    def __init__(self, total: int, *, quiet: bool = False, printer: Callable[[str], None] = print,
                 stream: TextIO | None = None):
        self.total, self.quiet, self.printer = total, quiet, printer
        self.stream = stream if stream is not None else sys.stdout
        self.live = printer is print and not quiet and _isatty(self.stream)
        self._bar = None

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)   # above the bar, which is redrawn below it
        elif self.printer is print:
            print(text, file=self.stream, flush=True)
        else:
            self.printer(text)

    def trial_started(self, trial_id: str, knobs: str, plan: str, waits_for: str | None) -> None:
        if not self.quiet:
            self._line(f"trial {trial_id} starts: {knobs}; {describe_plan(plan, waits_for)}")

    def epoch(self, progress: TrialProgress) -> None:
        if self.quiet:
            return
        parts = [f"trial {progress.trial_id} epoch {progress.epoch}/{progress.epochs or '?'}:"]
        if progress.val_metric is not None and math.isfinite(progress.val_metric):
            parts.append(f"val {progress.metric_name or 'metric'} {progress.val_metric:.2f}")
        else:
            parts.append(f"val {progress.metric_name or 'metric'} -")
        if progress.tokens_per_s:
            parts.append(f"| {format_rate(progress.tokens_per_s)} tok/s")
        parts.append(f"| ETA {format_duration(progress.eta_s())}")
        self._line(" ".join(parts))

    def search(self, text: str) -> None:
        """What the search did without a Ray trial (a suggestion answered from the results)."""
        if not self.quiet:
            self._line(text)

    def trial_finished(self, text: str) -> None:
        self._line(text)

    def notice(self, text: str) -> None:
        """Printed even when quiet: something the user should know (a lost worker, a retry)."""
        self._line(text)

    def update(self, progress: StudyProgress) -> None:
        """Redraw the bar (a terminal only; elsewhere the end lines carry the counts)."""
        if not self.live:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=progress.total, file=self.stream, dynamic_ncols=True, leave=True,
                             bar_format="{desc}{bar:20} {n_fmt}/{total_fmt} {postfix}", desc="trials ")
        self._bar.total = progress.total
        self._bar.n = progress.done
        self._bar.set_postfix_str(progress.summary(), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no such method, or a closed stream
        return False


def epoch_progress(progress: TrialProgress, report: EpochReport, now: float) -> TrialProgress:
    """`progress` after one epoch report: epoch, metric, timings."""
    tokens = report.train.get(TRAIN_TOKENS)
    progress.epoch = report.epoch if report.epoch is not None else progress.epoch
    progress.metric_name = report.metric_name or progress.metric_name
    progress.val_metric = report.val_metric if math.isfinite(report.val_metric) else None
    progress.epoch_time_s = report.epoch_time_s
    progress.tokens_per_s = tokens / report.epoch_time_s if tokens and report.epoch_time_s else None
    progress.updated = now
    return progress
