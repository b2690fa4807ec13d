"""Shared test fixtures: seeded RNGs and the location of the real corpora."""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def real_data_dir() -> Path | None:
    """`$G2_DATA_DIR` or `../shared/data` beside the repository, if present."""
    for candidate in (os.environ.get("G2_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
