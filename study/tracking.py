"""MLflow tracking of a study from the Ray Tune driver: one parent run per study, one child run per trial.

Only `MlflowClient` is used, with its own tracking URI: no `mlflow.set_tracking_uri`, no active run, so several
studies (or tests) in one process cannot write into each other's runs. Runs are found again by tags
(`g2.study` + `g2.role=parent`, `g2.trial_id` under `mlflow.parentRunId`), never by an in-memory map, because Ray's
own MLflowLoggerCallback forgets its map on `Tuner.restore` and opens a second run per trial (docs/design.md).
Every tag name is `study.tags`'.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from study.config import StudyConfig, flatten
from study.mlflow_values import code_version, json_safe, metric_name, param_values, text_value, valid_metrics
from study.paths import StudyPaths
from study.tags import (
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TAG,
    MODEL_TRAINING,
    OPTUNA_TRIAL_TAG,
    PARENT_ID_TAG,
    PARENT_ROLE,
    REUSED,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TRAINED,
    TRAINING_KEY_TAG,
    TRIAL_ROLE,
    TRIAL_TAG,
)
from study.trial_end import TrialEnd
from trainables.report import FAILED, STATUSES, VAL_METRIC, EpochReport

log = logging.getLogger(__name__)

REUSED_SUFFIX = f" · {REUSED}"
TRIAL_RUN_STATUS = {status: "FAILED" if status in FAILED else "FINISHED" for status in STATUSES}   # MLflow's
STUDY_RUN_STATUS = {"ok": "FINISHED", "finished": "FINISHED", "error": "FAILED", "failed": "FAILED",
                    "killed": "KILLED", "interrupted": "KILLED"}

def _quoted(value: str) -> str:
    """A value for an MLflow filter string, which has no escape for a quote."""
    if "'" in value:
        raise ValueError(f"names used in MLflow searches must not contain a single quote: {value!r}")
    return f"'{value}'"


def runs_view_url(server: str, experiment_id: str, *, charts: bool = False, higher_is_better: bool = False) -> str:
    """The UI's training-runs view of an experiment's trials, best model first, or the study's charts.

    MLflow 3.x opens an experiment on its GenAI "Overview / Traces" page whatever its kind: this URL goes straight
    to the runs table. Filtered to the trials (`g2.role = trial`), the children are listed flat instead of folded
    under their parent, and sorted by their model's validation metric (`val_metric`), which brings its column into view. Which other columns
    show, and their widths, the UI keeps per browser, not in the URL. With `charts`, the metric charts of every run
    (the parent's `study/*` convergence curves among them).
    """
    base = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
    if charts:
        return base + "?compareRunsMode=CHART"
    query = urlencode({"searchFilter": f"tags.`{ROLE_TAG}` = '{TRIAL_ROLE}'",
                       "orderByKey": f"metrics.`{VAL_METRIC}`",
                       "orderByAsc": "false" if higher_is_better else "true"}, quote_via=quote)
    return f"{base}?{query}"


UI_PORT = 5000   # where `g2-study ui` serves a study's own (SQLite) MLflow store unless told another port


def ui_server(tracking_uri: str, port: int = UI_PORT) -> str:
    """The MLflow UI of a tracking URI: the server itself, or `g2-study ui` on this machine for a local store."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{port}"


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """One run's page on the MLflow UI at `server`."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def find_experiment_id(tracking_uri: str, experiment: str) -> str | None:
    """The id of an existing experiment, None if there is none (nothing is created)."""
    found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    return None if found is None else found.experiment_id


KNOB_LABELS = {"g2.tau": "τ", "g2.p": "p", "g2.sharpen_tau": "τs", "compress.rank": "r", "compress.bits": "b",
               "seed": "s"}
MODEL_KNOBS = ("g2.gate_mode", "g2.tau", "g2.p", "g2.sharpen_tau")
SETTING_KNOBS = ("compress.rank", "compress.bits", "compress.paper")


def trial_run_name(config: Mapping[str, Any], searched: Iterable[str] = ()) -> str:
    """A child run's name, what differs between siblings first: `g2 τ0.63 p0.59 · r0 b32`, `lstm · r16 b4`.

    The searched knobs lead (`searched`: the study's space), so that the part that tells trials apart survives
    the UI cutting the name; the rest says what was trained and how it is compressed. Knobs that do not apply to
    the gate mode (τ and p outside g2, τs outside sharpened) are left out. `r` is the SVD rank (0: full rank), `b`
    the bits per weight (32: float); the paper's rounding is named.
    """
    searched = set(searched)
    mode = config.get("g2.gate_mode", "?")
    applies = {"g2.tau": mode == "g2", "g2.p": mode == "g2", "g2.sharpen_tau": mode == "sharpened",
               "compress.paper": config.get("compress.paper", "none") not in ("none", None)}
    order = [*MODEL_KNOBS, *SETTING_KNOBS, *sorted(k for k in searched if k not in MODEL_KNOBS + SETTING_KNOBS)]
    shown = [k for k in order if k in config and applies.get(k, True)]
    lead = [_knob(k, config[k]) for k in shown if k in searched]
    model = [_knob(k, config[k]) for k in shown if k not in searched and k in MODEL_KNOBS]
    setting = [_knob(k, config[k]) for k in shown if k not in searched and k not in MODEL_KNOBS]
    return " · ".join(" ".join(group) for group in (lead, model, setting) if group)


def _knob(key: str, value: Any) -> str:
    if key == "g2.gate_mode" or key == "compress.paper":
        return str(value)
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{KNOB_LABELS.get(key, key.rsplit('.', 1)[-1] + '=')}{text}"


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


class StudyTracker:
    """The MLflow side of one study: its parent run and a child run per trial, reused across resumes."""

    def __init__(self, tracking_uri: str, experiment: str, study_name: str, artifact_location: str | None = None,
                 searched: tuple[str, ...] = ()):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri, self.study_name, self.searched = tracking_uri, study_name, searched
        self.experiment_id = self._experiment(experiment, artifact_location)
        self.parent_id: str | None = None
        self._runs: dict[str, str] = {}            # trial id -> child run id, opened by this process
        self._ended: set[str] = set()

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        """The experiment's id, creating it (artifacts where asked) if it is new; two drivers may race to create it."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:   # made by an older version
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return found.experiment_id
        if artifact_location is not None and "://" not in artifact_location:
            artifact_location = Path(artifact_location).expanduser().resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def run_url(self, server: str, run_id: str) -> str:
        return run_url(server, self.experiment_id, run_id)

    def _search(self, filter_string: str) -> Iterator[Any]:
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _log(self, run_id: str, metrics: Iterable[Metric] = (), params: Mapping[str, str] | None = None,
             tags: Mapping[str, Any] | None = None) -> None:
        """log_batch within MLflow's per-request limits."""
        for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        for chunk in _chunks([Param(k, v) for k, v in (params or {}).items()], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks([RunTag(k, text_value(v, MAX_TAG_VAL_LENGTH)) for k, v in (tags or {}).items()],
                             MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def _require_parent(self) -> str:
        if self.parent_id is None:
            raise RuntimeError("StudyTracker.start() must be called before logging trials")
        return self.parent_id

    # ----------------------------------------------------------------------- the study

    def _parent_run(self):
        query = f"tags.`{STUDY_TAG}` = {_quoted(self.study_name)} AND tags.`{ROLE_TAG}` = {_quoted(PARENT_ROLE)}"
        return next(self._search(query), None)

    def attach(self) -> str:
        """Find the parent run that `start` opened (in this driver, or another process of it); returns its id."""
        found = self._parent_run()
        if found is None:
            raise RuntimeError(f"study {self.study_name!r} has no parent run yet: StudyTracker.start() opens it")
        self.parent_id = found.info.run_id
        return self.parent_id

    def start(self, config_flat: Mapping[str, Any], tags: Mapping[str, Any] | None = None) -> str:
        """Open (or, on a resume, reopen) the study's parent run; returns its id.

        Params already on a reopened run are kept: MLflow refuses to change a param, so a value that differs now is
        only reported in the log and in the `study_config.json` artifact, which always holds the latest config.
        """
        found = self._parent_run()
        if found is None:
            run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                         tags={STUDY_TAG: self.study_name, ROLE_TAG: PARENT_ROLE})
            self.parent_id, existing = run.info.run_id, {}
        else:
            self.parent_id, existing = found.info.run_id, found.data.params
            if found.info.status != "RUNNING":
                self.client.update_run(self.parent_id, status="RUNNING")
        params = param_values(config_flat)
        for key in sorted(k for k in params if k in existing and existing[k] != params[k]):
            log.warning("study param %s changed on resume (%r -> %r); MLflow keeps the first value",
                        key, existing[key], params[key])
        self._log(self.parent_id, params={k: v for k, v in params.items() if k not in existing},
                  tags={**code_version(), **(tags or {})})
        self.client.log_text(self.parent_id, json.dumps(json_safe(flatten(config_flat)), indent=2, default=str),
                             "study_config.json")
        return self.parent_id

    def end(self, status: str, front: pd.DataFrame | None = None, figure_path: Path | None = None) -> None:
        """Attach the Pareto front (table and picture) to the parent run and close it."""
        parent = self._require_parent()
        run_status = STUDY_RUN_STATUS.get(status.lower(), status.upper())
        if run_status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"study status must be one of {', '.join(STUDY_RUN_STATUS)}, got {status!r}")
        self.log_front(front, figure_path)
        self._log(parent, tags={STATUS_TAG: status.lower()})
        self.client.set_terminated(parent, status=run_status)

    def log_front(self, front: pd.DataFrame | None, figure_path: Path | None = None) -> None:
        """(Re)place the front's table and picture on the parent run; called as trials finish and at the end."""
        parent = self._require_parent()
        if front is not None:
            self.client.log_text(parent, front.to_csv(index=False), "pareto_front.csv")
        if figure_path is not None:
            self.client.log_artifact(parent, str(figure_path))

    def log_progress(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics of the whole study on the parent run at `step` (the number of finished trials)."""
        now = int(time.time() * 1000)
        self._log(self._require_parent(), metrics=[Metric(metric_name(k), float(v), now, int(step))
                                                   for k, v in metrics.items()])

    def parent_tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self._require_parent()).data.tags)

    def set_parent_tags(self, tags: Mapping[str, Any]) -> None:
        self._log(self._require_parent(), tags=tags)

    def mark_stale_runs(self, active_trials: Iterable[str] = ()) -> list[str]:
        """Close as KILLED every RUNNING child whose trial is neither in `active_trials` nor open in this process.

        After a driver crash its children stay RUNNING forever; a resume calls this once its own trials are known.
        Returns the run ids it closed.
        """
        parent = self._require_parent()
        active = set(active_trials) | (set(self._runs) - self._ended)
        stale = [run for run in self._search(f"tags.`{PARENT_ID_TAG}` = {_quoted(parent)} "
                                             "AND attributes.status = 'RUNNING'")
                 if run.data.tags.get(TRIAL_TAG) not in active]
        for run in stale:
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return [run.info.run_id for run in stale]

    # ----------------------------------------------------------------------- trials

    def _trial_run(self, trial_id: str):
        """The child run already tagged with the trial's id under this parent, or None."""
        parent = self._require_parent()
        query = f"tags.`{PARENT_ID_TAG}` = {_quoted(parent)} AND tags.`{TRIAL_TAG}` = {_quoted(trial_id)}"
        return next(self._search(query), None)

    def find_trial_run_id(self, trial_id: str) -> str | None:
        """The id of the trial's child run, None if it has none (yet)."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self._trial_run(trial_id)
        return None if found is None else found.info.run_id

    def is_trial_closed(self, trial_id: str) -> bool:
        """Whether `end_trial` closed the trial's run (perhaps under a driver that has since died)."""
        found = self._trial_run(trial_id)
        return found is not None and found.info.status != "RUNNING" and STATUS_TAG in found.data.tags

    def trial_run_id(self, trial_id: str, params: Mapping[str, Any] | None = None, optuna_number: int | None = None
                     ) -> str:
        """The trial's child run: the one already tagged with its id under this parent, else a new one with `params`
        (tagged with the Ray trial id and, where the search asked for it, the Optuna trial number)."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        parent = self._require_parent()
        found = self._trial_run(trial_id)
        if found is not None:
            run_id = found.info.run_id
            if found.info.status != "RUNNING":   # resumed after a crash (KILLED) or retried after an error
                self.client.update_run(run_id, status="RUNNING")
        else:
            name = trial_run_name(params, self.searched) if params and "g2.gate_mode" in params else trial_id
            tags = {PARENT_ID_TAG: parent, TRIAL_TAG: trial_id, STUDY_TAG: self.study_name, ROLE_TAG: TRIAL_ROLE}
            if optuna_number is not None:
                tags[OPTUNA_TRIAL_TAG] = str(optuna_number)
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
            self._log(run_id, params=param_values(params or {}))
        self._runs[trial_id] = run_id
        self._ended.discard(trial_id)
        return run_id

    def log_epoch(self, trial_id: str, report: EpochReport) -> None:
        """Log the measurements of one report at its epoch (the step)."""
        values = valid_metrics(report.metrics())
        if not values:
            return
        now, step = int(time.time() * 1000), int(report.epoch or 0)
        self._log(self.trial_run_id(trial_id), metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def end_trial(self, end: TrialEnd) -> None:
        """Attach the compression table and gate histograms, tag the status and close the trial's child run.

        Its metrics are logged already: every report, the last one too, reached `log_epoch` as it came.
        """
        run_id = self.trial_run_id(end.trial_id)
        last = end.last
        if last is not None and last.sweep:
            table = [row.to_dict() for row in last.sweep]
            self.client.log_text(run_id, pd.DataFrame(table).to_csv(index=False), "compression_table.csv")
            self.client.log_text(run_id, json.dumps(json_safe(table), indent=1), "compression_table.json")
        if last is not None and last.gate_histograms:
            self.client.log_text(run_id, json.dumps(json_safe(last.gate_histograms)), "gate_histograms.json")
        tags: dict[str, Any] = {STATUS_TAG: end.status}
        if end.training_key:
            tags |= {TRAINING_KEY_TAG: end.training_key, MODEL_TAG: REUSED if end.reused else TRAINED}
            name = self.client.get_run(run_id).info.run_name or end.trial_id
            if end.reused and not name.endswith(REUSED_SUFFIX):   # it re-scored a stored model: say so in its name
                self.client.update_run(run_id, name=name + REUSED_SUFFIX)
        if end.error:
            tags[ERROR_TAG] = end.error
            self.client.log_text(run_id, str(end.error), "error.txt")   # the tag is cut at 8000 characters
        self._log(run_id, tags=tags)
        self.client.set_terminated(run_id, status=TRIAL_RUN_STATUS[end.status])
        self._ended.add(end.trial_id)


def open_tracker(cfg: StudyConfig, root: str | Path) -> StudyTracker:
    """The tracker of the study in `root`, on its configured (or default, in-directory) MLflow store."""
    paths = StudyPaths(Path(root))
    return StudyTracker(paths.tracking_uri(cfg), experiment=cfg.name, study_name=cfg.name,
                        artifact_location=paths.artifact_location(cfg),
                        searched=tuple(p.name for p in cfg.search_space()))
