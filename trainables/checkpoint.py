"""Checkpoints that resume a trial exactly: state dicts, the flat config, loop state and every RNG state.

Only tensors and plain containers are stored, never a pickled module, so loading uses `weights_only=True`.
Files are replaced whole and fsynced (`trainables/durable.py`): a crash or power cut leaves the previous one.
Everything loads to the CPU first and reaches the model's device through `load_state_dict`: a checkpoint saved
on one device resumes on another, RNG states stay the CPU ByteTensors `torch.set_rng_state` wants, and the
optimiser's `step` counters stay on the host (one on the GPU costs a sync per step).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.durable import save_torch

CHECKPOINT_FILE = "checkpoint.pt"
BEST_MODEL_FILE = "best_model.pt"


def save_checkpoint(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict,
                    epoch: int, loop: dict, task: dict, rng: dict[str, Any]) -> Path:
    """Everything needed to continue after `epoch` as if never stopped. Returns the file written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
                 "epoch": epoch, "loop": loop, "task": task, "rng": rng}, path)
    return path


def load_checkpoint(directory: Path) -> dict[str, Any]:
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def save_model(path: Path, model: nn.Module, config: dict) -> None:
    """The best weights alone (what the compression sweep and checkpoint reuse need)."""
    save_torch({"model": model.state_dict(), "config": config}, path)


def load_model(path: Path, model: nn.Module) -> dict[str, Any]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    return saved
