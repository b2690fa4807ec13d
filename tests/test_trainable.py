import json
import math

import pytest
import torch

from trainables import trainable
from trainables.checkpoint import load_checkpoint
from trainables.config import SMOKE, TrialConfig
from trainables.report import EpochReport
from trainables.trainable import Plan, choose_plan, main
from trainables.trainable import run_trial as run_typed_trial

EVERY_EPOCH = {"epoch", "train_loss", "val_loss", "val_metric", "compressed_val_metric", "gate_bits", "model_bits",
               "gate_compression", "model_compression", "epoch_time_s", "train_time_s", "gate_l0_i_lt01",
               "gate_l1_f_gt09", "gate_histograms", "status", "metric_name"}
ACCOUNTING = {"gate_params", "gate_bits", "model_params", "model_bits", "gate_compression", "model_compression"}


def smoke_cfg(tmp_path, **overrides) -> TrialConfig:
    flat = {**SMOKE, "train.epochs": 3, "data.cache_dir": str(tmp_path / "cache"), **overrides}
    return TrialConfig.from_flat(flat, base=TrialConfig.preset("lm", "tiny"))


def run_trial(*args, **kwargs) -> dict:
    """`run_trial`'s final report, checked to be the typed record, as the dict Tune is given."""
    final = run_typed_trial(*args, **kwargs)
    assert isinstance(final, EpochReport)
    return final.to_dict()


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.reports, self.stop_after = [], stop_after

    def __call__(self, report: EpochReport, ckpt_dir):
        metrics = report.to_dict()
        self.reports.append(metrics)
        if self.stop_after is not None and metrics["epoch"] == self.stop_after:
            raise KeyboardInterrupt("stopped on purpose")


def curve(reports):
    return [(r["epoch"], r["train_loss"], r["val_metric"], r["compressed_val_metric"]) for r in reports]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    rec = Recorder()
    final = run_trial(smoke_cfg(tmp, **{"compress.rank": 4}), tmp / "work", report=rec)
    return rec.reports, final


def test_every_report_carries_every_objective(uninterrupted):
    reports, final = uninterrupted
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    for r in reports:
        assert EVERY_EPOCH <= set(r)
        assert r["gate_compression"] > 1.0                        # the trial's own compress.rank = 4
    assert final == reports[-1] and final["status"] == "ok" and final["done"]


def test_final_report_has_the_sweep_with_accounting(uninterrupted):
    _, final = uninterrupted
    rows = final["sweep"]
    # SMOKE sweep: ranks [0, 8] x bits [32, 4] + round_clip, plus the trial's own rank 4, each with the trial's own
    # (soft) gates and with binary ones (a g2 model)
    settings = [(0, 32, "none"), (0, 4, "quant"), (8, 32, "svd"), (8, 4, "svd+quant"), (0, 32, "round_clip"),
                (4, 32, "svd")]
    assert sorted((r["compress.rank"], r["compress.bits"], r["method"], r["g2.eval_gate"]) for r in rows) == sorted(
        (*setting, gate) for setting in settings for gate in ("soft", "hard"))
    for r in rows:
        assert ACCOUNTING <= set(r) and {"val_metric", "test_metric", "val_ppl", "test_loss"} <= set(r)
        assert math.isfinite(r["val_metric"]) and math.isfinite(r["test_metric"])
    plain = next(r for r in rows if r["method"] == "none" and r["g2.eval_gate"] == "soft")
    assert plain["gate_compression"] == 1.0 and plain["relative_error"] == 0.0
    own = [r for r in rows if r["is_trial_setting"]]
    assert len(own) == 1 and own[0]["compress.rank"] == 4 and own[0]["g2.eval_gate"] == "soft"
    assert final["compressed_val_metric"] == own[0]["val_metric"] and final["val_metric"] == plain["val_metric"]


