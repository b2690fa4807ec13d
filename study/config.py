"""StudyConfig: a study read from TOML plus `--set` overrides, validated completely before Ray starts.

    [study]                          # how the study runs
    name = "quickstart"
    task = "lm"
    preset = "tiny"
    num_samples = 8
    [trial]                          # fixed TrialConfig fields, dotted keys or nested tables
    "data.corpus" = "ptb"
    [space."g2.tau"]                 # searched TrialConfig fields (study.space)
    type = "float"
    low = 0.3
    high = 1.5

Every error names the field (`study.num_samples`, `trial.g2.tau`, `space.g2.tau.low`) and its allowed range.
"""
from __future__ import annotations

import math
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from study.space import Param, default_space, parse_space
from trainables.config import TASKS, TrialConfig
from trainables.fields import check_choice, check_range, parse_override, reject_unknown
from trainables.presets import DEFAULT_PRESETS, PRESETS
from trainables.report import (
    COMPRESSED_VAL_METRIC,
    GATE_BITS,
    GATE_COMPRESSION,
    HIGHER_IS_BETTER,
    MODEL_BITS,
    MODEL_COMPRESSION,
    VAL_METRIC,
)

SAMPLERS = ("tpe", "nsga2", "gp", "grid")
DEFAULT_STORAGE = "studies"               # relative to where g2-study runs
STDIN = "-"                               # the config path that reads the TOML from standard input
SCHEDULERS = ("none", "asha")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Metrics a trial reports that can be objectives, with their direction; "metric" is the task's own
# validation metric under the trial's compression (ppl: lower is better, BLEU: higher is better).
OBJECTIVES = {COMPRESSED_VAL_METRIC: "metric", VAL_METRIC: "metric", GATE_BITS: "min", MODEL_BITS: "min",
              GATE_COMPRESSION: "max", MODEL_COMPRESSION: "max"}


