"""Tests for analysis/plots.py and analysis/paper.py on synthetic studies written through study.results: synthetic
scores, with the accounting that `compress_model` reports for small real models."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from analysis import gate_plots, pareto, plots
from analysis.paper import SETTINGS, compare_saturation, compare_with_paper, paper_compression, paper_saturation
from study import results
from study.results.rows import curve_rows, gate_rows, trial_rows
from trainables.compress import compress_model
from trainables.config import CompressConfig, TrialConfig
from trainables.lm import RNNLM
from trainables.parallel_data import BOS_ID, EOS_ID, PAD_ID
from trainables.report import Accounting, EpochReport, SweepRow
from trainables.seq2seq import Seq2Seq

LAYERS = 2           # of the LM; the NMT model has the default 2 + 2 (its first encoder layer bidirectional)
RANKS = (16, 32, 64, 128)
BITS = (32, 8, 4)
VOCAB = 100
# Small real models, one per task, whose fields the trials' configs carry: every row's accounting (gate and model
# bits, both compression ratios, the relative error) is what `compress_model` reports for that model and setting.
MODELS = {"lm": {"lm.embed_dim": 64, "lm.hidden_size": 128, "lm.num_layers": LAYERS},
          "nmt": {"nmt.embed_dim": 32, "nmt.hidden_size": 64, "data.corpus": "toy-copy", "compress.step": 0.5,
                  "compress.clip": 1.0, "compress.targets": "recurrent+context"}}
SWEEP = {"sweep.ranks": RANKS, "sweep.bits": BITS, "sweep.paper": ("round", "round_clip")}
# (ppl or BLEU of the trained model, how much it loses per doubling of compression, gate saturation lt01 / gt09)
MODES = {"lstm": (60.0, 0.06, 0.18, 0.04), "sharpened": (61.0, 0.04, 0.30, 0.30), "g2": (58.0, 0.02, 0.05, 0.70)}


@functools.cache
def _model(task: str) -> torch.nn.Module:
    """The task's small model, seeded (the rounding modes' bits count the distinct values of its weights)."""
    cfg = TrialConfig.from_flat({"task": task, **MODELS[task]})
    torch.manual_seed(0)
    if task == "lm":
        return RNNLM(cfg.lm, cfg.g2, VOCAB)
    return Seq2Seq(cfg.nmt, cfg.g2, VOCAB, PAD_ID, BOS_ID, EOS_ID)


@functools.cache
def _accounting(task: str, setting: CompressConfig) -> Accounting:
    return compress_model(_model(task), setting)[1]


def _sweep(cfg: TrialConfig, seed: int) -> list[dict]:
    """The final report's sweep as `trainable.sweep_rows` builds it, with synthetic scores in place of evaluation."""
    base, loss_per_doubling, _, _ = MODES[cfg.g2.gate_mode]
    rng = np.random.default_rng(seed)
    settings = cfg.sweep.settings(cfg.compress)
    if cfg.compress not in settings:
        settings.append(cfg.compress)
    rows = []
    for setting in settings:
        acc = _accounting(cfg.task, setting)
        loss = loss_per_doubling * math.log2(acc.gate_compression) ** 2 + rng.normal(0, 0.005)
        ppl = base * (1 + loss) + rng.normal(0, 0.3)
        metric = ppl if cfg.task == "lm" else max(0.0, 30.0 - (ppl - 50.0))
        scores = {"val_loss": math.log(ppl), "val_metric": metric, "test_loss": math.log(ppl) + 0.01,
                  "test_metric": metric + (0.5 if cfg.task == "lm" else -0.5)}
        rows.append(SweepRow(rank=setting.rank, bits=setting.bits, paper=setting.paper, method=setting.method, eval_gate="soft",
                             is_trial_setting=setting == cfg.compress, accounting=acc, scores=scores).to_dict())
    return rows


