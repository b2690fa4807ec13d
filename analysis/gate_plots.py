"""Figures of the gates: i/f histograms in the paper's style (its Fig. 3) and saturation per layer and gate mode.

The conventions of `analysis.plots` hold: a results frame (or `study.results.load_gates` for histograms) in, a
matplotlib Figure out, drawn on `ax`/`axes` when given; only ok rows; a figure saying so when there is nothing.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.paper import nmt_layer_names
from analysis.plots import GATE_MODE_COLORS, floats, mode_groups, no_data, ok_finite, panel_grid, per_trial
from trainables.report import GATES, HIGH, HIST_BINS, LOW, GateColumn, gate_column, parse_histogram_key

Histograms = Mapping[str, Sequence[float]]  # {"l0_i": [10 fractions], "l0_f": [...], ...}
GATE_COLORS = {"i": "tab:blue", "f": "tab:red"}


def layer_labels(df: pd.DataFrame) -> dict[int, str]:
    """Names of the gate_l{k} layers: NMT counts the encoder first (its first layer twice: forward, backward)."""
    ks = sorted({col.layer for c in df.columns if (col := GateColumn.parse(c))})
    tasks = set(df["task"].dropna().unique()) if "task" in df.columns else set()
    if tasks == {"nmt"} and {"nmt.encoder_layers", "nmt.decoder_layers"} <= set(df.columns) and len(df):
        enc, dec = int(df["nmt.encoder_layers"].iloc[0]), int(df["nmt.decoder_layers"].iloc[0])
        names = nmt_layer_names(enc, dec)
        if len(names) >= len(ks):
            return {k: names[k] for k in ks}
    return {k: f"layer {k}" for k in ks}


def _histogram_models(hist: Histograms | Mapping[str, Histograms] | pd.DataFrame,
                      ) -> dict[str, dict[tuple[int, str], np.ndarray]]:
    """{model: {(layer, gate): 10 fractions}} from a mapping, a mapping of mappings, or a tidy frame.

    A frame's rows of one model that come from several trials are averaged, each trial weighing the same (each has
    one row per bin); gate modes come in the paper's order (lstm, sharpened, g2), other models as they appear.
    """
    if isinstance(hist, pd.DataFrame):
        model_col = next((c for c in ("model", "gate_mode", "g2.gate_mode") if c in hist.columns), None)
        keys = [model_col, "layer", "gate", "bin"] if model_col else ["layer", "gate", "bin"]
        mean = hist.groupby(keys, sort=False)["fraction"].mean().reset_index()
        models = {}
        for model, rows in mean.groupby(model_col, sort=False) if model_col else [("", mean)]:
            models[str(model)] = {(int(layer), str(gate)): g.sort_values("bin")["fraction"].to_numpy(dtype=float)
                                  for (layer, gate), g in rows.groupby(["layer", "gate"], sort=True)}
            for (layer, gate), fractions in models[str(model)].items():
                if len(fractions) != HIST_BINS:
                    raise ValueError(f"{model or 'the'} histogram of layer {layer} gate {gate} has {len(fractions)} "
                                     f"bins, expected {HIST_BINS} on [0, 1]")
        order = {mode: j for j, mode in enumerate(GATE_MODE_COLORS)}
        return dict(sorted(models.items(), key=lambda item: order.get(item[0], len(order))))
    values = list(hist.values())
    if values and isinstance(values[0], Mapping):
        return {str(model): _histogram_models(h)[""] for model, h in hist.items()}
    out = {}
    for key, fractions in hist.items():
        layer_gate = parse_histogram_key(key)
        if layer_gate is None:
            raise ValueError(f"histogram key {key!r} is not of the form l<k>_i or l<k>_f")
        if len(fractions) != HIST_BINS:
            raise ValueError(f"histogram {key!r} has {len(fractions)} bins, expected {HIST_BINS} on [0, 1]")
        out[layer_gate] = np.asarray(fractions, dtype=float)
    return {"": out}


def plot_gate_histograms(hist: Histograms | Mapping[str, Histograms] | pd.DataFrame, *,
                         layer_names: Mapping[int, str] | None = None,
                         axes: Sequence[Axes] | None = None) -> Figure:
    """i and f gate histograms in the paper's style (its Fig. 3): 10 bins on [0, 1], one row of panels per layer.

    Args:
        hist: {"l0_i": [10 fractions], "l0_f": [...], ...} (GateStatistics.histograms()), or several such by model
            ({"lstm": hist, "g2": hist}, drawn side by side), or a tidy frame with layer, gate, bin, fraction and an
            optional model / gate_mode / g2.gate_mode column, such as `results.load_gates`: the trials of a model
            are averaged.
        layer_names: titles of the layers (default "layer k").
        axes: layers × models axes, row-major.
    """
    models = _histogram_models(hist)
    layers = sorted({k for h in models.values() for k, _ in h})
    fig, grid = panel_grid(axes, max(len(layers), 1), len(models), (4.2, 2.6), sharey=True, sharex=True)
    if not layers:
        no_data(grid[0, 0], "no gate histograms")
        return fig
    centres = (np.arange(HIST_BINS) + 0.5) / HIST_BINS
    width = 0.4 / HIST_BINS
    for col, (model, h) in enumerate(models.items()):
        for row, layer in enumerate(layers):
            ax = grid[row, col]
            for offset, gate in ((-width / 2, "i"), (width / 2, "f")):
                if (layer, gate) in h:
                    name = "input gate i" if gate == "i" else "forget gate f"
                    ax.bar(centres + offset, h[(layer, gate)], width=width, color=GATE_COLORS[gate], label=name)
            title = (layer_names or {}).get(layer, f"layer {layer}")
            ax.set_title(f"{model}: {title}" if model else title, fontsize="medium")
            ax.set_xlim(0, 1)
            ax.set_xticks(np.linspace(0, 1, 6))
            if col == 0:
                ax.set_ylabel("fraction of gate values")
            if row == len(layers) - 1:
                ax.set_xlabel("gate value")
    grid[0, 0].legend(fontsize="small")
    return fig


def plot_saturation(df: pd.DataFrame, *, by: str | None = "g2.gate_mode", axes: Sequence[Axes] | None = None) -> Figure:
    """Fractions of i/f gate values < 0.1 and > 0.9 per layer and gate, one bar per gate mode (mean over trials).

    Reads the `gate_l{k}_{i|f}_{lt01|gt09}` columns; each trial counts once, with the spread over trials as error bars.
    """
    fig, grid = panel_grid(axes, 1, 2, (5.2, 4.0), sharey=True)
    ok = ok_finite(df, [])
    # The results of a study share one set of columns: LM rows have NaN in the layers only NMT models have.
    cols = [(col.layer, col.gate) for c in df.columns if (col := GateColumn.parse(c))
            and col.side == LOW and np.isfinite(floats(ok[c])).any()]
    cols.sort(key=lambda layer_gate: (layer_gate[0], GATES.index(layer_gate[1])))
    rows = per_trial(ok_finite(ok, [gate_column(k, g, s) for k, g in cols for s in (LOW, HIGH)]))
    if not cols or rows.empty:
        for ax in grid[0]:
            no_data(ax, "no gate saturation figures in these rows")
        return fig
    names = layer_labels(rows)
    modes = list(mode_groups(rows, by))
    x = np.arange(len(cols))
    width = 0.8 / len(modes)
    for ax, stat, title in zip(grid[0], (LOW, HIGH), ("gate values < 0.1", "gate values > 0.9"), strict=True):
        for j, (mode, group, color) in enumerate(modes):
            values = np.column_stack([floats(group[gate_column(k, g, stat)]) for k, g in cols])
            err = values.std(axis=0, ddof=1) if len(values) > 1 else None
            ax.bar(x + (j - (len(modes) - 1) / 2) * width, values.mean(axis=0), width=width, yerr=err, capsize=2,
                   color=color, label=f"{mode} ({len(values)} trials)")
        ax.set_xticks(x, [f"{names[k]} {g}" for k, g in cols], rotation=45 if len(cols) > 6 else 0)
        ax.set_title(title)
        ax.set_xlabel("layer and gate")
        ax.grid(True, axis="y", alpha=0.3)
    grid[0, 0].set_ylabel("fraction of gate values")
    grid[0, 0].legend(title="gate mode", fontsize="small")
    return fig
