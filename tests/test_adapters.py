"""The adapters (study/adapters/): on the pinned Ray and Optuna they reach what they need, and when a library moves
it they fail with a message naming what moved (and the upstream issue), not with an AttributeError mid-study."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.adapters import LibraryChanged, ray_tune

from conftest import REPO_ROOT


def searcher() -> OptunaSearch:
    return OptunaSearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="y", mode="min",
                        sampler=optuna.samplers.RandomSampler(seed=0))


class Recorder(tune.Callback):
    pass


def test_a_tuner_gives_back_its_callbacks_and_searcher():
    callback, search = Recorder(), searcher()
    tuner = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(search, 1)),
                       run_config=tune.RunConfig(callbacks=[callback]))
    assert ray_tune.restored_callbacks(tuner) == [callback]
    assert ray_tune.restored_searcher(tuner) is search           # below its ConcurrencyLimiter


def test_a_tuner_without_its_internals_is_named():
    with pytest.raises(LibraryChanged, match=r"ray-project/ray#41364"):
        ray_tune.check_tuner(object())


def test_an_experiment_state_of_another_layout_is_named(tmp_path):
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trials": []}))
    with pytest.raises(LibraryChanged, match=r"not laid out as study/adapters/ray_tune.py expects"):
        ray_tune.checkpoints_named(tmp_path)
    assert ray_tune.checkpoints_named(tmp_path / "nothing-saved-yet") == []


RUN = """
import json, sys
import ray
from ray import tune
from study.adapters import ray_tune

def trainable(config):
    import tempfile
    for step in range(3):
        with tempfile.TemporaryDirectory() as d:
            open(f"{d}/state", "w").write(str(step))
            tune.report({"y": step}, checkpoint=tune.Checkpoint.from_directory(d))

ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, log_to_driver=False)
tuner = tune.Tuner(trainable, run_config=tune.RunConfig(name="e", storage_path=sys.argv[1], verbose=0,
                   checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
tuner.fit()
named = ray_tune.checkpoints_named(f"{sys.argv[1]}/e")
restored = tune.Tuner.restore(f"{sys.argv[1]}/e", trainable=trainable)
ray_tune.check_tuner(restored)
print(json.dumps([[str(trial_dir), sorted(names), sorted(p.name for p in trial_dir.glob("checkpoint_*"))]
                  for trial_dir, names in named]))
"""


@pytest.mark.slow
def test_a_real_experiment_state_names_each_trials_checkpoint(tmp_path):
    """Tune's own experiment state, as `bridge_checkpoint_rotation` reads it: the trial's directory and its
    checkpoint, which exists (num_to_keep=1: the newest only)."""
    proc = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ((trial_dir, names, on_disk),) = json.loads(proc.stdout.splitlines()[-1])
    assert trial_dir.startswith(str(tmp_path / "e")) and names == on_disk == ["checkpoint_000002"]


def test_a_state_cut_by_a_killed_driver_is_put_back_from_its_last_complete_copy(tmp_path):
    state = tmp_path / "experiment_state-2026-12-04_21-25-20.json"
    whole = json.dumps({"trial_data": [["{}", "{}"]], "runner_data": {}})
    with ray_tune.keeping_good_state(tmp_path, period_s=0.02):
        state.write_text(whole)
        time.sleep(0.2)
        state.write_text(whole[:7])                 # Tune's next upload, cut: never copied over the good one
        time.sleep(0.2)
    state.write_text("")                            # the kill, mid-copy
    assert ray_tune.repair_experiment_state(tmp_path) == [state]
    assert state.read_text() == whole
    assert sorted(p.name for p in tmp_path.glob(ray_tune.STATE_GLOB)) == [state.name]   # Tune sees one state
    assert ray_tune.repair_experiment_state(tmp_path) == []          # a whole state is left alone


def test_a_cut_state_without_a_copy_is_left_for_tune_to_judge(tmp_path):
    (tmp_path / "experiment_state-x.json").write_text("")
    assert ray_tune.repair_experiment_state(tmp_path) == []
