"""Study configuration: every bad input is refused with its field and range, before anything is created."""
import subprocess
import sys

import pytest

from study.config import StudyConfig, load_study_config
from study.space import DefineByRun

GOOD = """
[study]
name = "t1"
task = "lm"
preset = "tiny"
num_samples = 3

[trial]
"data.corpus" = "toy"
[trial.g2]
p = 0.5

[space."g2.tau"]
type = "float"
low = 0.5
high = 1.0
when = { "g2.gate_mode" = "g2" }

[space."compress.rank"]
choices = [0, 4]
"""


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_config_and_its_views(tmp_path):
    cfg = load_study_config(write(tmp_path, GOOD), ["study.num_samples=5", "train.lr=10"])
    assert cfg.num_samples == 5 and cfg.base_trial().g2.p == 0.5 and cfg.base_trial().train.lr == 10.0
    assert [p.name for p in cfg.search_space()] == ["g2.tau", "compress.rank"]
    assert cfg.directions() == ["minimize", "minimize"]
    assert StudyConfig.from_json(cfg.to_json()) == cfg


def test_nmt_metric_is_maximised():
    cfg = StudyConfig(task="nmt", preset="tiny", objectives=("compressed_val_metric", "gate_compression", "gate_bits"))
    assert cfg.directions() == ["maximize", "maximize", "minimize"]


def test_space_override_edits_the_default_space():
    cfg = load_study_config(None, ["space.g2.tau.high=2.0", "study.preset=tiny"])
    tau = next(p for p in cfg.search_space() if p.name == "g2.tau")
    assert (tau.low, tau.high, tau.log, dict(tau.when)) == (0.3, 2.0, True, {"g2.gate_mode": "g2"})


def test_several_seeds_become_a_dimension_and_grid_counts_them():
    cfg = StudyConfig(preset="tiny", sampler="grid", num_samples=0, seeds=(1, 2))
    assert cfg.grid() == {"g2.gate_mode": ["lstm", "sharpened", "g2"], "seed": [1, 2]}
    assert cfg.total_samples() == 6


class FakeTrial:
    """Stands in for optuna's trial: records which names were asked for."""

    def __init__(self, mode):
        self.mode, self.asked = mode, []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return self.mode if name == "g2.gate_mode" else choices[0]

    def suggest_float(self, name, low, high, step=None, log=False):
        self.asked.append(name)
        return low


def test_conditional_parameters_are_only_suggested_for_g2():
    cfg = load_study_config(None, ["study.preset=tiny"])
    space = DefineByRun(cfg.search_space(), cfg.base_trial().to_flat())
    for mode, expect_tau in (("lstm", False), ("g2", True)):
        trial = FakeTrial(mode)
        constants = space(trial)
        assert ("g2.tau" in trial.asked) == expect_tau
        assert ("g2.tau" in constants) != expect_tau           # a fixed value when not searched
        assert "g2.gate_mode" not in constants


@pytest.mark.parametrize("override, message", [
    ("study.num_samples=0", "study.num_samples must be an integer in [1, 100000]"),
    ("study.max_concurrent=-1", "study.max_concurrent must be an integer in [1, 10000]"),
    ("study.sampler=cmaes", "study.sampler must be one of 'tpe', 'nsga2', 'gp', 'grid'"),
    ("study.task=vision", "study.task must be one of 'lm', 'nmt'"),
    ("study.preset=huge", "study.preset must be one of 'awd', 'medium', 'tiny'"),
    ('study.objectives=["accuracy"]', "study.objectives[] must be one of 'compressed_val_metric'"),
    ("study.gpus_per_trial=-0.5", "study.gpus_per_trial must be a number in [0.0, 64.0]"),
    ("study.name=../evil", "study.name must be 1-64 characters"),
    ('study.storage="s3://bucket/studies"', "study.storage must be a directory path"),
    ("study.nmae=x", "unknown field(s) study.nmae"),
    ("g2.tau=0", "trial: g2.tau must be a number in (0.0, 10.0]"),
    ("trial.compress.bits=3.5", "compress.bits must be an integer in [1, 16] or 32"),
    ("g2.tua=1", "trial: unknown field(s) g2.tua"),
    ("space.g2.tau.low=-1", "space.g2.tau.low must be > 0 on a log scale"),
    ("space.g2.p.high=2.0", "space.g2.p: value 2.0 is not allowed: g2.p must be a number in [0.0, 1.0]"),
    ("space.lm.nope.low=1", "space.lm.nope: unknown field"),
])
def test_bad_values_are_refused_with_field_and_range(override, message):
    with pytest.raises(ValueError) as err:
        load_study_config(None, [override, "study.preset=tiny"] if "preset" not in override else [override])
    assert message in str(err.value)


def test_grid_refuses_continuous_ranges():
    with pytest.raises(ValueError, match="space.g2.tau: the grid sampler needs choices"):
        load_study_config(None, ["study.preset=tiny", "study.sampler=grid", "space.g2.tau.low=0.5",
                                 "space.g2.tau.high=1.0"])


def test_bad_toml_and_unknown_tables(tmp_path):
    with pytest.raises(ValueError, match="invalid TOML"):
        load_study_config(write(tmp_path, "[study\nname = 1"))
    with pytest.raises(ValueError, match="unknown table"):
        load_study_config(write(tmp_path, "[studdy]\nname = 'x'"))
    with pytest.raises(ValueError, match="does not exist"):
        load_study_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("args, message", [
    (["run", "--set", "study.num_samples=0"], "study.num_samples must be an integer in [1, 100000], got 0"),
    (["run", "--set", "g2.p=1.5"], "g2.p must be a number in [0.0, 1.0], got 1.5"),
    (["run", "missing.toml"], "does not exist"),
    (["check", "--set", "study.sampler=random"], "study.sampler must be one of"),
])
def test_cli_refuses_bad_input_with_exit_2_and_creates_nothing(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "study.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == []                       # no study directory, no database, nothing


def test_cli_check_prints_the_resolved_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "check", str(write(tmp_path, GOOD))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "config OK: 3 trial(s)" in proc.stdout and "g2.p = 0.5" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"]


@pytest.mark.parametrize("sampler, cls", [("tpe", "TPESampler"), ("nsga2", "NSGAIISampler"), ("gp", "GPSampler"),
                                          ("grid", "GridSampler")])
def test_every_sampler_is_built(sampler, cls):
    from study.runner import make_sampler

    cfg = StudyConfig(preset="tiny", sampler=sampler, num_samples=0 if sampler == "grid" else 4)
    assert type(make_sampler(cfg, seed=0)).__name__ == cls


def test_optuna_study_keeps_its_directions(tmp_path):
    from study.runner import open_optuna_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_optuna_study(StudyConfig(preset="tiny"), url, seed=0)
    other = StudyConfig(preset="tiny", objectives=("compressed_val_metric", "gate_compression"))
    with pytest.raises(ValueError, match="has directions"):
        open_optuna_study(other, url, seed=0)
