"""The model store: the best weights of every trained configuration of a study, keyed by its training knobs.

Many trials of a study differ only in how the trained model is compressed (every `lstm` trial of the default
space shares one set of training knobs), so a trial whose knobs were trained already re-scores that model instead
of training it again. A trial whose knobs another trial is training right now waits for that model rather than
train a second copy beside it: the trainer holds an exclusive lock on `<key>.lock` for as long as it trains. The
kernel drops the lock when its process ends, however it ends (finished, diverged, stopped by a scheduler,
killed), so a waiter never waits on a dead trial; finding no model then, it trains the knobs itself. On a cluster
the store lives on the shared study directory: use a filesystem with working `flock` (local disk, NFSv4, Lustre);
where locking fails, trials go on without it and may train copies.

    <root>/<key>/best_model.pt   the weights (`checkpoint.save_model`)
    <root>/<key>/meta.json       epochs and timings of the run that trained them; written last, so it marks a
                                 complete entry
    <root>/<key>/diverged.json   instead, the report of a run that diverged: the knobs and seed are the same, so
                                 the next trial would diverge too (barring GPU nondeterminism, or another device
                                 or `train.impl`, which the key leaves out); it reports this instead of training
    <root>/<key>.lock            the trainer's lock (an empty file)
"""
from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from trainables.checkpoint import BEST_MODEL_FILE, load_model, save_model
from trainables.durable import write_json

log = logging.getLogger(__name__)
META_FILE, DIVERGED_FILE = "meta.json", "diverged.json"


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._held: dict[str, Any] = {}   # key -> the open lock file this process holds

    def _release(self, key: str) -> None:
        if (lock := self._held.pop(key, None)) is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, key: str, name: str) -> dict[str, Any] | None:
        path = self.root / key / name
        return json.loads(path.read_text()) if path.exists() else None

    def _write(self, key: str, name: str, content: dict[str, Any]) -> None:
        """Replaced whole (`trainables/durable.py`): a reader sees the whole file or none."""
        (self.root / key).mkdir(parents=True, exist_ok=True)
        write_json(self.root / key / name, content, indent=None)

    def meta(self, key: str) -> dict[str, Any] | None:
        """What the run that trained `key` recorded, or None if no complete model is stored under it."""
        return self._read(key, META_FILE)

    def diverged(self, key: str) -> dict[str, Any] | None:
        """The report of the run of `key` that diverged, or None."""
        return self._read(key, DIVERGED_FILE)

    def publish_diverged(self, key: str, report: dict[str, Any]) -> None:
        """Store a diverged run's report under `key`, unless a model trained there already (a good model wins)."""
        if self.meta(key) is None:
            self._write(key, DIVERGED_FILE, report)
        self._release(key)

    def load(self, key: str, model: nn.Module) -> dict[str, Any]:
        """Load the stored weights of `key` into `model`, on whatever device it lives; returns the meta."""
        load_model(self.root / key / BEST_MODEL_FILE, model)
        return self.meta(key)

    def publish(self, key: str, model: nn.Module, config: dict[str, Any], meta: dict[str, Any]) -> None:
        """Store `model`'s weights under `key`: weights first, meta last, each written aside then renamed, so a
        reader never loads a model that is still being written. `meta` is what the training run records of itself
        (plain JSON). Releases `key` if this process trains it: the trials waiting for the model score it while
        this one still scores its own sweep."""
        (self.root / key).mkdir(parents=True, exist_ok=True)
        save_model(self.root / key / BEST_MODEL_FILE, model, config)
        self._write(key, META_FILE, meta)
        (self.root / key / DIVERGED_FILE).unlink(missing_ok=True)   # another run of these knobs diverged: not this one
        self._release(key)

    def is_training(self, key: str) -> bool:
        """Whether some process holds `key`'s lock now, i.e. trains those knobs (a probe for the study's console).

        A shared lock taken and dropped at once: a trainer that asks for the lock in that instant waits for it
        (`training` blocks), it is not refused. False where the filesystem has no locks.
        """
        path = self.root / f"{key}.lock"
        if not path.exists():
            return False
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return False
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False

    @contextmanager
    def training(self, key: str) -> Iterator[dict[str, Any] | None]:
        """Hold `key`'s lock for the body (or until `publish`); yields the stored meta, if there is a model by the
        time the lock is held.

        Blocks while another process holds the lock, i.e. while another trial trains these knobs.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another trial is training %s: waiting for its model instead of training a copy", key)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as err:   # a filesystem without locks (some FUSE mounts, NFS mounted `nolock`)
                log.warning("cannot lock %s (%s): trials with the same training knobs may train copies", lock.name,
                            err)
                yield self.meta(key)
                return
            self._held[key] = lock
            try:
                yield self.meta(key)
            finally:
                self._release(key)
