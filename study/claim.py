"""One driver per study: a claim on the study directory, held for the driver's lifetime.

Two drivers of one study would run its trials twice and write one directory at once. The claim is an exclusive
`flock` on `<study>/driver.lock`, taken without waiting, plus `<study>/driver.json` saying who holds it:

    {"host": "...", "pid": 1234, "started": "2026-...Z", "command": "g2-study run ...", "ray_session": "...",
     "ray_processes": [[pid, create_time, name], ...]}

The kernel drops the lock when its process dies, however it dies, so a claim left by a SIGKILLed driver is
recognised by the lock being free while `driver.json` still exists — never by guessing from a pid. The next
driver takes it over and, on the same host, ends what the dead driver's private local Ray left running
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent` and idle workers outlive a killed driver and never exit):
each recorded process is killed only if it is still the same process (same pid *and* start time) and
still looks like Ray.

The lock needs a filesystem with working `flock` (local disk, NFSv4, Lustre), as the model store does.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from trainables.durable import write_json

log = logging.getLogger(__name__)
LOCK_FILE, CLAIM_FILE = "driver.lock", "driver.json"
WATCH_INTERVAL_S = 2.0   # how often a driver with a local Ray records that Ray's processes


class StudyBusyError(RuntimeError):
    """Another driver is running this study now."""


@dataclass
class DriverInfo:
    """Who holds a study's claim, and the local Ray processes to end if that driver dies without releasing it."""

    host: str
    pid: int
    started: str                                    # ISO time, UTC
    command: str
    ray_session: str = ""                           # the local Ray's session directory ("" = none / a cluster)
    ray_processes: list[list] = field(default_factory=list)   # [pid, create_time, name]

    @classmethod
    def read(cls, path: Path) -> DriverInfo | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:   # written by something else (writes are whole and fsynced)
            log.warning("ignoring unreadable %s: %s", path, err)
            return None

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started}"


def ray_processes(root_pid: int) -> list[list]:
    """[pid, create_time, name] of the Ray processes below `root_pid` (a driver's private local Ray)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            name = " ".join(child.cmdline()) or child.name()
            if "ray" in name.lower():
                found.append([child.pid, child.create_time(), name[:120]])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(found)


def end_leftovers(info: DriverInfo) -> list[str]:
    """Kill the recorded local Ray processes of a dead driver that are still the same processes; their names.

    They ignore SIGTERM (docs/design.md §9), hence SIGKILL. A pid now used by another process has another start time,
    and is left alone.
    """
    import psutil

    if info.host != socket.gethostname():
        return []
    ended = []
    for proc in [*_recorded(info), *_workers_of(info)]:
        try:
            name = (proc.cmdline() or [proc.name()])[0]
            proc.kill()
            ended.append(f"{proc.pid} {name}")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            log.warning("could not end leftover Ray process %d: access denied", proc.pid)
    return ended


def _recorded(info: DriverInfo) -> list:
    """The recorded processes that are still the same processes (pid and start time) and still look like Ray."""
    import psutil

    found = []
    for pid, created, _ in info.ray_processes:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.05 and "ray" in (" ".join(proc.cmdline()) or proc.name()).lower():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _workers_of(info: DriverInfo) -> list:
    """Workers its raylet started after the last record: Ray gives each `RAY_RAYLET_PID` in its environment."""
    import psutil

    raylets = {str(pid): created for pid, created, name in info.ray_processes if "raylet" in name}
    recorded = {pid for pid, _, _ in info.ray_processes}
    found = []
    for proc in psutil.process_iter(["pid", "create_time", "cmdline"]):
        try:
            if proc.pid in recorded or not (proc.info["cmdline"] or [""])[0].startswith("ray::"):
                continue
            raylet = proc.environ().get("RAY_RAYLET_PID")
            if raylet in raylets and proc.info["create_time"] >= raylets[raylet]:
                found.append(proc)
        except psutil.Error:
            continue
    return found


class DriverClaim:
    """The claim of one driver on one study directory; a context manager that refuses a second driver.

    Args:
        root: the study directory (created if missing).
        name: the study's name, for messages.
        printer: where a takeover is reported (the user should know what was cleaned up).
    """

    def __init__(self, root: Path, name: str, printer: Callable[[str], None] = print):
        self.root, self.name, self.printer = Path(root), name, printer
        self._fd: int | None = None
        self._info: DriverInfo | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def info_path(self) -> Path:
        return self.root / CLAIM_FILE

    def __enter__(self) -> DriverClaim:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the claim at once or raise StudyBusyError naming the driver that holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)   # O_CLOEXEC: Ray's children
        try:                                                                  # must not inherit the lock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = DriverInfo.read(self.info_path)
            who = holder.describe() if holder else "another driver (starting: it has not written driver.json yet)"
            raise StudyBusyError(f"study {self.name} is being run by {who}; wait for it to end, or stop it "
                                 f"(Ctrl-C in its terminal, then `g2-study resume {self.name}`)") from None
        self._fd = fd
        stale = DriverInfo.read(self.info_path)
        if stale is not None:
            self._take_over(stale)
        self._info = DriverInfo(host=socket.gethostname(), pid=os.getpid(),
                                started=datetime.now(UTC).isoformat(timespec="seconds"),
                                command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        self._info.write(self.info_path)

    def _take_over(self, stale: DriverInfo) -> None:
        """The lock was free, so the driver that wrote `stale` is gone: say so and end what it left running."""
        ended = end_leftovers(stale)
        self.printer(f"study {self.name}: the driver {stale.describe()} ended without releasing the study "
                     f"(killed?); taking over")
        if ended:
            self.printer(f"  ended {len(ended)} leftover Ray process(es) of its local Ray: {', '.join(ended)}")

    def watch_local_ray(self, session_dir: str) -> None:
        """Record this driver's local Ray processes now and as workers come and go, for a takeover to end."""
        if self._info is None:
            raise RuntimeError("DriverClaim.acquire() must be called first")
        self._info.ray_session = session_dir
        self._record()
        self._watcher = threading.Thread(target=self._watch, name="g2-claim-watch", daemon=True)
        self._watcher.start()

    def _record(self) -> None:
        processes = ray_processes(os.getpid())
        if self._info is not None and processes != self._info.ray_processes:
            self._info.ray_processes = processes
            self._info.write(self.info_path)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self._record()
            except OSError as err:   # a full disk must not end the study; a takeover then ends fewer leftovers
                log.warning("could not record the local Ray processes in %s: %s", self.info_path, err)

    def release(self) -> None:
        """Remove driver.json and drop the lock (the lock file stays: removing it would race a new driver)."""
        if self._fd is None:
            return
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        try:
            self.info_path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self._info = None, None

