"""Figures of a study's results: Pareto fronts, knob effects, progress and the paper's table (gates: gate_plots).

Every function takes the results DataFrame (study.results.load: one row per trial and compression setting) or a piece
of it, draws on `ax` (or `axes`) when given or on a new `matplotlib.figure.Figure` otherwise, and returns the Figure.
Nothing here imports pyplot or picks a backend: figures are plain Figure objects, so a notebook or script chooses
(e.g. `matplotlib.use("Agg")`) and `save` writes PNGs with any backend. Only rows with status "ok" are plotted, and a
selection with nothing to show gives a figure saying so rather than an exception, since studies are often partial.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis import pareto
from analysis.paper import GATE_MODES, METRIC_NAME, SETTINGS, compare_with_paper, paper_compression
from trainables.report import (
    FINISHED_AT,
    GATE_BITS,
    GATE_COMPRESSION,
    LOW,
    METHOD,
    MODEL_BITS,
    MODEL_COMPRESSION,
    TEST_METRIC,
    TRIAL_ID,
    UNCOMPRESSED_TEST_METRIC,
    UNCOMPRESSED_VAL_METRIC,
    VAL_METRIC,
    GateColumn,
)

GATE_MODE_COLORS = {"lstm": "tab:blue", "sharpened": "tab:orange", "g2": "tab:green"}
_EXTRA_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
_METRICS = {"ppl": ("perplexity", "min"), "bleu": ("BLEU", "max")}
_SPLITS = {VAL_METRIC: "validation", TEST_METRIC: "test", UNCOMPRESSED_VAL_METRIC: "uncompressed validation",
           UNCOMPRESSED_TEST_METRIC: "uncompressed test"}
_LABELS = {GATE_COMPRESSION: "gate compression (× fewer bits in the i/f gate blocks)",
           MODEL_COMPRESSION: "model compression (× fewer bits, whole model)",
           GATE_BITS: "bits stored for the i/f gate blocks", MODEL_BITS: "bits stored for the whole model",
           "g2.tau": "τ (temperature of g2 training)", "g2.p": "p (probability of gate noise)",
           "g2.sharpen_tau": "τ_s (temperature of the sharpened ablation)"}
# Knobs that only change some gate modes; the others are drawn as their mean, a horizontal reference.
_KNOB_MODES = {"g2.tau": {"g2"}, "g2.p": {"g2"}, "g2.eval_gate": {"g2"}, "g2.sharpen_tau": {"sharpened"}}


# --------------------------------------------------------------------------------------------------------- helpers

def _figure(ax: Axes | None, figsize: tuple[float, float] = (6.4, 4.4)) -> tuple[Figure, Axes]:
    """The caller's axes and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.get_figure(), ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def panel_grid(axes: Sequence[Axes] | None, nrows: int, ncols: int, panel: tuple[float, float],
          **kwargs) -> tuple[Figure, np.ndarray]:
    """nrows × ncols axes: the caller's (flat, row-major) or a new figure's."""
    if axes is not None:
        flat = np.asarray(axes, dtype=object).reshape(-1)
        if len(flat) != nrows * ncols:
            raise ValueError(f"expected {nrows * ncols} axes, got {len(flat)}")
        return flat[0].get_figure(), flat.reshape(nrows, ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, np.asarray(fig.subplots(nrows, ncols, squeeze=False, **kwargs), dtype=object)


def no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def floats(column: pd.Series) -> np.ndarray:
    """A numeric column (float64, or nullable Int64) as floats, missing values NaN."""
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def ok_finite(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Status-ok rows whose cols are all finite numbers (all of them missing from df: no rows)."""
    ok = pareto.ok_rows(df)
    if not set(cols) <= set(ok.columns):
        return ok.iloc[:0]
    finite = np.ones(len(ok), dtype=bool)
    for col in cols:
        finite &= np.isfinite(floats(ok[col]))
    return ok[finite]


def per_trial(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: training-time figures (saturation) repeat on every compression row of a trial."""
    return df.drop_duplicates(TRIAL_ID) if TRIAL_ID in df.columns else df


def mode_groups(df: pd.DataFrame, by: str | None) -> Iterator[tuple[str, pd.DataFrame, str]]:
    """(label, rows, colour) per value of `by`, the paper's gate modes first in their fixed colours; one group "all"
    without `by`."""
    if by is None or by not in df.columns:
        yield "all", df, "tab:blue"
        return
    values = list(df[by].dropna().unique())
    known = [m for m in GATE_MODES if m in values]
    others = sorted((v for v in values if v not in known), key=str)
    for value in known + others:
        color = GATE_MODE_COLORS.get(value) or _EXTRA_COLORS[others.index(value) % len(_EXTRA_COLORS)]
        yield str(value), df[pareto.matches(df[by], value)], color


def _metric_name(df: pd.DataFrame) -> str | None:
    """The single metric_name of df's ok rows; an error when LM and NMT rows are mixed."""
    if "metric_name" not in df.columns:
        return None
    names = set(df["metric_name"].dropna().unique())
    if len(names) > 1:
        raise ValueError(f"rows mix metrics {sorted(names)}: select one task first (df[df.task == 'lm'])")
    return names.pop() if names else None


def column_direction(df: pd.DataFrame, col: str) -> str:
    """Whether higher ("max") or lower ("min") is better for a results column."""
    if col in _SPLITS:
        name = _metric_name(df)
        if name not in _METRICS:
            raise ValueError(f"cannot tell whether {col} is minimised: metric_name is {name!r}; pass the direction")
        return _METRICS[name][1]
    if col.endswith("compression"):
        return "max"
    if col.endswith(("bits", "params", "loss", "error", "_s")):
        return "min"
    raise ValueError(f"cannot tell whether {col!r} is minimised or maximised; pass the direction")


def label(df: pd.DataFrame, col: str) -> str:
    """An axis label naming the quantity (and, for a metric, the better direction)."""
    if col in _SPLITS:
        name, direction = _METRICS.get(_metric_name(df) or "", ("metric", None))
        better = {"min": ", lower is better", "max": ", higher is better"}.get(direction, "")
        return f"{_SPLITS[col]} {name}{better}"
    if gate_col := GateColumn.parse(col):
        gate = "input" if gate_col.gate == "i" else "forget"
        bound = "< 0.1" if gate_col.side == LOW else "> 0.9"
        return f"layer {gate_col.layer}: fraction of {gate} gates {bound}"
    return _LABELS.get(col, col)


def reference_point(df: pd.DataFrame, objectives: Mapping[str, str], margin: float = 0.05) -> list[float]:
    """A hypervolume reference a little worse than the worst ok value of each objective."""
    ok = ok_finite(df, list(objectives))
    ref = []
    for col, direction in objectives.items():
        v = floats(ok[col])
        if len(v) == 0:
            raise ValueError(f"no ok rows with a finite {col!r}")
        worst, span = (v.max(), np.ptp(v)) if direction == "min" else (v.min(), np.ptp(v))
        pad = margin * (span if span > 0 else max(abs(worst), 1.0))
        ref.append(float(worst + pad if direction == "min" else worst - pad))
    return ref


def save(fig: Figure, path: str | Path) -> Path:
    """Write fig as a PNG (dpi 120), creating parent directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


# --------------------------------------------------------------------------------------------------------- figures

def plot_front(df: pd.DataFrame, x: str = GATE_COMPRESSION, y: str = VAL_METRIC, *,
               metric_direction: str | None = None, x_direction: str | None = None, by: str | None = "g2.gate_mode",
               knee: bool = False, logy: bool | None = None, ax: Axes | None = None) -> Figure:
    """Every ok row (compression on a log x-axis against the metric) and each group's Pareto front as a step line.

    Args:
        metric_direction / x_direction: "min" or "max"; inferred from metric_name and the column name when None.
        by: one colour and one front per value of this column (None: one front of all rows).
        knee: mark each front's knee point with a star.
        logy: log y-axis; None = when the metric is minimised and spans more than a factor of 20 (1-bit ppl explodes).
    """
    fig, ax = _figure(ax)
    rows = ok_finite(df, [x, y])
    if rows.empty:
        no_data(ax, f"no ok rows with finite {x} and {y}")
        return fig
    objectives = {x: x_direction or column_direction(rows, x), y: metric_direction or column_direction(rows, y)}
    # Between two front points, the best metric reachable at a given compression or better is the next point's.
    where = "pre" if objectives[x] == "max" else "post"
    for mode, group, color in mode_groups(rows, by):
        n = group[TRIAL_ID].nunique() if TRIAL_ID in group.columns else len(group)
        ax.scatter(floats(group[x]), floats(group[y]), s=16, alpha=0.4, color=color, linewidths=0,
                   label=f"{mode} ({n} trials)")
        front = pareto.pareto_front(group, objectives)
        ax.step(floats(front[x]), floats(front[y]), where=where, color=color, lw=1.8, marker="o", ms=4)
        if knee:
            k = front.loc[[pareto.knee_point(front, objectives)]]
            ax.scatter(floats(k[x]), floats(k[y]), marker="*", s=180, color=color, edgecolors="black", zorder=5)
    ax.set_xscale("log")
    values = floats(rows[y])
    if logy is None:
        logy = objectives[y] == "min" and values.min() > 0 and values.max() / values.min() > 20
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(label(rows, x))
    ax.set_ylabel(label(rows, y))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="gate mode (line: Pareto front)", fontsize="small")
    return fig


def plot_objective_vs(df: pd.DataFrame, knob: str = "g2.tau", y: str = VAL_METRIC, by: str | None = "g2.gate_mode",
                      *, method: str | None = "none", ax: Axes | None = None) -> Figure:
    """y against a knob (τ, p, ...), one colour per gate mode.

    Rows are restricted to one compression `method` (default "none": the trained model itself; None keeps all). Gate
    modes the knob does not affect (τ and p change only g2) are drawn as a dashed line at their mean, a reference.
    Where knob values repeat (a grid, several seeds) their means are joined by a line.
    """
    fig, ax = _figure(ax)
    rows = df if method is None or METHOD not in df.columns else df[pareto.matches(df[METHOD], method)]
    rows = ok_finite(rows, [y])
    rows = rows[rows[knob].notna()] if knob in rows.columns else rows.iloc[:0]
    if rows.empty:
        no_data(ax, f"no ok rows with {knob} and a finite {y}" + (f" (method {method})" if method else ""))
        return fig
    numeric = pd.api.types.is_numeric_dtype(rows[knob]) and not pd.api.types.is_bool_dtype(rows[knob])
    categories = [] if numeric else sorted(rows[knob].astype(str).unique())
    affected = _KNOB_MODES.get(knob)
    for mode, group, color in mode_groups(rows, by):
        values = floats(group[y])
        n = group[TRIAL_ID].nunique() if TRIAL_ID in group.columns else len(group)
        if affected is not None and mode not in affected:
            ax.axhline(values.mean(), color=color, ls="--", lw=1.2, label=f"{mode} (unaffected: mean of {n} trials)")
            continue
        xs = floats(group[knob]) if numeric else group[knob].astype(str).map(categories.index).to_numpy()
        ax.scatter(xs, values, s=22, alpha=0.6, color=color, label=f"{mode} ({n} trials)")
        if len(np.unique(xs)) < len(xs):
            means = pd.Series(values).groupby(xs).mean()
            ax.plot(means.index, means.to_numpy(), color=color, lw=1.5)
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    elif pd.api.types.is_integer_dtype(rows[knob]):   # epochs, ranks: no tick at 1.5
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label(rows, knob))
    ax.set_ylabel(label(rows, y))
    ax.grid(True, alpha=0.3)
    ax.legend(title="gate mode", fontsize="small")
    return fig


def plot_hypervolume_over_time(df: pd.DataFrame, objectives: Mapping[str, str], reference: Sequence[float], *,
                               by: str | None = None, time_col: str = FINISHED_AT, ax: Axes | None = None) -> Figure:
    """Hypervolume of the front of all ok trials finished so far against wall time (pareto.hypervolume_over_time).

    One line for all trials, plus one per value of `by` when given (does one gate mode's front grow faster?).
    """
    fig, ax = _figure(ax)
    rows = ok_finite(df, list(objectives))
    rows = rows[rows[time_col].notna()] if time_col in rows.columns else rows.iloc[:0]
    if rows.empty:
        no_data(ax, f"no ok rows with {time_col} and finite objectives")
        return fig
    times = rows[time_col]
    is_time = pd.api.types.is_datetime64_any_dtype(times)
    span = (times.max() - times.min()).total_seconds() if is_time else 0.0
    unit, seconds = ("h", 3600.0) if span > 2 * 3600 else ("min", 60.0)
    for name, group, color in [("all trials", rows, "black"), *(mode_groups(rows, by) if by else [])]:
        hv = pareto.hypervolume_over_time(group, objectives, reference, time_col=time_col)
        t = hv[time_col]
        xs = ((t - times.min()).dt.total_seconds() / seconds).to_numpy() if is_time else t.to_numpy(dtype=float)
        end = span / seconds if is_time else float(times.max())
        ax.step(np.r_[xs, end], np.r_[hv["hypervolume"], hv["hypervolume"].iloc[-1]], where="post", color=color,
                lw=2.2 if name == "all trials" else 1.4, label=name)
    ax.set_xlabel(f"wall time since the first result ({unit})" if is_time else time_col)
    ax.set_ylabel("hypervolume of the Pareto front")
    ax.set_title(", ".join(f"{c} ({d})" for c, d in objectives.items()), fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_paper_comparison(df: pd.DataFrame, task: str, *, metric: str = TEST_METRIC, relative: bool = False,
                          axes: Sequence[Axes] | None = None) -> Figure:
    """The paper's compression table (left) beside ours (right): one line per gate mode across the paper's settings.

    The panels have their own y-axes, since our corpora and budgets differ from the paper's; `relative` divides every
    value by its gate mode's uncompressed (`original`) value, which makes the two directly comparable.
    """
    fig, grid = panel_grid(axes, 1, 2, (5.4, 4.0), sharey=relative)
    table = compare_with_paper(df, task, metric=metric)
    dataset = paper_compression().query("task == @task")["dataset"].iloc[0]
    ours = df[pareto.matches(df["task"], task)] if "task" in df.columns else df
    paper_label = label(pd.DataFrame({"metric_name": [METRIC_NAME[task]]}), TEST_METRIC)
    colors = {mode: color for mode, _, color in mode_groups(table, "gate_mode")}
    x = np.arange(len(SETTINGS))
    for ax, source in zip(grid[0], ("paper", "ours"), strict=True):
        shown = 0
        for mode, rows in table.groupby("gate_mode", sort=False):
            rows = rows.set_index("setting").reindex(list(SETTINGS))
            values = rows[source].to_numpy(dtype=float)
            if not np.isfinite(values).any():
                continue
            base = values[0] if relative else 1.0
            err = rows["ours_std"].to_numpy(dtype=float) / base if source == "ours" else None
            ax.errorbar(x, values / base, yerr=err, color=colors[mode], marker="o", capsize=3, label=mode)
            shown += 1
        ranks = table.set_index("setting")["paper_rank" if source == "paper" else "rank"].groupby(level=0).max()
        ticks = [f"SVD r={ranks.get(s, 0)}" if s.startswith("svd") else s.replace("_", "&") for s in SETTINGS]
        ax.set_xticks(x, ticks, rotation=30)
        ax.set_title(f"paper: {dataset}" if source == "paper" else "ours: mean ± std over seeds and trials",
                     fontsize="medium")
        if not relative:
            ax.set_ylabel(paper_label if source == "paper" else label(ours, metric))
        ax.grid(True, alpha=0.3)
        if shown:
            ax.legend(title="gate mode", fontsize="small")
        else:
            no_data(ax, "no ok rows in this study for the paper's settings")
    if relative:
        grid[0, 0].set_ylabel("value / the gate mode's uncompressed value")
    return fig
