"""A trial as the driver knows it, typed once: each Tune result becomes an `EpochReport`, each end a `TrialEnd`.

This is the edge between Ray Tune's dicts and the study's records. Below it nothing reads a report by key:

    Tune result (dict) --TrialLedger.report--> EpochReport --> Parquet curves, MLflow epoch metrics, progress file
    trial ends          --TrialLedger.end----> TrialEnd    --> the searcher (Optuna), Parquet results, MLflow, console

`end_status` is the one place where a trial's end is decided.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from study.results.rows import trial_rows
from study.results.schema import OBJECTIVE_COLUMN
from trainables.report import (
    DIVERGED,
    ERROR,
    FAILED,
    IS_TRIAL_SETTING,
    OK,
    PRUNED,
    REUSED_CHECKPOINT,
    STATUS,
    TRAINING_KEY,
    EpochReport,
)


def end_status(last: EpochReport | None, error: str | None) -> str:
    """How a trial ended: `error` if it raised, `diverged` if it said so, `ok` only with a sweep, else `pruned`.

    A trial stopped before its last epoch (a scheduler, a stopper) has no sweep; calling it `ok` would let a truncated
    model into a front.
    """
    if error is not None:
        return ERROR
    if last is not None and last.status == DIVERGED:
        return DIVERGED
    return OK if last is not None and last.finished else PRUNED


@dataclass(frozen=True)
class TrialEnd:
    """One trial's end: its status and error, its last measurement and the results rows they make.

    `recorded_before`: an earlier driver of the study recorded this end (a restart ran the trial again); `rows` are
    what it recorded, and `last` is None.
    """

    trial_id: str
    status: str
    error: str | None
    last: EpochReport | None
    rows: tuple[dict[str, Any], ...]
    recorded_before: bool = False

    @property
    def failed(self) -> bool:
        """Diverged or raised: no point of any front (Optuna FAIL, MLflow FAILED)."""
        return self.status in FAILED

    @property
    def own_row(self) -> dict[str, Any]:
        """The row of the trial's own compression setting (the only row of a trial that did not end ok)."""
        return next((row for row in self.rows if row.get(IS_TRIAL_SETTING)), self.rows[0] if self.rows else {})

    @property
    def training_key(self) -> str | None:
        return self.last.training_key if self.last is not None else self.own_row.get(TRAINING_KEY)

    @property
    def reused(self) -> bool:
        """It re-scored a stored model (or reported a stored divergence) instead of training."""
        return bool(self.last.reused_checkpoint if self.last is not None else self.own_row.get(REUSED_CHECKPOINT))

    def objectives(self, names: Sequence[str]) -> dict[str, float] | None:
        """The study's objectives at the trial's own setting, by name; None unless it ended ok."""
        if self.status != OK:
            return None
        return {name: float(self.own_row[OBJECTIVE_COLUMN[name]]) for name in names}


@dataclass
class TrialLedger:
    """What this driver heard of each trial: its config, its last measurement, the error it raised; and each end,
    decided once. Held in memory only (a restarted driver hears the trials again)."""

    study: str
    configs: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    last: dict[str, EpochReport] = field(default_factory=dict)   # the last report that was a measurement
    raised: dict[str, str] = field(default_factory=dict)         # the trial's own exception, as it reported it
    ends: dict[str, TrialEnd] = field(default_factory=dict)

    def report(self, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any]) -> EpochReport:
        """The one conversion of a Tune result: Tune's own keys (training_iteration, ...) are left behind here."""
        report = EpochReport.from_dict(result)
        self.configs[trial_id] = config
        if report.status == ERROR:   # `study.entrypoints` made it of an exception: no measurement
            self.raised[trial_id] = report.error or "the trial raised an exception"
        else:
            self.last[trial_id] = report
        return report

    def end(self, trial_id: str, config: Mapping[str, Any], *, error: str | None = None,
            finished_at: datetime | None = None) -> TrialEnd:
        """The trial's end, decided the first time it is asked for (`error`: Ray's, for a trial whose retries ran
        out); later calls return the same record."""
        if trial_id not in self.ends:
            last = self.last.get(trial_id)
            message = error if error is not None else self.raised.get(trial_id)
            status = end_status(last, message)
            if message is None and status != OK and last is not None:
                message = last.error   # a divergence says why
            rows = trial_rows(self.study, trial_id, config, last, status=status, error=message,
                              finished_at=finished_at or datetime.now(UTC))
            self.ends[trial_id] = TrialEnd(trial_id, status, message, last, tuple(rows))
        return self.ends[trial_id]

    def recorded(self, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> TrialEnd:
        """The end an earlier driver recorded (its results rows): it stands, whatever the trial does again."""
        if trial_id not in self.ends:
            first = rows[0]
            self.ends[trial_id] = TrialEnd(trial_id, str(first[STATUS]), first.get("error"), None,
                                           tuple(dict(row) for row in rows), recorded_before=True)
        return self.ends[trial_id]
