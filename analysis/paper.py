"""The paper's published numbers (Li et al., ICML 2018, arXiv 1806.02988) as data, and ours beside them.

Two tables come from the paper: compression without retraining (docs/design.md §3; PTB test perplexity with the
neural cache pointer, IWSLT14 De-En BLEU) and the gate saturation of its Fig. 3 (docs/design.md §2; IWSLT decoder
layer 1, read from the figure). `compare_with_paper` puts our study's figures for the same settings beside them. Our models are trained on
other data and budgets, so compare the shape (how much each gate mode loses per setting), not the absolute numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.pareto import matches, ok_rows
from trainables.report import HIGH, LOW, METHOD, TEST_METRIC, TRIAL_ID, gate_column

GATE_MODES = ("lstm", "sharpened", "g2")  # lstm = the paper's baseline
SETTINGS = ("original", "round", "round_clip", "svd_big", "svd_small")
METRIC_NAME = {"lm": "ppl", "nmt": "bleu"}
FULL_PRECISION_BITS = 32

# Per task: the paper's dataset, rounding step r and clip c, SVD ranks (big, small), and one row per gate mode with the
# values for SETTINGS in order.
_COMPRESSION = {
    "lm": {
        "dataset": "PTB (test ppl, cache pointer)",
        "step": 0.2,
        "clip": 0.4,
        "ranks": (128, 64),
        "values": {
            "lstm": (52.8, 53.2, 53.6, 56.6, 65.5),
            "sharpened": (53.2, 53.5, 53.6, 54.6, 60.0),
            "g2": (52.1, 52.2, 52.8, 53.3, 56.0),
        },
    },
    "nmt": {
        "dataset": "IWSLT14 De-En (BLEU)",
        "step": 0.5,
        "clip": 1.0,
        "ranks": (32, 16),
        "values": {
            "lstm": (31.00, 28.65, 21.97, 30.52, 29.56),
            "sharpened": (29.73, 27.08, 25.14, 29.17, 28.82),
            "g2": (31.95, 31.44, 31.44, 31.62, 31.28),
        },
    },
}

# The paper's Fig. 3 (IWSLT decoder layer 1): percent of gate values < 0.1 and > 0.9. It shows lstm and g2 only.
_SATURATION = {
    ("lstm", "i"): (18.2, 3.9),
    ("lstm", "f"): (4.4, 8.6),
    ("g2", "i"): (4.3, 70.4),
    ("g2", "f"): (35.5, 26.3),
}


def paper_compression() -> pd.DataFrame:
    """The paper's compression table, tidy: one row per (task, gate_mode, setting).

    Columns: task (lm | nmt), dataset, metric_name (ppl | bleu), gate_mode (lstm = baseline | sharpened | g2), setting
    (original | round | round_clip | svd_big | svd_small), value, rank (SVD rows; 0 otherwise), step and clip (the
    paper's rounding step r and clip c for that task; they apply to the round / round_clip rows).
    """
    rows = []
    for task, spec in _COMPRESSION.items():
        big, small = spec["ranks"]
        for mode, values in spec["values"].items():
            for setting, value in zip(SETTINGS, values, strict=True):
                rank = {"svd_big": big, "svd_small": small}.get(setting, 0)
                rows.append({"task": task, "dataset": spec["dataset"], "metric_name": METRIC_NAME[task],
                             "gate_mode": mode, "setting": setting, "value": value, "rank": rank,
                             "step": spec["step"], "clip": spec["clip"]})
    return pd.DataFrame(rows)


def paper_saturation() -> pd.DataFrame:
    """The paper's gate saturation (Fig. 3, IWSLT decoder layer 1) as fractions.

    Columns: task ("nmt"), layer ("decoder layer 1"), gate_mode (lstm | g2), gate (i | f), lt01, gt09.
    """
    rows = [{"task": "nmt", "layer": "decoder layer 1", "gate_mode": mode, "gate": gate,
             "lt01": lt / 100, "gt09": gt / 100} for (mode, gate), (lt, gt) in _SATURATION.items()]
    return pd.DataFrame(rows)


def _svd_ranks(svd: pd.DataFrame, paper_ranks: tuple[int, int]) -> tuple[int | None, int | None]:
    """(big, small) ranks to compare: the paper's if both are present, else the largest and smallest present."""
    present = sorted(int(r) for r in svd["compress.rank"].dropna().unique() if r > 0)
    if not present:
        return None, None
    if set(paper_ranks) <= set(present):
        return paper_ranks
    return present[-1], present[0]


def _setting_rows(df: pd.DataFrame, task: str) -> dict[str, tuple[pd.DataFrame, int]]:
    """Our rows for each of the paper's settings, with the SVD rank used (0 where none)."""
    method = df[METHOD]
    full_precision = matches(df["compress.bits"], FULL_PRECISION_BITS) if "compress.bits" in df else True
    svd = df[matches(method, "svd") & full_precision]
    big, small = _svd_ranks(svd, _COMPRESSION[task]["ranks"])
    return {
        "original": (df[matches(method, "none")], 0),
        "round": (df[matches(method, "round")], 0),
        "round_clip": (df[matches(method, "round_clip")], 0),
        "svd_big": (svd[matches(svd["compress.rank"], big)], big or 0),
        "svd_small": (svd[matches(svd["compress.rank"], small)], small or 0),
    }


def compare_with_paper(
    df: pd.DataFrame, task: str, *, metric: str = TEST_METRIC, eval_gate: str | None = "soft"
) -> pd.DataFrame:
    """Our figures for the paper's compression settings beside the paper's, one row per (gate_mode, setting).

    Ours are the mean over all ok rows (seeds and trials) of a gate mode in that setting: `original` = method none,
    `round` / `round_clip` = those methods, `svd_big` / `svd_small` = full-precision SVD at the paper's two ranks if
    both are in the study, else at the largest and smallest rank present.

    Args:
        df: the results frame (study.results.load).
        task: "lm" (compared with PTB) or "nmt" (compared with IWSLT14).
        metric: the column to average; the paper reports test figures.
        eval_gate: keep only g2 and sharpened rows evaluated with these gates (the paper's, and the authors' code's,
            is "soft"; "hard": binary i/f gates, scored by the sweep); None keeps all. lstm rows ignore eval_gate.
    Returns:
        Columns task, gate_mode, setting, paper, ours, ours_std, n (rows averaged), paper_rank, rank (ours), delta
        (ours - paper), metric. Every paper row is present; `ours` is NaN where the study has no such rows.
    """
    if task not in _COMPRESSION:
        raise ValueError(f"task must be one of {sorted(_COMPRESSION)}, got {task!r}")
    for col in ("task", "g2.gate_mode", METHOD, "compress.rank", metric):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the results")
    ours = ok_rows(df)
    ours = ours[matches(ours["task"], task)]
    if eval_gate is not None and "g2.eval_gate" in ours.columns:
        ours = ours[matches(ours["g2.gate_mode"], "lstm") | matches(ours["g2.eval_gate"], eval_gate)]
    rows = []
    for setting, (sub, rank) in _setting_rows(ours, task).items():
        values = sub[metric].to_numpy(dtype=float, na_value=np.nan)
        for mode, group in pd.Series(values, index=sub.index).groupby(sub["g2.gate_mode"].astype(object)):
            finite = group[np.isfinite(group)]
            rows.append({"gate_mode": mode, "setting": setting, "ours": finite.mean(),
                         "ours_std": finite.std(ddof=1), "n": len(finite), "rank": rank})
    ours_table = pd.DataFrame(rows, columns=["gate_mode", "setting", "ours", "ours_std", "n", "rank"])
    paper = paper_compression()
    paper = paper[paper["task"] == task].rename(columns={"value": "paper", "rank": "paper_rank"})
    out = paper[["task", "gate_mode", "setting", "paper", "paper_rank"]].merge(
        ours_table, on=["gate_mode", "setting"], how="outer")
    out["task"] = task
    out["n"] = out["n"].fillna(0).astype("int64")
    out["rank"] = out["rank"].fillna(0).astype("int64")
    out["delta"] = out["ours"] - out["paper"]
    out["metric"] = metric
    # The paper's row order: gate modes as in its table, settings left to right; modes the paper lacks come last.
    mode_order = {m: i for i, m in enumerate(GATE_MODES)}
    out = out.sort_values(
        ["gate_mode", "setting"],
        key=lambda s: s.map(mode_order if s.name == "gate_mode" else {x: i for i, x in enumerate(SETTINGS)}),
        kind="stable")
    return out[["task", "gate_mode", "setting", "paper", "ours", "ours_std", "n", "paper_rank", "rank", "delta",
                "metric"]].reset_index(drop=True)


def nmt_layer_names(encoder_layers: int, decoder_layers: int) -> list[str]:
    """Names of an NMT model's `gate_l{k}` layers, in the order the trainer measures them: the encoder first, its
    bidirectional first layer twice (forward, backward), then the decoder."""
    return (["enc fwd", "enc bwd"] + [f"enc {j + 1}" for j in range(encoder_layers - 1)]
            + [f"dec {j}" for j in range(decoder_layers)])


def compare_saturation(df: pd.DataFrame, layer: int | None = None) -> pd.DataFrame:
    """Our gate saturation beside the paper's Fig. 3, one row per (gate_mode, gate).

    The paper measured its NMT decoder's first layer; by default ours is the first decoder layer of our NMT trials
    (`gate_l{k}` counts the encoder's layers first, its bidirectional layer twice). Each trial counts once.

    Returns:
        Columns gate_mode, gate, lt01_paper, gt09_paper, lt01, gt09, n_trials, layer (our k).
    """
    ours = ok_rows(df)
    ours = ours[matches(ours["task"], "nmt")] if "task" in ours.columns else ours
    if TRIAL_ID in ours.columns:
        ours = ours.drop_duplicates(TRIAL_ID)
    if layer is None and len(ours):
        layer = nmt_layer_names(int(ours["nmt.encoder_layers"].iloc[0]), 1).index("dec 0")
    rows = []
    for mode, group in ours.groupby("g2.gate_mode", sort=False):
        for gate in "if":
            cols = [gate_column(layer, gate, LOW), gate_column(layer, gate, HIGH)]
            if not set(cols) <= set(group.columns):
                continue
            lt, gt = (group[c].to_numpy(dtype=float, na_value=np.nan) for c in cols)
            rows.append({"gate_mode": mode, "gate": gate, "lt01": np.nanmean(lt) if np.isfinite(lt).any() else np.nan,
                         "gt09": np.nanmean(gt) if np.isfinite(gt).any() else np.nan,
                         "n_trials": int(np.isfinite(lt).sum()), "layer": layer})
    ours_table = pd.DataFrame(rows, columns=["gate_mode", "gate", "lt01", "gt09", "n_trials", "layer"])
    paper = paper_saturation().rename(columns={"lt01": "lt01_paper", "gt09": "gt09_paper"})
    out = paper[["gate_mode", "gate", "lt01_paper", "gt09_paper"]].merge(ours_table, on=["gate_mode", "gate"],
                                                                          how="outer")
    out["n_trials"] = out["n_trials"].fillna(0).astype("int64")
    return out.sort_values(["gate_mode", "gate"], kind="stable").reset_index(drop=True)
