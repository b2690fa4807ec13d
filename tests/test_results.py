"""The results datasets (study/results.py): rows from a real trial's reports, round trips, idempotent rewrites."""
from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study import results
from study.results.filters import FilterError
from study.results.rows import curve_rows, gate_rows, trial_rows
from study.results.schema import gates_schema, results_schema
from study.trial_end import TrialLedger
from trainables.config import SMOKE, TrialConfig
from trainables.report import EpochReport

from conftest import REPO_ROOT, trial_reports

FINISHED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def report_of(tune_dict: dict) -> EpochReport:
    """A report as the driver types it (`study.trial_end.TrialLedger.report`)."""
    return EpochReport.from_dict(tune_dict)


class DriverRecords:
    """The path the driver's callback takes from Tune results to the files: each result typed once, each end
    decided once (`study.trial_end.TrialLedger`), then written (`ResultsWriter`)."""

    def __init__(self, study_dir, study: str):
        self.ledger, self.writer = TrialLedger(study), results.ResultsWriter(study_dir, study)

    def record_report(self, trial_id: str, config: dict, result: dict) -> None:
        report = self.ledger.report(trial_id, config, result)
        if report.status != "error":
            self.writer.record_report(trial_id, config, report)

    def record_end(self, trial_id: str, config: dict, error: str | None = None) -> list[dict]:
        end = self.ledger.end(trial_id, config, error=error)
        self.writer.record_end(trial_id, config, end.rows)
        return list(end.rows)

    def recorded_rows(self, trial_id: str) -> list[dict] | None:
        return self.writer.recorded_rows(trial_id)
@pytest.fixture(scope="module")
def reused(trial, trial_store, tmp_path_factory):
    """The reports of a second trial with the same training knobs: it reuses the first one's model."""
    config, _ = trial
    return trial_reports(TrialConfig.from_flat(config), tmp_path_factory.mktemp("reused"), trial_store)


def flat_config(**overrides) -> dict:
    cfg = TrialConfig.from_flat(SMOKE, base=TrialConfig.preset("lm", "tiny"))
    return {**cfg.to_flat(), **overrides}


def test_schema_types_come_from_the_dataclasses():
    schema = results_schema(["gate_l10_i_lt01", "gate_l1_f_gt09", "gate_l1_i_lt01"])
    assert set(TrialConfig().to_flat()) <= set(schema.names)
    assert len(schema.names) == len(set(schema.names))
    assert schema.field("seed").type == pa.int64()
    assert schema.field("g2.tau").type == pa.float64()
    assert schema.field("g2.gate_mode").type == pa.string()
    assert schema.field("lm.tie_weights").type == pa.bool_()
    assert schema.field("sweep.ranks").type == pa.list_(pa.int64())
    assert schema.field("sweep.paper").type == pa.list_(pa.string())
    assert schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("gate_bits").type == pa.int64()
    assert schema.names[-3:] == ["gate_l1_i_lt01", "gate_l1_f_gt09", "gate_l10_i_lt01"]   # by layer number
    assert all(schema.field(n).type == pa.float64() for n in schema.names[-3:])


def test_ok_trial_gives_one_row_per_sweep_point(trial):
    config, reports = trial
    last = reports[-1]
    rows = trial_rows("s", "t1", config, report_of(last), status="ok", error=None, finished_at=FINISHED)

    assert len(rows) == len(last["sweep"]) == 5   # none, quant, svd, svd+quant, round_clip
    assert sorted(r["method"] for r in rows) == ["none", "quant", "round_clip", "svd", "svd+quant"]
    assert [r["is_trial_setting"] for r in rows].count(True) == 1
    plain = next(r for r in last["sweep"] if r["method"] == "none")
    for row, point in zip(rows, last["sweep"]):
        assert (row["compress.rank"], row["compress.bits"], row["compress.paper"]) == (
            point["compress.rank"], point["compress.bits"], point["compress.paper"])
        assert row["val_metric"] == point["val_metric"] and row["test_loss"] == point["test_loss"]
        assert row["gate_bits"] == point["gate_bits"]
        assert row["uncompressed_val_metric"] == plain["val_metric"]
        assert row["uncompressed_test_metric"] == plain["test_metric"]
        assert row["g2.tau"] == config["g2.tau"] and row["sweep.ranks"] == [0, 8]
        assert row["epoch"] == 2 and row["best_epoch"] == last["best_epoch"]
        assert row["wall_time_s"] == last["train_time_s"]
        assert row["gate_l1_f_gt09"] == last["gate_l1_f_gt09"]
        assert row["status"] == "ok" and row["error"] is None and row["metric_name"] == "ppl"


def test_binary_gate_rows_are_compared_with_the_uncompressed_model_under_binary_gates(tmp_path):
    cfg = TrialConfig.from_flat({**SMOKE, "train.epochs": 1, "train.max_batches": 2, "train.max_eval_batches": 2,
                                 "sweep.ranks": (0,), "sweep.bits": (32, 4), "sweep.paper": (),
                                 "data.cache_dir": str(tmp_path / "cache")}, base=TrialConfig.preset("lm", "tiny"))
    last = trial_reports(cfg, tmp_path / "trial", tmp_path / "store")[-1]
    rows = trial_rows("s", "t1", cfg.to_flat(), report_of(last), status="ok", error=None, finished_at=FINISHED)

    by = {(r["g2.eval_gate"], r["method"]): r for r in rows}
    assert set(by) == {(gate, method) for gate in ("soft", "hard") for method in ("none", "quant")}
    for gate in ("soft", "hard"):
        assert by[(gate, "quant")]["uncompressed_val_metric"] == by[(gate, "none")]["val_metric"]
    assert by[("hard", "none")]["val_metric"] != by[("soft", "none")]["val_metric"]   # binary gates change the model
    assert [r["is_trial_setting"] for r in rows].count(True) == 1 and by[("soft", "none")]["is_trial_setting"]
    assert by[("hard", "quant")]["gate_bits"] == by[("soft", "quant")]["gate_bits"]   # same storage, other gates


def test_ok_without_sweep_is_refused(trial):
    config, reports = trial
    with pytest.raises(ValueError, match="sweep"):
        trial_rows("s", "t1", config, report_of(reports[0]), status="ok", error=None, finished_at=FINISHED)
    with pytest.raises(ValueError, match="timezone"):
        trial_rows("s", "t1", config, report_of(reports[-1]), status="ok", error=None, finished_at=datetime(2026, 1, 1))


def test_round_trip_keeps_values_and_types(trial, tmp_path):
    config, reports = trial
    rows = trial_rows("s", "t1", config, report_of(reports[-1]), status="ok", error=None, finished_at=FINISHED)
    results.write_trial(tmp_path, "t1", rows)
    df = results.load(tmp_path)

    assert len(df) == 5 and list(df["method"]) == sorted(r["method"] for r in rows)
    assert list(df.columns[: len(results_schema().names)]) == results_schema().names
    assert df["status"].dtype == pd.StringDtype() and df["g2.gate_mode"].dtype == pd.StringDtype()
    assert df["seed"].dtype == pd.Int64Dtype() and df["gate_bits"].dtype == pd.Int64Dtype()
    assert df["is_trial_setting"].dtype == pd.BooleanDtype()
    assert df["val_metric"].dtype == "float64" and df["gate_l0_i_lt01"].dtype == "float64"
    assert df["finished_at"].dtype == "datetime64[us, UTC]" and df["finished_at"][0] == pd.Timestamp(FINISHED)
    assert df["sweep.ranks"][0] == (0, 8) and df["sweep.paper"][0] == ("round_clip",)
    expected = {(r["method"], r["compress.rank"], r["compress.bits"]): r["val_metric"] for r in rows}
    for _, row in df.iterrows():
        assert row["val_metric"] == expected[(row["method"], row["compress.rank"], row["compress.bits"])]
    assert df["error"].isna().all()


