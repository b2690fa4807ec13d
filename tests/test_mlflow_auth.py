"""MLflow with authentication (`g2-study mlflow-server`, study/mlflow_server.py): a real basic-auth server on
loopback that refuses requests without credentials, a study tracked to it, and wrong credentials refused before
anything is written."""
import os
import re
import stat
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.mlflow_server import PASSWORD_VAR, USERNAME_VAR, server_launch
from study.tags import ROLE_TAG, STUDY_TAG

from conftest import free_port, g2_mlflow_server, study_file

BIN = Path(sys.executable).parent
ADMIN, PASSWORD = "g2admin", "a-long-test-password-7"


def g2_study(*args, env, cwd, timeout=600):
    return subprocess.run([str(BIN / "g2-study"), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def credentials(user: str | None, password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (USERNAME_VAR, PASSWORD_VAR)}
    return {**env, **({USERNAME_VAR: user} if user else {}), **({PASSWORD_VAR: password} if password else {})}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`g2-study mlflow-server` as the README's cluster recipe starts it, credentials from the environment."""
    storage = tmp_path_factory.mktemp("auth_storage")
    with g2_mlflow_server(storage, credentials(ADMIN, PASSWORD)) as (uri, proc):
        yield {"uri": uri, "pid": proc.pid, "storage": storage}


def test_the_server_refuses_requests_without_credentials_and_listens_on_loopback_only(server):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server['uri']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    listening = [c.laddr.ip for p in [psutil.Process(server["pid"]), *psutil.Process(server["pid"]).children(True)]
                 for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}
    # the secret reached the server through its environment, never its command line (`ps` shows those to all)
    assert all(PASSWORD not in " ".join(p.cmdline())
               for p in [psutil.Process(server["pid"]), *psutil.Process(server["pid"]).children(True)])
    assert PASSWORD not in (server["storage"] / "mlflow-auth" / "basic_auth.ini").read_text()


@pytest.mark.slow
def test_a_study_tracks_to_the_authenticated_server(server, tmp_path):
    config = study_file(tmp_path, "guarded", num_samples=1, epochs=1, max_batches=4, max_eval_batches=2)
    ran = g2_study("run", config, "--storage", tmp_path / "studies", "--tracking-uri", server["uri"], "--quiet",
                   env=credentials(ADMIN, PASSWORD), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    os.environ[USERNAME_VAR], os.environ[PASSWORD_VAR] = ADMIN, PASSWORD
    try:
        client = MlflowClient(tracking_uri=server["uri"])
        experiment = client.get_experiment_by_name("guarded")
        runs = client.search_runs([experiment.experiment_id], f"tags.`{STUDY_TAG}` = 'guarded'")
    finally:
        del os.environ[USERNAME_VAR], os.environ[PASSWORD_VAR]
    roles = sorted(r.data.tags.get(ROLE_TAG) for r in runs)
    assert roles == ["parent", "trial"] and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.parametrize("user,password,said", [
    (ADMIN, "not-the-password-1", f"refused this driver as user '{ADMIN}'"),
    (None, None, f"refused this driver without credentials ({USERNAME_VAR} is not set)"),
])
def test_wrong_credentials_are_refused_before_the_study_writes_anything(server, tmp_path, user, password, said):
    config = study_file(tmp_path, "refused", num_samples=1, epochs=1, max_batches=4, max_eval_batches=2)
    ran = g2_study("run", config, "--storage", tmp_path / "studies", "--tracking-uri", server["uri"], "--quiet",
                   env=credentials(user, password), cwd=tmp_path, timeout=120)
    assert ran.returncode == 2, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert said in ran.stderr and f"set {USERNAME_VAR} and {PASSWORD_VAR}" in ran.stderr
    assert not (tmp_path / "studies").exists()      # no study directory, so a corrected `run` starts clean


def test_a_server_that_is_not_there_is_named_at_once(tmp_path):
    config = study_file(tmp_path, "nowhere", num_samples=1, epochs=1)
    uri = f"http://127.0.0.1:{free_port()}"
    ran = g2_study("run", config, "--storage", tmp_path / "studies", "--tracking-uri", uri, "--quiet",
                   env=credentials(None, None), cwd=tmp_path, timeout=120)
    assert ran.returncode == 2 and f"cannot reach the MLflow server at {uri}" in ran.stderr
    assert not (tmp_path / "studies").exists()


@pytest.mark.parametrize("env,said", [
    ({}, f"set {USERNAME_VAR} and {PASSWORD_VAR}"),
    ({USERNAME_VAR: ADMIN, PASSWORD_VAR: "short"}, f"{PASSWORD_VAR} must be at least 12 characters"),
])
def test_the_server_command_refuses_missing_or_weak_credentials(tmp_path, env, said):
    with pytest.raises(ValueError, match=said):
        server_launch(tmp_path, environ=env)
    assert not (tmp_path / "mlflow-auth").exists()


def test_listening_beyond_loopback_is_asked_for_and_flagged(tmp_path):
    env = {USERNAME_VAR: ADMIN, PASSWORD_VAR: PASSWORD}
    assert not server_launch(tmp_path, environ=env).exposed
    assert not server_launch(tmp_path, host="::1", environ=env).exposed
    exposed = server_launch(tmp_path, host="0.0.0.0", environ=env)
    assert exposed.exposed and exposed.argv[exposed.argv.index("--host") + 1] == "0.0.0.0"


def test_mlflow_s_credentials_file_serves_the_server_and_the_driver(server, tmp_path):
    """`ray up` and Ray Jobs have no terminal to type a password in: ~/.mlflow/credentials (MLflow's own file)."""
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {ADMIN}\nmlflow_tracking_password = {PASSWORD}\n")
    launch = server_launch(tmp_path, environ={"HOME": str(home)})
    assert launch.env["MLFLOW_AUTH_ADMIN_USERNAME"] == ADMIN and launch.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == PASSWORD
    check = [sys.executable, "-c", f"from study.preflight import check_tracking_access; "
                                   f"check_tracking_access({server['uri']!r})"]
    for own_home, ok in ((home, True), (tmp_path, False)):
        env = {**credentials(None, None), "HOME": str(own_home)}
        proc = subprocess.run(check, env=env, capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) is ok, proc.stderr[-2000:]
    assert "refused this driver without credentials" in proc.stderr


def test_the_readme_s_credentials_recipe_writes_a_file_only_its_owner_reads(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = re.search(r"^ *\(umask 077;.*?credentials\)$", readme, re.S | re.M)[0]
    proc = subprocess.run(["bash", "-c", textwrap.dedent(recipe)], input=f"{PASSWORD}\n", text=True,
                          env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]}, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / ".mlflow" / "credentials"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert server_launch(tmp_path / "s", environ={"HOME": str(tmp_path)}).env["MLFLOW_AUTH_ADMIN_PASSWORD"] == PASSWORD


def test_the_cluster_recipe_starts_no_server_beyond_loopback():
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "study" / "cluster.yaml").read_text())
    head = " ".join(recipe["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "g2-study mlflow-server --storage" in head and "mlflow server" not in head   # the authenticated one
    assert PASSWORD_VAR not in head and "password" not in head.lower()
