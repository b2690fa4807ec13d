"""The study's side of Optuna: the persistent study, its sampler, and the searcher Ray Tune asks for trials.

Optuna keeps the study in `optuna.db` (or any RDB), so a resumed or extended study goes on with the same sampler
history; optuna-dashboard reads the same storage, with the objective names and the user attributes set here.
"""
from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from study import results
from study.config import StudyConfig
from study.paths import SearchLog, StudyPaths
from study.progress import describe_trial
from study.scoreboard import Scoreboard, ScoredPoint, derived_trial, keyed, row_key, scoring_key, told_rows
from study.space import DefineByRun
from study.tags import (
    ANSWERED_ATTR,
    MLFLOW_RUN_ATTR,
    MODEL_TAG,
    ORPHAN_ATTR,
    RAY_TRIAL_ATTR,
    REUSED,
    ROW_ATTR,
    TRAINED,
    TRAINING_KEY_TAG,
)
from study.tracking import open_tracker
from study.trial_end import TrialEnd
from trainables.config import TrialConfig
from trainables.durable import write_bytes
from trainables.report import EVAL_GATE, OK, TRAINING_KEY
from trainables.trainable import sweep_gates

log = logging.getLogger(__name__)
ANSWERED = "study/answered_from_results"   # MLflow parent metric: suggestions that needed no Ray trial


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, less its `study.stop()` once every point is told: Optuna allows that call only inside
    `study.optimize`, so in a `study.tell` of ask-and-tell it raises. `StudySearch.suggest` ends a used-up grid."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: StudyConfig, seed: int):
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if cfg.sampler == "grid":
        return GridSampler(cfg.grid(), seed=seed)
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


# Suggestions one `suggest` call may find answered before it gives the slot back to Tune until a trial ends:
# in a small categorical space the sampler repeats itself, and each answer is an Optuna trial.
ASKS_PER_SUGGESTION = 32


