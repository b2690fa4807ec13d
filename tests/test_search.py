"""The search learns from every scored row and spends no Ray trial on what the results hold (study.search,
study.scoreboard), on real trial reports, real Parquet files and a real Optuna study in SQLite; no Ray."""
from datetime import UTC, datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study import results
from study.config import StudyConfig
from study.front import study_front
from study.paths import SearchLog, StudyPaths
from study.results.rows import trial_rows
from study.scoreboard import Scoreboard, derived_trial, row_key, told_rows, training_key_of
from study.search import ASKS_PER_SUGGESTION, StudySearch, make_searcher, score_alone
from study.space import DefineByRun, Param, parse_space
from study.tags import ANSWERED_ATTR, ROW_ATTR, SOURCE_ATTR
from study.trial_end import TrialEnd, TrialLedger
from trainables.report import OK, TRAINING_KEY, VAL_METRIC, EpochReport


def study_config(tmp_path: Path, space: dict, **study) -> StudyConfig:
    """A study whose base trial is the `trial` fixture's: the fixture's reports are what its trials report."""
    trial = {"train.epochs": 2, "train.max_batches": 2, "train.max_eval_batches": 2, "sweep.ranks": [0, 8],
             "sweep.bits": [32, 4], "sweep.paper": ["round_clip"], "sweep.hard_gates": False}
    return StudyConfig(**{"name": "s", "task": "lm", "preset": "tiny", "num_samples": 4, "storage": str(tmp_path),
                          **study}, trial=trial, space=parse_space(space))


def rows_of(trial_id: str, config: dict, report: dict) -> list[dict]:
    return trial_rows("s", trial_id, config, EpochReport.from_dict(report), status=OK, error=None,
                      finished_at=datetime.now(UTC))


def end_of(trial_id: str, config: dict, reports: list[dict]) -> TrialEnd:
    """The trial's end as the driver callback hands it to the searcher."""
    ledger = TrialLedger("s")
    for report in reports:
        ledger.report(trial_id, config, report)
    return ledger.end(trial_id, config)


def test_a_row_read_back_from_parquet_has_the_key_of_the_config_that_scored_it(trial, tmp_path):
    config, reports = trial
    results.write_trial(tmp_path, "t1", rows_of("t1", config, reports[-1]))
    cfg = study_config(tmp_path, {})
    board = Scoreboard(cfg)
    points = board.add_frame(results.load(tmp_path))
    assert len(points) == len(reports[-1]["sweep"]) == 5   # none, svd 8, quant 4, svd+quant, round_clip
    # the trial's own setting, and any other sweep setting of the same model, are on the board
    own = board.lookup(config)
    assert own is not None and own.trial_id == "t1"
    quant = board.lookup({**config, "compress.bits": 4})
    assert quant is not None and quant.method == "quant" and quant.values[1] < own.values[1]
    # not another setting, another model or another scoring
    assert board.lookup({**config, "compress.rank": 16}) is None
    assert board.lookup({**config, "g2.tau": 0.5}) is None
    assert board.lookup({**config, "lm.cache_window": 100}) is None
    assert board.lookup({**config, "train.impl": "reference"}) is not None   # how it runs, not what it scores
    # a new setting of this sweep is scored alone; a model re-scored under other evaluation knobs (the cache
    # pointer) needs its whole sweep again
    assert board.has_sweep({**config, "compress.rank": 16})
    assert not board.has_sweep({**config, "lm.cache_window": 100})
    # each point once, however often it is added
    assert board.add_frame(results.load(tmp_path)) == []


