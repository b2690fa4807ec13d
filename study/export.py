"""`g2-study export`: one scored row of a study as a packed model, logged to the trial's MLflow run; and `--check`.

    g2-study export NAME (--trial ID | --where EXPR | --knee) [--rank R] [--bits B] [--method M]
                    [--eval-gate G] --output DIR [--storage DIR] [--register MODEL] [--no-mlflow]
    g2-study export --check DIR

The row: the ok rows of the study, narrowed by the trial (its own setting unless a setting flag is given), the
filter, or the knee of the study's front (`analysis.pareto.knee_point`, over the rows the setting flags leave), then
by the setting flags; rows of trials that re-scored the same stored model under the same setting are one model. It
must come to exactly one row: several are an error that lists them. The model is read from the study's model store
and written by `trainables.export`; in MLflow it becomes a logged model of the trial's child run (pyfunc flavour,
loaded by `trainables.serving`, with the manifest as metadata), in the study's artifact store: the server's, for a
study tracked by one.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from study import results
from study.config import DEFAULT_STORAGE, StudyConfig
from study.front import front_objectives, study_front
from study.mlflow_values import code_version, json_safe
from study.paths import StudyPaths, read_state
from study.preflight import check_tracking_access
from trainables.config import EVAL_GATES, ROUND_MODES, TrialConfig
from trainables.report import (
    ACCOUNTING,
    EVAL_GATE,
    FINISHED_AT,
    IS_TRIAL_SETTING,
    METHOD,
    OK,
    TEST_LOSS,
    TEST_METRIC,
    TRAINING_KEY,
    TRIAL_ID,
    VAL_LOSS,
    VAL_METRIC,
    Accounting,
)

log = logging.getLogger(__name__)
METHODS = ("none", "svd", "quant", "svd+quant", *ROUND_MODES)
SHOWN = [TRIAL_ID, "g2.gate_mode", METHOD, "compress.rank", "compress.bits", EVAL_GATE, "gate_bits", VAL_METRIC]
RELATIVE_TOLERANCE = 1e-4          # `--check`: the re-scored metrics against the row's
EXPORT_TAG = "g2.export.model_id"  # on the trial's run: its latest exported model


@dataclass(frozen=True)
class Selection:
    """Which row to export: one of trial / where / knee, narrowed by the setting flags."""

    trial: str | None = None
    where: str | None = None
    knee: bool = False
    rank: int | None = None
    bits: int | None = None
    method: str | None = None
    eval_gate: str | None = None

    def __post_init__(self):
        if sum([self.trial is not None, self.where is not None, self.knee]) != 1:
            raise ValueError("name the row with exactly one of --trial ID, --where EXPR, --knee")
        if self.rank is not None and not 0 <= self.rank <= 65536:
            raise ValueError(f"--rank must be an integer in [0, 65536] (0: full rank), got {self.rank}")
        if self.bits is not None and not (1 <= self.bits <= 16 or self.bits == 32):
            raise ValueError(f"--bits must be an integer in [1, 16] or 32 (full precision), got {self.bits}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.eval_gate is not None and self.eval_gate not in EVAL_GATES:
            raise ValueError(f"--eval-gate must be one of {', '.join(EVAL_GATES)}, got {self.eval_gate!r}")

    @property
    def narrows_setting(self) -> bool:
        return any(v is not None for v in (self.rank, self.bits, self.method, self.eval_gate))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `export` subcommand of `g2-study`."""
    p = sub.add_parser("export", help="write one scored row's model in its compressed form, log it to MLflow; "
                                      "or --check an export", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help="the study (not with --check)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--trial", metavar="ID", help="a trial: its own setting, or the one the setting flags name")
    pick.add_argument("--where", metavar="EXPR", help="a filter of the results (`g2-study results --where`)")
    pick.add_argument("--knee", action="store_true", help="the knee of the study's front (analysis.pareto)")
    pick.add_argument("--check", metavar="DIR", type=Path, help="re-score an export; print its and its row's metrics")
    p.add_argument("--rank", type=int, metavar="R", help="the row's compress.rank")
    p.add_argument("--bits", type=int, metavar="B", help="the row's compress.bits")
    p.add_argument("--method", choices=METHODS, help="the row's method")
    p.add_argument("--eval-gate", choices=EVAL_GATES, help="the row's evaluation gates (hard: binary i/f gates)")
    p.add_argument("--output", type=Path, metavar="DIR", help="the directory to write (new or empty)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, metavar="DIR", help="where studies live (default: ./studies)")
    p.add_argument("--register", metavar="MODEL", help="also register it in MLflow's model registry under MODEL")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    p.add_argument("--low-rank", choices=("dense", "factored"), default="dense",
                   help="--check: run low-rank blocks dense (fused LSTM) or as their two factors")


def run(args: argparse.Namespace) -> int:
    """`g2-study export`; a ValueError for bad input (the CLI prints it and exits 2)."""
    if args.check is not None:
        if args.name or args.output or args.register:
            raise ValueError("--check DIR takes no study name, --output or --register")
        return check(args.check, low_rank=args.low_rank)
    if not args.name:
        raise ValueError("name the study: g2-study export NAME (--trial ID | --where EXPR | --knee) --output DIR")
    if args.output is None:
        raise ValueError("--output DIR is required: the directory the export is written to")
    selection = Selection(trial=args.trial, where=args.where, knee=args.knee, rank=args.rank, bits=args.bits,
                          method=args.method, eval_gate=args.eval_gate)
    paths = StudyPaths.named(args.storage, args.name)
    cfg = StudyConfig.from_json(read_state(paths).config)
    if not args.no_mlflow:
        check_tracking_access(paths.tracking_uri(cfg))   # before the files are written, not after
    row = select_row(str(paths.root), cfg, selection)
    manifest = export_row(paths, row, args.output)
    print(summary(row, manifest, args.output))
    if not args.no_mlflow:
        logged = log_export(cfg, paths, row, args.output, manifest, args.register)
        print(f"  MLflow: logged model {logged['model_id']} ({logged['uri']}) on run {logged['run_id']}"
              + (f", registered as {args.register} version {logged['version']}" if args.register else ""))
    print(f"  check it: g2-study export --check {args.output}")
    return 0


# --------------------------------------------------------------------------- the row

def select_row(study_dir: str, cfg: StudyConfig, selection: Selection) -> pd.Series:
    """The one ok row `selection` names; a ValueError listing the candidates when it names none or several."""
    df = results.load(study_dir, filters=selection.where, status=OK)
    if df.empty:
        raise ValueError(f"study {cfg.name} has no ok row" + (f" matching {selection.where!r}" if selection.where
                                                              else ""))
    if selection.trial is not None:
        df = df[df[TRIAL_ID] == selection.trial]
        if df.empty:
            raise ValueError(f"study {cfg.name} has no ok trial {selection.trial!r}")
        if not selection.narrows_setting:
            df = df[df[IS_TRIAL_SETTING].fillna(False).astype(bool)]
    for column, value in (("compress.rank", selection.rank), ("compress.bits", selection.bits),
                          (METHOD, selection.method), (EVAL_GATE, selection.eval_gate)):
        if value is not None:
            df = df[(df[column] == value).fillna(False).astype(bool)]
    from analysis.pareto import knee_point, same_model_columns

    df = df.sort_values([FINISHED_AT, TRIAL_ID], kind="stable").drop_duplicates(same_model_columns(df))
    if selection.knee and not df.empty:
        objectives = front_objectives(cfg)
        if len(objectives) != 2:
            raise ValueError(f"--knee needs a study of two objectives; {cfg.name} has {len(objectives)}: "
                             "name the row with --trial or --where")
        front = study_front(df, cfg)
        df = front.loc[[knee_point(front, objectives)]]
    if len(df) != 1:
        listing = df[[c for c in SHOWN if c in df.columns]].head(20).to_string(index=False)
        more = f"\n(and {len(df) - 20} more)" if len(df) > 20 else ""
        raise ValueError(f"{'no row matches' if df.empty else f'{len(df)} rows match'}; narrow it with --trial, "
                         f"--rank, --bits, --method, --eval-gate" + (f":\n{listing}{more}" if len(df) else ""))
    return df.iloc[0]


def row_config(row: pd.Series) -> TrialConfig:
    """The row's trial config with the row's own setting (`compress.*`, `g2.eval_gate`)."""
    knobs = {k: row[k] for k in TrialConfig().to_flat() if k in row.index and not _missing(row[k])}
    return TrialConfig.from_flat(knobs)


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, (tuple, list, str)) and bool(pd.isna(value)))


