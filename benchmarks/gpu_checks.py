"""The acceptance run for a GPU machine: every CUDA-only path checked, the speed figures measured, one table.

    python benchmarks/gpu_checks.py                 # all checks, ~6-8 min on one H100/H200; exit 1 on any failure
    python benchmarks/gpu_checks.py --dry-run       # list the checks and what each needs, run nothing
    python benchmarks/gpu_checks.py --only layers,bench-awd

Checks, in order (each runs even if an earlier one failed):
    layers       forward + backward + an SGD step of G2LSTM for every gate mode x impl x precision at small shapes,
                 against a float64 reference on the CPU fed the same noise
    gpu-tests    the `gpu` tests with compiled Triton kernels (fused path vs reference, CUDA graphs)
    bench-*      the layer benchmark at the AWD, medium and NMT shapes, ratios to cuDNN nn.LSTM in the same run,
                 against the speed targets (below a target is reported, not a failure)
    study        benchmarks/gpu_study.toml through `g2-study run` and real Ray, gpus_per_trial = 0.5: its 4 grid
                 points once each, lstm and g2 trials two at a time on one device, all ok, on cuda
    ptb-medium   two short PTB `medium` LM runs, fp32 and bf16: each must beat the unigram model; the bf16 gap is
                 reported against its target

Each check first names what it lacks (Python >= 3.11, modules), not a traceback. It runs from a bare copy of the
checkout: the root goes on sys.path here and on PYTHONPATH for the subprocesses. An offline machine gets Ray,
Optuna, MLflow and PTB from the bundle of `benchmarks/gpu_bundle.sh` (its run.sh installs it, then runs this).
`--device cpu` rehearses on a CPU (Triton's interpreter, gpus_per_trial = 0). Logs, summary.json: $OUT (./gpu-out).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import importlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python benchmarks/gpu_checks.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO))
MIN_PYTHON = (3, 11)   # tomllib, datetime.UTC (pyproject's requires-python)
# module -> what to install; mlflow-skinny is enough (no server, no UI), and is what the offline bundle carries
PIP_NAMES = {"ray": "ray[tune]==2.60.0", "mlflow": "mlflow-skinny==3.17.2 (or mlflow)", "yaml": "pyyaml",
             "pytest_timeout": "pytest-timeout", "sklearn": "scikit-learn"}
SPEED_TARGETS = {  # shape -> candidate -> minimum speed-up over cuDNN nn.LSTM (fp32), from the GPU issue
    "awd": {"g2 fused+graph fp32": 1.3, "g2 fused+graph bf16": 2.0},
    "medium": {"g2 fused+graph fp32": 1.1, "g2 fused+graph bf16": 1.1},
    "nmt": {"g2 fused+graph fp32": 1.1, "g2 fused+graph bf16": 1.1},
}
LAYER_TOL = {"fp32": 2e-4, "bf16": 5e-2}   # max relative error vs float64; bf16 operands cost ~1e-2 in the maths
PATHS = (("auto", "fp32"), ("auto", "bf16"), ("reference", "fp32"), ("fused", "fp32"), ("fused", "bf16"))


@dataclass
class Outcome:
    ok: bool
    detail: str
    rows: list[dict] = field(default_factory=list)


@dataclass
class Check:
    name: str
    what: str
    run: Callable[[argparse.Namespace], Outcome]
    modules: tuple[str, ...]     # third-party modules it imports, here or in its subprocesses
    imports: tuple[str, ...]     # the project's modules it imports: importing them finds what `modules` missed


def missing_modules(check: Check) -> list[str]:
    """What `check` cannot import here, as `module (pip name)`; [] when it can run."""
    missing = [m for m in check.modules if importlib.util.find_spec(m) is None]
    if not missing:
        for name in check.imports:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:      # a dependency the list above does not name
                missing.append(err.name or str(err))
                break
            except ImportError as err:              # present but broken (an ABI or a shared-library mismatch)
                return [f"{name} fails to import: {err}"]
    return [m if m not in PIP_NAMES else f"{m} ({PIP_NAMES[m]})" for m in dict.fromkeys(missing)]


def preflight(check: Check) -> str | None:
    """Why `check` cannot run here, before it starts; None when it can."""
    if sys.version_info < MIN_PYTHON:
        return (f"Python {sys.version.split()[0]}: the project needs >= {'.'.join(map(str, MIN_PYTHON))} (tomllib); "
                f"run with PYTHON=python3.12 (gpu_checks.sh) or a newer python")
    missing = missing_modules(check)
    if missing:
        return (f"not installed: {', '.join(missing)}; offline, carry the bundle of benchmarks/gpu_bundle.sh "
                f"and run its run.sh")
    return None


# --------------------------------------------------------------------------- layers

@functools.cache
def load_test_helper(name: str):
    """A helper module of the checkout's tests/ (not a package), loaded from its file, once."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    return module


