"""`run_trial`: one trial as a plain loop, without Ray (the study's Ray Tune entry points, `study.entrypoints`,
call it and pass its reports on to `tune.report`).

Per epoch a trial reports train loss, the validation metric, the validation metric of a compressed copy under
the trial's own `compress.*` setting with its storage accounting, gate saturation per layer (soft gates) and wall
time, so every report carries every objective. After the last epoch the best weights are scored on the whole
compression sweep (validation and test) and those rows ride in the final report under `sweep`, with the gate
saturation of those same weights: the results' saturation columns describe the model the sweep scored.

One trial from the command line, no study:

    python -m trainables.trainable lm --preset tiny --set g2.tau=0.5 --smoke
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from trainables.checkpoint import BEST_MODEL_FILE, load_checkpoint, load_model, save_checkpoint, save_model
from trainables.compress import compress_model
from trainables.config import SMOKE, TrialConfig
from trainables.corpora import cache_root
from trainables.device import rng_state, set_rng_state, trial_device, use_ieee_fp32
from trainables.fields import parse_override
from trainables.g2lstm import GateStatistics, evaluation_gates
from trainables.lm import LMTask
from trainables.nmt import NMTTask
from trainables.presets import DEFAULT_PRESETS
from trainables.pulse import SCORE, Pulse, Pulser
from trainables.report import (
    DIVERGED,
    OK,
    TRAIN_LOSS,
    VAL_METRIC,
    EpochReport,
    SweepRow,
    scored,
)
from trainables.store import ModelStore
from trainables.task import Task

log = logging.getLogger(__name__)
Reporter = Callable[[EpochReport, "Path | None"], None]   # (report, checkpoint directory or None)


def make_task(cfg: TrialConfig, device: torch.device) -> Task:
    task = LMTask if cfg.task == "lm" else NMTTask
    return task(cfg, device, cache_root(cfg.data.cache_dir))


def sweep_gates(cfg: TrialConfig) -> list[str]:
    """The evaluation gates the sweep scores: the trial's own, and binary ones for g2 and sharpened models."""
    hard = cfg.sweep.hard_gates and cfg.g2.gate_mode != "lstm"
    return list(dict.fromkeys([cfg.g2.eval_gate, *(["hard"] if hard else [])]))


def sweep_rows(task: Task, model: torch.nn.Module, cfg: TrialConfig, epoch: int = 0) -> list[SweepRow]:
    """Score compressed copies of `model` on validation and test for every setting of the sweep, under every
    evaluation gate of `sweep_gates` (hard 0/1 i/f gates show how far "binary-valued" carries)."""
    settings = cfg.sweep.settings(cfg.compress)
    if cfg.compress not in settings:
        settings.append(cfg.compress)
    rows, gates = [], sweep_gates(cfg)
    task.pulse(Pulse(SCORE, 0, len(settings) * len(gates), epoch=epoch))
    for setting in settings:
        compressed, accounting = compress_model(model, setting)
        for eval_gate in gates:
            with evaluation_gates(compressed, eval_gate):
                scores = {k: v for split, prefix in (("valid", "val"), ("test", "test"))
                          for k, v in scored(prefix, task.evaluate(compressed, split), task.metric).items()}
            own = setting == cfg.compress and eval_gate == cfg.g2.eval_gate
            rows.append(SweepRow(rank=setting.rank, bits=setting.bits, paper=setting.paper, method=setting.method,
                                 eval_gate=eval_gate, is_trial_setting=own, accounting=accounting, scores=scores))
            task.pulse(Pulse(SCORE, len(rows), len(settings) * len(gates), epoch=epoch))
    return rows


def soft_gate_statistics(task: Task, model: torch.nn.Module) -> GateStatistics:
    """Gate saturation of `model` under soft gates σ(a), whatever the trial evaluates with: under `eval_gate = hard`
    every gate would be 0 or 1 by construction (the sweep's hard-gate rows say what binary gates score)."""
    with evaluation_gates(model, "soft"):
        return task.gate_statistics(model)


