"""Shared test fixtures: seeded RNGs, the location of the real corpora, interpreted and compiled Triton kernels."""
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from trainables import g2lstm_kernels
from trainables.corpora import find_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = "interpreted_kernels"   # marks tests that run the fused kernels on CPU tensors


def pytest_configure(config):
    config.addinivalue_line("markers", f"{INTERPRETED}: runs the Triton kernels in the CPU interpreter")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one intra-op thread: a second only adds syncs, and on a busy machine OpenMP's spin-waiting
    made the translation tests 10× slower with two threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _triton_kernels(request):
    """Import triton and jit the kernels for the CPU interpreter, before any test runs them, if this session has
    tests marked `interpreted_kernels`.

    `triton.jit` reads TRITON_INTERPRET as it decorates: triton's own library functions on its first import, ours
    in `_load_triton()`, once per process. So the variable is set only around that: later tests and their
    subprocesses (Ray heads and workers, compiled re-runs) never see it. A compiled re-run (G2_TRITON_COMPILED=1,
    `rerun_compiled`) leaves the kernels to compile on first use.
    """
    wanted = any(item.get_closest_marker(INTERPRETED) for item in request.session.items)
    if wanted and os.environ.get("G2_TRITON_COMPILED") != "1" and importlib.util.find_spec("triton"):
        if "triton" in sys.modules:
            raise RuntimeError("triton was imported before the session could choose its CPU interpreter: "
                               "test modules must leave importing it to the kernels")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            g2lstm_kernels._load_triton()
    yield


def kernels_interpreted() -> bool:
    """Whether this process has jitted the Triton kernels for the interpreter."""
    triton = g2lstm_kernels.triton
    return triton is not None and not isinstance(g2lstm_kernels._forward_step, triton.runtime.JITFunction)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, poll: float = 0.5) -> None:
    """Poll `check()` until it is true; a TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(poll)


def healthy(url: str) -> bool:
    """Whether an HTTP server answers `url` with 200 (a server still starting refuses the connection)."""
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server_at(root: Path):
    """A real `mlflow server` on 127.0.0.1 with its store and artifacts under `root`; yields its URI."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serving(lambda port: [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                 env, root / "server.log", "mlflow server") as (uri, _):
        yield uri


def g2_mlflow_server(storage: Path, env: dict[str, str], *extra: str):
    """`g2-study mlflow-server` as the README's cluster recipe starts it (credentials in `env`), its store in
    `storage`; a context of (URI, process)."""
    bin_dir = Path(sys.executable).parent
    return serving(lambda port: [str(bin_dir / "g2-study"), "mlflow-server", "--storage", str(storage),
                                 "--port", str(port), *extra],
                   env, storage / "server.log", "the authenticated mlflow server")


