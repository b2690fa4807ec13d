"""The study's results: one Parquet file per trial, rewritten whole, so a resume neither loses nor duplicates rows.

Layout of a study directory (a local path or any URI `pyarrow.fs.FileSystem.from_uri` understands, e.g. s3://…):

    <study_dir>/results/<trial_id>.parquet   one row per (trial, compression setting) of the trial's sweep
    <study_dir>/curves/<trial_id>.parquet    one row per epoch
    <study_dir>/gates/<trial_id>.parquet     one row per (layer, gate, bin) of the trial's last gate histograms

Rows are made from the trials' typed reports (`study.results.rows`), every file is cast to one explicit schema
(`study.results.schema`), and the driver's callback records through `ResultsWriter`; this module owns the files and
reading them back.

Every file is written beside its final name under a name starting with '.', which readers skip, and renamed into
place (an object store publishes an upload whole by itself), so a killed writer leaves the previous file whole; on
a local disk the file and its directory are fsynced too (`trainables/durable.py`), so a power cut does as well. A
file damaged anyway (a bad copy, a disk fault) is a `CorruptFileError` naming it, never a silently shorter table.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.results.filters import filter_table
from study.results.rows import curve_rows, gate_rows
from study.results.schema import SETTING_KNOBS, curves_schema, gates_schema, results_schema
from trainables.durable import writing
from trainables.report import METHOD, STATUS, STATUSES, TRIAL_ID, EpochReport, is_gate_column

log = logging.getLogger(__name__)
RESULTS_DIR, CURVES_DIR, GATES_DIR = "results", "curves", "gates"


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
    if fs.type_name == "local":   # fsynced, renamed, the directory fsynced: whole after a power cut too
        with writing(final) as temp:
            pq.write_table(table, str(temp), filesystem=fs)
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
    schema = schema_fn(n for n in names if is_gate_column(n))
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
        df = df[df[STATUS].isin(wanted).fillna(False).astype(bool)]
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
        filters: a condition in the language of `study.results.filters` (no code runs), e.g.
            "status == 'ok' and g2.tau < 0.5 and method in ['svd', 'quant']"; a name that is not a plain dotted
            identifier goes in backquotes. An unknown column or construct is a `study.results.filters.FilterError`.
        columns: the columns to return, in that order (filters may still use any column).
        status: keep only these statuses (`ok`, `pruned`, `diverged`, `error`).

    Strings are pandas `string`, ints `Int64` and bools `boolean` (all with pd.NA for missing), floats float64 (NaN),
    `finished_at` datetime64[us, UTC], list knobs (`sweep.ranks`) tuples.
    """
    df = _to_pandas(filter_table(_read_all(study_dir_or_uri, RESULTS_DIR, results_schema), filters))
    df = df.sort_values([TRIAL_ID, METHOD, *SETTING_KNOBS], kind="stable", na_position="first")
    return _select(df, columns, status)


def load_curves(study_dir_or_uri: str | os.PathLike, *, filters: str | None = None,
                columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All per-epoch rows of a study, sorted by trial_id and epoch; `filters` / `columns` as in `load`."""
    df = _to_pandas(filter_table(_read_all(study_dir_or_uri, CURVES_DIR, curves_schema), filters))
    return _select(df.sort_values([TRIAL_ID, "epoch"], kind="stable"), columns, None)


def load_gates(study_dir_or_uri: str | os.PathLike, *, filters: str | None = None) -> pd.DataFrame:
    """All gate-histogram rows of a study (trial_id, then layer, i before f, bin); `filters` as in `load`.

    One histogram set per trial, from the last report that carried one (the final epoch of a finished trial); a trial
    that reused a trained model has none. Join with `load(...)` on trial_id for its status and other knobs.
    """
    df = _to_pandas(filter_table(_read_all(study_dir_or_uri, GATES_DIR, gates_schema), filters))
    return _select(df.sort_values(TRIAL_ID, kind="stable"), None, None)


# --------------------------------------------------------------------------- the driver's recorder

class ResultsWriter:
    """Records a study from a Ray Tune driver callback: curves after every report, results and gates at the end.

    Everything is keyed by trial id and rewritten whole, so calling it again for a trial (a resume) replaces that
    trial's rows instead of adding to them.
    """

    def __init__(self, study_dir: str | os.PathLike, study: str):
        self.study_dir, self.study = study_dir, study
        self._curves: dict[str, dict[int, dict[str, Any]]] = {}
        self._histograms: dict[str, EpochReport] = {}   # the last report carrying `gate_histograms`

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

    def record_report(self, trial_id: str, config: Mapping[str, Any], report: EpochReport) -> None:
        """Rewrite the trial's curves file with one more report; keep its gate histograms for the end."""
        if report.gate_histograms:
            self._histograms[trial_id] = report
        curve = self._known_curve(trial_id)
        for row in curve_rows(self.study, trial_id, config, [report]):
            curve[row["epoch"]] = row
        if curve:
            write_curves(self.study_dir, trial_id, [curve[e] for e in sorted(curve)])

    def record_end(self, trial_id: str, config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
        """Write the trial's results file (its `TrialEnd` rows) and its gates file.

        The gates come from the last report that carried histograms (a diverged trial's from its last good epoch);
        a reused model reported none: no file.
        """
        write_trial(self.study_dir, trial_id, rows)
        if trial_id in self._histograms:
            write_gates(self.study_dir, trial_id, gate_rows(self.study, trial_id, config, self._histograms[trial_id]))


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound
