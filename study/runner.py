"""Run, resume and extend a study: Ray Tune + a multi-objective OptunaSearch, recorded by driver callbacks.

A study lives in one directory, `<storage>/<name>`:

    study.json       the StudyConfig and the Tune experiments run for it (so `resume NAME` needs no config)
    optuna.db        the persistent Optuna study: an extension continues its numbering and its sampler
    mlflow.db        the default MLflow store (a parent run, a child run per trial), artifacts in mlartifacts/
    results/ curves/ the Parquet datasets (one file per trial, rewritten whole)
    models/          the best weights of every trained configuration, keyed by its training knobs
    ray/<name>[-ext<k>]/   Tune's experiment directories (trial checkpoints), what `Tuner.restore` reads
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from study.config import StudyConfig
from study.space import DefineByRun

log = logging.getLogger(__name__)
STATE_FILE = "study.json"
Printer = Callable[[str], None]


# --------------------------------------------------------------------------- the study directory

@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @classmethod
    def named(cls, storage: str, name: str) -> "StudyPaths":
        return cls(Path(storage).expanduser().resolve() / name)

    @classmethod
    def of(cls, cfg: StudyConfig) -> "StudyPaths":
        return cls.named(cfg.storage, cfg.name)

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def optuna_url(self, cfg: StudyConfig) -> str:
        return cfg.optuna_storage or f"sqlite:///{self.root / 'optuna.db'}"

    def tracking_uri(self, cfg: StudyConfig) -> str:
        """`study.tracking_uri`, by default an absolute SQLite store in the study directory."""
        return cfg.tracking_uri or f"sqlite:///{(self.root / 'mlflow.db').as_posix()}"

    def artifact_location(self, cfg: StudyConfig) -> str | None:
        """Local stores keep artifacts in `<root>/mlartifacts`; a server (None) decides for itself."""
        if self.tracking_uri(cfg).startswith(("http://", "https://", "databricks")):
            return None
        return (self.root / "mlartifacts").as_uri()


@dataclass
class StudyState:
    """What has been run for a study: its config (flat) and one entry per Tune experiment."""

    config: dict[str, Any]
    experiments: list[dict[str, Any]] = field(default_factory=list)   # {"name", "num_samples", "finished"}

    @classmethod
    def read(cls, path: Path) -> "StudyState | None":
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"config": self.config, "experiments": self.experiments}, indent=2))
        os.replace(tmp, path)


class StudyStateError(RuntimeError):
    """The study directory says this cannot be done (resume a finished study, run over an interrupted one)."""


def read_state(paths: StudyPaths) -> StudyState:
    """The study's saved state; a clear error when there is no study there."""
    state = StudyState.read(paths.state)
    if state is None:
        raise StudyStateError(f"no study {paths.root.name!r} in {paths.root.parent} (no {STATE_FILE})")
    return state


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


def start_ray(cfg: StudyConfig) -> None:
    import ray

    configure_ray_environment(cfg.address)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    except Exception as err:   # Ray raises several types here; add what the user needs to know
        if "auth" in str(err).lower() or "token" in str(err).lower():
            raise RuntimeError(f"could not join the Ray cluster at {cfg.address!r}: {err}\nThe cluster uses token "
                               "authentication: give this driver the head's token, e.g. export "
                               "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<path of the head's ~/.ray/auth_token>") from err
        raise


# --------------------------------------------------------------------------- Optuna

