"""Pareto fronts, hypervolume and knee points of a study's results.

Everything here works on plain arrays or on the results DataFrame (one row per trial and compression setting,
docs/design.md §5). Internally every objective is flipped so that lower is better: a maximised column is multiplied
by -1 once, at the edge, and the algorithms below only ever minimise. A row whose objectives are not all finite (a diverged trial, a
metric that was never computed) is never on a front, and only rows with status "ok" enter a front built from a
DataFrame, so a truncated, diverged or failed trial can never look like a good trade-off.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from trainables.report import FINISHED_AT, OK, STATUS, TRAINING_KEY

Direction = Literal["min", "max"]

# The columns that name one scored model: its trained weights (the training key digests every knob that changes them)
# and how they were evaluated and compressed. Trials that re-score a stored model repeat its rows under the same key.
SAME_MODEL = [TRAINING_KEY, "g2.eval_gate", "compress.rank", "compress.bits", "compress.paper", "compress.step",
              "compress.clip", "compress.rel_step", "compress.rel_clip", "compress.targets"]


def same_model_columns(df) -> list[str]:
    """The SAME_MODEL columns `df` has: a table written before a knob existed lacks its column."""
    return [c for c in SAME_MODEL if c in df.columns]


# Rows per block in the k >= 3 filter: a (block, front) boolean matrix stays a few MB, and numpy still gets long loops.
_BLOCK = 256
_FRONT_CHUNK = 16384


def _as_minimised(values: np.ndarray, minimize: Sequence[bool]) -> np.ndarray:
    """Validate a (n, k) array and flip maximised columns so that lower is always better."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"values must be a (n, k) array, got shape {v.shape}")
    if len(minimize) != v.shape[1]:
        raise ValueError(f"minimize has {len(minimize)} entries for {v.shape[1]} objectives")
    if not all(isinstance(m, (bool, np.bool_)) for m in minimize):
        # "max" is truthy: a direction string passed here would silently be minimised.
        raise ValueError(f"minimize must be booleans, got {list(minimize)!r}")
    sign = np.where(np.asarray(minimize, dtype=bool), 1.0, -1.0)
    return v * sign


def _mask_2d(v: np.ndarray) -> np.ndarray:
    """Non-dominated rows of a finite (n, 2) array, minimising both, in O(n log n)."""
    order = np.lexsort((v[:, 1], v[:, 0]))  # by x, then y
    x, y = v[order, 0], v[order, 1]
    n = len(x)
    # Index of the first row of each run of equal x: its y is the run's minimum; only rows before it have a smaller x.
    new_x = np.r_[True, x[1:] != x[:-1]]
    run_start = np.maximum.accumulate(np.where(new_x, np.arange(n), 0))
    best_y = np.minimum.accumulate(y)
    best_y_before = np.where(run_start > 0, best_y[run_start - 1], np.inf)  # min y over strictly smaller x
    # Dominated: a smaller x with y no larger, or the same x with a smaller y. Equal copies dominate nothing.
    dominated = (best_y_before <= y) | (y > y[run_start])
    mask = np.empty(n, dtype=bool)
    mask[order] = ~dominated
    return mask


def _dominated_by(front: np.ndarray, block: np.ndarray) -> np.ndarray:
    """For each row of block (B, k), whether some row of front (F, k) dominates it."""
    out = np.zeros(len(block), dtype=bool)
    for start in range(0, len(front), _FRONT_CHUNK):
        f = front[start : start + _FRONT_CHUNK]
        le = np.ones((len(block), len(f)), dtype=bool)  # (B, F)
        lt = np.zeros((len(block), len(f)), dtype=bool)
        for j in range(block.shape[1]):
            le &= f[None, :, j] <= block[:, None, j]
            lt |= f[None, :, j] < block[:, None, j]
        out |= (le & lt).any(axis=1)
    return out


def _mask_nd(v: np.ndarray) -> np.ndarray:
    """Non-dominated rows of a finite (n, k) array, minimising all, block-wise against the growing front."""
    # Sorted by sum, then lexicographically: a dominator is <= everywhere, so its (rounded) sum is <= and, on equal
    # sums, it comes first lexicographically. Hence every row's dominators precede it and the front only ever grows.
    order = np.lexsort(tuple(v[:, j] for j in reversed(range(v.shape[1]))) + (v.sum(axis=1),))
    s = v[order]
    keep = np.zeros(len(s), dtype=bool)
    front = s[:0]
    for start in range(0, len(s), _BLOCK):
        block = s[start : start + _BLOCK]
        ok = ~_dominated_by(front, block)
        # A row dominated by a dominated row of its own block is also dominated by some front row, so checking the
        # block against itself (without first dropping its dominated rows) is still exact.
        ok &= ~_dominated_by(block, block)
        keep[start : start + len(block)] = ok
        front = np.concatenate([front, block[ok]])
    mask = np.empty(len(s), dtype=bool)
    mask[order] = keep
    return mask


