"""Run, resume and extend a study: Ray Tune + a multi-objective OptunaSearch, recorded by driver callbacks.

A study lives in one directory (`study.paths`); Tune's experiments of it, what `Tuner.restore` reads, are
`ray/<name>[-ext<k>]/` there, one per run or extension.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from study import results
from study.adapters import ray_tune
from study.callbacks import StudyCallback
from study.claim import DriverClaim
from study.config import DEFAULT_STORAGE, StudyConfig
from study.entrypoints import train_lm, train_nmt
from study.front import close_study
from study.paths import Experiment, SearchLog, StudyPaths, StudyState, StudyStateError, read_state
from study.search import StudySearch, fail_orphaned_trials, make_searcher
from study.tags import STORAGE_TAG
from study.tracking import open_tracker
from trainables.report import TRIAL_ID

# Tune pickles the searcher with the experiment, under the module it was defined in: experiments saved before
# StudySearch moved to study.search name it study.runner.StudySearch, and resume must still find it there.
__all__ = ["StudySearch", "resume_study", "run_study"]

log = logging.getLogger(__name__)
Printer = Callable[[str], None]


# --------------------------------------------------------------------------- Ray

def configure_ray_environment(address: str) -> None:
    """Loopback-only local Ray without usage reporting; token auth shared with a cluster started by `ray start`.

    Ray ≥ 2.59 protects local clusters with a token. A driver joining one must present it: unless the user set
    RAY_AUTH_MODE / RAY_AUTH_TOKEN(_PATH) already, use the token `ray start` wrote to ~/.ray/auth_token.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # our callback records; no CSV/TBX copies
    # a failed or diverged trial's last report has no objectives: it is data (study.entrypoints), not a misspelt metric
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # keep a local run on 127.0.0.1
        return
    if any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        log.info("using the Ray auth token in %s", token)


def start_ray(cfg: StudyConfig) -> str:
    """Join `cfg.address` or start a private local Ray; returns the session directory of a local one, else ""."""
    configure_ray_environment(cfg.address)
    if ray.is_initialized():
        return ""
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
            return ""
        context = ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
        return str(context.address_info.get("session_dir", ""))
    except Exception as err:   # Ray raises several types here; add what the user needs to know
        if "auth" in str(err).lower() or "token" in str(err).lower():
            raise RuntimeError(f"could not join the Ray cluster at {cfg.address!r}: {err}\nThe cluster uses token "
                               "authentication: give this driver the head's token, e.g. export "
                               "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<path of the head's ~/.ray/auth_token>") from err
        raise


def check_resources(cfg: StudyConfig) -> None:
    """Refuse, before any trial starts, a study whose trials fit on no node: Tune would keep them pending forever.

    The nodes alive now are what counts (a cluster that adds nodes on demand is not one this study assumes).
    """
    need = {"CPU": cfg.cpus_per_trial, "GPU": cfg.gpus_per_trial}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(all(n["Resources"].get(k, 0.0) >= v for k, v in need.items() if v > 0) for n in nodes):
        return
    total = ray.cluster_resources()
    described = "; ".join(f"node {n['NodeID'][:8]} ({n.get('NodeManagerAddress', '?')}): "
                          f"CPU {n['Resources'].get('CPU', 0):g}, GPU {n['Resources'].get('GPU', 0):g}"
                          for n in nodes) or "no node alive"
    raise StudyStateError(f"no node of the Ray cluster can run a trial of study {cfg.name!r}: each needs "
                          f"study.cpus_per_trial={cfg.cpus_per_trial:g} CPU and study.gpus_per_trial="
                          f"{cfg.gpus_per_trial:g} GPU on one node, but the cluster has CPU "
                          f"{total.get('CPU', 0):g}, GPU {total.get('GPU', 0):g} in all ({described}); "
                          f"lower them or add a node that has them")


# --------------------------------------------------------------------------- the Tune run

