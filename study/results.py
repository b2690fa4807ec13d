"""The study's results: one Parquet file per trial, rewritten whole, so a resume neither loses nor duplicates rows.

Layout of a study directory (a local path or any URI `pyarrow.fs.FileSystem.from_uri` understands, e.g. s3://…):

    <study_dir>/results/<trial_id>.parquet   one row per (trial, compression setting) of the trial's sweep
    <study_dir>/curves/<trial_id>.parquet    one row per epoch
    <study_dir>/gates/<trial_id>.parquet     one row per (layer, gate, bin) of the trial's last gate histograms

Column names are the names the trainable reports (`trainables/trainable.py`) and the flat TrialConfig knobs (`g2.tau`),
so Parquet, MLflow and the search space cannot drift apart. Every file is cast to one explicit schema derived from the
TrialConfig dataclasses; only the gate-saturation columns (`gate_l{k}_{i|f}_{lt01|gt09}`) of results and curves vary,
with the number of layers, and are float64 wherever they appear.

Every file is written beside its final name under a name starting with '.', which readers skip, and renamed into
place (an object store publishes an upload whole by itself), so a killed writer leaves the previous file whole. A
file damaged anyway (a bad copy, a disk fault) is a `CorruptFileError` naming it, never a silently shorter table.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.filters import filter_table
from trainables.config import CompressConfig, TrialConfig

log = logging.getLogger(__name__)

STATUSES = ("ok", "pruned", "diverged", "error")
RESULTS_DIR, CURVES_DIR, GATES_DIR = "results", "curves", "gates"
GATE_COLUMN = re.compile(r"^gate_l(\d+)_([if])_(lt01|gt09)$")
HISTOGRAM_KEY = re.compile(r"^l(\d+)_([if])$")   # the keys of a report's `gate_histograms`
SETTING_KNOBS = ("compress.rank", "compress.bits", "compress.paper")   # per row: the sweep point, not the trial's

_IDENTITY = {"study": pa.string(), "trial_id": pa.string(), "status": pa.string(), "error": pa.string(),
             "task": pa.string(), "metric_name": pa.string(), "finished_at": pa.timestamp("us", tz="UTC"),
             "device": pa.string(), "node_id": pa.string(), "training_key": pa.string(),
             "reused_checkpoint": pa.bool_()}   # node_id: the Ray node that ran the trial's last report
_SETTING = {"method": pa.string(), "is_trial_setting": pa.bool_(), "epoch": pa.int64(), "best_epoch": pa.int64(),
            "wall_time_s": pa.float64()}
_METRICS = {"val_metric": pa.float64(), "test_metric": pa.float64(),
            "val_loss": pa.float64(), "test_loss": pa.float64(),
            "uncompressed_val_metric": pa.float64(), "uncompressed_test_metric": pa.float64(),
            "gate_params": pa.int64(), "gate_bits": pa.int64(), "model_params": pa.int64(), "model_bits": pa.int64(),
            "gate_compression": pa.float64(), "model_compression": pa.float64(), "relative_error": pa.float64()}
_CURVES = {"study": pa.string(), "trial_id": pa.string(), "epoch": pa.int64(), "train_loss": pa.float64(),
           "val_loss": pa.float64(), "val_metric": pa.float64(), "compressed_val_metric": pa.float64(),
           "gate_compression": pa.float64(), "epoch_time_s": pa.float64(), "train_time_s": pa.float64()}
_GATES = {"study": pa.string(), "trial_id": pa.string(), "g2.gate_mode": pa.string(), "epoch": pa.int64(),
          "layer": pa.int64(), "gate": pa.string(), "bin": pa.int64(), "fraction": pa.float64()}
_SWEEP_KEYS = ("method", "is_trial_setting", "val_metric", "test_metric", "val_loss", "test_loss", "gate_params",
               "gate_bits", "model_params", "model_bits", "gate_compression", "model_compression", "relative_error")


# --------------------------------------------------------------------------- schemas

def _arrow_type(name: str, hint: Any) -> pa.DataType:
    """The Arrow type of one dataclass annotation; a new kind of knob must be mapped here, not guessed."""
    if hint is bool:
        return pa.bool_()
    if hint is int:
        return pa.int64()
    if hint is float:
        return pa.float64()
    if hint is str or (get_origin(hint) is Literal and all(isinstance(a, str) for a in get_args(hint))):
        return pa.string()
    if get_origin(hint) is tuple:
        return pa.list_(_arrow_type(f"{name}[]", get_args(hint)[0]))
    raise TypeError(f"no Arrow type for knob {name!r} annotated {hint!r}")


def knob_types(cls: type = TrialConfig, prefix: str = "") -> dict[str, pa.DataType]:
    """Flat knob name -> Arrow type, from the dataclass annotations (the same walk as `TrialConfig.to_flat`)."""
    hints = get_type_hints(cls)
    out: dict[str, pa.DataType] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out |= knob_types(hint, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = _arrow_type(prefix + f.name, hint)
    return out


def _gate_sort_key(name: str) -> tuple:
    """Layer 10 after layer 9, not after layer 1."""
    m = GATE_COLUMN.match(name)
    return (0, int(m.group(1)), "if".index(m.group(2)), m.group(3) == "gt09") if m else (1, 0, 0, name)


def _with_extras(base: Mapping[str, pa.DataType], extra_columns: Iterable[str], *, saturation: bool = True
                 ) -> pa.Schema:
    """`base`, then the gate-saturation columns among `extra_columns` (if the dataset has them); others are refused."""
    extras = set(extra_columns) - set(base)
    unknown = sorted(n for n in extras if not (saturation and GATE_COLUMN.match(n)))
    if unknown:
        also = " and gate_l{k}_{i|f}_{lt01|gt09}" if saturation else ""
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; columns are {', '.join(base)}{also}")
    return pa.schema([*base.items(), *((name, pa.float64()) for name in sorted(extras, key=_gate_sort_key))])


def results_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """Identity, every TrialConfig knob, the row's setting and metrics, then `extra_columns` (gate saturation)."""
    knobs = {k: t for k, t in knob_types().items() if k not in _IDENTITY}   # `task` is an identity column too
    return _with_extras({**_IDENTITY, **knobs, **_SETTING, **_METRICS}, extra_columns)


