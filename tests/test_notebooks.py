"""Executes the analysis notebooks top to bottom against a study directory, as a user would (docs/design.md §6).

Most tests use a synthetic study (written through study.results, so its files have the real layout and schema); one
uses a real study run by `g2-study run`.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from analysis import notebooks
from analysis.notebooks import NOTEBOOKS
from study import results

from test_plots import write_synthetic_study

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


def execute(name: str, study_dir: Path, cwd: Path) -> nbformat.NotebookNode:
    """Run a notebook as `analysis.notebooks` does for the docs; each is written to work from any directory."""
    nb = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    (param,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert 'matplotlib.use("Agg")' in param.source
    return notebooks.execute(name, study_dir, cwd, timeout=120)


def outputs(nb: nbformat.NotebookNode) -> tuple[int, str]:
    """(number of PNG images, all text output) of an executed notebook; fails on any error output."""
    images, text = 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.ename}: {out.evalue}"
            images += "image/png" in out.get("data", {})
            text.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    return images, "\n".join(text)


@pytest.fixture(scope="module")
def full_study(tmp_path_factory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lm_only_study(tmp_path_factory) -> Path:
    # A partial study: LM only, and only two of the three gate modes.
    return write_synthetic_study(tmp_path_factory.mktemp("lm_only"), tasks=("lm",), modes=("lstm", "g2"), seeds=(1,))


def test_notebooks_are_stored_without_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert "studies/quickstart" in code[0].source and "parameters" in code[0].metadata["tags"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "figures"), [("pareto_lm", 8), ("pareto_nmt", 8), ("gates", 8)])
def test_notebook_runs_on_a_full_study(name, figures, full_study, tmp_path):
    images, text = outputs(execute(name, full_study, tmp_path))
    assert images == figures
    assert "No finished" not in text


@pytest.mark.slow
def test_notebooks_on_a_study_without_nmt(lm_only_study, tmp_path):
    images, text = outputs(execute("pareto_nmt", lm_only_study, tmp_path))
    assert images == 0 and "No finished NMT trials" in text
    images, _ = outputs(execute("pareto_lm", lm_only_study, tmp_path))
    assert images == 8
    images, text = outputs(execute("gates", lm_only_study, tmp_path))
    assert images == 4 and "No NMT trials" in text   # saturation, two curves and the histograms, for LM only


@pytest.mark.slow
def test_notebooks_run_on_a_real_study(real_study, tmp_path):
    images, _ = outputs(execute("pareto_lm", real_study["dir"], tmp_path))
    assert images >= 6
    # Every ok trial that trained has the histograms of its last epoch; one that reused a model has none.
    ok = results.load(real_study["dir"], status="ok").drop_duplicates("trial_id").set_index("trial_id")
    gates = results.load_gates(real_study["dir"])
    assert set(ok.index[~ok["reused_checkpoint"]]) <= set(gates["trial_id"])
    assert not set(ok.index[ok["reused_checkpoint"]]) & set(gates["trial_id"])
    ok_gates = gates[gates["trial_id"].isin(ok.index)]
    assert (ok_gates["epoch"].to_numpy() == ok.loc[ok_gates["trial_id"], "epoch"].to_numpy()).all()
    images, text = outputs(execute("gates", real_study["dir"], tmp_path))
    assert images == 4 and "No gate histograms" not in text   # LM only: saturation, two curves, histograms
    images, text = outputs(execute("pareto_nmt", real_study["dir"], tmp_path))
    assert "No finished NMT trials" in text


@pytest.mark.slow
def test_the_docs_figures_come_from_the_executed_notebook(full_study, tmp_path):
    assert notebooks.main(["gates", str(full_study), "--figures", str(tmp_path / "figs")]) == 0
    written = sorted((tmp_path / "figs").iterdir())
    assert [p.name for p in written] == [f"gates_{k}.png" for k in range(1, 9)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