def make_trainable(cfg: StudyConfig, paths: StudyPaths):
    """The task's trainable, guarded so that only a lost worker is a Tune failure (and retried, `max_failures`).

    The model store is a parameter of the trainable, not a key of the trial config: it is no knob (no MLflow
    param, results column or trial name), and `Tuner.restore` is given it again with the trainable.
    """
    trainable = tune.with_parameters(train_lm if cfg.task == "lm" else train_nmt, model_store=str(paths.models),
                                     live_dir=str(paths.live))
    return tune.with_resources(trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def trial_dirname(trial) -> str:
    """A trial's name and directory: its id, then its knobs (`1a2b3_00004-g2-tau0.63-p0.59-r16-b4`).

    Ray's default names a trial after every config value it resolved, which here are the fixed fields (the model
    store path, `compress.clip`, ...) rather than the searched knobs.
    """
    return f"{trial.trial_id}-{_SLUG_CHARS.sub('-', _slug(trial.config)).strip('-')}"[:120]


_SLUG_CHARS = re.compile(r"[^A-Za-z0-9.=+]+")


def _slug(config: dict[str, Any]) -> str:
    mode = config.get("g2.gate_mode", "")
    knobs = f" tau{config['g2.tau']:.2f} p{config['g2.p']:.2f}" if mode == "g2" else ""
    paper = config.get("compress.paper", "none")
    return (f"{mode}{knobs} r{config.get('compress.rank')} b{config.get('compress.bits')}"
            + (f" {paper}" if paper != "none" else ""))


def make_tuner(cfg: StudyConfig, paths: StudyPaths, experiment: str, num_samples: int, seed: int, printer: Printer,
               quiet: bool = False):
    trainable = make_trainable(cfg, paths)
    scheduler = None
    if cfg.scheduler == "asha":
        base = cfg.base_trial()
        scheduler = ASHAScheduler(metric=cfg.objectives[0], mode=cfg.modes()[0], time_attr="training_iteration",
                                  max_t=base.train.epochs + base.train.finetune_epochs, grace_period=1)
    searcher = make_searcher(cfg, paths, seed)
    callback = StudyCallback(cfg, str(paths.root), total=num_samples, printer=printer, quiet=quiet, searcher=searcher)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent),
                                    num_samples=num_samples,
                                    scheduler=scheduler, reuse_actors=False, trial_name_creator=trial_dirname,
                                    trial_dirname_creator=trial_dirname),
        # Tune's JSON logger is the one of its auto loggers kept (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): the
        # experiment analysis `fit()` returns reads its result.json, and warns for every trial without one
        run_config=tune.RunConfig(name=experiment, storage_path=str(paths.ray),
                                  callbacks=[callback, JsonLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0))


@dataclass
class StudyOutcome:
    name: str
    root: Path
    tracking_uri: str
    trials: int
    failed: int
    wall_time_s: float
    interrupted: bool = False   # stopped (Ctrl-C) with trials left: `g2-study resume` continues it

    @property
    def all_failed(self) -> bool:
        return self.trials > 0 and self.failed == self.trials


def _fit(tuner, paths: StudyPaths, num_samples: int) -> tuple[int, bool]:
    """Run the experiment; how many of its trials ended (finished, failed or stopped early), and whether it is over.

    On Ctrl-C `Tuner.fit()` saves the experiment and returns normally, with trials still running, pending or not
    yet asked for (docs/design.md), and then stops the running ones: in memory they end TERMINATED. The experiment
    state it saved just before says what they were, so only that state tells whether the experiment is over: every
    trial ended, and either all `num_samples` were asked for or the search had nothing left to ask (`SearchLog`).
    """
    grid = tuner.fit()
    trials = tune.ExperimentAnalysis(grid.experiment_path).trials
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return ended, ended == len(trials) and (ended >= num_samples or SearchLog.read(paths.search_log).exhausted)


def _interrupted(cfg: StudyConfig, paths: StudyPaths, ended: int, num_samples: int, started: float,
                 printer: Printer) -> StudyOutcome:
    """Ctrl-C: nothing is marked finished or failed, so `resume` carries on exactly where this stopped."""
    tracker = open_tracker(cfg, str(paths.root))
    tracker.attach()
    tracker.end("interrupted")
    printer(f"\nstudy {cfg.name} interrupted with {ended} of {num_samples} trial(s) finished; nothing is lost, "
            f"continue it with\n  g2-study resume {cfg.name} --storage {paths.root.parent}")
    trials = results.load(str(paths.root))[TRIAL_ID].nunique()
    return StudyOutcome(cfg.name, paths.root, paths.tracking_uri(cfg), trials, 0, time.time() - started,
                        interrupted=True)


def _finish(cfg: StudyConfig, paths: StudyPaths, state: StudyState, experiment: str, started: float,
            printer: Printer) -> StudyOutcome:
    state.finish(experiment).write(paths.state)
    search = SearchLog.read(paths.search_log)
    if search.answered:
        printer(f"{search.answered} suggestion(s) of the search were answered from the results, with no trial"
                + ("; the search had nothing left to ask" if search.exhausted else ""))
    orphans = fail_orphaned_trials(cfg, paths.optuna_url(cfg))
    if orphans:
        printer(f"{orphans} Optuna trial(s) left RUNNING by the interrupted driver are marked FAIL: they were "
                f"handed out but never reported (the driver was killed before Ray Tune saved them)")
    trials, failed = close_study(cfg, str(paths.root), paths.tracking_uri(cfg), printer)
    return StudyOutcome(cfg.name, paths.root, paths.tracking_uri(cfg), trials, failed, time.time() - started)


def bridge_checkpoint_rotation(exp_dir: Path) -> list[Path]:
    """Copies that let Tune restore a trial whose checkpoint it rotated away before its driver was killed.

    With `num_to_keep=1` Tune deletes a trial's previous checkpoint as soon as it registers the next one, and saves
    the experiment state only every few seconds: a driver killed in between leaves a state naming a checkpoint that
    is gone (one or several epochs back), and every restore of that trial fails ("does not exist on storage
    anymore"). The trial's newest checkpoint is the same trial further on (its loop state says which epoch), so a
    copy of it under each name the newest saved state gives that trial resumes it from there. Returns the copies
    made, which the caller removes once the experiment is over.
    """
    made = []
    for trial_dir, names in ray_tune.checkpoints_named(exp_dir):
        newest = sorted(trial_dir.glob("checkpoint_[0-9]*"))
        for name in sorted(names):
            if newest and not (trial_dir / name).exists():
                shutil.copytree(newest[-1], trial_dir / name)
                made.append(trial_dir / name)
    return made