def make_sampler(cfg: StudyConfig, seed: int):
    import optuna

    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(cfg.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_optuna_study(cfg: StudyConfig, url: str, seed: int):
    """Create or load the persistent study and refuse one whose stored directions differ."""
    import optuna

    study = optuna.create_study(storage=url, study_name=cfg.name, load_if_exists=True,
                                directions=cfg.directions(), sampler=make_sampler(cfg, seed))
    stored = [d.name.lower() for d in study.directions]
    if stored != cfg.directions():
        raise ValueError(f"the Optuna study {cfg.name!r} in {url} has directions {stored}, but study.objectives "
                         f"{list(cfg.objectives)} need {cfg.directions()}; use another study.name")
    return study


def fail_orphaned_trials(cfg: StudyConfig, url: str) -> int:
    """Trials Optuna handed out to a driver that then died stay RUNNING forever; once a run is over, every
    RUNNING trial is such an orphan. Record them as FAILED (they were asked for, never run)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=cfg.name, storage=url)
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(orphans)


def make_searcher(cfg: StudyConfig, paths: StudyPaths, seed: int):
    """OptunaSearch (multi-objective; metric and mode live on the searcher only) behind a ConcurrencyLimiter."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from study.results import trial_status

    class StudySearch(OptunaSearch):
        """Tells Optuna the truth about unfinished trials: a diverged or errored trial FAILED, one stopped
        early (ASHA) was PRUNED. Neither is a real point of the front."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            # Tune marks a scheduler-stopped result `done` too: only the final report carries the sweep
            status = "error" if error else trial_status(result)
            if status != "ok":
                result, error = None, status in ("error", "diverged")
            super().on_trial_complete(trial_id, result=result, error=error)

    url = paths.optuna_url(cfg)
    open_optuna_study(cfg, url, seed)
    constants = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.base_trial().to_flat().items()}
    constants["_model_store"] = str(paths.models)
    searcher = StudySearch(space=DefineByRun(cfg.search_space(), constants), metric=list(cfg.objectives),
                           mode=cfg.modes(), sampler=make_sampler(cfg, seed),
                           storage=optuna.storages.RDBStorage(url), study_name=cfg.name)
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent)


# --------------------------------------------------------------------------- the Tune run

def make_trainable(cfg: StudyConfig):
    from ray import tune

    from trainables.trainable import train_lm, train_nmt

    return tune.with_resources(train_lm if cfg.task == "lm" else train_nmt,
                               {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def make_tuner(cfg: StudyConfig, paths: StudyPaths, experiment: str, num_samples: int, seed: int, printer: Printer):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from study.callbacks import StudyCallback

    trainable = make_trainable(cfg)
    scheduler = None
    if cfg.scheduler == "asha":
        base = cfg.base_trial()
        scheduler = ASHAScheduler(metric=cfg.objectives[0], mode=cfg.modes()[0], time_attr="training_iteration",
                                  max_t=base.train.epochs + base.train.finetune_epochs, grace_period=1)
    callback = StudyCallback(cfg, str(paths.root), total=num_samples, printer=printer)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=make_searcher(cfg, paths, seed), num_samples=num_samples,
                                    scheduler=scheduler, reuse_actors=False),
        run_config=tune.RunConfig(name=experiment, storage_path=str(paths.ray), callbacks=[callback],
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

    @property
    def all_failed(self) -> bool:
        return self.trials > 0 and self.failed == self.trials


def _finish(cfg: StudyConfig, paths: StudyPaths, state: StudyState, experiment: str, started: float,
            printer: Printer) -> StudyOutcome:
    from study.report import close_study

    for entry in state.experiments:
        if entry["name"] == experiment:
            entry["finished"] = True
    state.write(paths.state)
    orphans = fail_orphaned_trials(cfg, paths.optuna_url(cfg))
    if orphans:
        log.warning("%d Optuna trial(s) left RUNNING by an interrupted driver were marked FAIL", orphans)
    trials, failed = close_study(cfg, str(paths.root), paths.tracking_uri(cfg), printer)
    return StudyOutcome(cfg.name, paths.root, paths.tracking_uri(cfg), trials, failed, time.time() - started)


def run_study(cfg: StudyConfig, *, printer: Printer = print) -> StudyOutcome:
    """Start a new study, or extend a finished one by `cfg.total_samples()` trials."""
    paths = StudyPaths.of(cfg)
    state = StudyState.read(paths.state)
    if state is not None and any(not e["finished"] for e in state.experiments):
        raise StudyStateError(f"study {cfg.name!r} in {paths.root} was interrupted; continue it with "
                              f"`g2-study resume {cfg.name} --storage {cfg.storage}`")
    if state is not None and StudyConfig.from_json(state.config).task != cfg.task:
        raise StudyStateError(f"study {cfg.name!r} in {paths.root} is a {StudyConfig.from_json(state.config).task} "
                              f"study; pick another study.name")
    started = time.time()
    paths.root.mkdir(parents=True, exist_ok=True)
    state = state or StudyState(config=cfg.to_json())
    state.config = cfg.to_json()
    k = len(state.experiments)
    experiment = cfg.name if k == 0 else f"{cfg.name}-ext{k}"
    num_samples = cfg.total_samples()
    state.experiments.append({"name": experiment, "num_samples": num_samples, "finished": False})
    state.write(paths.state)
    from study.callbacks import open_tracker

    open_tracker(cfg, str(paths.root)).start(cfg.to_flat(), tags={"g2.storage": str(paths.root)})
    start_ray(cfg)
    printer(f"study {cfg.name}: {num_samples} trial(s) of {cfg.task}/{cfg.preset_name}, sampler {cfg.sampler}, "
            f"objectives {', '.join(f'{o} ({m})' for o, m in zip(cfg.objectives, cfg.modes()))}")
    printer(f"  study directory {paths.root}\n  MLflow {paths.tracking_uri(cfg)}")
    tuner = make_tuner(cfg, paths, experiment, num_samples, cfg.sampler_seed + k, printer)
    tuner.fit()
    return _finish(cfg, paths, state, experiment, started, printer)


def resume_study(name: str, storage: str = "studies", *, printer: Printer = print) -> StudyOutcome:
    """Continue an interrupted study: finished trials stay, interrupted ones continue from their checkpoints."""
    from ray import tune

    paths = StudyPaths.named(storage, name)
    state = read_state(paths)
    cfg = StudyConfig.from_json(state.config)
    pending = [e for e in state.experiments if not e["finished"]]
    if not pending:
        raise StudyStateError(f"study {name!r} has finished; run it again with --num-samples N to extend it")
    experiment = pending[-1]["name"]
    exp_dir = paths.ray / experiment
    started = time.time()
    start_ray(cfg)
    from study.callbacks import open_tracker

    open_tracker(cfg, str(paths.root)).start(cfg.to_flat())
    if not tune.Tuner.can_restore(str(exp_dir)):
        # the driver died before Tune saved anything: nothing ran, so start this experiment afresh
        printer(f"nothing to restore in {exp_dir}; starting its {pending[-1]['num_samples']} trial(s) again")
        tuner = make_tuner(cfg, paths, experiment, pending[-1]["num_samples"], cfg.sampler_seed, printer)
    else:
        printer(f"resuming study {name} from {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=make_trainable(cfg), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    tuner.fit()
    return _finish(cfg, paths, state, experiment, started, printer)
