"""Ray Tune trainables `train_lm` / `train_nmt`, built on `run_trial`, a plain loop that runs without Ray.

Per epoch a trial reports train loss, the validation metric, the validation metric of a compressed copy under
the trial's own `compress.*` setting with its storage accounting, gate saturation per layer and wall time, so
every report carries every objective. After the last epoch the best weights are scored on the whole
compression sweep (validation and test) and those rows ride in the final report under `sweep`.

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
from pathlib import Path
from typing import Any

import torch

from trainables.checkpoint import BEST_MODEL_FILE, load_checkpoint, load_model, save_checkpoint, save_model
from trainables.compress import compress_model
from trainables.config import SMOKE, TrialConfig, parse_override
from trainables.corpora import cache_root
from trainables.device import rng_state, set_rng_state, trial_device, use_ieee_fp32
from trainables.g2lstm import evaluation_gates
from trainables.lm import LMTask
from trainables.nmt import NMTTask
from trainables.presets import DEFAULT_PRESETS
from trainables.report import (
    COMPRESSED_VAL_METRIC,
    DIVERGED,
    EVAL_GATE,
    OK,
    STATUS,
    TEST_METRIC,
    TRAINING_KEY,
    VAL_METRIC,
    EpochReport,
    SweepRow,
    scored,
)
from trainables.store import ModelStore
from trainables.task import Task

log = logging.getLogger(__name__)
Reporter = Callable[[dict[str, Any], "Path | None"], None]   # (metrics, checkpoint directory or None)


def make_task(cfg: TrialConfig, device: torch.device) -> Task:
    task = LMTask if cfg.task == "lm" else NMTTask
    return task(cfg, device, cache_root(cfg.data.cache_dir))


def sweep_gates(cfg: TrialConfig) -> list[str]:
    """The evaluation gates the sweep scores: the trial's own, and binary ones for g2 and sharpened models."""
    hard = cfg.sweep.hard_gates and cfg.g2.gate_mode != "lstm"
    return list(dict.fromkeys([cfg.g2.eval_gate, *(["hard"] if hard else [])]))


def sweep_rows(task: Task, model: torch.nn.Module, cfg: TrialConfig) -> list[SweepRow]:
    """Score compressed copies of `model` on validation and test for every setting of the sweep, under every
    evaluation gate of `sweep_gates` (hard 0/1 i/f gates show how far "binary-valued" carries)."""
    settings = cfg.sweep.settings(cfg.compress)
    if cfg.compress not in settings:
        settings.append(cfg.compress)
    rows = []
    for setting in settings:
        compressed, accounting = compress_model(model, setting)
        for eval_gate in sweep_gates(cfg):
            with evaluation_gates(compressed, eval_gate):
                scores = {k: v for split, prefix in (("valid", "val"), ("test", "test"))
                          for k, v in scored(prefix, task.evaluate(compressed, split), task.metric).items()}
            own = setting == cfg.compress and eval_gate == cfg.g2.eval_gate
            rows.append(SweepRow(rank=setting.rank, bits=setting.bits, paper=setting.paper, method=setting.method,
                                 eval_gate=eval_gate, is_trial_setting=own, accounting=accounting, scores=scores))
    return rows


def final_report(task: Task, model: torch.nn.Module, cfg: TrialConfig, last: EpochReport,
                 best_epoch: int) -> EpochReport:
    """The last report: the sweep, the uncompressed and the trial's own setting's metrics lifted to the top."""
    done = replace(last, sweep=tuple(sweep_rows(task, model, cfg)))
    plain, own = done.uncompressed(), done.own_setting()
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


def run_trial(cfg: TrialConfig, work_dir: Path, *, report: Reporter | None = None, resume: Path | None = None,
              model_store: Path | None = None, gpu_ids: list | None = None, node_id: str | None = None
              ) -> dict[str, Any]:
    """Train (or resume, or reuse) one configuration, report every epoch, return the final report.

    Args:
        work_dir: the checkpoint directory lives in `work_dir/checkpoint` (rewritten each epoch).
        report: called with (report dict, checkpoint dir) after every epoch; the last call carries `sweep`.
        resume: a checkpoint directory to continue from exactly.
        model_store: a `ModelStore` directory. A model stored under `cfg.training_key()` skips training (a resumed
            trial carries on with its own), and so does a stored divergence; while another trial trains the same
            knobs, this one waits for it.
        gpu_ids: the GPUs Ray gave the trial (None outside Ray); `train.device = auto` trains on CUDA only then.
        node_id: the Ray node running the trial, carried by every report.
    """
    report = report or (lambda metrics, ckpt: None)
    device = trial_device(cfg.train, gpu_ids)
    use_ieee_fp32()
    key = cfg.training_key()
    store = ModelStore(model_store) if model_store else None
    with store.training(key) if store else contextlib.nullcontext() as meta:   # before the task takes any memory
        torch.manual_seed(cfg.seed)
        task = make_task(cfg, device)
        base = EpochReport(metric_name=task.metric, device=str(device), training_key=key, node_id=node_id)
        diverged = store.diverged(key) if resume is None and meta is None and store is not None else None
        if diverged is None and (meta is None or resume is not None):   # a resumed trial carries on from its own
            return _train(cfg, task, Path(work_dir) / "checkpoint", base, report, resume=resume, store=store)
        if meta is not None:
            store.load(key, task.model)
    if diverged is not None:
        log.info("the trial that trained %s diverged; so would this one: reporting that", key)
        final = replace(EpochReport.from_dict(diverged), metric_name=base.metric_name, device=base.device,
                        node_id=node_id, reused_checkpoint=True)
    else:
        log.info("reusing the model trained for %s; scoring the compression sweep only", key)
        trained = LoopState(**meta)
        final = final_report(task, task.model, cfg, replace(base, epoch=trained.epoch, reused_checkpoint=True,
                                                              train_time_s=trained.train_time_s), trained.best_epoch)
    said = final.to_dict()
    report(said, None)
    return said