def final_report(task: Task, model: torch.nn.Module, cfg: TrialConfig, last: EpochReport,
                 best_epoch: int) -> EpochReport:
    """The last report: the sweep of `model` (the best epoch's weights), the uncompressed and the trial's own
    setting's metrics lifted to the top, and the gate saturation of that same model (not of the last epoch's).

    A trial that re-scores a stored model reports no gates: the trial that trained it did, and a model's gates
    are counted once (the gates dataset, the fidelity tables' means over trials).
    """
    done = replace(last, sweep=tuple(sweep_rows(task, model, cfg, last.epoch or 0)))
    plain, own = done.uncompressed(), done.own_setting()
    if not last.reused_checkpoint:
        gates = soft_gate_statistics(task, model)
        done = replace(done, gate_saturation=gates.summary(), gate_histograms=gates.histograms())
    return replace(done, done=True, status=OK, best_epoch=best_epoch, val_metric=plain.val_metric,
                   test_metric=plain.test_metric, compressed_val_metric=own.val_metric,
                   compressed_test_metric=own.test_metric, accounting=own.accounting)


@dataclass
class LoopState:
    """Where training stands, checkpointed as a plain dict (checkpoints load with weights_only)."""

    epoch: int = 0
    best_epoch: int = 0
    best_loss: float | None = None          # the best epoch's `Task.selection_loss`
    train_time_s: float = 0.0
    final: dict[str, Any] | None = None     # the last report, once made: a re-entered trial says it again

    def trained(self) -> dict[str, Any]:
        """What a stored model records of its training (the model store's meta)."""
        return {k: v for k, v in asdict(self).items() if k != "final"}


class Plan(Enum):
    """What `run_trial` does with its training knobs, decided once from the checkpoint and the model store."""

    TRAIN = "train"                            # nothing stored: train from the first epoch
    RESUME = "resume"                          # continue this trial's own checkpoint (a resumed trial trains on)
    RESCORE = "re-score"                       # a model is stored for these knobs: score the sweep only
    REPORT_DIVERGENCE = "report divergence"    # these knobs diverged before: report that, train nothing


def choose_plan(resume: Path | None, stored: dict[str, Any] | None, diverged: dict[str, Any] | None) -> Plan:
    """The plan of a trial: its own checkpoint first, then a stored model, then a stored divergence."""
    if resume is not None:
        return Plan.RESUME
    if stored is not None:
        return Plan.RESCORE
    return Plan.REPORT_DIVERGENCE if diverged is not None else Plan.TRAIN


def run_trial(cfg: TrialConfig, work_dir: Path, *, report: Reporter | None = None, resume: Path | None = None,
              model_store: Path | None = None, gpu_ids: list | None = None, node_id: str | None = None,
              pulse: Pulser | None = None) -> EpochReport:
    """Train (or resume, or reuse) one configuration, report every epoch, return the final report.

    Args:
        work_dir: the checkpoint directory lives in `work_dir/checkpoint` (rewritten each epoch).
        report: called with (report, checkpoint dir) after every epoch; the last report carries the `sweep`.
        resume: a checkpoint directory to continue from exactly.
        model_store: a `ModelStore` directory. A model stored under `cfg.training_key()` skips training (a resumed
            trial carries on with its own), and so does a stored divergence; while another trial trains the same
            knobs, this one waits for it (`Plan`).
        gpu_ids: the GPUs Ray gave the trial (None outside Ray); `train.device = auto` trains on CUDA only then.
        node_id: the Ray node running the trial, carried by every report.
        pulse: told how far each training epoch and the sweep have got (`trainables.pulse`), never a report.
    """
    report = report or (lambda epoch_report, ckpt: None)
    device = trial_device(cfg.train, gpu_ids)
    use_ieee_fp32()
    key = cfg.training_key()
    store = ModelStore(model_store) if model_store else None
    with store.training(key) if store else contextlib.nullcontext() as stored:   # before the task takes memory
        torch.manual_seed(cfg.seed)
        task = make_task(cfg, device)
        if pulse is not None:
            task.pulse = pulse
        base = EpochReport(metric_name=task.metric, device=str(device), training_key=key, node_id=node_id)
        undecided = resume is None and stored is None and store is not None
        diverged = store.diverged(key) if undecided else None
        plan = choose_plan(resume, stored, diverged)
        log.info("trial %s: %s", key, plan.value)
        if plan in (Plan.TRAIN, Plan.RESUME):   # under the lock: trials with these knobs wait for the model
            return _train(cfg, task, Path(work_dir) / "checkpoint", base, report, resume=resume, store=store)
        if plan is Plan.RESCORE:
            store.load(key, task.model)
    if plan is Plan.REPORT_DIVERGENCE:
        final = replace(EpochReport.from_dict(diverged), metric_name=base.metric_name,
                        device=base.device, node_id=node_id, reused_checkpoint=True)
    else:
        trained = LoopState(**stored)
        final = final_report(task, task.model, cfg, replace(base, epoch=trained.epoch, reused_checkpoint=True,
                                                              train_time_s=trained.train_time_s), trained.best_epoch)
    report(final, None)
    return final


