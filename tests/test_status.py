"""`g2-study status` (study/status.py): a study's state from its directory alone, while it runs, after it finished,
after its driver was killed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from study import results
from study.callbacks import StudyCallback
from study.claim import CLAIM_FILE, DriverInfo
from study.config import StudyConfig
from study.convergence import ConvergenceLog
from study.front import study_front
from study.paths import Experiment, StudyPaths, StudyState
from study.status import STOPPED, study_status
from study.tracking import open_tracker

import conftest
from conftest import alive, wait_for

G2 = str(Path(sys.executable).parent / "g2-study")
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def tune_trial(trial_id: str, config: dict) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=None, status="RUNNING", error_file=None)


def claim(root: Path, pid: int) -> None:
    """driver.json as a driver with `pid` on this host writes it (study.claim)."""
    DriverInfo(host=socket.gethostname(), pid=pid, started=datetime.now(UTC).isoformat(timespec="seconds"),
               command="g2-study run").write(root / CLAIM_FILE)


@pytest.fixture
def half_done(trial, tmp_path):
    """A study of 4 trials recorded by the real callback: t1 finished, t2 running after its first epoch."""
    config, reports = trial
    cfg = StudyConfig(name="s", preset="tiny", storage=str(tmp_path))
    paths = StudyPaths.of(cfg)
    paths.root.mkdir(parents=True)
    StudyState(config=cfg.to_json(), experiments=(Experiment("s", 4),)
               ).write(paths.state)
    open_tracker(cfg, str(paths.root)).start(cfg.to_flat())
    callback = StudyCallback(cfg, str(paths.root), total=4, printer=lambda line: None, quiet=True)
    t1, t2 = tune_trial("t1", config), tune_trial("t2", config)
    callback.on_trial_start(0, [t1], t1)
    for i, result in enumerate(reports, start=1):
        t1.last_result = {**result, "training_iteration": i}
        callback.on_trial_result(i, [t1], t1, t1.last_result)
    t1.status = "TERMINATED"
    callback.on_trial_complete(len(reports), [t1, t2], t1)
    callback.on_trial_start(0, [t1, t2], t2)
    t2.last_result = {**reports[0], "training_iteration": 1}
    callback.on_trial_result(1, [t1, t2], t2, t2.last_result)
    return cfg, paths, config["train.epochs"] + config["train.finetune_epochs"]


def test_status_while_the_study_runs(half_done):
    cfg, paths, epochs = half_done
    claim(paths.root, os.getpid())   # a live driver
    status = study_status(cfg.storage, "s")
    assert status.state == "running" and f"pid {os.getpid()}" in status.driver
    by_id = {t.trial_id: t for t in status.trials}
    assert by_id["t1"].state == "ok" and by_id["t1"].val_metric > 0
    assert (by_id["t2"].state, by_id["t2"].epoch, by_id["t2"].epochs) == ("running", 1, epochs)
    assert by_id["t2"].eta_s is not None and status.eta_s is not None and status.elapsed_s >= 0
    assert status.pending == 2 and status.counts() == {"ok": 1, "running": 1, "pending": 2}
    assert len(status.front) == len(study_front(results.load(str(paths.root)), cfg)) >= 1
    table = status.to_table()
    assert f"epoch 1/{epochs}" in table and "val ppl" in table and "ETA" in table and "2 pending" in table
    as_json = json.loads(json.dumps(status.to_json()))   # plain JSON: no NaN, no timestamps left as objects
    assert as_json["state"] == "running" and as_json["pending"] == 2 and len(as_json["front"]) == len(status.front)


def test_status_repeats_the_live_drivers_estimate_and_no_earlier_ones(half_done):
    """`status` shows the ETA the driver's bar shows (study.board writes it), less the time since it was written;
    an estimate left by an earlier driver of the study is not this driver's and is not shown."""
    cfg, paths, epochs = half_done
    claim(paths.root, os.getpid())
    written = json.loads(paths.estimate.read_text())
    assert written["pid"] == os.getpid() and written["eta_s"] > 0 and set(written["trials"]) == {"t2"}
    later = written["at"] + 1.0
    status = study_status(cfg.storage, "s", now=later)
    assert status.eta_s == pytest.approx(max(written["eta_s"] - 1.0, 0.0))
    assert {t.trial_id: t.eta_s for t in status.trials if t.state == "running"} == {
        "t2": pytest.approx(max(written["trials"]["t2"] - 1.0, 0.0))}
    paths.estimate.write_text(json.dumps({**written, "pid": os.getpid() + 1}))   # a driver before this one
    assert study_status(cfg.storage, "s", now=later).eta_s is None


