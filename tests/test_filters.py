"""The filter language (study/filters.py): what each construct selects from a real results dataset, what it refuses."""
from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from study import cli, results
from study.config import load_study_config
from study.paths import STATE_FILE, StudyPaths, StudyState
from study.results.filters import MAX_LENGTH, FilterError, compile_filter
from study.results.schema import results_schema

NAN = math.nan
#       trial  status      method   gate_mode    tau  rank  trial_setting  val    uncompressed  error
ROWS = [("a", "ok",       "none",  "g2",        0.3, 0,    True,          100.0, 110.0,        None),
        ("b", "ok",       "svd",   "g2",        0.9, 8,    False,         120.0, 110.0,        None),
        ("c", "ok",       "quant", "lstm",      1.5, 0,    True,          NAN,   None,         None),
        ("d", "error",    "none",  "lstm",      2.0, None, True,          None,  None,         "boom"),
        ("e", "diverged", "none",  "sharpened", 2.5, 16,   None,          NAN,   None,         "nan loss")]


def write_dataset(study_dir: Path) -> None:
    """One file per trial through the study's own writer, finished on consecutive days of January 2026."""
    for day, (tid, status, method, mode, tau, rank, setting, val, plain, error) in enumerate(ROWS, start=1):
        results.write_trial(study_dir, tid, [{
            "study": "s", "trial_id": tid, "status": status, "method": method, "g2.gate_mode": mode, "g2.tau": tau,
            "compress.rank": rank, "is_trial_setting": setting, "val_metric": val, "uncompressed_val_metric": plain,
            "error": error, "finished_at": datetime(2026, 1, day, tzinfo=UTC)}])


@pytest.fixture
def study_dir(tmp_path) -> Path:
    write_dataset(tmp_path)
    return tmp_path


def selected(study_dir: Path, text: str) -> str:
    return "".join(results.load(study_dir, filters=text)["trial_id"])


@pytest.mark.parametrize("text, expected", [
    ("status == 'ok'", "abc"),
    ('status != "ok"', "de"),
    ("g2.tau < 1", "ab"),
    ("`g2.tau` <= 0.9", "ab"),                              # backquoted and bare dotted names are one column
    ("0.5 < g2.tau <= 2", "bcd"),                           # chained
    ("2 >= `g2.tau` > 0.5", "bcd"),                         # the value on the left
    ("g2.tau > -1", "abcde"),
    ("compress.rank >= 8", "be"),                           # d's rank is missing: not selected ...
    ("not compress.rank >= 8", "ac"),                       # ... negated or not (SQL)
    ("status == 'ok' and g2.gate_mode == 'g2'", "ab"),
    ("g2.gate_mode == 'sharpened' or method == 'svd'", "be"),
    ("not (status == 'ok' or status == 'error')", "e"),
    ("status == 'ok' and (method == 'svd' or g2.tau > 1)", "bc"),
    ("method in ['svd', 'quant']", "bc"),
    ("method not in ('svd', 'quant')", "ade"),
    ("compress.rank in [0, 16.0]", "ace"),                  # ints and floats mixed on an int column
    ("compress.rank in [8, None]", "bd"),
    ("is_trial_setting", "acd"),
    ("is_trial_setting == True", "acd"),
    ("is_trial_setting == False", "b"),
    ("not is_trial_setting", "b"),
    ("error == None", "abc"),
    ("error is not None", "de"),
    ("val_metric == None", "cde"),                          # NaN counts as missing, as pandas shows it
    ("val_metric != None", "ab"),
    ("val_metric > 110", "b"),
    ("val_metric < uncompressed_val_metric", "a"),          # two columns
    ("finished_at >= '2026-01-04'", "de"),                  # an ISO time, UTC when it names no zone
    ("finished_at < '2026-01-02T00:00:00+00:00'", "a"),
    ("error == 'boom'", "d"),
    ("error == 'a@b' or error == '`boom`'", ""),            # '@' and backquotes inside strings are text
    ("  ", "abcde"),                                        # a blank filter keeps everything
])
def test_each_construct_selects_its_rows(study_dir, text, expected):
    assert selected(study_dir, text) == expected


def test_code_in_a_filter_does_not_run(study_dir):
    marker = study_dir / "PWNED"
    attempts = [f"@pd.io.common.os.system('touch {marker}')",
                f"pd.io.common.os.system('touch {marker}') == 0",
                f"__import__('os').system('touch {marker}') == 0",
                f"status == 'ok' and @os.system('touch {marker}')",
                f"(lambda: __import__('os').system('touch {marker}'))() == 0",
                f"[__import__('os').system('touch {marker}') for _ in [1]] == 0",
                f"status.__class__.__init__.__globals__['os'].system('touch {marker}') == 0"]
    for text in attempts:
        with pytest.raises(FilterError, match="invalid filter"):
            results.load(study_dir, filters=text)
        assert not marker.exists(), text
    with pytest.raises(FilterError, match="'@' \\(a pandas variable\\) is not part of the filter language"):
        results.load(study_dir, filters=attempts[0])


