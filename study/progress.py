"""What a running study says of its trials (the lines `study.console` prints), and the per-trial progress it keeps
on disk for `g2-study status`.

The driver callback (`study.callbacks`) records; this module and `study.console` present, in the words of
`study.vocabulary`.

Each running trial also has a small JSON file, `<study>/progress/<trial_id>.json` (`TrialProgress`), rewritten
whole on every report: what it does, its epoch out of how many, its last validation metric and timings. Together
with the results (finished trials) it is what `study.status` reads, with no Ray and no MLflow.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from study.paths import StudyPaths, write_json
from study.trial_end import TrialEnd
from study.vocabulary import PENDING, count_text, ended_word, front_word, metric_label
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


END_LINE = "[{done:>3}/{total}] {trial_id} {word:<8} {knobs} -> {outcome} | {counts} | {front_word}: {front} point(s)"
EPOCH_LINE = "trial {trial_id} epoch {epoch}/{epochs}: {metric} | {rate}ETA {eta}"


def finished_line(end: TrialEnd, config: Mapping[str, Any], *, done: int, total: int,
                  statuses: Mapping[str, int], running: int, front: int) -> str:
    """The line of a finished trial (its end and config), with the study's counts (`study.vocabulary`)."""
    last = end.last
    if end.recorded_before:
        outcome = "recorded before the restart"
    elif end.status == OK and last is not None:
        name = last.metric_name or "metric"
        gate = last.accounting.gate_compression if last.accounting else math.nan
        outcome = (f"{metric_label(name, compressed=False)} {last.val_metric:.2f}, "
                   f"{metric_label(name, compressed=True)} {last.compressed_val_metric:.2f} at gate ×{gate:.1f}")
    else:
        outcome = end.error or end.status
    pending = max(total - done - running, 0)
    counts = count_text({**statuses, RUNNING: running, PENDING: pending}, keep=(RUNNING,))
    return END_LINE.format(done=done, total=total, trial_id=end.trial_id, word=ended_word(end.status, end.reused),
                           knobs=describe_trial(config), outcome=outcome, counts=counts,
                           front_word=front_word(running == 0 and pending == 0), front=front)


def epoch_line(progress: TrialProgress) -> str:
    """`trial 3f2a_00002 epoch 2/6: val ppl 412.31 | 10.4k tok/s | ETA 0:41`"""
    label = metric_label(progress.metric_name, compressed=False)
    value = progress.val_metric
    metric = f"{label} {value:.2f}" if value is not None and math.isfinite(value) else f"{label} -"
    rate = f"{format_rate(progress.tokens_per_s)} tok/s | " if progress.tokens_per_s else ""
    return EPOCH_LINE.format(trial_id=progress.trial_id, epoch=progress.epoch, epochs=progress.epochs or "?",
                             metric=metric, rate=rate, eta=format_duration(progress.eta_s()))


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

@dataclass(frozen=True)
class StudyProgress:
    total: int
    done: int
    running: int
    failed: int
    front: int
    elapsed_s: float
    eta_s: float | None
    counts: tuple[tuple[str, int], ...] = ()   # ended trials by `study.vocabulary` word (ok, reused, error, ...)

    @property
    def pending(self) -> int:
        return max(self.total - self.done - self.running, 0)

    @property
    def finished(self) -> bool:
        return self.running == 0 and self.pending == 0

    def counts_text(self) -> str:
        """`ok 1, reused 2, running 1, pending 2 | front so far 12` (study.vocabulary)."""
        text = count_text({**dict(self.counts), RUNNING: self.running, PENDING: self.pending}, keep=(RUNNING,))
        return f"{text} | {front_word(self.finished)} {self.front}"

    def timing(self) -> str:
        """`1:12 elapsed, ETA 0:51` (no ETA once done)."""
        return f"{format_duration(self.elapsed_s)} elapsed" + ("" if self.finished else
                                                              f", ETA {format_duration(self.eta_s)}")

    def summary(self) -> str:
        return f"{self.counts_text()} | {self.timing()}"


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
