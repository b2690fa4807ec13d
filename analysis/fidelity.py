"""The fidelity report (docs/fidelity.md): a study's compression table and gate saturation beside the paper's.

Markdown, from the study's own analysis (`analysis.paper.compare_with_paper`, `compare_saturation`), so the tables in
the docs are regenerated, never typed:

    g2-study compare ptb-cpu-grid multi30k-cpu-grid > docs/fidelity_tables.md

Per task: the paper's table layout (original, round, round & clip, two SVD ranks) plus 4 and 2 bits, our mean ± spread
over seeds beside the paper's figure and the difference; the same with binary i/f gates at inference (the sweep's
`g2.eval_gate = hard` rows); what each setting costs against each model's own uncompressed figure (the paper's third
claim is about that loss, not the absolute numbers), beside what the setting did to the weights: the share of the
compressed i/f weights it set to 0 and the relative Frobenius error of the compressed blocks (a fixed rounding step
mostly prunes where a model's weights are small; the `_rel` modes, shown where a study scored them, round every
block at the same relative step); and the gate saturation per layer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.paper import GATE_MODES, METRIC_NAME, SETTINGS, compare_saturation, compare_with_paper
from analysis.pareto import matches, ok_rows, same_model_columns
from trainables.report import (
    EVAL_GATE,
    FRACTION_ZEROED,
    GATES,
    HIGH,
    LOW,
    METHOD,
    RELATIVE_ERROR,
    STATUS,
    TEST_METRIC,
    TRIAL_ID,
    GateColumn,
    gate_column,
)

BITS = (4, 2)   # the columns beyond the paper's: uniform quantisation of the full-rank i/f blocks
COLUMN_TITLES = {"original": "original", "round": "round", "round_clip": "round & clip", "svd_big": "SVD {rank}",
                 "svd_small": "SVD {rank}"}
RELATIVE = {"round_rel": "round (rel)", "round_clip_rel": "round & clip (rel)"}   # columns where the study has rows


def _models(df: pd.DataFrame) -> pd.DataFrame:
    """Ok rows, each scored model once (trials that re-score a stored model repeat its rows)."""
    ok = ok_rows(df)
    return ok.drop_duplicates(same_model_columns(ok))


def _gates(df: pd.DataFrame, eval_gate: str) -> pd.DataFrame:
    """lstm rows, and g2 / sharpened rows scored with `eval_gate`."""
    return df[matches(df["g2.gate_mode"], "lstm") | matches(df[EVAL_GATE], eval_gate)]


def bits_table(df: pd.DataFrame, eval_gate: str = "soft", metric: str = TEST_METRIC) -> pd.DataFrame:
    """Mean and spread over seeds of `metric` at full rank and `BITS` bits, per gate mode."""
    ours = _gates(_models(df), eval_gate)
    quant = ours[matches(ours[METHOD], "quant")]
    groups = quant.groupby([quant["g2.gate_mode"].astype(object), quant["compress.bits"]])
    return _summary([(mode, f"{bits} bits", group) for (mode, bits), group in groups if bits in BITS], metric)


def relative_table(df: pd.DataFrame, eval_gate: str = "soft", metric: str = TEST_METRIC) -> pd.DataFrame:
    """Mean and spread over seeds of `metric` of the relative rounding modes (`RELATIVE`) a study scored, per gate
    mode; the setting is the column title."""
    ours = _gates(_models(df), eval_gate)
    ours = ours[ours[METHOD].isin(list(RELATIVE)).fillna(False).astype(bool)]
    groups = ours.groupby([ours["g2.gate_mode"].astype(object), ours[METHOD].astype(object)])
    return _summary([(mode, RELATIVE[method], group) for (mode, method), group in groups], metric)


def _summary(groups, metric: str) -> pd.DataFrame:
    """(gate mode, setting, rows) -> the mean, sample std and count of the rows' `metric`."""
    rows = []
    for mode, setting, group in groups:
        values = group[metric].to_numpy(dtype=float, na_value=np.nan)
        rows.append({"gate_mode": mode, "setting": setting, "ours": _nanmean(values),
                     "ours_std": np.nanstd(values, ddof=1) if np.isfinite(values).sum() > 1 else np.nan,
                     "n": len(values)})
    return pd.DataFrame(rows, columns=["gate_mode", "setting", "ours", "ours_std", "n"])


