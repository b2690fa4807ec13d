"""Time one training window (forward + backward) of G2LSTM's paths next to `nn.LSTM`, in one process.

    python benchmarks/bench_g2lstm.py                      # CPU, 2 threads, T=35 B=20, 2 layers of 200
    python benchmarks/bench_g2lstm.py --shape medium --repeats 20
    python benchmarks/bench_g2lstm.py --shape medium --profile "g2 (auto)"   # where one window's time goes
    python benchmarks/bench_g2lstm.py --shape awd --device cuda --json

Ratios are against `nn.LSTM` measured in the same run (cuDNN on GPU, PyTorch's oneDNN kernel on CPU). The rows are
timed interleaved, one window of each per round with the order rotating, so a load that comes and goes on a shared
machine reaches every row alike. The GEMM floor runs the GEMMs any per-step design must run and nothing else.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.profiler
from torch import nn

from trainables.config import G2Config
from trainables.device import use_ieee_fp32
from trainables.g2lstm import G2LSTM
from trainables.graphs import WindowGraphs

SHAPES = {  # name: (T, B, input, [hidden per layer])
    "cpu": (35, 20, 200, [200, 200]),
    "medium": (35, 20, 650, [650, 650]),
    "nmt": (50, 64, 512, [512, 512]),
    "awd": (70, 80, 400, [1150, 1150, 400]),
}
GEMM_OPS = ("mm", "addmm", "addmm_", "matmul", "linear", "_linear_pointwise", "mkldnn_rnn_layer",
            "mkldnn_rnn_layer_backward", "_cudnn_rnn", "_cudnn_rnn_backward")   # what counts as GEMM in a profile


def stack(layer_cls, sizes, input_size, **kw):
    dims = [input_size, *sizes]
    return nn.ModuleList(layer_cls(dims[k], dims[k + 1], **kw) for k in range(len(sizes)))


def forward(layers, x):
    for layer in layers:
        x = layer(x)[0]
    return (x,)


def window(layers, x, graphs=None):
    """One training window: forward (replayed from CUDA graphs when given), a loss, backward."""
    layers.zero_grad(set_to_none=True)
    y = graphs(x)[0] if graphs is not None else forward(layers, x)[0]
    y.float().square().mean().backward()


def gemm_floor(sizes, input_size, x, dtype=torch.float32):
    """A function running the GEMMs any per-step design must run (forward and backward) and nothing else:
    a lower bound. Operands are random (not zeros, which can run faster) and allocated once, outside the timing."""
    steps, batch = x.shape[:2]
    dims = [input_size, *sizes]

    def randn(*shape):
        return torch.randn(*shape, device=x.device, dtype=dtype)

    layers = [(randn(4 * hidden, dims[k]), randn(4 * hidden, hidden), randn(steps * batch, dims[k]),
               randn(steps * batch, hidden), randn(batch, hidden), randn(batch, 4 * hidden),
               randn(steps * batch, 4 * hidden)) for k, hidden in enumerate(sizes)]

    def run():
        for w_ih, w_hh, inputs, outputs, h, grad, grad_all in layers:
            inputs @ w_ih.t()                      # input GEMM, forward
            for _ in range(steps):
                h @ w_hh.t()                       # recurrent GEMM, forward
                grad @ w_hh                        # dh, backward
            grad_all.t() @ inputs                  # dW_ih
            grad_all.t() @ outputs                 # dW_hh
            grad_all @ w_ih                        # dx
    return run


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, device, repeats: int, warmup: int) -> dict:
    """name -> {median_ms, min_ms, max_ms}: `repeats` rounds, each running every fn once, the order rotating."""
    names = list(fns)
    times = {name: [] for name in names}
    failed = {}
    for name in names:
        try:
            for _ in range(warmup):
                fns[name]()
        except Exception as err:   # one failing path must not hide the others' figures
            failed[name] = {"error": f"{type(err).__name__}: {err}"}
    live = [name for name in names if name not in failed]
    for r in range(repeats * bool(live)):
        for name in live[r % len(live):] + live[:r % len(live)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: failed.get(name) or {"median_ms": statistics.median(times[name]), "min_ms": min(times[name]),
                                       "max_ms": max(times[name])} for name in names}


def candidates(sizes, input_size, device):
    """name -> a function building (layers, use CUDA graphs); built one at a time, so one failing costs one row."""
    g2 = G2Config(gate_mode="g2", tau=0.9, p=0.2)
    rows = {
        "nn.LSTM": lambda: (stack(nn.LSTM, sizes, input_size), False),
        "g2 (auto)": lambda: (stack(G2LSTM, sizes, input_size, g2=g2), False),
        "g2 reference": lambda: (stack(G2LSTM, sizes, input_size, g2=g2, impl="reference"), False),
        "lstm via G2LSTM(auto)": lambda: (stack(G2LSTM, sizes, input_size, g2=G2Config(gate_mode="lstm")), False),
        "sharpened via G2LSTM(auto)": lambda: (stack(G2LSTM, sizes, input_size, g2=G2Config(gate_mode="sharpened")),
                                               False),
    }
    if device.type == "cuda":   # the Triton path (docs/design.md §8), graphed and in bf16, next to cuDNN in the same run
        for precision in ("fp32", "bf16"):
            for graphed in (False, True):
                rows[f"g2 fused{'+graph' if graphed else ''} {precision}"] = (
                    lambda precision=precision, graphed=graphed:
                    (stack(G2LSTM, sizes, input_size, g2=g2, impl="fused", precision=precision), graphed))
        rows["nn.LSTM bf16"] = lambda: (stack(nn.LSTM, sizes, input_size).to(torch.bfloat16), False)
    return rows


def prepare(build, x, device):
    """A no-argument function running one window of the candidate `build` makes."""
    layers, graphed = build()
    layers.to(device).train()
    graphs = WindowGraphs(lambda x: forward(layers, x), list(layers.parameters())) if graphed else None
    return lambda: window(layers, x, graphs)


def profile(fn, repeats: int) -> dict:
    """torch.profiler over `repeats` calls of `fn`: per-op self time per call, and the GEMM share of it."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    ops = {e.key: (e.self_cpu_time_total / repeats / 1e3, e.count // repeats) for e in prof.key_averages()}
    total = sum(ms for ms, _ in ops.values())
    gemm = sum(ms for name, (ms, _) in ops.items() if name.split("::")[-1] in GEMM_OPS)
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    return {"total_ms": total, "gemm_ms": gemm, "gemm_share": gemm / total if total else 0.0,
            "top": [{"op": name, "ms": ms, "calls": calls} for name, (ms, calls) in top]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2 on the CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", metavar="ROW", help="profile one window of this row instead of timing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    use_ieee_fp32()   # the cuDNN rows in true fp32, like the fused fp32 rows (trainables/device.py)
    steps, batch, input_size, sizes = SHAPES[args.shape]
    torch.manual_seed(0)
    x = torch.randn(steps, batch, input_size, device=device)
    meta = {"shape": args.shape, "T": steps, "B": batch, "input": input_size, "hidden": sizes,
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "tf32": False,
            "repeats": args.repeats}
    rows = candidates(sizes, input_size, device)
    if args.profile:
        if args.profile not in rows:
            parser.error(f"--profile must name a row: {', '.join(rows)}")
        report = profile(prepare(rows[args.profile], x, device), args.repeats)
        report["floor_ms"] = timed_interleaved({"floor": gemm_floor(sizes, input_size, x)}, device, args.repeats,
                                               args.warmup)["floor"]["median_ms"]
        if args.json:
            print(json.dumps({"meta": meta, "row": args.profile, **report}, indent=2))
            return 0
        print(f"profile of one window of {args.profile!r}, {meta}")
        print(f"self time {report['total_ms']:.2f} ms, GEMMs {report['gemm_ms']:.2f} ms "
              f"({100 * report['gemm_share']:.0f}%), GEMM floor (timed, no profiler) {report['floor_ms']:.2f} ms")
        for r in report["top"]:
            print(f"  {r['op'][:48]:<48}{r['ms']:>10.3f} ms{r['calls']:>8} calls")
        return 0
    fns, results = {}, {}
    for name, build in rows.items():
        try:
            fns[name] = prepare(build, x.bfloat16() if name.endswith("LSTM bf16") else x, device)
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    fns["GEMM floor fp32" if device.type == "cuda" else "GEMM floor"] = gemm_floor(sizes, input_size, x)
    if device.type == "cuda":
        fns["GEMM floor bf16"] = gemm_floor(sizes, input_size, x, torch.bfloat16)
    results = {name: results.get(name) for name in rows} | timed_interleaved(fns, device, args.repeats, args.warmup)
    results = {name: r for name, r in results.items() if r is not None}
    base = results["nn.LSTM"].get("median_ms")
    for r in results.values():
        if "median_ms" in r:
            r["vs_nn_lstm"] = base / r["median_ms"] if base else None
    failed = sorted(name for name, r in results.items() if "error" in r)
    if args.json:
        print(json.dumps({"meta": meta, "results": results, "failed": failed}, indent=2))
        return 1 if failed else 0
    print(f"forward+backward, {meta}")
    print(f"{'implementation':<28}{'median ms':>10}{'min':>9}{'max':>9}{'speed vs nn.LSTM':>18}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<28}  FAILED  {r['error'][:200]}")
            continue
        ratio = f"{r['vs_nn_lstm']:>17.2f}x" if r.get("vs_nn_lstm") else f"{'-':>18}"
        print(f"{name:<28}{r['median_ms']:>10.2f}{r['min_ms']:>9.2f}{r['max_ms']:>9.2f}{ratio}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
