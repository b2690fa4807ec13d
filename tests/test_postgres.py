"""Cluster-grade storage: the Optuna study in PostgreSQL (`study.optuna_storage`) and MLflow's runs in a
`g2-study mlflow-server` whose store is PostgreSQL too (study/mlflow_server.py).

A real PostgreSQL server, started by the module's fixture on 127.0.0.1, holds both; the real `g2-study` command runs
a study, is stopped with Ctrl-C, resumed and extended, and every count is checked (results rows, MLflow runs, Optuna
trials). A `study.optuna_storage` the driver cannot use is refused before it writes anything.
"""
import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from study.config import load_study_config
from study.mlflow_server import PASSWORD_VAR, USERNAME_VAR
from study.tags import PARENT_ROLE, ROLE_TAG

import conftest
from conftest import alive, free_port
from test_interruptions import experiments, ray_descendants, study_counts, wait_for_results

BIN = Path(sys.executable).parent
SUPERUSER = "g2"                    # the server's superuser, trusted on 127.0.0.1 (a test server only)
ADMIN, PASSWORD = "g2admin", "a-long-test-password-7"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       USERNAME_VAR: ADMIN, PASSWORD_VAR: PASSWORD}


def postgres_bin() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else the directory of `initdb` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4].split(".")[0]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this module's own, with databases `optuna` and `mlflow`; yields `url(database)`."""
    pg_bin = postgres_bin()
    if pg_bin is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH: "
                    "install postgresql (.ci/run does)")
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed (the postgres extra)")
    # outside pytest's tmp tree, which is private to this user, and short: the server's unix socket lives there
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    as_owner: list[str] = []
    if os.geteuid() == 0:   # initdb refuses root: the server runs as the postgres user
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    pg_ctl = [*as_owner, str(pg_bin / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_owner, str(pg_bin / "initdb"), "--no-sync", "-D", str(data), "-A", "trust",
                        "-U", SUPERUSER], check=True, capture_output=True, timeout=120)
        subprocess.run([*pg_ctl, "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                        "-l", str(root / "server.log"), "-w", "start"], check=True, capture_output=True, timeout=120)
        with psycopg.connect(f"host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres", autocommit=True) as db:
            for database in ("optuna", "mlflow"):
                db.execute(f"CREATE DATABASE {database}")
        yield lambda database: f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`g2-study mlflow-server` as the README's cluster recipe starts it, its runs in the `mlflow` database."""
    storage = tmp_path_factory.mktemp("mlflow_storage")
    with conftest.g2_mlflow_server(storage, ENV, "--backend-store-uri", postgres("mlflow")) as (uri, _):
        yield uri


def g2_study(args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "g2-study"), *map(str, args)], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def study_file(tmp_path: Path, name: str) -> Path:
    """test_interruptions' study, shorter: 4 trials of 2 epochs of 4 batches, 5 rows each."""
    return conftest.study_file(tmp_path, name, sampler_seed=3, num_samples=4, epochs=2, max_batches=4,
                               max_eval_batches=3)


@pytest.mark.slow
def test_a_study_in_postgresql_stops_resumes_and_extends_with_every_trial_once(postgres, mlflow_server, tmp_path,
                                                                               monkeypatch):
    storage, name, optuna_url = tmp_path / "studies", "pg", postgres("optuna")
    config = study_file(tmp_path, name)
    stores = ["--tracking-uri", mlflow_server, "--set", f"study.optuna_storage={optuna_url}"]
    monkeypatch.setenv(USERNAME_VAR, ADMIN)   # this process reads the server too (study_counts)
    monkeypatch.setenv(PASSWORD_VAR, PASSWORD)
    local_ray: list[psutil.Process] = []
    took = {"start": time.monotonic()}
    try:
        log = tmp_path / "driver.log"
        driver = subprocess.Popen([str(BIN / "g2-study"), "run", str(config), "--storage", str(storage), *stores],
                                  env=ENV, cwd=tmp_path, start_new_session=True, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT)
        wait_for_results(storage / name, 1, driver, log)
        local_ray += ray_descendants(driver.pid)
        finished = {p.stem: p.stat().st_mtime_ns for p in (storage / name / "results").glob("*.parquet")}
        os.killpg(driver.pid, signal.SIGINT)                   # Ctrl-C in the driver's terminal
        assert driver.wait(120) == 130, log.read_text()[-3000:]
        took["ctrl-c"] = time.monotonic()
        interrupted = study_counts(storage / name, name, mlflow_server, optuna_url)
        assert "FAIL" not in interrupted["optuna"] and interrupted["optuna"].get("RUNNING", 0) >= 1, interrupted
        assert interrupted["optuna"].get("COMPLETE", 0) == interrupted["trials"] >= len(finished)

        # resume names neither store: both come from the study's study.json
        proc = g2_study(["resume", name, "--storage", storage], tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        took["resume"] = time.monotonic()
        resumed = study_counts(storage / name, name, mlflow_server, optuna_url)
        assert resumed == {"trials": 4, "rows": 20, "duplicate_rows": 0, "statuses": {"ok": 4},
                           "mlflow_runs": {"FINISHED": 4}, "mlflow_trials": 4, "optuna": {"COMPLETE": 4}}, resumed
        for trial_id, mtime in finished.items():              # finished before Ctrl-C: not run again
            assert (storage / name / "results" / f"{trial_id}.parquet").stat().st_mtime_ns == mtime

        # extending without the study's Optuna storage would start a second Optuna study: refused
        proc = g2_study(["run", config, "--storage", storage, "--tracking-uri", mlflow_server, "--num-samples", 2],
                        tmp_path, timeout=120)
        assert proc.returncode == 2 and f"keeps its Optuna study in {optuna_url}" in proc.stderr, proc.stderr
        took["refused"] = time.monotonic()
        proc = g2_study(["run", config, "--storage", storage, *stores, "--num-samples", 1], tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        took["extend"] = time.monotonic()
        extended = study_counts(storage / name, name, mlflow_server, optuna_url)
        assert extended == {"trials": 5, "rows": 25, "duplicate_rows": 0, "statuses": {"ok": 5},
                            "mlflow_runs": {"FINISHED": 5}, "mlflow_trials": 5, "optuna": {"COMPLETE": 5}}, extended
    finally:
        for proc in alive(local_ray):   # a driver that died before it stopped its local Ray
            proc.kill()
    assert experiments(storage / name) == [{"name": name, "num_samples": 4, "finished": True},
                                           {"name": f"{name}-ext1", "num_samples": 1, "finished": True}]
    client = MlflowClient(tracking_uri=mlflow_server)
    parents = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                 f"tags.`{ROLE_TAG}` = '{PARENT_ROLE}'")
    assert [p.info.status for p in parents] == ["FINISHED"]   # one parent run, reopened by resume and extension
    assert not {"optuna.db", "mlflow.db"} & {p.name for p in (storage / name).iterdir()}   # nothing fell back
    phases = list(took)
    print(f"\nPostgreSQL: at Ctrl-C {interrupted}; resumed {resumed}; extended {extended}; seconds: "
          + ", ".join(f"{b} {took[b] - took[a]:.0f}" for a, b in zip(phases, phases[1:])))


def test_a_new_study_is_refused_a_name_that_another_study_directory_holds_in_the_database(postgres, tmp_path):
    optuna_url = postgres("optuna")
    # the study of some other --storage, with the directions this one's objectives have: Optuna would just join it
    optuna.create_study(storage=optuna_url, study_name="taken", directions=["minimize", "minimize"])
    config = study_file(tmp_path, "taken")
    proc = g2_study(["run", config, "--storage", tmp_path / "studies", "--set", f"study.optuna_storage={optuna_url}"],
                    tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"study.optuna_storage {optuna_url} already holds an Optuna study named 'taken', but "
            f"{tmp_path / 'studies' / 'taken'} holds no study") in proc.stderr
    assert not (tmp_path / "studies").exists()
    assert len(optuna.load_study(study_name="taken", storage=optuna_url).trials) == 0   # and it was left alone


@pytest.mark.parametrize("url,said", [
    ("postgresql+psycopg://g2:pw-secret-9@127.0.0.1:{port}/optuna",
     "cannot reach the Optuna storage study.optuna_storage=postgresql+psycopg://g2:***@127.0.0.1:{port}/optuna: "
     "connection failed"),
    ("postgresql+pg8000://g2@127.0.0.1:{port}/optuna",
     "study.optuna_storage postgresql+pg8000://g2@127.0.0.1:{port}/optuna: its database driver is not installed "
     "(No module named 'pg8000')"),
], ids=["server-down", "driver-missing"])
def test_an_optuna_storage_that_cannot_be_used_is_refused_before_the_study_writes_anything(tmp_path, url, said):
    if "psycopg" in url and importlib.util.find_spec("psycopg") is None:
        pytest.skip("the PostgreSQL driver is not installed (the postgres extra)")
    if "pg8000" in url and importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here: no missing driver to refuse")
    port = free_port()                                           # nothing listens there
    config = study_file(tmp_path, "refused")
    proc = g2_study(["run", config, "--storage", tmp_path / "studies", "--quiet",
                     "--set", f"study.optuna_storage={url.format(port=port)}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert said.format(port=port) in proc.stderr and "Traceback" not in proc.stderr
    assert "pw-secret-9" not in proc.stderr
    assert not (tmp_path / "studies").exists()                   # no study to resume: a corrected `run` starts clean


def test_an_optuna_storage_that_is_no_url_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"study.optuna_storage must be an SQLAlchemy database URL, e\.g\. "
                                         r"postgresql\+psycopg://USER@HOST/DB .* got 'optuna.db'"):
        load_study_config(None, ["study.optuna_storage=optuna.db"])