def export_row(paths: StudyPaths, row: pd.Series, output: Path):
    """Write the row's model, read from the study's model store, to `output`; returns its `Manifest`."""
    import torch

    from trainables.export import Source, export_model
    from trainables.store import ModelStore
    from trainables.trainable import make_task

    cfg = row_config(row)
    key = str(row[TRAINING_KEY])
    store = ModelStore(paths.models)
    if store.meta(key) is None:
        raise ValueError(f"no stored model for training key {key} in {paths.models} (trial {row[TRIAL_ID]}): "
                         "the study's models/ directory is where its trained weights are kept")
    task = make_task(cfg, torch.device("cpu"))
    store.load(key, task.model)
    metrics = {k: float(row[k]) for k in (VAL_METRIC, TEST_METRIC, VAL_LOSS, TEST_LOSS)
               if k in row.index and not _missing(row[k])}
    recorded = {k: row[k].item() if hasattr(row[k], "item") else row[k] for k in ACCOUNTING
                if k in row.index and not _missing(row[k])}   # an older study's file may lack a later column
    source = Source(training_key=key, accounting=Accounting.from_dict(recorded),
                    metrics=metrics, study=str(row["study"]), trial_id=str(row[TRIAL_ID]), code=code_version())
    tokenizer = task.vocab if cfg.task == "lm" else task.data.sp
    return export_model(output, task.model, cfg, tokenizer, source)