def _saturation(mode: str, seed: int, layers: int) -> dict:
    _, _, lt, gt = MODES[mode]
    rng = np.random.default_rng(seed)
    return {f"gate_l{k}_{g}_{s}": float(np.clip(v + rng.normal(0, 0.02), 0, 1))
            for k in range(layers) for g in "if" for s, v in (("lt01", lt), ("gt09", gt))}


def _histograms(sat: dict, layers: int) -> dict:
    """10-bin gate histograms whose outer bins are the saturation figures, the rest spread evenly."""
    out = {}
    for k in range(layers):
        for g in "if":
            lt, gt = sat[f"gate_l{k}_{g}_lt01"], sat[f"gate_l{k}_{g}_gt09"]
            out[f"l{k}_{g}"] = [lt, *[(1.0 - lt - gt) / 8] * 8, gt]
    return out


def write_synthetic_study(study_dir: Path, *, tasks=("lm", "nmt"), modes=tuple(MODES), seeds=(1, 2),
                          epochs: int = 3) -> Path:
    """A study directory in the layout of study.results: ok trials per task × gate mode × seed × (τ, p), plus one
    diverged and one failed trial, with per-epoch curves and the ok trials' gate histograms."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    n = 0
    for task in tasks:
        for mode in modes:
            for seed in seeds:
                for tau, p in ((0.5, 0.2), (0.9, 0.2), (0.9, 1.0)):
                    n += 1
                    own = {"compress.rank": 32, "compress.bits": 4} if n % 2 else {"compress.paper": "round"}
                    cfg = TrialConfig.from_flat({"task": task, "seed": seed, "g2.gate_mode": mode, "g2.tau": tau,
                                                 "g2.p": p, "train.epochs": epochs, **MODELS[task], **SWEEP, **own})
                    flat = cfg.to_flat()
                    layers = LAYERS if task == "lm" else flat["nmt.encoder_layers"] + 1 + flat["nmt.decoder_layers"]
                    sat = _saturation(mode, seed * 100 + n, layers)
                    report = {"metric_name": "ppl" if task == "lm" else "bleu", "device": "cpu", "epoch": epochs,
                              "training_key": f"key{n}", "best_epoch": epochs, "train_time_s": 60.0 + n,
                              "status": "ok", "done": True, "sweep": _sweep(cfg, seed * 1000 + n),
                              **sat, "gate_histograms": _histograms(sat, layers)}
                    trial_id = f"{task}_{n:04d}"
                    rows = trial_rows("synthetic", trial_id, flat, EpochReport.from_dict(report), status="ok",
                                      error=None, finished_at=start + timedelta(minutes=7 * n))
                    results.write_trial(study_dir, trial_id, rows)
                    results.write_gates(study_dir, trial_id,
                                        gate_rows("synthetic", trial_id, flat, EpochReport.from_dict(report)))
                    curve = [{"epoch": e, "train_loss": 5.0 / e, "val_loss": 4.5 / e, "val_metric": 100.0 / e,
                              "compressed_val_metric": 110.0 / e, "gate_compression": 8.0, "epoch_time_s": 20.0,
                              "train_time_s": 20.0 * e, **sat} for e in range(1, epochs + 1)]
                    results.write_curves(study_dir, trial_id, curve_rows("synthetic", trial_id, flat,
                                                                         [EpochReport.from_dict(c) for c in curve]))
        flat = TrialConfig().to_flat() | {"task": task, "g2.gate_mode": modes[0]}
        diverged = {"status": "diverged", "error": "loss is nan", "done": True, "epoch": 1, "val_metric": math.nan,
                    "compressed_val_metric": math.nan, "metric_name": "ppl" if task == "lm" else "bleu"}
        for trial_id, status, report, error in ((f"{task}_div", "diverged", diverged, None),
                                                (f"{task}_err", "error", None, "RuntimeError: boom")):
            rows = trial_rows("synthetic", trial_id, flat, EpochReport.from_dict(report) if report else None,
                              status=status, error=error, finished_at=start + timedelta(minutes=7 * n + 1))
            results.write_trial(study_dir, trial_id, rows)
    return study_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_thread) -> pd.DataFrame:
    return results.load(write_synthetic_study(tmp_path_factory.mktemp("study")))


@pytest.fixture()
def lm(study) -> pd.DataFrame:
    return study[(study["task"] == "lm").fillna(False)]


def _png(fig: Figure, tmp_path: Path, name: str) -> Path:
    path = plots.save(fig, tmp_path / "figs" / f"{name}.png")
    assert path.exists() and path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def test_import_chooses_no_backend():
    # plots builds plain Figures: importing it neither imports pyplot nor resolves a backend; the caller chooses.
    code = ("import sys, matplotlib, analysis.plots; "
            "print('matplotlib.pyplot' in sys.modules, matplotlib.rcParams._get_backend_or_none())")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "None"]


def test_front_one_scatter_and_one_step_line_per_mode(lm, tmp_path):
    fig = plots.plot_front(lm)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "compression" in ax.get_xlabel()
    assert ax.get_ylabel() == "validation perplexity, lower is better"
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 3 and len(ax.get_lines()) == 3
    assert [t.get_text().split(" ")[0] for t in ax.get_legend().get_texts()] == ["lstm", "sharpened", "g2"]
    # Each step line passes through exactly that mode's front points.
    g2 = lm[(lm["g2.gate_mode"] == "g2").fillna(False)]
    front = pareto.pareto_front(g2, {"gate_compression": "max", "val_metric": "min"})
    line = ax.get_lines()[2]
    assert set(np.round(line.get_xdata(), 6)) == set(np.round(front["gate_compression"].to_numpy(float), 6))
    _png(fig, tmp_path, "front")


def test_front_excludes_failed_rows_and_marks_knees(lm, tmp_path):
    fig = plots.plot_front(lm, x="model_compression", knee=True)
    ax = fig.axes[0]
    n_points = sum(len(c.get_offsets()) for c in ax.collections[::2])  # the mode scatters, not the knee stars
    assert n_points == int((lm["status"] == "ok").sum())
    assert len(ax.collections) == 6  # 3 modes + 3 knees
    assert "whole model" in ax.get_xlabel()
    _png(fig, tmp_path, "front_model")


def test_front_bleu_is_maximised(study, tmp_path):
    nmt = study[(study["task"] == "nmt").fillna(False)]
    fig = plots.plot_front(nmt, by=None)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "validation BLEU, higher is better"
    assert len(ax.get_lines()) == 1
    front = pareto.pareto_front(nmt, {"gate_compression": "max", "val_metric": "max"})
    assert len(ax.get_lines()[0].get_xdata()) == len(front)
    _png(fig, tmp_path, "front_nmt")


def test_front_refuses_mixed_tasks_and_draws_an_empty_selection(study):
    with pytest.raises(ValueError, match="select one task"):
        plots.plot_front(study)
    fig = plots.plot_front(study.iloc[:0])
    assert "no ok rows" in fig.axes[0].texts[0].get_text()


def test_gate_histograms_bar_heights_are_the_fractions(tmp_path):
    rng = np.random.default_rng(0)
    hist = {m: {f"l{k}_{g}": list(rng.dirichlet(np.ones(10))) for k in range(3) for g in "if"} for m in ("lstm", "g2")}
    fig = gate_plots.plot_gate_histograms(hist, layer_names={0: "layer 0", 1: "layer 1", 2: "top"})
    assert len(fig.axes) == 6  # 3 layers × 2 models
    ax = fig.axes[2 * 2 + 1]   # row-major: layer 2, g2
    assert ax.get_title() == "g2: top" and ax.get_xlim() == (0, 1)
    i_bars, f_bars = ax.containers
    assert np.allclose([b.get_height() for b in i_bars], hist["g2"]["l2_i"])
    assert np.allclose([b.get_height() for b in f_bars], hist["g2"]["l2_f"])
    assert fig.axes[0].get_ylabel() == "fraction of gate values" and fig.axes[4].get_xlabel() == "gate value"
    _png(fig, tmp_path, "hist")


def test_gate_histograms_single_model_and_tidy_frame(tmp_path):
    one = {"l0_i": [0.1] * 10, "l0_f": [0.0] * 9 + [1.0]}
    fig = gate_plots.plot_gate_histograms(one)
    assert len(fig.axes) == 1 and len(fig.axes[0].containers) == 2
    tidy = pd.DataFrame([{"model": "g2", "layer": 0, "gate": g, "bin": b, "fraction": one[f"l0_{g}"][b]}
                         for g in "if" for b in range(10)])
    heights = [b.get_height() for b in gate_plots.plot_gate_histograms(tidy).axes[0].containers[1]]
    assert heights == one["l0_f"]
    # results.load_gates: several trials per gate mode, averaged; the modes in the paper's order
    rows = [{"trial_id": f"{mode}{t}", "g2.gate_mode": mode, "layer": 0, "gate": g, "bin": b,
             "fraction": (t + 1) * one[f"l0_{g}"][b] / 2 if mode == "g2" else 0.1}
            for mode in ("g2", "lstm") for t in range(2) for g in "if" for b in range(10)]
    fig2 = gate_plots.plot_gate_histograms(pd.DataFrame(rows))
    assert [ax.get_title() for ax in fig2.axes] == ["lstm: layer 0", "g2: layer 0"]
    assert np.allclose([b.get_height() for b in fig2.axes[1].containers[1]], np.array(one["l0_f"]) * 0.75)
    with pytest.raises(ValueError, match="g2 histogram of layer 0 gate f has 9 bins"):
        gate_plots.plot_gate_histograms(pd.DataFrame([r for r in rows if (r["g2.gate_mode"], r["gate"], r["bin"]) !=
                                                 ("g2", "f", 9)]))
    with pytest.raises(ValueError, match="l<k>_i"):
        gate_plots.plot_gate_histograms({"layer0_i": [0.1] * 10})
    with pytest.raises(ValueError, match="has 5 bins, expected 10"):
        gate_plots.plot_gate_histograms({"l0_i": [0.2] * 5})
    _png(fig, tmp_path, "hist_one")


def test_saturation_bars_are_means_over_trials(lm, tmp_path):
    fig = gate_plots.plot_saturation(lm)
    lt_ax, gt_ax = fig.axes
    assert [len(c) for c in gt_ax.containers if hasattr(c, "patches")] == [4, 4, 4]  # 2 layers × {i, f} per mode
    g2 = lm[(lm["g2.gate_mode"] == "g2").fillna(False) & (lm["status"] == "ok").fillna(False)]
    g2 = g2.drop_duplicates("trial_id")
    bars = [c for c in gt_ax.containers if hasattr(c, "patches")][2]
    assert np.isclose(bars.patches[0].get_height(), g2["gate_l0_i_gt09"].mean())
    assert [t.get_text() for t in gt_ax.get_xticklabels()] == ["layer 0 i", "layer 0 f", "layer 1 i", "layer 1 f"]
    assert gt_ax.get_title() == "gate values > 0.9" and lt_ax.get_ylabel() == "fraction of gate values"
    _png(fig, tmp_path, "saturation")


def test_saturation_names_nmt_layers(study):
    nmt = study[(study["task"] == "nmt").fillna(False)]
    labels = [t.get_text() for t in gate_plots.plot_saturation(nmt).axes[0].get_xticklabels()]
    assert labels[:2] == ["enc fwd i", "enc fwd f"] and labels[-1] == "dec 1 f"


def test_objective_vs_tau_draws_modes_without_tau_as_references(lm, tmp_path):
    fig = plots.plot_objective_vs(lm, knob="g2.tau")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("τ") and "perplexity" in ax.get_ylabel()
    assert len(ax.collections) == 1  # only g2 uses τ
    g2_points = ax.collections[0].get_offsets()
    assert len(g2_points) == 6      # 2 seeds × 3 (τ, p) trials, uncompressed rows only
    # lstm and sharpened: a horizontal line at their mean; g2: the line joining its means per τ value.
    assert len(ax.get_lines()) == 3
    _png(fig, tmp_path, "tau")
    fig = plots.plot_objective_vs(lm, knob="g2.p", y="uncompressed_test_metric", method=None)
    assert fig.axes[0].get_xlabel().startswith("p")
    _png(fig, tmp_path, "p")


def test_hypervolume_over_time_one_line_per_group(lm, tmp_path):
    objectives = {"val_metric": "min", "gate_compression": "max"}
    reference = plots.reference_point(lm, objectives)
    assert reference[0] > lm["val_metric"].max() and reference[1] < 1.0
    fig = plots.plot_hypervolume_over_time(lm, objectives, reference, by="g2.gate_mode")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4 and ax.get_lines()[0].get_label() == "all trials"
    hv = pareto.hypervolume_over_time(lm, objectives, reference)
    assert np.isclose(ax.get_lines()[0].get_ydata()[-1], hv["hypervolume"].iloc[-1])
    assert ax.get_xlabel() == "wall time since the first result (min)"
    assert np.all(np.diff(ax.get_lines()[0].get_ydata()) >= 0)
    _png(fig, tmp_path, "hv")


def test_paper_table_is_tidy_and_complete():
    table = paper_compression()
    assert len(table) == 2 * 3 * 5
    row = table[(table.task == "lm") & (table.gate_mode == "g2") & (table.setting == "svd_small")].iloc[0]
    assert (row["value"], row["rank"], row["step"], row["clip"]) == (56.0, 64, 0.2, 0.4)
    assert table.query("task == 'nmt' and gate_mode == 'lstm' and setting == 'round_clip'").value.item() == 21.97
    sat = paper_saturation().set_index(["gate_mode", "gate"])
    assert sat.loc[("g2", "i"), "gt09"] == pytest.approx(0.704)


def _frame(rows: list[dict]) -> pd.DataFrame:
    base = {"status": "ok", "task": "lm", "compress.bits": 32, "g2.eval_gate": "soft", "compress.rank": 0}
    return pd.DataFrame([base | r for r in rows])


def test_compare_with_paper_picks_the_settings():
    df = _frame([
        {"g2.gate_mode": "g2", "method": "none", "test_metric": 10.0},
        {"g2.gate_mode": "g2", "method": "none", "test_metric": 12.0},        # a second seed: averaged
        {"g2.gate_mode": "g2", "method": "round", "test_metric": 13.0},
        {"g2.gate_mode": "g2", "method": "svd", "compress.rank": 8, "test_metric": 30.0},
        {"g2.gate_mode": "g2", "method": "svd", "compress.rank": 4, "test_metric": 40.0},
        {"g2.gate_mode": "g2", "method": "svd", "compress.rank": 2, "test_metric": 50.0},
        {"g2.gate_mode": "g2", "method": "svd+quant", "compress.rank": 8, "compress.bits": 4, "test_metric": 99.0},
        {"g2.gate_mode": "g2", "method": "none", "test_metric": 99.0, "status": "diverged"},
        {"g2.gate_mode": "g2", "method": "none", "test_metric": 99.0, "g2.eval_gate": "hard"},
        {"g2.gate_mode": "g2", "method": "none", "test_metric": 99.0, "task": "nmt"},
        {"g2.gate_mode": "lstm", "method": "round_clip", "test_metric": 20.0, "g2.eval_gate": "hard"},  # no g2: kept
    ])
    out = compare_with_paper(df, "lm").set_index(["gate_mode", "setting"])
    assert len(out) == 15 and list(out.columns[:3]) == ["task", "paper", "ours"]
    assert out.loc[("g2", "original"), ["ours", "n"]].tolist() == [11.0, 2]
    assert out.loc[("g2", "original"), "delta"] == pytest.approx(11.0 - 52.1)
    assert out.loc[("g2", "round"), "ours"] == 13.0
    assert (out.loc[("g2", "svd_big"), "ours"], out.loc[("g2", "svd_big"), "rank"]) == (30.0, 8)
    assert (out.loc[("g2", "svd_small"), "ours"], out.loc[("g2", "svd_small"), "rank"]) == (50.0, 2)
    assert out.loc[("lstm", "round_clip"), "ours"] == 20.0
    assert np.isnan(out.loc[("sharpened", "original"), "ours"]) and out.loc[("sharpened", "original"), "n"] == 0
    assert out.loc[("g2", "svd_big"), "paper_rank"] == 128


def test_compare_with_paper_prefers_the_papers_ranks():
    df = _frame([{"g2.gate_mode": "lstm", "method": "svd", "compress.rank": r, "test_metric": float(r)}
                 for r in (16, 32, 256)])
    out = compare_with_paper(df, "lm").query("gate_mode == 'lstm'").set_index("setting")
    assert (out.loc["svd_big", "ours"], out.loc["svd_small", "ours"]) == (256.0, 16.0)  # LM's 128/64 absent
    nmt = _frame([{"task": "nmt", "g2.gate_mode": "lstm", "method": "svd", "compress.rank": r, "test_metric": float(r)}
                  for r in (8, 16, 32, 256)])
    out = compare_with_paper(nmt, "nmt").query("gate_mode == 'lstm'").set_index("setting")
    assert (out.loc["svd_big", "ours"], out.loc["svd_small", "ours"]) == (32.0, 16.0)
    with pytest.raises(ValueError, match="task must be one of"):
        compare_with_paper(nmt, "mt")


def test_compare_on_a_loaded_study(study):
    out = compare_with_paper(study, "lm", metric="val_metric")
    assert out["n"].gt(0).all()
    assert set(out.query("setting == 'svd_big'")["rank"]) == {128}   # the paper's LM ranks are in the sweep
    sat = compare_saturation(study)
    assert set(sat["layer"].dropna()) == {3} and sat.set_index(["gate_mode", "gate"]).loc[("g2", "i"), "gt09"] > 0.5


def test_paper_comparison_figure(study, tmp_path):
    fig = plots.plot_paper_comparison(study, "lm", metric="val_metric")
    paper_ax, ours_ax = fig.axes
    assert len(paper_ax.get_lines()) == 3 and paper_ax.get_title().startswith("paper: PTB")
    assert [t.get_text() for t in paper_ax.get_xticklabels()][-2:] == ["SVD r=128", "SVD r=64"]
    assert "perplexity" in ours_ax.get_ylabel()
    g2 = [line for line in paper_ax.get_lines() if line.get_color() == "tab:green"][0]
    assert list(g2.get_ydata()) == paper_compression().query("task == 'lm' and gate_mode == 'g2'").value.tolist()
    _png(fig, tmp_path, "paper")
    rel = plots.plot_paper_comparison(study, "nmt", metric="val_metric", relative=True)
    assert rel.axes[0].get_lines()[0].get_ydata()[0] == 1.0
    empty = plots.plot_paper_comparison(study.iloc[:0], "nmt")
    assert "no ok rows" in empty.axes[1].texts[0].get_text()
    assert list(SETTINGS) == ["original", "round", "round_clip", "svd_big", "svd_small"]


def test_plots_draw_on_given_axes(lm):
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_front(lm, ax=ax) is fig and plots.plot_objective_vs(lm, ax=ax) is fig
    axes = Figure().subplots(1, 2)
    assert gate_plots.plot_saturation(lm, axes=axes) is axes[0].get_figure()
    with pytest.raises(ValueError, match="expected 2 axes"):
        gate_plots.plot_saturation(lm, axes=[ax])
