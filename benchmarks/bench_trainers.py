"""Training throughput (tokens/s) of the LM and NMT trainers, next to a plain `nn.LSTM` model of the same shapes.

    python benchmarks/bench_trainers.py                      # CPU, 2 threads: the quickstart's 2x200 LM on PTB, tiny NMT
    python benchmarks/bench_trainers.py --lm-preset medium --tasks lm
    python benchmarks/bench_trainers.py --device cuda --lm-preset medium --nmt-preset default --batches 50

`--lm-preset quickstart` is the `tiny` preset with the trial table of `study/configs/quickstart.toml` (a 2-layer
200-unit AWD-style LM, bptt 35, batch 20); any other name is a preset of `trainables/presets.py`. The baseline is the
same LM loop with its G2LSTM layers swapped for `nn.LSTM` (cuDNN on GPU, PyTorch's oneDNN kernel on CPU); ratios
are against it, measured in the same run. Each repeat is one epoch of `--batches` windows per row, the rows
interleaved, so a load that comes and goes on a shared machine reaches every row alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.fields import parse_override
from trainables.lm import LMTask
from trainables.nmt import NMTTask

QUICKSTART = Path(__file__).resolve().parents[1] / "study" / "configs" / "quickstart.toml"
RUN_KNOBS = ("train.max_batches", "train.epochs", "train.max_eval_batches")   # set here, not by the quickstart


class PlainLSTM(nn.LSTM):
    """nn.LSTM standing in for G2LSTM in RNNLM (which calls its layers as `layer(x, state)`)."""

    def forward(self, x, state=None):
        return super().forward(x, state)


def lm_cfg(preset: str, corpus: str, batches: int, **flat) -> TrialConfig:
    if preset == "quickstart":
        study = tomllib.loads(QUICKSTART.read_text())
        trial = {k: v for k, v in study["trial"].items() if k not in RUN_KNOBS}
        base = TrialConfig.from_flat(trial, base=TrialConfig.preset("lm", study["study"]["preset"]))
    else:
        base = TrialConfig.preset("lm", preset)
    return TrialConfig.from_flat({"data.corpus": corpus, "train.max_batches": batches, **flat}, base=base)


def lm_task(cfg: TrialConfig, device: torch.device, baseline: bool) -> LMTask:
    torch.manual_seed(0)
    task = LMTask(cfg, device, "/tmp/g2-bench-cache")
    if baseline:
        task.model.layers = nn.ModuleList(PlainLSTM(m.input_size, m.hidden_size) for m in task.model.layers)
        task.model.to(device)
        task.optimizer = task._make_optimizer(asgd=False)
        task.graphs = None
    return task


def epoch_rate(task) -> float:
    """Training tokens per second of one epoch. Every epoch is epoch 1: its window lengths (a function of the epoch
    number) are then the warm-up's, so no CUDA graph is captured inside the timing."""
    start = time.perf_counter()
    stats = task.train_epoch(1)
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    return stats["train_tokens"] / (time.perf_counter() - start)


def interleaved_rates(tasks: dict, repeats: int) -> dict:
    """name -> {median, min, max} tokens/s over `repeats` rounds of one epoch per task, the order rotating, after a
    warm-up epoch each (allocations, kernels, BPE, caches, CUDA graphs)."""
    names = list(tasks)
    for task in tasks.values():
        task.train_epoch(1)
    rates = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(epoch_rate(tasks[name]))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in rates.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2 on the CPU)")
    parser.add_argument("--lm-preset", default="quickstart", help="'quickstart' or a preset of trainables/presets.py")
    parser.add_argument("--corpus", default="ptb", help="LM corpus (ptb, or toy where PTB is absent)")
    parser.add_argument("--nmt-preset", default="tiny")
    parser.add_argument("--tasks", default="lm,nmt", help="comma-separated: lm, nmt")
    parser.add_argument("--batches", type=int, default=30, help="training windows per timed epoch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="LM field overrides, e.g. lm.hidden_size=200 (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    tasks = set(args.tasks.split(","))
    if not tasks <= {"lm", "nmt"}:
        parser.error(f"--tasks takes lm and/or nmt, got {args.tasks!r}")
    extra = dict(parse_override(o) for o in args.overrides)
    built = {}
    if "lm" in tasks:
        lm_rows = {"LM nn.LSTM baseline": {"g2.gate_mode": "lstm"}, "LM G2LSTM lstm": {"g2.gate_mode": "lstm"},
                   "LM G2LSTM g2": {"g2.gate_mode": "g2"}}
        if device.type == "cuda":   # the fused path's CUDA graphs and bf16 GEMM operands (docs/design.md §8)
            lm_rows["LM G2LSTM g2 graphs"] = {"g2.gate_mode": "g2", "train.cuda_graphs": True}
            lm_rows["LM G2LSTM g2 graphs bf16"] = {"g2.gate_mode": "g2", "train.cuda_graphs": True,
                                                   "train.precision": "bf16"}
        for name, flat in lm_rows.items():
            built[name] = lm_task(lm_cfg(args.lm_preset, args.corpus, args.batches, **{**extra, **flat}), device,
                                  baseline="baseline" in name)
    if "nmt" in tasks:
        for name, mode in (("NMT G2LSTM lstm", "lstm"), ("NMT G2LSTM g2", "g2")):
            torch.manual_seed(0)
            cfg = TrialConfig.from_flat({"g2.gate_mode": mode, "train.max_batches": args.batches},
                                        base=TrialConfig.preset("nmt", args.nmt_preset))
            built[name] = NMTTask(cfg, device, "/tmp/g2-bench-cache")
    rows = interleaved_rates(built, args.repeats)
    base = rows.get("LM nn.LSTM baseline", {}).get("median")
    meta = {"device": str(device), "threads": torch.get_num_threads(), "lm_preset": args.lm_preset,
            "batches": args.batches, "repeats": args.repeats, "torch": torch.__version__}
    if args.json:
        print(json.dumps({"meta": meta, "tokens_per_s": rows}))
        return
    print(f"training tokens/s, {meta}")
    print(f"  {'row':<26}{'median':>10}{'min':>10}{'max':>10}   vs LM baseline (median)")
    for name, r in rows.items():
        ratio = f"{r['median'] / base:5.2f}x" if base and name.startswith("LM") else ""
        print(f"  {name:<26}{r['median']:>10.0f}{r['min']:>10.0f}{r['max']:>10.0f}   {ratio}")


if __name__ == "__main__":
    main()
