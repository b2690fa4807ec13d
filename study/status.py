"""`g2-study status NAME`: where a study stands, read from its directory alone (no Ray, no MLflow).

It works while a driver runs the study, after it finished and after a driver was killed, from what the study
directory (`study.paths`) holds:

    study.json   the experiments run for the study and how many trials each asked for (the total)
    results/     the finished trials (`study.results`): ok (reused when it re-scored a stored model), pruned,
                 diverged, error, and the front so far
    progress/    what the driver last heard of each trial it started (`study.progress`): its plan, epoch k/N,
                 last validation metric and pace
    driver.json  the driver running it, if any (`study.claim`): a trial still `running` in its progress file
                 with no live driver was stopped there (`g2-study resume` continues it from its last checkpoint)

A trial not yet asked for has no id: those are counted as pending.
"""
from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from study import results
from study.claim import CLAIM_FILE, DriverInfo
from study.config import StudyConfig
from study.front import SHOWN, format_front, study_front
from study.links import trial_ids
from study.live import LiveProgress, read_live
from study.paths import SearchLog, StudyPaths, read_state
from study.progress import (
    RESCORES,
    WAITS,
    TrialProgress,
    describe_plan,
    describe_trial,
    format_duration,
    read_progress,
)
from study.vocabulary import PENDING, REUSED, STOPPED, count_order, count_text, front_word, metric_label
from trainables.report import (
    FINISHED_AT,
    IS_TRIAL_SETTING,
    OK,
    REUSED_CHECKPOINT,
    RUNNING,
    STATUS,
    TRIAL_ID,
    VAL_METRIC,
)

# The table's head and the front's title (README.md's sample is checked against these, tests/test_readme.py)
HEAD_LINE = "study {name} ({root}): {state}{driver}"
COUNTS_LINE = "{total} trial(s): {counts} | time used {elapsed}{eta}"
FRONT_LINE = "Pareto {front_word} ({points} point(s)):"


@dataclass
class TrialStatus:
    """One trial as `status` shows it."""

    trial_id: str
    state: str                   # running, stopped, ok, reused, pruned, diverged, error
    knobs: str
    epoch: int | None = None
    epochs: int | None = None
    plan: str | None = None      # trains, re-scores, waits (study.progress)
    waits_for: str | None = None
    metric_name: str = ""
    val_metric: float | None = None   # running: the last epoch's (uncompressed); ended: its own setting's row
    eta_s: float | None = None
    error: str | None = None
    live: str | None = None      # how far its epoch or sweep has got (`study.live`), while it runs
    optuna_trial: int | None = None   # with `ids`: the Optuna trial the search asked for it, and its MLflow run
    mlflow_run_id: str | None = None

    def detail(self) -> str:
        parts = []
        if self.state in (RUNNING, STOPPED):
            if self.live and self.state == RUNNING:   # `epoch 1/6: batch 227/1328, 3.6k tok/s` or `scoring 5/24`
                parts.append(self.live)
            else:
                parts.append(f"epoch {self.epoch or 0}/{self.epochs or '?'}")
            if self.plan in (RESCORES, WAITS) and not (self.live and self.live.startswith("scoring")):
                parts.append(describe_plan(self.plan, self.waits_for))
        if self.val_metric is not None:   # a results row's metric is at the trial's own compression setting
            label = metric_label(self.metric_name, compressed=self.state not in (RUNNING, STOPPED))
            parts.append(f"{label} {self.val_metric:.2f}")
        if self.state == RUNNING and self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if self.error:
            parts.append(self.error)
        return ", ".join(parts)


