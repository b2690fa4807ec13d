"""Checkpoints that resume a trial exactly: state dicts, the flat config, loop state and every RNG state.

Only tensors and plain containers are stored, never a pickled module, so loading uses `weights_only=True`.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
BEST_MODEL_FILE = "best_model.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate wants the nested tuples back that torch.save may have turned into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write, then renames it into place: a killed process never
    leaves a half-written file, and a concurrent reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    yield tmp
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    with written_aside(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict,
                    epoch: int, loop: dict, task: dict) -> Path:
    """Everything needed to continue after `epoch` as if never stopped. Returns the file written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
                 "epoch": epoch, "loop": loop, "task": task, "rng": rng_state()}, path)
    return path


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)


def save_model(path: Path, model: nn.Module, config: dict) -> None:
    """The best weights alone (what the compression sweep and checkpoint reuse need)."""
    atomic_save({"model": model.state_dict(), "config": config}, path)


def load_model(path: Path, model: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(saved["model"])
    return saved