def summary(row: pd.Series, manifest, output: Path) -> str:
    files = {p.name: p.stat().st_size for p in sorted(Path(output).iterdir())}
    tensors, accounted = manifest.sizes["tensors_file_bytes"], manifest.source.accounting.model_bits / 8
    metric = row.get("metric_name", "metric")
    paper = row["compress.paper"]
    setting = (f"{row[METHOD]} rank {row['compress.rank']} bits {row['compress.bits']}" if paper == "none"
               else f"{row[METHOD]} step {row['compress.rel_step']} × RMS" if paper.endswith("_rel")
               else f"{row[METHOD]} step {row['compress.step']}")
    return "\n".join([
        f"exported trial {row[TRIAL_ID]} ({row['g2.gate_mode']}, {setting}, {row[EVAL_GATE]} gates) to {output}",
        f"  model.safetensors {tensors:,} bytes = {tensors / accounted:.4f} × model_bits/8 ({accounted:,.0f}); "
        + ", ".join(f"{name} {size:,}" for name, size in files.items() if name != "model.safetensors"),
        f"  the row's val {metric} {row[VAL_METRIC]:.4f}, test {metric} {row[TEST_METRIC]:.4f}"])


def check(directory: Path, low_rank: str = "dense") -> int:
    """Re-score an export and print its metrics beside its row's; 0 when both agree to 1e-4 relative, else 1."""
    from trainables.export import read_manifest, rescore

    manifest = read_manifest(directory)
    scores = rescore(directory, low_rank=low_rank)
    metric = "ppl" if manifest.task == "lm" else "bleu"
    ok = True
    c = manifest.config
    print(f"{directory}: trial {manifest.source.trial_id} of study {manifest.source.study}: rank "
          f"{c['compress.rank']}, bits {c['compress.bits']}, paper {c['compress.paper']}, "
          f"{manifest.gates['eval_gate']} gates")
    for name, (measured, said) in scores.items():
        rel = abs(measured - said) / max(abs(said), 1e-12)
        ok &= rel <= RELATIVE_TOLERANCE
        split, what = name.split("_")
        print(f"  {split} {metric if what == 'metric' else 'loss'}: export {measured:.6f}, row {said:.6f} "
              f"(relative difference {rel:.1e}{'' if rel <= RELATIVE_TOLERANCE else ', more than 1e-4'})")
    return 0 if ok else 1