@dataclass
class StudyStatus:
    name: str
    root: Path
    state: str                   # running, finished, stopped (resume it), or pending (nothing started yet)
    driver: str | None           # "pid P on host H since T" of the driver running it
    total: int
    pending: int
    trials: list[TrialStatus] = field(default_factory=list)
    front: pd.DataFrame = field(default_factory=pd.DataFrame)
    metric_name: str = "metric"
    elapsed_s: float | None = None
    eta_s: float | None = None
    answered: int = 0            # suggestions of the search the results answered, with no trial (this run)

    def counts(self) -> dict[str, int]:
        """Trials by `study.vocabulary` word, in its order."""
        out: dict[str, int] = {}
        for trial in self.trials:
            out[trial.state] = out.get(trial.state, 0) + 1
        out |= {PENDING: self.pending} if self.pending else {}
        return {word: out[word] for word in sorted(out, key=count_order)}

    def to_json(self) -> dict[str, Any]:
        front = json.loads(self.front.to_json(orient="records", date_format="iso")) if len(self.front) else []
        return {"study": self.name, "directory": str(self.root), "state": self.state, "driver": self.driver,
                "total": self.total, "counts": self.counts(), "pending": self.pending,
                "elapsed_s": self.elapsed_s, "eta_s": self.eta_s, "metric_name": self.metric_name,
                "answered": self.answered,
                "trials": [_plain(asdict(t)) for t in self.trials], "front": front}

    def to_table(self) -> str:
        counts = count_text(self.counts()) or "no trial yet"
        lines = [HEAD_LINE.format(name=self.name, root=self.root, state=self.state,
                                  driver=f", driver {self.driver}" if self.driver else ""),
                 COUNTS_LINE.format(total=self.total, counts=counts, elapsed=format_duration(self.elapsed_s),
                                    eta=f", ETA {format_duration(self.eta_s)}" if self.state == RUNNING else "")]
        if self.state == STOPPED:
            lines.append(f"  no driver runs it: continue with `g2-study resume {self.name} --storage "
                         f"{self.root.parent}`")
        if self.trials:
            ids = any(t.optuna_trial is not None or t.mlflow_run_id for t in self.trials)
            head = ("trial", *(("optuna", "mlflow run") if ids else ()), "state", "knobs", "detail")
            rows = [head] + [(t.trial_id, *((_text(t.optuna_trial), _text(t.mlflow_run_id)) if ids else ()),
                              t.state, t.knobs, t.detail()) for t in self.trials]
            widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
            lines += [""] + ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip()
                             for row in rows]
        if self.pending:
            lines.append(f"  … and {self.pending} pending trial(s), not asked for yet")
        if self.answered:
            lines.append(f"  {self.answered} suggestion(s) of the search answered from the results, with no trial")
        lines += ["", FRONT_LINE.format(front_word=front_word(self.state == "finished"), points=len(self.front))]
        lines.append(format_front(self.front, self.metric_name))
        return "\n".join(lines)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: None instead."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def driver_alive(info: DriverInfo) -> bool:
    """Whether the driver named in driver.json still runs: on this host by its pid and start time; a driver on
    another host cannot be checked from here and counts as alive (its claim stands until a takeover)."""
    if info.host != socket.gethostname():
        return True
    import psutil

    try:
        created = psutil.Process(info.pid).create_time()
    except psutil.Error:
        return False
    try:
        started = datetime.fromisoformat(info.started).timestamp()
    except ValueError:
        return True
    return created <= started + 2.0   # a pid reused by a later process started after the driver did


