"""What MLflow accepts, made from what a study has: run names, params and metrics within its limits, code tags.

MLflow refuses names outside [/\\w.- :], values over its length limits and NaN in JSON artifacts; a study's knobs,
report keys and sweep rows are shaped here, once, so the tracker never fails a trial on a name.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import numbers
import posixpath
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

from study.config import flatten
from study.tags import GIT_COMMIT, GIT_COMMIT_TAG, GIT_DIRTY, PACKAGE_VERSION_TAG

_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_TRUNCATED = "…[truncated]"


def code_version() -> dict[str, str]:
    """Tags naming the code that ran: the package version and, in a git checkout, the commit and whether it is dirty."""
    tags = {}
    try:
        tags[PACKAGE_VERSION_TAG] = importlib.metadata.version("g2-study")
    except importlib.metadata.PackageNotFoundError:
        tags[PACKAGE_VERSION_TAG] = "unknown"
    repo = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return tags
    tags |= {GIT_COMMIT_TAG: commit, GIT_COMMIT: commit, GIT_DIRTY: str(bool(dirty)).lower()}
    return tags


def metric_name(key: str) -> str:
    """A valid MLflow name: only [/\\w.- :], no path tricks, at most 250 characters."""
    name = _BAD_NAME_CHARS.sub("_", str(key))[:MAX_ENTITY_KEY_LENGTH]
    if not name or posixpath.normpath(name) != name or name.startswith(("/", "..")):
        name = name.replace("/", "_").lstrip(".") or "_"
    return name


def text_value(value: Any, limit: int) -> str:
    """A param or tag value: JSON for lists and dicts, cut to MLflow's length limit."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def param_values(config: Mapping[str, Any]) -> dict[str, str]:
    """Flat, valid, unique param names (a sanitised name that collides gets a suffix) and values within the limit."""
    out: dict[str, str] = {}
    for key, value in flatten(config).items():
        if str(key).startswith("_"):
            continue
        name, n = metric_name(key), 1
        while name in out:
            n += 1
            name = f"{metric_name(key)[: MAX_ENTITY_KEY_LENGTH - 4]}~{n}"
        out[name] = text_value(value, MAX_PARAM_VAL_LENGTH)
    return out


def valid_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """Numbers under valid MLflow names (NaN and inf included: a diverged loss is a measurement); bools, text,
    lists and None are no metrics."""
    return {metric_name(k): float(v) for k, v in values.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def json_safe(value: Any) -> Any:
    """NaN/inf as null: JSON has no NaN, and a diverged compressed setting has one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
