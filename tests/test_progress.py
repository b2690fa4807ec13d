"""The study's console and per-trial progress files (study/progress.py), driven by the real callback."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from study import results
from study.callbacks import StudyCallback
from study.config import StudyConfig
from study.console import Console
from study.front import readable_floats
from study.progress import (
    RESCORES,
    TRAINS,
    WAITS,
    StudyProgress,
    TrialProgress,
    format_duration,
    read_progress,
    training_plan,
)
from study.tracking import open_tracker
from trainables.config import TrialConfig
from trainables.store import ModelStore

from conftest import REPO_ROOT

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")   # anything but \t and \n: \r redraws, \x1b escapes


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def tune_trial(trial_id: str, config: dict) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=None, status="RUNNING", error_file=None)


def run(callback: StudyCallback, trial: SimpleNamespace, reports: list[dict]) -> None:
    callback.on_trial_start(0, [trial], trial)
    for i, result in enumerate(reports, start=1):
        trial.last_result = {**result, "training_iteration": i}
        callback.on_trial_result(i, [trial], trial, trial.last_result)
    trial.status = "TERMINATED"
    callback.on_trial_complete(len(reports), [trial], trial)


@pytest.fixture
def recorded(trial, tmp_path):
    """A study callback over the real tiny trial's reports, its lines collected; a store-less config."""
    config, reports = trial
    cfg = StudyConfig(name="s", preset="tiny")
    open_tracker(cfg, str(tmp_path)).start(cfg.to_flat())
    return cfg, config, reports


def test_the_callback_says_when_a_trial_starts_each_epoch_and_its_end(recorded, tmp_path):
    cfg, config, reports = recorded
    lines: list[str] = []
    callback = StudyCallback(cfg, str(tmp_path), total=2, printer=lines.append)
    run(callback, tune_trial("t1", config), reports)
    epochs = config["train.epochs"] + config["train.finetune_epochs"]
    assert lines[0] == "trial t1 starts: g2 τ=0.90 p=0.20 rank 0 bits 32; trains"
    beats = [line for line in lines if " epoch " in line]
    assert len(beats) == epochs   # every epoch, the last one too (its report is also the trial's end)
    assert beats[-1].startswith(f"trial t1 epoch {epochs}/{epochs}: ") and lines.index(beats[-1]) == len(lines) - 2
    assert re.fullmatch(rf"trial t1 epoch 1/{epochs}: val ppl \d+\.\d\d \| [\d.]+k? tok/s \| ETA \d+:\d\d", beats[0])
    assert lines[-1].startswith("[  1/2] t1 ok") and lines[-1].endswith("point(s)")
    progress = read_progress(tmp_path)["t1"]
    assert (progress.state, progress.epoch, progress.epochs, progress.plan) == ("ok", epochs, epochs, TRAINS)
    assert progress.metric_name == "ppl" and progress.tokens_per_s > 0 and progress.epoch_time_s > 0


def test_quiet_prints_one_line_per_finished_trial(recorded, tmp_path):
    cfg, config, reports = recorded
    lines: list[str] = []
    callback = StudyCallback(cfg, str(tmp_path), total=2, printer=lines.append, quiet=True)
    run(callback, tune_trial("t1", config), reports)
    assert len(lines) == 1 and lines[0].startswith("[  1/2] t1 ok")
    assert read_progress(tmp_path)["t1"].state == "ok"   # the files are written all the same


def test_a_terminal_gets_a_bar_and_a_log_gets_plain_lines():
    progress = StudyProgress(total=6, done=2, running=2, failed=1, front=3, elapsed_s=75.0, eta_s=150.0,
                             counts=(("error", 1), ("reused", 1)))
    assert progress.pending == 2
    assert progress.summary() == "reused 1, error 1, running 2, pending 2 | front so far 3 | 1:15 elapsed, ETA 2:30"
    done = StudyProgress(total=2, done=2, running=0, failed=0, front=3, elapsed_s=75.0, eta_s=0.0,
                         counts=(("ok", 2),))
    assert done.summary() == "ok 2, running 0 | front 3 | 1:15 elapsed"   # no ETA, and the front is final
    for stream, live in ((io.StringIO(), False), (Terminal(), True)):
        console = Console(6, stream=stream)
        assert console.live is live
        console.trial_started("t1", "lstm rank 8 bits 4", TRAINS, None)
        console.update(progress)
        console.trial_finished("[  3/6] t1 ok")
        console.close()
        out = stream.getvalue()
        assert "trial t1 starts: lstm rank 8 bits 4; trains" in out and "[  3/6] t1 ok" in out
        if live:
            assert "\r" in out and "trials 2/6 ▕███░░░░░░░▏ 1:15 elapsed, ETA 2:30 | reused 1, error 1" in out
        else:
            assert not CONTROL.search(out) and out.splitlines() == ["trial t1 starts: lstm rank 8 bits 4; trains",
                                                                    "[  3/6] t1 ok"]
    quiet = Console(6, quiet=True, stream=Terminal())
    assert not quiet.live   # quiet: no bar either


