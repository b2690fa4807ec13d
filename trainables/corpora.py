"""Where the study's corpora live: `$G2_DATA_DIR`, `../shared/data` beside the repository, or a path, and the cache.

Corpora are never copied into the repository (docs/design.md §4): they are read from `$G2_DATA_DIR` or `../shared/data`
beside the repository root, and generated corpora and BPE models are cached wherever the caller says. A corpus
folder holds one file per split in `SPLITS`; `trainables/lm_data.py` and `trainables/parallel_data.py` read them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "G2_DATA_DIR"
SPLITS = ("train", "valid", "test")


def default_data_dir() -> Path:
    """`<repo root>/../shared/data`, where the repo root is the parent of the `trainables` package."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def cache_root(cache_dir: str = "") -> Path:
    """Where generated corpora and BPE models are cached: `data.cache_dir`, else ~/.cache/g2-study."""
    return Path(cache_dir or Path.home() / ".cache" / "g2-study").expanduser()


def find_corpus(name: str, data_dir: str | None = None) -> Path:
    """Resolve a corpus name (`ptb`, `wikitext-2`, `multi30k`) or an existing path to its directory.

    Looks in `data_dir` (if given), `$G2_DATA_DIR` (if set), `../shared/data`, and finally `name` as a path,
    taking the first that exists, so a cluster can point at shared storage without editing configs.
    """
    env = os.environ.get(ENV_VAR)
    places: list[tuple[Path, str]] = []
    if data_dir:
        places.append((Path(data_dir).expanduser() / name, "data_dir"))
    if env:
        places.append((Path(env).expanduser() / name, f"${ENV_VAR}={env}"))
    places.append((default_data_dir() / name, "../shared/data beside the repository"))
    places.append((Path(name).expanduser(), "as a path"))
    for path, where in places:
        if path.exists():
            log.info("corpus %s: %s (%s)", name, path, where)
            return path
    looked = "; ".join(f"{path} ({where})" for path, where in places[:-1])
    raise FileNotFoundError(
        f"corpus {name!r} not found. ${ENV_VAR} is {env or 'unset'}; looked in: {looked}; "
        f"and {name!r} is not an existing path. Set ${ENV_VAR} to a folder containing {name}/, or pass data_dir."
    )


def read_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only (WikiText holds other Unicode line breaks inside lines)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]
