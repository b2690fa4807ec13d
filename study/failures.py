"""Tell a trial that failed from a trial that was lost: only the second is retried.

Ray Tune's `FailureConfig(max_failures=N)` restarts a trial from its last checkpoint whenever its actor ends with an
error, whatever the cause. Two causes look alike to it and must not be treated alike:

- a lost process or node (`RayActorError`, `ActorDiedError`, `WorkerCrashedError`, `NodeDiedError`): the trial did
  nothing wrong, and a retry on another worker finishes it;
- an exception raised by the trial's own code (a missing corpus, an invalid knob): a retry raises it again, and the
  study should record it as data and go on.

So the study runs the trainables of `trainables/trainable.py` through `guarded`: an exception of the trial's own code
becomes a final report with `status="error"` and its message, and the function returns normally. Tune then sees
only real losses as failures, and `study.max_failures` retries exactly those.
"""
from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from trainables.report import ERROR, STATUS


def error_message(error: Any) -> str:
    """The exception line of a trial's error (Ray wraps it in a traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "^", "During handling")):
            return line
    return lines[-1] if lines else repr(error)


def error_text(err: BaseException) -> str:
    """The exception line of `err`: what the driver records of the same exception wrapped in a Ray error."""
    return error_message("".join(traceback.format_exception(err)))


def error_report(err: BaseException) -> dict[str, Any]:
    """The final report of a trial whose own code raised `err`; Tune ends the trial on `done`."""
    report: dict[str, Any] = {"status": ERROR, "error": error_text(err), "done": True}
    try:
        import ray

        report["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:   # outside a Ray worker (a unit test): where it failed is unknown, not an error
        pass
    return report


def is_error_report(result: Mapping[str, Any] | None) -> bool:
    """Whether `result` is the report `guarded` made of an exception (not a measurement)."""
    return bool(result) and result.get(STATUS) == ERROR


def guarded(name: str, config: dict[str, Any], model_store: str | None = None) -> None:
    """Run the Tune function trainable `trainables.trainable.<name>`; an `Exception` of its own becomes its report.

    The import is guarded too: code that cannot be imported fails the same way on every retry. `BaseException`s
    pass: Tune stops a trial's thread with `SystemExit`, and a KeyboardInterrupt is not the trial's failure.
    """
    from ray import tune

    try:
        from trainables import trainable

        getattr(trainable, name)(config, model_store=model_store)
    except Exception as err:
        tune.report(error_report(err))


def train_lm(config: dict[str, Any], model_store: str | None = None) -> None:
    """`trainables.trainable.train_lm`, its own exceptions reported as data."""
    guarded("train_lm", config, model_store)


def train_nmt(config: dict[str, Any], model_store: str | None = None) -> None:
    """`trainables.trainable.train_nmt`, its own exceptions reported as data."""
    guarded("train_nmt", config, model_store)
