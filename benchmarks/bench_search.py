"""Search efficiency: the training budget each search strategy pays to find the front, replayed on real models.

A table of real trained models (`benchmarks/search_table.parquet`): PTB, a 2×200 LM trained on 250 batches (about
a minute on one core), lstm, sharpened and g2 on a 4 × 4 grid of τ × p, 2 seeds, each scored on its whole sweep
(ranks × bits, the paper's rounding, soft and binary gates) with its measured training and scoring time. Rebuild it
from the two studies that trained them:

    g2-study run benchmarks/search_table_base.toml --storage STUDIES
    g2-study run benchmarks/search_table_g2.toml --storage STUDIES
    python benchmarks/bench_search.py build --storage STUDIES

Each strategy then searches the table's categorical space (gate mode, τ, p; rank and bits where it searches them)
with Optuna's TPE (the project's sampler), one seed of the table being the world of a repetition, and pays:

    (a) plain      Ray Tune + OptunaSearch as a user writes it: every trial trains its model and scores its own
                   setting; the search sees that one point
    (b) random     the same, sampled at random
    (c) before     this project before the scoreboard: a trial of a model trained before re-scores the whole
                   sweep (no training), a new one trains and scores it; the search sees the trial's own point, the
                   front holds every scored row
    (d) after      the project now: every row reaches the sampler as a derived point (`study.scoreboard`), a
                   suggestion the rows answer costs nothing; the sampler searches the training knobs alone (the
                   default space)
    (d') after+rb  the same with rank and bits kept as sampler dimensions

and the hypervolume of the front it found (compressed validation perplexity × gate bits, one fixed reference per
world) is recorded against the budget spent (training plus scoring, seconds). Reported: mean ± std of the
hypervolume at budgets of k mean trainings, and the budget each needs to reach 95 % of the table's best front,
as a ratio to (a).

    python benchmarks/bench_search.py run [--repeats 20] [--max-trainings 60]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout, installed or not

from analysis.pareto import hypervolume, pareto_mask  # noqa: E402
from study import results  # noqa: E402
from study.scoreboard import ScoredPoint, derived_trial  # noqa: E402
from study.space import Param  # noqa: E402
from trainables.report import EVAL_GATE, GATE_BITS, GATE_PARAMS, METHOD, OK, TRIAL_ID, VAL_METRIC  # noqa: E402

TABLE = Path(__file__).with_name("search_table.parquet")
STUDIES = ("search-table-base", "search-table-g2")
MODEL = ["g2.gate_mode", "g2.tau", "g2.p"]          # what a strategy trains (per seed)
SETTING = ["compress.rank", "compress.bits", "compress.paper", EVAL_GATE]
KEEP = [*MODEL, "seed", *SETTING, METHOD, VAL_METRIC, "uncompressed_val_metric", GATE_BITS, GATE_PARAMS,
        "train_time_s", "score_time_s", "rows_scored"]
TARGET = 0.95


# --------------------------------------------------------------------------- the table

def build(storage: Path) -> pd.DataFrame:
    """The table from the two studies: one row per scored setting, with its model's measured costs."""
    frames = []
    for name in STUDIES:
        root = storage / name
        df = results.load(str(root), status=OK)
        total = _trial_seconds(root / "ray" / name)
        df["train_time_s"] = df["wall_time_s"]
        df["score_time_s"] = (df[TRIAL_ID].map(total) - df["wall_time_s"]).clip(lower=0.0)
        df["rows_scored"] = df.groupby(TRIAL_ID)[METHOD].transform("size")
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    # lstm and sharpened models have no τ / p of their own: a NaN key would never match a suggestion
    lstm_like = table["g2.gate_mode"] != "g2"
    table.loc[lstm_like, ["g2.tau", "g2.p"]] = -1.0
    return table[KEEP].astype({"compress.rank": int, "compress.bits": int, "seed": int})


def _trial_seconds(experiment: Path) -> dict[str, float]:
    """Each trial's whole time in its worker (`time_total_s` of its last Tune result): training plus the sweep."""
    out = {}
    for result in experiment.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            out[lines[-1]["trial_id"]] = float(lines[-1]["time_total_s"])
    return out


# --------------------------------------------------------------------------- a world: one seed of the table

