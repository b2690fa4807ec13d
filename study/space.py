"""The search space: dotted TrialConfig fields with ranges or choices, suggested define-by-run through Optuna.

    [space."g2.tau"]                       # a float range, log scale
    type = "float"
    low = 0.3
    high = 1.5
    log = true
    when = { "g2.gate_mode" = "g2" }       # only suggested when the trial is a g2 trial

A conditional parameter that is not suggested keeps its fixed value, so an `lstm` trial never varies τ and
trials that differ only in unused knobs share one trained model (their training keys match).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from trainables.config import TrialConfig
from trainables.fields import check_choice

KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searched field."""

    name: str                                   # a dotted TrialConfig field, e.g. "g2.tau"
    kind: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[tuple[str, Any], ...] = field(default=())   # suggest only if these fields have these values

    def validate(self, base: TrialConfig) -> None:
        """Refuse unknown fields and bounds or choices that the trial config itself would refuse."""
        where = f"space.{self.name}"
        flat = base.to_flat()
        if self.name not in flat or self.name == "task":
            raise ValueError(f"{where}: unknown field; searchable fields are the TrialConfig fields "
                             f"(e.g. g2.tau, g2.p, g2.gate_mode, compress.rank, compress.bits, train.lr)")
        check_choice(f"{where}.type", self.kind, KINDS)
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError(f"{where}.choices must list at least one value")
            values = list(self.choices)
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{where}: needs low < high, got low={self.low}, high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"{where}.low must be > 0 on a log scale, got {self.low}")
            if self.kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
                raise ValueError(f"{where}: an int range needs integer bounds, got {self.low}..{self.high}")
            values = [self.low, self.high]
        for value in values:
            try:
                TrialConfig.from_flat({self.name: value}, base=base)
            except ValueError as err:
                raise ValueError(f"{where}: value {value!r} is not allowed: {err}") from None
        for key, _ in self.when:
            if key not in flat:
                raise ValueError(f"{where}.when: unknown field {key!r}")

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (or Ray's captor of one) for this parameter's value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list | None:
        """The values a grid walks through, or None for a continuous range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return None

    def table(self) -> dict[str, Any]:
        """The TOML table this parameter is read from (inverse of `parse_space`)."""
        table: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            table["choices"] = list(self.choices)
        else:
            table |= {"low": self.low, "high": self.high, "log": self.log}
            if self.step is not None:
                table["step"] = self.step
        if self.when:
            table["when"] = dict(self.when)
        return table

    def describe(self) -> str:
        if self.kind == "categorical":
            text = json.dumps(list(self.choices))
        else:
            text = f"{self.kind}[{self.low}, {self.high}]" + (" log" if self.log else "")
        return text + (f" when {dict(self.when)}" if self.when else "")


def parse_space(table: dict[str, dict[str, Any]]) -> tuple[Param, ...]:
    """From the `[space.*]` tables of a study TOML; errors name `space.<field>.<attribute>`."""
    params = []
    for name, spec in table.items():
        spec = dict(spec)
        known = {"type", "low", "high", "log", "step", "choices", "when"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"space.{name}: unknown attribute(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        kind = spec.pop("type", "categorical" if "choices" in spec else "float")
        when = spec.pop("when", {})
        if not isinstance(when, dict):
            raise ValueError(f"space.{name}.when must be a table of field = value, got {when!r}")
        choices = spec.pop("choices", ())
        if not isinstance(choices, (list, tuple)):
            raise ValueError(f"space.{name}.choices must be a list, got {choices!r}")
        params.append(Param(name=name, kind=kind, choices=tuple(choices), when=tuple(sorted(when.items())), **spec))
    return tuple(params)


def default_space(base: TrialConfig, sampler: str) -> tuple[Param, ...]:
    """gate_mode, g2.tau and g2.p: the knobs that decide what is trained.

    Compression is no dimension of the default search: every trained model is scored on the config's whole
    sweep (`sweep.*`), and each of those rows reaches the sampler as a point of its own (`study.search`), so a
    rank or bit-width drawn by the sampler could only repeat a row the study has. Searching `compress.rank` pays
    where the space holds settings the sweep lacks (an int range of ranks): those are scored on the stored model
    alone. τ and p only matter for g2 trials. The grid walks the gate modes alone, which is how the paper's table
    is reproduced.
    """
    gate_mode = Param("g2.gate_mode", "categorical", choices=("lstm", "sharpened", "g2"))
    if sampler == "grid":
        return (gate_mode,)
    only_g2 = (("g2.gate_mode", "g2"),)
    return (
        gate_mode,
        Param("g2.tau", "float", low=0.3, high=1.5, log=True, when=only_g2),
        Param("g2.p", "float", low=0.05, high=1.0, when=only_g2),
    )


class DefineByRun:
    """Optuna define-by-run space of the study's searcher (`study.search`); returns the fixed fields as constants.

    A picklable object rather than a closure: Ray saves the searcher with the experiment for resume.
    """

    def __init__(self, params: tuple[Param, ...], constants: dict[str, Any]):
        self.params, self.constants = params, constants

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in self.params:
            if all(values.get(key, self.constants.get(key)) == value for key, value in param.when):
                values[param.name] = param.suggest(trial)
        return {k: v for k, v in self.constants.items() if k not in values}