def test_resume_reaches_the_same_metrics(tmp_path, uninterrupted):
    full, final = uninterrupted
    work = tmp_path / "work"
    first = Recorder(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_trial(smoke_cfg(tmp_path, **{"compress.rank": 4}), work, report=first)
    assert load_checkpoint(work / "checkpoint")["epoch"] == 2
    second = Recorder()
    resumed = run_trial(smoke_cfg(tmp_path, **{"compress.rank": 4}), work, report=second,
                        resume=work / "checkpoint")
    assert curve(first.reports + second.reports) == curve(full)
    assert [r["val_metric"] for r in resumed["sweep"]] == [r["val_metric"] for r in final["sweep"]]


def test_resume_loads_checkpoints_to_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    """RNG states must stay CPU ByteTensors and optimiser steps host scalars: every load goes to the CPU first,
    and load_state_dict moves each tensor to the model's device (a GPU checkpoint resumes on a CPU and back)."""
    work, store = tmp_path / "work", tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        run_trial(smoke_cfg(tmp_path), work, report=Recorder(stop_after=1), model_store=store)
    locations, load = [], torch.load

    def recording_load(*args, map_location=None, **kwargs):
        locations.append(str(map_location))
        return load(*args, map_location=map_location, **kwargs)
    monkeypatch.setattr(torch, "load", recording_load)
    final = run_trial(smoke_cfg(tmp_path), work, resume=work / "checkpoint", model_store=store)
    run_trial(smoke_cfg(tmp_path, **{"compress.bits": 2}), tmp_path / "reuse", model_store=store)   # stored model
    assert final["status"] == "ok" and len(locations) >= 3      # checkpoint, best model, stored model
    assert set(locations) == {"cpu"}


def test_reentering_a_finished_trial_trains_nothing(tmp_path):
    work = tmp_path / "work"
    cfg = smoke_cfg(tmp_path, **{"train.epochs": 1})
    final = run_trial(cfg, work)
    again = Recorder()
    assert run_trial(cfg, work, report=again, resume=work / "checkpoint") == final
    assert len(again.reports) == 1


def test_same_training_knobs_reuse_the_stored_model(tmp_path):
    store = tmp_path / "store"
    first = run_trial(smoke_cfg(tmp_path, **{"train.epochs": 2}), tmp_path / "a", model_store=store)
    rec = Recorder()
    second = run_trial(smoke_cfg(tmp_path, **{"train.epochs": 2, "compress.bits": 2, "g2.eval_gate": "hard"}),
                       tmp_path / "b", report=rec, model_store=store)
    assert second["reused_checkpoint"] and len(rec.reports) == 1      # no epoch was trained
    assert second["epoch"] == 2 and second["training_key"] == first["training_key"]
    assert second["gate_compression"] > first["gate_compression"]
    other = run_trial(smoke_cfg(tmp_path, **{"train.epochs": 2, "g2.tau": 0.5}), tmp_path / "c",
                      model_store=store)
    assert other["reused_checkpoint"] is False and other["training_key"] != first["training_key"]


@pytest.mark.parametrize("resume, stored, diverged, plan", [
    (None, None, None, Plan.TRAIN),
    ("ckpt", None, None, Plan.RESUME),
    ("ckpt", {"epoch": 3}, {"status": "diverged"}, Plan.RESUME),       # a resumed trial carries on with its own
    (None, {"epoch": 3}, None, Plan.RESCORE),
    (None, {"epoch": 3}, {"status": "diverged"}, Plan.RESCORE),
    (None, None, {"status": "diverged"}, Plan.REPORT_DIVERGENCE),
])
def test_the_plan_of_a_trial(resume, stored, diverged, plan):
    assert choose_plan(resume, stored, diverged) is plan


def test_nan_loss_ends_the_trial_as_diverged(tmp_path, monkeypatch):
    make_task = trainable.make_task

    def poisoned(cfg, device):
        task = make_task(cfg, device)
        with torch.no_grad():
            task.model.embedding.weight.fill_(float("nan"))
        return task

    monkeypatch.setattr(trainable, "make_task", poisoned)
    rec, store = Recorder(), tmp_path / "store"
    result = run_trial(smoke_cfg(tmp_path), tmp_path / "work", report=rec, model_store=store)
    assert result["status"] == "diverged" and "nan" in result["error"]
    assert len(rec.reports) == 1 and math.isnan(result["compressed_val_metric"])

    # the same training knobs (another compression setting) would diverge the same way: nothing is trained
    monkeypatch.setattr(trainable, "make_task", make_task)
    again = run_trial(smoke_cfg(tmp_path, **{"compress.bits": 4}), tmp_path / "again", model_store=store)
    assert again["status"] == "diverged" and again["reused_checkpoint"] and again["error"] == result["error"]
    assert again["epoch"] == result["epoch"] and math.isnan(again["val_metric"])
    other = run_trial(smoke_cfg(tmp_path, **{"train.epochs": 1}), tmp_path / "other", model_store=store)
    assert other["status"] == "ok"                                       # other knobs train as usual


def test_command_line_runs_one_trial(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["lm", "--smoke", "--out", str(out), "--set", "g2.tau=0.5", "--set", f"data.cache_dir={tmp_path}",
                 "--json", str(tmp_path / "final.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round_clip" in printed and "status ok" in printed
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["status"] == "ok" and len(final["sweep"]) == 10   # 5 settings, soft and binary gates
    assert load_checkpoint(out / "checkpoint")["config"]["g2.tau"] == 0.5


def test_command_line_refuses_bad_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lm", "--smoke", "--set", "g2.tau=-1"])
    assert exit_info.value.code == 2
    assert "g2.tau must be a number in (0.0, 10.0]" in capsys.readouterr().err


def test_command_line_refuses_what_this_machine_cannot_run(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["lm", "--smoke", "--set", "train.device=cpu", "--set", "train.precision=bf16"])
    assert exit_info.value.code == 2
    assert "train.precision='bf16' applies to the fused path" in capsys.readouterr().err


def test_translation_trial_reports_bleu_and_its_sweep(tmp_path):
    cfg = TrialConfig.from_flat({**SMOKE, "data.cache_dir": str(tmp_path / "cache")},
                                base=TrialConfig.preset("nmt", "tiny"))
    rec = Recorder()
    final = run_trial(cfg, tmp_path / "work", report=rec)
    assert final["status"] == "ok" and final["metric_name"] == "bleu"
    assert [r["epoch"] for r in rec.reports] == [1, 2]
    assert {"val_bleu", "val_tok_bleu", "compressed_val_metric", "gate_l0_i_lt01"} <= set(rec.reports[0])
    # 4 recurrent G2LSTM modules (encoder forward/backward, decoder) all have statistics
    assert {f"gate_l{k}_f_gt09" for k in range(3)} <= set(rec.reports[0])
    assert len(final["sweep"]) == 10 and all(ACCOUNTING <= set(r) for r in final["sweep"])   # soft and binary
    assert all(0.0 <= r["test_metric"] <= 100.0 for r in final["sweep"])


def test_finetune_stage_restarts_averaged_sgd_from_the_best_weights(tmp_path):
    cfg = smoke_cfg(tmp_path, **{"train.epochs": 2, "train.finetune_epochs": 1, "train.nt_asgd": False})
    work = tmp_path / "work"
    final = run_trial(cfg, work)
    assert final["epoch"] == 3 and final["status"] == "ok"
    saved = load_checkpoint(work / "checkpoint")
    assert saved["task"]["asgd"] is True                      # the fine-tune stage ran on ASGD


@pytest.mark.parametrize("flat, message", [
    ({"train.impl": "fused"}, "train.impl='fused' needs a CUDA device and triton, this trial runs on cpu"),
    ({"train.precision": "bf16"}, "train.precision='bf16' applies to the fused path"),
])
def test_refuses_execution_knobs_the_worker_cannot_honour(tmp_path, monkeypatch, flat, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # another test module turns the CPU interpreter on
    cfg = TrialConfig.from_flat({**SMOKE, "data.corpus": "toy", "data.cache_dir": str(tmp_path),
                                 "train.device": "cpu", **flat}, base=TrialConfig.preset("lm", "tiny"))
    with pytest.raises(ValueError, match=message):
        run_trial(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()                 # refused before any work


@pytest.mark.parametrize("task", ["lm", "nmt"])
def test_impl_and_precision_reach_every_recurrent_layer(tmp_path, task):
    from trainables.g2lstm import G2LSTM

    corpus = "toy" if task == "lm" else "toy-copy"
    cfg = TrialConfig.from_flat({"data.corpus": corpus, "data.cache_dir": str(tmp_path), "train.impl": "reference",
                                 "train.cuda_graphs": True}, base=TrialConfig.preset(task, "tiny"))
    built = trainable.make_task(cfg, torch.device("cpu"))
    layers = [m for m in built.model.modules() if isinstance(m, G2LSTM)]
    assert layers and all(m.impl == "reference" and m.precision == "fp32" for m in layers)
    assert getattr(built, "graphs", None) is None          # CUDA graphs are a CUDA-only speed knob


def test_each_epoch_reports_the_compressed_models_metric(tmp_path):
    """The objective Optuna and ASHA optimise: each epoch's `compressed_val_metric` is the validation metric of the
    model it reports, compressed under the trial's own setting, scored again here from the checkpoint."""
    from trainables.compress import compress_model

    cfg = smoke_cfg(tmp_path, **{"compress.bits": 2})
    scored = []

    def rescore(report, ckpt_dir):
        metrics = report.to_dict()
        # A fresh task restored from the checkpoint just written: the reported epoch's weights (ASGD's average
        # where it runs); the last epoch reports the best weights, which the checkpoint then holds.
        saved = load_checkpoint(ckpt_dir)
        task = trainable.make_task(cfg, torch.device("cpu"))
        task.load_state_dict(saved["task"])
        task.model.load_state_dict(saved["model"])
        task.optimizer.load_state_dict(saved["optimizer"])
        model = task.model if metrics.get("done") else task.evaluation_model()
        compressed, _ = compress_model(model, cfg.compress)
        scored.append((metrics, task.evaluate(model, "valid")["ppl"], task.evaluate(compressed, "valid")["ppl"]))

    run_trial(cfg, tmp_path / "work", report=rescore)
    assert [m["epoch"] for m, _, _ in scored] == [1, 2, 3]
    for metrics, plain, compressed in scored:
        assert metrics["val_metric"] == pytest.approx(plain, rel=1e-9)
        assert metrics["compressed_val_metric"] == pytest.approx(compressed, rel=1e-9)
        assert metrics["compressed_val_metric"] != pytest.approx(metrics["val_metric"], rel=1e-5)   # 2-bit gates


EVALUATION_ONLY = {"lm.cache_window": 20, "lm.cache_lambda": 0.9, "lm.cache_theta": 0.2}


@pytest.mark.parametrize("scoring", [EVALUATION_ONLY, {**EVALUATION_ONLY, "g2.eval_gate": "hard",
                                                       "lm.eval_batch_size": 3, "train.max_eval_batches": 1}],
                         ids=["cache", "every-evaluation-knob"])
def test_evaluation_only_knobs_do_not_change_what_is_trained(tmp_path, scoring):
    """A trial's best epoch and NT-ASGD's switch read a loss no scoring knob changes, so a model re-scored with other
    scoring knobs is the one a fresh trial with them keeps: the same weights, the same best epoch, the same switch."""
    knobs = {"train.epochs": 6, "train.max_batches": 6, "train.max_eval_batches": 0, "train.nonmono": 1,
             "train.lr": 60.0, "sweep.ranks": (0,), "sweep.bits": (32,), "sweep.paper": (), "sweep.hard_gates": False}
    kept = {}
    for name, extra in (("plain", {}), ("scored", scoring)):
        cfg = smoke_cfg(tmp_path, **{**knobs, **extra})
        final = run_trial(cfg, tmp_path / name)
        saved = load_checkpoint(tmp_path / name / "checkpoint")
        kept[name] = (final["best_epoch"], saved["task"]["asgd"], saved["model"])
    (plain_best, plain_asgd, plain_weights), (best, asgd, weights) = kept["plain"], kept["scored"]
    assert (best, asgd) == (plain_best, plain_asgd)
    assert plain_weights.keys() == weights.keys()
    for key in weights:
        assert torch.equal(weights[key], plain_weights[key]), key


def test_gate_saturation_is_the_scored_best_models_under_soft_gates(tmp_path, monkeypatch):
    """The results' saturation columns describe the model the sweep scores: the best epoch's weights (here epoch 1,
    the last is 3) under soft gates, though the trial evaluates with binary ones."""
    from trainables.g2lstm import G2LSTM
    from trainables.lm import LMTask

    losses = iter([1.0, 2.0, 3.0])                           # the first epoch is the best
    monkeypatch.setattr(LMTask, "selection_loss", lambda self, model, val: next(losses))
    measured, gate_statistics = [], LMTask.gate_statistics

    def recording(self, model):
        stats = gate_statistics(self, model)
        gates = {m.g2.eval_gate for m in model.modules() if isinstance(m, G2LSTM)}
        measured.append(({k: v.clone() for k, v in model.state_dict().items()}, gates,
                         {**stats.summary(), **stats.histograms()}))
        return stats
    monkeypatch.setattr(LMTask, "gate_statistics", recording)
    cfg = smoke_cfg(tmp_path, **{"g2.eval_gate": "hard", "sweep.ranks": [0], "sweep.bits": [32], "sweep.paper": [],
                                 "train.max_batches": 4, "train.max_eval_batches": 2})
    rec = Recorder()
    final = run_typed_trial(cfg, tmp_path / "work", report=rec)
    assert final.best_epoch == 1 and final.epoch == 3 and len(measured) == 4     # each epoch, then the final model
    (epoch1, *_), (epoch3, *_), (scored, *_) = measured[0], measured[2], measured[3]
    assert all(gates == {"soft"} for _, gates, _ in measured)
    best = torch.load(tmp_path / "work" / "checkpoint" / "best_model.pt", weights_only=True)["model"]
    assert all(torch.equal(scored[k], best[k]) and torch.equal(scored[k], epoch1[k]) for k in best)
    assert any(not torch.equal(scored[k], epoch3[k]) for k in best)               # the last model is another
    reported = {**final.gate_saturation, **final.gate_histograms}
    assert reported == measured[3][2] == measured[0][2] != measured[2][2]       # histograms tell them apart
    first = rec.reports[0]["gate_histograms"]
    assert first == {k: measured[0][2][k] for k in first}      # each epoch's curve: that epoch's model
    inner = sum(sum(h[1:-1]) for h in final.gate_histograms.values())
    assert inner > 0                                          # soft gates: not only the 0/1 bins of hard ones
