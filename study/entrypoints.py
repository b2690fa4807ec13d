"""The study's Ray Tune entry points, `train_lm` and `train_nmt`: one trial of `trainables.trainable.run_trial`.

Tune's `FailureConfig(max_failures=N)` restarts a trial from its last checkpoint whenever its actor ends with an
error, whatever the cause. Two causes look alike to it and must not be treated alike:

- a lost process or node (`RayActorError`, `ActorDiedError`, `WorkerCrashedError`, `NodeDiedError`): the trial did
  nothing wrong, and a retry on another worker finishes it;
- an exception raised by the trial's own code (a missing corpus, an invalid knob): a retry raises it again, and the
  study should record it as data and go on.

So an exception of the trial's own code becomes its final report, `status="error"` with its message, and the
function returns normally. A file the trial cannot write (a full disk) is neither: the trial reports `NOT_WRITTEN`
and waits, and the driver stops the study as Ctrl-C does (`study.callbacks`), so `resume` continues the trial.
Tune then sees only real losses as failures, and `study.max_failures` retries exactly those. `BaseException`s pass: Tune stops a trial's thread with `SystemExit`, and a KeyboardInterrupt is not the
trial's failure.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from trainables.durable import not_written
from trainables.report import ERROR, EpochReport

NOT_WRITTEN = "g2.not_written"   # a report's key: the file this trial could not write, the disk's fault, not its own


def train_lm(config: dict[str, Any], model_store: str | None = None, live_dir: str | None = None) -> None:
    """Ray Tune function trainable for language modelling (`config`: the trial's flat `TrialConfig`)."""
    run_tune_trial("lm", config, model_store, live_dir)


def train_nmt(config: dict[str, Any], model_store: str | None = None, live_dir: str | None = None) -> None:
    """Ray Tune function trainable for translation."""
    run_tune_trial("nmt", config, model_store, live_dir)


def run_tune_trial(task: str, config: dict[str, Any], model_store: str | None, live_dir: str | None = None) -> None:
    """One trial under Tune; `model_store` (a directory shared by the study's trials, `tune.with_parameters`) lets
    trials with the same training knobs share a model. Its reports become dicts here, and only here; how far each
    epoch has got goes to `live_dir` (`study.live`), beside Tune, never as a result."""
    import ray
    from ray import tune

    node_id = ray.get_runtime_context().get_node_id()

    def report(epoch_report: EpochReport, ckpt_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        tune.report(epoch_report.to_dict(), checkpoint=checkpoint)

    work_dir = Path(tempfile.mkdtemp(prefix="g2-trial-"))
    try:
        # imported here: code that cannot be imported fails the same way on every retry, so it is the trial's error
        from trainables.config import TrialConfig
        from trainables.trainable import run_trial

        if config.get("task", task) != task:
            raise ValueError(f"config task={config['task']!r} given to the {task} trainable")
        cfg = TrialConfig.from_flat({**config, "task": task})
        where = {"model_store": Path(model_store) if model_store else None, "gpu_ids": ray.get_gpu_ids(),
                 "node_id": node_id}
        if live_dir:
            from study.live import LiveWriter

            where["pulse"] = LiveWriter(Path(live_dir), tune.get_context().get_trial_id())
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run_trial(cfg, work_dir, report=report, **where)
        else:
            with checkpoint.as_directory() as resume_dir:
                run_trial(cfg, work_dir, report=report, resume=Path(resume_dir), **where)
    except Exception as err:
        if (unwritten := not_written(err)) is None:
            report(error_report(err, node_id), None)
        else:
            # a returned trial would end in Tune's saved state; one waiting is stopped running and resumed
            tune.report({NOT_WRITTEN: str(unwritten)})
            while True:
                time.sleep(60)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def error_report(err: BaseException, node_id: str | None = None) -> EpochReport:
    """The final report of a trial whose own code raised `err`; Tune ends the trial on `done`."""
    return EpochReport(status=ERROR, error=error_text(err), done=True, node_id=node_id)


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
