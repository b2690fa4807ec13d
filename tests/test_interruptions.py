"""A study interrupted as a user and a machine interrupt it, on a real local Ray, with real signals.

Each test starts the real `g2-study` command in its own session (process group), as a terminal would, and then:
Ctrl-C (SIGINT to the group), SIGKILL of the driver, SIGKILL of the Ray worker running a trial, or a second
`g2-study` on the same study. Every count is checked afterwards: trials, results rows, MLflow runs, Optuna trial
states and the processes left behind.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from study import results

import conftest
from conftest import alive, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

def study_file(tmp_path, name, *, num_samples=4, epochs=3, max_batches=6, **kw) -> Path:
    return conftest.study_file(tmp_path, name, sampler_seed=3, num_samples=num_samples, epochs=epochs,
                               max_batches=max_batches, max_eval_batches=3, **kw)


@pytest.fixture
def processes():
    """Processes a test started or saw started (psutil.Process); any still alive at the end are killed, by pid."""
    started: list[psutil.Process] = []
    yield started
    for proc in started:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.NoSuchProcess:
            pass


def start_driver(args, tmp_path, processes, log_name="driver.log") -> subprocess.Popen:
    """`g2-study ARGS` in a session of its own: its process group is what a terminal's Ctrl-C reaches."""
    driver = subprocess.Popen([str(BIN / "g2-study"), *args], env=ENV, cwd=tmp_path, start_new_session=True,
                              stdout=open(tmp_path / log_name, "w"), stderr=subprocess.STDOUT)
    processes.append(psutil.Process(driver.pid))
    return driver


def g2_study(args, tmp_path, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "g2-study"), *args], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def wait_for_results(study_dir: Path, n: int, driver: subprocess.Popen, log: Path) -> None:
    wait_for(lambda: len(list((study_dir / "results").glob("*.parquet"))) >= n or driver.poll() is not None, 600,
             f"{n} finished trial(s)")
    assert driver.poll() is None, log.read_text()[-3000:]


