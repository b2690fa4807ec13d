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
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.config import StudyConfig
from study.failures import is_error_report
from study.paths import StudyPaths
from study.rows import trial_status
from study.space import DefineByRun
from study.tracking import open_tracker
from trainables.report import ERROR, FAILED, OK, REUSED_CHECKPOINT, TRAINING_KEY

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
    study = optuna.load_study(study_name=cfg.name, storage=url)
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        study._storage.set_trial_user_attr(trial._trial_id, "g2.orphan", ORPHAN_NOTE)
        study.tell(trial.number, state=TrialState.FAIL)
    return len(orphans)


# User attributes on every Optuna trial, so that optuna-dashboard leads to the trial's other records.
RAY_TRIAL_ATTR, MLFLOW_RUN_ATTR = "g2.ray_trial_id", "g2.mlflow_run_id"
TRAINING_KEY_ATTR, MODEL_ATTR = "g2.training_key", "g2.model"   # the trained model's key; "trained" | "reused"


class StudySearch(OptunaSearch):
    """Tells Optuna the truth about unfinished trials: a diverged or errored trial FAILED, one stopped
    early (ASHA) was PRUNED. Neither is a real point of the front.

    It also labels each Optuna trial (`_ot_trials`: Ray trial id -> the Optuna trial it asked for) with the Ray
    trial id, the trial's MLflow run and its model: what a user of optuna-dashboard needs to find the rest.
    """

    def __init__(self, *args, cfg: StudyConfig, root: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.study_cfg, self.root = cfg, root   # plain settings: the searcher is pickled with the experiment

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        self._set_attrs(trial_id, {RAY_TRIAL_ATTR: trial_id})
        return config

    def _set_attrs(self, trial_id: str, attrs: dict[str, Any]) -> None:
        """Optuna refuses attributes on a finished trial: one a killed driver finished (and labelled) before
        Tune saved this searcher comes back from `Tuner.restore` still open here, and is left as it is."""
        if trial_id not in self._ot_trials:
            return
        try:
            for key, value in attrs.items():
                self._ot_trials[trial_id].set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._label(trial_id, result)
        # Tune marks a scheduler-stopped result `done` too: only the final report carries the sweep
        status = ERROR if error or is_error_report(result) else trial_status(result)
        if status != OK:
            result, error = None, status in FAILED
        super().on_trial_complete(trial_id, result=result, error=error)

    def _label(self, trial_id: str, result: dict | None) -> None:
        """The trial's user attributes, set before Optuna closes it (a finished trial takes none)."""
        attrs: dict[str, Any] = {RAY_TRIAL_ATTR: trial_id}
        if result and result.get(TRAINING_KEY):
            attrs[TRAINING_KEY_ATTR] = result[TRAINING_KEY]
            attrs[MODEL_ATTR] = "reused" if result.get(REUSED_CHECKPOINT) else "trained"
        try:
            tracker = open_tracker(self.study_cfg, self.root)
            tracker.attach()
            if (run_id := tracker.find_trial_run_id(trial_id)) is not None:
                attrs[MLFLOW_RUN_ATTR] = run_id
        except Exception as err:   # MLflow unreachable: the Optuna trial is told its result all the same
            log.warning("could not find the MLflow run of trial %s: %s", trial_id, err)
        self._set_attrs(trial_id, attrs)


def make_searcher(cfg: StudyConfig, paths: StudyPaths, seed: int):
    """OptunaSearch (multi-objective; metric and mode live on the searcher only) behind a ConcurrencyLimiter."""
    url = paths.optuna_url(cfg)
    open_optuna_study(cfg, url, seed)
    constants = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.base_trial().to_flat().items()}
    searcher = StudySearch(space=DefineByRun(cfg.search_space(), constants), metric=list(cfg.objectives),
                           mode=cfg.modes(), sampler=make_sampler(cfg, seed),
                           storage=optuna.storages.RDBStorage(url), study_name=cfg.name,
                           cfg=cfg, root=str(paths.root))
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent)
