"""MLflow tracking (study/tracking.py) on a real SQLite store: one parent per study, one child per trial, resumes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from study import mlflow_values, tracking
from study.config import StudyConfig
from study.paths import StudyPaths
from study.tracking import StudyTracker
from study.trial_end import TrialEnd
from trainables.report import EpochReport

EXPERIMENT = "g2-tests"
# MLflow's own SQLAlchemy models, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One SQLite store for the module (creating its tables costs a second or two)."""
    paths, cfg = StudyPaths(tmp_path_factory.mktemp("study")), StudyConfig()
    uri = paths.tracking_uri(cfg)
    return {"uri": uri, "artifacts": paths.artifact_location(cfg), "dir": paths.root,
            "client": MlflowClient(tracking_uri=uri)}


def tracker(store, study: str) -> StudyTracker:
    return StudyTracker(store["uri"], EXPERIMENT, study, store["artifacts"])


def epoch_report(epoch: int) -> dict:
    """What run_trial reports per epoch (two layers), with Ray's own bookkeeping keys added by Tune."""
    gates = {f"gate_l{k}_{g}_{w}": 0.1 * epoch for k in range(2) for g in "if" for w in ("lt01", "gt09")}
    return {"metric_name": "ppl", "device": "cpu", "training_key": "abc", "epoch": epoch, "status": "running",
            "done": False, "train_loss": 4.0 - epoch, "train_ppl": math.exp(4.0 - epoch), "val_loss": 4.1 - epoch,
            "val_ppl": 60.0 / epoch, "val_metric": 60.0 / epoch, "compressed_val_metric": 61.0 / epoch,
            "gate_params": 6272, "gate_bits": 200704, "model_params": 13767, "model_bits": 440544,
            "gate_compression": 1.0, "model_compression": 1.0, "relative_error": 0.0, **gates,
            "gate_histograms": {"l0_i": [0.1] * 10, "l0_f": [0.1] * 10}, "epoch_time_s": 0.5,
            "train_time_s": 0.5 * epoch, "training_iteration": epoch, "timestamp": 1_700_000_000, "pid": 123}


def final_report(epoch: int = 2) -> dict:
    sweep = [{"compress.rank": r, "compress.bits": b, "compress.paper": "none", "method": m, "is_trial_setting": r == 0,
              "gate_params": 6272, "gate_bits": 200704 // c, "model_params": 13767, "model_bits": 440544 // c,
              "gate_compression": float(c), "model_compression": 1.0 + c / 10, "relative_error": 0.01 * c,
              "val_loss": 3.4, "val_ppl": 30.0 + c, "val_metric": 30.0 + c, "test_loss": 3.5, "test_ppl": 31.0 + c,
              "test_metric": 31.0 + c}
             for r, b, m, c in ((0, 32, "none", 1), (0, 4, "quant", 8), (8, 32, "svd", 2))]
    return {**epoch_report(epoch), "status": "ok", "done": True, "best_epoch": epoch, "test_metric": 31.0,
            "compressed_test_metric": 31.0, "sweep": sweep}


def ended(trial_id: str, status: str, report: dict | None, error: str | None = None) -> TrialEnd:
    """A trial's end as the driver's ledger decides it, here given (its results rows are the results' business)."""
    return TrialEnd(trial_id, status, error, EpochReport.from_dict(report) if report else None, rows=())


def children(store, parent_id: str) -> list:
    return store["client"].search_runs([store["client"].get_experiment_by_name(EXPERIMENT).experiment_id],
                                       f"tags.`mlflow.parentRunId` = '{parent_id}'")


def artifacts(store, run_id: str) -> set[str]:
    return {a.path for a in store["client"].list_artifacts(run_id)}


