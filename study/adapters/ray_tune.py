"""Ray Tune beyond its public API: a restored Tuner's callbacks and searcher, and Tune's experiment-state JSON.

- `Tuner.restore` takes no run config and hands back no tune config: the callbacks and searcher it unpickled live on
  its private `TunerInternal` (upstream: ray-project/ray#41364, "a mean to get back the tune_config and run_config
  from a restored tuner", open).
- With `num_to_keep=1` Tune deletes a trial's previous checkpoint before it saves the experiment state naming the
  next one, so a killed driver leaves a state naming a checkpoint that is gone (upstream: ray-project/ray#27790 and
  #30073). `study.runner.bridge_checkpoint_rotation` repairs that from the state's JSON, whose layout is read here.
- Tune uploads its experiment state by copying it over the previous one, so a driver killed mid-copy leaves an
  empty or cut file, and the one state a driver session writes is lost. `keeping_good_state` copies each complete
  state aside while the experiment runs, and `repair_experiment_state` puts the copy back before a restore.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from study.adapters import LibraryChanged
from trainables import durable

UPGRADE = "(pinned in pyproject.toml; see study/adapters/ray_tune.py before upgrading Ray)"
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{6}")
STATE_GLOB = "experiment_state-*.json"
GOOD_COPY_PERIOD_S = 5.0      # Tune saves its state every 10 s or more


def _good_copy(state: Path) -> Path:
    return state.with_name(f".{state.name}.good")     # a dot name: Tune's glob does not see it


def _complete(state: Path) -> bytes | None:
    """The state's bytes if it is a whole experiment state, else None (being copied, or cut by a kill)."""
    try:
        data = state.read_bytes()
        return data if "trial_data" in json.loads(data) else None
    except (OSError, ValueError):
        return None


@contextmanager
def keeping_good_state(exp_dir: Path, period_s: float = GOOD_COPY_PERIOD_S) -> Iterator[None]:
    """While the block runs (`Tuner.fit`), copy each new complete experiment state of `exp_dir` aside."""
    stop = threading.Event()
    copied: dict[Path, int] = {}

    def copy_new() -> None:
        for state in Path(exp_dir).glob(STATE_GLOB):
            try:
                mtime = state.stat().st_mtime_ns
            except OSError:
                continue
            if copied.get(state) != mtime and (data := _complete(state)) is not None:
                durable.write_bytes(_good_copy(state), data)
                copied[state] = mtime

    def loop() -> None:
        while not stop.wait(period_s):
            copy_new()

    thread = threading.Thread(target=loop, name="good-experiment-state", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        copy_new()


def repair_experiment_state(exp_dir: Path) -> list[Path]:
    """Put back the good copy of each cut experiment state (a killed driver's); the states repaired."""
    repaired = []
    for state in sorted(Path(exp_dir).glob(STATE_GLOB)):
        good = _good_copy(state)
        if _complete(state) is None and good.exists() and _complete(good) is not None:
            durable.write_bytes(state, good.read_bytes())
            repaired.append(state)
    return repaired


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
    states = sorted(Path(exp_dir).glob(STATE_GLOB))
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
