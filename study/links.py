"""One trial's three ids, side by side: Ray's (the results' `trial_id`), Optuna's trial number and MLflow's run.

Ray names the trial, the search asked Optuna for it (the Optuna trial carries the Ray id as `g2.ray_trial_id`) and
the driver opened its MLflow child run (tagged `g2.trial_id`, and `g2.optuna_trial`). `g2-study results --ids` and
`g2-study status --ids` join this table on `trial_id`. Read-only: nothing is created in either store.
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

from study.config import StudyConfig
from study.paths import StudyPaths
from study.tags import RAY_TRIAL_ATTR, ROLE_TAG, STUDY_TAG, TRIAL_ROLE, TRIAL_TAG
from study.tracking import find_experiment_id, run_url, ui_server
from trainables.report import TRIAL_ID

ID_COLUMNS = ("optuna_trial", "mlflow_run_id", "mlflow_url")


def trial_ids(cfg: StudyConfig, root: str | Path) -> pd.DataFrame:
    """`trial_id` with its Optuna trial number and MLflow run id and link, one row per Ray trial either knows."""
    paths = StudyPaths(Path(root))
    numbers = _optuna_numbers(paths.optuna_url(cfg), cfg.name)
    runs = _mlflow_runs(paths.tracking_uri(cfg), cfg.name)
    ids = sorted(set(numbers) | set(runs))
    return pd.DataFrame({TRIAL_ID: ids,
                         "optuna_trial": pd.array([numbers.get(t) for t in ids], dtype="Int64"),
                         "mlflow_run_id": [runs.get(t, (None, None))[0] for t in ids],
                         "mlflow_url": [runs.get(t, (None, None))[1] for t in ids]})


def with_ids(df: pd.DataFrame, ids: pd.DataFrame) -> pd.DataFrame:
    """`df` (rows with a `trial_id`) with the id columns after `trial_id`."""
    out = df.merge(ids, on=TRIAL_ID, how="left")
    at = list(out.columns).index(TRIAL_ID) + 1
    columns = [c for c in out.columns if c not in ID_COLUMNS]
    return out[columns[:at] + list(ID_COLUMNS) + columns[at:]]


def _optuna_numbers(url: str, study_name: str) -> dict[str, int]:
    """Ray trial id -> the number of the Optuna trial the search asked for it (derived trials carry none)."""
    storage = optuna.storages.get_storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return {}
    return {t.user_attrs[RAY_TRIAL_ATTR]: t.number for t in storage.get_all_trials(study_id, deepcopy=False)
            if RAY_TRIAL_ATTR in t.user_attrs}


def _mlflow_runs(tracking_uri: str, experiment: str) -> dict[str, tuple[str, str]]:
    """Ray trial id -> (its child run's id, that run's page on the MLflow UI)."""
    from mlflow.tracking import MlflowClient

    experiment_id = find_experiment_id(tracking_uri, experiment)
    if experiment_id is None:
        return {}
    client, server = MlflowClient(tracking_uri=tracking_uri), ui_server(tracking_uri)
    query = f"tags.`{ROLE_TAG}` = '{TRIAL_ROLE}' AND tags.`{STUDY_TAG}` = '{experiment}'"
    found, token = {}, None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        for run in page:
            found[run.data.tags[TRIAL_TAG]] = (run.info.run_id, run_url(server, experiment_id, run.info.run_id))
        token = page.token
        if not token:
            return found
