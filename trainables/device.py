"""Where a trial runs and in what precision: its device, the process-wide float32 policy, and its RNG states.

The precision policy, one for every path (plain cuDNN, fused Triton, reference; training and evaluation; CPU
and GPU trials):

- `train.precision = "fp32"` means IEEE fp32 everywhere. TF32 is off for cuBLAS and for cuDNN, whose RNN this
  torch runs in TF32 by default while matmuls stay IEEE: left alone, a soft-gate evaluation on an H100 would run
  TF32 and a training window fp32, and a CPU trial and a GPU trial would score one model differently.
- `train.precision = "bf16"` makes the fused path's GEMM operands bf16 with fp32 accumulation and fp32 results;
  cell state, gates, noise and gradients stay fp32. The plain (cuDNN) and reference paths stay fp32, so an
  `lstm` baseline and every evaluation of a bf16 trial are still fp32.

Because the maths does not depend on the device under this policy, the device is not part of a model's training
key (`TrialConfig.training_key`): a model trained on a GPU is re-scored by a CPU trial and the other way round.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from trainables import g2lstm_kernels
from trainables.config import TrainConfig


def use_ieee_fp32() -> None:
    """No TF32 in cuBLAS or cuDNN (conv and RNN), through the legacy flags that every reader of them accepts."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def trial_device(train: TrainConfig, gpu_ids: Sequence | None = None) -> torch.device:
    """The trial's device; refuses, before any work, the execution knobs this worker cannot honour.

    Args:
        gpu_ids: the GPUs Ray gave this trial (`ray.get_gpu_ids()`), None outside Ray. Ray 2.60 no longer hides
            the GPUs from a worker given none, so `auto` must not read `torch.cuda.is_available()` there: a
            "CPU" trial would train on GPU 0 outside Ray's accounting.
    """
    visible = torch.cuda.is_available()
    granted = visible if gpu_ids is None else bool(gpu_ids) and visible
    if train.device == "cuda" and not granted:
        why = ("this trial was given no GPU (set study.gpus_per_trial > 0)" if gpu_ids is not None and visible
               else "CUDA is not available on this worker")
        raise ValueError(f"train.device='cuda' but {why}; use 'auto' or 'cpu'")
    device = torch.device("cuda" if train.device == "cuda" or (train.device == "auto" and granted) else "cpu")
    fused = g2lstm_kernels.fused_available(device)
    if train.impl == "fused" and not fused:
        raise ValueError(f"train.impl='fused' needs a CUDA device and triton, this trial runs on {device}; "
                         f"use train.impl='auto' (the fused path on CUDA, the reference elsewhere)")
    if train.precision == "bf16" and not fused:
        raise ValueError(f"train.precision='bf16' applies to the fused path (CUDA with triton), this trial runs "
                         f"on {device}; use train.precision='fp32'")
    return device


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG state a trial on `device` draws from; a CPU trial never touches CUDA, even where it is visible."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state`; a CUDA state is restored only for a CUDA trial (a CPU resume of a GPU run skips it).

    States are CPU ByteTensors whatever the device: load checkpoints with `map_location="cpu"`.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        cuda_state = state["cuda"]
        if isinstance(cuda_state, (list, tuple)):   # checkpoints written before the per-device state
            cuda_state = cuda_state[device.index or 0]
        torch.cuda.set_rng_state(cuda_state, device)


def _as_tuple(value):
    """random.setstate wants the nested tuples back that torch.save may have turned into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
