"""The benchmarks and the GPU acceptance script, run on the CPU: what they would do, and the parts that run here
(the acceptance run rehearsed from a bare copy of the checkout: tests/test_gpu_rehearsal.py)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_checks_dry_run_lists_every_check(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["layers", "gpu-tests", "bench-awd", "bench-medium", "bench-nmt", "study", "ptb-medium"]


def test_gpu_checks_refuses_an_unknown_check():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_checks.py", "--dry-run", "--only", "layers,nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown check(s) ['nope']" in proc.stderr


def test_a_failing_benchmark_candidate_does_not_hide_the_others(monkeypatch, capsys):
    bench = load_script("bench_g2lstm")
    candidates = bench.candidates

    def with_a_broken_one(*args):
        def broken():
            raise RuntimeError("cudnn RNN backward can only be called in training mode")
        return {"broken": broken, **candidates(*args)}
    monkeypatch.setattr(bench, "candidates", with_a_broken_one)
    code = bench.main(["--repeats", "1", "--warmup", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["failed"] == ["broken"]
    assert "training mode" in report["results"]["broken"]["error"]
    timed = {name for name, r in report["results"].items() if "median_ms" in r}
    assert timed == {"nn.LSTM", "g2 (auto)", "g2 reference", "lstm via G2LSTM(auto)", "sharpened via G2LSTM(auto)",
                     "GEMM floor"}
    assert report["results"]["nn.LSTM"]["vs_nn_lstm"] == 1.0 and report["meta"]["tf32"] is False
