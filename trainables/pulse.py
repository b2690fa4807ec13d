"""What a trial says within an epoch: how far its training pass or its compression sweep has got.

A `Pulse` is not a report: it carries no metric, reaches no searcher or scheduler and writes no checkpoint. The
loops call a `Pulser` after every batch (training) and every scored setting (the sweep); whoever listens decides
how often that is worth passing on (`study.live` writes one small file every few seconds). No torch here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TRAIN, SCORE = "train", "score"   # the phases a trial spends its time in


@dataclass(frozen=True)
class Pulse:
    phase: str            # TRAIN (batches of one epoch) or SCORE (settings of the sweep)
    done: int             # batches trained this epoch, or sweep settings scored
    total: int            # of how many (an LM epoch's window lengths vary: its batch count is an estimate)
    tokens: int = 0       # training tokens this epoch so far (0 while scoring)
    epoch: int = 0        # the epoch it trains (TRAIN), or the last one trained (SCORE)


Pulser = Callable[[Pulse], None]


def silent(pulse: Pulse) -> None:
    """The default listener: nobody asked."""
