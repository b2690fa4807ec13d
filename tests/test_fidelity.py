"""The fidelity report (analysis.fidelity, `g2-study compare`): the paper's tables beside a study's, in markdown."""
import math
import re

import numpy as np
import pandas as pd
import pytest

from analysis import fidelity
from analysis.paper import paper_compression
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
