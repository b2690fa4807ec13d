"""Where a trial runs (trainables/device.py): the device Ray granted, the fp32 policy, and per-device RNG states.

No GPU here: CUDA is made to look visible by patching `torch.cuda.is_available`, and every CUDA call a CPU trial
must not make is patched to fail loudly.
"""
import pytest
import torch

from trainables.config import SMOKE, TrainConfig, TrialConfig
from trainables.device import rng_state, set_rng_state, trial_device, use_ieee_fp32
from trainables.trainable import run_trial


@pytest.fixture
def cuda_visible(monkeypatch):
    """A worker that sees a GPU (as every Ray worker on a GPU node does, whatever it was granted)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def tf32_on():
    """TF32 as this torch ships it for cuDNN, and on for cuBLAS too; restored afterwards (the flags are global)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def forbid_cuda(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU trial touched CUDA")
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "init"):
        monkeypatch.setattr(torch.cuda, name, refuse)


@pytest.mark.parametrize("gpu_ids, expected", [([], "cpu"), ([0], "cuda"), (["1"], "cuda"), (None, "cuda")])
def test_auto_device_follows_the_gpus_ray_granted(cuda_visible, gpu_ids, expected):
    assert trial_device(TrainConfig(device="auto"), gpu_ids).type == expected


def test_auto_device_without_cuda_is_cpu_whatever_was_granted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial_device(TrainConfig(device="auto"), [0]).type == "cpu"
    assert trial_device(TrainConfig(device="auto")).type == "cpu"


def test_cuda_without_a_granted_gpu_is_refused(cuda_visible):
    with pytest.raises(ValueError, match=r"given no GPU \(set study.gpus_per_trial > 0\)"):
        trial_device(TrainConfig(device="cuda"), [])
    assert trial_device(TrainConfig(device="cuda"), [0]).type == "cuda"
    assert trial_device(TrainConfig(device="cpu"), [0]).type == "cpu"     # asked for the CPU: it gets it


def test_cpu_trial_neither_saves_nor_restores_cuda_rng_state(cuda_visible, monkeypatch):
    forbid_cuda(monkeypatch)
    cpu = torch.device("cpu")
    state = rng_state(cpu)
    assert set(state) == {"torch", "python"}
    first = torch.rand(3)
    set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, cpu)   # a GPU run resumed on a CPU
    assert torch.equal(torch.rand(3), first)


def test_cuda_trial_saves_and_restores_its_own_device_state(cuda_visible, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.arange(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("reads every GPU's state"))
    cuda = torch.device("cuda")
    state = rng_state(cuda)
    set_rng_state(state, cuda)
    set_rng_state({**state, "cuda": [torch.ones(8, dtype=torch.uint8)]}, cuda)   # an older, all-devices checkpoint
    assert [c[:2] for c in calls] == [("get", cuda), ("set", cuda), ("set", cuda)]
    assert torch.equal(calls[1][2], torch.arange(8, dtype=torch.uint8)) and calls[2][2].sum() == 8


def test_a_trial_runs_under_one_fp32_policy(tmp_path, tf32_on):
    """cuDNN's RNN runs TF32 by default in this torch while matmuls don't; a trial turns both off."""
    cfg = TrialConfig.from_flat({**SMOKE, "train.epochs": 1, "train.max_batches": 1, "train.max_eval_batches": 1,
                                 "data.cache_dir": str(tmp_path)}, base=TrialConfig.preset("lm", "tiny"))
    run_trial(cfg, tmp_path / "run")
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False


def test_ieee_fp32_policy_is_readable_by_both_flag_apis(tf32_on):
    assert torch.backends.cudnn.rnn.fp32_precision == "tf32"
    use_ieee_fp32()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.rnn.fp32_precision != "tf32" and torch.backends.cuda.matmul.fp32_precision == "ieee"