@dataclass
class World:
    rows: pd.DataFrame                         # every scored row of this seed's models
    reference: np.ndarray                      # the fixed hypervolume reference (val ppl, gate bits)
    best: float                                # the hypervolume of the table's front, all rows
    taus: list[float] = field(default_factory=list)
    ps: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, table: pd.DataFrame, seed: int) -> World:
        rows = table[table["seed"] == seed].reset_index(drop=True)
        reference = np.array([2.0 * rows["uncompressed_val_metric"].median(), 32.0 * rows[GATE_PARAMS].max()])
        world = cls(rows, reference, 0.0, sorted(float(v) for v in rows.loc[rows["g2.tau"] > 0, "g2.tau"].unique()),
                    sorted(float(v) for v in rows.loc[rows["g2.p"] > 0, "g2.p"].unique()))
        world.best = world.volume(rows)
        return world

    def volume(self, rows: pd.DataFrame) -> float:
        if rows.empty:
            return 0.0
        points = rows[[VAL_METRIC, GATE_BITS]].to_numpy(float)
        return hypervolume(points[pareto_mask(points, [True, True])], self.reference, [True, True])

    def model(self, knobs: dict) -> pd.DataFrame:
        key = _model_key(knobs)
        return self.rows[(self.rows[MODEL].to_numpy() == np.array(key, dtype=object)).all(axis=1)]

    def space(self, with_compression: bool) -> tuple[Param, ...]:
        only_g2 = (("g2.gate_mode", "g2"),)
        params = (Param("g2.gate_mode", "categorical", choices=("lstm", "sharpened", "g2")),
                  Param("g2.tau", "categorical", choices=tuple(self.taus), when=only_g2),
                  Param("g2.p", "categorical", choices=tuple(self.ps), when=only_g2))
        if with_compression:
            params += tuple(Param(name, "categorical", choices=tuple(sorted(int(v) for v in self.rows[name].unique())))
                            for name in ("compress.rank", "compress.bits"))
        return params


def _model_key(knobs: dict) -> tuple:
    mode = knobs["g2.gate_mode"]
    return (mode, knobs["g2.tau"], knobs["g2.p"]) if mode == "g2" else (mode, -1.0, -1.0)


def _suggest(trial: optuna.trial.Trial, space: tuple[Param, ...]) -> dict:
    knobs: dict = {}
    for param in space:
        if all(knobs.get(k) == v for k, v in param.when):
            knobs[param.name] = param.suggest(trial)
    return knobs


def _own_row(model: pd.DataFrame, knobs: dict) -> pd.DataFrame:
    """The row a trial of `knobs` scores as its own: its rank and bits, soft gates (rank 0 bits 32 without them)."""
    rank, bits = knobs.get("compress.rank", 0), knobs.get("compress.bits", 32)
    return model[(model["compress.rank"] == rank) & (model["compress.bits"] == bits)
                 & (model["compress.paper"] == "none") & (model[EVAL_GATE] == "soft")]


# --------------------------------------------------------------------------- the strategies

@dataclass
class Trace:
    spent: list[float] = field(default_factory=list)    # budget after each paid step
    volume: list[float] = field(default_factory=list)   # the found front's hypervolume then

    def at(self, budget: float) -> float:
        i = np.searchsorted(self.spent, budget, side="right") - 1
        return self.volume[i] if i >= 0 else 0.0

    def reaching(self, target: float) -> float:
        return next((s for s, v in zip(self.spent, self.volume) if v >= target), math.inf)


Strategy = Callable[[World, int, float], Trace]


def _study(sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    return optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)


def plain(world: World, seed: int, budget: float, *, random: bool = False) -> Trace:
    """(a) / (b): every trial trains its model and scores its own setting; Optuna sees that point."""
    space = world.space(with_compression=True)
    sampler = optuna.samplers.RandomSampler(seed=seed) if random else optuna.samplers.TPESampler(seed=seed,
                                                                                                   multivariate=True)
    study, trace, found, spent = _study(sampler), Trace(), [], 0.0
    while spent < budget:
        trial = study.ask()
        knobs = _suggest(trial, space)
        model = world.model(knobs)
        own = _own_row(model, knobs).iloc[0]
        spent += own["train_time_s"] + own["score_time_s"] / own["rows_scored"]
        study.tell(trial, [own[VAL_METRIC], own[GATE_BITS]])
        found.append(own)
        trace.spent.append(spent)
        trace.volume.append(world.volume(pd.DataFrame(found)))
    return trace


def before(world: World, seed: int, budget: float) -> Trace:
    """(c): the model store re-scores a trained model's whole sweep; Optuna sees the trial's own point."""
    space = world.space(with_compression=True)
    study = _study(optuna.samplers.TPESampler(seed=seed, multivariate=True))
    trace, trained, spent = Trace(), {}, 0.0
    while spent < budget:
        trial = study.ask()
        knobs = _suggest(trial, space)
        model = world.model(knobs)
        key = _model_key(knobs)
        first = model.iloc[0]
        spent += first["score_time_s"] + (0.0 if key in trained else first["train_time_s"])
        trained[key] = model
        own = _own_row(model, knobs).iloc[0]
        study.tell(trial, [own[VAL_METRIC], own[GATE_BITS]])
        trace.spent.append(spent)
        trace.volume.append(world.volume(pd.concat(trained.values())))
    return trace


