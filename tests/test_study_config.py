"""Study configuration: every bad input is refused with its field and range, before anything is created."""
import subprocess
import sys
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import FixedTrial

from study.config import StudyConfig, flatten, load_study_config
from study.space import DefineByRun
from trainables.config import TrialConfig

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "study" / "configs").glob("*.toml"))

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


def test_conditional_parameters_are_only_suggested_for_g2():
    cfg = load_study_config(None, ["study.preset=tiny"])
    space = DefineByRun(cfg.search_space(), cfg.base_trial().to_flat())
    for mode, expect_tau in (("lstm", False), ("g2", True)):
        # a FixedTrial answers every suggest from this table and lists in `params` only what was asked for
        trial = FixedTrial({"g2.gate_mode": mode, "g2.tau": 0.5, "g2.p": 0.3, "compress.rank": 4, "compress.bits": 4})
        constants = space(trial)
        assert ("g2.tau" in trial.params) == expect_tau
        assert ("g2.tau" in constants) != expect_tau           # a fixed value when not searched
        assert "g2.gate_mode" not in constants


def test_an_int_range_is_suggested_on_its_steps():
    cfg = load_study_config(None, ["study.preset=tiny", "space.compress.rank.type=int", "space.compress.rank.low=0",
                                   "space.compress.rank.high=8", "space.compress.rank.step=4"])
    rank = next(p for p in cfg.search_space() if p.name == "compress.rank")
    assert rank.grid_values() == [0, 4, 8]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(cfg.search_space(), cfg.base_trial().to_flat())
    for _ in range(5):
        trial = study.ask()
        space(trial)
        assert trial.distributions["compress.rank"] == IntDistribution(0, 8, step=4)
        assert trial.params["compress.rank"] in (0, 4, 8)


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
    from study.search import make_sampler

    cfg = StudyConfig(preset="tiny", sampler=sampler, num_samples=0 if sampler == "grid" else 4)
    assert type(make_sampler(cfg, seed=0)).__name__ == cls


def test_optuna_study_keeps_its_directions(tmp_path):
    from study.search import open_optuna_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_optuna_study(StudyConfig(preset="tiny"), url, seed=0)
    other = StudyConfig(preset="tiny", objectives=("compressed_val_metric", "gate_compression"))
    with pytest.raises(ValueError, match="has directions"):
        open_optuna_study(other, url, seed=0)


def test_the_shipped_configs_are_found():   # an empty glob would parametrize nothing
    assert {p.stem for p in SHIPPED} >= {"quickstart", "ptb_awd", "ptb_medium_grid", "multi30k", "multi30k_paper_grid"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads_and_its_fixed_fields_arrive(path):
    doc = tomllib.loads(path.read_text())
    cfg = load_study_config(path, [])
    base = cfg.base_trial()
    assert cfg.task == doc["study"]["task"] == base.task
    assert cfg.total_samples() > 0
    flat = base.to_flat()
    for key, value in flatten(doc.get("trial", {})).items():   # every fixed field the file sets, none dropped
        assert flat[key] == (tuple(value) if isinstance(value, list) else value), key


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_space_samples_valid_trials(path):
    """What the study's own seeded sampler suggests, merged as OptunaSearch merges it, is a valid TrialConfig."""
    from study.search import make_sampler

    cfg = load_study_config(path, [])
    params = cfg.search_space()
    space = DefineByRun(params, cfg.base_trial().to_flat())
    study = optuna.create_study(directions=cfg.directions(), sampler=make_sampler(cfg, seed=0))
    for _ in range(min(4, cfg.total_samples())):
        trial = study.ask()
        constants = space(trial)                                # suggests, then returns the fixed fields
        flat = {**trial.params, **constants}                    # OptunaSearch's merge
        trial_cfg = TrialConfig.from_flat(flat)
        assert trial_cfg == TrialConfig.from_flat(trial.params, base=cfg.base_trial())   # only the suggested differ
        assert trial_cfg.task == cfg.task
        for param in params:
            if param.name not in trial.params:                  # left out only when its condition does not hold
                assert any(flat[key] != value for key, value in param.when), param.name
            elif param.kind == "categorical":
                assert trial.params[param.name] in param.choices
            else:
                assert param.low <= trial.params[param.name] <= param.high


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_cli_check_accepts_every_shipped_config(path, tmp_path, monkeypatch, capsys):
    from study.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"config OK: {load_study_config(path, []).total_samples()} trial(s)" in out
    assert list(tmp_path.iterdir()) == []                       # checking creates nothing


# What a saved experiment pickles by module and name (read from a real `tuner.pkl`, `searcher-state-*.pkl` and
# `search_gen_state-*.json` of a quickstart study): each must stay importable there for `g2-study resume`.
PICKLED = [("study.callbacks", "StudyCallback"), ("study.config", "StudyConfig"),
           ("study.convergence", "ConvergenceLog"), ("study.runner", "trial_dirname"),
           ("study.search", "StudySearch"), ("study.space", "DefineByRun"),
           ("study.runner", "StudySearch")]   # the last: experiments saved before StudySearch moved to study.search


@pytest.mark.parametrize("module, name", PICKLED, ids=lambda x: x)
def test_names_saved_experiments_pickled_still_unpickle(module, name):
    """The bytes name the old place (protocol 0: GLOBAL `module\nname`), as the saved files do."""
    import importlib
    import pickle

    found = pickle.loads(f"c{module}\n{name}\n.".encode())
    assert found is getattr(importlib.import_module(module), name)
    if name == "StudySearch":
        from study.search import StudySearch

        assert found is StudySearch