def _train(cfg: TrialConfig, task: Task, ckpt_dir: Path, base: EpochReport, report: Reporter, *,
           resume: Path | None, store: ModelStore | None) -> dict[str, Any]:
    """The epochs of `run_trial`, from `resume` or from the start; the best model goes to `store` at the end."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    loop = _restore(task, resume, ckpt_dir) if resume is not None else LoopState()
    if loop.final is not None:       # re-entered after the last report: say it again, train nothing
        report(loop.final, None)
        return loop.final
    total_epochs = cfg.train.epochs + cfg.train.finetune_epochs
    for epoch in range(loop.epoch + 1, total_epochs + 1):
        epoch_report = _train_epoch(cfg, task, ckpt_dir, base, loop, epoch)
        said = epoch_report.to_dict()
        if epoch_report.status == DIVERGED:
            _share_divergence(store, said)
            report(said, None)
            return said
        if epoch == total_epochs:
            load_model(ckpt_dir / BEST_MODEL_FILE, task.model)
            if store is not None:   # the trained model, for trials waiting to score it while this one scores its own
                store.publish(base.training_key, task.model, cfg.to_flat(), loop.trained())
            said = loop.final = final_report(task, task.model, cfg, epoch_report, loop.best_epoch).to_dict()
        save_checkpoint(ckpt_dir, model=task.model, optimizer=task.optimizer, config=cfg.to_flat(), epoch=epoch,
                        loop=asdict(loop), task=task.state_dict(), rng=rng_state(task.device))
        report(said, ckpt_dir)
    return said


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
    gate_stats = task.gate_statistics(model)
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


def _share_divergence(store: ModelStore | None, diverged: dict[str, Any]) -> None:
    """Store the divergence, so later trials with these knobs report it instead of diverging again."""
    if store is None:
        return
    try:
        store.publish_diverged(diverged[TRAINING_KEY], diverged)
    except OSError as err:   # the divergence is the result; failing to share it is not
        log.warning("could not store the divergence of %s: %s", diverged[TRAINING_KEY], err)


# --------------------------------------------------------------------------- Ray Tune entry points

def train_lm(config: dict[str, Any], model_store: str | None = None) -> None:
    """Ray Tune function trainable for language modelling (the flat config of `TrialConfig`)."""
    _tune_trial("lm", config, model_store)


def train_nmt(config: dict[str, Any], model_store: str | None = None) -> None:
    """Ray Tune function trainable for translation."""
    _tune_trial("nmt", config, model_store)


def _tune_trial(task: str, config: dict[str, Any], model_store: str | None) -> None:
    """One trial under Tune: `config` is exactly the trial's flat `TrialConfig`; `model_store` (a directory
    shared by the study's trials, `tune.with_parameters`) lets trials with the same training knobs share a model."""
    import ray
    from ray import tune

    if config.get("task", task) != task:
        raise ValueError(f"config task={config['task']!r} given to the {task} trainable")
    cfg = TrialConfig.from_flat({**config, "task": task})
    store = Path(model_store) if model_store else None

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    where = {"gpu_ids": ray.get_gpu_ids(), "node_id": ray.get_runtime_context().get_node_id()}
    work_dir = Path(tempfile.mkdtemp(prefix="g2-trial-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run_trial(cfg, work_dir, report=report, model_store=store, **where)
        else:
            with checkpoint.as_directory() as resume_dir:
                run_trial(cfg, work_dir, report=report, resume=Path(resume_dir), model_store=store, **where)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# --------------------------------------------------------------------------- command line

def print_progress(bar) -> Reporter:
    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        name = metrics.get("metric_name", "metric")
        if metrics.get(STATUS) == DIVERGED:
            bar.write(f"epoch {metrics['epoch']}: diverged ({metrics['error']})")
            return
        bar.update(1)
        bar.write(f"epoch {metrics['epoch']:>3}  train loss {metrics.get('train_loss', math.nan):.3f}  "
                  f"val {name} {metrics.get(VAL_METRIC, math.nan):.2f}  "
                  f"compressed val {name} {metrics[COMPRESSED_VAL_METRIC]:.2f} "
                  f"(gate ×{metrics['gate_compression']:.1f})  {metrics.get('epoch_time_s', 0):.1f}s")
    return report


def print_sweep(metrics: dict[str, Any]) -> None:
    name = metrics["metric_name"]
    print(f"\n{'method':<11}{'gates':<6}{'rank':>5}{'bits':>5}{'gate ×':>8}{'model ×':>9}{'val ' + name:>11}"
          f"{'test ' + name:>11}")
    for r in metrics["sweep"]:
        print(f"{r['method']:<11}{r[EVAL_GATE]:<6}{r['compress.rank']:>5}{r['compress.bits']:>5}{r['gate_compression']:>8.1f}"
              f"{r['model_compression']:>9.2f}{r[VAL_METRIC]:>11.2f}{r[TEST_METRIC]:>11.2f}")


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
        metrics = run_trial(cfg, work_dir, report=print_progress(bar), resume=resume)
    if metrics.get(STATUS) == OK:
        print_sweep(metrics)
    if args.json:
        final_json = json.dumps(metrics, indent=2, default=float)
        args.json.write_text(final_json)
    print(f"\nstatus {metrics.get(STATUS)}; checkpoint in {work_dir / 'checkpoint'}")
    return 0 if metrics.get(STATUS) == OK else 1


if __name__ == "__main__":
    raise SystemExit(main())
