"""How long a study has left, from what its driver knows.

A trial's time goes to three phases: its start (a Ray worker, torch, the corpus), its training (epochs: one pass
over the training data, then validation) and its sweep (every compression setting scored on validation and
test). The driver knows, per running trial, its plan (it trains, re-scores a stored model, or waits for a model
another trial trains: `study.progress`), how far its phase has got (`study.live`) and the measured pace of what
ended (`Pace`). It does not know what the search will ask next: a pending trial is expected to train as often as
the started ones did. Suggestions the results answer never become trials (`study.search`) and cost nothing here.

The estimate is a schedule: running trials hold their slots for their remaining time, pending ones take the
first slot that frees, and the study ends when the last slot does.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from study.live import LiveProgress
from study.progress import RESCORES, TRAINS, WAITS, TrialProgress
from trainables.pulse import SCORE, TRAIN

# Until an epoch has ended, its validation is taken as this share of its training pass (measured on the
# quickstart, 2 CPU cores: 9 s of validation after a 241 s pass over PTB).
VALIDATION_SHARE = 0.04
# Until a sweep has ended, a scored token is taken to cost this fraction of a trained one: forward only, no
# gradients (measured on the quickstart: 2.25 s a row of 28k tokens at 3.8k training tokens/s).
SCORE_COST = 0.30


@dataclass(frozen=True)
class TrialShape:
    """What one trial costs, in units the driver can measure."""

    epochs: int                  # epoch reports of a trial that trains
    settings: int                # rows of its sweep (settings × evaluation gates)
    tokens_per_setting: int = 0  # validation + test tokens each row reads; 0 when unknown (whole splits)


@dataclass
class Pace:
    """What this driver measured so far (means over what ended); `None`: not measured yet."""

    starts: list[float] = field(default_factory=list)        # trial start to its first step
    epochs: list[float] = field(default_factory=list)        # one epoch of training and validation
    validations: list[float] = field(default_factory=list)   # the validation after a training pass
    setting_s: list[float] = field(default_factory=list)     # one row of a sweep
    trained: int = 0   # ended trials that trained, and that re-scored or waited
    reused: int = 0

    @property
    def start_s(self) -> float | None:
        return _mean(self.starts)

    @property
    def epoch_s(self) -> float | None:
        return _mean(self.epochs)

    def train_share(self, running_plans: Sequence[str] = ()) -> float:
        """The share of trials that train, over those ended and those running (whose plans are known)."""
        trained = self.trained + sum(plan == TRAINS for plan in running_plans)
        seen = self.reused + trained + sum(plan != TRAINS for plan in running_plans)
        return trained / seen if seen else 1.0

    def sweep_s(self, shape: TrialShape, train_tokens_per_s: float | None) -> float | None:
        """A whole sweep: at the measured time per row, else at the training rate's scoring cost, else None."""
        if (per_row := _mean(self.setting_s)) is not None:
            return shape.settings * per_row
        if train_tokens_per_s and shape.tokens_per_setting:
            return shape.settings * shape.tokens_per_setting * SCORE_COST / train_tokens_per_s
        return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class PaceMeter:
    """Measures a `Pace` from what a driver sees of its trials, in the order it sees it (`study.board`; a test
    replays a recorded study through it)."""

    def __init__(self):
        self.pace = Pace()
        self.started_at: dict[str, float] = {}    # running trial id -> when this driver started it
        self.trained_s: dict[str, float] = {}     # -> the time of the epochs it reported
        self.rates: dict[str, float] = {}         # -> training tokens/s of its last live file
        self._stepped: set[str] = set()

    @property
    def train_rate(self) -> float | None:
        """Training tokens/s of one trial, over the trials training now (for a sweep not yet measured)."""
        return _mean(list(self.rates.values()))

    def started(self, trial_id: str, now: float) -> None:
        self.started_at[trial_id] = now

    def saw(self, trial_id: str, live: LiveProgress) -> None:
        """A live file of a running trial: its first one measures its start."""
        if trial_id not in self._stepped and trial_id in self.started_at:
            self._stepped.add(trial_id)
            self.pace.starts.append(max(live.phase_started - self.started_at[trial_id], 0.0))
        if live.phase == TRAIN and live.tokens_per_s:
            self.rates[trial_id] = live.tokens_per_s

    def epoch(self, trial_id: str, epoch: int, epoch_time_s: float, live: LiveProgress | None, now: float,
              tokens_per_s: float | None = None) -> None:
        """An epoch it trained (and validated) in `epoch_time_s` at `tokens_per_s`; `live`: its last live file."""
        if tokens_per_s:
            self.rates[trial_id] = tokens_per_s
        if trial_id not in self._stepped and trial_id in self.started_at and trial_id not in self.trained_s:
            self._stepped.add(trial_id)   # no live file seen before its first report: that report dates its start
            self.pace.starts.append(max(now - epoch_time_s - self.started_at[trial_id], 0.0))
        self.pace.epochs.append(epoch_time_s)
        self.trained_s[trial_id] = self.trained_s.get(trial_id, 0.0) + epoch_time_s
        if live is not None and live.phase == TRAIN and live.epoch == epoch and live.fraction() > 0:
            self.pace.validations.append(max(epoch_time_s - live.elapsed_s / live.fraction(), 0.0))

    def ended(self, trial_id: str, *, ok: bool, reused: bool, rows: int, live: LiveProgress | None, now: float,
              whole: bool = True) -> None:
        """Its end; `rows` of its sweep; `whole`: this driver ran all of it (not resumed from a checkpoint)."""
        started, trained = self.started_at.pop(trial_id, None), self.trained_s.pop(trial_id, 0.0)
        self.rates.pop(trial_id, None)
        self._stepped.discard(trial_id)
        if not ok:
            return
        if reused:
            self.pace.reused += 1
        else:
            self.pace.trained += 1
        if live is not None and live.phase == SCORE and live.done > 0:
            self.pace.setting_s.append((now - live.phase_started) / live.done)
        elif whole and started is not None and rows:   # no live file seen: what its start and epochs leave
            sweep = now - started - trained - (self.pace.start_s or 0.0)
            if sweep > 0:
                self.pace.setting_s.append(sweep / rows)