def test_status_after_the_driver_was_killed(half_done):
    cfg, paths, epochs = half_done
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim(paths.root, dead.pid)   # driver.json left by a driver that is gone (killed: it never released it)
    status = study_status(cfg.storage, "s")
    assert status.state == STOPPED and status.driver is None and status.eta_s is None
    t2 = next(t for t in status.trials if t.trial_id == "t2")
    assert (t2.state, t2.epoch) == (STOPPED, 1)
    assert "g2-study resume s" in status.to_table()
    (paths.root / CLAIM_FILE).unlink()   # no claim at all: the same
    assert study_status(cfg.storage, "s").state == STOPPED


def test_status_cli_table_json_and_unknown_study(half_done, tmp_path):
    cfg, paths, _ = half_done
    proc = subprocess.run([G2, "status", "s", "--storage", cfg.storage, "--format", "json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["state"] == STOPPED and {t["trial_id"]: t["state"] for t in printed["trials"]} == {"t1": "ok",
                                                                                               "t2": STOPPED}
    missing = subprocess.run([G2, "status", "nope", "--storage", cfg.storage], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr


@pytest.mark.slow
def test_status_of_a_finished_study(real_study):
    status = study_status(str(real_study["storage"]), "real")
    assert status.state == "finished" and status.driver is None and status.pending == 0
    assert 3 <= len(status.trials) <= 4 and all(t.state in ("ok", "reused", "pruned", "diverged", "error")
                                           for t in status.trials)
    df = results.load(str(real_study["dir"]))
    assert {t.trial_id for t in status.trials} == set(df["trial_id"])
    reused = set(df[df["reused_checkpoint"].fillna(False).astype(bool)]["trial_id"])
    assert {t.trial_id for t in status.trials if t.state == "reused"} == reused and len(reused) >= 1
    assert status.answered >= 1   # the fifth suggestion and those after it: answered, no trial
    cfg = StudyConfig.from_json(StudyState.read(real_study["dir"] / "study.json").config)
    assert len(status.front) == len(study_front(df, cfg)) > 0
    assert status.elapsed_s > 0 and status.eta_s is None
    assert "finished" in status.to_table().splitlines()[0]


@pytest.mark.slow
def test_status_during_a_quiet_run_and_after_its_driver_is_killed(tmp_path):
    """A real driver, watched by `status` until a trial is past its first epoch, then SIGKILLed."""
    storage = tmp_path / "studies"
    config = conftest.study_file(tmp_path, "watched", num_samples=2, epochs=6, max_batches=20, max_eval_batches=4)
    log = tmp_path / "driver.log"
    driver = subprocess.Popen([G2, "run", str(config), "--storage", str(storage), "--quiet"], env=ENV, cwd=tmp_path,
                              start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    started = [psutil.Process(driver.pid)]
    try:
        def training() -> bool:
            assert driver.poll() is None, log.read_text()[-3000:]
            try:
                status = study_status(str(storage), "watched")
            except Exception:   # no study.json yet
                return False
            return any(t.state == "running" and (t.epoch or 0) >= 1 for t in status.trials)

        wait_for(training, 300, "a trial past its first epoch")
        status = study_status(str(storage), "watched")
        assert status.state == "running" and status.driver and status.total == 2
        watched = {t.trial_id: t.epoch for t in status.trials if t.state == "running" and t.epoch}
        started += [p for p in psutil.Process(driver.pid).children(recursive=True)]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        after = study_status(str(storage), "watched")
        assert after.state == STOPPED and after.driver is None
        stopped = {t.trial_id: t.epoch for t in after.trials if t.state == STOPPED}
        assert set(watched) <= set(stopped) and all(stopped[t] >= watched[t] for t in watched)
        out = log.read_text()
        assert " starts: " not in out and " epoch " not in out   # --quiet: finished trials only
    finally:
        for proc in alive(started):
            proc.kill()


def test_a_callback_saved_before_it_counted_carried_epochs_resumes(tmp_path):
    """Ray pickles the callback into the experiment state; one saved by an older version has no `_carried`."""
    cfg = StudyConfig(name="s", preset="tiny", storage=str(tmp_path))
    root = str(tmp_path / "s")
    saved = {"cfg": cfg, "root": root, "total": 2, "printer": print, "quiet": True, "_writer": None,
             "_tracker": None, "_console": None, "_front": 0, "_progress": {}, "_keys": {}, "_started": None,
             "_ended_earlier": 0, "_statuses": Counter(), "_ok_rows": [], "_earlier": {}, "_measured": {},
             "convergence": ConvergenceLog(cfg, root)}   # the state of a version before `_carried`
    restored = StudyCallback.__new__(StudyCallback)
    restored.__setstate__(saved)
    assert restored.board.statuses == {} and restored.total == 2 and restored.board.console.total == 2