def relative_error(actual, expected) -> float:
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def compare_layer(gate_mode: str, impl: str, precision: str, device,
                  steps: int = 6, batch: int = 4, input_size: int = 8, hidden: int = 16) -> dict:
    """One G2LSTM training step on `device` against the same step in float64 on the CPU (reference path)."""
    import torch

    from trainables import g2lstm
    from trainables.config import G2Config
    gate_noise = load_test_helper("kernel_noise").gate_noise    # the noise the kernels add, read back for the reference

    g2 = G2Config(gate_mode=gate_mode, tau=0.7, p=0.3)
    torch.manual_seed(0)
    layer = g2lstm.G2LSTM(input_size, hidden, g2=g2, impl=impl, precision=precision)
    reference = copy.deepcopy(layer).double()
    reference.impl = "reference"
    layer.to(device).train()
    x, target = torch.randn(steps, batch, input_size), torch.randn(steps, batch, hidden)
    torch.manual_seed(1)     # the fused path draws its noise seed first thing in the forward: replay that draw
    seed = torch.randint(0, 2**62, (1,), device=device)
    noise = gate_noise(seed, steps, batch, hidden, g2.p, device) if gate_mode == "g2" else None
    original = g2lstm.logistic_noise
    g2lstm.logistic_noise = lambda shape, p, *, device=None, dtype=None: noise.to(device, dtype).reshape(shape)
    try:
        outputs = []
        for model, inputs in ((layer, x.to(device)), (reference, x.double())):
            torch.manual_seed(1)
            before = [p.detach().clone() for p in model.parameters()]
            y = model(inputs)[0]
            ((y - target.to(y)) ** 2).mean().backward()
            torch.optim.SGD(model.parameters(), lr=0.5).step()
            steps_taken = [p.detach() - b for p, b in zip(model.parameters(), before)]
            outputs.append((y.detach(), [p.grad for p in model.parameters()], steps_taken))
    finally:
        g2lstm.logistic_noise = original
    (y, grads, updates), (y_ref, grads_ref, updates_ref) = outputs
    errors = {"y": relative_error(y, y_ref)}
    names = [n for n, _ in layer.named_parameters()]
    errors |= {f"d{n}": relative_error(a, b) for n, a, b in zip(names, grads, grads_ref)}
    errors |= {f"step {n}": relative_error(a, b) for n, a, b in zip(names, updates, updates_ref)}
    worst = max(errors, key=errors.get)
    return {"gate_mode": gate_mode, "impl": impl, "precision": precision, "path": layer.path(True, device),
            "max_rel_error": errors[worst], "worst": worst, "tol": LAYER_TOL[precision],
            "tf32": torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32,   # may round operands
            "ok": math.isfinite(errors[worst]) and errors[worst] <= LAYER_TOL[precision]}


