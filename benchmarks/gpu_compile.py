"""Compile the fused G2-LSTM step kernels for a GPU target on a machine without one: Triton's real compiler, PTX
and cubin, every variant the training code launches.

    python benchmarks/gpu_compile.py                  # sm_90 (H100/H200), a table; exit 1 if any variant fails
    python benchmarks/gpu_compile.py --arch 80 --json

Triton's CPU interpreter runs code that its compiler refuses, so the interpreted kernel tests cannot show that the
kernels build for a GPU. Here a stand-in driver names the target (it only answers `get_current_target`; nothing
is launched) and `fused_lstm_layer` runs forward and backward on CPU tensors with each kernel launch replaced by
`JITFunction.warmup`, which compiles with the arguments and constexprs that launch would have passed: noise on/off
x bf16 on/off x gate recording on/off, at the AWD, medium and tiny shapes of `benchmarks/bench_g2lstm.py` and
the presets. Run it in its own process: it replaces Triton's active driver and jits the kernels for compilation.
Uses Triton internals (the active-driver hook, `warmup`): pyproject's triton range is where it is known to work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # a bare copy of the checkout, not pip-installed
    sys.path.insert(0, str(REPO))

SHAPES = {  # name: (batch, input size, [hidden per layer]): bench_g2lstm's GPU shapes and the LM presets
    "awd": (80, 400, [1150, 1150, 400]),
    "awd-preset": (20, 400, [1150, 1150, 400]),
    "medium": (20, 650, [650, 650]),
    "tiny": (8, 24, [32, 32]),
}
STEPS = 2   # the time step is not specialised on (do_not_specialize): two steps launch what seventy would


class TargetOnlyDriver:
    """Enough of a Triton driver for compilation: the target, device 0, stream 0. Nothing is ever launched."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


class CompileOnLaunch:
    """Stands in for a kernel in `g2lstm_kernels`' globals: `kernel[grid](*args)` compiles instead of launching."""

    def __init__(self, kernel, built: list):
        self.kernel, self.built = kernel, built

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            compiled = self.kernel.warmup(*args, grid=grid, **constexprs)
            self.built.append((self.kernel.fn.__name__, constexprs, compiled))
        return launch


def compile_variants(arch: int, warp_size: int = 32) -> list[dict]:
    """Every (kernel, constexprs, specialisation) the shapes launch, compiled for `arch`; one row per variant."""
    os.environ.pop("TRITON_INTERPRET", None)   # the kernels must be jitted for the compiler, not the interpreter
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from trainables import g2lstm_kernels
    from trainables.gates import GateMath

    driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, warp_size)))
    g2lstm_kernels._load_triton()
    built: list = []
    for name in ("_forward_step", "_backward_step"):
        setattr(g2lstm_kernels, name, CompileOnLaunch(getattr(g2lstm_kernels, name), built))
    # fused_lstm_layer accepts CPU tensors only where kernels are interpreted; the kernels are already jitted
    # for the compiler, and every launch now compiles, so let its device check pass
    os.environ["TRITON_INTERPRET"] = "1"
    rows = []
    for shape, (batch, input_size, hidden_sizes) in SHAPES.items():
        for noise in (True, False):
            for precision in ("fp32", "bf16"):
                for record in (False, True):
                    gate = GateMath(scale=1 / 0.7, noise_p=0.3 if noise else 0.0, hard=False)
                    for width, hidden in zip([input_size, *hidden_sizes], hidden_sizes):
                        row = {"shape": shape, "batch": batch, "hidden": hidden, "noise": noise,
                               "precision": precision, "record": record}
                        first = len(built)
                        try:
                            run_layer(torch, g2lstm_kernels, gate, batch, width, hidden, precision, record)
                        except Exception as err:   # one variant's failure is its row, the others still build
                            rows.append({**row, "kernel": "?", "ok": False, "error": f"{type(err).__name__}: {err}"})
                            continue
                        # one row per kernel this layer launched (a step kernel compiles once per window)
                        for kernel_name, constexprs, compiled in {k: (k, c, v) for k, c, v in built[first:]}.values():
                            rows.append({**row, "kernel": kernel_name, **describe(compiled, arch),
                                         "constexprs": constexprs})
    return rows


def run_layer(torch, g2lstm_kernels, gate, batch, input_size, hidden, precision, record) -> None:
    """One fused layer forward and backward on CPU tensors: every kernel launch it makes compiles."""
    x = torch.randn(STEPS, batch, input_size, requires_grad=True)
    h0, c0 = torch.zeros(batch, hidden), torch.zeros(batch, hidden)
    w_ih = torch.randn(4 * hidden, input_size, requires_grad=True)
    w_hh = torch.randn(4 * hidden, hidden, requires_grad=True)
    b_ih, b_hh = torch.zeros(4 * hidden, requires_grad=True), torch.zeros(4 * hidden, requires_grad=True)
    y, _, _, _ = g2lstm_kernels.fused_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gate, seed=1,
                                                record_gates=record, precision=precision)
    y.sum().backward()


def describe(compiled, arch: int) -> dict:
    """What the compiler produced: PTX for the target, a cubin, the kernel's registers and shared memory."""
    asm = compiled.asm
    ptx = asm.get("ptx", "")
    ok = f".target sm_{arch}" in ptx and bool(asm.get("cubin"))
    meta = compiled.metadata
    return {"ok": ok, "hash": compiled.hash, "ptx_bytes": len(ptx), "cubin_bytes": len(asm.get("cubin") or b""),
            "num_warps": getattr(meta, "num_warps", None), "shared": getattr(meta, "shared", None),
            **({} if ok else {"error": f"no sm_{arch} PTX and cubin (stages: {sorted(asm)})"})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper, 80: Ampere)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    # a private cache: a kernel compiled before (here or by another run) would otherwise be read back, not built
    with tempfile.TemporaryDirectory(prefix="g2-triton-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        rows = compile_variants(args.arch)
        seconds = time.perf_counter() - start
    import torch
    import triton
    report = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
              "seconds": round(seconds, 1), "rows": rows}
    failed = [r for r in rows if not r["ok"]]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        distinct: dict = {}   # one line per kernel the compiler built, at the first launch that built it
        for r in rows:
            if r["ok"]:
                distinct.setdefault(r["hash"], r)
        for r in [*distinct.values(), *failed]:
            constexprs = " ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items())
            print(f"{r['kernel']:<15} first at {r['shape']:<10} B={r['batch']:<3} H={r['hidden']:<5} {constexprs:<40} "
                  + (f"ptx {r['ptx_bytes']} B, cubin {r['cubin_bytes']} B" if r["ok"] else f"FAILED {r['error']}"))
        print(f"{len(rows) - len(failed)}/{len(rows)} launches built for sm_{args.arch}, "
              f"{len({r.get('hash') for r in rows} - {None})} distinct kernels, in {seconds:.0f} s "
              f"(triton {triton.__version__}, torch {torch.__version__})")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
