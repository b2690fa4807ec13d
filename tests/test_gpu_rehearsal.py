"""The GPU acceptance run rehearsed on CPU: what can go wrong on an offline GPU machine before a GPU is involved.

The machine gets a bare copy of the checkout (nothing pip-installed, nothing on PYTHONPATH), so the checks run from
such a copy here, with an interpreter that sees this venv's packages but not the editable install of this checkout.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CHECK_NAMES = ["layers", "gpu-tests", "bench-awd", "bench-medium", "bench-nmt", "study", "ptb-medium"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def other_python(version: str) -> str | None:
    """A CPython `version` beside this one (pyenv keeps them side by side) that runs, or None."""
    for candidate in [*Path(sys.base_prefix).parent.glob(f"{version}*/bin/python{version}"),
                      shutil.which(f"python{version}")]:
        if candidate and subprocess.run([str(candidate), "-c", ""], capture_output=True).returncode == 0:
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def bare_checkout(tmp_path_factory) -> Path:
    """The checkout's files (tracked and new, not ignored) copied elsewhere, as the GPU machine receives them."""
    dest = tmp_path_factory.mktemp("copy") / "g2-study"
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """An interpreter with this venv's packages on sys.path but not the editable install of the checkout: a venv
    whose .pth names this venv's site-packages as plain paths, so the .pth files in there (the editable finder's)
    are never run."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site_dir) / "this-venv.pth").write_text("\n".join(ours) + "\n")
    probe = subprocess.run([str(python), "-c", "import torch, ray; import trainables"], cwd=venv, env=bare_env(),
                           capture_output=True, text=True)
    assert "No module named 'trainables'" in probe.stderr, probe.stderr   # the packages, not the checkout
    return str(python)


def bare_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    return {**env, **extra}


def gpu_checks(python: str, checkout: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([python, "benchmarks/gpu_checks.py", *args], cwd=checkout, env=bare_env(),
                          capture_output=True, text=True, timeout=timeout)


def summary(out: Path) -> dict:
    return {row["check"]: row for row in json.loads((out / "summary.json").read_text())}


def test_dry_run_from_a_bare_copy_finds_everything_each_check_imports(bare_checkout, bare_python):
    proc = gpu_checks(bare_python, bare_checkout, "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == CHECK_NAMES
    assert all(line.endswith(": ready") for line in lines), proc.stdout   # `trainables`, `study` found in the copy


@pytest.mark.slow
def test_layers_from_a_bare_copy_on_the_cpu_interpreter(bare_checkout, bare_python, tmp_path):
    """`--device cpu` runs the fused rows in Triton's interpreter; every row in IEEE fp32 (TF32 off)."""
    proc = gpu_checks(bare_python, bare_checkout, "--only", "layers", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {(r["gate_mode"], r["impl"], r["precision"]): r for r in summary(tmp_path)["layers"]["rows"]}
    assert len(rows) == 15 and all(r["ok"] for r in rows.values())
    assert not any(r["tf32"] for r in rows.values())                     # use_ieee_fp32() ran before the rows
    assert rows["lstm", "auto", "fp32"]["path"] == "plain" and rows["g2", "fused", "bf16"]["path"] == "fused"
    assert rows["g2", "fused", "fp32"]["max_rel_error"] < 1e-4          # the same noise reached the reference
    assert "layers" in proc.stdout.splitlines()[-1]                    # the summary table closes the output


@pytest.mark.slow
def test_study_check_runs_its_own_grid_once_through_ray_on_cpu(bare_checkout, bare_python, tmp_path):
    """benchmarks/gpu_study.toml through `g2-study run` and real Ray, gpus_per_trial = 0: the trials it asserts."""
    proc = gpu_checks(bare_python, bare_checkout, "--only", "study", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + (tmp_path / "study.err.log").read_text()[-3000:]
    rows = summary(tmp_path)["study"]["rows"]
    points = sorted((r["g2.gate_mode"], r["seed"]) for r in rows)
    assert points == [("g2", 1111), ("g2", 2222), ("lstm", 1111), ("lstm", 2222)]
    assert {r["status"] for r in rows} == {"ok"} and {r["device"] for r in rows} == {"cpu"}


def test_missing_python_and_modules_are_named_before_any_check_runs(tmp_path):
    """An interpreter without the packages (or too old for tomllib): each check says what it lacks, no traceback."""
    bare312, old = other_python("3.12"), other_python("3.10")
    if not (bare312 or old):
        pytest.skip("no python3.12 or python3.10 beside this interpreter")
    for python in filter(None, (bare312, old)):
        out = tmp_path / Path(python).name
        proc = subprocess.run([python, "-I", "benchmarks/gpu_checks.py", "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env=bare_env())
        assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
        checks = summary(out)
        assert list(checks) == CHECK_NAMES and not any(c["ok"] for c in checks.values())
        if python == old:
            assert all(c["detail"].startswith("Python 3.10") and ">= 3.11" in c["detail"] for c in checks.values())
            continue
        for check in checks.values():
            assert check["detail"].startswith("not installed: torch, triton"), check["detail"]
        assert "pytest_timeout (pytest-timeout)" in checks["gpu-tests"]["detail"]
        study = checks["study"]["detail"]
        for named in ("ray (ray[tune]==2.60.0)", "optuna", "mlflow (mlflow-skinny==3.17.2", "sacrebleu",
                      "sentencepiece", "matplotlib", "psutil", "tqdm", "pandas", "pyarrow"):
            assert named in study, study


def test_a_timed_out_check_loses_its_whole_process_group(tmp_path):
    """What a timed-out check started (pytest's compiled re-runs, say) must not keep the GPU busy afterwards."""
    checks = load_script("gpu_checks")
    pid_file = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time; "
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             f"open({str(pid_file)!r}, 'w').write(str(g.pid)); time.sleep(120)")
    start = time.monotonic()
    proc = checks.run_logged(argparse.Namespace(out=tmp_path, device="cuda"), "sleeper", [sys.executable, "-c", child],
                             timeout=3)
    assert proc.returncode == 124 and "process group was killed" in proc.stderr
    assert time.monotonic() - start < 60
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(grandchild):
        os.kill(grandchild, 9)
        pytest.fail("the timed-out command's child survived it")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_step_kernels_compile_for_hopper_without_a_gpu():
    """Triton's real compiler, an sm_90 target: PTX and cubin for every variant the training code launches."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_compile.py", "--arch", "90", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=bare_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    rows = report["rows"]
    assert rows and all(r["ok"] for r in rows)
    built = {(r["shape"], r["kernel"], r["noise"], r["precision"], r["record"]) for r in rows}
    for shape in ("awd", "medium", "tiny"):
        for noise in (True, False):
            for precision in ("fp32", "bf16"):
                assert (shape, "_backward_step", noise, precision, False) in built
                for record in (False, True):
                    assert (shape, "_forward_step", noise, precision, record) in built
    assert {r["constexprs"]["BLOCK"] for r in rows} == {256} and all(r["cubin_bytes"] > 0 for r in rows)


# --------------------------------------------------------------------------- the offline bundle

def make_wheel(path: Path, name: str, version: str, members: dict[str, bytes], requires=()) -> Path:
    """A real (pure-Python) wheel with a correct RECORD."""
    bundle = load_script("gpu_bundle")
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {**members, f"{info}/METADATA": meta.encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    whl = path / f"{name}-{version}-py3-none-any.whl"
    record = "".join(f"{n},{bundle.record_hash(d)},{len(d)}\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(zipfile.ZipInfo(n) if not n.endswith("tool") else executable(n), d)
        z.writestr(f"{info}/RECORD", record)
    return whl


def executable(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o100755 << 16
    return info


def test_repacked_wheel_drops_the_jar_keeps_the_rest_and_installs(tmp_path):
    bundle = load_script("gpu_bundle")
    src = make_wheel(tmp_path, "jarful", "1.0", {"jarful/__init__.py": b"ANSWER = 42\n",
                                                 "jarful/jars/workers.jar": os.urandom(4096),
                                                 "jarful/core/tool": b"#!/bin/sh\necho ok\n"})
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / src.name
    dropped = bundle.repack(src, dest, ("jarful/jars/",), "repacked for a test\n")
    assert [d["member"] for d in dropped] == ["jarful/jars/workers.jar"]
    assert bundle.record_problems(dest) == []
    with zipfile.ZipFile(dest) as z:
        assert "jarful/jars/workers.jar" not in z.namelist() and "jarful-1.0.dist-info/G2_BUNDLE" in z.namelist()
        assert z.getinfo("jarful/__init__.py").compress_type == zipfile.ZIP_LZMA
    # a copy that only deletes the member leaves RECORD naming it: the check sees that
    stale = tmp_path / "stale" / src.name
    stale.parent.mkdir()
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(stale, "w") as out:
        for info in z.infolist():
            if "jars/" not in info.filename:
                out.writestr(info, z.read(info))
    assert bundle.record_problems(stale) == ["jarful/jars/workers.jar: listed, not in the wheel"]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(site), str(dest)], check=True, capture_output=True)
    probe = subprocess.run([sys.executable, "-c", "import jarful; print(jarful.ANSWER)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.stdout.strip() == "42" and not (site / "jarful" / "jars").exists()
    assert os.access(site / "jarful" / "core" / "tool", os.X_OK)     # raylet and gcs_server stay executable


def test_closure_check_names_what_the_wheel_set_leaves_unmet(tmp_path):
    bundle = load_script("gpu_bundle")
    wheels = [make_wheel(tmp_path, "top", "1.0", {}, ["mid>=2", "numpy>=1.26", "opt; extra == 'fast'",
                                                       "old; python_version < '3.9'"]),
              make_wheel(tmp_path, "mid", "1.5", {}, ["leaf"]),
              make_wheel(tmp_path, "stray", "0.1", {})]
    problems = bundle.closure_problems(wheels, ["top[fast]"], frozenset({"numpy"}))
    assert sorted(problems) == sorted(["mid>=2 (for top 1.0): the bundle has mid 1.5",
                                       "leaf (for mid 1.5) is neither in the bundle nor on the machine",
                                       "opt; extra == \"fast\" (for top 1.0) is neither in the bundle nor on the machine",
                                       "stray: bundled but nothing requires it"])
    assert bundle.closure_problems(wheels[:1], ["top"], frozenset({"numpy", "mid"})) == []


def built_bundle() -> Path | None:
    folder = Path(os.environ.get("G2_GPU_BUNDLE", REPO / "gpu-bundle"))
    return folder if (folder / "BUNDLE.json").is_file() else None


@pytest.mark.skipif(built_bundle() is None, reason="no built bundle (gpu-bundle/ or $G2_GPU_BUNDLE): "
                                                   "bash benchmarks/gpu_bundle.sh downloads its wheels from PyPI")
def test_built_bundle_is_closed_fits_and_installs_with_no_index(tmp_path):
    folder = built_bundle()
    bundle = load_script("gpu_bundle")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bundle.py", "check", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((folder / "BUNDLE.json").read_text())
    names = [w["file"] for w in manifest["wheels"]]
    assert sorted(names) == sorted(p.name for p in (folder / "wheels").glob("*.whl"))
    for name in names:   # each installs on CPython 3.12, x86-64 Linux
        tags = name[:-4].split("-")[-3:]
        assert tags[0] in ("py3", "py2.py3", "cp312") or tags[1] == "abi3", name
        assert tags[2] == "any" or "x86_64" in tags[2] and "manylinux" in tags[2], name
    (ray,) = [n for n in names if n.startswith("ray-2.60.0-")]
    assert [d["member"] for d in manifest["repacked"][ray]["dropped"]] == ["ray/jars/ray_dist.jar"]
    assert not {"mlflow", "torch", "numpy"} & {bundle.wheel_name(Path(n))[0] for n in names}
    python = other_python("3.12")
    if python is None:
        pytest.skip("no python3.12 here to install the cp312 wheels with")
    site = tmp_path / "site"
    install = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                              str(folder / "wheels"), "--target", str(site), "--no-compile",
                              *map(str, (folder / "wheels").glob("*.whl"))], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # a bare python3.12 has none of the machine's packages: what is unmet must be exactly those
    verify = subprocess.run([python, str(REPO / "benchmarks" / "gpu_bundle.py"), "verify", str(folder), "--site",
                             str(site)], capture_output=True, text=True, env={**bare_env(), "PYTHONPATH": str(site)})
    unmet = {Requirement(line.split(" needs ")[1].rsplit(":", 1)[0]).name for line in verify.stdout.splitlines()[1:]}
    assert verify.returncode == 1 and {bundle.canonical(u) for u in unmet} <= bundle.MACHINE_HAS, verify.stdout


def test_ptb_medium_fails_a_run_that_did_not_learn_and_reports_the_bf16_gap(tmp_path):
    """The bf16-vs-fp32 gap after 400 batches was never measured on a GPU: reported against its target, while a
    diverged or non-learning run (no better than word frequencies) fails the check."""
    checks = load_script("gpu_checks")
    (tmp_path / "train.txt").write_text("a a b\n")
    (tmp_path / "valid.txt").write_text("a b\n")
    assert abs(checks.unigram_perplexity(tmp_path) - (1 / (0.5 * 0.25 * 0.25)) ** (1 / 3)) < 1e-9

    def rows(fp32, bf16, rc=0):
        return [{"precision": "fp32", "rc": 0, "val_ppl": fp32}, {"precision": "bf16", "rc": rc, "val_ppl": bf16}]
    apart = checks.judge_ptb(rows(300.0, 321.0), unigram=687.0)
    assert apart.ok and "bf16 +7.0% vs fp32" in apart.detail and "missed" in apart.detail
    close = checks.judge_ptb(rows(300.0, 303.0), unigram=687.0)
    assert close.ok and "missed" not in close.detail
    for broken in (rows(300.0, float("nan")), rows(300.0, 700.0), rows(300.0, None), rows(300.0, 301.0, rc=1)):
        assert not checks.judge_ptb(broken, unigram=687.0).ok
