"""ETAs from what the driver knows (study/eta.py), replayed over recorded and constructed study timelines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from study.eta import (
    SCORE_COST,
    Pace,
    PaceMeter,
    RunningTrial,
    TrialShape,
    passing_epoch_s,
    running_left,
    schedule_s,
    study_eta,
)
from study.live import LiveProgress
from study.progress import RESCORES, TRAINS, WAITS, TrialProgress

RECORDED = Path(__file__).parent / "data" / "quickstart_timeline.json"


def replay(timeline: dict, at: float) -> float | None:
    """The ETA a driver computes at time `at` from the events before it (benchmarks/record_timeline.py's)."""
    meter, running, shapes, lives, ended = PaceMeter(), {}, {}, {}, 0
    for event in timeline["events"]:
        if event["t"] > at:
            break
        trial = event.get("trial")
        if event["kind"] == "start":
            running[trial] = TrialProgress(trial, "", event["plan"], event.get("waits_for"), epochs=event["epochs"],
                                           started=event["t"], updated=event["t"])
            shapes[trial] = TrialShape(*event["shape"])
            meter.started(trial, event["t"])
        elif event["kind"] == "live" and trial in running:
            lives[trial] = LiveProgress(**event["live"])
            meter.saw(trial, lives[trial])
        elif event["kind"] == "epoch" and trial in running:
            progress = running[trial]
            progress.epoch, progress.epoch_time_s, progress.updated = event["epoch"], event["epoch_time_s"], event["t"]
            meter.epoch(trial, event["epoch"], event["epoch_time_s"], lives.get(trial), event["t"])
        elif event["kind"] == "end" and trial in running:
            meter.ended(trial, ok=event["status"] in ("ok", "reused"), reused=event["reused"],
                        rows=shapes[trial].settings, live=lives.pop(trial, None), now=event["t"])
            del running[trial]
            ended += 1
    trials = [RunningTrial(p, lives.get(t), shapes[t]) for t, p in running.items()]
    left = running_left(trials, meter.pace, at, meter.train_rate)
    pending = timeline["total"] - ended - len(running)
    base = next(iter(shapes.values()), TrialShape(1, 1))
    return study_eta(left, pending, base, meter.pace, timeline["slots"], meter.train_rate,
                     passing_epoch_s(trials, meter.pace), [t.progress.plan for t in trials])


def ends_within(timeline: dict, start_after_s: float, tolerance: float) -> list[tuple[float, float, float]]:
    """(seconds in, ETA, time the study then took) every 10 s from `start_after_s` on, where the ETA misses by
    more than `tolerance`."""
    first = timeline["events"][0]["t"]
    end = max(e["t"] for e in timeline["events"] if e["kind"] == "end")
    misses, at = [], first + start_after_s
    while at < end - 10:
        eta, left = replay(timeline, at), end - at
        if eta is None or abs(eta - left) > tolerance * left:
            misses.append((round(at - first), eta, round(left)))
        at += 10
    return misses


@pytest.mark.skipif(not RECORDED.exists(), reason="no recorded timeline")
def test_the_recorded_quickstart_eta_holds_within_30_percent_after_the_first_minute():
    timeline = json.loads(RECORDED.read_text())
    assert ends_within(timeline, 60, 0.30) == []
    assert replay(timeline, timeline["events"][0]["t"] + 1) is None   # before anything is measured: "?"


def constructed(trials: list[tuple[str, float, float]], slots: int, start_s: float = 10.0, epoch_s: float = 60.0,
                epochs: int = 2, rows: int = 20, row_s: float = 1.5, batches: int = 100) -> dict:
    """A study's events as the recorder writes them: `trials` (id, plan, when asked) run `slots` at a time; one
    that trains takes `start_s`, `epochs` × `epoch_s` (90 % of it the training pass) and its sweep; one that
    re-scores takes its start and its sweep. Live files every 2 s. Each sweep row reads tokens that the rule of
    study.eta (SCORE_COST of a trained token) prices 25 % above what they take."""
    events, free = [], [0.0] * slots
    rate = 1000 * batches / (0.9 * epoch_s)
    tokens = round(1.25 * row_s * rate / SCORE_COST)
    for trial_id, plan, asked in trials:
        slot = min(range(slots), key=lambda i: free[i])
        t = max(free[slot], asked)
        events.append({"t": t, "kind": "start", "trial": trial_id, "plan": plan, "epochs": epochs,
                       "shape": [epochs, rows, tokens]})
        t += start_s
        if plan == TRAINS:
            for epoch in range(1, epochs + 1):
                pass_s = 0.9 * epoch_s
                for k in range(0, int(pass_s) + 1, 2):
                    done = min(round(batches * k / pass_s), batches)
                    events.append({"t": t + k, "kind": "live", "trial": trial_id, "live": {
                        "trial_id": trial_id, "phase": "train", "done": done, "total": batches, "epoch": epoch,
                        "tokens": done * 1000, "phase_started": t, "updated": t + k}})
                t += epoch_s
                if epoch < epochs:
                    events.append({"t": t, "kind": "epoch", "trial": trial_id, "epoch": epoch, "epoch_time_s": epoch_s})
        sweep_start = t
        for k in range(0, int(rows * row_s) + 1, 2):
            events.append({"t": t + k, "kind": "live", "trial": trial_id, "live": {
                "trial_id": trial_id, "phase": "score", "done": min(int(k / row_s), rows), "total": rows,
                "epoch": epochs, "tokens": 0, "phase_started": sweep_start, "updated": t + k}})
        t += rows * row_s
        if plan == TRAINS:
            events.append({"t": t, "kind": "epoch", "trial": trial_id, "epoch": epochs, "epoch_time_s": epoch_s})
        events.append({"t": t, "kind": "end", "trial": trial_id, "status": "ok", "reused": plan != TRAINS})
        free[slot] = t
    events.sort(key=lambda e: e["t"])
    return {"slots": slots, "total": len(trials), "events": events}


def test_a_constructed_study_with_re_scoring_trials_keeps_its_eta():
    """Six trials on two slots, two of them re-scoring a stored model. Until a re-scoring trial starts, nothing
    says a pending trial will not train: the ETA counts them all as trainings and runs long, never short. From
    then on it counts pending trials at the share of trainings it has seen, and holds within 30 %."""
    study = constructed([("a", TRAINS, 0), ("b", TRAINS, 0), ("c", RESCORES, 0), ("d", TRAINS, 0),
                         ("e", RESCORES, 0), ("f", TRAINS, 0)], slots=2)
    seen = next(e["t"] for e in study["events"] if e["kind"] == "start" and e["plan"] == RESCORES)
    end = max(e["t"] for e in study["events"])
    assert all(replay(study, at) >= end - at for at in range(30, int(seen), 10))
    assert ends_within(study, seen, 0.30) == []


def test_schedule_fills_the_first_free_slot():
    assert schedule_s([10.0, 50.0], [30.0, 30.0], slots=2) == 70.0      # 10+30, then 40+30
    assert schedule_s([], [30.0] * 4, slots=2) == 60.0
    assert schedule_s([100.0], [], slots=4) == 100.0


def test_what_a_running_trial_has_left_follows_its_plan():
    pace = Pace(starts=[10.0], epochs=[60.0], validations=[6.0], setting_s=[1.5])
    shape = TrialShape(epochs=2, settings=20)
    training = TrialProgress("a", "", TRAINS, epochs=2, started=0.0)
    live = LiveProgress("a", phase="train", done=50, total=100, epoch=1, tokens=5000, phase_started=10.0,
                        updated=37.0)
    # half of a 54 s pass left, its validation, a second epoch, a 30 s sweep
    left = running_left([RunningTrial(training, live, shape)], pace, now=37.0)["a"]
    assert left == pytest.approx(27.0 + 6.0 + 60.0 + 30.0)
    waiting = TrialProgress("w", "", WAITS, "a", epochs=2, started=30.0)
    both = running_left([RunningTrial(waiting, None, shape), RunningTrial(training, live, shape)], pace, now=37.0)
    assert both["w"] == pytest.approx(left + 30.0 + 3.0)   # its start's rest, the trainer's time, its sweep
    rescoring = TrialProgress("r", "", RESCORES, epochs=2, started=37.0)
    assert running_left([RunningTrial(rescoring, None, shape)], pace, now=37.0)["r"] == pytest.approx(10.0 + 30.0)
    nothing = running_left([RunningTrial(training, None, shape)], Pace(), now=1.0)
    assert nothing == {"a": None} and study_eta(nothing, 0, shape, Pace(), 2) is None
