"""Time one training window (forward + backward) of G2LSTM's paths next to `nn.LSTM`, in one process.

    python benchmarks/bench_g2lstm.py                      # CPU, T=35 B=20, 2 layers of 200
    python benchmarks/bench_g2lstm.py --shape awd --device cuda --json

Ratios are against `nn.LSTM` measured in the same run (cuDNN on GPU, PyTorch's native kernel on CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
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


def timed(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def candidates(sizes, input_size, device):
    """name -> a function building (layers, use CUDA graphs); built one at a time, so one failing costs one row."""
    g2 = G2Config(gate_mode="g2", tau=0.9, p=0.2)
    rows = {
        "nn.LSTM": lambda: (stack(nn.LSTM, sizes, input_size), False),
        "g2 reference": lambda: (stack(G2LSTM, sizes, input_size, g2=g2, impl="reference"), False),
        "lstm via G2LSTM(auto)": lambda: (stack(G2LSTM, sizes, input_size, g2=G2Config(gate_mode="lstm")), False),
    }
    if device.type == "cuda":   # the Triton path (docs/design.md §8), graphed and in bf16, next to cuDNN in the same run
        for precision in ("fp32", "bf16"):
            for graphed in (False, True):
                rows[f"g2 fused{'+graph' if graphed else ''} {precision}"] = (
                    lambda precision=precision, graphed=graphed:
                    (stack(G2LSTM, sizes, input_size, g2=g2, impl="fused", precision=precision), graphed))
    return rows


def measure(build, x, device, repeats, warmup):
    layers, graphed = build()
    layers.to(device).train()
    graphs = WindowGraphs(lambda x: forward(layers, x), list(layers.parameters())) if graphed else None
    return timed(lambda: window(layers, x, graphs), device, repeats, warmup)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    use_ieee_fp32()   # the cuDNN rows in true fp32, like the fused fp32 rows (trainables/device.py)
    steps, batch, input_size, sizes = SHAPES[args.shape]
    torch.manual_seed(0)
    x = torch.randn(steps, batch, input_size, device=device)
    rows = candidates(sizes, input_size, device)
    if device.type == "cuda":
        rows["nn.LSTM bf16"] = lambda: (stack(nn.LSTM, sizes, input_size).to(torch.bfloat16), False)
    results = {}
    for name, build in rows.items():
        try:
            results[name] = measure(build, x.bfloat16() if name.endswith("LSTM bf16") else x, device, args.repeats,
                                    args.warmup)
        except Exception as err:   # one failing path must not hide the others' figures
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    if device.type == "cuda":
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            results[f"GEMM floor {label}"] = timed(gemm_floor(sizes, input_size, x, dtype), device, args.repeats,
                                                   args.warmup)
    base = results["nn.LSTM"].get("median_ms")
    for r in results.values():
        if "median_ms" in r:
            r["vs_nn_lstm"] = base / r["median_ms"] if base else None
    meta = {"shape": args.shape, "T": steps, "B": batch, "input": input_size, "hidden": sizes,
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "tf32": False}
    failed = sorted(name for name, r in results.items() if "error" in r)
    if args.json:
        print(json.dumps({"meta": meta, "results": results, "failed": failed}, indent=2))
        return 1 if failed else 0
    print(f"forward+backward, {meta}")
    print(f"{'implementation':<24}{'median ms':>10}{'min':>9}{'max':>9}{'speed vs nn.LSTM':>18}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24}  FAILED  {r['error'][:200]}")
            continue
        ratio = f"{r['vs_nn_lstm']:>17.2f}x" if r.get("vs_nn_lstm") else f"{'-':>18}"
        print(f"{name:<24}{r['median_ms']:>10.2f}{r['min_ms']:>9.2f}{r['max_ms']:>9.2f}{ratio}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
