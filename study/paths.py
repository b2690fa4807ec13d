"""The study directory: where everything of one study lives, and what has been run for it.

    <storage>/<name>/study.json   the StudyConfig and the Tune experiments run for it (so `resume NAME` needs no config)
                     optuna.db    the persistent Optuna study
                     mlflow.db    the default MLflow store, artifacts in mlartifacts/
                     results/ curves/ gates/   the Parquet datasets (study.results)
                     models/      the best weights of every trained configuration, keyed by its training knobs
                     progress/    one small JSON file per started trial: its plan and last epoch (g2-study status)
                     live/        one per running trial: batches of its epoch, or settings of its sweep, done
                     estimate.json  the running driver's ETA (study.board)
                     search.json  what the search answered from the results without a Ray trial (study.search)
                     ray/<experiment>/         Tune's experiment directories (trial checkpoints)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from study.config import StudyConfig

STATE_FILE = "study.json"


def write_json(path: Path, value: Any) -> None:
    """Write aside, then rename: a killed driver leaves the old file or the new one, never a part of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @classmethod
    def named(cls, storage: str, name: str) -> StudyPaths:
        return cls(Path(storage).expanduser().resolve() / name)

    @classmethod
    def of(cls, cfg: StudyConfig) -> StudyPaths:
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

    @property
    def progress(self) -> Path:
        """One JSON file per trial that a driver started: what it does and its last epoch (`study.progress`)."""
        return self.root / "progress"

    @property
    def live(self) -> Path:
        """One JSON file per running trial: how far its epoch or sweep has got (`study.live`), every few seconds."""
        return self.root / "live"

    @property
    def estimate(self) -> Path:
        """The running driver's ETA for the study, rewritten every few seconds (`study.board`, `g2-study status`)."""
        return self.root / "estimate.json"

    @property
    def search_log(self) -> Path:
        return self.root / "search.json"

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


@dataclass(frozen=True)
class Experiment:
    """One Tune experiment run for a study: the first run, or an extension (`<name>-ext<k>`)."""

    name: str
    num_samples: int             # the trials it asked for
    finished: bool = False       # every trial ended and the study was closed; else `resume` continues it


@dataclass(frozen=True)
class StudyState:
    """What has been run for a study: its config (flat) and its Tune experiments, oldest first."""

    config: dict[str, Any]
    experiments: tuple[Experiment, ...] = ()

    @classmethod
    def read(cls, path: Path) -> StudyState | None:
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        return cls(stored["config"], tuple(Experiment(**e) for e in stored.get("experiments", ())))

    def write(self, path: Path) -> None:
        write_json(path, {"config": self.config, "experiments": [asdict(e) for e in self.experiments]})

    @property
    def total_samples(self) -> int:
        return sum(e.num_samples for e in self.experiments)

    @property
    def finished(self) -> bool:
        """Something was run and all of it finished."""
        return bool(self.experiments) and all(e.finished for e in self.experiments)

    def pending(self) -> Experiment | None:
        """The experiment a driver stopped before it finished (`g2-study resume` continues it), if any."""
        return next((e for e in reversed(self.experiments) if not e.finished), None)

    def finish(self, name: str) -> StudyState:
        return replace(self, experiments=tuple(replace(e, finished=True) if e.name == name else e
                                               for e in self.experiments))


@dataclass
class SearchLog:
    """What the search of the current run answered from the results instead of running a trial (`search.json`).

    The searcher writes it; `g2-study status` counts the answers and the driver reads `exhausted` to tell a search
    that has nothing left to ask from an interrupted run.
    """

    answered: int = 0              # suggestions told to Optuna from rows the study holds, this run
    exhausted: bool = False        # every suggestion was answered and no trial ran, or the grid is used up
    lines: list[str] = field(default_factory=list)   # the newest things the search did, as the console said them
    KEEP = 50

    @classmethod
    def read(cls, path: Path) -> SearchLog:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def write(self, path: Path) -> None:
        write_json(path, {"answered": self.answered, "exhausted": self.exhausted, "lines": self.lines[-self.KEEP:]})


class StudyStateError(RuntimeError):
    """The study directory says this cannot be done (resume a finished study, run over an interrupted one)."""


def read_state(paths: StudyPaths) -> StudyState:
    """The study's saved state; a clear error when there is no study there."""
    state = StudyState.read(paths.state)
    if state is None:
        raise StudyStateError(f"no study {paths.root.name!r} in {paths.root.parent} (no {STATE_FILE})")
    return state