def check_layers(args: argparse.Namespace) -> Outcome:
    import torch

    from trainables.device import use_ieee_fp32
    use_ieee_fp32()   # fp32 means IEEE fp32, as in a trial: TF32 operands alone err 3e-4-7e-4 at these sizes
    device = torch.device(args.device)
    rows = []
    for gate_mode in ("lstm", "sharpened", "g2"):
        for impl, precision in PATHS:
            try:
                rows.append(compare_layer(gate_mode, impl, precision, device))
            except Exception as err:   # a crash is this combination's result, not the end of the check
                rows.append({"gate_mode": gate_mode, "impl": impl, "precision": precision, "ok": False,
                             "error": f"{type(err).__name__}: {err}"})
    failed = [r for r in rows if not r["ok"]]
    problems = [f"{r['gate_mode']}/{r['impl']}/{r['precision']}: "
                + (r["error"] if "error" in r else f"{r['worst']} {r['max_rel_error']:.1e}") for r in failed]
    detail = "; ".join([f"{len(rows) - len(failed)}/{len(rows)} within tolerance", *problems])
    return Outcome(not failed, detail, rows)


# --------------------------------------------------------------------------- subprocess checks

def run_logged(args: argparse.Namespace, name: str, command: list[str], timeout: int,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `command` in the checkout; its stdout goes to $OUT/<name>.log, its stderr to $OUT/<name>.err.log.

    It runs in a process group of its own: on a timeout (or Ctrl-C) the whole group is killed, pytest's compiled
    re-runs and a study's Ray workers included, so nothing of it keeps the GPU busy during the next check.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))   # a bare checkout
    if args.device != "cpu":
        env.pop("TRITON_INTERPRET", None)   # compiled kernels on a GPU
    out_log, err_log = args.out / f"{name}.log", args.out / f"{name}.err.log"
    with open(out_log, "w") as out, open(err_log, "w") as err:
        err.write(f"$ {' '.join(command)}\n")
        err.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            returncode = 124
        except BaseException:
            kill_group(proc)
            raise
    stderr = err_log.read_text(errors="replace")
    if returncode == 124:
        stderr += f"\ntimed out after {timeout} s: its process group was killed"
    return subprocess.CompletedProcess(command, returncode, out_log.read_text(errors="replace"), stderr)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group, then any descendant that left it (a daemon in a session of its own)."""
    try:
        import psutil
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:   # no psutil, or the process is gone already: the group is all there is to kill
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(Exception):   # psutil.NoSuchProcess: it died with the group
            child.kill()
    proc.wait()


def check_gpu_tests(args: argparse.Namespace) -> Outcome:
    proc = run_logged(args, "gpu-tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                          "tests/test_g2lstm_kernels.py", "tests/test_graphs.py"], timeout=300)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return Outcome(proc.returncode == 0 and "skipped" not in last, last)


def check_bench(shape: str) -> Callable[[argparse.Namespace], Outcome]:
    def run(args: argparse.Namespace) -> Outcome:
        proc = run_logged(args, f"bench-{shape}", [sys.executable, "benchmarks/bench_g2lstm.py", "--device",
                                                   args.device, "--shape", shape, "--repeats", "30", "--json"], 240)
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return Outcome(False, f"rc={proc.returncode}: {proc.stderr.strip()[-300:]}")
        rows = [{"candidate": name, **r} for name, r in report["results"].items()]
        misses = [f"{name} {report['results'][name].get('vs_nn_lstm') or 0:.2f}x < {target}x"
                  for name, target in SPEED_TARGETS[shape].items()
                  if (report["results"].get(name, {}).get("vs_nn_lstm") or 0) < target]
        speeds = ", ".join(f"{name} {r['vs_nn_lstm']:.2f}x" for name, r in report["results"].items()
                           if r.get("vs_nn_lstm"))
        failed = report.get("failed", [])
        detail = (f"failed: {failed}; " if failed else "") + speeds + (f"; below target: {misses}" if misses else
                                                                       "; targets met")
        return Outcome(not failed, detail, rows)
    return run


STUDY = REPO / "benchmarks" / "gpu_study.toml"
GRID = ("g2.gate_mode", "seed")


def study_plan() -> tuple[int, list[tuple]]:
    """The trials STUDY runs (num_samples, or the study's default) and its grid points, sorted."""
    from study.config import load_study_config
    cfg = load_study_config(STUDY)
    return cfg.total_samples(), sorted(itertools.product(*(cfg.grid()[n] for n in GRID)))


def check_study(args: argparse.Namespace) -> Outcome:
    """The STUDY config through `g2-study run` and real Ray; on `--device cpu` with gpus_per_trial = 0."""
    work = args.out / "study"
    shutil.rmtree(work, ignore_errors=True)   # a rerun into the same $OUT starts afresh, not on a finished study
    work.mkdir(parents=True)
    on_gpu = args.device != "cpu"
    g2_study = [sys.executable, "-c", "from study.cli import main; raise SystemExit(main())"]
    proc = run_logged(args, "study", [*g2_study, "run", str(STUDY), "--storage", str(work / "studies"),
                                      *([] if on_gpu else ["--set", "study.gpus_per_trial=0"])], timeout=420)
    if proc.returncode != 0:
        return Outcome(False, f"g2-study run rc={proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    from study import results

    df = results.load(str(work / "studies" / "gpu-check"))
    df = df[df["is_trial_setting"].fillna(False).astype(bool)].drop_duplicates("trial_id")   # the searched point
    rows = df[["trial_id", *GRID, "status", "device"]].to_dict("records")
    points = sorted((str(mode), int(seed)) for mode, seed in zip(df["g2.gate_mode"], df["seed"]))
    device = "cuda" if on_gpu else "cpu"
    trials, grid = study_plan()
    ok = (len(df) == trials == len(grid) and points == grid and set(df["status"]) == {"ok"}
          and all(str(d).startswith(device) for d in df["device"]))
    return Outcome(ok, f"{len(df)}/{trials} trials, grid points {points}, statuses {sorted(set(df['status']))}, "
                       f"devices {sorted(set(df['device']))}", rows)


BF16_GAP_TARGET = 0.05   # bf16 vs fp32 val ppl after 400 batches: unmeasured on a GPU, so reported, not failed


def unigram_perplexity(ptb: Path) -> float:
    """The validation perplexity of word frequencies counted on the training text: the floor of learning."""
    words = lambda name: (w for line in (ptb / name).open() for w in [*line.split(), "<eos>"])
    counts = collections.Counter(words("train.txt"))
    total, valid = sum(counts.values()), list(words("valid.txt"))
    return math.exp(-sum(math.log(counts[w] / total) for w in valid) / len(valid))


def judge_ptb(rows: list[dict], unigram: float) -> Outcome:
    """Both runs finished and each beat the unigram model: a diverged or a non-learning bf16 path fails; how far
    bf16 ends from fp32 (the same seed, data and noise, bf16 rounding apart) is reported against its target."""
    learned = [r["rc"] == 0 and isinstance(r["val_ppl"], float) and math.isfinite(r["val_ppl"])
               and r["val_ppl"] < unigram for r in rows]
    detail = " vs ".join(f"{r['precision']} val ppl {r['val_ppl']}" + (f" (rc={r['rc']}, 124: timed out)" if r["rc"]
                                                                        else "") for r in rows) + f" (unigram {unigram:.0f})"
    if all(learned):
        gap = rows[1]["val_ppl"] / rows[0]["val_ppl"] - 1
        detail += f"; bf16 {gap:+.1%} vs fp32, target within {BF16_GAP_TARGET:.0%}" + (
            "" if abs(gap) <= BF16_GAP_TARGET else " (missed: reported, not failed)")
    return Outcome(all(learned), detail, rows)


def check_ptb_medium(args: argparse.Namespace) -> Outcome:
    data = next((p for p in (os.environ.get("G2_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "data")
                 if p and (Path(p) / "ptb").is_dir()), None)
    if data is None:
        return Outcome(False, "no PTB: set G2_DATA_DIR to a folder holding ptb/")
    rows = []
    for precision in ("fp32", "bf16"):
        out = args.out / f"ptb-medium-{precision}.json"
        start = time.perf_counter()
        proc = run_logged(args, f"ptb-medium-{precision}", [
            sys.executable, "-m", "trainables.trainable", "lm", "--preset", "medium", "--set", "data.corpus=ptb",
            "--set", "g2.gate_mode=g2", "--set", f"train.precision={precision}", "--set", "train.epochs=1",
            "--set", "train.max_batches=400", "--set", "sweep.ranks=[0]", "--set", "sweep.bits=[32]",
            "--set", "sweep.paper=[]", "--json", str(out)], timeout=240, env={"G2_DATA_DIR": str(data)})
        final = json.loads(out.read_text()) if out.exists() else {}
        rows.append({"precision": precision, "rc": proc.returncode, "val_ppl": final.get("val_metric"),
                     "test_ppl": final.get("test_metric"), "wall_s": round(time.perf_counter() - start, 1)})
    return judge_ptb(rows, unigram_perplexity(Path(data) / "ptb"))


TORCH = ("torch", "triton")
TRIAL = (*TORCH, "numpy", "tqdm", "sacrebleu", "sentencepiece")   # what `trainables.trainable` imports, here or late
CHECKS = [
    Check("layers", "G2LSTM step per gate mode x impl x precision vs float64", check_layers,
          TORCH, ("trainables.g2lstm", "trainables.device")),
    Check("gpu-tests", "pytest -m gpu with compiled Triton kernels", check_gpu_tests,
          (*TORCH, "pytest", "pytest_timeout"), ("trainables.lm", "trainables.graphs", "trainables.corpora")),
    *(Check(f"bench-{shape}", f"layer benchmark, {shape} shape, vs cuDNN nn.LSTM", check_bench(shape),
            TORCH, ("trainables.g2lstm", "trainables.graphs", "trainables.device")) for shape in ("awd", "medium", "nmt")),
    Check("study", "4-trial g2-study run through Ray, gpus_per_trial=0.5 (gpu_study.toml)", check_study,
          (*TRIAL, "ray", "optuna", "mlflow", "sqlalchemy", "cryptography", "pyarrow", "pandas", "matplotlib",
           "psutil"),   # cryptography: mlflow's SQLite store imports it, mlflow-skinny does not require it
          ("study.cli", "study.runner", "trainables.trainable", "trainables.nmt")),
    Check("ptb-medium", "PTB medium LM, 1 short epoch, fp32 vs bf16", check_ptb_medium,
          TRIAL, ("trainables.trainable", "trainables.lm", "trainables.nmt")),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the checks, run none")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to rehearse (Triton's interpreter)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    args = parser.parse_args(argv)
    chosen = CHECKS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {c.name for c in CHECKS})
        if unknown:
            parser.error(f"--only: unknown check(s) {unknown}; checks are {[c.name for c in CHECKS]}")
        chosen = [c for c in CHECKS if c.name in names]
    if args.device == "cpu":   # read when the kernels are jitted: the interpreter runs them on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.dry_run:
        for check in chosen:
            print(f"{check.name:<12} {check.what}: {preflight(check) or 'ready'}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    summary = []
    for check in chosen:
        start = time.perf_counter()
        try:
            unready = preflight(check)
            outcome = Outcome(False, unready) if unready else check.run(args)
        except Exception as err:   # a broken check is a failed check; the others still run
            outcome = Outcome(False, f"{type(err).__name__}: {err}")
        seconds = time.perf_counter() - start
        summary.append({"check": check.name, "ok": outcome.ok, "seconds": round(seconds, 1),
                        "detail": outcome.detail, "rows": outcome.rows})
        print(f"{check.name}: {'ok' if outcome.ok else 'FAILED'} in {seconds:.0f} s: {outcome.detail}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{'check':<12}{'result':<8}{'s':>6}  detail")
    for row in summary:
        print(f"{row['check']:<12}{'ok' if row['ok'] else 'FAILED':<8}{row['seconds']:>6.0f}  {row['detail']}")
    return 0 if all(row["ok"] for row in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
