"""The driver callback (study/callbacks.py) over a real trial's reports: what a restarted driver records again."""
from __future__ import annotations

import math
import pickle
from collections import Counter
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from study import results
from study.callbacks import StudyCallback, open_tracker
from study.config import StudyConfig
from study.convergence import ConvergenceLog
from study.front import study_front


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


def pickled_by_an_earlier_version(cfg: StudyConfig, root: str) -> bytes:
    """A StudyCallback as an earlier version pickled it: its class by name, with its whole driver state."""
    old_state = {"cfg": cfg, "root": root, "total": 4, "printer": print, "quiet": True, "_writer": None,
                 "_tracker": None, "_console": None, "_front": 0, "_progress": {}, "_keys": {}, "_started": None,
                 "_ended_earlier": 0, "_carried": 0.0, "_statuses": Counter(), "_ok_rows": [], "_earlier": {},
                 "_measured": {}, "convergence": ConvergenceLog(cfg, root)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StudyCallback, "__getstate__", lambda self: old_state)
        return pickle.dumps(StudyCallback(cfg, root, total=4))


def test_a_callback_saved_by_an_earlier_version_resumes_and_records(trial, tmp_path):
    config, reports = trial
    cfg = StudyConfig(name="s", preset="tiny")
    open_tracker(cfg, str(tmp_path)).start(cfg.to_flat())
    saved = pickled_by_an_earlier_version(cfg, str(tmp_path))
    assert b"_ok_rows" in saved and b"study.callbacks" in saved
    restored = pickle.loads(saved)
    assert type(restored) is StudyCallback and set(restored.__getstate__()) == {"cfg", "root", "total", "printer",
                                                                                "quiet"}
    restored.printer = (lines := []).append
    run(restored, tune_trial("t1", config), reports)
    assert results.load(tmp_path)["status"].unique().tolist() == ["ok"]
    assert lines[0].split()[1:4] == ["1/4]", "t1", "ok"]


def diverged_report(reports: list[dict]) -> dict:
    return {**reports[0], "epoch": 2, "status": "diverged", "error": "non-finite loss", "done": True,
            "val_metric": math.nan, "compressed_val_metric": math.nan}


@pytest.fixture(scope="module")
def first_driver(trial, tmp_path_factory):
    """A driver that recorded four trials and died: t1, t3 ok and t4 diverged, all closed; t2 ok, its results
    written, its MLflow run left open. Returns the callback as Tune saved it (before any trial ran) and the files."""
    config, reports = trial
    root = tmp_path_factory.mktemp("first_driver")
    cfg = StudyConfig(name="s", preset="tiny")
    open_tracker(cfg, str(root)).start(cfg.to_flat())   # as the driver does before Tune starts
    first = StudyCallback(cfg, str(root), total=4, printer=[].append, quiet=True)   # the end lines only
    saved = pickle.dumps(first)   # Tune saves the callbacks with the experiment, before any trial runs
    for trial_id in ("t1", "t3"):
        run(first, tune_trial(trial_id, config), reports)
    run(first, tune_trial("t4", config), [reports[0], diverged_report(reports)])
    t2 = tune_trial("t2", config)
    first.on_trial_start(0, [t2], t2)
    report(first, t2, reports)
    first.writer.record_end("t2", config, first.ledger.end("t2", config).rows)   # then the driver died
    files = {f: f.stat().st_mtime_ns for f in sorted(root.glob("*/t*.parquet"))}
    return {"root": root, "cfg": cfg, "saved": saved, "files": files, "config": config, "reports": reports}


def restored(first_driver) -> tuple[StudyCallback, list[str]]:
    """The callback as `Tuner.restore` brings it back to a new driver, printing into a list."""
    callback, lines = pickle.loads(first_driver["saved"]), []
    callback.printer = lines.append
    return callback, lines


def mlflow_runs(root) -> dict:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("s")
    return {r.data.tags["g2.trial_id"]: r for r in client.search_runs([experiment.experiment_id],
                                                                       "tags.`g2.role` = 'trial'")}


def assert_nothing_rewritten(first_driver) -> None:
    assert {f: f.stat().st_mtime_ns for f in first_driver["files"]} == first_driver["files"]


def test_a_trial_re_entered_at_its_final_checkpoint_is_recorded_once(first_driver):
    callback, lines = restored(first_driver)
    run(callback, tune_trial("t1", first_driver["config"]), [first_driver["reports"][-1]])   # says its end again
    assert_nothing_rewritten(first_driver)
    assert lines[0].split()[1:4] == ["1/4]", "t1", "ok"] and "-> recorded before the restart | " in lines[0]
    rows = results.load(first_driver["root"], filters="trial_id == 't1'")
    front = len(study_front(rows, first_driver["cfg"]))     # its recorded rows count towards the front shown
    assert front >= 1 and lines[0].endswith(f"front so far: {front} point(s)")
    history = MlflowClient(f"sqlite:///{first_driver['root'] / 'mlflow.db'}").get_metric_history(
        mlflow_runs(first_driver["root"])["t1"].info.run_id, "val_metric")
    assert len(history) == len(first_driver["reports"])        # one value per epoch: nothing was logged twice