def ray_descendants(pid: int) -> list[psutil.Process]:
    """The driver's local Ray: every process below it whose command line names Ray."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if "ray" in (" ".join(proc.cmdline()) or proc.name()).lower():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def study_counts(study_dir: Path, name: str, tracking_uri: str = "", optuna_url: str = "") -> dict:
    """Trials, rows and duplicates in the results; MLflow trial runs by status; Optuna trials by state.

    MLflow and Optuna are read from the study directory's SQLite files unless `tracking_uri` / `optuna_url` say where.
    """
    df = results.load(str(study_dir))
    client = MlflowClient(tracking_uri=tracking_uri or f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`g2.role` = 'trial'")
    study = optuna.load_study(study_name=name, storage=optuna_url or f"sqlite:///{study_dir / 'optuna.db'}")
    return {"trials": df["trial_id"].nunique(), "rows": len(df),
            "duplicate_rows": int(df.duplicated(["trial_id", "method", "compress.rank", "compress.bits", "g2.eval_gate"]).sum()),
            "statuses": dict(Counter(df.drop_duplicates("trial_id")["status"])),
            "mlflow_runs": dict(Counter(r.info.status for r in runs)),
            "mlflow_trials": len({r.data.tags["g2.trial_id"] for r in runs}),
            "optuna": conftest.optuna_trial_states(study)}


def experiments(study_dir: Path) -> list[dict]:
    return json.loads((study_dir / "study.json").read_text())["experiments"]


def test_ctrl_c_stops_resumably_and_resume_completes_every_trial(tmp_path, processes):
    storage, name = tmp_path / "studies", "ctrlc"
    config = study_file(tmp_path, name)
    driver = start_driver(["run", str(config), "--storage", str(storage)], tmp_path, processes)
    wait_for_results(storage / name, 1, driver, tmp_path / "driver.log")
    local_ray = ray_descendants(driver.pid)
    processes.extend(local_ray)
    finished = {p.stem: p.stat().st_mtime_ns for p in (storage / name / "results").glob("*.parquet")}
    os.killpg(driver.pid, signal.SIGINT)                       # Ctrl-C in the driver's terminal
    assert driver.wait(120) == 130
    out = (tmp_path / "driver.log").read_text()
    assert f"g2-study resume {name} --storage {storage}" in out, out[-3000:]
    assert experiments(storage / name) == [{"name": name, "num_samples": 4, "finished": False}]
    interrupted = study_counts(storage / name, name)
    assert "FAIL" not in interrupted["optuna"]                # nothing failed: the stopped trials are resumable
    assert interrupted["optuna"].get("COMPLETE", 0) == interrupted["trials"] >= len(finished)
    assert interrupted["optuna"].get("RUNNING", 0) >= 1
    wait_for(lambda: not alive(local_ray), 30, "the interrupted driver's local Ray to exit")
    assert not (storage / name / "driver.json").exists()      # the claim was released

    proc = g2_study(["resume", name, "--storage", str(storage)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = study_counts(storage / name, name)
    assert counts == {"trials": 4, "rows": 20, "duplicate_rows": 0, "statuses": {"ok": 4},
                      "mlflow_runs": {"FINISHED": 4}, "mlflow_trials": 4, "optuna": {"COMPLETE": 4}}, counts
    for trial_id, mtime in finished.items():                 # finished before Ctrl-C: not run again
        assert (storage / name / "results" / f"{trial_id}.parquet").stat().st_mtime_ns == mtime
    assert experiments(storage / name)[0]["finished"] is True
    print(f"\nCtrl-C: at the interrupt {interrupted}; after resume {counts}")


def test_a_second_driver_is_refused_while_the_first_runs(tmp_path, processes):
    storage, name = tmp_path / "studies", "busy"
    config = study_file(tmp_path, name, num_samples=2, epochs=2)
    driver = start_driver(["run", str(config), "--storage", str(storage)], tmp_path, processes)
    wait_for(lambda: (storage / name / "study.json").exists() or driver.poll() is not None, 120, "the study")
    claim = json.loads((storage / name / "driver.json").read_text())
    assert claim["pid"] == driver.pid and claim["host"] == socket.gethostname()
    local_ray = ray_descendants(driver.pid)
    processes.extend(local_ray)

    started = time.monotonic()
    for args in (["resume", name, "--storage", str(storage)], ["run", str(config), "--storage", str(storage)]):
        proc = g2_study(args, tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (f"study {name} is being run by pid {driver.pid} on host {socket.gethostname()} since "
                f"{claim['started']}") in proc.stderr
    assert time.monotonic() - started < 60                     # refused at once, not after running anything

    assert driver.wait(600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    counts = study_counts(storage / name, name)
    assert counts == {"trials": 2, "rows": 10, "duplicate_rows": 0, "statuses": {"ok": 2},
                      "mlflow_runs": {"FINISHED": 2}, "mlflow_trials": 2, "optuna": {"COMPLETE": 2}}, counts
    assert not (storage / name / "driver.json").exists()
    wait_for(lambda: not alive(local_ray), 30, "the driver's local Ray to exit")
    print(f"\nsecond driver: refused twice; the first driver's study {counts}; leftover processes 0")


def test_a_killed_driver_is_taken_over_its_leftovers_ended_and_the_study_completed(tmp_path, processes):
    storage, name = tmp_path / "studies", "killed"
    config = study_file(tmp_path, name, epochs=4)
    driver = start_driver(["run", str(config), "--storage", str(storage)], tmp_path, processes)
    wait_for_results(storage / name, 1, driver, tmp_path / "driver.log")
    wait_for(lambda: any("RuntimeEnvAgent" in p[2] for p in
                         json.loads((storage / name / "driver.json").read_text())["ray_processes"]), 30,
             "the claim to record the local Ray's agents")
    local_ray = ray_descendants(driver.pid)
    processes.extend(local_ray)
    finished = {p.stem: p.stat().st_mtime_ns for p in (storage / name / "results").glob("*.parquet")}
    driver.send_signal(signal.SIGKILL)                         # kill -9 of the driver alone
    driver.wait(30)
    time.sleep(3)                                              # what dies with the driver has died by now
    leftovers = alive(local_ray)
    # The worst moment to die: Tune has rotated an unfinished trial's checkpoint (num_to_keep=1) but not yet saved
    # the experiment state naming the new one. Made certain here by moving each newest checkpoint one index on.
    rotated = 0
    for trial_dir in (p for p in (storage / name / "ray" / name).iterdir() if p.is_dir()):   # <trial id>-<knobs>
        checkpoints = sorted(trial_dir.glob("checkpoint_[0-9]*"))
        if checkpoints and trial_dir.name.split("-")[0] not in finished:
            index = int(checkpoints[-1].name.rpartition("_")[2])
            checkpoints[-1].rename(trial_dir / f"checkpoint_{index + 1:06d}")
            rotated += 1
    # Optuna asked for a trial that Tune never saved (the driver died between the two): resume marks it FAIL
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    study.ask()

    proc = g2_study(["resume", name, "--storage", str(storage)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"the driver pid {driver.pid} on host {socket.gethostname()}" in proc.stdout
    ended = re.search(r"ended (\d+) leftover Ray process\(es\)", proc.stdout)
    # whatever the dead driver's Ray left behind (Ray 2.60 leaves its agents), the resume ended it
    assert (int(ended[1]) if ended else 0) >= len(leftovers), proc.stdout[-3000:]
    assert not alive(local_ray)
    counts = study_counts(storage / name, name)
    counts["optuna"].pop("FAIL", None)   # a Ray trial's Optuna trial the dead driver asked for: an orphan too
    assert counts == {"trials": 4, "rows": 20, "duplicate_rows": 0, "statuses": {"ok": 4},
                      "mlflow_runs": {"FINISHED": 4}, "mlflow_trials": 4, "optuna": {"COMPLETE": 4}}, counts
    # asked for after Tune's last save of the experiment (the one made above, and any the driver made): explained,
    # in the output and in Optuna
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) >= 1 and all("g2.orphan" in t.user_attrs for t in failed)
    assert f"{len(failed)} Optuna trial(s) left RUNNING by the interrupted driver are marked FAIL" in proc.stdout
    for trial_id, mtime in finished.items():
        assert (storage / name / "results" / f"{trial_id}.parquet").stat().st_mtime_ns == mtime
    print(f"\nkilled driver: {len(leftovers)} leftover process(es) ended; {rotated} checkpoint(s) rotated away; "
          f"orphaned Optuna trials {len(failed)}; {counts}")


LOST_WORKER_SPACE = """
[space."data.corpus"]
choices = ["toy", "no-such-corpus"]        # the second trial raises: its own error, recorded, never retried
"""


def test_a_lost_worker_is_retried_from_its_checkpoint_and_a_trials_own_error_is_not(tmp_path, processes):
    storage, name = tmp_path / "studies", "lost"
    config = study_file(tmp_path, name, sampler="grid", num_samples=0, concurrent=1, epochs=5, max_batches=40,
                        space=LOST_WORKER_SPACE)                # epochs of seconds: time to kill one mid-trial
    driver = start_driver(["run", str(config), "--storage", str(storage)], tmp_path, processes)
    curves, ended = storage / name / "curves", storage / name / "results"

    def training_worker() -> list[psutil.Process]:
        """The worker running the ok trial: it has reported an epoch and not ended (one trial at a time)."""
        reported = [c.stem for c in curves.glob("*.parquet")]
        if not reported or (ended / f"{reported[0]}.parquet").exists():
            return []
        return [p for p in ray_descendants(driver.pid) if p.cmdline()[:1] == ["ray::ImplicitFunc.train"]]

    wait_for(lambda: training_worker() or driver.poll() is not None, 600, "a trial training after its first epoch")
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    (training,) = [p.stem for p in curves.glob("*.parquet")]
    (worker,) = training_worker()
    worker.kill()                                               # the process running the trial is lost
    local_ray = ray_descendants(driver.pid)
    processes.extend(local_ray)
    assert driver.wait(600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    wait_for(lambda: not alive(local_ray), 30, "the driver's local Ray to exit")
    out = (tmp_path / "driver.log").read_text()

    retries = [line for line in out.splitlines() if "retrying from its last checkpoint" in line]
    assert len(retries) == 1 and training in retries[0] and "failure 1 of 3 allowed" in retries[0], out[-3000:]
    counts = study_counts(storage / name, name)
    assert counts == {"trials": 2, "rows": 6, "duplicate_rows": 0, "statuses": {"ok": 1, "error": 1},
                      "mlflow_runs": {"FINISHED": 1, "FAILED": 1}, "mlflow_trials": 2,
                      "optuna": {"COMPLETE": 1, "FAIL": 1}}, counts
    df = results.load(str(storage / name)).drop_duplicates("trial_id").set_index("trial_id")
    failed = df[df["status"] == "error"].iloc[0]
    assert "no-such-corpus" in failed["error"] and not any(failed.name in line for line in retries)
    assert sorted(results.load_curves(str(storage / name))["epoch"]) == [1, 2, 3, 4, 5]
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / name / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                f"tags.`g2.trial_id` = '{training}'")
    # resumed from its checkpoint: every epoch was measured once (a restart from scratch logs epoch 1 twice)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_metric")) == [1, 2, 3, 4, 5]
    print(f"\nlost worker: {len(retries)} retry; {counts}; leftover processes 0")


FILE_SIZE_LIMIT = 50_000   # bytes: over the toy corpus, study.json and a results file; under a checkpoint (~74 kB)


def test_a_full_disk_stops_the_study_naming_the_file_and_resume_completes_it(tmp_path, processes):
    """RLIMIT_FSIZE as the trials' full disk: a write past it fails with EFBIG (Python ignores SIGXFSZ).

    The limit is set on the driver's raylet and Ray workers once the first trial has ended, so the next trial's
    checkpoint does not fit. A limit on the whole driver from the start is no test of the study: Ray's own files
    (its plasma store, logs) outgrow any limit a checkpoint outgrows and Ray does not start, and the driver's
    Tune state (~170 kB) and mlflow.db (~1 MB) fail before any file of the study.
    """
    import resource

    storage, name = tmp_path / "studies", "full"
    config = study_file(tmp_path, name, num_samples=2, epochs=2, max_batches=4, concurrent=1)
    driver = start_driver(["run", str(config), "--storage", str(storage)], tmp_path, processes)
    wait_for_results(storage / name, 1, driver, tmp_path / "driver.log")
    (first,) = (storage / name / "results").glob("*.parquet")
    before = first.read_bytes()
    local_ray = ray_descendants(driver.pid)
    processes.extend(local_ray)
    for proc in local_ray:   # every process the trials run in, and the raylet that starts new ones
        if proc.cmdline()[:1] != [sys.executable] or "raylet" in proc.cmdline()[0]:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    assert driver.wait(300) == 74, (tmp_path / "driver.log").read_text()[-3000:]
    out = (tmp_path / "driver.log").read_text()
    stopped = [line for line in out.splitlines() if "could not write" in line]
    assert len(stopped) == 1 and "Traceback" not in out, out[-3000:]
    assert re.fullmatch(rf"g2-study run: error: study {name} stopped: could not write "
                        rf"\S+/(best_model|checkpoint)\.pt: File too large\. Nothing is lost: once there is space, continue it "
                        rf"with `g2-study resume {name} --storage {re.escape(str(storage))}`", stopped[0]), stopped
    assert first.read_bytes() == before and results.load(str(storage / name))["trial_id"].nunique() == 1
    assert experiments(storage / name) == [{"name": name, "num_samples": 2, "finished": False}]
    wait_for(lambda: not alive(local_ray), 30, "the stopped driver's local Ray to exit")
    assert not (storage / name / "driver.json").exists()

    proc = g2_study(["resume", name, "--storage", str(storage)], tmp_path)   # space again: no limit
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = study_counts(storage / name, name)
    assert counts == {"trials": 2, "rows": 10, "duplicate_rows": 0, "statuses": {"ok": 2},
                      "mlflow_runs": {"FINISHED": 2}, "mlflow_trials": 2, "optuna": {"COMPLETE": 2}}, counts
    assert first.read_bytes() == before   # the trial that ended before the disk filled is not run again
    print(f"\nfull disk: {stopped[0]}; after resume {counts}")
