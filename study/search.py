"""The study's side of Optuna: the persistent study, its sampler, and the searcher Ray Tune asks for trials.

Optuna keeps the study in `optuna.db` (or any RDB), so a resumed or extended study goes on with the same sampler
history; optuna-dashboard reads the same storage, with the objective names and the user attributes set here.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from study.adapters.optuna_tune import asked_trial
from study.config import StudyConfig
from study.paths import StudyPaths
from study.space import DefineByRun
from study.tags import MLFLOW_RUN_ATTR, MODEL_TAG, ORPHAN_ATTR, RAY_TRIAL_ATTR, REUSED, TRAINED, TRAINING_KEY_TAG
from study.trial_end import TrialEnd

log = logging.getLogger(__name__)


def make_sampler(cfg: StudyConfig, seed: int):
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(cfg.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_optuna_study(cfg: StudyConfig, url: str, seed: int):
    """Create or load the persistent study and refuse one whose stored directions differ."""
    study = optuna.create_study(storage=url, study_name=cfg.name, load_if_exists=True,
                                directions=cfg.directions(), sampler=make_sampler(cfg, seed))
    stored = [d.name.lower() for d in study.directions]
    if stored != cfg.directions():
        raise ValueError(f"the Optuna study {cfg.name!r} in {url} has directions {stored}, but study.objectives "
                         f"{list(cfg.objectives)} need {cfg.directions()}; use another study.name")
    if study.metric_names != list(cfg.objectives):   # what optuna-dashboard labels the axes and columns with
        with warnings.catch_warnings():   # "experimental" since Optuna 3.2, and unchanged since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(cfg.objectives))
    return study


ORPHAN_NOTE = ("handed out by Optuna to a driver that was killed before Ray Tune saved the trial; "
               "the resumed study asked for a new one in its place")


def fail_orphaned_trials(cfg: StudyConfig, url: str) -> int:
    """Mark FAIL, with a note why, the Optuna trials a killed driver left RUNNING; returns how many.

    Optuna stores a trial when it is asked for, Tune saves its experiment every few seconds: a trial asked for in
    between is unknown to the restored experiment, which asks again. Once a run is over, every RUNNING trial is
    such an orphan (it was handed out, never run to a report).
    """
    storage = optuna.storages.get_storage(url)
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    study_id = storage.get_study_id_from_name(cfg.name)
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                    ORPHAN_ATTR, ORPHAN_NOTE)
        study.tell(trial.number, state=TrialState.FAIL)
    return len(orphans)


class StudySearch(OptunaSearch):
    """OptunaSearch told each trial's end by the study's driver callback (`tell`), as a typed `TrialEnd`.

    Tune's own `on_trial_complete` reaches it first, with a raw result; it waits for the callback instead, which
    decides the end once for every consumer (`study.trial_end`). So Optuna hears the truth about unfinished trials:
    a diverged or errored trial FAILED, one stopped early (ASHA) PRUNED; neither is a point of the front.

    Each Optuna trial is labelled with the Ray trial id, the trial's MLflow run and its model: what a user of
    optuna-dashboard needs to find the rest.
    """

    def __init__(self, *args, cfg: StudyConfig, root: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.study_cfg, self.root = cfg, root   # plain settings: the searcher is pickled with the experiment

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        self._label(trial_id, {RAY_TRIAL_ATTR: trial_id})
        return config

    def on_trial_complete(self, trial_id, result=None, error=False):
        """Tune's call, before the driver callback's: the callback's `tell` closes the Optuna trial."""

    def tell(self, end: TrialEnd, *, mlflow_run_id: str | None = None) -> None:
        """Close the trial's Optuna trial: COMPLETE with the objectives at its own setting, else PRUNED or FAIL."""
        if asked_trial(self, end.trial_id) is None:   # asked by a searcher this one was not restored from
            return
        attrs: dict[str, Any] = {RAY_TRIAL_ATTR: end.trial_id}
        if end.training_key:
            attrs |= {TRAINING_KEY_TAG: end.training_key, MODEL_TAG: REUSED if end.reused else TRAINED}
        if mlflow_run_id is not None:
            attrs[MLFLOW_RUN_ATTR] = mlflow_run_id
        self._label(end.trial_id, attrs)   # before Optuna closes it: a finished trial takes no attributes
        super().on_trial_complete(end.trial_id, result=end.objectives(self.study_cfg.objectives), error=end.failed)

    def _label(self, trial_id: str, attrs: dict[str, Any]) -> None:
        """Optuna refuses attributes on a finished trial: one a killed driver finished (and labelled) before
        Tune saved this searcher comes back from `Tuner.restore` still open here, and is left as it is."""
        trial = asked_trial(self, trial_id)
        if trial is None:
            return
        try:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def make_searcher(cfg: StudyConfig, paths: StudyPaths, seed: int) -> StudySearch:
    """The study's OptunaSearch (multi-objective; metric and mode live on the searcher only)."""
    url = paths.optuna_url(cfg)
    open_optuna_study(cfg, url, seed)
    constants = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.base_trial().to_flat().items()}
    searcher = StudySearch(space=DefineByRun(cfg.search_space(), constants), metric=list(cfg.objectives),
                           mode=cfg.modes(), sampler=make_sampler(cfg, seed),
                           storage=optuna.storages.RDBStorage(url), study_name=cfg.name,
                           cfg=cfg, root=str(paths.root))
    return searcher
