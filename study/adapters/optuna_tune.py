"""Ray Tune's OptunaSearch beyond its public API: the Optuna trial it asked for a Ray trial.

OptunaSearch keeps {Ray trial id: optuna.Trial} in `_ot_trials` and offers no accessor; the study labels each Optuna
trial with the ids of its other records (`study.search`), which takes that Trial. No upstream issue asks for an
accessor yet (searched ray-project/ray: none); until one exists this module is the only reader of `_ot_trials`.
"""
from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from study.adapters import LibraryChanged

UPGRADE = "(pinned in pyproject.toml; see study/adapters/optuna_tune.py before upgrading Ray or Optuna)"


def asked_trial(searcher: OptunaSearch, trial_id: str) -> optuna.Trial | None:
    """The Optuna trial `searcher` asked for Ray trial `trial_id`; None for a trial it did not ask for."""
    asked = getattr(searcher, "_ot_trials", None)
    if not isinstance(asked, dict):
        raise LibraryChanged(f"ray.tune.search.optuna.OptunaSearch no longer keeps its Optuna trials in a dict "
                             f"`_ot_trials` (found {type(asked).__name__}) {UPGRADE}")
    trial = asked.get(trial_id)
    if trial is not None and not isinstance(trial, optuna.Trial):
        raise LibraryChanged(f"OptunaSearch._ot_trials holds {type(trial).__name__}, not optuna.Trial {UPGRADE}")
    return trial
