"""The model store (trainables/store.py): entries, and one trainer per training key across processes."""
from __future__ import annotations

import errno
import fcntl
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from trainables.config import SMOKE, TrialConfig
from trainables.store import ModelStore
from trainables.trainable import run_trial

from conftest import REPO_ROOT, wait_for

LOOP = {"epoch": 3, "best_epoch": 2, "best_metric": 41.5, "train_time_s": 12.0}   # what a run records of itself

# Holds the lock of a key until a line on stdin says go on; publishes a model if it says "publish".
HOLDER = """
import sys, torch
from trainables.store import ModelStore
store, key = ModelStore(sys.argv[1]), sys.argv[2]
with store.training(key) as meta:
    print("held", meta, flush=True)
    if sys.stdin.readline().strip() == "publish":
        store.publish(key, torch.nn.Linear(2, 2), {"seed": 1}, {"epoch": 3, "best_epoch": 2, "best_metric": 4.0,
                                                                "train_time_s": 1.0})
"""

# One tiny trial on a shared store; trial "a" holds still after its first epoch until the file `go` exists.
TRIAL = """
import json, logging, sys, time
from pathlib import Path
import torch
from trainables.config import SMOKE, TrialConfig
from trainables.trainable import run_trial
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
tmp, name = Path(sys.argv[1]), sys.argv[2]
cfg = TrialConfig.from_flat({**SMOKE, "data.cache_dir": str(tmp / "cache"), "compress.bits": int(sys.argv[3])},
                            base=TrialConfig.preset("lm", "tiny"))
def report(epoch_report, ckpt):
    if name == "a" and epoch_report.epoch == 1 and not epoch_report.done:
        (tmp / "a-training").touch()
        while not (tmp / "go").exists():
            time.sleep(0.05)
final = run_trial(cfg, tmp / name, report=report, model_store=tmp / "store")
print(json.dumps({"reused": final.reused_checkpoint, "key": final.training_key,
                  "sweep": [row.to_dict() for row in final.sweep]}))
"""


def start_holder(root: Path, key: str = "k") -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), key], cwd=REPO_ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held None"
    return holder


def in_thread(store: ModelStore, key: str) -> tuple[threading.Thread, dict]:
    """Enter `store.training(key)` in a thread; `out["meta"]` is what it yielded once it got the lock."""
    out: dict = {}

    def enter():
        with store.training(key) as meta:
            out["meta"] = meta

    thread = threading.Thread(target=enter, daemon=True)
    thread.start()
    return thread, out


def test_publish_then_load_round_trips(tmp_path):
    store = ModelStore(tmp_path)
    assert store.meta("k") is None
    model = torch.nn.Linear(3, 2)
    store.publish("k", model, {"seed": 1}, LOOP)
    assert store.meta("k") == {k: LOOP[k] for k in ("epoch", "best_epoch", "best_metric", "train_time_s")}
    other = torch.nn.Linear(3, 2)
    assert store.load("k", other) == store.meta("k")
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["best_model.pt", "meta.json"]   # no temp files


def test_a_trained_model_wins_over_a_divergence_of_the_same_knobs(tmp_path):
    store, report = ModelStore(tmp_path), {"status": "diverged", "epoch": 2, "val_metric": float("nan")}
    store.publish_diverged("k", report)
    stored = store.diverged("k")
    assert stored["epoch"] == 2 and stored["val_metric"] != stored["val_metric"]   # NaN survives
    store.publish("k", torch.nn.Linear(2, 2), {"seed": 1}, LOOP)        # e.g. a resumed run that did not diverge
    assert store.diverged("k") is None and store.meta("k") is not None
    store.publish_diverged("k", report)                                 # a later retry that did
    assert store.diverged("k") is None


def test_a_second_trainer_waits_for_the_first_ones_model(tmp_path):
    store = ModelStore(tmp_path)
    holder = start_holder(tmp_path)
    thread, out = in_thread(store, "k")
    thread.join(1.0)
    assert thread.is_alive() and "meta" not in out          # blocked while the other process trains
    with store.training("other-key") as meta:                # other keys are not held up
        assert meta is None
    holder.communicate("publish\n", timeout=60)
    thread.join(30)
    assert not thread.is_alive() and out["meta"]["best_metric"] == 4.0


def test_publishing_hands_the_key_on_at_once(tmp_path):
    store = ModelStore(tmp_path)
    with store.training("k") as meta:
        assert meta is None
        waiter, out = in_thread(ModelStore(tmp_path), "k")
        waiter.join(0.3)
        assert waiter.is_alive()
        store.publish("k", torch.nn.Linear(2, 2), {"seed": 1}, LOOP)
        waiter.join(10)   # it scores the model while the trainer still scores its own sweep
        assert not waiter.is_alive() and out["meta"]["epoch"] == LOOP["epoch"]


def test_is_training_sees_another_process_training_the_key(tmp_path):
    store = ModelStore(tmp_path)
    assert not store.is_training("k")                        # no lock file yet
    holder = start_holder(tmp_path)
    assert store.is_training("k") and not store.is_training("other-key")
    holder.communicate("publish\n", timeout=60)
    assert not store.is_training("k") and store.meta("k") is not None
    with store.training("k"):                                # probing takes nothing from a trainer that waits
        assert store.is_training("k")


def test_a_trainer_that_dies_hands_the_key_on(tmp_path):
    store = ModelStore(tmp_path)
    holder = start_holder(tmp_path)
    thread, out = in_thread(store, "k")
    thread.join(0.5)
    assert thread.is_alive()
    holder.kill()
    holder.wait(30)
    thread.join(30)
    assert not thread.is_alive() and out["meta"] is None     # no model: the waiter trains the knobs itself


def test_without_working_locks_trials_go_on_unlocked(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):   # what a filesystem mounted without lock support answers
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with ModelStore(tmp_path).training("k") as meta:
        assert meta is None
    assert "cannot lock" in caplog.text and "may train copies" in caplog.text


def test_a_resumed_trial_waits_for_the_lock_then_carries_on_with_its_checkpoint(tmp_path):
    cfg = TrialConfig.from_flat({**SMOKE, "data.cache_dir": str(tmp_path / "cache")},
                                base=TrialConfig.preset("lm", "tiny"))
    work, store = tmp_path / "work", tmp_path / "store"

    def stop_after_epoch_1(report, ckpt):
        if report.epoch == 1:
            raise KeyboardInterrupt("stopped on purpose")

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, work, report=stop_after_epoch_1, model_store=store)
    holder = start_holder(store, cfg.training_key())
    reports: list[dict] = []
    resumed = threading.Thread(target=run_trial, args=(cfg, work), daemon=True, kwargs={
        "report": lambda report, ckpt: reports.append(report.to_dict()), "resume": work / "checkpoint", "model_store": store})
    resumed.start()
    resumed.join(1.0)
    assert resumed.is_alive() and not reports                # another process holds the knobs: it waits
    holder.communicate("publish\n", timeout=60)              # that one stored a model; the resumed trial keeps its own
    resumed.join(120)
    assert [r["epoch"] for r in reports] == [2] and not reports[-1].get("reused_checkpoint")
    assert ModelStore(store).meta(cfg.training_key())["epoch"] == 2   # and it stored its model when it was done


@pytest.mark.slow
def test_concurrent_trials_with_the_same_knobs_train_once(tmp_path):
    def trial(name: str, bits: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", TRIAL, str(tmp_path), name, str(bits)], cwd=REPO_ROOT,
                                text=True, stdout=subprocess.PIPE, stderr=open(tmp_path / f"{name}.log", "w"))

    first = trial("a", 32)
    wait_for(lambda: (tmp_path / "a-training").exists() or first.poll() is not None, 300, "trial a's first epoch", poll=0.05)
    second = trial("b", 4)                    # the same training knobs, another compression setting
    wait_for(lambda: "waiting for its model" in (tmp_path / "b.log").read_text() or second.poll() is not None,
             300, "trial b to wait", poll=0.05)
    (tmp_path / "go").touch()
    a, b = (json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in (first, second))
    assert first.returncode == second.returncode == 0
    assert not a["reused"] and b["reused"] and a["key"] == b["key"]
    assert [r["val_metric"] for r in a["sweep"]] == [r["val_metric"] for r in b["sweep"]]   # the same model