def test_default_uri_and_artifacts_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = StudyPaths.named("rel", "s")
    uri = paths.tracking_uri(StudyConfig())
    assert uri == f"sqlite:///{(tmp_path / 'rel' / 's' / 'mlflow.db').resolve().as_posix()}"
    assert uri.startswith("sqlite:////")
    assert paths.artifact_location(StudyConfig()) == (tmp_path / "rel" / "s" / "mlartifacts").resolve().as_uri()
    assert paths.artifact_location(StudyConfig(tracking_uri="http://127.0.0.1:5000")) is None


def test_parent_children_metrics_and_artifacts(store, tmp_path):
    t = tracker(store, "study-a")
    long_value = list(range(3000))   # ~15000 characters as JSON: over MLflow's 6000
    parent = t.start({"study": {"name": "study-a", "num_samples": 4}, "space": {"g2.tau": long_value}},
                     tags={"g2.task": "lm"})
    client = store["client"]
    run = client.get_run(parent)
    assert run.data.tags["g2.study"] == "study-a" and run.data.tags["g2.role"] == "parent"
    assert run.data.tags["g2.task"] == "lm" and "g2.package_version" in run.data.tags
    assert run.data.params["study.num_samples"] == "4"
    assert len(run.data.params["space.g2.tau"]) == 6000 and run.data.params["space.g2.tau"].endswith("[truncated]")
    assert run.info.artifact_uri.startswith((store["dir"] / "mlartifacts").as_uri())

    ok = t.trial_run_id("trial_00000", {"g2.tau": 0.5, "sweep.ranks": (0, 8), "_driver_only": "/x"})
    for epoch in (1, 2):
        report = epoch_report(epoch) if epoch == 1 else final_report(2)
        t.log_epoch("trial_00000", EpochReport.from_dict(report))
    t.end_trial(ended("trial_00000", "ok", final_report(2)))
    bad = t.trial_run_id("trial_00001", {"g2.tau": 0.1})
    t.log_epoch("trial_00001", EpochReport.from_dict(epoch_report(1)))
    t.end_trial(ended("trial_00001", "error", None, error="ValueError: boom"))

    assert {r.info.run_id for r in children(store, parent)} == {ok, bad}
    run = client.get_run(ok)
    assert run.info.status == "FINISHED" and run.data.tags["g2.status"] == "ok"
    assert run.data.tags["g2.trial_id"] == "trial_00000" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"g2.tau": "0.5", "sweep.ranks": "[0, 8]"}
    history = client.get_metric_history(ok, "val_metric")
    assert [(m.step, m.value) for m in history] == [(1, 60.0), (2, 30.0)]   # the final report is not logged twice
    assert [m.step for m in client.get_metric_history(ok, "gate_l1_f_gt09")] == [1, 2]
    assert client.get_metric_history(ok, "test_metric")[0].value == 31.0
    assert not {"pid", "timestamp", "training_iteration", "done", "status", "gate_histograms",
                "epoch"} & set(run.data.metrics)
    assert artifacts(store, ok) == {"compression_table.csv", "compression_table.json", "gate_histograms.json"}
    table = pd.read_csv(Path(client.download_artifacts(ok, "compression_table.csv", str(tmp_path))))
    assert list(table["method"]) == ["none", "quant", "svd"] and table["gate_bits"].tolist() == [200704, 25088, 100352]
    hist = json.loads(Path(client.download_artifacts(ok, "gate_histograms.json", str(tmp_path))).read_text())
    assert hist["l0_i"] == [0.1] * 10

    run = client.get_run(bad)
    assert run.info.status == "FAILED" and run.data.tags["g2.status"] == "error"
    assert run.data.tags["g2.error"] == "ValueError: boom"
    assert mlflow.active_run() is None   # nothing global was touched


