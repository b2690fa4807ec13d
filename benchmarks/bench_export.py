"""Exported language models: their size against the accounting, and their inference speed against the float model.

    python benchmarks/bench_export.py                                 # the quickstart's 2×200 LM and medium's 2×650
    python benchmarks/bench_export.py --weights studies/quickstart/models/<key>/best_model.pt --sizes-only

Every model has PTB's vocabulary size (10000 by default) and random weights, or, with `--weights`, the trained
weights of a 2×200 model (the quickstart's model store). Sizes: for every method, the bytes of model.safetensors
against the row's `model_bits / 8` (the safetensors header is the difference). Speed: evaluation forwards
(tokens/s, median of `--repeats` timings of `--windows` windows of 35 tokens, of the whole LM and of its recurrent
layers alone) of the float model (g2, soft gates: PyTorch's fused LSTM), of exports loaded dense (the same kernel on
decompressed weights), of low-rank exports loaded `factored` (two thin GEMMs per gate block and step,
`trainables/factored_lstm.py`; also its time loop on the dense matrices, which separates the GEMMs from the loop)
and of binary gates (the reference recurrence). Candidates are timed round-robin and
each ratio is against the float model in the same round, on one thread by default.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from trainables import export
from trainables.checkpoint import load_model
from trainables.compress import compress_model
from trainables.config import TrialConfig
from trainables.factored_lstm import FactoredLSTM
from trainables.lm import RNNLM, flatten_state, unflatten_state
from trainables.lm_data import Vocabulary

SIZES = {"quickstart": {"lm.embed_dim": 200, "lm.hidden_size": 200, "lm.num_layers": 2},
         "medium": {"lm.embed_dim": 650, "lm.hidden_size": 650, "lm.num_layers": 2}}
SIZE_SETTINGS = [("svd", 16, 32), ("svd", 64, 32), ("quant", 0, 8), ("quant", 0, 4), ("quant", 0, 2),
                 ("quant", 0, 1), ("svd+quant", 16, 4), ("svd+quant", 64, 2), ("round", 0, 32), ("round_clip", 0, 32)]
SPEED_SETTINGS = [("quant 4 dense", ("quant", 0, 4), "soft", "dense"),
                  ("svd 16 dense", ("svd", 16, 32), "soft", "dense"),
                  ("svd 16 factored", ("svd", 16, 32), "soft", "factored"),
                  ("svd 64 factored", ("svd", 64, 32), "soft", "factored"),
                  ("svd+quant 16/4 factored", ("svd+quant", 16, 4), "soft", "factored"),
                  ("quant 2 binary gates", ("quant", 0, 2), "hard", "dense")]
BPTT = 35


def trial_config(size: str, method: str = "none", rank: int = 0, bits: int = 32, eval_gate: str = "soft"):
    paper = method if method in ("round", "round_clip") else "none"
    flat = {**SIZES[size], "g2.gate_mode": "g2", "g2.eval_gate": eval_gate, "compress.rank": rank,
            "compress.bits": bits, "compress.paper": paper}
    return TrialConfig.from_flat(flat, base=TrialConfig.preset("lm", "tiny"))


def exported(model, size: str, vocab: Vocabulary, setting, eval_gate: str, out: Path) -> export.Manifest:
    cfg = trial_config(size, *setting, eval_gate=eval_gate)
    _, accounting = compress_model(model, cfg.compress)
    source = export.Source(training_key="benchmark", accounting=accounting, metrics={})
    return export.export_model(out, model, cfg, vocab, source)


def size_rows(model, size: str, vocab: Vocabulary, work: Path) -> list[dict]:
    rows = []
    for setting in SIZE_SETTINGS:
        out = work / f"{size}-{'-'.join(map(str, setting))}"
        manifest = exported(model, size, vocab, setting, "soft", out)
        accounted = manifest.source.accounting.model_bits / 8
        rows.append({"size": size, "method": setting[0], "rank": setting[1], "bits": setting[2],
                     "file_bytes": manifest.sizes["tensors_file_bytes"], "accounted_bytes": accounted,
                     "ratio": manifest.sizes["tensors_file_bytes"] / accounted,
                     "manifest_bytes": (out / export.MANIFEST_FILE).stat().st_size,
                     "vocab_bytes": (out / export.VOCAB_FILE).stat().st_size,
                     "model_compression": manifest.source.accounting.model_compression})
    return rows


@torch.no_grad()
def forward_seconds(model, inputs, part: str) -> float:
    """One timed pass over `inputs` (windows, T, B), state carried: the whole LM (`lm`) or its recurrent layers
    alone on embedded inputs (`layers`), the part a compressed gate block changes."""
    state = model.init_state(inputs.shape[2])
    start = time.perf_counter()
    for window in inputs:
        if part == "lm":
            state = model(window, state).state
        else:
            out = model.recurrent(model.embedding(window), *flatten_state(state))
            state = unflatten_state(out[2:])
    return time.perf_counter() - start


def speed_rows(model, size: str, vocab: Vocabulary, work: Path, args) -> list[dict]:
    """Tokens/s of every candidate, timed round-robin (one pass of each per repeat) so that the machine's load
    drifts through all of them alike; the ratio is the median of per-repeat ratios to the float model."""
    candidates = {"float (fused LSTM)": model}
    for label, setting, gate, low_rank in SPEED_SETTINGS:
        out = work / f"speed-{size}-{label.replace(' ', '-').replace('/', '-')}"
        exported(model, size, vocab, setting, gate, out)
        candidates[label] = export.load(out, low_rank=low_rank)
        if label == "svd 16 factored":   # the same Python time loop on the dense matrices: the GEMMs' share alone
            loop = export.load(out)
            loop.layers = nn.ModuleList(FactoredLSTM(layer, {}) for layer in loop.layers)
            candidates["svd 16 dense, same loop"] = loop
    rows = []
    gen = torch.Generator().manual_seed(0)
    for part in ("lm", "layers"):
        for batch in args.batches:
            inputs = torch.randint(0, len(vocab), (args.windows, BPTT, batch), generator=gen)
            times: dict[str, list[float]] = {label: [] for label in candidates}
            for repeat in range(args.repeats + 1):             # the first round warms allocator and caches
                for label, candidate in candidates.items():
                    seconds = forward_seconds(candidate.eval(), inputs, part)
                    if repeat:
                        times[label].append(seconds)
            base = times["float (fused LSTM)"]
            for label, seconds in times.items():
                tps = inputs.numel() / statistics.median(seconds)
                ratio = statistics.median(b / t for b, t in zip(base, seconds))
                rows.append({"size": size, "part": part, "batch": batch, "model": label, "tokens_per_s": tps,
                             "vs_float": ratio})
                print(f"  {size:<10} {part:<6} B={batch:<3} {label:<26} {tps:>10.0f} tok/s  {ratio:5.2f}×", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--weights", type=Path, help="a best_model.pt of a 2×200 LM (quickstart) for its sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes-only", action="store_true")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"meta": {"threads": args.threads, "torch": torch.__version__, "windows": args.windows,
                       "repeats": args.repeats}, "sizes": [], "speed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            cfg = trial_config(size)
            vocab = Vocabulary(f"w{i}" for i in range(args.vocab_size))
            model = RNNLM(cfg.lm, cfg.g2, args.vocab_size).eval()
            if args.weights is not None and size == "quickstart":
                saved = torch.load(args.weights, map_location="cpu", weights_only=True)
                vocab = Vocabulary(f"w{i}" for i in range(saved["model"]["embedding.weight"].shape[0]))
                model = RNNLM(cfg.lm, cfg.g2, len(vocab)).eval()
                load_model(args.weights, model)
            report["sizes"] += size_rows(model, size, vocab, Path(tmp))
            for r in report["sizes"][-len(SIZE_SETTINGS):]:
                print(f"  {size:<10} {r['method']:<10} r{r['rank']:<3} b{r['bits']:<3} {r['file_bytes']:>11,} B "
                      f"= {r['ratio']:.5f} × model_bits/8 ({r['accounted_bytes']:,.0f}); model ×"
                      f"{r['model_compression']:.2f}", flush=True)
            if not args.sizes_only:
                report["speed"] += speed_rows(model, size, vocab, Path(tmp), args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