def test_rewriting_a_trial_does_not_duplicate_rows(trial, tmp_path):
    config, reports = trial
    writer = DriverRecords(tmp_path, "s")
    for report in reports:
        writer.record_report("t1", config, report)
    writer.record_end("t1", config)
    writer.record_end("t1", config)
    DriverRecords(tmp_path, "s").record_end("t2", config, "boom")
    DriverRecords(tmp_path, "s").record_end("t2", config, "boom")   # a resumed driver

    df = results.load(tmp_path)
    assert df.groupby("trial_id").size().to_dict() == {"t1": 5, "t2": 1}
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["t1.parquet", "t2.parquet"]   # no temp files
    curves = results.load_curves(tmp_path)
    assert list(curves["epoch"]) == [1, 2] and list(curves["trial_id"]) == ["t1", "t1"]
    assert results.load_gates(tmp_path)["trial_id"].tolist() == ["t1"] * 40   # t2 never reported


def test_gates_round_trip_from_the_final_report(trial, tmp_path):
    config, reports = trial
    last = reports[-1]
    writer = DriverRecords(tmp_path, "s")
    for report in reports:
        writer.record_report("t1", config, report)
    writer.record_end("t1", config)
    df = results.load_gates(tmp_path)

    assert list(df.columns) == gates_schema().names == [
        "study", "trial_id", "g2.gate_mode", "epoch", "layer", "gate", "bin", "fraction"]
    assert len(df) == 2 * 2 * 10   # layers x (i, f) x bins
    assert df["epoch"].dtype == df["layer"].dtype == df["bin"].dtype == pd.Int64Dtype()
    assert df["gate"].dtype == df["g2.gate_mode"].dtype == pd.StringDtype() and df["fraction"].dtype == "float64"
    assert (df["study"] == "s").all() and (df["g2.gate_mode"] == config["g2.gate_mode"]).all()
    assert (df["epoch"] == last["epoch"]).all() and last["epoch"] == 2   # the last epoch's histograms
    assert list(df.drop_duplicates(["layer", "gate"])[["layer", "gate"]].itertuples(index=False, name=None)) == [
        (0, "i"), (0, "f"), (1, "i"), (1, "f")]
    for (layer, gate), group in df.groupby(["layer", "gate"]):
        assert group["bin"].tolist() == list(range(10))
        assert group["fraction"].tolist() == last["gate_histograms"][f"l{layer}_{gate}"]   # exact, not approximate
        assert group["fraction"].sum() == pytest.approx(1.0)
    assert results.load_gates(tmp_path, filters="layer == 1 and gate == 'f' and bin >= 8")["bin"].tolist() == [8, 9]
    assert results.load_gates(tmp_path / "nothing-here").columns.tolist() == gates_schema().names

    # A resumed driver sees the final report again (the trial re-entered at its end): one file, replaced.
    resumed = DriverRecords(tmp_path, "s")
    resumed.record_report("t1", config, last)
    resumed.record_end("t1", config)
    writer.record_end("t1", config)
    assert results.load_gates(tmp_path).equals(df)
    assert [p.name for p in (tmp_path / "gates").iterdir()] == ["t1.parquet"]   # no temp files
    with pytest.raises(ValueError, match="unknown column.*gate_l0_i_lt01"):
        results.write_gates(tmp_path, "bad", [{"trial_id": "bad", "gate_l0_i_lt01": 0.1}])
    with pytest.raises(ValueError, match="l<k>_i"):
        gate_rows("s", "t1", config, report_of({"epoch": 1, "gate_histograms": {"layer0_i": [1.0]}}))


def test_a_reused_model_writes_no_gates(trial, reused, tmp_path):
    config, _ = trial
    assert len(reused) == 1 and reused[0]["reused_checkpoint"] and "gate_histograms" not in reused[0]
    writer = DriverRecords(tmp_path, "s")
    writer.record_report("r1", config, reused[0])
    rows = writer.record_end("r1", config)
    assert len(rows) == 5 and rows[0]["status"] == "ok" and rows[0]["reused_checkpoint"]
    assert results.load_gates(tmp_path).empty and not (tmp_path / "gates").exists()


