"""What the study has already scored, for the search: every results row as a point, and answers to suggestions.

Train once, compress many: one trained model is scored on the whole compression sweep, so one Ray trial yields
one row per setting (and per evaluation gate). The scoreboard keeps each row under a key that says which model
was scored how:

    the model       its training key (`TrialConfig.training_key`)
    the scoring     the evaluation-only knobs that change a score (`lm.cache_*`, `train.max_eval_batches`, ...)
    the setting     the row's compression setting (`compress.*`) and evaluation gates (`g2.eval_gate`)

A suggestion whose key is on the board needs no trial: its values are read off the row. One whose model is on
the board (or being trained) but whose setting is not needs only that setting scored, not the model trained.
Rows become Optuna trials of their own (`derived_trial`), so the sampler learns from every point the study paid
for, and Optuna's Pareto front is the study's.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from study.config import StudyConfig
from study.front import front_objectives
from study.space import Param
from study.tags import GATES_ATTR, METHOD_ATTR, ROW_ATTR, SOURCE_ATTR
from trainables.config import SECTIONS, TrialConfig
from trainables.report import EVAL_GATE, METHOD, OK, STATUS, TRAINING_KEY, TRIAL_ID

# Evaluation-only knobs that choose where or how fast a model is scored, not what the score is.
NOT_SCORING = frozenset({"train.device", "train.impl", "train.precision", "train.cuda_graphs", "data.data_dir",
                         "data.cache_dir"})
SETTING = ("compress.rank", "compress.bits", "compress.paper", "compress.step", "compress.clip", "compress.targets",
           EVAL_GATE)
# The steps of the relative rounding modes count only in their rows' keys: the keys of rows scored before those modes
# existed (without these columns) stay what they were, so a resumed older study finds its rows.
RELATIVE_SETTING = ("compress.rel_step", "compress.rel_clip")


def scoring_knobs(task: str) -> tuple[str, ...]:
    """The task's evaluation-only knobs that change a score (a model re-scored under others is another point)."""
    names = []
    for section in ("g2", task, "train", "data"):
        for f in fields(SECTIONS[section]):
            name = f"{section}.{f.name}"
            if f.metadata.get("eval_only") and name not in NOT_SCORING:
                names.append(name)
    return tuple(names)


