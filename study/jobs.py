"""A study submitted from a laptop as a Ray Job, and followed there by its name.

    g2-study submit CONFIG --address http://127.0.0.1:8265 --storage /shared/g2-studies [--tracking-uri URI]
    g2-study status NAME --address http://127.0.0.1:8265
    g2-study logs NAME --address http://127.0.0.1:8265 [--follow]

The job runs `g2-study run` on the head with the g2-study installed there (the nodes need the package anyway, for
their trials); only the study's TOML travels, inside the entrypoint as a here-document read from standard input
(Ray 2.60 removes a job's uploaded working directory from under its driver once the driver joins the cluster). The
config is validated here first, and again on the head. Each job carries the study's name, storage and tracking URI
as metadata, so `status` and `logs` find a study's newest job by name. `status` runs `g2-study status` on the head as a short job of its own:
the storage is the head's, not the laptop's. The job inherits the environment of the head's `ray start`, so
credentials such as MLFLOW_TRACKING_PASSWORD stay on the head and never pass through Ray's job table.
"""
from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from study.config import STDIN, StudyConfig

STUDY_KEY, STORAGE_KEY, TRACKING_KEY = "g2.study", "g2.storage", "g2.tracking_uri"
END_OF_CONFIG = "G2_STUDY_TOML"       # the here-document's delimiter: no line of a TOML file is a bare word
STATUS_TIMEOUT_S = 120
AGENT_WAIT_S = 120


@dataclass(frozen=True)
class StudyJob:
    """The newest Ray Job of a study, as the job server reports it."""
    submission_id: str
    status: str                       # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    storage: str
    start_time: float | None          # seconds since the epoch

    def line(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time)) if self.start_time else "-"
        return f"job {self.submission_id}: {self.status} (started {started}; storage {self.storage})"


def job_server_url(address: str | None, option: str = "--address") -> str:
    if not address or not address.startswith(("http://", "https://")):
        raise ValueError(f"{option} must be the Ray job server's URL, e.g. http://127.0.0.1:8265 (through "
                         f"`ssh -L 8265:127.0.0.1:8265 HEAD`), got {address!r}")
    return address.rstrip("/")


def client(address: str):
    """A job client; the cluster's token comes from RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, as for `ray job`."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(job_server_url(address))
    except ConnectionError as err:
        raise ValueError(f"cannot reach the Ray job server at {address} (--address): {err}") from None


def run_command(config_text: str, storage: str, tracking_uri: str | None, overrides: list[str],
                num_samples: int | None, smoke: bool, executable: str) -> str:
    """The job's entrypoint: `g2-study run` on the head, the same study as validated here."""
    argv = [executable, "run", STDIN, "--address", "auto", "--storage", storage]
    if tracking_uri:
        argv += ["--tracking-uri", tracking_uri]
    if num_samples is not None:
        argv += ["--num-samples", str(num_samples)]
    if smoke:
        argv.append("--smoke")
    for override in overrides:
        argv += ["--set", override]
    return f"{shlex.join(argv)} <<'{END_OF_CONFIG}'\n{config_text.rstrip()}\n{END_OF_CONFIG}\n"


def submit(cfg: StudyConfig, config_path: Path, address: str, overrides: list[str],
           num_samples: int | None, smoke: bool, executable: str) -> str:
    """Submit the validated study `cfg`; the submission id."""
    if not PurePosixPath(cfg.storage).is_absolute():
        raise ValueError(f"--storage must be an absolute path on the cluster (one directory all nodes share), "
                         f"got {cfg.storage!r}")
    jobs = client(address)
    submission_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _while_agent_starts(lambda: jobs.submit_job(
        entrypoint=run_command(config_path.read_text(), cfg.storage, cfg.tracking_uri or None, overrides,
                               num_samples, smoke, executable),
        submission_id=submission_id,
        metadata={STUDY_KEY: cfg.name, STORAGE_KEY: cfg.storage, TRACKING_KEY: cfg.tracking_uri or ""}))
    return submission_id


def _while_agent_starts(call, timeout_s: float = AGENT_WAIT_S):
    """A head started seconds ago answers "No available agent to submit job" until its job agent is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def newest_job(jobs, name: str) -> StudyJob:
    """The newest job of study `name` that the job client `jobs` lists."""
    ours = [job for job in jobs.list_jobs() if (job.metadata or {}).get(STUDY_KEY) == name]
    if not ours:
        raise ValueError(f"no Ray Job of study {name!r} at {jobs.get_address()}: submit it with `g2-study submit`")
    job = max(ours, key=lambda j: j.start_time or 0)
    return StudyJob(job.submission_id, job.status.value, job.metadata[STORAGE_KEY],
                    job.start_time / 1000 if job.start_time else None)   # Ray gives milliseconds


def remote_status(address: str, name: str, executable: str, extra: list[str]) -> tuple[StudyJob, str]:
    """The study's job, and what `g2-study status` prints on the head."""
    jobs = client(address)
    job = newest_job(jobs, name)
    probe = _while_agent_starts(lambda: jobs.submit_job(
        entrypoint=shlex.join([executable, "status", name, "--storage", job.storage, *extra]),
        metadata={"g2.status_of": name}))
    deadline = time.monotonic() + STATUS_TIMEOUT_S
    while jobs.get_job_status(probe).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            jobs.stop_job(probe)
            raise ValueError(f"`g2-study status` did not finish on the cluster in {STATUS_TIMEOUT_S} s "
                             f"(job {probe})")
        time.sleep(0.5)
    output = driver_output(jobs.get_job_logs(probe))
    jobs.delete_job(probe)            # a probe is not worth keeping in the cluster's job list
    return job, output


def driver_output(logs: str) -> str:
    """A job's log without the lines Ray writes before its entrypoint ("Running entrypoint for job ...")."""
    head, marker, rest = logs.partition("Running entrypoint for job ")
    return rest.partition("\n")[2] if marker else logs


def print_logs(address: str, name: str, follow: bool) -> int:
    jobs = client(address)
    job = newest_job(jobs, name)
    if not follow:
        sys.stdout.write(jobs.get_job_logs(job.submission_id))
        sys.stdout.flush()
        return 0

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job.submission_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())               # ends when the job does
    return 0


def follow_hint(address: str, name: str) -> str:
    return (f"  g2-study status {name} --address {address}\n"
            f"  g2-study logs {name} --address {address} --follow")
