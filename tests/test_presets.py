"""Tests for trainables/presets.py: every preset is a valid trial, and each task's default names one of them."""
import pytest

from trainables.config import TASKS, TrialConfig
from trainables.presets import DEFAULT_PRESETS, PRESETS


@pytest.mark.parametrize("task,name", [(task, name) for task in PRESETS for name in PRESETS[task]])
def test_every_preset_builds_a_valid_trial_config(task, name):
    cfg = TrialConfig.preset(task, name)
    assert cfg.task == task
    assert {k: cfg.to_flat()[k] for k in PRESETS[task][name]} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in PRESETS[task][name].items()}


def test_default_presets_name_a_preset_of_every_task():
    assert set(DEFAULT_PRESETS) == set(TASKS) == set(PRESETS)
    assert all(DEFAULT_PRESETS[task] in PRESETS[task] for task in TASKS)
    assert TrialConfig.preset("lm", DEFAULT_PRESETS["lm"]) == TrialConfig(task="lm")   # AWD: the dataclass defaults


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset must be one of 'awd', 'medium', 'tiny', got 'huge'"):
        TrialConfig.preset("lm", "huge")
