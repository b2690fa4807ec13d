"""The study's convergence curves on the MLflow parent run (study/convergence.py): fixed reference, exact volumes."""
from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from study import results
from study.config import StudyConfig
from study.convergence import (
    FRONT_SIZE,
    HYPERVOLUME,
    REFERENCE_TAG,
    TRIALS_DONE,
    TRIALS_FAILED,
    ConvergenceLog,
    convergence_metrics,
    hypervolume_reference,
)
from study.paths import StudyPaths
from study.results.rows import trial_rows
from study.tracking import StudyTracker
from trainables.report import EpochReport

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
T0 = datetime(2026, 1, 2, tzinfo=UTC)
GATE_PARAMS = 1000


def report_of(tune_dict: dict) -> EpochReport:
    """A report as the driver types it (`study.trial_end.TrialLedger.report`)."""
    return EpochReport.from_dict(tune_dict)


def rows(trial_id: str, minute: int, points, *, uncompressed: float, status: str = "ok") -> list[dict]:
    """Results rows of one trial: `points` are (bits, gate_bits, val_metric) of its sweep."""
    base = {"trial_id": trial_id, "status": status, "finished_at": T0 + timedelta(minutes=minute),
            "training_key": trial_id, "g2.eval_gate": "soft", "compress.rank": 0, "compress.paper": "none",
            "compress.step": 0.2, "compress.clip": 0.4, "compress.targets": "both", "gate_params": GATE_PARAMS,
            "model_params": 5000, "uncompressed_val_metric": uncompressed, "is_trial_setting": False}
    return [{**base, "compress.bits": b, "gate_bits": g, "val_metric": v, "is_trial_setting": i == 0}
            for i, (b, g, v) in enumerate(points)]


def area_oracle(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact dominated area by coordinate compression: every grid cell below ref is counted if some point dominates it."""
    xs, ys = np.unique(np.r_[points[:, 0], ref[0]]), np.unique(np.r_[points[:, 1], ref[1]])
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if x1 <= ref[0] and y1 <= ref[1] and ((points[:, 0] <= x0) & (points[:, 1] <= y0)).any():
            area += (x1 - x0) * (y1 - y0)
    return area


def test_reference_is_fixed_by_the_first_ok_trial_and_the_volume_is_exact():
    cfg = StudyConfig()   # minimise compressed perplexity and gate bits
    first = rows("t1", 1, [(32, 32000, 100.0), (4, 4000, 130.0)], uncompressed=100.0)
    better = rows("t2", 2, [(32, 32000, 80.0), (4, 4000, 90.0), (2, 2000, 150.0)], uncompressed=80.0)
    failed = [{**rows("t3", 3, [(4, 4000, float("nan"))], uncompressed=float("nan"))[0], "status": "error"}]
    df = pd.DataFrame(first + better + failed)

    reference = hypervolume_reference(df[df["status"] == "ok"], cfg)
    assert reference == {"val_metric": 200.0, "gate_bits": 32.0 * GATE_PARAMS}   # the first trial's, not the best
    step, metrics = convergence_metrics(df, cfg, reference)
    assert step == 3 and metrics[TRIALS_DONE] == 3 and metrics[TRIALS_FAILED] == 1
    # the front: (4000, 90), (2000, 150) and the uncompressed (32000, 80), which adds no volume
    assert metrics[FRONT_SIZE] == 3
    front = np.array([[4000, 90.0], [2000, 150.0], [32000, 80.0], [32000, 100.0], [4000, 130.0]])
    expected = area_oracle(front[:, ::-1], np.array([200.0, 32000.0]))
    assert metrics[HYPERVOLUME] == pytest.approx(expected) == pytest.approx((32000 - 4000) * (200 - 90)
                                                                            + (4000 - 2000) * (200 - 150))
    assert {k: v for k, v in metrics.items() if k.startswith("best_")} == {
        "best_val_metric/32bit": 80.0, "best_val_metric/4bit": 90.0, "best_val_metric/2bit": 150.0}

    # a worse trial cannot lower the volume: the reference does not follow the rows
    worse = rows("t4", 4, [(4, 4000, 190.0)], uncompressed=180.0)
    _, later = convergence_metrics(pd.DataFrame(first + better + failed + worse), cfg, reference)
    assert later[HYPERVOLUME] == metrics[HYPERVOLUME]


def test_bleu_and_compression_objectives_have_their_own_references():
    cfg = StudyConfig(task="nmt", preset="default", objectives=("compressed_val_metric", "gate_compression"))
    ok = pd.DataFrame(rows("t1", 1, [(4, 4000, 20.0)], uncompressed=25.0))
    assert hypervolume_reference(ok, cfg) == {"val_metric": 0.0, "gate_compression": 1.0}
    assert hypervolume_reference(ok.iloc[:0], cfg) is None


def test_the_parent_run_charts_each_finished_trial_and_keeps_the_front(trial, tmp_path):
    config, reports = trial
    root = tmp_path / "study"
    cfg = StudyConfig(name="conv", preset="tiny")
    paths = StudyPaths(root)
    tracker = StudyTracker(paths.tracking_uri(cfg), "conv", "conv", paths.artifact_location(cfg))
    parent = tracker.start({}, tags={})
    log = ConvergenceLog(cfg, str(root), artifact_interval_s=3600)
    assert log.update(tracker) == {}   # nothing finished yet: nothing charted

    results.write_trial(root, "t1", trial_rows("conv", "t1", config, report_of(reports[-1]), status="ok", error=None,
                                                finished_at=T0))
    first = log.update(tracker)
    results.write_trial(root, "t2", trial_rows("conv", "t2", config, None, status="error", error="boom",
                                                finished_at=T0 + timedelta(minutes=1)))
    log.update(tracker)
    again = ConvergenceLog(cfg, str(root))   # a resumed driver reads the reference back from the parent run
    results.write_trial(root, "t3", trial_rows("conv", "t3", config, report_of(reports[-1]), status="ok", error=None,
                                                finished_at=T0 + timedelta(minutes=2)))
    third = again.update(tracker)

    client = MlflowClient(tracking_uri=paths.tracking_uri(cfg))
    run = client.get_run(parent)
    own_gates = next(r for r in reports[-1]["sweep"] if r["is_trial_setting"]).get("g2.eval_gate")
    plain = next(r for r in reports[-1]["sweep"] if r["method"] == "none" and r.get("g2.eval_gate") == own_gates)
    reference = json.loads(run.data.tags[REFERENCE_TAG])
    assert reference == {"val_metric": pytest.approx(2 * plain["val_metric"]),
                         "gate_bits": 32.0 * plain["gate_params"]}
    assert [(m.step, m.value) for m in client.get_metric_history(parent, TRIALS_DONE)] == [(1, 1), (2, 2), (3, 3)]
    assert [m.value for m in client.get_metric_history(parent, TRIALS_FAILED)] == [0, 1, 1]
    volumes = [m.value for m in client.get_metric_history(parent, HYPERVOLUME)]
    assert volumes[0] > 0 and volumes == [first[HYPERVOLUME]] * 3 == [third[HYPERVOLUME]] * 3   # t3 repeats t1
    bits = {r["compress.bits"] for r in reports[-1]["sweep"] if r["compress.paper"] == "none"}
    assert {f"best_val_metric/{b}bit" for b in bits} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"pareto_front.csv", "pareto_front.png"} <= artifacts
    front = pd.read_csv(Path(client.download_artifacts(parent, "pareto_front.csv", str(tmp_path))))
    assert len(front) == first[FRONT_SIZE] and set(front["trial_id"]) == {"t1"}