def study_status(storage: str, name: str, *, now: float | None = None, ids: bool = False) -> StudyStatus:
    """Where study `name` in `storage` stands (raises StudyStateError when there is no study there); with `ids`,
    each trial's Optuna trial number and MLflow run id (`study.links`), which opens both stores."""
    paths = StudyPaths.named(storage, name)
    state = read_state(paths)
    cfg = StudyConfig.from_json(state.config)
    now = time.time() if now is None else now
    info = DriverInfo.read(paths.root / CLAIM_FILE)
    alive = info is not None and driver_alive(info)
    df = results.load(str(paths.root))
    progress = read_progress(paths.root)

    trials = _finished_trials(df, progress)
    done = {t.trial_id for t in trials}
    live = read_live(paths.live) if alive else {}
    for p in progress.values():
        if p.trial_id in done or p.state != RUNNING:
            continue   # an end without a results file: the driver died between the two; resume records it
        now_at = live.get(p.trial_id)
        trials.append(TrialStatus(p.trial_id, RUNNING if alive else STOPPED, p.knobs, p.epoch, p.epochs, p.plan,
                                  p.waits_for, p.metric_name, p.val_metric, live=_live_text(now_at, p.epochs)))
    trials.sort(key=lambda t: t.trial_id)
    if ids:
        found = trial_ids(cfg, paths.root).set_index(TRIAL_ID)
        for trial in (t for t in trials if t.trial_id in found.index):
            number = found.at[trial.trial_id, "optuna_trial"]
            trial.optuna_trial = None if pd.isna(number) else int(number)
            trial.mlflow_run_id = found.at[trial.trial_id, "mlflow_run_id"]
    total = state.total_samples
    pending = 0 if state.finished else max(total - len(trials), 0)   # a search with nothing left to ask ends early
    state_word = RUNNING if alive else "finished" if state.finished else STOPPED if trials else PENDING

    starts = [p.started for p in progress.values() if p.started] + _started_from_results(df)
    last = max([p.updated for p in progress.values()] + _ended_by_trial(df), default=None)
    first = min(starts, default=None)
    elapsed = None if first is None else (now if alive else (last or first)) - first
    eta, left = driver_estimate(paths, info, now) if alive else (None, {})
    for trial in trials:
        if trial.state == RUNNING:
            trial.eta_s = left.get(trial.trial_id)
    front = study_front(df, cfg)
    front = front[[c for c in SHOWN if c in front.columns]] if len(front) else front
    metric = str(df["metric_name"].dropna().iloc[0]) if len(df) and df["metric_name"].notna().any() else "metric"
    return StudyStatus(name, paths.root, state_word, info.describe() if alive else None, total, pending, trials,
                       front.reset_index(drop=True), metric, elapsed, eta, SearchLog.read(paths.search_log).answered)


def _finished_trials(df: pd.DataFrame, progress: dict[str, TrialProgress]) -> list[TrialStatus]:
    """One TrialStatus per trial in the results, at its own compression setting's row."""
    if df.empty:
        return []
    own = df[df[IS_TRIAL_SETTING].fillna(True).astype(bool)].drop_duplicates(TRIAL_ID)
    out = []
    for row in own.to_dict("records"):
        status = str(row[STATUS])
        reused = status == OK and row.get(REUSED_CHECKPOINT) is True
        heard = progress.get(row[TRIAL_ID])
        metric = row.get(VAL_METRIC)
        out.append(TrialStatus(
            row[TRIAL_ID], REUSED if reused else status, describe_trial(_plain_row(row)),
            epoch=_int(row.get("epoch")), epochs=heard.epochs if heard else None, plan=heard.plan if heard else None,
            metric_name=str(row.get("metric_name") or ""), error=_str(row.get("error")),
            val_metric=float(metric) if metric is not None and not pd.isna(metric) else None))
    return out


def _plain_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if v is pd.NA else v for k, v in row.items()}


def _int(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _str(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else str(value)


def _live_text(live: LiveProgress | None, epochs: int | None) -> str | None:
    if live is None:
        return None
    return live.describe() if live.phase != "train" else f"epoch {live.epoch}/{epochs or '?'}: {live.describe()}"


def driver_estimate(paths: StudyPaths, info: DriverInfo, now: float) -> tuple[float | None, dict[str, float]]:
    """The ETAs the live driver shows (`study.board` writes them every few seconds), as of now: the study's and
    each running trial's."""
    try:
        estimate = json.loads(paths.estimate.read_text())
    except (FileNotFoundError, ValueError):
        return None, {}
    if estimate.get("pid") != info.pid:   # an earlier driver's
        return None, {}
    age = now - float(estimate["at"])
    trials = {t: max(float(s) - age, 0.0) for t, s in (estimate.get("trials") or {}).items() if s is not None}
    study = estimate.get("eta_s")
    return (None if study is None else max(float(study) - age, 0.0)), trials


def _ended_by_trial(df: pd.DataFrame) -> list[float]:
    if df.empty:
        return []
    return [t.timestamp() for t in df.drop_duplicates(TRIAL_ID)[FINISHED_AT].dropna()]


def _started_from_results(df: pd.DataFrame) -> list[float]:
    """When finished trials started, where no progress file says: their end less their training time."""
    if df.empty:
        return []
    rows = df.drop_duplicates(TRIAL_ID)
    wall = rows["wall_time_s"].astype("float64").fillna(0.0)
    return [end.timestamp() - w for end, w in zip(rows[FINISHED_AT], wall) if not pd.isna(end)]


# --------------------------------------------------------------------------- tables people read