def after(world: World, seed: int, budget: float, *, with_compression: bool = False, asks: int = 32) -> Trace:
    """(d): every row of a trained model becomes an Optuna point (`scoreboard.derived_trial`, the driver's own
    function); a suggestion the rows answer is told at once, free; `asks` answered suggestions in a row end it."""
    space = world.space(with_compression)
    study = _study(optuna.samplers.TPESampler(seed=seed, multivariate=True))
    trace, trained, spent = Trace(), {}, 0.0
    while spent < budget:
        for _ in range(asks):
            trial = study.ask()
            knobs = _suggest(trial, space)
            key = _model_key(knobs)
            if key not in trained:
                break
            own = _own_row(trained[key], knobs).iloc[0]   # answered from the rows: no trial
            study.tell(trial, [own[VAL_METRIC], own[GATE_BITS]])
        else:
            break   # nothing left to learn: every suggestion is answered
        model = world.model(knobs)
        first = model.iloc[0]
        spent += first["train_time_s"] + first["score_time_s"]
        trained[key] = model
        own = _own_row(model, knobs).iloc[0]
        study.tell(trial, [own[VAL_METRIC], own[GATE_BITS]])
        for i, row in model.iterrows():
            if i == own.name:
                continue
            point = ScoredPoint(key=str(i), training_key=str(key), trial_id="replay",
                                knobs={**row.to_dict(), **knobs, "compress.rank": int(row["compress.rank"]),
                                       "compress.bits": int(row["compress.bits"])},
                                values=(float(row[VAL_METRIC]), float(row[GATE_BITS])), method=str(row[METHOD]),
                                eval_gate=str(row[EVAL_GATE]))
            study.add_trial(derived_trial(point, space))
        trace.spent.append(spent)
        trace.volume.append(world.volume(pd.concat(trained.values())))
    return trace


STRATEGIES: dict[str, Strategy] = {
    "(a) plain Tune + OptunaSearch": plain,
    "(b) random search": lambda w, s, b: plain(w, s, b, random=True),
    "(c) this project before": before,
    "(d) this project after": after,
    "(d') after, rank/bits searched": lambda w, s, b: after(w, s, b, with_compression=True),
}


# --------------------------------------------------------------------------- the report

def run(table: pd.DataFrame, repeats: int, max_trainings: float) -> str:
    seeds = sorted(int(s) for s in table["seed"].unique())
    worlds = {s: World.of(table, s) for s in seeds}
    unit = float(table.drop_duplicates([*MODEL, "seed"])["train_time_s"].mean())
    budget = max_trainings * unit
    checkpoints = [1, 2, 4, 8, 12, 16, 24, 32, 48]
    checkpoints = [k for k in checkpoints if k <= max_trainings]
    lines = [f"table: {len(table)} rows, {table.drop_duplicates([*MODEL, 'seed']).shape[0]} models, seeds {seeds}; "
             f"a mean training {unit:.1f} s, a mean sweep {table.drop_duplicates([*MODEL, 'seed'])['score_time_s'].mean():.1f} s",
             f"budget unit = one mean training; {repeats} repetitions (sampler seed r, world = table seed r mod "
             f"{len(seeds)}); target {TARGET:.0%} of the table's best front hypervolume", ""]
    reach: dict[str, list[float]] = {}
    header = "| strategy | " + " | ".join(f"HV@{k}" for k in checkpoints) + " | budget to 95 % | × (a) | reached |"
    lines += [header, "|" + "---|" * (len(checkpoints) + 4)]
    started = time.perf_counter()
    for name, strategy in STRATEGIES.items():
        at = {k: [] for k in checkpoints}
        reach[name] = []
        for r in range(repeats):
            world = worlds[seeds[r % len(seeds)]]
            trace = strategy(world, r, budget)
            for k in checkpoints:
                at[k].append(trace.at(k * unit) / world.best)
            reach[name].append(trace.reaching(TARGET * world.best) / unit)
        finite = [x for x in reach[name] if math.isfinite(x)]
        median = float(np.median(reach[name])) if len(finite) * 2 > len(reach[name]) else math.inf
        base = reach[next(iter(STRATEGIES))]
        base_median = float(np.median(base)) if sum(map(math.isfinite, base)) * 2 > len(base) else math.inf
        ratio = median / base_median if math.isfinite(base_median) else float("nan")
        cells = " | ".join(f"{np.mean(at[k]):.3f} ± {np.std(at[k]):.3f}" for k in checkpoints)
        lines.append(f"| {name} | {cells} | {median:.1f} | {ratio:.2f} | {len(finite)}/{repeats} |")
    lines += ["", "HV@k: the found front's hypervolume as a fraction of the table's best, mean ± std over the "
              "repetitions, after a budget of k mean trainings (training plus scoring, at their measured cost).",
              "budget to 95 %: the median budget (in mean trainings) at which it first reached the target; inf "
              f"where fewer than half the repetitions reached it within {max_trainings:g}.",
              f"({time.perf_counter() - started:.0f} s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="make the table from the two studies")
    b.add_argument("--storage", type=Path, required=True)
    b.add_argument("--output", type=Path, default=TABLE)
    r = sub.add_parser("run", help="replay the strategies against the table")
    r.add_argument("--table", type=Path, default=TABLE)
    r.add_argument("--repeats", type=int, default=20)
    r.add_argument("--max-trainings", type=float, default=48)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.command == "build":
        table = build(args.storage)
        table.to_parquet(args.output, index=False)
        print(f"{args.output}: {len(table)} rows of {table.drop_duplicates([*MODEL, 'seed']).shape[0]} models")
        return 0
    print(run(pd.read_parquet(args.table), args.repeats, args.max_trainings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