@dataclass(frozen=True)
class StudyConfig:
    """How one study runs. The trial-level knobs live in `trial` (fixed) and `space` (searched)."""

    name: str = "quickstart"
    task: Literal["lm", "nmt"] = "lm"
    preset: str = ""                       # TrialConfig preset; "" = awd (lm) / default (nmt)
    num_samples: int = 8                   # trials to run (grid: 0 = the whole grid once per seed)
    max_concurrent: int = 2
    sampler: Literal["tpe", "nsga2", "gp", "grid"] = "tpe"
    sampler_seed: int = 0
    objectives: tuple[str, ...] = (COMPRESSED_VAL_METRIC, GATE_BITS)
    seeds: tuple[int, ...] = (1111,)       # several seeds: each configuration may be trained per seed
    storage: str = DEFAULT_STORAGE         # a directory (shared by all nodes); the study lives in <storage>/<name>
    tracking_uri: str = ""                 # "" = sqlite:///<study dir>/mlflow.db
    optuna_storage: str = ""               # "" = sqlite:///<study dir>/optuna.db; or any RDB URL
    address: str = ""                      # Ray address; "" = a fresh local Ray, "auto" = the running cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0            # fractional GPUs pack small trials onto one device
    scheduler: Literal["none", "asha"] = "none"
    max_failures: int = 3                  # retries of a trial whose worker or node was lost, from its last
                                           # checkpoint; a trial whose own code raises is recorded, never retried
    trial: dict[str, Any] = field(default_factory=dict)   # flat, dotted TrialConfig overrides
    space: tuple[Param, ...] = ()          # () = the default space of docs/design.md §5

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(f"study.name must be 1-64 characters of letters, digits, '_', '-', '.', "
                             f"starting with a letter or digit, got {self.name!r}")
        check_choice("study.task", self.task, TASKS)
        if self.preset:
            check_choice("study.preset", self.preset, tuple(PRESETS[self.task]))
        check_range("study.num_samples", self.num_samples, 0 if self.sampler == "grid" else 1, 100_000,
                    integer=True)
        check_range("study.max_concurrent", self.max_concurrent, 1, 10_000, integer=True)
        check_choice("study.sampler", self.sampler, SAMPLERS)
        check_range("study.sampler_seed", self.sampler_seed, 0, 2**31 - 1, integer=True)
        if not self.objectives:
            raise ValueError("study.objectives must name at least one metric")
        for name in self.objectives:
            check_choice("study.objectives[]", name, tuple(OBJECTIVES))
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"study.objectives must not repeat a metric, got {list(self.objectives)}")
        if not self.seeds:
            raise ValueError("study.seeds must list at least one seed")
        for s in self.seeds:
            check_range("study.seeds[]", s, 0, 2**31 - 1, integer=True)
        if not self.storage or "://" in self.storage:
            raise ValueError(f"study.storage must be a directory path (on a cluster, one that every node mounts), "
                             f"got {self.storage!r}; object-store URIs are not supported for the study directory")
        if self.optuna_storage:
            try:
                make_url(self.optuna_storage)
            except ArgumentError:
                raise ValueError(f"study.optuna_storage must be an SQLAlchemy database URL, e.g. "
                                 f"postgresql+psycopg://USER@HOST/DB (\"\" keeps SQLite in the study directory), "
                                 f"got {self.optuna_storage!r}") from None
        check_range("study.cpus_per_trial", self.cpus_per_trial, 0.0, 1024.0, lo_open=True)
        check_range("study.gpus_per_trial", self.gpus_per_trial, 0.0, 64.0)
        check_choice("study.scheduler", self.scheduler, SCHEDULERS)
        check_range("study.max_failures", self.max_failures, 0, 100, integer=True)
        self.base_trial()                      # validates every fixed trial field
        for param in self.search_space():
            param.validate(self.base_trial())
        if self.sampler == "grid":
            for param in self.search_space():
                if param.grid_values() is None:
                    raise ValueError(f"space.{param.name}: the grid sampler needs choices (or an int range "
                                     f"with step), got a continuous {param.kind} range")
                if param.when:
                    raise ValueError(f"space.{param.name}.when: the grid sampler suggests every parameter "
                                     f"in every trial; remove the condition")

    # ------------------------------------------------------------------ derived views

    @property
    def preset_name(self) -> str:
        return self.preset or DEFAULT_PRESETS[self.task]

    def base_trial(self) -> TrialConfig:
        """The preset with the fixed `trial` overrides applied (errors name `trial.<field>`)."""
        try:
            return TrialConfig.from_flat({**self.trial, "task": self.task},
                                         base=TrialConfig.preset(self.task, self.preset_name))
        except ValueError as err:
            raise ValueError(f"trial: {err}") from None

    def search_space(self) -> tuple[Param, ...]:
        """The configured (or default) space; several seeds add `seed` as a dimension (the grid repeats)."""
        params = self.space or default_space(self.base_trial(), self.sampler)
        if len(self.seeds) > 1 and all(p.name != "seed" for p in params):
            params = (*params, Param("seed", "categorical", choices=self.seeds))
        return params

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space: every parameter's values."""
        return {p.name: p.grid_values() for p in self.search_space()}

    def total_samples(self) -> int:
        """num_samples, or for a grid with num_samples = 0 the size of the whole grid."""
        if self.sampler == "grid" and self.num_samples == 0:
            return math.prod(len(v) for v in self.grid().values())
        return self.num_samples

    def directions(self) -> list[str]:
        """Optuna directions ("minimize"/"maximize") of the objectives, in order."""
        out = []
        for name in self.objectives:
            mode = OBJECTIVES[name]
            if mode == "metric":
                mode = "max" if HIGHER_IS_BETTER[self.task] else "min"
            out.append("maximize" if mode == "max" else "minimize")
        return out

    def modes(self) -> list[str]:
        return ["max" if d == "maximize" else "min" for d in self.directions()]

    def to_json(self) -> dict[str, Any]:
        """Plain data that `from_json` turns back into this config (kept in the study's study.json)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("trial", "space")}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        return out | {"trial": dict(self.trial), "space": {p.name: p.table() for p in self.space}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyConfig:
        data = dict(data)
        space = parse_space(data.pop("space", {}))
        for key in ("objectives", "seeds"):
            data[key] = tuple(data[key])
        return cls(**data, space=space)

    def to_flat(self) -> dict[str, Any]:
        """For the MLflow parent run: every study field, the trial overrides and the space, flattened."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in ("trial", "space"):
                flat[f"study.{f.name}"] = getattr(self, f.name)
        flat |= {f"trial.{k}": v for k, v in self.trial.items()}
        flat |= {f"space.{p.name}": p.describe() for p in self.search_space()}
        return flat


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys: {"g2": {"tau": 1}} -> {"g2.tau": 1}; already flat keys pass through."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def load_study_config(path: Path | None, overrides: list[str] = (), **cli: Any) -> StudyConfig:
    """Read a TOML file (None: the defaults; "-": standard input), apply `--set key=value` overrides and explicit
    CLI options.

    Overrides address any field: `study.num_samples=4`, `trial.g2.p=0.5`, `space.g2.tau.high=2.0`; a bare
    TrialConfig field (`g2.p=0.5`) is a fixed trial override.
    """
    doc: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if str(path) != STDIN and not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            doc = tomllib.loads(sys.stdin.read() if str(path) == STDIN else path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
    unknown = sorted(set(doc) - {"study", "trial", "space"})
    if unknown:
        raise ValueError(f"unknown table(s) {', '.join(unknown)} in {path}; expected [study], [trial], [space.*]")
    study = dict(doc.get("study", {}))
    trial = flatten(doc.get("trial", {}))
    space = _flatten_space(doc.get("space", {}))
    space_overrides: dict[str, dict[str, Any]] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, _, rest = key.partition(".")
        if section == "study" and rest:
            study[rest] = value
        elif section == "space" and rest:
            name, _, attr = rest.rpartition(".")
            if not name:
                raise ValueError(f"--set {key}: use space.<field>.<attribute>, e.g. space.g2.tau.high=2.0")
            space_overrides.setdefault(name, {})[attr] = value
        else:
            trial[rest if section == "trial" and rest else key] = value
    study |= {k: v for k, v in cli.items() if v is not None}
    reject_unknown("study", StudyConfig, {**study, "trial": None, "space": None})
    for key in ("objectives", "seeds"):
        if key in study:
            if not isinstance(study[key], list):
                raise ValueError(f"study.{key} must be a list, got {study[key]!r}")
            study[key] = tuple(study[key])
    cfg = StudyConfig(**study, trial=trial, space=parse_space(space))
    if not space_overrides:
        return cfg
    # `--set space.g2.tau.high=2` edits the configured (or default) space in place
    tables = {p.name: p.table() for p in cfg.search_space()}
    for name, attrs in space_overrides.items():
        tables[name] = {**tables.get(name, {}), **attrs}
    return replace(cfg, space=parse_space(tables))


def _flatten_space(space: dict[str, dict]) -> dict[str, dict]:
    """`[space.g2.tau]` arrives from TOML as {"g2": {"tau": {...}}}; `[space."g2.tau"]` as {"g2.tau": {...}}."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, dict) and spec and all(isinstance(v, dict) and k != "when" for k, v in spec.items()):
            out |= {f"{name}.{k}": v for k, v in _flatten_space(spec).items()}
        else:
            out[name] = dict(spec)
    return out
