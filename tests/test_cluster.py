"""A study on a two-node Ray cluster on this machine: a head and a worker node, one CPU each, on loopback.

Each trial takes one CPU, so two concurrent trials must land on both nodes. The study is submitted as a Ray Job
(as from a laptop, with `g2-study submit`, and followed by name), a study no node can hold is refused before it starts, and the worker node is killed
mid-trial: its trial must finish on the head from its checkpoint.
"""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from study import results

import conftest
from conftest import alive, free_port, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def study_file(tmp_path, name, *, num_samples, epochs, max_batches=6) -> Path:
    return conftest.study_file(tmp_path, name, sampler_seed=5, num_samples=num_samples, epochs=epochs,
                               max_batches=max_batches, max_eval_batches=3)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def kill_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL a process this test started and everything below it (a node lost at once); the processes killed."""
    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    return tree


def training_on(node: subprocess.Popen) -> bool:
    """Whether a trial's function runs in a worker process of the node `node` started."""
    try:
        return any(p.cmdline()[:1] == ["ray::ImplicitFunc.train"] for p in psutil.Process(node.pid).children(True))
    except psutil.Error:
        return False


@contextmanager
def ray_cluster():
    """A token-authenticated head (with the job server) and a worker node; the driver gets the token by env.

    Ray keeps a node on 127.0.0.1 only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and then refuses to add a second node;
    with clusters enabled it replaces 127.0.0.1 by the machine's outward address. Other loopback addresses are kept
    as given: the head advertises 127.0.0.2, the worker 127.0.0.3 (some of their servers then listen on every
    interface, as on a real cluster; the token guards them). Each cluster has its own ports, token and temp dir.
    """
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))          # Ray's unix sockets want a short path
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    (temp / "cwd").mkdir()     # the job's working directory: not /tmp, whose ray/ folder would shadow the package
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           # a lost node is noticed in ~3 s instead of ~15 s
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}   # the head's `ray start` sees g2-study
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.2", "--num-cpus=1", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             "--disable-usage-stats", f"--temp-dir={temp / 't'}"],
                            env=env, cwd=temp / "cwd", stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT)
    worker = None
    status = [str(BIN / "ray"), "status", "--address", f"127.0.0.2:{port}"]
    try:
        wait_for(lambda: subprocess.run(status, env=env, capture_output=True).returncode == 0, 90, "ray head")
        worker = subprocess.Popen([str(BIN / "ray"), "start", f"--address=127.0.0.2:{port}", "--block",
                                   "--node-ip-address=127.0.0.3", "--num-cpus=1", "--disable-usage-stats"],
                                  env=env, cwd=temp / "cwd", stdout=open(temp / "worker.log", "w"),
                                  stderr=subprocess.STDOUT)
        wait_for(lambda: "/2.0 CPU" in subprocess.run(status, env=env, capture_output=True, text=True).stdout, 90,
                 "the worker node")
        yield {"address": f"127.0.0.2:{port}", "jobs": f"http://127.0.0.1:{dashboard}", "env": env,
               "head": head, "worker": worker, "temp": temp}
    finally:
        if worker is not None:
            stop(worker)
        stop(head)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster() as started:
        yield started


def g2_study(args, cluster, tmp_path, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "g2-study"), *args], env=cluster["env"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


def study_counts(study_dir: Path, name: str, mlflow_db: Path | None = None) -> dict:
    df = results.load(str(study_dir))
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db or study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.`g2.role` = 'trial'")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")
    return {"trials": df["trial_id"].nunique(), "rows": len(df),
            "duplicate_rows": int(df.duplicated(["trial_id", "method", "compress.rank", "compress.bits"]).sum()),
            "statuses": dict(Counter(df.drop_duplicates("trial_id")["status"])),
            "mlflow_runs": dict(Counter(r.info.status for r in runs)),
            "mlflow_trials": len({r.data.tags["g2.trial_id"] for r in runs}),
            "optuna": conftest.optuna_trial_states(study)}


def test_a_study_no_node_can_hold_is_refused_before_any_trial(cluster, tmp_path):
    storage = tmp_path / "studies"
    config = study_file(tmp_path, "toobig", num_samples=2, epochs=1)
    for setting, needs in (("study.cpus_per_trial=2", "study.cpus_per_trial=2 CPU"),
                           ("study.gpus_per_trial=1", "study.gpus_per_trial=1 GPU")):
        proc = g2_study(["run", str(config), "--address", cluster["address"], "--storage", str(storage),
                         "--set", setting], cluster, tmp_path, timeout=180)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert needs in proc.stderr and "the cluster has CPU 2, GPU 0 in all" in proc.stderr, proc.stderr
        assert proc.stderr.count("CPU 1, GPU 0") == 2                    # each node's resources
    assert not (storage / "toobig" / "study.json").exists() and not (storage / "toobig" / "results").exists()