def pareto_mask(values: np.ndarray, minimize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of values.

    A row is dominated if another row is no worse in every objective and strictly better in one, so all copies of a
    non-dominated point are kept. Rows with a NaN or inf are never on the front.

    Args:
        values: (n, k) objective values, k >= 1.
        minimize: k flags, True where lower is better.
    Returns:
        (n,) bool mask.
    """
    v = _as_minimised(values, minimize)
    finite = np.isfinite(v).all(axis=1)
    mask = np.zeros(len(v), dtype=bool)
    vf = v[finite]
    if len(vf) == 0:
        return mask
    if v.shape[1] == 1:
        mask[finite] = vf[:, 0] == vf[:, 0].min()
    elif v.shape[1] == 2:
        mask[finite] = _mask_2d(vf)
    else:
        mask[finite] = _mask_nd(vf)
    return mask


def _objective_columns(df: pd.DataFrame, objectives: Mapping[str, Direction]) -> tuple[list[str], list[bool]]:
    """Check objective columns and directions; return the columns and their minimise flags."""
    if not objectives:
        raise ValueError("objectives must name at least one column")
    for col, direction in objectives.items():
        if col not in df.columns:
            raise ValueError(f"objective column {col!r} is not in the results (columns: {list(df.columns)})")
        if direction not in ("min", "max"):
            raise ValueError(f"objective {col!r} has direction {direction!r}; expected 'min' or 'max'")
    return list(objectives), [objectives[c] == "min" for c in objectives]


def matches(column: pd.Series, value: object) -> np.ndarray:
    """column == value as a plain bool mask; a missing value (pd.NA in the nullable results dtypes) is False."""
    return (column == value).to_numpy(dtype=bool, na_value=False)


def ok_rows(df: pd.DataFrame, status_col: str = STATUS) -> pd.DataFrame:
    """Rows of finished trials (status "ok"), or all rows if there is no status column: only they have figures that
    can be compared (pruned, diverged and failed trials are truncated or meaningless points)."""
    return df[matches(df[status_col], OK)] if status_col in df.columns else df


def _values(df: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """Objective columns as a float array, nullable missing values as NaN."""
    return df[cols].to_numpy(dtype=float, na_value=np.nan)


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, Direction], *, status_col: str = STATUS) -> pd.DataFrame:
    """Rows of df on the Pareto front of the objectives, e.g. {"val_metric": "min", "gate_bits": "min"}.

    Only rows with status "ok" are candidates (pruned, diverged and failed trials are truncated or meaningless points).
    The original index is kept; rows are sorted by the first objective (ascending), ties by the next ones.
    """
    cols, minimize = _objective_columns(df, objectives)
    ok = ok_rows(df, status_col)
    front = ok[pareto_mask(_values(ok, cols), minimize)]
    return front.sort_values(cols, kind="stable")


def hypervolume(points: np.ndarray, reference: np.ndarray, minimize: Sequence[bool]) -> float:
    """Exact hypervolume dominated by points and bounded by reference, for 2 or 3 objectives.

    Only points strictly better than the reference in every objective contribute; dominated points add nothing.

    Args:
        points: (n, k) objective values, k in {2, 3}.
        reference: (k,) reference point, worse than every point of interest.
        minimize: k flags, True where lower is better.
    Returns:
        The volume (in the objectives' own units).
    """
    v = _as_minimised(points, minimize)
    k = v.shape[1]
    if k not in (2, 3):
        raise ValueError(f"hypervolume is exact for 2 or 3 objectives, got {k}")
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape != (k,) or not np.isfinite(ref).all():
        raise ValueError(f"reference must be {k} finite numbers, got {reference!r}")
    ref = ref * np.where(np.asarray(minimize, dtype=bool), 1.0, -1.0)
    v = v[(v < ref).all(axis=1)]  # NaN compares False, so NaN rows drop out too
    if len(v) == 0:
        return 0.0
    v = v[pareto_mask(v, [True] * k)]
    return _hv_2d(v, ref) if k == 2 else _hv_3d(v, ref)


def _hv_2d(v: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by (n, 2) points below ref: a sweep over x with the running minimum of y."""
    order = np.lexsort((v[:, 1], v[:, 0]))
    x, y = v[order, 0], v[order, 1]
    width = np.diff(np.r_[x, ref[0]])
    height = ref[1] - np.minimum.accumulate(y)
    return float(np.sum(width * height))


def _hv_3d(v: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by (n, 3) points below ref: slices along z, each slab an exact 2-D area (O(n^2 log n))."""
    order = np.argsort(v[:, 2], kind="stable")
    v = v[order]
    depth = np.diff(np.r_[v[:, 2], ref[2]])
    return float(sum(_hv_2d(v[: i + 1, :2], ref[:2]) * d for i, d in enumerate(depth) if d > 0))


def _directions(objectives: Mapping[str, Direction] | Sequence[Direction]) -> list[Direction]:
    """Directions in order, from a {column: direction} mapping or a plain sequence."""
    directions = list(objectives.values()) if isinstance(objectives, Mapping) else list(objectives)
    for d in directions:
        if d not in ("min", "max"):
            raise ValueError(f"direction {d!r}; expected 'min' or 'max'")
    return directions


def knee_point(
    front: pd.DataFrame | np.ndarray, objectives: Mapping[str, Direction] | Sequence[Direction]
) -> Hashable:
    """The knee of a two-objective front: the best compromise when neither objective has a price attached.

    Each objective is normalised to [0, 1] over the front (best = 0). The knee is the point with the largest distance to
    the straight line between the two extreme points (the best in each objective), measured on the side of the ideal
    point (0, 0): a point bulging away from the ideal is a poor trade-off, not a knee. Dominated and non-finite rows are
    ignored; ties go to the first row.

    Args:
        front: a DataFrame with the objective columns, or an (n, 2) array.
        objectives: {column: "min" | "max"} for a DataFrame; two directions (or such a mapping) for an array.
    Returns:
        The index label of the knee row for a DataFrame, its row position for an array.
    """
    directions = _directions(objectives)
    if isinstance(front, pd.DataFrame):
        if not isinstance(objectives, Mapping):
            raise ValueError("objectives must map column names to directions when front is a DataFrame")
        cols, _ = _objective_columns(front, objectives)
        values, labels = _values(front, cols), front.index
    else:
        values, labels = np.asarray(front, dtype=float), None
    if values.ndim != 2 or values.shape[1] != 2 or len(directions) != 2:
        raise ValueError(f"knee_point needs exactly two objectives, got values of shape {values.shape}")
    v = _as_minimised(values, [d == "min" for d in directions])
    candidates = np.flatnonzero(pareto_mask(v, [True, True]))
    if len(candidates) == 0:
        raise ValueError("knee_point needs at least one finite point")
    c = v[candidates]
    lo, span = c.min(axis=0), np.ptp(c, axis=0)
    z = (c - lo) / np.where(span > 0, span, 1.0)  # (m, 2) in [0, 1], lower is better
    a, b = z[np.argmin(z[:, 0])], z[np.argmin(z[:, 1])]  # the best-x end and the best-y end
    line = b - a
    # Signed distance to the line a -> b, positive on the side of the ideal point (0, 0).
    cross = line[0] * (z[:, 1] - a[1]) - line[1] * (z[:, 0] - a[0])
    norm = np.hypot(*line)
    distance = -cross / norm if norm > 0 else np.zeros(len(z))
    pos = int(candidates[np.argmax(distance)])
    return labels[pos] if labels is not None else pos


def fronts_by(
    df: pd.DataFrame,
    objectives: Mapping[str, Direction],
    by: Sequence[str] = ("task", "g2.gate_mode"),
    *,
    status_col: str = STATUS,
) -> pd.DataFrame:
    """One Pareto front per group (by default per task and gate mode), concatenated with the group columns kept.

    A gate mode is compared with itself: the paper's claim is that G2 moves the front, which a pooled front would hide.
    """
    by = list(by)
    for col in by:
        if col not in df.columns:
            raise ValueError(f"group column {col!r} is not in the results")
    _objective_columns(df, objectives)
    fronts = [
        pareto_front(group, objectives, status_col=status_col)
        for _, group in df.groupby(by, sort=True, dropna=False)
    ]
    return pd.concat(fronts) if fronts else df.iloc[:0]


def model_ids(df: pd.DataFrame, extra_cols: Sequence[str] = ()) -> np.ndarray:
    """An integer per row, equal for rows that score the same model (SAME_MODEL plus extra_cols), unique otherwise.

    A row without a training key (or a table without the column) cannot be matched to another, so it is its own model.
    """
    n = len(df)
    if TRAINING_KEY not in df.columns or n == 0:
        return np.arange(n)
    key_cols = list(dict.fromkeys(same_model_columns(df) + list(extra_cols)))
    ids = df.groupby(key_cols, sort=False, dropna=False).ngroup().to_numpy().copy()
    unknown = df[TRAINING_KEY].isna().to_numpy()
    ids[unknown] = ids.max() + 1 + np.arange(unknown.sum())
    return ids


def front_over_seeds(
    df: pd.DataFrame,
    objectives: Mapping[str, Direction],
    config_cols: Sequence[str],
    seed_col: str = "seed",
    *,
    status_col: str = STATUS,
    min_seeds: int = 1,
) -> pd.DataFrame:
    """Pareto front of configurations scored by their mean over seeds, with the spread beside it.

    Rows with the same config_cols are repeats with different seeds. Each seed counts once, and so does each model: the
    rows of trials that re-score a stored model (same SAME_MODEL key) are one model, and a seed's models are averaged
    before the seeds are, so a seed that TPE happened to draw often does not outweigh the others. Only "ok" rows are
    averaged, and a non-finite value in any of them makes that mean NaN, so an unstable configuration cannot hide behind
    its good seeds. Configurations with fewer than min_seeds ok seeds are dropped.

    Returns:
        One row per front configuration: config_cols, then `<obj>` (mean over seeds) and `<obj>_std` (sample std over
        seeds, NaN for one seed) per objective, and `n_seeds`; sorted by the first objective's mean.
    """
    cols, minimize = _objective_columns(df, objectives)
    config_cols = list(config_cols)
    if not config_cols:
        raise ValueError("config_cols must name at least one column")
    for col in [*config_cols, seed_col]:
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the results")
    if seed_col in config_cols:
        raise ValueError(f"seed column {seed_col!r} must not be one of config_cols")
    if both := sorted(set(cols) & {*config_cols, seed_col}):
        raise ValueError(f"column(s) {both} cannot be both objectives and config or seed columns")
    ok = ok_rows(df, status_col)
    values = pd.DataFrame(_values(ok, cols), columns=cols, index=ok.index)
    values["_finite"] = np.isfinite(values[cols].to_numpy()).all(axis=1)
    keys = [*config_cols, seed_col]
    values[keys] = ok[keys]
    values["_model"] = model_ids(ok, keys)
    how = {c: "mean" for c in cols} | {"_finite": "all"}
    # Rows -> models -> seeds -> configurations, each level an unweighted mean of the one below.
    per_model = values.groupby([*keys, "_model"], sort=True, dropna=False).agg(how).reset_index()
    per_seed = per_model.groupby(keys, sort=True, dropna=False).agg(how).reset_index()
    grouped = per_seed.groupby(config_cols, sort=True, dropna=False)
    mean = grouped[cols].mean()
    mean[~grouped["_finite"].all()] = np.nan
    std = grouped[cols].std(ddof=1).add_suffix("_std")
    n_seeds = grouped[seed_col].size().rename("n_seeds")
    table = pd.concat([mean, std, n_seeds], axis=1)
    table = table[table["n_seeds"] >= min_seeds]
    table = table[[c for col in cols for c in (col, f"{col}_std")] + ["n_seeds"]].reset_index()
    front = table[pareto_mask(_values(table, cols), minimize)]
    return front.sort_values(cols, kind="stable").reset_index(drop=True)


def hypervolume_over_time(
    df: pd.DataFrame,
    objectives: Mapping[str, Direction],
    reference: Sequence[float],
    time_col: str = FINISHED_AT,
    *,
    status_col: str = STATUS,
) -> pd.DataFrame:
    """Hypervolume of the front of all ok trials finished up to each time: the study's progress curve.

    Returns:
        One row per distinct finishing time, sorted: `time_col` and `hypervolume` (non-decreasing).
    """
    cols, minimize = _objective_columns(df, objectives)
    if time_col not in df.columns:
        raise ValueError(f"time column {time_col!r} is not in the results")
    ok = ok_rows(df, status_col)
    ok = ok[ok[time_col].notna()].sort_values(time_col, kind="stable")
    values = _values(ok, cols)
    hypervolume(values[:0], reference, minimize)  # refuse a bad reference or objective count before the loop
    # The front changes only when a new point is not dominated by it; only then is the hypervolume recomputed, on the
    # (small) front rather than on the whole prefix.
    front, hv, volumes = values[:0], 0.0, np.empty(len(values))
    for i, point in enumerate(values):
        candidate = np.vstack([front, point])
        mask = pareto_mask(candidate, minimize)
        if mask[-1]:
            front = candidate[mask]
            hv = hypervolume(front, reference, minimize)
        volumes[i] = hv
    out = pd.DataFrame({time_col: ok[time_col].to_numpy(), "hypervolume": volumes})
    return out.groupby(time_col, sort=True, as_index=False).last()
