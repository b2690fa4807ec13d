"""What the test session leaves behind for later tests and their subprocesses (collected after the kernels' tests).

The kernels' tests run Triton's CPU interpreter in this process; TRITON_INTERPRET must not outlive them, or every
later subprocess (a Ray head and its workers, a compiled GPU re-run) would interpret its kernels too.
"""
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_the_interpreter_does_not_leak_into_the_environment():
    assert "TRITON_INTERPRET" not in os.environ
    code = "import os; print('TRITON_INTERPRET' in os.environ)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
