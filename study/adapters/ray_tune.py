"""Ray Tune beyond its public API: a restored Tuner's callbacks and searcher, and Tune's experiment-state JSON.

- `Tuner.restore` takes no run config and hands back no tune config: the callbacks and searcher it unpickled live on
  its private `TunerInternal` (upstream: ray-project/ray#41364, "a mean to get back the tune_config and run_config
  from a restored tuner", open).
- With `num_to_keep=1` Tune deletes a trial's previous checkpoint before it saves the experiment state naming the
  next one, so a killed driver leaves a state naming a checkpoint that is gone (upstream: ray-project/ray#27790 and
  #30073). `study.runner.bridge_checkpoint_rotation` repairs that from the state's JSON, whose layout is read here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from study.adapters import LibraryChanged

UPGRADE = "(pinned in pyproject.toml; see study/adapters/ray_tune.py before upgrading Ray)"
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{6}")


def _internal(tuner) -> Any:
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None or not hasattr(internal, "get_run_config") or not hasattr(internal, "_tune_config"):
        raise LibraryChanged("ray.tune.Tuner no longer keeps its TunerInternal (with get_run_config and "
                             f"_tune_config) in `_local_tuner` {UPGRADE}; ray-project/ray#41364 asks for a public way")
    return internal


def restored_callbacks(tuner) -> list:
    """The callbacks a restored Tuner unpickled with its experiment."""
    return list(_internal(tuner).get_run_config().callbacks or ())


def restored_searcher(tuner):
    """The base searcher (below its ConcurrencyLimiter and other wrappers) a restored Tuner unpickled."""
    searcher = _internal(tuner)._tune_config.search_alg
    while hasattr(searcher, "searcher"):   # ConcurrencyLimiter, Repeater: the wrapped one, a public attribute
        searcher = searcher.searcher
    return searcher


def checkpoints_named(exp_dir: Path) -> list[tuple[Path, set[str]]]:
    """(trial directory, the checkpoint directory names it refers to) per trial of the newest experiment state.

    Empty when Tune saved no state yet. The layout: `experiment_state-<time>.json` holds `trial_data`, a list of
    [trial JSON, runtime-metadata JSON] pairs; the trial JSON has the trial's `relative_logdir`, the runtime JSON
    names its checkpoints (`checkpoint_000004`).
    """
    states = sorted(Path(exp_dir).glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        pairs = json.loads(states[-1].read_text())["trial_data"]
        return [(Path(exp_dir) / json.loads(trial_json)["relative_logdir"],
                 set(_CHECKPOINT_NAME.findall(runtime_json))) for trial_json, runtime_json in pairs]
    except (KeyError, TypeError, ValueError) as err:
        raise LibraryChanged(f"Tune's experiment state {states[-1]} is not laid out as study/adapters/ray_tune.py "
                             f"expects ({type(err).__name__}: {err}) {UPGRADE}") from err


def check_tuner(tuner) -> None:
    """Raise LibraryChanged unless a (restored or new) Tuner has the run and tune config where they are read."""
    _internal(tuner)
