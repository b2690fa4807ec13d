"""The trial report vocabulary (trainables/report.py), on reports a real trial made (conftest's `trial`)."""
import math

import pytest

from trainables.report import (
    ACCOUNTING,
    HIST_BINS,
    OK,
    RUNNING,
    EpochReport,
    GateColumn,
    SweepRow,
    all_gate_columns,
    gate_column,
    gate_column_order,
    gate_layers,
    histogram_key,
    is_gate_column,
    parse_histogram_key,
)

from tiny_seq2seq import small_model


def test_a_real_trials_reports_survive_the_round_trip(trial):
    _, reports = trial
    for tune_dict in reports:
        again = EpochReport.from_dict(tune_dict).to_dict()
        assert again.keys() == tune_dict.keys()
        for key, value in tune_dict.items():
            assert again[key] == value or (isinstance(value, float) and math.isnan(value) and math.isnan(again[key]))


def test_epoch_reports_and_the_final_one(trial):
    _, reports = trial
    *epochs, final = [EpochReport.from_dict(r) for r in reports]
    assert all(r.status == RUNNING and not r.done and r.sweep is None for r in epochs)
    assert final.finished and final.status == OK and final.done
    assert final.val_metric == final.uncompressed().val_metric and final.test_metric == final.uncompressed().test_metric
    assert final.compressed_val_metric == final.own_setting().val_metric
    assert final.accounting == final.own_setting().accounting
    assert all(len(h) == HIST_BINS for h in final.gate_histograms.values())
    assert all(is_gate_column(k) for k in final.gate_saturation) and final.gate_saturation


def test_sweep_rows_keep_setting_accounting_and_scores(trial):
    _, reports = trial
    for sweep_dict in reports[-1]["sweep"]:
        row = SweepRow.from_dict(sweep_dict)
        assert row.to_dict() == sweep_dict
        assert set(ACCOUNTING) <= set(sweep_dict) and {"val_metric", "test_metric", "val_loss"} <= set(row.scores)


def test_gate_columns_format_and_parse_as_one():
    name = gate_column(10, "f", "gt09")
    assert name == "gate_l10_f_gt09" and GateColumn.parse(name) == GateColumn(10, "f", "gt09")
    for other in ("gate_l1_g_lt01", "gate_lx_i_lt01", "val_metric", "gate_l1_i_lt01_x"):
        assert GateColumn.parse(other) is None and not is_gate_column(other)
    names = ["val_metric", "gate_l10_i_lt01", "gate_l9_f_gt09", "gate_l9_f_lt01", "gate_l9_i_gt09"]
    assert sorted(names, key=gate_column_order) == ["gate_l9_i_gt09", "gate_l9_f_lt01", "gate_l9_f_gt09",
                                                     "gate_l10_i_lt01", "val_metric"]
    assert parse_histogram_key(histogram_key(3, "i")) == (3, "i") and parse_histogram_key("l3_g") is None


@pytest.mark.parametrize("missing", ["sweep", "gate_histograms"])
def test_reports_without_optional_parts(missing):
    report = EpochReport(epoch=1, metric_name="ppl", val_metric=3.0)
    tune_dict = report.to_dict()
    assert missing not in tune_dict and EpochReport.from_dict(tune_dict) == report


@pytest.mark.parametrize("encoder_layers, decoder_layers", [(1, 1), (3, 2)])
def test_gate_layers_count_what_the_models_measure(encoder_layers, decoder_layers):
    names = small_model(encoder_layers, decoder_layers).recurrent_layer_names()
    flat = {"task": "nmt", "nmt.encoder_layers": encoder_layers, "nmt.decoder_layers": decoder_layers}
    assert gate_layers(flat) == len(names)
    assert gate_layers({"task": "lm", "lm.num_layers": 3}) == 3 and gate_layers({"task": "lm"}) is None
    assert all_gate_columns(1) == ["gate_l0_i_lt01", "gate_l0_i_gt09", "gate_l0_f_lt01", "gate_l0_f_gt09"]