class StudySearch(Searcher):
    """Ray Tune's searcher of a study, on Optuna's ask-and-tell API: Ray trials only for what the study lacks.

    For every suggestion Optuna makes, the study's scoreboard (`study.scoreboard`) is asked first:
      - a setting the study scored already is told to Optuna at once from its row: no Ray trial;
      - a setting the sweep of a model in training will score waits for that trial's rows: no Ray trial;
      - a new setting of a model with a sweep (stored, or in training) becomes a Ray trial that scores that
        setting alone (`score_alone`: the trainable re-scores the stored model, its sweep cut to the setting);
      - anything else trains.
    The driver callback tells it each trial's end (`tell`, a `TrialEnd` decided once for every consumer); each row
    of it the Optuna study lacks becomes a completed Optuna trial of its own (`scoreboard.derived_trial`), so the
    sampler learns every point a trained model yields and Optuna's Pareto front is the study's. Everything Optuna
    holds lives in its storage (`optuna.db`): a resumed or extended driver reads which rows it has
    (`scoreboard.told_rows`) and adds each missing one exactly once. Diverged or errored trials are told FAIL,
    ones stopped early (ASHA) PRUNED: neither is a point.
    """

    def __init__(self, cfg: StudyConfig, root: str, space: DefineByRun, seed: int):
        super().__init__()   # the objectives and directions are the Optuna study's: multi-objective, not Tune's
        self.study_cfg, self.root, self.space = cfg, root, space
        self.sampler = make_sampler(cfg, seed)   # pickled with the experiment: a resume goes on with its RNG
        self.asked: dict[str, int] = {}            # Ray trial id -> its Optuna trial number, until it ends
        self.configs: dict[str, dict] = {}         # Ray trial id -> the config it was given, until it ends
        self.expected: dict[str, list[str]] = {}   # Ray trial id -> the row keys its sweep will score
        self.training: dict[str, str] = {}         # Ray trial id -> the `scoring_key` of its sweep
        self.waiting: dict[str, list[tuple[int, dict]]] = {}   # row key -> (Optuna trial, config) awaiting it
        self.answered = 0
        self.stalled = False     # every suggestion since the last trial ended was answered: wait for one
        self.exhausted = False   # ... and none was running, or the grid is used up: nothing is left to ask
        self._study: optuna.Study | None = None
        self._board: Scoreboard | None = None
        self._told: set[str] | None = None
        self._news: list[str] = []   # what this call answered, for the search log
        self.unshown: list[str] = []   # what the console has not shown yet (the driver callback takes it)

    # ----------------------------------------------------------------- state

    def __getstate__(self):
        return {**self.__dict__, "_study": None, "_board": None, "_told": None, "_news": [], "unshown": [],
                "_placed": None}

    def __setstate__(self, state):
        if "_ot_trials" in state:   # pickled by the OptunaSearch-based searcher of earlier versions
            state = {"study_cfg": state["study_cfg"], "root": state["root"], "space": state["_space"],
                     "sampler": state["_sampler"],
                     "asked": {tid: t.number for tid, t in state["_ot_trials"].items()
                               if tid not in state.get("_completed_trials", set())}}
        fresh = StudySearch.__new__(StudySearch)
        Searcher.__init__(fresh)
        defaults = {"configs": {}, "expected": {}, "training": {}, "waiting": {}, "answered": 0, "stalled": False,
                    "exhausted": False}
        self.__dict__.update({**fresh.__dict__, **defaults, **state, "_study": None, "_board": None, "_told": None,
                              "_news": [], "unshown": []})
        if type(self.sampler) is optuna.samplers.GridSampler:   # pickled before GridSampler above: same state
            self.sampler.__class__ = GridSampler

    def save(self, checkpoint_path: str):
        write_bytes(checkpoint_path, pickle.dumps(self.__getstate__()))

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default"):
        """Tune's own save_to_dir renames without an fsync: write the state file durably in its place."""
        self.save(os.path.join(checkpoint_dir, self.CKPT_FILE_TMPL.format(session_str)))

    def restore(self, checkpoint_path: str):
        placed = self.__dict__.get("_placed")
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        if placed is not None:
            self.place(*placed)

    def place(self, cfg: StudyConfig, root: str) -> None:
        """This driver's study config and directory, kept when Tune restores its saved state over this searcher:
        a study resumed on a new cluster may have a new MLflow server or Optuna storage."""
        self.study_cfg, self.root = cfg, root
        self._placed = (cfg, root)

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.load_study(study_name=self.study_cfg.name, sampler=self.sampler,
                                            storage=StudyPaths(Path(self.root)).optuna_url(self.study_cfg))
        return self._study

    @property
    def board(self) -> Scoreboard:
        """The scoreboard, read from the results once per driver; the rows it lacks are told to Optuna then."""
        if self._board is None:
            self._board = Scoreboard(self.study_cfg)
            self._told = told_rows(self.study)
            self._derive(self._board.add_frame(results.load(self.root, status=OK)), exclude=set())
        return self._board

    # ----------------------------------------------------------------- asking

    def suggest(self, trial_id: str):
        if self.stalled or self.exhausted:
            return Searcher.FINISHED if self.exhausted else None
        board = self.board
        for _ in range(ASKS_PER_SUGGESTION):
            if isinstance(self.sampler, GridSampler) and self.sampler.is_exhausted(self.study):
                self.exhausted = True   # every grid point asked (the running ones finish): no repeats
                self._news.append("every point of the grid has been asked for: no more trials")
                self._record()
                return Searcher.FINISHED
            trial = self.study.ask()
            config = {**self.space(trial), **trial.params}
            if (known := board.lookup(config)) is not None:
                self._answer(trial, known, config)
                continue
            key = row_key(keyed(config), self.study_cfg.task)
            if any(key in keys for keys in self.expected.values()):
                self.waiting.setdefault(key, []).append((trial.number, config))
                continue
            scoring = scoring_key(keyed(config), self.study_cfg.task)
            if board.has_sweep(config) or scoring in self.training.values():   # a setting that sweep lacks
                config = score_alone(config)   # the trainable waits for a model in training, then scores
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            self.asked[trial_id], self.configs[trial_id], self.training[trial_id] = trial.number, config, scoring
            self.expected[trial_id] = expected_rows(config, self.study_cfg.task)
            self._record()
            return config
        self.stalled = True
        self.exhausted = not self.asked
        if self.exhausted:
            self._news.append(f"the search asked {ASKS_PER_SUGGESTION} times in a row for settings the study "
                              f"has scored, with no trial running: nothing is left to learn, the run ends here")
        self._record()
        return Searcher.FINISHED if self.exhausted else None

    def _answer(self, trial: optuna.trial.Trial | int, point: ScoredPoint, config: dict, waited: bool = False
                ) -> None:
        """Tell Optuna a suggestion's values from the row that holds them."""
        self._set_attrs(trial, {ANSWERED_ATTR: point.trial_id})
        self.study.tell(trial, list(point.values), skip_if_finished=True)
        self.answered += 1
        self._news.append(f"suggestion {describe_trial(config)} answered from the results of trial {point.trial_id}"
                          + (", which it waited for" if waited else "") + ": no trial")

    def _record(self) -> None:
        """The search log (`study.paths.SearchLog`) and the MLflow parent run say what the search answered: once
        per call of Tune's, for every answer it gave."""
        if not self._news:
            return
        path = StudyPaths(Path(self.root)).search_log
        SearchLog(answered=self.answered, exhausted=self.exhausted,
                  lines=[*SearchLog.read(path).lines, *self._news]).write(path)
        self.unshown += self._news
        self._news = []
        try:
            tracker = open_tracker(self.study_cfg, self.root)
            tracker.attach()
            tracker.log_progress(self.answered, {ANSWERED: self.answered})
        except Exception as err:   # MLflow unreachable: the answers stand all the same
            log.warning("could not log the answered suggestions to MLflow: %s", err)

    def take_unshown(self) -> list[str]:
        """The lines the console should show now, each once."""
        lines, self.unshown = self.unshown, []
        return lines

    # ----------------------------------------------------------------- telling

    def on_trial_complete(self, trial_id, result=None, error=False):
        """Tune's call, before the driver callback's: the callback's `tell` closes the Optuna trial."""

    def tell(self, end: TrialEnd, *, mlflow_run_id: str | None = None, mlflow_link: str | None = None) -> None:
        """Close the trial's Optuna trial (COMPLETE with its own row's objectives, else PRUNED or FAIL), add each of
        its rows that Optuna lacks, and answer the suggestions that waited for them. With `mlflow_link` (the
        trial's MLflow run on its UI) each of those Optuna trials gets a note that links to it."""
        self.stalled = False
        number, config = self.asked.pop(end.trial_id, None), self.configs.pop(end.trial_id, None)
        self.expected.pop(end.trial_id, None)
        self.training.pop(end.trial_id, None)
        if number is None:   # asked by a searcher this one was not restored from, or recorded before
            return
        board = self.board
        new = board.add_rows(end.rows) if end.status == OK else []
        own = board.lookup(config or end.own_row) if end.status == OK else None
        attrs: dict[str, Any] = {RAY_TRIAL_ATTR: end.trial_id}
        if end.training_key:
            attrs |= {TRAINING_KEY_TAG: end.training_key, MODEL_TAG: REUSED if end.reused else TRAINED}
        if mlflow_run_id is not None:
            attrs[MLFLOW_RUN_ATTR] = mlflow_run_id
        if own is not None:
            attrs[ROW_ATTR] = own.key
        self._set_attrs(number, attrs)   # before Optuna closes it: a finished trial takes no attributes
        note = trial_note(mlflow_link, end.trial_id, self.study_cfg.name) if mlflow_link else None
        if note is not None:
            self._note(self._storage_id(number), note(number))
        if own is not None:
            self.study.tell(number, list(own.values), skip_if_finished=True)
            self._told.add(own.key)
        else:
            self.study.tell(number, state=TrialState.FAIL if end.failed else TrialState.PRUNED,
                            skip_if_finished=True)
        self._derive(new, exclude={own.key} if own else set(), run_id=mlflow_run_id, note=note)
        self._tell_waiting(failed=end.failed)
        self._record()

    def _derive(self, points: list[ScoredPoint], exclude: set[str], run_id: str | None = None, note=None) -> None:
        """Each point the Optuna study lacks as a completed trial of its own, once (with `note(number)`'s note)."""
        storage = self.study._storage
        for point in points:
            if point.key in self._told or point.key in exclude:
                continue
            frozen = derived_trial(point, self.space.params, {MLFLOW_RUN_ATTR: run_id} if run_id else {})
            trial_id = storage.create_new_trial(self.study._study_id, template_trial=frozen)   # Study.add_trial's
            if note is not None:
                self._note(trial_id, note(storage.get_trial_number_from_id(trial_id)))
            self._told.add(point.key)

    def _note(self, trial_id: int, body: str) -> None:
        """optuna-dashboard's trial note (Markdown), which it renders on the trial's page."""
        from optuna_dashboard._note import note_ver_key, save_note_with_version

        storage, study_id = self.study._storage, self.study._study_id
        version = storage.get_study_system_attrs(study_id).get(note_ver_key(trial_id), 0) + 1
        save_note_with_version(storage, study_id, trial_id, version, body)

    def _storage_id(self, number: int) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def _tell_waiting(self, failed: bool) -> None:
        """Suggestions that waited for rows: told the values that landed, or failed with the trial they waited on."""
        in_flight = {key for keys in self.expected.values() for key in keys}
        for key in [k for k in self.waiting if k in self.board.points or k not in in_flight]:
            for number, config in self.waiting.pop(key):
                if (point := self.board.lookup(config)) is not None:
                    self._answer(number, point, config, waited=True)
                else:   # the trial it waited for failed or was stopped early: so would this one
                    self.study.tell(number, state=TrialState.FAIL if failed else TrialState.PRUNED,
                                    skip_if_finished=True)

    def _set_attrs(self, trial: optuna.trial.Trial | int, attrs: dict[str, Any]) -> None:
        """Label an Optuna trial, by the `Trial` this driver asked for or by number (one an earlier driver asked
        for), through Optuna's public storage API. Optuna refuses attributes on a finished trial: one a killed
        driver finished (and labelled) before Tune saved this searcher is left as it is."""
        storage = optuna.storages.get_storage(StudyPaths(Path(self.root)).optuna_url(self.study_cfg))
        number = trial if isinstance(trial, int) else trial.number
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(self.study_cfg.name), number)
        try:
            for key, value in attrs.items():
                storage.set_trial_user_attr(trial_id, key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def trial_note(mlflow_link: str, ray_trial_id: str, study_name: str):
    """The note of the Optuna trials one Ray trial made, by Optuna trial number: the three ids and the MLflow link."""
    local = mlflow_link.startswith("http://127.0.0.1:")
    serve = f" (serve it with `g2-study ui {study_name}`)" if local else ""

    def body(number: int) -> str:
        return (f"**MLflow run:** [{mlflow_link}]({mlflow_link}){serve}\n\n"
                f"Optuna trial {number} · Ray trial `{ray_trial_id}`")
    return body


def score_alone(config: dict[str, Any]) -> dict[str, Any]:
    """A config whose model has a sweep already, scoring only its own setting (and the uncompressed model every
    final report carries): the rest of the sweep is in the results."""
    return {**config, "sweep.ranks": [], "sweep.bits": [], "sweep.paper": []}


def expected_rows(config: dict[str, Any], task: str) -> list[str]:
    """The row keys a trial of `config` will score: each setting of its sweep under each evaluation gate."""
    cfg = TrialConfig.from_flat({k: v for k, v in config.items() if not k.startswith("_")})
    flat, key = cfg.to_flat(), cfg.training_key()
    settings = cfg.sweep.settings(cfg.compress)
    if cfg.compress not in settings:
        settings.append(cfg.compress)
    return [row_key({**flat, **{f"compress.{f}": getattr(s, f) for f in ("rank", "bits", "paper", "step", "clip",
                                                                       "rel_step", "rel_clip", "targets")},
                     EVAL_GATE: gate, TRAINING_KEY: key}, task)
            for s in settings for gate in sweep_gates(cfg)]


def make_searcher(cfg: StudyConfig, paths: StudyPaths, seed: int) -> StudySearch:
    """The study's searcher (multi-objective: the objectives and directions live in the Optuna study)."""
    open_optuna_study(cfg, paths.optuna_url(cfg), seed)
    constants = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.base_trial().to_flat().items()}
    return StudySearch(cfg, str(paths.root), DefineByRun(cfg.search_space(), constants), seed)