def test_training_plan_asks_the_model_store(tmp_path):
    key = TrialConfig.preset("lm", "tiny").training_key()
    assert training_plan(key, tmp_path, {}) == (TRAINS, None)
    assert training_plan(key, tmp_path, {"t0": key}) == (WAITS, "t0")      # started before it, not locked yet
    assert training_plan(key, tmp_path, {"t0": "another"}) == (TRAINS, None)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from trainables.store import ModelStore\n"
        "with ModelStore(sys.argv[1]).training(sys.argv[2]):\n    print('held', flush=True); sys.stdin.readline()")
        , str(tmp_path), key], cwd=REPO_ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert training_plan(key, tmp_path, {}) == (WAITS, None)            # another process trains it
    finally:
        holder.communicate("\n", timeout=60)
    import torch

    ModelStore(tmp_path).publish(key, torch.nn.Linear(2, 2), {"seed": 1}, {"epoch": 1})
    assert training_plan(key, tmp_path, {"t0": key}) == (RESCORES, None)   # a stored model wins
    assert training_plan(None, tmp_path, {}) == (TRAINS, None)             # an invalid config: it will say so


def test_progress_files_round_trip_and_eta(tmp_path):
    progress = TrialProgress("t1", "lstm rank 0 bits 32", epoch=2, epochs=6, epoch_time_s=10.0, started=100.0,
                             updated=125.0)
    assert progress.eta_s() == 40.0 and progress.fraction() == pytest.approx(1 / 3)
    progress.write(tmp_path / "progress")
    assert read_progress(tmp_path) == {"t1": progress}
    assert json.loads((tmp_path / "progress" / "t1.json").read_text())["epoch"] == 2
    (tmp_path / "progress" / "junk.json").write_text("{not json")   # ignored, not an error
    assert list(read_progress(tmp_path)) == ["t1"]
    assert [format_duration(s) for s in (5, 75, 3725, None)] == ["0:05", "1:15", "1:02:05", "?"]


def test_readable_floats_tell_rows_apart():
    import pandas as pd

    df = pd.DataFrame({"val ppl": [1567.81, 1568.24, 1571.3], "gate ×": [3.2, 8.0, 16.0], "bits": [4, 8, 32],
                       "small": [0.001234, 0.0015, float("nan")]})
    out = readable_floats(df)
    assert list(out["val ppl"]) == ["1567.8", "1568.2", "1571.3"]
    assert list(out["gate ×"]) == ["3.20", "8.00", "16.00"]
    assert list(out["small"]) == ["0.00123", "0.00150", ""]
    assert list(out["bits"]) == [4, 8, 32]


@pytest.mark.slow
def test_a_study_run_into_a_log_prints_plain_lines(real_study):
    out = real_study["stdout"]
    assert not CONTROL.search(out)   # piped, as in CI or under nohup: no bar, no redraws
    assert re.search(r"^trial \S+ starts: .+; (trains|re-scores the stored model|waits for the model .+)$", out,
                     re.M), out[-3000:]
    assert re.search(r"^trial \S+ epoch 1/2: val ppl \d+\.\d\d \| .* tok/s \| ETA \d+:\d\d$", out, re.M), out[-3000:]
    # what the start lines said is what happened: a re-scored model ends "reused", and as many models were
    # trained as start lines said "trains". Which of two trials of one model trains is the workers' race (the
    # trainable takes the lock, `trainables.store`): the driver's guess may name the other one.
    plans = dict(re.findall(r"^trial (\S+) starts: .+; (trains|re-scores|waits)", out, re.M))
    reused = set(re.findall(r"^\[\s*\d+/\d+\] (\S+) reused ", out, re.M))
    assert plans and all(t in reused for t in plans if plans[t] == "re-scores"), out[-3000:]
    trained = [t for t in plans if t not in reused]
    assert len(trained) == list(plans.values()).count("trains") > 0, out[-3000:]
    assert all(re.search(rf"^trial {t} epoch 2/2: ", out, re.M) for t in trained), out[-3000:]
    ends = re.findall(r"^\[\s*\d+/(\d+)\] ", out, re.M)   # one per Ray trial; the search may end before 5
    assert len(ends) == results.load(str(real_study["dir"]))["trial_id"].nunique() >= 3 and set(ends) == {"5"}