def _plain(value: Any) -> Any:
    """Parquet, pandas and Optuna hand back numpy scalars and NA: the JSON value a config would hold."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return list(value) if isinstance(value, tuple) else value


def _digest(flat: Mapping[str, Any], names: Iterable[str]) -> str:
    values = {k: _plain(flat.get(k)) for k in names}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def scoring_key(flat: Mapping[str, Any], task: str) -> str:
    """The key of a model scored under some evaluation knobs: the rows of one sweep share it."""
    return f"{flat[TRAINING_KEY]}-{_digest(flat, scoring_knobs(task))}"


def row_key(flat: Mapping[str, Any], task: str) -> str:
    """The key of one scored point: its model, the knobs it was scored under, its setting (module docstring)."""
    relative = str(_plain(flat.get("compress.paper"))).endswith("_rel")
    return f"{scoring_key(flat, task)}-{_digest(flat, SETTING + (RELATIVE_SETTING if relative else ()))}"


def distribution(param: Param) -> BaseDistribution:
    """The Optuna distribution `Param.suggest` asks with: a derived trial must name the same one."""
    if param.kind == "categorical":
        return CategoricalDistribution(list(param.choices))
    if param.kind == "int":
        return IntDistribution(int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return FloatDistribution(param.low, param.high, step=param.step, log=param.log)


@dataclass(frozen=True)
class ScoredPoint:
    """One results row as the search sees it."""

    key: str                     # `row_key`
    training_key: str
    trial_id: str                # the Ray trial that scored it
    knobs: dict[str, Any]        # the row's flat knobs (the trial's, with the row's setting)
    values: tuple[float, ...]    # the study's objectives, in order
    method: str
    eval_gate: str

    def params(self, space: Iterable[Param]) -> dict[str, tuple[Any, BaseDistribution]]:
        """The searched parameters this point has a value for, each with its distribution.

        A parameter the trial was not asked for (`when` did not hold) or whose value lies outside its range (a
        sweep rank that the space's choices do not list) is left out: Optuna takes trials with some parameters.
        """
        out = {}
        for param in space:
            if not all(self.knobs.get(k) == v for k, v in param.when):
                continue
            value = self.knobs.get(param.name)
            if _within(param, value):
                out[param.name] = (value, distribution(param))
        return out


def _within(param: Param, value: Any) -> bool:
    """Whether `param` could have suggested `value`."""
    if param.kind == "categorical":
        return value in param.choices
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if param.kind == "int" and (not float(value).is_integer() or (value - param.low) % (param.step or 1)):
        return False
    return param.low <= value <= param.high


class Scoreboard:
    """Every ok row of a study, by `row_key`; which models it has, and which it is training now."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.columns = front_objectives(cfg)   # {results column: min | max}, the objectives' order
        self.points: dict[str, ScoredPoint] = {}
        self.scorings: set[str] = set()   # `scoring_key`s: a model with a sweep under those evaluation knobs

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> list[ScoredPoint]:
        """Put results rows on the board (ok rows with every objective; others are no point); returns the new
        points, each once, whatever was added before."""
        new = []
        for row in rows:
            if row.get(STATUS) != OK or not row.get(TRAINING_KEY):
                continue
            values = tuple(_plain(row.get(c)) for c in self.columns)
            if any(v is None for v in values):
                continue
            knobs = {k: _plain(v) for k, v in row.items()}
            key = row_key(knobs, self.cfg.task)
            self.scorings.add(scoring_key(knobs, self.cfg.task))
            if key in self.points:
                continue
            point = ScoredPoint(key=key, training_key=knobs[TRAINING_KEY], trial_id=str(knobs[TRIAL_ID]),
                                knobs=knobs, values=tuple(float(v) for v in values), method=str(knobs.get(METHOD)),
                                eval_gate=str(knobs.get(EVAL_GATE)))
            self.points[key] = point
            new.append(point)
        return new

    def add_frame(self, df: pd.DataFrame) -> list[ScoredPoint]:
        return self.add_rows(df.to_dict("records")) if not df.empty else []

    def lookup(self, config: Mapping[str, Any]) -> ScoredPoint | None:
        """The point a suggested trial config would score, if the study scored it already."""
        return self.points.get(row_key(keyed(config), self.cfg.task))

    def has_sweep(self, config: Mapping[str, Any]) -> bool:
        """Whether the model of `config` was scored on its sweep under `config`'s evaluation knobs."""
        return scoring_key(keyed(config), self.cfg.task) in self.scorings


def keyed(config: Mapping[str, Any]) -> dict[str, Any]:
    """A flat trial config with its training key, as a results row carries it."""
    return {**config, TRAINING_KEY: training_key_of(config)}


def training_key_of(config: Mapping[str, Any]) -> str:
    """The training key of a flat trial config as the searcher hands it to Tune (study-private `_` keys aside)."""
    return TrialConfig.from_flat({k: v for k, v in config.items() if not k.startswith("_")}).training_key()


def derived_trial(point: ScoredPoint, space: Iterable[Param], attrs: Mapping[str, Any] = ()
                  ) -> optuna.trial.FrozenTrial:
    """A completed Optuna trial for a point the study scored without Optuna asking for it."""
    params = point.params(space)
    return optuna.trial.create_trial(
        params={name: value for name, (value, _) in params.items()},
        distributions={name: dist for name, (_, dist) in params.items()},
        values=list(point.values),
        user_attrs={ROW_ATTR: point.key, SOURCE_ATTR: point.trial_id, METHOD_ATTR: point.method,
                    GATES_ATTR: point.eval_gate, **dict(attrs)})


def told_rows(study: optuna.Study) -> set[str]:
    """The row keys the Optuna study holds as trials already: what a resumed or extended driver must not add."""
    return {t.user_attrs[ROW_ATTR] for t in study.get_trials(deepcopy=False) if ROW_ATTR in t.user_attrs}