def _train(cfg: TrialConfig, task: Task, ckpt_dir: Path, base: EpochReport, report: Reporter, *,
           resume: Path | None, store: ModelStore | None) -> EpochReport:
    """The epochs of `run_trial`, from `resume` or from the start; the best model goes to `store` at the end."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    loop = _restore(task, resume, ckpt_dir) if resume is not None else LoopState()
    if loop.final is not None:       # re-entered after the last report: say it again, train nothing
        final = EpochReport.from_dict(loop.final)
        report(final, None)
        return final
    total_epochs = cfg.train.epochs + cfg.train.finetune_epochs
    for epoch in range(loop.epoch + 1, total_epochs + 1):
        epoch_report = _train_epoch(cfg, task, ckpt_dir, base, loop, epoch)
        if epoch_report.status == DIVERGED:
            _share_divergence(store, epoch_report)
            report(epoch_report, None)
            return epoch_report
        if epoch == total_epochs:
            load_model(ckpt_dir / BEST_MODEL_FILE, task.model)
            if store is not None:   # the trained model, for trials waiting to score it while this one scores its own
                store.publish(base.training_key, task.model, cfg.to_flat(), loop.trained())
            epoch_report = final_report(task, task.model, cfg, epoch_report, loop.best_epoch)
            loop.final = epoch_report.to_dict()
        save_checkpoint(ckpt_dir, model=task.model, optimizer=task.optimizer, config=cfg.to_flat(), epoch=epoch,
                        loop=asdict(loop), task=task.state_dict(), rng=rng_state(task.device))
        report(epoch_report, ckpt_dir)
    return epoch_report


def _restore(task: Task, resume: Path, ckpt_dir: Path) -> LoopState:
    """Put the task, model, optimiser and RNGs back as they were after the checkpoint's epoch."""
    saved = load_checkpoint(resume)   # on the CPU; load_state_dict moves each tensor where it belongs
    task.load_state_dict(saved["task"])
    task.model.load_state_dict(saved["model"])
    task.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], task.device)
    if Path(resume).resolve() != ckpt_dir.resolve() and (Path(resume) / BEST_MODEL_FILE).exists():
        shutil.copyfile(Path(resume) / BEST_MODEL_FILE, ckpt_dir / BEST_MODEL_FILE)
    return LoopState(**saved["loop"])


def _train_epoch(cfg: TrialConfig, task: Task, ckpt_dir: Path, base: EpochReport, loop: LoopState,
                 epoch: int) -> EpochReport:
    """Train one epoch, score it (uncompressed and under the trial's own compression), keep the best weights."""
    start = time.perf_counter()
    if epoch == cfg.train.epochs + 1:   # AWD's fine-tune stage starts from the best weights
        load_model(ckpt_dir / BEST_MODEL_FILE, task.model)
        task.start_finetune()
    try:
        train = task.train_epoch(epoch)
    except FloatingPointError as err:
        return replace(base, epoch=epoch, status=DIVERGED, error=str(err), done=True)
    model = task.evaluation_model()
    val = task.evaluate(model, "valid")
    compressed, accounting = compress_model(model, cfg.compress)
    compressed_val = val if cfg.compress.is_identity else task.evaluate(compressed, "valid")
    gate_stats = soft_gate_statistics(task, model)   # the epoch's curve; the final report measures the best model
    selection_loss = task.selection_loss(model, val)   # not `val`: evaluation-only knobs must not steer training
    task.end_epoch(selection_loss)
    if loop.best_loss is None or selection_loss < loop.best_loss:
        save_model(ckpt_dir / BEST_MODEL_FILE, model, cfg.to_flat())
        loop.best_loss, loop.best_epoch = selection_loss, epoch
    loop.epoch = epoch
    loop.train_time_s += time.perf_counter() - start
    val_scores = scored("val", val, task.metric)
    return replace(base, epoch=epoch, train=train, val_metric=val_scores.pop(VAL_METRIC), val=val_scores,
                   compressed_val_metric=compressed_val[task.metric], accounting=accounting,
                   gate_saturation=gate_stats.summary(), gate_histograms=gate_stats.histograms(),
                   epoch_time_s=time.perf_counter() - start, train_time_s=loop.train_time_s)


