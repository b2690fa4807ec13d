"""The words the console's end lines, its bar, `g2-study status` and the README share, defined once.

    ok        trained its model and scored it (the sweep included)
    reused    scored a model another trial trained (or an earlier driver of the study): no training of its own
    running   started and not yet ended (training, scoring, or waiting for the model it will score)
    pruned, diverged, error   ended without results rows of its own (trainables.report.STATUSES)
    pending   asked for by `num_samples`, not yet started
    stopped   running when its driver went away (`g2-study status` only; `g2-study resume` continues it)

A results row's metric at a compression setting is the "compressed val ppl" (BLEU: "compressed val bleu"); the
model's own, uncompressed, is the "val ppl". The Pareto front is the "front so far" while trials run or are
pending, and the "front" once the study is done. Knobs that do not apply to a trial's gate mode (τ and p outside
g2, τs outside sharpened) are shown empty, not with the default value the row carries.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from trainables.report import DIVERGED, ERROR, OK, PRUNED, RUNNING

REUSED, PENDING, STOPPED = "reused", "pending", "stopped"
ORDER = (OK, REUSED, PRUNED, DIVERGED, ERROR, RUNNING, STOPPED, PENDING)   # how counts are listed, everywhere
G2_ONLY, SHARPENED_ONLY = ("g2.tau", "g2.p"), ("g2.sharpen_tau",)


def ended_word(status: str, reused: bool) -> str:
    """What an ended trial counts as: `reused` for an ok trial that scored a stored model, else its status."""
    return REUSED if status == OK and reused else status


def count_order(word: str) -> tuple[int, str]:
    return (ORDER.index(word), "") if word in ORDER else (len(ORDER), word)


def count_text(counts: Mapping[str, int], *, keep: tuple[str, ...] = ()) -> str:
    """`ok 1, reused 4, running 1`: in ORDER, zero counts left out except those in `keep`."""
    words = sorted((w for w in set(counts) | set(keep) if counts.get(w, 0) or w in keep), key=count_order)
    return ", ".join(f"{w} {counts.get(w, 0)}" for w in words)


def front_word(finished: bool) -> str:
    return "front" if finished else "front so far"


def metric_label(metric_name: str, *, compressed: bool, split: str = "val") -> str:
    """`compressed val ppl`, `val ppl`, `compressed test bleu`."""
    return f"{'compressed ' if compressed else ''}{split} {metric_name or 'metric'}"


def blank_inapplicable(df: pd.DataFrame) -> pd.DataFrame:
    """A copy for display with the knobs that do not apply to each row's gate mode missing (NaN: printed empty)."""
    if "g2.gate_mode" not in df.columns:
        return df
    out = df.copy()
    for columns, mode in ((G2_ONLY, "g2"), (SHARPENED_ONLY, "sharpened")):
        other = out["g2.gate_mode"] != mode
        for column in columns:
            if column in out.columns:
                out[column] = out[column].where(~other)
    return out