def test_resume_reuses_the_parent_and_child_runs(store):
    first = tracker(store, "study-b")
    parent = first.start({"num_samples": 2}, tags={})
    child = first.trial_run_id("trial_00000", {"g2.tau": 0.5})
    first.log_epoch("trial_00000", EpochReport.from_dict(epoch_report(1)))
    first.end("interrupted")

    with pytest.raises(RuntimeError, match="no parent run yet"):
        tracker(store, "study-never-started").attach()
    again = tracker(store, "study-b")   # a resumed driver: nothing in memory
    assert again.start({"num_samples": 3}, tags={}) == parent
    assert tracker(store, "study-b").attach() == parent   # its callback, its closing report
    assert again.trial_run_id("trial_00000", {"g2.tau": 0.5}) == child
    again.log_epoch("trial_00000", EpochReport.from_dict(epoch_report(2)))
    again.end_trial(ended("trial_00000", "ok", final_report(2)))

    client = store["client"]
    assert [r.info.run_id for r in children(store, parent)] == [child]
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([experiment], "tags.`g2.study` = 'study-b' AND tags.`g2.role` = 'parent'")
    assert [r.info.run_id for r in parents] == [parent]
    assert client.get_run(parent).data.params["num_samples"] == "2"   # MLflow keeps the first value
    assert client.get_run(parent).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(child, "val_metric")] == [1, 2]


def test_stale_children_are_marked_killed(store):
    crashed = tracker(store, "study-c")
    crashed.start({}, tags={})
    stale = crashed.trial_run_id("trial_00000", {})
    active = crashed.trial_run_id("trial_00001", {})
    done = crashed.trial_run_id("trial_00002", {})
    crashed.end_trial(ended("trial_00002", "pruned", epoch_report(1)))

    resumed = tracker(store, "study-c")
    resumed.start({}, tags={})
    assert resumed.mark_stale_runs(active_trials=["trial_00001"]) == [stale]
    client = store["client"]
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(active).info.status == "RUNNING"
    assert client.get_run(done).info.status == "FINISHED" and client.get_run(done).data.tags["g2.status"] == "pruned"
    assert resumed.trial_run_id("trial_00000", {}) == stale   # resumed later: the same run, open again
    assert client.get_run(stale).info.status == "RUNNING"


def test_studies_in_one_process_are_separate_and_end_logs_the_front(store, tmp_path):
    one, two = tracker(store, "study-d1"), tracker(store, "study-d2")
    p1, p2 = one.start({"seed": 1}, tags={}), two.start({"seed": 2}, tags={})
    assert p1 != p2
    c1 = one.trial_run_id("trial_00000", {})
    c2 = two.trial_run_id("trial_00000", {})   # Ray reuses trial ids across experiments
    assert c1 != c2 and [r.info.run_id for r in children(store, p2)] == [c2]

    figure = tmp_path / "pareto_front.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n")
    front = pd.DataFrame({"trial_id": ["trial_00000"], "val_metric": [30.0], "gate_bits": [25088]})
    one.end("ok", front, figure)
    run = store["client"].get_run(p1)
    assert run.info.status == "FINISHED" and run.data.tags["g2.status"] == "ok"
    assert {"pareto_front.csv", "pareto_front.png", "study_config.json"} <= artifacts(store, p1)
    with pytest.raises(ValueError, match="status"):
        two.end("done-ish")


def test_metric_names_and_values_are_made_valid():
    metrics = mlflow_values.valid_metrics({"val ppl": 1, "a/b": 2.0, "bad*name": 3, "flag": True, "text": "x",
                                           "nan": math.nan, "rows": [1], "none": None})
    assert set(metrics) == {"val ppl", "a/b", "bad_name", "nan"} and math.isnan(metrics["nan"])


