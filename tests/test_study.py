"""End-to-end studies on real parts: a `ray start --head` cluster and an `mlflow server`, both on 127.0.0.1.

The driver is the real `g2-study` command in a subprocess, as a user runs it; one study is killed with SIGKILL
in the middle and resumed.
"""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from analysis.pareto import SAME_MODEL
from study import results

from conftest import free_port, mlflow_server_at, optuna_trial_states, study_file, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    """A Ray head with token authentication; the driver gets the same token through its environment."""
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))          # Ray's unix sockets want a short path
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    log = open(temp / "head.log", "w")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp / 'ray'}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    status = [str(BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"]
    wait_for(lambda: subprocess.run(status, env=env, capture_output=True).returncode == 0, 90, "ray head")
    yield {"address": f"127.0.0.1:{port}", "env": env}
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


FAILING_GRID = """
[space."data.corpus"]
choices = ["toy", "no-such-corpus"]        # half the trials fail on purpose: the corpus is missing

[space."compress.rank"]
choices = [4, 12]                          # ranks the sweep lacks: the second toy trial scores its rank alone
"""


def g2_study(args, cluster, tmp_path, **kw):
    return subprocess.run([str(BIN / "g2-study"), *args], env=cluster["env"], cwd=tmp_path, capture_output=True,
                          text=True, **kw)


def test_study_on_a_cluster_with_a_failing_trial(cluster, mlflow_server, tmp_path):
    storage = tmp_path / "studies"
    config = study_file(tmp_path, "grid", sampler="grid", num_samples=0, concurrent=1, space=FAILING_GRID)
    proc = g2_study(["run", str(config), "--address", cluster["address"], "--storage", str(storage),
                     "--tracking-uri", mlflow_server], cluster, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Pareto front" in proc.stdout and "error 2, ok 2" in proc.stdout
    assert "Failed to fetch metrics" not in proc.stdout + proc.stderr   # Tune's analysis finds every result.json

    df = results.load(str(storage / "grid"))
    trials = df.drop_duplicates("trial_id").set_index("trial_id")
    assert len(trials) == 4 and trials["status"].value_counts().to_dict() == {"ok": 2, "error": 2}
    failed = trials[trials["status"] == "error"]
    assert (failed["data.corpus"] == "no-such-corpus").all()
    assert failed["error"].str.contains("no-such-corpus").all() and failed["val_metric"].isna().all()
    ok = df[df["status"] == "ok"]
    # the trained model: the 5 sweep settings and its own rank; the stored model's second trial scores its own
    # rank alone (and the uncompressed model every final report carries), not the whole sweep again
    assert ok[ok["g2.eval_gate"] == "soft"].groupby("trial_id").size().sort_values().tolist() == [2, 6]
    assert set(ok["method"]) == {"none", "quant", "svd", "svd+quant", "round_clip"}
    assert (ok.groupby("trial_id")["is_trial_setting"].sum() == 1).all()

    # the two ok trials share their training knobs: one trained, the other scored its model
    ok_trials = trials[trials["status"] == "ok"]
    assert ok_trials["training_key"].nunique() == 1
    assert sorted(ok_trials["reused_checkpoint"].tolist()) == [False, True]
    curves = results.load_curves(str(storage / "grid"))
    trained = ok_trials.index[~ok_trials["reused_checkpoint"].astype(bool)][0]
    assert set(curves["trial_id"]) == {trained} and sorted(curves["epoch"]) == [1, 2, 3]

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("grid")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`g2.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    assert {"pareto_front.csv", "pareto_front.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the study converging, one point per finished trial (2 of them errors, in whatever order the grid ran)
    history = {name: [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, name)]
               for name in ("study/trials_done", "study/trials_failed", "study/front_size", "study/hypervolume")}
    assert history["study/trials_done"] == [(k, k) for k in range(1, 5)]
    assert [step for step, _ in history["study/trials_failed"]] == list(range(1, 5))
    assert history["study/trials_failed"][-1][1] == 2
    # charted from the first ok trial on, whose uncompressed model fixes the reference point
    assert [step for step, _ in history["study/hypervolume"]] == [s for s, n in history["study/front_size"] if n > 0]
    volumes = [v for _, v in history["study/hypervolume"]]
    assert volumes[-1] > 0 and volumes == sorted(volumes)   # a fixed reference: it never shrinks
    assert {"best_val_metric/32bit", "best_val_metric/4bit"} <= set(parent.data.metrics)
    assert parent.data.tags["g2.hypervolume_reference"]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {run.data.tags["g2.trial_id"]: run for run in children}
    own_rank = df[df["is_trial_setting"].astype(bool)].set_index("trial_id")["compress.rank"]
    assert len(children) == 4 and set(by_trial) == set(trials.index)
    for trial_id, row in trials.iterrows():
        run = by_trial[trial_id]
        assert run.info.status == ("FINISHED" if row["status"] == "ok" else "FAILED")
        # named by what it is: gate mode, the searched rank, full precision, whether it re-scored a stored model
        reused = " · reused" if row["status"] == "ok" and row["reused_checkpoint"] else ""
        # the searched knobs (rank, corpus) lead: what tells siblings apart survives the UI cutting the name
        assert run.info.run_name == f"r{own_rank[trial_id]} corpus={row['data.corpus']} · g2 τ0.90 p0.20 · b32{reused}"
        assert run.data.tags["g2.trial_id"] == trial_id and run.data.tags["g2.optuna_trial"].isdigit()
        if row["status"] == "ok":   # MLflow and Parquet hold the same numbers
            own = ok[(ok["trial_id"] == trial_id) & ok["is_trial_setting"]].iloc[0]
            assert run.data.metrics["compressed_val_metric"] == pytest.approx(own["val_metric"])
            assert "compression_table.csv" in [a.path for a in client.list_artifacts(run.info.run_id)]
    history = client.get_metric_history(by_trial[trained].info.run_id, "val_metric")
    assert sorted(m.step for m in history) == [1, 2, 3]

    proc = g2_study(["ui", "grid", "--storage", str(storage)], cluster, tmp_path, timeout=120)
    assert proc.returncode == 0 and f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs" in proc.stdout

    # Optuna (what optuna-dashboard shows): objective names, and each trial leads to its Ray trial and MLflow run
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{storage / 'grid' / 'optuna.db'}")
    assert study.metric_names == ["compressed_val_metric", "gate_bits"]
    attrs = {t.user_attrs["g2.ray_trial_id"]: t.user_attrs for t in study.trials if "g2.ray_trial_id" in t.user_attrs}
    assert set(attrs) == set(trials.index)
    # every other Optuna trial is a scored row the sampler learnt from: each ok row once, asked or derived
    rows = [t for t in study.trials if "g2.row" in t.user_attrs]
    assert len(rows) == len({t.user_attrs["g2.row"] for t in rows}) == len(ok.drop_duplicates(SAME_MODEL))
    for trial_id, row in trials.iterrows():
        assert attrs[trial_id]["g2.mlflow_run_id"] == by_trial[trial_id].info.run_id
        if row["status"] == "ok":
            assert attrs[trial_id]["g2.training_key"] == row["training_key"]
            assert attrs[trial_id]["g2.model"] == ("reused" if row["reused_checkpoint"] else "trained")

    # Ray's side: trial directories named by their knobs, and Tune's own analysis reads every trial
    experiment_dir = storage / "grid" / "ray" / "grid"
    names = sorted(p.name for p in experiment_dir.iterdir() if p.is_dir())
    assert len(names) == 4 and all(n.endswith(f"-g2-tau0.90-p0.20-r{own_rank[n.split('-')[0]]}-b32") for n in names), names
    assert not any("model" in n or "store" in n or "clip" in n for n in names)
    frame = tune.ExperimentAnalysis(str(experiment_dir)).dataframe()
    assert sorted(frame["trial_id"]) == sorted(trials.index)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def optuna_states(url: str, name: str = "killed") -> dict[str, int]:
    """Counts of the states of the Optuna trials that became Ray trials, orphans of a killed driver (FAIL) left out."""
    study = optuna.load_study(study_name=name, storage=url)
    assert not any(t.state.name == "RUNNING" for t in study.trials)
    return {state: n for state, n in optuna_trial_states(study).items() if state != "FAIL"}


def test_killed_study_resumes_without_loss_or_duplicates_and_extends(cluster, tmp_path):
    storage = tmp_path / "studies"
    config = study_file(tmp_path, "killed", num_samples=6, concurrent=2, epochs=4)
    driver = subprocess.Popen([str(BIN / "g2-study"), "run", str(config), "--address", cluster["address"],
                               "--storage", str(storage)], env=cluster["env"], cwd=tmp_path,
                              stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    result_dir = storage / "killed" / "results"
    wait_for(lambda: len(list(result_dir.glob("*.parquet"))) >= 2 or driver.poll() is not None, 600,
             "two finished trials")
    children = descendants(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    for child in children:
        child.kill() if child.is_running() else None
    finished = {p.stem: p.stat().st_mtime_ns for p in result_dir.glob("*.parquet")}
    assert 2 <= len(finished) < 6, (tmp_path / "driver.log").read_text()[-3000:]

    proc = g2_study(["resume", "killed", "--storage", str(storage)], cluster, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = results.load(str(storage / "killed"))
    trials = df.drop_duplicates("trial_id")
    assert len(trials) == 6 and (trials["status"] == "ok").all()
    assert len(df) == df.groupby("trial_id").size().sum() and not df.duplicated(["trial_id", "method",
                                                                                 "compress.rank", "compress.bits"]).any()
    for trial_id, mtime in finished.items():                  # finished before the kill: not run again
        assert (result_dir / f"{trial_id}.parquet").stat().st_mtime_ns == mtime
    optuna_url = f"sqlite:///{storage / 'killed' / 'optuna.db'}"
    assert optuna_states(optuna_url) == {"COMPLETE": 6}      # a trial asked for by the dead driver, if any, FAILED
    def assert_every_row_once_in_optuna():
        rows = [t.user_attrs["g2.row"] for t in optuna.load_study(study_name="killed", storage=optuna_url).trials
                if "g2.row" in t.user_attrs]
        scored = results.load(str(storage / "killed"))
        assert len(rows) == len(set(rows)) == len(scored[scored["status"] == "ok"].drop_duplicates(SAME_MODEL))
    assert_every_row_once_in_optuna()
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'killed' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("killed")
    runs = client.search_runs([experiment.experiment_id], "tags.`g2.role` = 'trial'")
    assert sorted(r.data.tags["g2.trial_id"] for r in runs if r.info.status == "FINISHED") == sorted(trials["trial_id"])

    # a finished study grows by exactly N trials, continuing the same Optuna study
    proc = g2_study(["run", str(config), "--address", cluster["address"], "--storage", str(storage),
                     "--num-samples", "2"], cluster, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results.load(str(storage / "killed"))["trial_id"].nunique() == 8
    assert optuna_states(optuna_url)["COMPLETE"] == 8
    assert_every_row_once_in_optuna()                        # the extension added its own rows, none twice

    proc = g2_study(["results", "killed", "--storage", str(storage), "--front"], cluster, tmp_path, timeout=120)
    assert proc.returncode == 0 and "gate ×" in proc.stdout


def test_asha_stops_trials_as_pruned_and_keeps_them_out_of_the_front(cluster, tmp_path):
    """Four seeds of one configuration, one at a time: ASHA stops those behind the first at epoch 1."""
    storage = tmp_path / "studies"
    space = '[space.seed]\nchoices = [1, 2, 3, 4]\n'
    config = study_file(tmp_path, "asha", sampler="grid", num_samples=0, concurrent=1, epochs=3, space=space)
    proc = g2_study(["run", str(config), "--address", cluster["address"], "--storage", str(storage),
                     "--set", "study.scheduler=asha"], cluster, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = results.load(str(storage / "asha"))
    trials = df.drop_duplicates("trial_id")
    statuses = trials["status"].value_counts().to_dict()
    assert set(statuses) == {"ok", "pruned"} and statuses["ok"] >= 1 and statuses["pruned"] >= 1
    pruned = df[df["status"] == "pruned"]
    assert (pruned.groupby("trial_id").size() == 1).all() and (pruned["epoch"] < 3).all()
    front_ids = set(df[df["status"] == "ok"]["trial_id"])
    proc = g2_study(["results", "asha", "--storage", str(storage), "--front", "--format", "csv"], cluster, tmp_path,
                    timeout=120)
    assert proc.returncode == 0 and not (set(pruned["trial_id"]) & set(proc.stdout.split()))
    assert front_ids
    states = optuna_states(f"sqlite:///{storage / 'asha' / 'optuna.db'}", "asha")
    assert states == {"COMPLETE": statuses["ok"], "PRUNED": statuses["pruned"]}


def test_a_search_with_nothing_left_to_ask_ends_and_its_three_fronts_are_one(cluster, tmp_path):
    """One g2 model in the space: it trains once, every later suggestion is answered from its rows (no Ray
    trial), and Optuna's front (optuna-dashboard), the results front and the MLflow parent's front are the same."""
    storage = tmp_path / "studies"
    space = '[space."g2.gate_mode"]\nchoices = ["g2"]\n'
    config = study_file(tmp_path, "known", num_samples=3, concurrent=2, epochs=2, space=space)
    proc = g2_study(["run", str(config), "--address", cluster["address"], "--storage", str(storage)], cluster,
                    tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "answered from the results of trial" in proc.stdout and "nothing is left to learn" in proc.stdout
    df = results.load(str(storage / "known"))
    assert df["trial_id"].nunique() == 1   # the one model; no trial re-scored it

    def values(frame):
        return sorted(zip(frame["val_metric"].round(9), frame["gate_bits"].astype(float)))

    front = study_front_rows(storage / "known")
    study = optuna.load_study(study_name="known", storage=f"sqlite:///{storage / 'known' / 'optuna.db'}")
    assert sorted((round(t.values[0], 9), t.values[1]) for t in study.best_trials) == values(front) != []
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'known' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("known")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`g2.role` = 'parent'")
    logged = client.download_artifacts(parent.info.run_id, "pareto_front.csv", str(tmp_path))
    assert values(pd.read_csv(logged)) == values(front)
    assert parent.data.metrics["study/answered_from_results"] >= 1
    # `status` counts what the run paid for: one trial, nothing pending, and the answers
    proc = g2_study(["status", "known", "--storage", str(storage)], cluster, tmp_path, timeout=120)
    assert proc.returncode == 0 and "3 trial(s): ok 1 |" in proc.stdout and "pending" not in proc.stdout
    assert "answered from the results, with no trial" in proc.stdout


def study_front_rows(root: Path):
    from study.config import StudyConfig
    from study.front import study_front
    from study.paths import StudyPaths, read_state

    cfg = StudyConfig.from_json(read_state(StudyPaths(root)).config)
    return study_front(results.load(str(root)), cfg)
