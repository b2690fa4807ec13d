"""Training throughput (tokens/s) of the LM and NMT trainers, next to a plain `nn.LSTM` model of the same shapes.

    python benchmarks/bench_trainers.py                      # CPU, quickstart-sized LM on PTB, tiny NMT
    python benchmarks/bench_trainers.py --device cuda --lm-preset medium --nmt-preset default --batches 50

The baseline is the same LM loop with its G2LSTM layers swapped for `nn.LSTM` (cuDNN on GPU, PyTorch's native
kernel on CPU); ratios are against it, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from trainables.config import TrialConfig, parse_override
from trainables.lm import LMTask
from trainables.nmt import NMTTask


class PlainLSTM(nn.LSTM):
    """nn.LSTM standing in for G2LSTM in RNNLM (which calls its layers as `layer(x, state)`)."""

    def forward(self, x, state=None):
        return super().forward(x, state)


def tokens_per_second(task, repeats: int) -> float:
    """Best of `repeats` timed epochs after a warm-up epoch (allocations, kernels, BPE, caches, CUDA graphs).

    Every epoch is epoch 1: its window lengths (a function of the epoch number) are then the warm-up's, so no
    CUDA graph is captured inside the timing.
    """
    task.train_epoch(1)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        stats = task.train_epoch(1)
        if task.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, stats["train_tokens"] / (time.perf_counter() - start))
    return best


def lm_cfg(preset: str, corpus: str, batches: int, **flat) -> TrialConfig:
    base = TrialConfig.preset("lm", preset)
    return TrialConfig.from_flat({"data.corpus": corpus, "train.max_batches": batches, **flat}, base=base)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lm-preset", default="tiny")
    parser.add_argument("--corpus", default="ptb", help="LM corpus (ptb, or toy where PTB is absent)")
    parser.add_argument("--nmt-preset", default="tiny")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="LM field overrides, e.g. lm.hidden_size=200 (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    extra = dict(parse_override(o) for o in args.overrides)
    rows = {}
    lm_rows = {"LM nn.LSTM baseline": {"g2.gate_mode": "lstm"}, "LM G2LSTM lstm": {"g2.gate_mode": "lstm"},
               "LM G2LSTM g2": {"g2.gate_mode": "g2"}}
    if device.type == "cuda":   # the fused path's CUDA graphs and bf16 GEMM operands (docs/design.md §8)
        lm_rows["LM G2LSTM g2 graphs"] = {"g2.gate_mode": "g2", "train.cuda_graphs": True}
        lm_rows["LM G2LSTM g2 graphs bf16"] = {"g2.gate_mode": "g2", "train.cuda_graphs": True,
                                               "train.precision": "bf16"}
    for name, flat in lm_rows.items():
        torch.manual_seed(0)
        task = LMTask(lm_cfg(args.lm_preset, args.corpus, args.batches, **{**extra, **flat}), device,
                      "/tmp/g2-bench-cache")
        if "baseline" in name:
            task.model.layers = nn.ModuleList(PlainLSTM(m.input_size, m.hidden_size) for m in task.model.layers)
            task.model.to(device)
            task.optimizer = task._make_optimizer(asgd=False)
            task.graphs = None
        rows[name] = tokens_per_second(task, args.repeats)
    for name, mode in (("NMT G2LSTM lstm", "lstm"), ("NMT G2LSTM g2", "g2")):
        torch.manual_seed(0)
        cfg = TrialConfig.from_flat({"g2.gate_mode": mode, "train.max_batches": args.batches},
                                    base=TrialConfig.preset("nmt", args.nmt_preset))
        rows[name] = tokens_per_second(NMTTask(cfg, device, "/tmp/g2-bench-cache"), args.repeats)
    base = rows["LM nn.LSTM baseline"]
    if args.json:
        print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "tokens_per_s": rows}))
        return
    print(f"training tokens/s on {device} ({torch.get_num_threads()} threads), best of {args.repeats}:")
    for name, value in rows.items():
        ratio = f"{value / base:5.2f}x LM baseline" if name.startswith("LM") else ""
        print(f"  {name:<22}{value:>10.0f}  {ratio}")


if __name__ == "__main__":
    main()