@contextlib.contextmanager
def serving(argv_at, env: dict[str, str], log: Path, what: str):
    """The server `argv_at(port)` starts on a free port of 127.0.0.1, until its /health answers; yields (URI,
    process). Its own process group: teardown stops its workers too."""
    port = free_port()
    proc = subprocess.Popen(argv_at(port), env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(f"{uri}/health") or proc.poll() is not None, 120, what)
        assert proc.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        yield uri, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def real_data_dir() -> Path | None:
    """`$G2_DATA_DIR` or `../shared/data` beside the repository, if present."""
    for candidate in (os.environ.get("G2_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def real_corpus(name: str) -> Path:
    """A real corpus by name (`find_corpus`), or a skip saying how to provide it."""
    try:
        return find_corpus(name)
    except FileNotFoundError:
        pytest.skip(f"real corpus {name} not present (set $G2_DATA_DIR or provide ../shared/data)")


def trial_reports(cfg, work_dir: Path, model_store: Path) -> list[dict]:
    """Every report of one real trial as the dict Tune is given, run on one thread (a model this small only loses
    to thread contention)."""
    from trainables.trainable import run_trial

    reports: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_trial(cfg, work_dir, report=lambda report, ckpt: reports.append(report.to_dict()), model_store=model_store)
    finally:
        torch.set_num_threads(threads)
    return reports


@pytest.fixture(scope="session")
def trial_store(tmp_path_factory) -> Path:
    """The model store the `trial` fixture's trial stored its model in: a trial with its knobs re-scores it."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def trial(tmp_path_factory, trial_store):
    """A real tiny LM trial (2 epochs, a 2-rank x 2-bit sweep plus round_clip): its flat config and every report."""
    from trainables.config import SMOKE, TrialConfig

    # the rows' shape is what matters, not the model; binary-gate rows have a test of their own
    fast = {"train.max_batches": 2, "train.max_eval_batches": 2, "sweep.hard_gates": False}
    cfg = TrialConfig.from_flat(SMOKE | fast, base=TrialConfig.preset("lm", "tiny"))
    return cfg.to_flat(), trial_reports(cfg, tmp_path_factory.mktemp("trial"), trial_store)


def rerun_compiled(test_file: str, test_name: str) -> bool:
    """True after re-running a GPU test in a fresh process with compiled Triton kernels, which it must then trust.

    A session with tests marked `interpreted_kernels` jits the kernels for the interpreter (`_triton_kernels`), and
    interpreted kernels cannot be timed or captured in a CUDA graph. False when this process compiles.
    """
    if not kernels_interpreted():
        return False
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"G2_TRITON_COMPILED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test_file}::{test_name}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return True


@pytest.fixture(scope="session")
def real_study(tmp_path_factory):
    """A real tiny study, run once by the `g2-study` command on a local Ray: the toy-grammar LM, smoke budget.

    Its space holds four settings (lstm, g2 × rank 0, 16): two models train, two trials score rank 16 on them alone,
    and the fifth suggestion finds every setting scored, which ends the run."""
    root = tmp_path_factory.mktemp("real_study")
    command = [str(Path(sys.executable).parent / "g2-study"), "run", "--smoke", "--storage", str(root / "studies"),
               "--set", "study.name=real", "--set", "study.preset=tiny", "--set", "data.corpus=toy",
               "--set", f"data.cache_dir={root / 'cache'}", "--set", "study.num_samples=5",
               # a rank the smoke sweep (ranks 0, 8) lacks: trials that score it alone on a stored model
               "--set", "space.compress.rank.choices=[0, 16]"]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": root / "studies" / "real", "storage": root / "studies", "stdout": proc.stdout}


def alive(procs) -> list:
    """The psutil processes of `procs` still running (not gone, not zombies)."""
    import psutil

    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


STUDY = """
[study]
name = "{name}"
task = "lm"
preset = "tiny"
sampler = "{sampler}"
sampler_seed = {sampler_seed}
num_samples = {num_samples}
max_concurrent = {concurrent}

[trial]
"data.cache_dir" = "{cache}"
"train.epochs" = {epochs}
"train.max_batches" = {max_batches}
"train.max_eval_batches" = {max_eval_batches}
"sweep.ranks" = [0, 8]
"sweep.bits" = [32, 4]
"sweep.paper" = ["round_clip"]
"sweep.hard_gates" = false              # binary-gate rows are tested on their own; here they would double the sweep
{space}
"""


def study_file(tmp_path: Path, name: str, *, sampler: str = "tpe", sampler_seed: int = 0, num_samples: int = 6,
               concurrent: int = 2, epochs: int = 3, max_batches: int = 8, max_eval_batches: int = 4,
               space: str = "") -> Path:
    """A tiny toy-grammar LM study config (the smoke budget) for the real-Ray tests; `space` is extra TOML."""
    path = tmp_path / f"{name}.toml"
    path.write_text(STUDY.format(name=name, sampler=sampler, sampler_seed=sampler_seed, num_samples=num_samples,
                                 concurrent=concurrent, epochs=epochs, max_batches=max_batches,
                                 max_eval_batches=max_eval_batches, cache=tmp_path / "cache", space=space))
    return path



def optuna_trial_states(study) -> dict[str, int]:
    """Counts by state of the Optuna trials that became Ray trials (asked for with a Ray trial id); the scored rows
    the search also holds (derived from a trial, or answered from the results) must each be there once."""
    from collections import Counter

    rows = [t.user_attrs["g2.row"] for t in study.trials if "g2.row" in t.user_attrs]
    assert len(rows) == len(set(rows)), "a scored row reached Optuna twice"
    return dict(Counter(t.state.name for t in study.trials if "g2.ray_trial_id" in t.user_attrs))


class DiskLog:
    """The fsyncs and renames this process made, in order: ("fsync", path) and ("replace", source, target)."""

    def __init__(self):
        self.events: list[tuple] = []

    def assert_replaced_durably(self, path: Path) -> None:
        """`path` was renamed into place from a temporary file beside it that was fsynced first, and its
        directory was fsynced after (`trainables/durable.py`)."""
        path = Path(path)
        renames = [i for i, e in enumerate(self.events) if e[0] == "replace" and Path(e[2]) == path]
        assert renames, f"{path} was never renamed into place: {self.events}"
        at = renames[-1]
        temp = Path(self.events[at][1])
        assert temp.parent == path.parent and temp.name.startswith(f".{path.name}."), temp
        assert ("fsync", str(temp)) in self.events[:at], f"{temp} renamed to {path} without an fsync: {self.events}"
        assert ("fsync", str(path.parent)) in self.events[at + 1:], f"{path.parent} not fsynced after the rename"

    def assert_directory_replaced_durably(self, path: Path) -> None:
        """`path` was renamed into place from a staging directory whose files, and itself, were fsynced first."""
        self.assert_replaced_durably(path)
        at = max(i for i, e in enumerate(self.events) if e[0] == "replace" and Path(e[2]) == Path(path))
        staging = Path(self.events[at][1])
        before = {Path(e[1]) for e in self.events[:at] if e[0] == "fsync"}
        for file in Path(path).rglob("*"):
            if file.is_file():
                assert staging / file.relative_to(path) in before, f"{file} not fsynced before the rename"


@pytest.fixture
def disk_log(monkeypatch) -> DiskLog:
    """Records every `os.fsync` (the path of its fd) and `os.replace` of this process, and does them."""
    log = DiskLog()
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        log.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(source, target, **kwargs):
        log.events.append(("replace", os.fspath(source), os.fspath(target)))
        replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return log