@dataclass(frozen=True)
class RunningTrial:
    progress: TrialProgress
    live: LiveProgress | None
    shape: TrialShape


def remaining_s(trial: RunningTrial, pace: Pace, now: float, *, train_rate: float | None = None,
                trainer_left: float | None = None) -> float | None:
    """Seconds a running trial has left: its start, the rest of its training (if it trains), then its sweep.

    `train_rate`: tokens/s of the study's training so far (for a sweep not yet measured); `trainer_left`: for a
    trial that waits, what is left of the trial training its model. None: nothing to go on yet.
    """
    progress, live, shape = trial.progress, trial.live, trial.shape
    if live is not None and live.phase == SCORE:
        left = live.remaining_s()   # this sweep's own pace, as of its file's last write
        if left is None:
            left = pace.sweep_s(shape, progress.tokens_per_s or train_rate)
        return None if left is None else max(left - (now - live.updated), 0.0)
    rate = live.tokens_per_s if live is not None and live.phase == TRAIN else None
    sweep = pace.sweep_s(shape, rate or progress.tokens_per_s or train_rate)
    if sweep is None:
        return None
    start = _start_left(progress, live, pace, now)
    if progress.plan in (RESCORES, WAITS):
        waited = (trainer_left or 0.0) if progress.plan == WAITS else 0.0
        return None if start is None else start + waited + sweep
    if live is None or live.phase != TRAIN or live.fraction() <= 0:   # not yet at its first batch
        if start is None or pace.epoch_s is None:
            return None
        return start + max(shape.epochs - progress.epoch, 0) * pace.epoch_s + sweep
    done = live.fraction()
    pass_s = max(live.elapsed_s, 1e-9) / done   # this pass at its own pace
    validation = _mean(pace.validations)
    validation = pass_s * VALIDATION_SHARE if validation is None else validation
    epoch_s = pace.epoch_s or pass_s + validation
    this_epoch = (1.0 - done) * pass_s - (now - live.updated) + validation
    later = max(shape.epochs - max(live.epoch, progress.epoch + 1), 0) * epoch_s
    return max(this_epoch, 0.0) + later + sweep