def _nanmean(values: np.ndarray) -> float:
    """The mean of the measured values; NaN where none was (a column an older study's files lack)."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def _cell(mean: float, std: float, n: int) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 and np.isfinite(std) else f"{mean:.2f}"


def compression_markdown(df: pd.DataFrame, task: str, eval_gate: str = "soft") -> str:
    """The paper's table, ours beside it: a row per gate mode, a column per setting, `ours (paper, Δ)` per cell."""
    table = compare_with_paper(_models(df), task, eval_gate=eval_gate)
    bits = bits_table(df, eval_gate)
    titles = {s: COLUMN_TITLES[s].format(rank=int(table.loc[table["setting"] == s, "rank"].max() or 0))
              for s in SETTINGS}
    header = ["gate mode", *(titles[s] for s in SETTINGS), *(f"{b} bits" for b in BITS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in GATE_MODES:
        cells = [mode]
        for setting in SETTINGS:
            row = table[(table["gate_mode"] == mode) & (table["setting"] == setting)].iloc[0]
            ours = _cell(row["ours"], row["ours_std"], int(row["n"]))
            cells.append(f"{ours} ({row['paper']:.2f}, Δ {row['delta']:+.2f})" if np.isfinite(row["ours"])
                         else f"– ({row['paper']:.2f})")
        for b in BITS:
            row = bits[(bits["gate_mode"] == mode) & (bits["setting"] == f"{b} bits")]
            cells.append(_cell(row["ours"].iloc[0], row["ours_std"].iloc[0], int(row["n"].iloc[0])) if len(row)
                         else "–")
        lines.append("| " + " | ".join(cells) + " |")
    paper_ranks = table.groupby("setting")["paper_rank"].max()
    return "\n".join(lines) + (f"\n\nCells: our test {METRIC_NAME[task]}, mean ± sample std over seeds (paper's figure, "
                               f"ours − paper). The paper's SVD ranks: {int(paper_ranks['svd_big'])} and "
                               f"{int(paper_ranks['svd_small'])}.")


def weight_effects(df: pd.DataFrame, task: str, eval_gate: str = "soft") -> pd.DataFrame:
    """What each setting did to the compressed i/f weights, per gate mode: the mean over rows of the share set to 0
    (`fraction_zeroed`) and of the relative Frobenius error (`relative_error`); NaN where not recorded.

    Returns:
        Columns gate_mode, setting (`SETTINGS`, then "<b> bits" and the `RELATIVE` titles), fraction_zeroed,
        relative_error.
    """
    models = _models(df)
    tables = {}
    for column in (FRACTION_ZEROED, RELATIVE_ERROR):
        paper = compare_with_paper(models, task, metric=column, eval_gate=eval_gate)[["gate_mode", "setting", "ours"]]
        tables[column] = pd.concat([paper, bits_table(df, eval_gate, column)[["gate_mode", "setting", "ours"]],
                                    relative_table(df, eval_gate, column)[["gate_mode", "setting", "ours"]]])
    out = tables[FRACTION_ZEROED].merge(tables[RELATIVE_ERROR], on=["gate_mode", "setting"], how="outer",
                                        suffixes=("_z", "_e"))
    return out.rename(columns={"ours_z": FRACTION_ZEROED, "ours_e": RELATIVE_ERROR}).reset_index(drop=True)


def _effect(effects: pd.DataFrame, mode: str, setting: str) -> str:
    """The cell's suffix, e.g. ` · 85.0 % zeroed, err 0.31`; empty where the study recorded neither."""
    row = effects[(effects["gate_mode"] == mode) & (effects["setting"] == setting)]
    if not len(row):
        return ""
    zeroed, error = float(row[FRACTION_ZEROED].iloc[0]), float(row[RELATIVE_ERROR].iloc[0])
    if not (np.isfinite(zeroed) or np.isfinite(error)):
        return ""
    return f" · {_percent(zeroed)} zeroed, err {error:.2f}" if np.isfinite(error) else f" · {_percent(zeroed)} zeroed"


def loss_markdown(df: pd.DataFrame, task: str, eval_gate: str = "soft") -> str:
    """What each setting costs: setting − original per gate mode, ours beside the paper's (claim 3), and what the
    setting did to the weights (`weight_effects`). The relative rounding modes get columns where the study has them."""
    table = compare_with_paper(_models(df), task, eval_gate=eval_gate)
    extra = pd.concat([bits_table(df, eval_gate), relative_table(df, eval_gate)])
    effects = weight_effects(df, task, eval_gate)
    relative = [title for title in RELATIVE.values() if title in set(extra["setting"])]
    header = ["gate mode", *(COLUMN_TITLES[s].format(rank=int(table.loc[table["setting"] == s, "rank"].max() or 0))
                             for s in SETTINGS[1:]), *(f"{b} bits" for b in BITS), *relative]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in GATE_MODES:
        mine = table[table["gate_mode"] == mode].set_index("setting")
        base_ours, base_paper = mine.loc["original", "ours"], mine.loc["original", "paper"]
        cells = [mode]
        for setting in SETTINGS[1:]:
            ours, paper = mine.loc[setting, "ours"] - base_ours, mine.loc[setting, "paper"] - base_paper
            cells.append((f"{ours:+.2f} ({paper:+.2f})" if np.isfinite(ours) else f"– ({paper:+.2f})")
                         + _effect(effects, mode, setting))
        for setting in [f"{b} bits" for b in BITS] + relative:
            row = extra[(extra["gate_mode"] == mode) & (extra["setting"] == setting)]
            cost = row["ours"].iloc[0] - base_ours if len(row) else np.nan
            cells.append((f"{cost:+.2f}" if np.isfinite(cost) else "–") + _effect(effects, mode, setting))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nCells: test {METRIC_NAME[task]} of the setting minus the original's, ours "
                               "(paper's); then the share of the compressed i/f weights the setting set to 0 and the "
                               "relative Frobenius error ‖W − Ŵ‖/‖W‖ of the compressed blocks (means over rows).")


def saturation_markdown(df: pd.DataFrame, task: str) -> str:
    """Percent of i/f gate values < 0.1 and > 0.9 per gate mode and layer (mean over trials); NMT with the paper's
    Fig. 3 (decoder layer 1) beside ours."""
    ours = ok_rows(df).drop_duplicates(TRIAL_ID)
    if task == "nmt":
        table = compare_saturation(ours)
        lines = ["| gate mode | gate | < 0.1 ours (paper) | > 0.9 ours (paper) | trials |", "|---|---|---|---|---|"]
        for _, r in table.iterrows():
            lines.append(f"| {r['gate_mode']} | {r['gate']} | {_percent(r['lt01'])} ({_percent(r['lt01_paper'])}) | "
                         f"{_percent(r['gt09'])} ({_percent(r['gt09_paper'])}) | {r['n_trials']} |")
        return "\n".join(lines) + "\n\nOur first decoder layer, the layer of the paper's Fig. 3."
    layers = sorted({col.layer for c in ours.columns if (col := GateColumn.parse(c))})
    lines = ["| gate mode | layer | i < 0.1 | i > 0.9 | f < 0.1 | f > 0.9 | trials |", "|---|---|---|---|---|---|---|"]
    for mode in GATE_MODES:
        group = ours[matches(ours["g2.gate_mode"], mode)]
        for layer in layers:
            cells = [_mean_percent(group[gate_column(layer, g, side)]) for g in GATES for side in (LOW, HIGH)]
            lines.append(f"| {mode} | {layer} | " + " | ".join(cells) + f" | {len(group)} |")
    return "\n".join(lines)


def _mean_percent(column: pd.Series) -> str:
    """The mean of the measured values, in percent; "–" where none was measured (no trial, or no such layer)."""
    values = column.to_numpy(dtype=float, na_value=np.nan)
    return _percent(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else "–"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %" if np.isfinite(fraction) else "–"


def report(df: pd.DataFrame, title: str) -> str:
    """The markdown of one study's results (`study.results.load`): its task's tables under `title`."""
    task = str(df["task"].dropna().iloc[0])
    statuses = df.drop_duplicates(TRIAL_ID)[STATUS].value_counts().to_dict()
    parts = [f"## {title} ({task}; trials: {', '.join(f'{n} {s}' for s, n in statuses.items())})",
             "### Compression, the paper's layout (soft gates, as the paper)", compression_markdown(df, task),
             "### The same with binary i/f gates at inference (g2 and sharpened; lstm as above)",
             compression_markdown(df, task, eval_gate="hard"),
             "### What compression costs each model", loss_markdown(df, task),
             "### Gate saturation", saturation_markdown(df, task)]
    return "\n\n".join(parts) + "\n"
