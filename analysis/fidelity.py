"""The fidelity report (docs/fidelity.md): a study's compression table and gate saturation beside the paper's.

Markdown, from the study's own analysis (`analysis.paper.compare_with_paper`, `compare_saturation`), so the tables in
the docs are regenerated, never typed:

    g2-study compare ptb-cpu-grid multi30k-cpu-grid > docs/fidelity_tables.md

Per task: the paper's table layout (original, round, round & clip, two SVD ranks) plus 4 and 2 bits, our mean ± spread
over seeds beside the paper's figure and the difference; the same with binary i/f gates at inference (the sweep's
`g2.eval_gate = hard` rows); what each setting costs against each model's own uncompressed figure (the paper's third
claim is about that loss, not the absolute numbers); and the gate saturation per layer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.paper import GATE_MODES, METRIC_NAME, SETTINGS, compare_saturation, compare_with_paper
from analysis.pareto import SAME_MODEL, matches, ok_rows
from trainables.report import (
    EVAL_GATE,
    GATES,
    HIGH,
    LOW,
    METHOD,
    STATUS,
    TEST_METRIC,
    TRIAL_ID,
    GateColumn,
    gate_column,
)

BITS = (4, 2)   # the columns beyond the paper's: uniform quantisation of the full-rank i/f blocks
COLUMN_TITLES = {"original": "original", "round": "round", "round_clip": "round & clip", "svd_big": "SVD {rank}",
                 "svd_small": "SVD {rank}"}


def _models(df: pd.DataFrame) -> pd.DataFrame:
    """Ok rows, each scored model once (trials that re-score a stored model repeat its rows)."""
    ok = ok_rows(df)
    return ok.drop_duplicates([c for c in SAME_MODEL if c in ok.columns])


def _gates(df: pd.DataFrame, eval_gate: str) -> pd.DataFrame:
    """lstm rows, and g2 / sharpened rows scored with `eval_gate`."""
    return df[matches(df["g2.gate_mode"], "lstm") | matches(df[EVAL_GATE], eval_gate)]


def bits_table(df: pd.DataFrame, eval_gate: str = "soft", metric: str = TEST_METRIC) -> pd.DataFrame:
    """Mean and spread over seeds of `metric` at full rank and `BITS` bits, per gate mode."""
    ours = _gates(_models(df), eval_gate)
    quant = ours[matches(ours[METHOD], "quant")]
    rows = []
    for (mode, bits), group in quant.groupby([quant["g2.gate_mode"].astype(object), quant["compress.bits"]]):
        if bits in BITS:
            values = group[metric].to_numpy(dtype=float, na_value=np.nan)
            rows.append({"gate_mode": mode, "setting": f"{bits} bits", "ours": np.nanmean(values),
                         "ours_std": np.nanstd(values, ddof=1) if len(values) > 1 else np.nan, "n": len(values)})
    return pd.DataFrame(rows, columns=["gate_mode", "setting", "ours", "ours_std", "n"])


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


def loss_markdown(df: pd.DataFrame, task: str, eval_gate: str = "soft") -> str:
    """What each setting costs: setting − original per gate mode, ours beside the paper's (claim 3)."""
    table = compare_with_paper(_models(df), task, eval_gate=eval_gate)
    bits = bits_table(df, eval_gate)
    header = ["gate mode", *(COLUMN_TITLES[s].format(rank=int(table.loc[table["setting"] == s, "rank"].max() or 0))
                             for s in SETTINGS[1:]), *(f"{b} bits" for b in BITS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in GATE_MODES:
        mine = table[table["gate_mode"] == mode].set_index("setting")
        base_ours, base_paper = mine.loc["original", "ours"], mine.loc["original", "paper"]
        cells = [mode]
        for setting in SETTINGS[1:]:
            ours, paper = mine.loc[setting, "ours"] - base_ours, mine.loc[setting, "paper"] - base_paper
            cells.append(f"{ours:+.2f} ({paper:+.2f})" if np.isfinite(ours) else f"– ({paper:+.2f})")
        for b in BITS:
            row = bits[(bits["gate_mode"] == mode) & (bits["setting"] == f"{b} bits")]
            cells.append(f"{row['ours'].iloc[0] - base_ours:+.2f}" if len(row) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nCells: test {METRIC_NAME[task]} of the setting minus the original's, ours (paper's)."


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