def test_a_derived_trial_names_the_searched_params_the_row_has_within_their_range(trial, tmp_path):
    config, reports = trial
    board = Scoreboard(study_config(tmp_path, {}))
    (point, *_) = [p for p in board.add_rows(rows_of("t1", config, reports[-1])) if p.method == "svd+quant"]
    space = (Param("g2.gate_mode", "categorical", choices=("lstm", "g2")),
             Param("g2.tau", "float", low=0.3, high=1.5, log=True, when=(("g2.gate_mode", "g2"),)),
             Param("compress.rank", "categorical", choices=(0, 16)),    # the row's rank 8 is not a choice
             Param("compress.bits", "int", low=2, high=8))
    frozen = derived_trial(point, space, {"g2.mlflow_run_id": "r1"})
    assert frozen.params == {"g2.gate_mode": "g2", "g2.tau": pytest.approx(config["g2.tau"]), "compress.bits": 4}
    assert frozen.values == list(point.values)
    assert frozen.user_attrs[ROW_ATTR] == point.key and frozen.user_attrs[SOURCE_ATTR] == "t1"
    assert frozen.user_attrs["g2.mlflow_run_id"] == "r1"
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trial(frozen)
    assert told_rows(study) == {point.key}


def searcher_for(cfg: StudyConfig) -> StudySearch:
    StudyPaths.of(cfg).root.mkdir(parents=True)
    return make_searcher(cfg, StudyPaths.of(cfg), seed=0)


def test_every_row_of_a_finished_trial_reaches_optuna_once_and_fronts_agree(trial, tmp_path):
    config, reports = trial
    cfg = study_config(tmp_path, {"g2.gate_mode": {"choices": ["g2"]}})
    search = searcher_for(cfg)
    suggested = search.suggest("t1")
    assert suggested["g2.gate_mode"] == "g2"
    final = reports[-1]
    # the trial trains `config`'s model (same knobs: the searcher's config is the study's base trial)
    assert training_key_of(suggested) == final[TRAINING_KEY]
    end = end_of("t1", suggested, reports)
    rows = list(end.rows)
    results.write_trial(StudyPaths.of(cfg).root, "t1", rows)
    search.tell(end, mlflow_run_id="r1")

    study = optuna.load_study(study_name="s", storage=StudyPaths.of(cfg).optuna_url(cfg))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == len(rows) == 5   # the asked trial (its own row) and 4 derived ones
    assert sorted(t.user_attrs[ROW_ATTR] for t in complete) == sorted(row_key(r, "lm") for r in rows)
    asked = next(t for t in complete if "g2.ray_trial_id" in t.user_attrs)
    assert asked.user_attrs["g2.mlflow_run_id"] == "r1" and asked.user_attrs["g2.model"] == "trained"
    assert all(t.user_attrs["g2.mlflow_run_id"] == "r1" for t in complete)   # each derived row leads to its run
    # Optuna's Pareto front is the study's (`g2-study results --front`, the MLflow parent's front.csv)
    front = study_front(results.load(StudyPaths.of(cfg).root), cfg)
    assert sorted(tuple(t.values) for t in study.best_trials) == sorted(
        zip(front[VAL_METRIC].tolist(), front["gate_bits"].astype(float).tolist()))

    # a resumed driver (the searcher restored from its pickle) neither adds them again nor loses them
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    again = StudySearch.__new__(StudySearch)
    again.restore(str(path))
    assert again.board is not None   # reads the results and backfills what Optuna lacks: nothing
    assert len(optuna.load_study(study_name="s", storage=StudyPaths.of(cfg).optuna_url(cfg)).trials) == 5


def test_a_known_suggestion_is_answered_without_a_trial_and_an_exhausted_space_finishes(trial, tmp_path):
    config, reports = trial
    cfg = study_config(tmp_path, {"g2.gate_mode": {"choices": ["g2"]}})
    search = searcher_for(cfg)
    suggested = search.suggest("t1")
    end = end_of("t1", suggested, reports)
    results.write_trial(StudyPaths.of(cfg).root, "t1", list(end.rows))
    search.tell(end)
    # the space holds one model, which is trained and scored: every suggestion is answered, none is a trial
    assert search.suggest("t2") == "FINISHED"
    study = optuna.load_study(study_name="s", storage=StudyPaths.of(cfg).optuna_url(cfg))
    answered = [t for t in study.trials if ANSWERED_ATTR in t.user_attrs]
    assert len(answered) == ASKS_PER_SUGGESTION and all(t.state == TrialState.COMPLETE for t in answered)
    assert {t.user_attrs[ANSWERED_ATTR] for t in answered} == {"t1"}
    log = SearchLog.read(StudyPaths.of(cfg).search_log)
    assert log.answered == ASKS_PER_SUGGESTION and log.exhausted
    assert "answered from the results of trial t1" in log.lines[0] and "nothing is left" in log.lines[-1]


