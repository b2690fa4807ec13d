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


def format_pattern(template: str) -> re.Pattern:
    """A `str.format` template as a regex: its text literal, each field any text (a field's own `:spec` too)."""
    parts = re.split(r"\{[^{}]*\}", template)
    return re.compile("^" + "(.+?)".join(re.escape(part) for part in parts) + "$")


def sample(name: str) -> list[str]:
    """The lines of the README block under `<!-- NAME sample: ... -->`."""
    found = re.search(rf"^<!-- {name} sample:.*?-->\n```\n(.*?)^```", (REPO_ROOT / "README.md").read_text(),
                      flags=re.S | re.M)
    assert found, f"README.md has no {name} sample"
    return found.group(1).splitlines()


def counted_words(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"([a-z][a-z ]*?) \d+(?:,|$)", text)}


def test_the_readme_console_sample_is_what_the_console_prints():
    from study.console import BAR_HEAD, LIVE_LINE, START_LINE
    from study.progress import END_LINE, EPOCH_LINE
    from study.vocabulary import ORDER

    kinds = {"start": START_LINE, "epoch": EPOCH_LINE, "live": LIVE_LINE, "end": END_LINE}
    seen = set()
    for line in sample("console"):
        matched = [kind for kind, template in kinds.items() if format_pattern(template).match(line)]
        if line.startswith("trials "):   # the bar: its head, then running trials and counts
            head = format_pattern(BAR_HEAD + " | {rest}").match(line)
            assert head and re.fullmatch(r"[█░]{10}", head.group(3)), line
            matched = ["bar"]
        assert matched, f"README console sample line matches no format the code prints: {line}"
        seen.add(matched[0])
        if matched[0] == "end":   # the counts are the vocabulary's words
            counts = format_pattern(END_LINE).match(line).groups()[6]
            assert counted_words(counts) <= set(ORDER), line
    assert {"start", "epoch", "end", "bar"} <= seen


def test_the_readme_status_sample_is_what_status_prints():
    from study.status import COUNTS_LINE, FRONT_LINE, HEAD_LINE
    from study.vocabulary import ORDER

    lines = sample("status")
    assert format_pattern(HEAD_LINE).match(lines[0]), lines[0]
    counts = format_pattern(COUNTS_LINE).match(lines[1])
    assert counts and counted_words(counts.group(2)) <= set(ORDER), lines[1]
    assert re.match(r"^trial +state +knobs +detail$", lines[3]), lines[3]
    assert all(row.split()[1] in ORDER for row in lines[4:lines.index("", 4)])
    assert any(format_pattern(FRONT_LINE).match(line) for line in lines)
