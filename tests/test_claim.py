"""The driver claim on a study directory: one holder at a time, a dead holder's claim taken over, its Ray ended."""
import json
import os
import re
import socket
import subprocess
import sys

import psutil
import pytest

from study.claim import CLAIM_FILE, DriverClaim, DriverInfo, StudyBusyError


def test_a_second_claim_is_refused_with_the_holder_named_and_free_after_release(tmp_path):
    printed = []
    with DriverClaim(tmp_path / "s", "s", printed.append):
        info = json.loads((tmp_path / "s" / CLAIM_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(StudyBusyError, match=re.escape(f"study s is being run by pid {os.getpid()} on host "
                                                           f"{socket.gethostname()} since {info['started']}")):
            DriverClaim(tmp_path / "s", "s").acquire()   # flock: another open file description, even in-process
    assert not (tmp_path / "s" / CLAIM_FILE).exists()
    with DriverClaim(tmp_path / "s", "s", printed.append):
        pass
    assert printed == []                                   # a clean release leaves nothing to take over


def test_a_dead_drivers_claim_is_taken_over_and_only_its_own_ray_processes_ended(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    # a stand-in for a leftover `ray::DashboardAgent`, and a process that is not the recorded one (pid reused)
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ray::DashboardAgent"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ray::RuntimeEnvAgent"])
    try:
        created = psutil.Process(leftover.pid).create_time()
        DriverInfo(host=socket.gethostname(), pid=999_999, started="2026-01-01T00:00:00+00:00", command="g2-study run",
                   ray_processes=[[leftover.pid, created, "ray::DashboardAgent"],
                                  [other.pid, created - 100.0, "ray::RuntimeEnvAgent"]]).write(root / CLAIM_FILE)
        printed = []
        with DriverClaim(root, "s", printed.append):
            assert leftover.wait(10) == -9                 # SIGKILL: the agents ignore SIGTERM
            assert other.poll() is None                    # another start time: another process, left alone
        assert "the driver pid 999999 on host" in printed[0] and "taking over" in printed[0]
        assert printed[1].startswith(f"  ended 1 leftover Ray process(es) of its local Ray: {leftover.pid} ")
    finally:
        for proc in (leftover, other):
            proc.kill()
            proc.wait(10)


def test_the_claim_records_the_ray_processes_below_the_driver(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ray::IDLE"])
    try:
        with DriverClaim(tmp_path / "s", "s") as claim:
            claim.watch_local_ray("/tmp/ray/session_x")
            info = DriverInfo.read(tmp_path / "s" / CLAIM_FILE)
            assert info.ray_session == "/tmp/ray/session_x"
            assert child.pid in [p[0] for p in info.ray_processes]   # (and any Ray this process started)
    finally:
        child.kill()
        child.wait(10)