def test_a_trial_whose_driver_died_before_closing_its_run_is_closed(first_driver):
    reports = first_driver["reports"]
    assert mlflow_runs(first_driver["root"])["t2"].info.status == "RUNNING"
    callback, lines = restored(first_driver)
    # Tune runs it again from scratch; the model store makes it a re-scoring
    run(callback, tune_trial("t2", first_driver["config"]), [{**reports[-1], "reused_checkpoint": True,
                                                               "train_time_s": 0.0}])
    assert_nothing_rewritten(first_driver)
    closed = mlflow_runs(first_driver["root"])["t2"]
    assert (closed.info.status, closed.data.tags["g2.status"]) == ("FINISHED", "ok")
    assert lines[0].split()[1:4] == ["1/4]", "t2", "ok"]


def test_a_recorded_trial_that_fails_when_run_again_keeps_its_recorded_end(first_driver, caplog):
    callback, lines = restored(first_driver)
    t3 = tune_trial("t3", first_driver["config"])
    t3.error_file = first_driver["root"] / "error.txt"
    t3.error_file.write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    callback.on_trial_start(0, [t3], t3)
    report(callback, t3, first_driver["reports"][:1])
    callback.on_trial_error(1, [t3], t3)
    assert "t3, run again after a restart, failed (RuntimeError: CUDA out of memory)" in caplog.text
    assert_nothing_rewritten(first_driver)
    run = mlflow_runs(first_driver["root"])["t3"]
    assert (run.info.status, run.data.tags["g2.status"]) == ("FINISHED", "ok")
    assert lines[0].split()[1:4] == ["1/4]", "t3", "ok"]


def test_a_divergence_said_again_stays_one_diverged_trial(first_driver):
    callback, lines = restored(first_driver)
    run(callback, tune_trial("t4", first_driver["config"]), [diverged_report(first_driver["reports"])])
    assert_nothing_rewritten(first_driver)
    df = results.load(first_driver["root"])
    assert len(df) == 3 * len(first_driver["reports"][-1]["sweep"]) + 1
    run_t4 = mlflow_runs(first_driver["root"])["t4"]
    assert (run_t4.info.status, run_t4.data.tags["g2.status"]) == ("FAILED", "diverged")
    assert lines[0].split()[1:4] == ["1/4]", "t4", "diverged"] and "-> recorded before the restart" in lines[0]


class Told:
    """What a searcher hears from the callback: each trial's typed end, once, with its MLflow run."""

    def __init__(self):
        self.ends: list = []
        self.links: list = []
        self.asked = {"t1": 4}   # Ray trial id -> Optuna trial number

    def tell(self, end, *, mlflow_run_id=None, mlflow_link=None):
        self.ends.append((end, mlflow_run_id))
        self.links.append(mlflow_link)


def test_the_searcher_is_told_each_end_the_files_record(trial, tmp_path):
    config, reports = trial
    cfg = StudyConfig(name="s", preset="tiny")
    open_tracker(cfg, str(tmp_path)).start(cfg.to_flat())
    told = Told()
    callback = StudyCallback(cfg, str(tmp_path), total=3, printer=lambda line: None, quiet=True, searcher=told)
    run(callback, tune_trial("ok", config), reports)
    run(callback, tune_trial("pruned", config), reports[:1])
    run(callback, tune_trial("raised", config), [{"status": "error", "error": "ValueError: bad knob", "done": True}])
    df = results.load(tmp_path).drop_duplicates("trial_id").set_index("trial_id")
    assert [(end.trial_id, end.status) for end, _ in told.ends] == [("ok", "ok"), ("pruned", "pruned"),
                                                                    ("raised", "error")]
    assert {end.trial_id: end.status for end, _ in told.ends} == df["status"].to_dict()
    ok, run_id = told.ends[0]
    assert run_id == mlflow_runs(tmp_path)["ok"].info.run_id
    assert ok.objectives(cfg.objectives) == {"compressed_val_metric": reports[-1]["compressed_val_metric"],
                                             "gate_bits": reports[-1]["gate_bits"]}
    assert told.ends[1][0].objectives(cfg.objectives) is None and told.ends[2][0].error == "ValueError: bad knob"
    # the link optuna-dashboard's note will hold: the run's page on the UI `g2-study ui` serves for this store
    assert told.links[0] == f"http://127.0.0.1:5000/#/experiments/{mlflow_runs(tmp_path)['ok'].info.experiment_id}" \
                            f"/runs/{run_id}"