def _start_left(progress: TrialProgress, live: LiveProgress | None, pace: Pace, now: float) -> float | None:
    if live is not None or progress.epoch > progress.resumed_at:   # it has taken a step, or reported an epoch
        return 0.0
    if pace.start_s is None:
        return None
    return max(pace.start_s - (now - progress.started), 0.0)


def pending_s(pace: Pace, shape: TrialShape, train_rate: float | None, epoch_s: float | None = None,
              running_plans: Sequence[str] = ()) -> float | None:
    """A trial not yet asked for: its start, training as often as the started ones did (ended, and running with
    `running_plans`), and its sweep. `epoch_s`: an epoch's time where none has ended yet (`passing_epoch_s`)."""
    sweep = pace.sweep_s(shape, train_rate)
    epoch_s = pace.epoch_s or epoch_s
    if sweep is None or pace.start_s is None:
        return None
    share = pace.train_share(running_plans)
    if share > 0 and epoch_s is None:
        return None
    return pace.start_s + share * shape.epochs * (epoch_s or 0.0) + sweep


def passing_epoch_s(running: list[RunningTrial], pace: Pace) -> float | None:
    """An epoch's time as the running trials' passes go (training pass and validation), for a study whose first
    epoch has not ended yet."""
    guesses = [max(t.live.elapsed_s, 1e-9) / t.live.fraction() * (1 + VALIDATION_SHARE) for t in running
               if t.live is not None and t.live.phase == TRAIN and t.live.fraction() > 0]
    return _mean(guesses)


def schedule_s(running: list[float], pending: list[float], slots: int) -> float:
    """When the last of `slots` parallel slots frees: running trials hold theirs, pending ones take the first free."""
    slots = max(slots, len(running), 1)
    free = sorted(running) + [0.0] * (slots - len(running))
    heapq.heapify(free)
    for cost in sorted(pending, reverse=True):   # longest first: the usual list-scheduling order
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free)


def running_left(running: list[RunningTrial], pace: Pace, now: float, train_rate: float | None = None
                 ) -> dict[str, float | None]:
    """Each running trial's seconds left (`remaining_s`), by trial id; a waiting trial after its trainer."""
    left: dict[str, float | None] = {}
    for trial in sorted(running, key=lambda t: t.progress.plan == WAITS):
        trainer = left.get(trial.progress.waits_for or "") or 0.0
        left[trial.progress.trial_id] = remaining_s(trial, pace, now, train_rate=train_rate, trainer_left=trainer)
    return left


def study_eta(left: dict[str, float | None], pending: int, pending_shape: TrialShape, pace: Pace, slots: int,
              train_rate: float | None = None, epoch_s: float | None = None, running_plans: Sequence[str] = ()
              ) -> float | None:
    """Seconds until the study's last trial ends (`left`: `running_left`; `running_plans`: the running trials'
    plans); None while there is nothing to go on."""
    if any(value is None for value in left.values()):
        return None
    each = pending_s(pace, pending_shape, train_rate, epoch_s, running_plans) if pending else 0.0
    if each is None:
        return None
    return schedule_s([v for v in left.values() if v is not None], [each] * pending, slots)


def trial_shape(cfg) -> TrialShape:
    """The `TrialShape` of a trial (`cfg`: its TrialConfig), as the trainable will run it."""
    from trainables.trainable import sweep_gates  # torch: the driver has it loaded already

    settings = cfg.sweep.settings(cfg.compress)
    rows = (len(settings) + (cfg.compress not in settings)) * len(sweep_gates(cfg))
    tokens = 0
    if cfg.task == "lm" and cfg.train.max_eval_batches:
        tokens = cfg.train.max_eval_batches * cfg.lm.bptt * (cfg.lm.eval_batch_size + cfg.lm.test_batch_size)
    return TrialShape(cfg.train.epochs + cfg.train.finetune_epochs, rows, tokens)
