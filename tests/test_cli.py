"""The `g2-study` commands a user types after a study: results, the front, exports and the MLflow UI."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from study import results
from study.config import StudyConfig
from study.front import study_front
from study.paths import STATE_FILE, StudyState

from conftest import free_port, healthy, wait_for

pytestmark = pytest.mark.slow
G2 = str(Path(sys.executable).parent / "g2-study")


def cli(*args, cwd):
    return subprocess.run([G2, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_run_prints_where_results_and_mlflow_are(real_study):
    out = real_study["stdout"]
    assert "Pareto front" in out and "g2-study results real" in out and "g2-study ui real" in out
    assert f"{real_study['dir']}/results" in out and "mlflow.db" in out


def test_results_front_is_the_front_of_the_dataset(real_study, tmp_path):
    storage = str(real_study["storage"])
    proc = cli("results", "real", "--storage", storage, "--front", "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # trial ids are hex: one of only digits would read as a number
    printed = pd.read_csv(pd.io.common.StringIO(proc.stdout), dtype={"trial_id": str})
    cfg = StudyConfig.from_json(StudyState.read(real_study["dir"] / STATE_FILE).config)
    front = study_front(results.load(str(real_study["dir"])), cfg)
    assert len(printed) == len(front) > 0
    assert sorted(zip(printed["trial_id"], printed["gate_bits"])) == sorted(zip(front["trial_id"], front["gate_bits"]))
    table = cli("results", "real", "--storage", storage, "--front", cwd=tmp_path)
    assert table.returncode == 0 and "gate ×" in table.stdout


def test_results_where_and_parquet_export(real_study, tmp_path):
    out = tmp_path / "ok.parquet"
    proc = cli("results", "real", "--storage", str(real_study["storage"]), "--where",
               "status == 'ok' and `compress.rank` == 8", "--format", "parquet", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(out)
    assert len(df) > 0 and (df["compress.rank"] == 8).all() and (df["status"] == "ok").all()


def test_results_front_as_a_png_and_png_needs_an_output(real_study, tmp_path):
    out = tmp_path / "front.png"
    proc = cli("results", "real", "--storage", str(real_study["storage"]), "--format", "png", "--output", str(out),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    proc = cli("results", "real", "--storage", str(real_study["storage"]), "--format", "png", cwd=tmp_path)
    assert proc.returncode == 2 and "--format png needs --output" in proc.stderr


def test_results_where_runs_no_code_and_bad_filters_exit_2(real_study, tmp_path):
    marker = tmp_path / "PWNED"
    storage = str(real_study["storage"])
    proc = cli("results", "real", "--storage", storage, "--where", f"@pd.io.common.os.system('touch {marker}')",
               cwd=tmp_path)
    assert proc.returncode == 2 and not marker.exists() and proc.stdout == ""
    assert proc.stderr.startswith("g2-study results: error: invalid filter ") and "'@'" in proc.stderr
    proc = cli("results", "real", "--storage", storage, "--where", "status == 'ok' and", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "g2-study results: error: invalid filter \"status == 'ok' and\": invalid syntax\n"


def first_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The first line `proc` prints, waited for at most `timeout` seconds: a silent, hung process fails the test.

    A daemon thread reads it, then drains the rest of the output until `proc` ends, so a server that keeps logging
    never blocks on a full pipe.
    """
    lines: queue.Queue[str] = queue.Queue()

    def read():
        lines.put(proc.stdout.readline())
        for _ in proc.stdout:
            pass

    threading.Thread(target=read, daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{what} printed no line in {timeout}s (exit status {proc.poll()}: None = still running)")


def test_results_of_an_unknown_study_is_a_clear_error(tmp_path):
    proc = cli("results", "nope", "--storage", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "no study 'nope'" in proc.stderr


def test_ui_serves_the_study_runs(real_study, tmp_path):
    port = free_port()
    ui = subprocess.Popen([G2, "ui", "real", "--storage", str(real_study["storage"]), "--port", str(port)],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in first_line(ui, 60, "`g2-study ui`")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(f"{base}/health"), 120, "the MLflow UI", poll=0.5)
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": ["1"], "max_results": 100}).encode(),
                                         headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(request, timeout=10).read())["runs"]
        roles = sorted(r["data"]["tags"][[t["key"] for t in r["data"]["tags"]].index("g2.role")]["value"]
                       for r in runs)
        trials = results.load(str(real_study["dir"]))["trial_id"].nunique()
        assert roles.count("parent") == 1 and roles.count("trial") == trials >= 3
    finally:
        os.killpg(ui.pid, signal.SIGTERM)      # the server and its workers
        ui.wait(30)


def test_results_as_json_records_and_chosen_columns(real_study, tmp_path):
    storage = str(real_study["storage"])
    proc = cli("results", "real", "--storage", storage, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records, df = json.loads(proc.stdout), results.load(str(real_study["dir"]))
    assert isinstance(records, list) and len(records) == len(df) and set(records[0]) == set(df.columns)
    assert sorted({r["trial_id"] for r in records}) == sorted(set(df["trial_id"]))
    proc = cli("results", "real", "--storage", storage, "--columns", "trial_id,status,val_metric", "--format", "csv",
               cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "trial_id,status,val_metric"
    proc = cli("results", "real", "--storage", storage, "--columns", "trial_id,g2.nope", cwd=tmp_path)
    assert proc.returncode == 2 and "'g2.nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_front_table_tells_its_rows_apart(real_study, tmp_path):
    proc = cli("results", "real", "--storage", str(real_study["storage"]), "--front", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert not re.search(r"\de[+-]\d", proc.stdout)   # fixed-point, never 1.57e+03
    end = lines[0].index("val ppl") + len("val ppl")    # the table right-aligns its columns
    shown = [line[:end].split()[-1] for line in lines[1:]]
    cfg = StudyConfig.from_json(StudyState.read(real_study["dir"] / STATE_FILE).config)
    front = study_front(results.load(str(real_study["dir"])), cfg)
    assert len(shown) == len(front) > 0
    assert len(set(shown)) == front["val_metric"].nunique()   # distinct values print distinctly
    for text, value in zip(shown, front["val_metric"]):   # rounded, not truncated, to its printed decimals
        assert abs(float(text) - value) <= 0.5 * 10.0 ** -len(text.partition(".")[2]) + 1e-9


def test_filters_arrow_cannot_evaluate_exit_2_without_a_traceback(real_study, tmp_path):
    for where in ("epoch == 1.5", "g2.tau == 1e999", "`compress.rank` > 2.5"):
        proc = cli("results", "real", "--storage", str(real_study["storage"]), "--where", where, cwd=tmp_path)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr


def test_check_prints_values_as_toml(tmp_path):
    import tomllib

    proc = cli("check", "--smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pairs = [line.strip().split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line]
    parsed = {key: tomllib.loads(f"v = {value}")["v"] for key, value in pairs}   # every value is TOML
    assert parsed["study.name"] == "quickstart" and parsed["sweep.ranks"] == [0, 8]
    assert parsed["lm.tie_weights"] is True and parsed["study.objectives"] == ["compressed_val_metric", "gate_bits"]
    assert 'study.name = "quickstart"' in proc.stdout and "'" not in proc.stdout.split("space.")[0]


def test_version(tmp_path):
    import importlib.metadata

    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"g2-study {importlib.metadata.version('g2-study')}"
