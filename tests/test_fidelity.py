"""The fidelity report (analysis.fidelity, `g2-study compare`): the paper's tables beside a study's, in markdown."""
import math
import re

import numpy as np
import pandas as pd
import pytest

from analysis import fidelity
from analysis.paper import paper_compression
from analysis.pareto import same_model_columns
from study import results
from study.cli import main

from test_plots import write_synthetic_study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> pd.DataFrame:
    return results.load(write_synthetic_study(tmp_path_factory.mktemp("study"), tasks=("lm",)))


def cells(markdown: str, mode: str) -> list[str]:
    """The cells of the table row of `mode` (the first table in `markdown` that has one)."""
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {mode} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_compression_cells_are_our_seed_means_beside_the_paper(study):
    table = fidelity.compression_markdown(study, "lm")
    ok = study[(study["status"] == "ok") & (study["g2.gate_mode"] == "g2") & (study["method"] == "none")]
    ours = ok.drop_duplicates(["training_key", "g2.eval_gate"])["test_metric"]
    paper = paper_compression().query("task == 'lm' and gate_mode == 'g2' and setting == 'original'")["value"].item()
    original = cells(table, "g2")[0]
    mean, std, paper_printed, delta = map(float, re.match(r"([\d.]+) ± ([\d.]+) \(([\d.]+), Δ ([+-][\d.]+)\)",
                                                          original).groups())
    assert mean == pytest.approx(ours.mean(), abs=0.006) and std == pytest.approx(ours.std(ddof=1), abs=0.006)
    assert paper_printed == paper and delta == pytest.approx(ours.mean() - paper, abs=0.011)
    assert len(cells(table, "lstm")) == len(fidelity.SETTINGS) + len(fidelity.BITS)


def test_cost_of_compression_is_relative_to_each_modes_original(study):
    loss = fidelity.loss_markdown(study, "lm")
    round_cell = cells(loss, "lstm")[0]                               # round − original, ours (paper's)
    ours, paper = map(float, re.match(r"([+-][\d.]+) \(([+-][\d.]+)\)", round_cell).groups())
    assert paper == pytest.approx(53.2 - 52.8)                        # the paper's lstm: round 53.2, original 52.8
    ok = study[(study["status"] == "ok") & (study["g2.gate_mode"] == "lstm")]
    by_method = ok.groupby("method")["test_metric"].mean()
    assert ours == pytest.approx(by_method["round"] - by_method["none"], abs=0.011)


def test_binary_gate_table_leaves_missing_rows_empty_and_saturation_is_in_percent(study):
    hard = fidelity.compression_markdown(study, "lm", eval_gate="hard")
    assert cells(hard, "g2")[0].startswith("– (")                      # no g2 row was scored with hard gates
    assert not cells(hard, "lstm")[0].startswith("–")                  # lstm rows are the same with either
    saturation = fidelity.saturation_markdown(study, "lm")
    first = cells(saturation, "g2")
    ok = study[(study["status"] == "ok") & (study["g2.gate_mode"] == "g2")].drop_duplicates("trial_id")
    assert first[1] == f"{100 * np.nanmean(ok['gate_l0_i_lt01']):.1f} %"
    assert int(first[-1]) == len(ok) and not math.isnan(np.nanmean(ok["gate_l0_i_lt01"]))


def test_compare_refuses_an_unknown_study(tmp_path, capsys):
    assert main(["compare", "nope", "--storage", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_each_settings_cost_says_what_it_did_to_the_weights(study):
    """Beside each cost: the mean share of compressed i/f weights set to 0 and the blocks' relative error."""
    loss = fidelity.loss_markdown(study, "lm")
    ok = study[(study["status"] == "ok") & (study["g2.gate_mode"] == "lstm")].drop_duplicates(same_model_columns(study))
    for column, method in ((0, "round"), (1, "round_clip"), (3, "svd")):   # round, round & clip, SVD small
        rows = ok[(ok["method"] == method) & ((ok["compress.rank"] == 64) if method == "svd" else True)]
        zeroed, error = rows["fraction_zeroed"].mean(), rows["relative_error"].mean()
        printed = re.search(r"· ([\d.]+) % zeroed, err ([\d.]+)", cells(loss, "lstm")[column]).groups()
        assert float(printed[0]) == pytest.approx(100 * zeroed, abs=0.051)
        assert float(printed[1]) == pytest.approx(error, abs=0.0051)
    assert 0 < ok.loc[ok["method"] == "round", "fraction_zeroed"].mean() < 1      # a real model's weights, rounded
    assert "round (rel)" not in loss.splitlines()[0]                              # the study scored no _rel mode


def test_relative_rounding_gets_columns_where_the_study_scored_it(study):
    rel = study[study["method"] == "round_clip"].copy()
    rel["method"] = rel["compress.paper"] = "round_clip_rel"
    rel["test_metric"] += 1.0
    loss = fidelity.loss_markdown(pd.concat([study, rel], ignore_index=True), "lm")
    header = [c.strip() for c in loss.splitlines()[0].strip("|").split("|")]
    assert header[-1] == "round & clip (rel)" and "round (rel)" not in header
    clip, clip_rel = cells(loss, "g2")[1], cells(loss, "g2")[-1]
    cost = float(clip.split()[0]) + 1.0
    assert float(clip_rel.split()[0]) == pytest.approx(cost, abs=0.011)
    assert clip_rel.split("·")[1] == clip.split("·")[1]                           # the same rows' weights


def test_an_older_study_without_the_weight_columns_still_reports(tmp_path):
    """Results files written before fraction_zeroed (and the _rel knobs) existed load, and the tables say '–'."""
    import pyarrow.parquet as pq

    study_dir = write_synthetic_study(tmp_path / "old", tasks=("lm",), seeds=(1,))
    for path in (study_dir / "results").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([c for c in ("fraction_zeroed", "compress.rel_step", "compress.rel_clip")
                                           if c in table.column_names]), path)
    df = results.load(study_dir)
    assert df["fraction_zeroed"].isna().all() and df["relative_error"].notna().any()
    loss = fidelity.loss_markdown(df, "lm")
    assert "% zeroed" not in loss and "– zeroed, err" in cells(loss, "lstm")[0]
    assert fidelity.report(df, "old").startswith("## old (lm;")
