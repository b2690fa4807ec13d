"""Within-epoch progress of running trials: a side channel beside Tune's results.

A trial's loops tell a `Pulser` after every batch and every scored setting (`trainables.pulse`); in a Ray trial
that is a `LiveWriter`, which rewrites `<study>/live/<trial_id>.json` (a `LiveProgress`) at most every
`interval_s` seconds and at each change of phase. Tune never sees it: no searcher or scheduler reads it, no
checkpoint is written for it, and a lost file costs nothing but a frozen figure. The driver's console
(`study.console`) and `g2-study status` read these files.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from study.paths import write_json
from trainables.pulse import SCORE, TRAIN, Pulse

WRITE_INTERVAL_S = 2.0   # a few seconds: often enough for a bar, rare enough to cost nothing on a shared disk


@dataclass
class LiveProgress:
    """How far one trial's current phase (an epoch's training, or the sweep) has got."""

    trial_id: str
    phase: str = TRAIN           # trainables.pulse.TRAIN | SCORE
    done: int = 0                # batches of the epoch, or settings of the sweep
    total: int = 0
    epoch: int = 0
    tokens: int = 0              # training tokens of this epoch so far
    phase_started: float = 0.0   # time.time() when this epoch's training, or the sweep, began
    updated: float = 0.0

    @property
    def elapsed_s(self) -> float:
        return max(self.updated - self.phase_started, 0.0)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.elapsed_s if self.tokens and self.elapsed_s > 0 else None

    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def remaining_s(self) -> float | None:
        """Seconds left in this phase at its pace so far; None before its first step."""
        if self.done <= 0 or self.elapsed_s <= 0:
            return None
        return max(self.total - self.done, 0) * self.elapsed_s / self.done

    def describe(self) -> str:
        """`batch 312/1327, 10.4k tok/s`, `validating` (its pass done), or `scoring 5/24`."""
        from study.progress import format_rate

        if self.phase == SCORE:
            return f"scoring {self.done}/{self.total}"
        if self.total and self.done >= self.total:   # the pass is done: the epoch's validation runs
            return "validating"
        rate = f", {format_rate(self.tokens_per_s)} tok/s" if self.tokens_per_s else ""
        return f"batch {self.done}/{self.total}{rate}"

    @classmethod
    def read(cls, path: Path) -> LiveProgress | None:
        try:
            stored = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):   # not written yet, or gone
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})


def live_path(directory: Path, trial_id: str) -> Path:
    return Path(directory) / f"{trial_id}.json"


def read_live(directory: Path, trial_ids=None) -> dict[str, LiveProgress]:
    """The live files in `directory` (of `trial_ids` only, if given), by trial id."""
    directory = Path(directory)
    paths = ([live_path(directory, t) for t in trial_ids] if trial_ids is not None
             else sorted(directory.glob("*.json")))
    found = {}
    for path in paths:
        if (live := LiveProgress.read(path)) is not None:
            found[live.trial_id] = live
    return found


class LiveWriter:
    """The `Pulser` of a Ray trial: keeps its `LiveProgress` and writes it at a bounded rate."""

    def __init__(self, directory: Path, trial_id: str, *, interval_s: float = WRITE_INTERVAL_S,
                 clock: Callable[[], float] = time.time):
        self.path, self.interval_s, self.clock = live_path(directory, trial_id), interval_s, clock
        self.live = LiveProgress(trial_id)
        self._written = -float("inf")

    def __call__(self, pulse: Pulse) -> None:
        now = self.clock()
        live = self.live
        new_phase = (pulse.phase, pulse.epoch) != (live.phase, live.epoch) or live.phase_started == 0.0 \
            or pulse.done < live.done
        if new_phase:
            live.phase, live.epoch, live.phase_started = pulse.phase, pulse.epoch, now
        live.done, live.total, live.tokens, live.updated = pulse.done, pulse.total, pulse.tokens, now
        if new_phase or now - self._written >= self.interval_s:
            self._written = now
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json(self.path, asdict(live))
            except OSError:   # a figure on the console is not worth a trial
                pass
