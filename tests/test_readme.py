"""Every ```python block of README.md runs, as a reader would paste it: the README cannot drift from the code.

The blocks run in a directory holding a study named `quickstart` under `studies/` (rows of a real tiny trial), which
is what the README's query examples read.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from study import results
from study.results.rows import trial_rows
from trainables.config import TrialConfig
from trainables.report import EpochReport

from conftest import REPO_ROOT

BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():   # a changed fence would leave the parametrised test with nothing to run
    assert len(BLOCKS) >= 2


@pytest.fixture
def quickstart(trial, tmp_path, monkeypatch):
    """`studies/quickstart` in the working directory: one lstm and one g2 model's sweep rows."""
    from datetime import UTC, datetime

    config, reports = trial
    last = EpochReport.from_dict(reports[-1])
    for trial_id, knobs in (("t1", {"g2.gate_mode": "g2", "g2.tau": 0.9}), ("t2", {"g2.gate_mode": "lstm"})):
        flat = replace(TrialConfig.from_flat(config), seed=1).to_flat() | knobs
        rows = trial_rows("quickstart", trial_id, flat, last, status="ok", error=None, finished_at=datetime.now(UTC))
        results.write_trial(tmp_path / "studies" / "quickstart", trial_id, rows)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def knee_export(quickstart, trial_store):
    """`exports/knee`, as the README's `g2-study export quickstart --knee --output exports/knee` writes it: the
    quickstart rows' model is the `trial` fixture's, in its model store."""
    from pathlib import Path

    from study.config import StudyConfig
    from study.export import Selection, export_row, select_row
    from study.paths import StudyPaths

    paths = StudyPaths(quickstart / "studies" / "quickstart")
    paths.models.symlink_to(trial_store, target_is_directory=True)
    cfg = StudyConfig(name="quickstart", task="lm", preset="tiny")
    row = select_row(str(paths.root), cfg, Selection(trial=None, where=None, knee=True, rank=None, bits=None,
                                                     method=None, eval_gate=None))
    export_row(paths, row, Path("exports/knee"))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{k}" for k in range(len(BLOCKS))])
def test_a_readme_block_runs(block, quickstart, request, capsys):
    if "exports/knee" in block:   # the "Take a model away" example loads what `g2-study export` wrote
        request.getfixturevalue("knee_export")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    if "df" in namespace:                                      # the query example found the study's rows
        assert len(namespace["df"]) > 0 and len(namespace["low"]) > 0
    if "small" in namespace:                                   # the layer example compressed a copy
        assert namespace["report"].gate_compression > 1.0 and namespace["gates"]