def test_a_study_submitted_from_a_laptop_runs_on_both_nodes_and_is_followed_by_name(cluster, tmp_path):
    storage, name = tmp_path / "studies", "job"
    config = study_file(tmp_path, name, num_samples=4, epochs=2)
    address = ["--address", cluster["jobs"]]
    submitted = g2_study(["submit", str(config), *address, "--storage", str(storage)], cluster, tmp_path, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr        # the client is gone
    (submission_id,) = re.findall(r"as Ray Job (\S+);", submitted.stdout)
    assert f"g2-study logs {name} --address {cluster['jobs']} --follow" in submitted.stdout

    logs = g2_study(["logs", name, *address, "--follow"], cluster, tmp_path, timeout=600)   # returns when it ends
    following = g2_study(["status", name, *address], cluster, tmp_path, timeout=300)
    assert following.returncode == 0, following.stderr
    assert re.search(rf"job {submission_id}: (PENDING|RUNNING|SUCCEEDED)", following.stdout), following.stdout
    assert f"study {name}" in following.stdout, following.stdout                # the head's `g2-study status`

    assert logs.returncode == 0 and "Pareto front" in logs.stdout, logs.stdout[-3000:] + logs.stderr
    ended = g2_study(["status", name, *address, "--format", "json"], cluster, tmp_path, timeout=300)
    assert f"job {submission_id}: SUCCEEDED" in ended.stderr, ended.stderr
    assert json.loads(ended.stdout)["study"] == name

    proc = g2_study(["results", name, "--storage", str(storage)], cluster, tmp_path, timeout=120)
    assert proc.returncode == 0 and "gate_bits" in proc.stdout, proc.stderr
    counts = study_counts(storage / name, name)
    assert counts == {"trials": 4, "rows": 20, "duplicate_rows": 0, "statuses": {"ok": 4},
                      "mlflow_runs": {"FINISHED": 4}, "mlflow_trials": 4, "optuna": {"COMPLETE": 4}}, counts
    df = results.load(str(storage / name))
    nodes = df.drop_duplicates("trial_id")["node_id"]
    assert nodes.notna().all(), "every report carries the Ray node that ran it"
    assert nodes.nunique() == 2, f"trials ran on both nodes: {nodes.tolist()}"
    print(f"\nRay Job {submission_id}: {counts}; trials per node {dict(Counter(nodes.str[:8]))}")


def test_submit_refuses_bad_input_before_anything_reaches_the_cluster(cluster, tmp_path):
    config = study_file(tmp_path, "refused", num_samples=2, epochs=1)
    for args, message in (
            (["--storage", "relative/dir"], "--storage must be an absolute path on the cluster"),
            (["--storage", str(tmp_path), "--set", "study.num_samples=0"], "study.num_samples must be"),
            (["--storage", str(tmp_path), "--address", "127.0.0.2:6379"], "--address must be the Ray job server")):
        proc = g2_study(["submit", str(config), "--address", cluster["jobs"], *args], cluster, tmp_path, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cluster["jobs"]], env=cluster["env"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "refused" not in jobs


def test_a_lost_node_s_trial_finishes_on_the_other_node_from_its_checkpoint(cluster, tmp_path):
    storage, name = tmp_path / "studies", "lostnode"
    config = study_file(tmp_path, name, num_samples=2, epochs=5, max_batches=60)   # epochs of seconds: time to kill
    log = tmp_path / "driver.log"
    driver = subprocess.Popen([str(BIN / "g2-study"), "run", str(config), "--address", cluster["address"],
                               "--storage", str(storage)], env=cluster["env"], cwd=tmp_path,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        curves = storage / name / "curves"
        wait_for(lambda: len(list(curves.glob("*.parquet"))) == 2 and training_on(cluster["worker"])
                 or driver.poll() is not None, 600, "both trials' first epoch, one still training on the worker node")
        assert driver.poll() is None, log.read_text()
        killed = kill_tree(cluster["worker"])                 # the worker node and its trial, at once
        assert driver.wait(600) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = log.read_text()
    retries = [line for line in out.splitlines() if "retrying from its last checkpoint" in line]
    assert len(retries) == 1, out[-3000:]
    counts = study_counts(storage / name, name)
    assert counts == {"trials": 2, "rows": 10, "duplicate_rows": 0, "statuses": {"ok": 2},
                      "mlflow_runs": {"FINISHED": 2}, "mlflow_trials": 2, "optuna": {"COMPLETE": 2}}, counts
    df = results.load(str(storage / name)).drop_duplicates("trial_id")
    lost = next(t for t in df["trial_id"] if t in retries[0])
    assert df["node_id"].nunique() == 1                        # both finished on the head, the one node left
    curve = results.load_curves(str(storage / name))
    assert curve.groupby("trial_id")["epoch"].apply(sorted).tolist() == [[1, 2, 3, 4, 5]] * 2
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / name / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id], f"tags.`g2.trial_id` = '{lost}'")
    # from its checkpoint: no epoch measured twice (a restart from scratch would log epoch 1 again)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_metric")) == [1, 2, 3, 4, 5]
    assert not alive(killed)
    print(f"\nlost node: {len(killed)} process(es) killed, none left; trial {lost} retried once; {counts}")


def test_a_study_whose_whole_cluster_died_completes_on_a_new_cluster(tmp_path):
    """Head, worker, driver and MLflow server all SIGKILLed mid-study; new ones (ports, token) resume it."""
    storage, name = tmp_path / "shared", "outlived"
    storage.mkdir()
    config = study_file(tmp_path, name, num_samples=4, epochs=4, max_batches=60)   # epochs of seconds
    credentials = {"MLFLOW_TRACKING_USERNAME": "g2admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(12)}
    study_dir = storage / name
    log = tmp_path / "driver.log"
    with ray_cluster() as first:
        env = {**first["env"], **credentials}
        with conftest.g2_mlflow_server(storage, env) as (uri, _):
            driver = subprocess.Popen([str(BIN / "g2-study"), "run", str(config), "--address", first["address"],
                                       "--storage", str(storage), "--tracking-uri", uri], env=env, cwd=tmp_path,
                                      stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
            try:
                finished = lambda: list((study_dir / "results").glob("*.parquet"))           # noqa: E731
                in_progress = lambda: len(list((study_dir / "curves").glob("*.parquet"))) > len(finished())  # noqa
                wait_for(lambda: finished() and in_progress() or driver.poll() is not None, 600,
                         "a finished trial, and another past its first epoch")
                assert driver.poll() is None, log.read_text()[-3000:]
                os.killpg(driver.pid, signal.SIGKILL)                 # the driver, on the head, goes with it
                killed = kill_tree(first["worker"]) + kill_tree(first["head"])
            finally:
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
            wait_for(lambda: not alive(killed), 30, "the killed processes to be gone")   # SIGKILL takes a moment
            done_before = {p.stem: p.stat().st_mtime_ns for p in finished()}
            interrupted = study_counts(study_dir, name, storage / "mlflow.db")
    assert interrupted["optuna"].get("RUNNING", 0) >= 1, interrupted

    with ray_cluster() as second:
        env = {**second["env"], **credentials}
        with conftest.g2_mlflow_server(storage, env) as (new_uri, _):
            assert new_uri != uri and second["address"] != first["address"]
            proc = subprocess.run([str(BIN / "g2-study"), "resume", name, "--storage", str(storage), "--address",
                                   second["address"], "--tracking-uri", new_uri], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            status = g2_study(["status", name, "--storage", str(storage)], second, tmp_path, timeout=120)
            assert "finished" in status.stdout.splitlines()[0], status.stdout
    counts = study_counts(study_dir, name, storage / "mlflow.db")
    assert counts == {"trials": 4, "rows": 20, "duplicate_rows": 0, "statuses": {"ok": 4},
                      "mlflow_runs": {"FINISHED": 4}, "mlflow_trials": 4, "optuna": {"COMPLETE": 4}}, counts
    for trial_id, mtime in done_before.items():                    # finished before the loss: not trained again
        assert (study_dir / "results" / f"{trial_id}.parquet").stat().st_mtime_ns == mtime
    curve = results.load_curves(str(study_dir))
    assert curve.groupby("trial_id")["epoch"].apply(sorted).tolist() == [[1, 2, 3, 4]] * 4
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.`g2.role` = 'trial'")
    for run in runs:   # continued from a checkpoint: no epoch measured twice (from scratch would log epoch 1 again)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_metric")) == [1, 2, 3, 4]
    assert json.loads((study_dir / "study.json").read_text())["config"]["address"] == second["address"]
    print(f"\nwhole cluster lost: {len(killed)} process(es) killed; at the loss {interrupted}; "
          f"{len(done_before)} finished before; after resume on a new cluster {counts}")