def test_the_experiment_is_model_training_and_runs_are_named_by_what_they_are(store):
    t = tracker(store, "study-e")
    client = store["client"]
    experiment = client.get_experiment(t.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = tracking.runs_view_url("http://127.0.0.1:5000/", t.experiment_id)
    assert view == (f"http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs?searchFilter=tags.%60g2.role%60%20"
                    "%3D%20%27trial%27&orderByKey=metrics.%60val_metric%60&orderByAsc=true")
    assert t.run_url("http://h:1", "abc") == f"http://h:1/#/experiments/{t.experiment_id}/runs/abc"
    t.start({}, tags={})
    g2 = {"g2.gate_mode": "g2", "g2.tau": 0.6312, "g2.p": 0.587, "compress.rank": 16, "compress.bits": 4,
          "compress.paper": "none"}
    trained = t.trial_run_id("trial_00000", g2, optuna_number=7)
    reused = t.trial_run_id("trial_00001", {**g2, "g2.gate_mode": "lstm", "compress.rank": 0, "compress.bits": 32,
                                            "compress.paper": "round_clip"})
    unnamed = t.trial_run_id("trial_00002", {})
    t.end_trial(ended("trial_00000", "ok", final_report(2)))
    t.end_trial(ended("trial_00001", "ok", {**final_report(2), "reused_checkpoint": True}))
    t.end_trial(ended("trial_00001", "ok", {**final_report(2), "reused_checkpoint": True}))   # ended twice: named once

    assert client.get_run(trained).info.run_name == "g2 τ0.63 p0.59 · r16 b4"
    assert client.get_run(trained).data.tags["g2.model"] == "trained"
    assert client.get_run(trained).data.tags["g2.optuna_trial"] == "7"
    assert client.get_run(reused).info.run_name == "lstm · r0 b32 round_clip · reused"
    assert client.get_run(reused).data.tags["g2.model"] == "reused"
    assert client.get_run(reused).data.tags["g2.training_key"] == "abc"
    assert client.get_run(unnamed).info.run_name == "trial_00002"
    assert tracking.find_experiment_id(store["uri"], "no-such-experiment") is None
    assert t.find_trial_run_id("trial_00001") == reused and t.find_trial_run_id("trial_00009") is None


def test_an_experiment_made_before_the_kind_tag_gets_it(store):
    store["client"].create_experiment("old-experiment")
    t = StudyTracker(store["uri"], "old-experiment", "old", store["artifacts"])
    assert store["client"].get_experiment(t.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_child_names_lead_with_what_differs_and_stay_apart_in_twenty_characters():
    """Siblings' names differ within what the runs table shows of them (about 20 characters), for the spaces a
    study searches: the default one (gate mode, τ, p), the quickstart's (the gate mode alone), rank and bits."""
    import optuna

    from study.config import StudyConfig
    from study.space import DefineByRun, parse_space

    assert tracking.trial_run_name({"g2.gate_mode": "g2", "g2.tau": 0.9, "g2.p": 0.2, "compress.rank": 16,
                                    "compress.bits": 2, "compress.paper": "none"},
                                   searched=("compress.rank", "compress.bits")) == "r16 b2 · g2 τ0.90 p0.20"
    assert tracking.trial_run_name({"g2.gate_mode": "lstm", "g2.tau": 0.9, "g2.p": 0.2, "compress.rank": 0,
                                    "compress.bits": 32}, searched=("g2.gate_mode",)) == "lstm · r0 b32"   # no τ, p
    spaces = {"default": None, "ranks and bits": {"compress.rank": {"choices": [0, 8, 16, 64]},
                                                  "compress.bits": {"choices": [2, 4, 8]}}}
    for label, space in spaces.items():
        cfg = StudyConfig(name="n", preset="tiny", space=parse_space(space or {}))
        searched = [p.name for p in cfg.search_space()]
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        names, points = set(), set()
        for _ in range(12):
            trial = study.ask()
            DefineByRun(cfg.search_space(), {})(trial)
            config = {**cfg.base_trial().to_flat(), **trial.params}
            point = tuple(round(config[k], 2) if isinstance(config[k], float) else config[k] for k in searched)
            if point in points:
                continue   # the same searched values: the same model, re-scored, not a sibling to tell apart
            points.add(point)
            name = tracking.trial_run_name(config, searched)
            assert name[:20] not in names, (label, name, names)
            names.add(name[:20])