def curves_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """One row per epoch; `extra_columns` (gate saturation) as float64."""
    return _with_extras(_CURVES, extra_columns)


def gates_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """One row per (layer, gate, bin) of a trial's gate histograms; the dataset takes no extra columns."""
    return _with_extras(_GATES, extra_columns, saturation=False)


# --------------------------------------------------------------------------- rows

def gate_columns(report: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (report or {}).items() if GATE_COLUMN.match(k)}


def _knobs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat config minus study-private `_` keys; tuples become lists for Arrow, numpy scalars plain Python."""
    known = knob_types()
    out = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in known:
            log.warning("config key %r is not a TrialConfig knob; it is not recorded in the results", key)
            continue
        if hasattr(value, "item") and not isinstance(value, (list, tuple)):
            value = value.item()
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def trial_status(last_report: Mapping[str, Any] | None, error: str | None = None) -> str:
    """A finished trial's status: `error` if it raised, `diverged` if it said so, `ok` only with a sweep, else `pruned`.

    A trial stopped before its last epoch (a scheduler, a stopper) has no sweep; calling it `ok` would let a truncated
    model into a front.
    """
    if error is not None:
        return "error"
    if last_report and last_report.get("status") == "diverged":
        return "diverged"
    return "ok" if last_report and last_report.get("sweep") else "pruned"


def trial_rows(study: str, trial_id: str, config: Mapping[str, Any], last_report: Mapping[str, Any] | None, *,
               status: str, error: str | None, finished_at: datetime) -> list[dict[str, Any]]:
    """The results rows of one finished trial: one per sweep point if `ok`, else a single row.

    Args:
        config: the flat trial config (`TrialConfig.to_flat()` keys); `_`-prefixed study keys are dropped.
        last_report: the trial's last report (with `sweep` when ok), or None if it never reported.
        finished_at: a timezone-aware time; a naive one would silently be local time in a UTC column.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if finished_at.tzinfo is None:
        raise ValueError("finished_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    report = dict(last_report or {})
    knobs = _knobs(config)
    base = {**knobs, "study": study, "trial_id": trial_id, "status": status, "finished_at": finished_at,
            "error": error if error is not None else (report.get("error") if status != "ok" else None),
            **{k: report.get(k) for k in ("metric_name", "device", "node_id", "training_key", "epoch", "best_epoch")},
            "reused_checkpoint": bool(report.get("reused_checkpoint", False)) if report else None,
            "wall_time_s": report.get("train_time_s"), **gate_columns(report)}
    base["task"] = knobs.get("task", report.get("task"))

    if status == "ok":
        sweep = report.get("sweep")
        if not sweep:
            raise ValueError(f"trial {trial_id}: an ok trial's last report must carry its `sweep`")
        plain = next((r for r in sweep if r["method"] == "none"), {})
        uncompressed = {"uncompressed_val_metric": plain.get("val_metric"),
                        "uncompressed_test_metric": plain.get("test_metric")}
        return [{**base, **uncompressed, **{k: r[k] for k in SETTING_KNOBS}, **{k: r.get(k) for k in _SWEEP_KEYS}}
                for r in sweep]

    # One row at the trial's own setting. Its metrics are the last epoch's where known (a failure has none):
    # the report's compressed metric is this row's metric, its plain val metric the uncompressed one.
    row = {**base, "is_trial_setting": True}
    try:
        row["method"] = CompressConfig(**{k.split(".")[1]: knobs[k] for k in SETTING_KNOBS if k in knobs}).method
    except (TypeError, ValueError):   # the very setting may be what made the trial fail
        row["method"] = None
    if status != "error":
        row |= {"val_metric": report.get("compressed_val_metric"), "uncompressed_val_metric": report.get("val_metric"),
                **{k: report.get(k) for k in ("gate_params", "gate_bits", "model_params", "model_bits",
                                              "gate_compression", "model_compression", "relative_error")}}
        if row["method"] == "none":   # the reported val_loss is the uncompressed model's: only then this row's
            row["val_loss"] = report.get("val_loss")
    else:   # how far it got is known; what it measured is not
        row |= {k: None for k in gate_columns(report)}
    return [row]


def curve_rows(study: str, trial_id: str, reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch reported, the last report of an epoch winning (a trial re-entered at its end says it again).

    A reused checkpoint did not train, so it has no curve.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for report in reports:
        if report.get("epoch") is None or report.get("reused_checkpoint"):
            continue
        row = {k: report.get(k) for k in _CURVES if k not in ("study", "trial_id")}
        by_epoch[int(report["epoch"])] = {"study": study, "trial_id": trial_id, **row, **gate_columns(report)}
    return [by_epoch[e] for e in sorted(by_epoch)]


def gate_rows(study: str, trial_id: str, config: Mapping[str, Any], report: Mapping[str, Any] | None
              ) -> list[dict[str, Any]]:
    """The tidy rows of one report's `gate_histograms` (layer, i before f, bin); none if it carries none.

    `fraction` is the share of the layer's gate values in bin `bin` of the equal bins on [0, 1] (DESIGN §2).
    """
    histograms = (report or {}).get("gate_histograms")
    if not histograms:
        return []
    keys = {}
    for key in histograms:
        if not (match := HISTOGRAM_KEY.match(key)):
            raise ValueError(f"gate histogram key {key!r} is not of the form l<k>_i or l<k>_f")
        keys[key] = (int(match[1]), "if".index(match[2]))
    base = {"study": study, "trial_id": trial_id, "g2.gate_mode": config.get("g2.gate_mode"),
            "epoch": report.get("epoch")}
    return [{**base, "layer": keys[key][0], "gate": key[-1], "bin": b, "fraction": float(fraction)}
            for key in sorted(keys, key=keys.get) for b, fraction in enumerate(histograms[key])]


# --------------------------------------------------------------------------- files

def _filesystem(study_dir: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path on it; plain (even relative) paths are local."""
    text = os.fspath(study_dir)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    return pafs.FileSystem.from_uri(text)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast to `schema` (missing columns null); columns outside it (from an older config) are kept after it."""
    arrays, fields = [], []
    for field in schema:
        if field.name in table.column_names:
            arrays.append(table[field.name].cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
        fields.append(field)
    for name in table.column_names:
        if name not in schema.names:
            arrays.append(table[name])
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _to_table(rows: Sequence[Mapping[str, Any]], schema_fn) -> pa.Table:
    """`schema_fn(every column named in rows)` refuses the unknown ones, so a typo is an error, not a new column."""
    return pa.Table.from_pylist([dict(row) for row in rows], schema=schema_fn({k for row in rows for k in row}))


def _write(study_dir: str | os.PathLike, sub: str, trial_id: str, table: pa.Table) -> str:
    """Write `<study_dir>/<sub>/<trial_id>.parquet` whole: readers see the old file or the new one, never half."""
    if not trial_id or "/" in trial_id or "\\" in trial_id or trial_id.startswith("."):
        raise ValueError(f"trial_id must be a plain file name, got {trial_id!r}")
    fs, root = _filesystem(study_dir)
    folder = f"{root.rstrip('/')}/{sub}"
    fs.create_dir(folder, recursive=True)
    final = f"{folder}/{trial_id}.parquet"
    if fs.type_name in ("s3", "gcs", "abfs"):
        # An object store publishes an upload atomically, and its "move" is a copy and a delete: write in place.
        pq.write_table(table, final, filesystem=fs)
        return final
    temp = f"{folder}/.{trial_id}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temp, filesystem=fs)
        fs.move(temp, final)
    finally:
        if _exists(fs, temp):
            fs.delete_file(temp)
    return final


def write_trial(study_dir: str | os.PathLike, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """(Re)write the results file of one trial; returns its path on the study's filesystem."""
    return _write(study_dir, RESULTS_DIR, trial_id, _to_table(rows, results_schema))


def write_curves(study_dir: str | os.PathLike, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """(Re)write the curves file of one trial; returns its path on the study's filesystem."""
    return _write(study_dir, CURVES_DIR, trial_id, _to_table(rows, curves_schema))


def write_gates(study_dir: str | os.PathLike, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """(Re)write the gate-histogram file of one trial; returns its path on the study's filesystem."""
    return _write(study_dir, GATES_DIR, trial_id, _to_table(rows, gates_schema))


class CorruptFileError(ValueError):
    """A file of the study's datasets that Parquet cannot read: truncated, damaged, or not Parquet at all."""


def _read_file(fs: pafs.FileSystem, path: str) -> pa.Table:
    """One whole trial file, or a CorruptFileError naming it (pyarrow's own message does not say which file)."""
    try:
        return pq.read_table(path, filesystem=fs)
    except (pa.ArrowException, OSError) as err:
        raise CorruptFileError(f"cannot read {path}: {err}; if it is truncated or corrupt, move it aside "
                               "(its trial's rows are lost) to read the rest of the study") from err


def _read_all(study_dir: str | os.PathLike, sub: str, schema_fn) -> pa.Table:
    """Every trial file of `sub`, schemas unified (files differ in their gate columns), in one table."""
    fs, root = _filesystem(study_dir)
    selector = pafs.FileSelector(f"{root.rstrip('/')}/{sub}", allow_not_found=True)
    paths = sorted(info.path for info in fs.get_file_info(selector)
                   if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                   and not info.base_name.startswith("."))   # `.…tmp`: a write in progress
    tables = [_read_file(fs, p) for p in paths]
    names = {n for t in tables for n in t.column_names}
    schema = schema_fn(n for n in names if GATE_COLUMN.match(n))
    if not tables:
        return schema.empty_table()
    return _conform(pa.concat_tables(tables, promote_options="permissive"), schema)


_PANDAS_TYPES = {pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype(), pa.int64(): pd.Int64Dtype(),
                 pa.bool_(): pd.BooleanDtype()}


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Nullable dtypes throughout (string, Int64, boolean; pd.NA for missing), float64 with NaN, lists as tuples."""
    df = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    for field in table.schema:
        if pa.types.is_list(field.type):   # hashable, like the dataclass tuples they came from
            df[field.name] = [None if v is None else tuple(v.tolist()) for v in df[field.name]]
    return df


def _select(df: pd.DataFrame, columns: Sequence[str] | None, status: str | Sequence[str] | None) -> pd.DataFrame:
    if status is not None:
        wanted = [status] if isinstance(status, str) else list(status)
        bad = sorted(set(wanted) - set(STATUSES))
        if bad:
            raise ValueError(f"status must be among {', '.join(STATUSES)}, got {', '.join(map(repr, bad))}")
        df = df[df["status"].isin(wanted).fillna(False).astype(bool)]
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"unknown column(s) {', '.join(missing)}")
        df = df[list(columns)]
    return df.reset_index(drop=True)


def load(study_dir_or_uri: str | os.PathLike, *, filters: str | None = None, columns: Sequence[str] | None = None,
         status: str | Sequence[str] | None = None) -> pd.DataFrame:
    """All results rows of a study, sorted by trial_id, method and setting; an empty frame if there are none.

    Args:
        filters: a condition in the language of `study.filters` (no code runs), e.g.
            "status == 'ok' and g2.tau < 0.5 and method in ['svd', 'quant']"; a name that is not a plain dotted
            identifier goes in backquotes. An unknown column or construct is a `study.filters.FilterError`.
        columns: the columns to return, in that order (filters may still use any column).
        status: keep only these statuses (`ok`, `pruned`, `diverged`, `error`).

    Strings are pandas `string`, ints `Int64` and bools `boolean` (all with pd.NA for missing), floats float64 (NaN),
    `finished_at` datetime64[us, UTC], list knobs (`sweep.ranks`) tuples.
    """
    df = _to_pandas(filter_table(_read_all(study_dir_or_uri, RESULTS_DIR, results_schema), filters))
    df = df.sort_values(["trial_id", "method", *SETTING_KNOBS], kind="stable", na_position="first")
    return _select(df, columns, status)


def load_curves(study_dir_or_uri: str | os.PathLike, *, filters: str | None = None,
                columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All per-epoch rows of a study, sorted by trial_id and epoch; `filters` / `columns` as in `load`."""
    df = _to_pandas(filter_table(_read_all(study_dir_or_uri, CURVES_DIR, curves_schema), filters))
    return _select(df.sort_values(["trial_id", "epoch"], kind="stable"), columns, None)


def load_gates(study_dir_or_uri: str | os.PathLike, *, filters: str | None = None) -> pd.DataFrame:
    """All gate-histogram rows of a study (trial_id, then layer, i before f, bin); `filters` as in `load`.

    One histogram set per trial, from the last report that carried one (the final epoch of a finished trial); a trial
    that reused a trained model has none. Join with `load(...)` on trial_id for its status and other knobs.
    """
    df = _to_pandas(filter_table(_read_all(study_dir_or_uri, GATES_DIR, gates_schema), filters))
    return _select(df.sort_values("trial_id", kind="stable"), None, None)


# --------------------------------------------------------------------------- the driver's recorder

class ResultsWriter:
    """Records a study from a Ray Tune driver callback: curves after every report, results and gates at the end.

    Everything is keyed by trial id and rewritten whole, so calling it again for a trial (a resume) replaces that
    trial's rows instead of adding to them.
    """

    def __init__(self, study_dir: str | os.PathLike, study: str):
        self.study_dir, self.study = study_dir, study
        self._curves: dict[str, dict[int, dict[str, Any]]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._histograms: dict[str, dict[str, Any]] = {}   # the last report carrying `gate_histograms`

    def _known_curve(self, trial_id: str) -> dict[int, dict[str, Any]]:
        """Epochs already on disk: after a driver restart a resumed trial reports only the epochs it has left."""
        if trial_id not in self._curves:
            fs, path = self._path(CURVES_DIR, trial_id)
            rows = _read_file(fs, path).to_pylist() if _exists(fs, path) else []
            self._curves[trial_id] = {int(r["epoch"]): r for r in rows}
        return self._curves[trial_id]

    def _path(self, sub: str, trial_id: str) -> tuple[pafs.FileSystem, str]:
        fs, root = _filesystem(self.study_dir)
        return fs, f"{root.rstrip('/')}/{sub}/{trial_id}.parquet"

    def recorded_rows(self, trial_id: str) -> list[dict[str, Any]] | None:
        """The results rows of a trial whose end is recorded already, e.g. by a driver that has since died; else None.

        Tune runs again a trial that ended just before its driver died (from its last checkpoint, or from scratch if
        it had none); its recorded end is what Optuna was told, so it stands.
        """
        fs, path = self._path(RESULTS_DIR, trial_id)
        return _read_file(fs, path).to_pylist() if _exists(fs, path) else None

    def record_report(self, trial_id: str, config: Mapping[str, Any], report: Mapping[str, Any]) -> None:
        """Keep the report and rewrite the trial's curves file."""
        self._last[trial_id] = dict(report)
        if report.get("gate_histograms"):
            self._histograms[trial_id] = self._last[trial_id]
        curve = self._known_curve(trial_id)
        for row in curve_rows(self.study, trial_id, [report]):
            curve[row["epoch"]] = row
        if curve:
            write_curves(self.study_dir, trial_id, [curve[e] for e in sorted(curve)])

    def record_end(self, trial_id: str, config: Mapping[str, Any], error: str | None = None, *,
                   finished_at: datetime | None = None) -> list[dict[str, Any]]:
        """Write the trial's results file from its last report, and its gates file; returns the results rows written.

        The status follows from `error` (the trial raised) and the last report (`trial_status`): a trial that returned
        without a sweep was stopped early (`pruned`). The gates file comes from the last report that carried
        histograms (a diverged trial's from its last good epoch); a reused model reported none: no file.
        """
        last = self._last.get(trial_id)
        status = trial_status(last, error)
        rows = trial_rows(self.study, trial_id, config, last, status=status, error=error,
                          finished_at=finished_at or datetime.now(timezone.utc))
        write_trial(self.study_dir, trial_id, rows)
        if trial_id in self._histograms:
            write_gates(self.study_dir, trial_id, gate_rows(self.study, trial_id, config, self._histograms[trial_id]))
        return rows


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound
