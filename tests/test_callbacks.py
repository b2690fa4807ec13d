"""The driver callback (study/callbacks.py) over a real trial's reports: what a restarted driver records again."""
from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from study import results
from study.callbacks import StudyCallback, open_tracker
from study.config import StudyConfig
from study.report import study_front


def tune_trial(trial_id: str, config: dict) -> SimpleNamespace:
    """The attributes of a Tune Trial that the callback reads (a real one needs a running Tune controller)."""
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=None, status="RUNNING", error_file=None)


def report(callback: StudyCallback, trial: SimpleNamespace, reports: list[dict]) -> None:
    for i, result in enumerate(reports, start=1):
        trial.last_result = {**result, "training_iteration": i}
        callback.on_trial_result(i, [trial], trial, trial.last_result)


def run(callback: StudyCallback, trial: SimpleNamespace, reports: list[dict]) -> None:
    callback.on_trial_start(0, [trial], trial)
    report(callback, trial, reports)
    trial.status = "TERMINATED"
    callback.on_trial_complete(len(reports), [trial], trial)


def test_a_restarted_driver_keeps_what_an_earlier_one_recorded(trial, tmp_path, caplog):
    config, reports = trial
    diverged = {**reports[0], "epoch": 2, "status": "diverged", "error": "non-finite loss", "done": True,
                "val_metric": math.nan, "compressed_val_metric": math.nan}
    cfg = StudyConfig(name="s", preset="tiny")
    open_tracker(cfg, str(tmp_path)).start(cfg.to_flat())   # as the driver does before Tune starts
    lines: list[str] = []
    first = StudyCallback(cfg, str(tmp_path), total=4, printer=lines.append, quiet=True)   # the end lines only
    saved = pickle.dumps(first)   # Tune saves the callbacks with the experiment, before any trial runs
    for trial_id in ("t1", "t3"):
        run(first, tune_trial(trial_id, config), reports)
    run(first, tune_trial("t4", config), [reports[0], diverged])
    # t2 finished and its results were written, then the driver died before it closed the MLflow run
    t2 = tune_trial("t2", config)
    first.on_trial_start(0, [t2], t2)
    report(first, t2, reports)
    first.writer.record_end("t2", config)
    files = sorted(tmp_path.glob("*/t*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]

    # Tune runs all four again: t1 at its final checkpoint (it says its last report again), t2 from scratch
    # (the model store makes it a re-scoring), t3 fails this time, t4 diverges again from its epoch-1 checkpoint
    restored, lines[:] = pickle.loads(saved), []
    restored.printer = lines.append
    run(restored, tune_trial("t1", config), [reports[-1]])
    run(restored, tune_trial("t2", config), [{**reports[-1], "reused_checkpoint": True, "train_time_s": 0.0}])
    t3 = tune_trial("t3", config)
    t3.error_file = tmp_path / "error.txt"
    t3.error_file.write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    restored.on_trial_start(0, [t3], t3)
    report(restored, t3, reports[:1])
    restored.on_trial_error(1, [t3], t3)
    run(restored, tune_trial("t4", config), [diverged])

    assert [f.stat().st_mtime_ns for f in files] == stamps          # nothing rewritten
    assert "t3, run again after a restart, failed (RuntimeError: CUDA out of memory)" in caplog.text
    df = results.load(tmp_path)
    assert len(df) == 3 * len(reports[-1]["sweep"]) + 1
    assert [line.split()[1:4] for line in lines] == [["1/4]", "t1", "ok"], ["2/4]", "t2", "ok"], ["3/4]", "t3", "ok"],
                                                     ["4/4]", "t4", "diverged"]]
    assert all("-> recorded before the restart | " in line for line in lines)
    front = len(study_front(df, cfg))      # what the study prints when it closes
    assert front >= 1 and lines[-1].endswith(f"front: {front} point(s)")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    runs = {r.data.tags["g2.trial_id"]: r for r in client.search_runs([experiment.experiment_id],
                                                                       "tags.`g2.role` = 'trial'")}
    assert sorted(runs) == ["t1", "t2", "t3", "t4"]
    assert {t: (r.info.status, r.data.tags["g2.status"]) for t, r in runs.items()} == {
        "t1": ("FINISHED", "ok"), "t2": ("FINISHED", "ok"), "t3": ("FINISHED", "ok"), "t4": ("FAILED", "diverged")}
    for trial_id, r in runs.items():   # one value per epoch: nothing was logged twice
        assert len(client.get_metric_history(r.info.run_id, "val_metric")) == len(reports), trial_id