def test_the_last_point_of_a_grid_is_told_and_the_grid_finishes(trial, tmp_path):
    """Optuna's GridSampler stops the study once its grid is told, which raises outside `study.optimize`: the
    searcher's tell of the last point must close it (a lost worker's retry reached this), and the next ask ends."""
    config, reports = trial
    cfg = study_config(tmp_path, {"g2.gate_mode": {"choices": ["g2"]}}, sampler="grid")
    search = searcher_for(cfg)
    end = end_of("t1", search.suggest("t1"), reports)
    results.write_trial(StudyPaths.of(cfg).root, "t1", list(end.rows))
    search.tell(end)
    study = optuna.load_study(study_name="s", storage=StudyPaths.of(cfg).optuna_url(cfg))
    assert [t.state for t in study.trials if t.user_attrs.get("g2.ray_trial_id") == "t1"] == [TrialState.COMPLETE]
    assert search.suggest("t2") == "FINISHED"


def test_a_suggestion_of_a_model_in_training_waits_for_its_rows_and_a_new_setting_is_scored_alone(trial, tmp_path):
    config, reports = trial
    space = {"g2.gate_mode": {"choices": ["g2"]}, "compress.rank": {"type": "int", "low": 0, "high": 16, "step": 4}}
    cfg = study_config(tmp_path, space, sampler="grid")
    search = searcher_for(cfg)
    first = search.suggest("t1")
    # while t1 trains, every suggestion of its sweep waits for its rows; one outside the sweep is a trial
    second = search.suggest("t2")
    assert second is not None and second["compress.rank"] not in (0, 8)
    assert training_key_of(second) == training_key_of(first)
    assert second["sweep.ranks"] == []   # it waits for t1's model and scores its own rank alone
    waiting = {k: len(v) for k, v in search.waiting.items()}
    assert sum(waiting.values()) >= 1
    end = end_of("t1", first, reports)
    results.write_trial(StudyPaths.of(cfg).root, "t1", list(end.rows))
    search.tell(end)
    assert not search.waiting   # told the values t1's rows hold
    study = optuna.load_study(study_name="s", storage=StudyPaths.of(cfg).optuna_url(cfg))
    told = [t for t in study.trials if t.user_attrs.get(ANSWERED_ATTR) == "t1"]
    assert len(told) == sum(waiting.values()) and all(t.state == TrialState.COMPLETE for t in told)
    # a setting of a stored model that the sweep lacks is scored alone: the sweep is cut to it
    third = search.suggest("t3")
    assert third is not None and third["sweep.ranks"] == [] and third["sweep.bits"] == []


def test_score_alone_keeps_the_training_knobs():
    config = {"g2.tau": 0.5, "sweep.ranks": [0, 8], "sweep.bits": [32], "sweep.paper": ["round"]}
    assert score_alone(config) == {"g2.tau": 0.5, "sweep.ranks": [], "sweep.bits": [], "sweep.paper": []}


def test_a_searcher_pickled_by_the_optuna_search_of_earlier_versions_resumes(tmp_path):
    """Experiments saved before the ask-and-tell searcher pickled an OptunaSearch's state: its open trials map."""
    cfg = study_config(tmp_path, {})

    class OldTrial:
        number = 3

    space = DefineByRun((), {})
    state = {"study_cfg": cfg, "root": str(tmp_path), "_space": space, "_sampler": optuna.samplers.TPESampler(seed=1),
             "_ot_trials": {"a": OldTrial(), "b": OldTrial()}, "_completed_trials": {"b"}, "_metric": ["x"]}
    search = StudySearch.__new__(StudySearch)
    search.__setstate__(state)
    assert search.asked == {"a": 3} and search.space is space and search.answered == 0 and not search.stalled
