"""The three tools linked (study/links.py, study/search.py's notes, study/tracking.py's tags), and `status` and
`results` into a closed pipe, on the real tiny study of conftest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna_dashboard._note import get_note_from_system_attrs

from study.config import StudyConfig
from study.links import trial_ids
from study.paths import STATE_FILE, StudyState

G2 = str(Path(sys.executable).parent / "g2-study")


@pytest.fixture
def linked(real_study):
    cfg = StudyConfig.from_json(StudyState.read(real_study["dir"] / STATE_FILE).config)
    storage = optuna.storages.get_storage(f"sqlite:///{real_study['dir'] / 'optuna.db'}")
    study_id = storage.get_study_id_from_name(cfg.name)
    return cfg, storage, study_id, trial_ids(cfg, real_study["dir"]).set_index("trial_id")


@pytest.mark.slow
def test_every_optuna_trial_of_a_ray_trial_links_to_its_mlflow_run(real_study, linked):
    cfg, storage, study_id, ids = linked
    attrs = storage.get_study_system_attrs(study_id)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    noted = 0
    for trial in trials:
        run_id = trial.user_attrs.get("g2.mlflow_run_id")
        if run_id is None:   # a suggestion answered from the results: no run of its own
            continue
        note = get_note_from_system_attrs(attrs, trial._trial_id)["body"]
        ray_id = ids.index[ids["mlflow_run_id"] == run_id][0]
        # Markdown optuna-dashboard renders as a link, and the ids of the other two tools
        assert "](http://127.0.0.1:5000/#/experiments/" in note and f"/runs/{run_id})" in note, note
        assert f"Ray trial `{ray_id}`" in note and f"Optuna trial {trial.number}" in note
        noted += 1
    assert noted >= ids["optuna_trial"].notna().sum() >= 3   # the Ray trials' own and their derived rows'
    client = MlflowClient(f"sqlite:///{real_study['dir'] / 'mlflow.db'}")
    for ray_id, row in ids.iterrows():
        tags = client.get_run(row["mlflow_run_id"]).data.tags
        assert tags["g2.trial_id"] == ray_id and tags["g2.optuna_trial"] == str(row["optuna_trial"])
        assert storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
            study_id, int(row["optuna_trial"]))).user_attrs["g2.ray_trial_id"] == ray_id


@pytest.mark.slow
def test_results_and_status_show_the_three_ids(real_study, linked):
    cfg, storage, study_id, ids = linked
    where = ["--storage", str(real_study["storage"])]
    csv = subprocess.run([G2, "results", "real", *where, "--ids", "--format", "csv", "--columns",
                          "trial_id,optuna_trial,mlflow_run_id,mlflow_url"], capture_output=True, text=True, check=True)
    rows = [line.split(",") for line in csv.stdout.splitlines()[1:]]
    assert rows and all(r[1] == str(ids.at[r[0], "optuna_trial"]) and r[2] == ids.at[r[0], "mlflow_run_id"]
                        and r[3].endswith(f"/runs/{r[2]}") for r in rows)
    table = subprocess.run([G2, "status", "real", *where, "--ids"], capture_output=True, text=True, check=True).stdout
    header = next(line for line in table.splitlines() if line.startswith("trial "))
    assert header.split()[:4] == ["trial", "optuna", "mlflow", "run"]
    for ray_id, row in ids.iterrows():
        assert any(line.split()[:3] == [ray_id, str(row["optuna_trial"]), row["mlflow_run_id"]]
                   for line in table.splitlines()), table


@pytest.mark.slow
@pytest.mark.parametrize("command", [["status", "real"], ["results", "real", "--front"]])
def test_status_and_results_into_a_closed_pipe_exit_quietly(real_study, command):
    """`g2-study status NAME | head`: the reader is gone before the first line; no traceback, exit 0."""
    read, write = os.pipe()
    os.close(read)   # every write now fails with EPIPE
    proc = subprocess.run([G2, *command, "--storage", str(real_study["storage"])], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
