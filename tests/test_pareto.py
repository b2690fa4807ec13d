"""Tests for analysis/pareto.py: brute-force and hand-computed oracles, Monte-Carlo for the hypervolume."""

import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import (
    front_over_seeds,
    fronts_by,
    hypervolume,
    hypervolume_over_time,
    knee_point,
    pareto_front,
    pareto_mask,
)
from study import results
from study.results.rows import trial_rows
from trainables.config import TrialConfig
from trainables.report import EpochReport

from conftest import trial_reports

FINISHED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def report_of(tune_dict: dict) -> EpochReport:
    """A report as the driver types it (`study.trial_end.TrialLedger.report`)."""
    return EpochReport.from_dict(tune_dict)


def brute_mask(values: np.ndarray, minimize: list[bool]) -> np.ndarray:
    """O(n^2) oracle straight from the definition of dominance."""
    v = values * np.where(minimize, 1.0, -1.0)
    finite = np.isfinite(v).all(axis=1)
    mask = np.zeros(len(v), dtype=bool)
    for i in np.flatnonzero(finite):
        others = v[finite]
        dominates = (others <= v[i]).all(axis=1) & (others < v[i]).any(axis=1)
        mask[i] = not dominates.any()
    return mask


def random_values(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Small integers (ties in every objective), exact duplicate rows, NaN and inf rows, and some continuous rows."""
    v = rng.integers(0, 6, size=(n, k)).astype(float)
    v[: n // 4] += rng.random((n // 4, k))
    dup = rng.choice(n, size=n // 10, replace=False)
    v[dup] = v[rng.choice(n, size=len(dup))]
    v[rng.choice(n, size=n // 20, replace=False), rng.integers(0, k)] = np.nan
    v[rng.choice(n, size=n // 40, replace=False), rng.integers(0, k)] = rng.choice([np.inf, -np.inf])
    return v


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_pareto_mask_matches_brute_force(k, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    values = random_values(rng, n, k)
    minimize = list(rng.random(k) < 0.5)
    np.testing.assert_array_equal(pareto_mask(values, minimize), brute_mask(values, minimize))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_pareto_mask_many_blocks_and_large_front(k):
    # Points on a simplex are all non-dominated: the front spans many blocks of the k >= 3 filter.
    rng = np.random.default_rng(7)
    simplex = rng.dirichlet(np.ones(k), size=700)
    values = np.vstack([simplex, simplex[:50], simplex[50:300] + 0.01, random_values(rng, 300, k)])
    for minimize in ([True] * k, [False] + [True] * (k - 1)):
        np.testing.assert_array_equal(pareto_mask(values, minimize), brute_mask(values, minimize))


def test_pareto_mask_keeps_duplicates_and_drops_nonfinite():
    values = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [1.0, 3.0], [np.nan, 0.0], [0.0, np.inf], [2.0, 2.0]])
    np.testing.assert_array_equal(pareto_mask(values, [True, True]), [True, True, True, False, False, False, False])
    np.testing.assert_array_equal(pareto_mask(values, [False, False]), [False, False, False, True, False, False, True])
    assert pareto_mask(np.empty((0, 3)), [True] * 3).shape == (0,)


def test_pareto_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="minimize has 1 entries for 2 objectives"):
        pareto_mask(np.zeros((3, 2)), [True])
    with pytest.raises(ValueError, match=r"\(n, k\) array"):
        pareto_mask(np.zeros(3), [True])
    with pytest.raises(ValueError, match="minimize must be booleans"):
        pareto_mask(np.zeros((3, 2)), ["min", "max"])


@pytest.mark.slow
def test_pareto_mask_100k_rows_is_fast():
    rng = np.random.default_rng(0)
    values = rng.random((100_000, 2))
    values[::7] = np.round(values[::7], 2)  # ties in both objectives
    pareto_mask(values[:1000], [True, False])
    start = time.perf_counter()
    mask = pareto_mask(values, [True, False])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"pareto_mask took {elapsed:.2f} s on 100k rows"
    assert 0 < mask.sum() < 1000


def test_hypervolume_2d_staircase():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume(points, [4.0, 4.0], [True, True]) == pytest.approx(6.0)
    # Dominated points, duplicates, NaN rows and points not strictly inside the reference add nothing.
    extra = np.array([[2.5, 2.5], [2.0, 2.0], [np.nan, 0.0], [4.0, 0.0], [0.0, 5.0]])
    assert hypervolume(np.vstack([points, extra]), [4.0, 4.0], [True, True]) == pytest.approx(6.0)
    # Maximising the second objective: y -> -y, the reference flips with it.
    assert hypervolume(points * [1, -1], [4.0, -4.0], [True, False]) == pytest.approx(6.0)
    assert hypervolume(np.array([[5.0, 5.0]]), [4.0, 4.0], [True, True]) == 0.0


def test_hypervolume_3d_by_inclusion_exclusion():
    # Boxes up to (4, 4, 4): a = 3*3*1 = 9, b = 2*2*3 = 12, c = 1*4*2 = 8; a&b = 4, a&c = 3, b&c = 4, a&b&c = 2.
    points = np.array([[1.0, 1.0, 3.0], [2.0, 2.0, 1.0], [3.0, 0.0, 2.0]])
    assert hypervolume(points, [4.0, 4.0, 4.0], [True] * 3) == pytest.approx(9 + 12 + 8 - 4 - 3 - 4 + 2)
    assert hypervolume(points[:1], [4.0, 4.0, 4.0], [True] * 3) == pytest.approx(9.0)
    flipped = points * [1, 1, -1]
    assert hypervolume(flipped, [4.0, 4.0, -4.0], [True, True, False]) == pytest.approx(20.0)


@pytest.mark.parametrize("k", [2, 3])
def test_hypervolume_matches_monte_carlo(k):
    rng = np.random.default_rng(k)
    directions = np.array([True, False, True][:k])
    points = rng.random((40, k)) ** 2  # bunched near zero: a front with dominated points behind it
    points = points / np.linalg.norm(points, axis=1, keepdims=True) * rng.uniform(1.0, 1.5, (40, 1))
    reference = np.full(k, 1.6)
    sign = np.where(directions, 1.0, -1.0)
    exact = hypervolume(points * sign, reference * sign, directions)
    samples = rng.uniform(points.min(axis=0), reference, size=(200_000, k))
    dominated = np.zeros(len(samples), dtype=bool)
    for p in points:
        dominated |= (p <= samples).all(axis=1)
    estimate = dominated.mean() * np.prod(reference - points.min(axis=0))
    assert exact == pytest.approx(estimate, rel=0.01)


def test_hypervolume_rejects_bad_input():
    with pytest.raises(ValueError, match="2 or 3 objectives, got 4"):
        hypervolume(np.zeros((2, 4)), np.ones(4), [True] * 4)
    with pytest.raises(ValueError, match="2 or 3 objectives, got 1"):
        hypervolume(np.zeros((2, 1)), np.ones(1), [True])
    with pytest.raises(ValueError, match="reference must be 2 finite numbers"):
        hypervolume(np.zeros((2, 2)), [1.0, np.nan], [True, True])


def test_knee_point_on_l_shaped_front():
    corner = (0.5, 0.5)
    front = np.array([(0, 10), (0.1, 5), (0.2, 2), corner, (2, 0.2), (5, 0.1), (10, 0), (20, 20), (np.nan, 0)])
    order = np.random.default_rng(0).permutation(len(front))
    shuffled = front[order]
    pos = knee_point(shuffled, ["min", "min"])
    assert tuple(shuffled[pos]) == corner
    # DataFrame: returns the index label; the second objective maximised (a BLEU-like column).
    df = pd.DataFrame({"gate_bits": shuffled[:, 0], "val_bleu": -shuffled[:, 1]}, index=[f"t{i}" for i in order])
    label = knee_point(df, {"gate_bits": "min", "val_bleu": "max"})
    assert label == f"t{list(map(tuple, front)).index(corner)}"


def test_knee_point_of_symmetric_hyperbola_is_its_middle():
    x = np.logspace(-1, 1, 41)
    assert knee_point(np.c_[x, 1 / x], ["min", "min"]) == 20


def test_knee_point_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly two objectives"):
        knee_point(np.zeros((3, 3)), ["min"] * 3)
    with pytest.raises(ValueError, match="at least one finite point"):
        knee_point(np.full((2, 2), np.nan), ["min", "min"])
    with pytest.raises(ValueError, match="direction 'low'"):
        knee_point(np.zeros((2, 2)), ["min", "low"])


def results_frame() -> pd.DataFrame:
    """A tiny results table: one good-looking point per failure status that must not enter a front."""
    return pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e", "f", "g"],
            "status": ["ok", "ok", "ok", "pruned", "diverged", "error", "ok"],
            "val_metric": [100.0, 90.0, 120.0, 50.0, np.nan, 10.0, 95.0],
            "gate_bits": [8.0, 16.0, 4.0, 1.0, 1.0, 1.0, 16.0],
        }
    )


def test_pareto_front_excludes_failed_trials_and_sorts():
    front = pareto_front(results_frame(), {"val_metric": "min", "gate_bits": "min"})
    assert list(front["trial_id"]) == ["b", "a", "c"]
    assert list(front.index) == [1, 0, 2]
    everything = pareto_front(results_frame().drop(columns="status"), {"val_metric": "min", "gate_bits": "min"})
    assert list(everything["trial_id"]) == ["f"]


def test_pareto_front_refuses_unknown_columns_and_directions():
    with pytest.raises(ValueError, match="'val_bleu'"):
        pareto_front(results_frame(), {"val_bleu": "max", "gate_bits": "min"})
    with pytest.raises(ValueError, match="'gate_bits' has direction 'minimise'"):
        pareto_front(results_frame(), {"val_metric": "min", "gate_bits": "minimise"})


def test_fronts_by_keeps_groups_separate():
    rng = np.random.default_rng(3)
    n = 200
    df = pd.DataFrame(
        {
            "status": rng.choice(["ok", "ok", "ok", "pruned"], n),
            "task": rng.choice(["lm", "nmt"], n),
            "g2.gate_mode": rng.choice(["lstm", "sharpened", "g2"], n),
            "val_metric": rng.integers(50, 60, n).astype(float),
            "gate_bits": rng.integers(1, 9, n).astype(float),
        }
    )
    objectives = {"val_metric": "min", "gate_bits": "min"}
    fronts = fronts_by(df, objectives)
    assert {"task", "g2.gate_mode"} <= set(fronts.columns)
    for (task, mode), group in df.groupby(["task", "g2.gate_mode"]):
        expected = pareto_front(group, objectives)
        got = fronts[(fronts["task"] == task) & (fronts["g2.gate_mode"] == mode)]
        pd.testing.assert_frame_equal(got, expected)
    assert len(fronts) == sum(len(pareto_front(g, objectives)) for _, g in df.groupby(["task", "g2.gate_mode"]))
    with pytest.raises(ValueError, match="'method'"):
        fronts_by(df, objectives, by=["task", "method"])


def test_front_over_seeds_mean_std_and_front():
    rows = [
        # rank, seed, status, val_metric, gate_bits
        (8, 0, "ok", 100.0, 10.0),
        (8, 1, "ok", 102.0, 10.0),  # A: mean 101, std sqrt(2)
        (4, 0, "ok", 110.0, 5.0),
        (4, 1, "ok", 114.0, 5.0),  # B: mean 112, std sqrt(8), fewer bits
        (16, 0, "ok", 105.0, 12.0),
        (16, 1, "ok", 107.0, 12.0),  # C: dominated by A
        (2, 0, "ok", 130.0, 2.0),
        (2, 1, "pruned", 1.0, 2.0),  # D: only one ok seed
        (1, 0, "ok", 50.0, 1.0),
        (1, 1, "ok", np.nan, 1.0),  # E: one seed non-finite, so the mean is NaN
    ]
    df = pd.DataFrame(rows, columns=["compress.rank", "seed", "status", "val_metric", "gate_bits"])
    objectives = {"val_metric": "min", "gate_bits": "min"}
    front = front_over_seeds(df, objectives, ["compress.rank"])
    columns = ["compress.rank", "val_metric", "val_metric_std", "gate_bits", "gate_bits_std", "n_seeds"]
    assert list(front.columns) == columns
    assert list(front["compress.rank"]) == [8, 4, 2]
    np.testing.assert_allclose(front["val_metric"], [101.0, 112.0, 130.0])
    np.testing.assert_allclose(front["val_metric_std"], [np.sqrt(2), np.sqrt(8), np.nan])
    np.testing.assert_allclose(front["gate_bits_std"], [0.0, 0.0, np.nan])
    assert list(front["n_seeds"]) == [2, 2, 1]
    two_seeds = front_over_seeds(df, objectives, ["compress.rank"], min_seeds=2)
    assert list(two_seeds["compress.rank"]) == [8, 4]
    with pytest.raises(ValueError, match="'seed' must not be one of config_cols"):
        front_over_seeds(df, objectives, ["compress.rank", "seed"])
    with pytest.raises(ValueError, match=r"\['gate_bits'\] cannot be both objectives and config"):
        front_over_seeds(df, objectives, ["compress.rank", "gate_bits"])


def test_hypervolume_over_time_matches_prefix_fronts():
    rng = np.random.default_rng(5)
    n = 60
    df = pd.DataFrame(
        {
            "status": rng.choice(["ok", "ok", "ok", "diverged"], n),
            "val_metric": rng.uniform(50, 150, n),
            "gate_bits": rng.integers(1, 33, n).astype(float),
            "finished_at": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 40, n), unit="min"),
        }
    )
    objectives = {"val_metric": "min", "gate_bits": "min"}
    reference = [200.0, 40.0]
    curve = hypervolume_over_time(df, objectives, reference)
    assert list(curve.columns) == ["finished_at", "hypervolume"]
    ok = df[df["status"] == "ok"]
    assert list(curve["finished_at"]) == sorted(ok["finished_at"].unique())
    for t, hv in zip(curve["finished_at"], curve["hypervolume"]):
        done = ok[ok["finished_at"] <= t]
        assert hv == pytest.approx(hypervolume(done[list(objectives)].to_numpy(), reference, [True, True]))
    assert np.all(np.diff(curve["hypervolume"]) >= 0)


def test_front_over_seeds_counts_each_model_and_each_seed_once(trial, trial_store, tmp_path):
    # Issue 15: three trials score seed 1's model (one trains it, two re-score it from the store), one trial trains
    # seed 2. Averaging rows would give ppl 62.5 ± 5.0; each seed counted once gives 65 ± sqrt(50).
    config, reports = trial
    cfg = TrialConfig.from_flat(config)
    reused = trial_reports(cfg, tmp_path / "reused", trial_store)[-1]
    assert reused["reused_checkpoint"] and reused["training_key"] == reports[-1]["training_key"]
    seed2 = replace(cfg, seed=cfg.seed + 1)
    other = {**reports[-1], "training_key": seed2.training_key()}   # as if trained: its own key, its own seed
    trials = {"t1": (config, reports[-1]), "t2": (config, reused), "t3": (config, reused),
              "t4": ({**config, "seed": seed2.seed}, other)}
    for trial_id, (flat, last) in trials.items():
        rows = trial_rows("s", trial_id, flat, report_of(last), status="ok", error=None, finished_at=FINISHED)
        results.write_trial(tmp_path / "study", trial_id, rows)
    df = results.load(tmp_path / "study")
    assert len(df) == 4 * len(reports[-1]["sweep"]) and df["reused_checkpoint"].sum() == 2 * len(reused["sweep"])
    df["val_metric"] = np.where(df["seed"] == cfg.seed, 60.0, 70.0)

    config_cols = ["g2.gate_mode", "method", "compress.rank", "compress.bits", "compress.paper"]
    front = front_over_seeds(df, {"val_metric": "min", "gate_bits": "min"}, config_cols)
    assert len(front) == 1 and front.loc[0, "gate_bits"] == df["gate_bits"].min()
    assert front.loc[0, "val_metric"] == pytest.approx(65.0)
    assert front.loc[0, "val_metric_std"] == pytest.approx(np.sqrt(50.0))   # 7.07
    assert front.loc[0, "n_seeds"] == 2
    # The same holds for every setting, not only the front's.
    every = front_over_seeds(df, {"val_metric": "min"}, config_cols)
    assert len(every) == len(reports[-1]["sweep"])
    np.testing.assert_allclose(every["val_metric"], 65.0)
    np.testing.assert_allclose(every["val_metric_std"], np.sqrt(50.0))


def test_front_over_seeds_weighs_seeds_equally_whatever_their_model_count():
    # Seed 0 has two different models in the group (two taus, grouped only by rank): they are averaged first.
    rows = [
        # training_key, seed, tau, val_metric
        ("a", 0, 0.5, 50.0),
        ("a", 0, 0.5, 50.0),   # a re-score of model a: no weight of its own
        ("b", 0, 0.9, 70.0),
        ("c", 1, 0.5, 80.0),
        (None, 1, 0.9, 80.0),  # no training key: cannot be matched, its own model
        (None, 1, 0.9, 80.0),
    ]
    df = pd.DataFrame(rows, columns=["training_key", "seed", "g2.tau", "val_metric"]).assign(
        **{"compress.rank": 8, "gate_bits": 10.0, "status": "ok"})
    front = front_over_seeds(df, {"val_metric": "min", "gate_bits": "min"}, ["compress.rank"])
    assert front.loc[0, "val_metric"] == pytest.approx((60.0 + 80.0) / 2)
    assert front.loc[0, "val_metric_std"] == pytest.approx(np.std([60.0, 80.0], ddof=1))
    assert front.loc[0, "n_seeds"] == 2
