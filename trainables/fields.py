"""Checking and reading config fields: each error names the dotted field the user typed and what it allows."""
from __future__ import annotations

import math
import tomllib
from dataclasses import fields
from typing import Any, get_args, get_origin


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False) -> None:
    """Raise ValueError naming `name` unless lo <(=) value <(=) hi (and an int when `integer`)."""
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")


def reject_unknown(section: str, cls: type, given: dict) -> None:
    """A typo in a knob name must not silently train the default."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        names = ", ".join(f"{section}.{k}" if section else k for k in unknown)
        raise ValueError(f"unknown field(s) {names}; known: {', '.join(sorted(known))}")


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept what TOML, JSON, Ray and Optuna hand over: numpy scalars, ints for floats, lists for tuples."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    origin = get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        (item_hint, *_) = get_args(hint)
        return tuple(coerce(f"{name}[]", v, item_hint) for v in value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as a TOML literal (`0.5`, `true`, `[1, 2]`), or
    taken as a bare string (`g2.gate_mode=lstm`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"an override must look like key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value