@pytest.mark.parametrize("text, message", [
    ("pd.io.common.os.system('x')", r"a function call is not allowed: pd\.io\.common\.os\.system\('x'\)"),
    ("status == 'ok' & g2.tau < 1", r"'&' is not supported \(use `and`\)"),
    ("status == 'ok' | g2.tau < 1", r"'\|' is not supported \(use `or`\)"),
    ("~is_trial_setting", r"'~' is not supported \(use `not`\)"),
    ("`g2.tau` * 2 < 1", r"arithmetic is not allowed: `g2\.tau` \* 2"),
    ("compress.rank[0] == 1", r"a subscript is not allowed: compress\.rank\[0\]"),
    ("g2.tau == (lambda: 1)", r"a lambda is not allowed: lambda: 1"),
    ("[x for x in status] == 1", r"a comprehension is not allowed"),
    ("status == f'{1}'", r"an f-string is not allowed"),
    ("status == 'ok' and", r"invalid filter .*: invalid syntax"),
    ("`g2.tau < 1", r"unterminated backquote at character 1"),
    ("status == ok", r"unknown column 'ok' \(a string value needs quotes: 'ok'\)"),
    ("status == 1", r"column 'status' holds string values; cannot compare it with: 1"),
    ("g2.tau == 'high'", r"column 'g2\.tau' holds number values; cannot compare it with: 'high'"),
    ("is_trial_setting == 1", r"column 'is_trial_setting' holds boolean values"),
    ("status == g2.tau", r"cannot compare a string column with a number column"),
    ("g2.tau", r"column 'g2\.tau' is not boolean; compare it with a value: g2\.tau"),
    ("1 < 2", r"a comparison needs a column on one side"),
    ("status is 'ok'", r"`is` compares only with None"),
    ("g2.tau < None", r"None compares only with ==, !=, is and is not"),
    ("method in 'svd'", r"`in` needs a list of values like \['a', 'b'\]"),
    ("method in [status]", r"expected a value, not a column: status"),
    ("finished_at > 'yesterday'", r"column 'finished_at' holds times; expected an ISO time"),
    ("True", r"expected a condition: True"),
    ("not " * 2400 + "is_trial_setting", r"nested too deeply"),
    ("g2.tau < 1 or " * (MAX_LENGTH // 14) + "g2.tau < 1", rf"at most {MAX_LENGTH}"),
])
def test_refusals_name_the_problem_and_the_text(study_dir, text, message):
    with pytest.raises(FilterError, match=message):
        results.load(study_dir, filters=text)


def test_an_unknown_column_lists_the_known_ones(study_dir):
    with pytest.raises(FilterError) as caught:
        results.load(study_dir, filters="g2.taux < 0.5")
    message = str(caught.value)
    assert message.startswith("invalid filter 'g2.taux < 0.5': unknown column 'g2.taux' (did you mean 'g2.tau'?)")
    assert "columns are study, trial_id, status," in message and ", g2.tau, " in message
    assert isinstance(caught.value, ValueError)   # what the CLI turns into exit code 2


def test_columns_are_checked_on_an_empty_study_and_in_every_dataset(tmp_path):
    with pytest.raises(FilterError, match="unknown column 'g2.taux'"):
        results.load(tmp_path / "nothing-here", filters="g2.taux < 0.5")
    assert results.load(tmp_path / "nothing-here", filters="g2.tau < 0.5").empty
    with pytest.raises(FilterError, match="unknown column 'method'.*columns are study, trial_id, epoch"):
        results.load_curves(tmp_path, filters="method == 'svd'")   # curves have no method
    with pytest.raises(FilterError, match="unknown column 'val_metric'.*columns are study, trial_id, g2.gate_mode"):
        results.load_gates(tmp_path, filters="val_metric > 1")


def test_compile_filter_builds_one_expression_from_the_schema():
    schema = results_schema()
    assert str(compile_filter("0.5 < g2.tau <= 2", schema)) == "((0.5 < g2.tau) and (g2.tau <= 2))"
    assert str(compile_filter("`g2.tau` < 1", schema)) == str(compile_filter("g2.tau < 1", schema))
    assert str(compile_filter("error == None", schema)) == "is_null(error, {nan_is_null=true})"


def make_study(storage: Path, name: str) -> None:
    """What `g2-study results` reads: study.json (the saved config) and results/*.parquet."""
    cfg = load_study_config(None, [f"study.name={name}"], storage=str(storage))
    root = StudyPaths.named(str(storage), name).root
    root.mkdir(parents=True)
    StudyState(config=cfg.to_json()).write(root / STATE_FILE)
    write_dataset(root)


def test_cli_where_selects_rows_and_a_bad_filter_exits_2(tmp_path, capsys):
    make_study(tmp_path, "mini")
    base = ["results", "mini", "--storage", str(tmp_path), "--format", "csv"]
    assert cli.main([*base, "--where", "method in ['svd', 'quant'] and g2.tau < 1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("study,trial_id,") and [line[:4] for line in out.splitlines()[1:]] == ["s,b,"]

    marker = tmp_path / "PWNED"
    assert cli.main([*base, "--where", f"@pd.io.common.os.system('touch {marker}')"]) == cli.EXIT_BAD_INPUT == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not marker.exists()
    assert captured.err.startswith("g2-study results: error: invalid filter \"@pd.io.common.os.system(")
    assert "'@' (a pandas variable) is not part of the filter language" in captured.err

    assert cli.main([*base, "--where", "g2.taux < 1"]) == 2
    assert "g2-study results: error: invalid filter 'g2.taux < 1': unknown column 'g2.taux'" in capsys.readouterr().err