def _share_divergence(store: ModelStore | None, diverged: EpochReport) -> None:
    """Store the divergence, so later trials with these knobs report it instead of diverging again."""
    if store is None:
        return
    try:
        store.publish_diverged(diverged.training_key, diverged.to_dict())
    except OSError as err:   # the divergence is the result; failing to share it is not
        log.warning("could not store the divergence of %s: %s", diverged.training_key, err)


# --------------------------------------------------------------------------- command line

def print_progress(bar) -> Reporter:
    def report(epoch_report: EpochReport, ckpt_dir: Path | None) -> None:
        name = epoch_report.metric_name or "metric"
        if epoch_report.status == DIVERGED:
            bar.write(f"epoch {epoch_report.epoch}: diverged ({epoch_report.error})")
            return
        bar.update(1)
        gate = epoch_report.accounting.gate_compression if epoch_report.accounting else math.nan
        bar.write(f"epoch {epoch_report.epoch:>3}  train loss {epoch_report.train.get(TRAIN_LOSS, math.nan):.3f}  "
                  f"val {name} {epoch_report.val_metric:.2f}  "
                  f"compressed val {name} {epoch_report.compressed_val_metric:.2f} "
                  f"(gate ×{gate:.1f})  {epoch_report.epoch_time_s or 0:.1f}s")
    return report


def print_sweep(final: EpochReport) -> None:
    name = final.metric_name
    print(f"\n{'method':<11}{'gates':<6}{'rank':>5}{'bits':>5}{'gate ×':>8}{'model ×':>9}{'val ' + name:>11}"
          f"{'test ' + name:>11}")
    for r in final.sweep or ():
        print(f"{r.method:<11}{r.eval_gate:<6}{r.rank:>5}{r.bits:>5}{r.accounting.gate_compression:>8.1f}"
              f"{r.accounting.model_compression:>9.2f}{r.val_metric:>11.2f}{r.test_metric:>11.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainables.trainable", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["lm", "nmt"])
    parser.add_argument("--preset", help="lm: awd | medium | tiny; nmt: default | paper | tiny (default: tiny with "
                                         f"--smoke, else {' / '.join(f'{t}: {p}' for t, p in DEFAULT_PRESETS.items())})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted field, e.g. --set g2.tau=0.5 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="2 short epochs and a small sweep, for CI")
    parser.add_argument("--out", type=Path, help="work directory (checkpoint); default: a temporary one")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--json", type=Path, help="write the final metrics (with the sweep) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    try:
        preset = args.preset or ("tiny" if args.smoke else DEFAULT_PRESETS[args.task])
        overrides = dict(parse_override(o) for o in args.overrides)
        cfg = TrialConfig.preset(args.task, preset)
        cfg = TrialConfig.from_flat({**(SMOKE if args.smoke else {}), **overrides}, base=cfg)
        trial_device(cfg.train)
    except ValueError as err:
        parser.error(str(err))
    work_dir = args.out or Path(tempfile.mkdtemp(prefix="g2-trial-"))
    resume = work_dir / "checkpoint" if args.resume else None
    if resume is not None and not (resume / "checkpoint.pt").exists():
        parser.error(f"--resume: no checkpoint in {resume}")
    total = cfg.train.epochs + cfg.train.finetune_epochs
    with tqdm(total=total, desc=f"{args.task} {preset}", unit="epoch") as bar:
        if resume is not None:
            bar.update(load_checkpoint(resume)["epoch"])
        final = run_trial(cfg, work_dir, report=print_progress(bar), resume=resume)
    if final.status == OK:
        print_sweep(final)
    if args.json:
        args.json.write_text(json.dumps(final.to_dict(), indent=2, default=float))
    print(f"\nstatus {final.status}; checkpoint in {work_dir / 'checkpoint'}")
    return 0 if final.status == OK else 1


if __name__ == "__main__":
    raise SystemExit(main())