def attach_restored(tuner, printer: Printer, quiet: bool) -> None:
    """A restored experiment brings back the callback and searcher pickled with it: link them again (the callback
    tells the searcher each end), with this driver's console settings in place of the first driver's."""
    searcher = ray_tune.restored_searcher(tuner)
    for callback in ray_tune.restored_callbacks(tuner):
        if isinstance(callback, StudyCallback):
            callback.attach(searcher if isinstance(searcher, StudySearch) else None, printer, quiet)


def _start_ray(cfg: StudyConfig, claim: DriverClaim) -> None:
    """Ray up, this driver's local Ray recorded in its claim, and the trials known to fit on some node."""
    session = start_ray(cfg)
    if session:
        claim.watch_local_ray(session)
    check_resources(cfg)


def run_study(cfg: StudyConfig, *, printer: Printer = print, quiet: bool = False) -> StudyOutcome:
    """Start a new study, or extend a finished one by `cfg.total_samples()` trials."""
    paths = StudyPaths.of(cfg)
    with DriverClaim(paths.root, cfg.name, printer) as claim:
        state = StudyState.read(paths.state)
        if state is not None and state.pending() is not None:
            raise StudyStateError(f"study {cfg.name!r} in {paths.root} was interrupted; continue it with "
                                  f"`g2-study resume {cfg.name} --storage {cfg.storage}`")
        if state is not None and StudyConfig.from_json(state.config).task != cfg.task:
            raise StudyStateError(f"study {cfg.name!r} in {paths.root} is a "
                                  f"{StudyConfig.from_json(state.config).task} study; pick another study.name")
        started = time.time()
        _start_ray(cfg, claim)   # before the study records an experiment that could not start
        k = len(state.experiments) if state is not None else 0
        experiment = cfg.name if k == 0 else f"{cfg.name}-ext{k}"
        num_samples = cfg.total_samples()
        earlier = state.experiments if state is not None else ()
        state = StudyState(cfg.to_json(), (*earlier, Experiment(experiment, num_samples)))
        state.write(paths.state)
        open_tracker(cfg, str(paths.root)).start(cfg.to_flat(), tags={STORAGE_TAG: str(paths.root)})
        printer(f"study {cfg.name}: {num_samples} trial(s) of {cfg.task}/{cfg.preset_name}, sampler {cfg.sampler}, "
                f"objectives {', '.join(f'{o} ({m})' for o, m in zip(cfg.objectives, cfg.modes()))}")
        printer(f"  study directory {paths.root}\n  MLflow {paths.tracking_uri(cfg)}")
        SearchLog().write(paths.search_log)   # this run's answers
        tuner = make_tuner(cfg, paths, experiment, num_samples, cfg.sampler_seed + k, printer, quiet)
        ended, over = _fit(tuner, paths, num_samples)
        if not over:
            return _interrupted(cfg, paths, ended, num_samples, started, printer)
        return _finish(cfg, paths, state, experiment, started, printer)


def resume_study(name: str, storage: str = DEFAULT_STORAGE, *, printer: Printer = print, quiet: bool = False
                 ) -> StudyOutcome:
    """Continue an interrupted study: finished trials stay, interrupted ones continue from their checkpoints."""
    paths = StudyPaths.named(storage, name)
    read_state(paths)   # a clear error, and no directory made, for a study that does not exist
    with DriverClaim(paths.root, name, printer) as claim:
        state = read_state(paths)
        cfg = StudyConfig.from_json(state.config)
        pending = state.pending()
        if pending is None:
            raise StudyStateError(f"study {name!r} has finished; run it again with --num-samples N to extend it")
        experiment, num_samples = pending.name, pending.num_samples
        exp_dir = paths.ray / experiment
        started = time.time()
        _start_ray(cfg, claim)
        open_tracker(cfg, str(paths.root)).start(cfg.to_flat())
        bridges: list[Path] = []
        if not tune.Tuner.can_restore(str(exp_dir)):
            # the driver died before Tune saved anything: nothing ran, so start this experiment afresh
            printer(f"nothing to restore in {exp_dir}; starting its {num_samples} trial(s) again")
            tuner = make_tuner(cfg, paths, experiment, num_samples, cfg.sampler_seed, printer, quiet)
        else:
            printer(f"resuming study {name} from {exp_dir}")
            bridges = bridge_checkpoint_rotation(exp_dir)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=make_trainable(cfg, paths), resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
            attach_restored(tuner, printer, quiet)
        ended, over = _fit(tuner, paths, num_samples)
        if not over:
            return _interrupted(cfg, paths, ended, num_samples, started, printer)   # a next resume may need them
        for copy in bridges:   # those Tune restored from it rotated away; the others it never named
            shutil.rmtree(copy, ignore_errors=True)
        return _finish(cfg, paths, state, experiment, started, printer)
