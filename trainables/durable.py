"""Crash-consistent writes: a file (or directory) is replaced whole, and the replacement survives a power cut.

Every file the study keeps (results, curves, gates, `study.json`, the driver claim, stored models, checkpoints,
the search state, generated corpora, exports) is written through `writing`:

    with writing(path) as tmp:      # tmp = <dir>/.<name>.<unique>.tmp, beside path (same filesystem)
        write tmp
    # then: fsync(tmp), rename(tmp, path), fsync(dir)

A rename alone survives a killed process but not a power cut: without the file's fsync the new name may point at
blocks never written (ext4, XFS: a zero-length or garbage file), and without the directory's fsync the rename
itself may be lost. A write that fails (a full disk, a file-size limit, an I/O error) removes the temporary file
and raises `FileNotWrittenError` naming `path`, and the previous file stays as it was.

Temporary names start with '.', which the study's readers skip (`study/results/files.py`).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class FileNotWrittenError(OSError):
    """A file of the study could not be written (disk full, file too large, I/O error); the old one is intact."""

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror or 'error'}"


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)   # no space, over the file-size limit, over the quota


def not_written(err: BaseException) -> FileNotWrittenError | None:
    """The write failure behind `err` (its causes and contexts too) if a full disk caused it, else None: others'
    code (Ray Tune's state, torch) raises a plain OSError, or wraps it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, FileNotWrittenError):
            return err
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return FileNotWrittenError(err.errno, err.strerror, err.filename or "a file of the study")
        err = err.__cause__ or err.__context__
    return None


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path, suffix: str) -> Path:
    """A unique name in `path`'s directory: two threads or processes writing one file never share a temp file."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{suffix}")


def _not_written(path: Path, err: OSError) -> FileNotWrittenError:
    return FileNotWrittenError(err.errno, err.strerror or str(err), str(path))


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write and close; then fsyncs it, renames it to `path` and fsyncs
    the directory. On any exception the temporary file is removed and `path` is left as it was; an OSError
    becomes a `FileNotWrittenError` naming `path`."""
    path = Path(path)
    tmp = _temp_beside(path, "tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, FileNotWrittenError):
            raise _not_written(path, err) from err
        raise
    try:
        fsync_path(path.parent)
    except OSError as err:   # renamed but maybe not on the disk yet: as good as not written after a power cut
        raise _not_written(path, err) from err


@contextmanager
def writing_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh staging directory beside `path` to fill; then fsyncs every file in it and itself, renames it
    to `path` (which must be absent or an empty directory) and fsyncs the parent. On any exception the staging
    directory is removed; an OSError becomes a `FileNotWrittenError` naming `path`."""
    path = Path(path)
    staging = _temp_beside(path, "partial")
    try:
        staging.mkdir(parents=True)
        yield staging
        for folder, _, files in os.walk(staging, topdown=False):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(Path(folder))
        os.replace(staging, path)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, FileNotWrittenError):
            raise _not_written(path, err) from err
        raise
    try:
        fsync_path(path.parent)
    except OSError as err:
        raise _not_written(path, err) from err


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with writing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with writing(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """NaN stays NaN (Python's JSON), as the readers of the study's files expect."""
    write_text(path, json.dumps(value, indent=indent))


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` of state dicts and plain containers (checkpoints, stored models).

    Serialised in memory first: torch's writer turns a failed write (EFBIG, ENOSPC) into a RuntimeError that does
    not say the disk is full, while Python's own write raises the OSError. The study's models are small.
    """
    import torch  # lazily: `study/results/files.py` writes through this module and does not import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())