def test_every_trial_file_has_every_column_so_the_directory_reads_whole(trial, reused, tmp_path):
    """A re-scored model, a divergence and an error report no gate statistics; their files still carry the
    model's gate columns (null), so readers that take one file's schema for all (pandas, polars, duckdb) lose
    nothing."""
    config, reports = trial
    writer = DriverRecords(tmp_path, "s")
    writer.record_report("a-trained", config, reports[-1])
    writer.record_end("a-trained", config)
    writer.record_report("b-reused", config, reused[0])
    writer.record_end("b-reused", config)
    writer.record_report("c-diverged", config, {"epoch": 1, "status": "diverged", "error": "nan", "done": True})
    writer.record_end("c-diverged", config)
    writer.record_end("d-error", config, "RuntimeError: boom")
    schemas = {f.stem: pq.read_schema(f) for f in sorted((tmp_path / "results").glob("*.parquet"))}
    assert len(schemas) == 4 and all(schema == schemas["a-trained"] for schema in schemas.values())
    gate_columns = [c for c in schemas["a-trained"].names if c.startswith("gate_l")]
    assert len(gate_columns) == 2 * 2 * 2            # the tiny LM: 2 layers x {i, f} x {lt01, gt09}
    whole = pd.read_parquet(tmp_path / "results")     # one file's schema for the whole directory
    assert set(gate_columns) <= set(whole.columns) and whole["trial_id"].nunique() == 4
    assert whole.loc[whole["trial_id"] == "a-trained", gate_columns].notna().all().all()
    assert whole.loc[whole["trial_id"] != "a-trained", gate_columns].isna().all().all()


def test_error_trial_is_one_row_with_its_message(trial, tmp_path):
    config, reports = trial
    writer = DriverRecords(tmp_path, "s")
    writer.record_report("t9", config, reports[0])   # it failed during epoch 2
    rows = writer.record_end("t9", config | {"g2.tau": 0.3}, "RuntimeError: CUDA out of memory")

    assert len(rows) == 1
    df = results.load(tmp_path)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["status"] == "error" and row["error"] == "RuntimeError: CUDA out of memory"
    assert row["g2.tau"] == 0.3 and row["lm.hidden_size"] == 32 and row["method"] == "none"
    assert row["epoch"] == 1   # how far it got
    for col in ("val_metric", "test_metric", "uncompressed_val_metric", "gate_l0_i_lt01"):
        assert pd.isna(row[col]), col
    assert pd.isna(row["gate_bits"])


def test_error_before_any_report(tmp_path):
    rows = DriverRecords(tmp_path, "s").record_end("t0", flat_config(), "bad config")
    assert len(rows) == 1 and rows[0]["epoch"] is None
    assert results.load(tmp_path)["error"].tolist() == ["bad config"]


def test_diverged_and_truncated_trials(trial, tmp_path):
    config, reports = trial
    writer = DriverRecords(tmp_path, "s")
    diverged = {"metric_name": "ppl", "device": "cpu", "training_key": "k", "epoch": 2, "status": "diverged",
                "error": "non-finite loss at batch 3", "done": True, "val_metric": math.nan,
                "compressed_val_metric": math.nan}
    writer.record_report("td", config, reports[0])
    writer.record_report("td", config, diverged)
    writer.record_end("td", config)                    # Tune saw a normal return
    writer.record_report("tp", config, reports[0])
    writer.record_end("tp", config)                    # stopped before its last epoch: no sweep

    df = results.load(tmp_path).set_index("trial_id")
    assert df.loc["td", "status"] == "diverged" and df.loc["td", "error"] == "non-finite loss at batch 3"
    assert math.isnan(df.loc["td", "val_metric"]) and df.loc["td", "epoch"] == 2
    assert df.loc["tp", "status"] == "pruned" and pd.isna(df.loc["tp", "error"])
    assert df.loc["tp", "val_metric"] == reports[0]["compressed_val_metric"]
    assert df.loc["tp", "uncompressed_val_metric"] == reports[0]["val_metric"]
    assert df.loc["tp", "val_loss"] == reports[0]["val_loss"]   # trial setting is uncompressed
    assert results.load(tmp_path, status="ok").empty
    assert list(results.load(tmp_path, status=["pruned", "diverged"])["trial_id"]) == ["td", "tp"]
    gates = results.load_gates(tmp_path)   # the last epoch that measured its gates, not the diverged one
    assert gates.groupby("trial_id")["epoch"].unique().map(list).to_dict() == {"td": [1], "tp": [1]}


def test_load_filters_on_dotted_columns(trial, tmp_path):
    config, reports = trial
    for trial_id, tau in (("a", 0.3), ("b", 0.9)):
        rows = trial_rows("s", trial_id, config | {"g2.tau": tau}, report_of(reports[-1]), status="ok", error=None,
                                  finished_at=FINISHED)
        results.write_trial(tmp_path, trial_id, rows)

    low = results.load(tmp_path, filters="`g2.tau` < 0.5 and method == 'none'", columns=["trial_id", "g2.tau"])
    assert low.to_dict("records") == [{"trial_id": "a", "g2.tau": 0.3}]
    assert len(results.load(f"file://{tmp_path}", filters="`compress.rank` == 8")) == 4   # a URI, too
    bare = results.load(tmp_path, filters="g2.tau < 0.5 and method == 'none'", columns=["trial_id", "g2.tau"])
    assert bare.equals(low)   # a dotted name needs no backquotes ...
    with pytest.raises(FilterError, match="unknown column 'g2.taux' \\(did you mean 'g2.tau'\\?\\)"):
        results.load(tmp_path, filters="g2.taux < 0.5")   # ... and a misspelt one is an error, not an empty frame
    with pytest.raises(ValueError, match="status"):
        results.load(tmp_path, status="okay")


def test_missing_study_is_an_empty_frame_with_the_schema(tmp_path):
    df = results.load(tmp_path / "nothing-here")
    assert df.empty and list(df.columns) == results_schema().names
    assert df["seed"].dtype == pd.Int64Dtype() and df["finished_at"].dtype == "datetime64[us, UTC]"
    assert results.load_curves(tmp_path).empty


def test_files_with_different_layer_counts_are_unified(tmp_path):
    def row(trial_id, layers):
        gates = {f"gate_l{k}_{g}_lt01": 0.1 * (k + 1) for k in range(layers) for g in "if"}
        return {"study": "s", "trial_id": trial_id, "status": "error", "finished_at": FINISHED, **gates}

    results.write_trial(tmp_path, "two", [row("two", 2)])
    results.write_trial(tmp_path, "three", [row("three", 3)])
    df = results.load(tmp_path).set_index("trial_id")
    assert df.loc["three", "gate_l2_f_lt01"] == pytest.approx(0.3)
    assert math.isnan(df.loc["two", "gate_l2_f_lt01"]) and df.loc["two", "gate_l1_i_lt01"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown column"):
        results.write_trial(tmp_path, "bad", [{"trial_id": "bad", "gate_bitz": 1}])


def test_recorded_rows_are_what_an_earlier_driver_wrote(trial, tmp_path):
    config, reports = trial
    writer = DriverRecords(tmp_path, "s")
    for report in reports:
        writer.record_report("ok", config, report)
    written = writer.record_end("ok", config)
    writer.record_report("pruned", config, reports[0])
    writer.record_end("pruned", config)
    writer.record_end("error", config, error="boom")

    later = DriverRecords(tmp_path, "s")   # the next driver
    rows = later.recorded_rows("ok")
    used = ["status", "training_key", "method", "compress.rank", "compress.bits", "val_metric", "gate_bits"]
    assert [[r[k] for k in used] for r in rows] == [[r[k] for k in used] for r in written]
    assert [r["status"] for r in later.recorded_rows("pruned") + later.recorded_rows("error")] == ["pruned", "error"]
    assert later.recorded_rows("error")[0]["error"] == "boom" and later.recorded_rows("never") is None


def test_curves_survive_a_driver_restart(trial, tmp_path):
    config, reports = trial
    DriverRecords(tmp_path, "s").record_report("t1", config, reports[0])
    resumed = DriverRecords(tmp_path, "s")     # the new driver only sees epoch 2
    resumed.record_report("t1", config, reports[1])
    resumed.record_report("t1", config, reports[1])    # re-entered at its final checkpoint
    curves = results.load_curves(tmp_path)
    assert list(curves["epoch"]) == [1, 2]
    assert curves["train_loss"].tolist() == [reports[0]["train_loss"], reports[1]["train_loss"]]
    assert curves["gate_l1_i_gt09"].dtype == "float64"
    assert Path(tmp_path, "curves", "t1.parquet").exists()


KILLED_WRITER = """
import io, os, signal, sys
from datetime import datetime, timezone
import pyarrow.parquet as pq
from study import results
from study.trial_end import TrialLedger

def half_then_die(table, where, filesystem=None, **kwargs):
    # the real writer's bytes, half of them on disk, then the process dies (an OOM kill, a node lost)
    buffer = io.BytesIO()
    real(table, buffer, **kwargs)
    stream = filesystem.open_output_stream(where)
    stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)

real, pq.write_table = pq.write_table, half_then_die
results.write_trial(sys.argv[1], "t1", [{"study": "s", "trial_id": "t1", "status": "error", "error": "new",
                                         "finished_at": datetime(2026, 1, 3, tzinfo=timezone.utc)}])
"""


def error_row(trial_id: str, error: str) -> dict:
    return {"study": "s", "trial_id": trial_id, "status": "error", "error": error, "finished_at": FINISHED}


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    results.write_trial(tmp_path, "t1", [error_row("t1", "old")])
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    partial, final = sorted((tmp_path / "results").iterdir())
    assert final.name == "t1.parquet" and partial.name.startswith(".t1.") and partial.name.endswith(".tmp")
    assert partial.stat().st_size > 0
    with pytest.raises(pa.ArrowInvalid):   # it really is half a file ...
        pq.read_table(partial)
    assert results.load(tmp_path)["error"].tolist() == ["old"]   # ... which no reader picks up
    assert DriverRecords(tmp_path, "s").recorded_rows("t1")[0]["error"] == "old"

    results.write_trial(tmp_path, "t1", [error_row("t1", "new")])   # the next attempt replaces the old file
    assert results.load(tmp_path)["error"].tolist() == ["new"]


@pytest.mark.parametrize("cut", [lambda n: 0, lambda n: n // 2, lambda n: n - 1], ids=["empty", "half", "last-byte"])
def test_a_truncated_file_is_an_error_naming_it(tmp_path, cut):
    for trial_id in ("t1", "t2"):
        results.write_trial(tmp_path, trial_id, [error_row(trial_id, "boom")])
        results.write_curves(tmp_path, trial_id, [{"study": "s", "trial_id": trial_id, "epoch": 1, "train_loss": 1.0}])
    damaged = [tmp_path / sub / "t2.parquet" for sub in ("results", "curves")]
    for path in damaged:
        data = path.read_bytes()
        path.write_bytes(data[: cut(len(data))])

    for read, path in ((results.load, damaged[0]), (results.load_curves, damaged[1]),
                       (lambda d: DriverRecords(d, "s").recorded_rows("t2"), damaged[0]),
                       (lambda d: DriverRecords(d, "s").record_report("t2", {}, {"epoch": 2}), damaged[1])):
        with pytest.raises(results.CorruptFileError, match=f"^cannot read {re.escape(str(path))}: ") as caught:
            read(tmp_path)
        assert isinstance(caught.value, ValueError) and "truncated or corrupt, move it aside" in str(caught.value)
    assert DriverRecords(tmp_path, "s").recorded_rows("t1")[0]["error"] == "boom"   # the others still read


@pytest.mark.parametrize("best_epoch", [2, 3])
def test_the_last_curve_point_keeps_gates_only_when_the_final_report_measured_that_epochs_model(best_epoch):
    """A final report's saturation is the best epoch's model's (the one the sweep scores): the last epoch's curve
    point shows it only when the best epoch is the last, and is null otherwise rather than another model's."""
    flat = TrialConfig.from_flat({"lm.num_layers": 1}).to_flat()
    gates = {f"gate_l0_{g}_{s}": 0.1 for g in "if" for s in ("lt01", "gt09")}
    reports = [EpochReport(epoch=e, gate_saturation={k: v * e for k, v in gates.items()}) for e in (1, 2)]
    reports.append(EpochReport(epoch=3, status="ok", done=True, best_epoch=best_epoch, sweep=(),
                               gate_saturation={k: v * best_epoch for k, v in gates.items()}))
    rows = curve_rows("s", "t", flat, reports)
    assert [r["gate_l0_i_lt01"] for r in rows[:2]] == pytest.approx([0.1, 0.2])
    assert rows[2]["gate_l0_i_lt01"] == (pytest.approx(0.3) if best_epoch == 3 else None)