# --------------------------------------------------------------------------- MLflow

def log_export(cfg: StudyConfig, paths: StudyPaths, row: pd.Series, export_dir: Path, manifest,
               register: str | None = None) -> dict[str, Any]:
    """Log the export to the trial's child run as a pyfunc model (optionally registered); returns its ids and URI."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    from study.tracking import open_tracker

    tracker = open_tracker(cfg, paths.root)
    tracker.attach()
    run_id = tracker.find_trial_run_id(str(row[TRIAL_ID]))
    if run_id is None:
        raise ValueError(f"trial {row[TRIAL_ID]} has no MLflow run in study {cfg.name}'s store "
                         f"({tracker.tracking_uri}); export with --no-mlflow")
    client = tracker.client
    name = f"{cfg.task}-{row[METHOD]}-r{row['compress.rank']}-b{row['compress.bits']}-{row[EVAL_GATE]}"
    setting = {k: str(manifest.config[k]) for k in ("compress.rank", "compress.bits", "compress.paper",
                                                     "compress.step", "compress.clip", "compress.rel_step",
                                                     "compress.rel_clip", "compress.targets",
                                                     "g2.gate_mode", "g2.tau", "g2.p", "g2.eval_gate")}
    tags = {"g2.study": cfg.name, "g2.trial_id": str(row[TRIAL_ID]), "g2.training_key": manifest.source.training_key}
    try:
        model = client.create_logged_model(tracker.experiment_id, name=name.replace("+", "-"), source_run_id=run_id,
                                           params=setting, tags=tags, model_type="g2-lstm")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                local, loader_module="trainables.serving", data_path=str(export_dir),
                code_paths=[str(Path(__file__).resolve().parent.parent / "trainables")],
                signature=_signature(manifest.task), metadata=_metadata(manifest), pip_requirements=_requirements(),
                mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                                   model_id=model.model_id))
            for cache in local.rglob("__pycache__"):   # code_paths copied the package as it is installed
                shutil.rmtree(cache)
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, "READY")
        step = 0 if _missing(row.get("epoch")) else int(row["epoch"])
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        client.set_tag(run_id, EXPORT_TAG, model.model_id)
        version = None
        if register:
            try:
                client.create_registered_model(register)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # the artifact URI, not models:/<id>: a local SQLite registry resolves the latter through the global
            # tracking URI, which this client does not set
            version = client.create_model_version(register, source=model.artifact_location, run_id=run_id,
                                                  model_id=model.model_id, tags=tags).version
            # the logged model's link to its versions, which the UI reads: a server records it itself, a local
            # store does not (mlflow.register_model then adds it, as here)
            linked = json.loads(client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
            if not any((v["name"], str(v["version"])) == (register, str(version)) for v in linked):
                client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
                    [*linked, {"name": register, "version": version}])})
    except MlflowException as err:
        raise ValueError(f"MLflow at {tracker.tracking_uri} refused the export: {err}") from None
    return {"model_id": model.model_id, "uri": f"models:/{model.model_id}", "run_id": run_id,
            "artifact_location": model.artifact_location, "version": version}


def _signature(task: str):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = ([ColSpec("long", "tokens"), ColSpec("double", "nll"), ColSpec("double", "ppl")] if task == "lm"
               else [ColSpec("string", "translation")])
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))


def _metadata(manifest) -> dict[str, Any]:
    """The manifest without its per-tensor table (the full one is in the model's data/ folder)."""
    return json_safe({"task": manifest.task, "gates": manifest.gates, "sizes": manifest.sizes,
                      "tokenizer": manifest.tokenizer, "blocks": len(manifest.blocks),
                      "source": {**asdict(manifest.source), "accounting": asdict(manifest.source.accounting)},
                      "config": {k: list(v) if isinstance(v, tuple) else v for k, v in manifest.config.items()}})


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}"
            for package in ("torch", "safetensors", "sentencepiece", "pandas", "mlflow")]
