"""Text in, scores out: an export behind the one-call interface a model server expects.

`ExportedModel(dir).predict(frame)` takes a pandas frame with a `text` column (or a list of strings) and returns
one row per line:

    LM    tokens (the line's words and its closing <eos>), nll (summed, nats), ppl (exp of the mean nll); each line
          is scored on its own, from a zero state after an <eos>, as a sentence of the corpus stream is
    NMT   translation: beam search with the export's beam size, length penalty and length limit

`_load_pyfunc(dir)` is the loader MLflow's `pyfunc` flavour calls (`study/export.py` logs an export with it), so
an export logged to MLflow loads with `mlflow.pyfunc.load_model` and needs only this package's `trainables/`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from trainables.export import load, read_manifest, read_tokenizer
from trainables.lm_data import EOS, tokenize

TEXT = "text"


class ExportedModel:
    """An export loaded for inference on text (CPU unless `device` says otherwise)."""

    def __init__(self, directory: str | os.PathLike, device: str = "cpu"):
        self.manifest = read_manifest(directory)
        self.tokenizer = read_tokenizer(directory, self.manifest)
        self.model = load(directory, device=device)
        self.device = torch.device(device)

    def predict(self, model_input: pd.DataFrame | Sequence[str], params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        lines = _lines(model_input)
        return self._score(lines) if self.manifest.task == "lm" else self._translate(lines)

    @torch.no_grad()
    def _score(self, lines: list[str]) -> pd.DataFrame:
        if not lines:
            return pd.DataFrame({"tokens": pd.Series(dtype="int64"), "nll": pd.Series(dtype="float64"),
                                 "ppl": pd.Series(dtype="float64")})
        vocab = self.tokenizer
        ids = [vocab.encode([EOS, *tokenize(line)]) for line in lines]      # each (1 + words + 1,)
        steps = max(len(t) for t in ids) - 1
        tokens = torch.full((steps + 1, len(ids)), vocab.eos_id, dtype=torch.long)   # (T + 1, B), eos-padded
        for j, t in enumerate(ids):
            tokens[: len(t), j] = t
        lengths = torch.tensor([len(t) - 1 for t in ids])                            # (B,) targets per line
        x, y = tokens[:-1].to(self.device), tokens[1:].to(self.device)               # (T, B)
        out = self.model(x, self.model.init_state(len(ids)))
        nll = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).cpu()
        mask = torch.arange(steps)[:, None] < lengths[None]                          # (T, B)
        summed = (nll * mask).sum(0).double()
        return pd.DataFrame({"tokens": lengths.numpy(), "nll": summed.numpy(),
                             "ppl": [math.exp(min(s / n, 50)) for s, n in zip(summed.tolist(), lengths.tolist())]})

    def _translate(self, lines: list[str]) -> pd.DataFrame:
        from trainables.decoding import translate
        from trainables.parallel_data import make_batches

        cfg = self.manifest.trial_config()
        sp = self.tokenizer
        examples = [(torch.tensor(ids, dtype=torch.long), torch.zeros(0, dtype=torch.long))
                    for ids in sp.encode(lines)]
        batches = make_batches(examples, cfg.train.batch_size, shuffle=False, pad_id=sp.pad_id(),
                               bos_id=sp.bos_id(), eos_id=sp.eos_id())
        hyps = translate(self.model, batches, sp, cfg.nmt.beam_size, length_penalty=cfg.nmt.length_penalty,
                         max_len_ratio=cfg.nmt.max_decode_ratio) if examples else []
        return pd.DataFrame({"translation": pd.Series(hyps, dtype="object")})


def _lines(model_input: pd.DataFrame | Sequence[str]) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if TEXT not in model_input.columns:
            raise ValueError(f"the input frame needs a {TEXT!r} column, got {list(model_input.columns)}")
        return [str(v) for v in model_input[TEXT].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


def _load_pyfunc(data_path: str) -> ExportedModel:
    """MLflow's pyfunc loader hook: `data_path` is the export directory inside the logged model."""
    return ExportedModel(data_path)
