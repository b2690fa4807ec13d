"""The driver's edge (study/trial_end.py): a Tune result typed once, a trial's end decided once, on real reports."""
from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from study.tracking import TRIAL_RUN_STATUS
from study.trial_end import TrialLedger, end_status
from trainables.report import FAILED, STATUSES, EpochReport

TUNE_KEYS = {"training_iteration": 3, "time_this_iter_s": 0.1, "pid": 42, "trial_id": "t", "timestamp": 1}


def ledger_end(reports: list[dict], config: dict, error: str | None = None):
    ledger = TrialLedger("s")
    for result in reports:
        ledger.report("t", config, {**result, **TUNE_KEYS})
    return ledger.end("t", config, error=error, finished_at=datetime(2026, 1, 1, tzinfo=UTC))


def test_every_way_a_trial_ends_is_one_status(trial):
    config, reports = trial
    diverged = {**reports[0], "epoch": 2, "status": "diverged", "error": "non-finite loss", "done": True,
                "val_metric": math.nan, "compressed_val_metric": math.nan}
    raised = {"status": "error", "error": "ValueError: boom", "done": True}
    ends = {"ok": ledger_end(reports, config), "pruned": ledger_end(reports[:1], config),
            "diverged": ledger_end([reports[0], diverged], config), "raised": ledger_end([reports[0], raised], config),
            "lost": ledger_end(reports, config, error="RayActorError: the worker died"),
            "never reported": ledger_end([], config, error="ValueError: bad config")}
    assert {name: end.status for name, end in ends.items()} == {
        "ok": "ok", "pruned": "pruned", "diverged": "diverged", "raised": "error", "lost": "error",
        "never reported": "error"}
    assert {end.status for end in ends.values()} == set(STATUSES)
    assert {name: end.error for name, end in ends.items() if end.error} == {
        "diverged": "non-finite loss", "raised": "ValueError: boom", "lost": "RayActorError: the worker died",
        "never reported": "ValueError: bad config"}
    assert all(end.rows and end.rows[0]["status"] == end.status for end in ends.values())   # what Parquet gets
    assert {end.status for end in ends.values() if end.failed} == set(FAILED)
    assert {s for s, run_status in TRIAL_RUN_STATUS.items() if run_status == "FAILED"} == set(FAILED)   # MLflow
    # the error report is no measurement: the last one is the epoch before it
    assert ends["raised"].last == EpochReport.from_dict(reports[0])


def test_a_result_loses_tunes_keys_once_and_an_end_is_decided_once(trial):
    config, reports = trial
    ledger = TrialLedger("s")
    report = ledger.report("t", config, {**reports[-1], **TUNE_KEYS})
    assert report == EpochReport.from_dict(reports[-1])
    first = ledger.end("t", config)
    assert ledger.end("t", config, error="a later error") is first and first.status == "ok"


@pytest.mark.parametrize("last, error, status", [
    (None, None, "pruned"), (None, "boom", "error"), (EpochReport(status="diverged"), None, "diverged"),
    (EpochReport(status="ok"), None, "pruned"),                # ok without a sweep: stopped before its end
    (EpochReport(status="diverged"), "boom", "error"),
])
def test_end_status(last, error, status):
    assert end_status(last, error) == status
