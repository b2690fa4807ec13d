"""AWD-LSTM word-level language model with G2LSTM layers, and the task object the trial loop drives.

Recipe (Merity et al. 2018; docs/design.md §4): tied embedding/decoder, locked dropout on the input, between layers and
on the output, embedding dropout, weight-drop on W_hh, AR/TAR, SGD with variable BPTT length (lr scaled by
len/bptt) switching to averaged SGD by the non-monotone rule, gradient clipping, optional fine-tune stage and
an optional neural cache pointer (Grave et al. 2017) at evaluation. Tensors are time-major: tokens (T, B).
"""
from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import G2Config, LMConfig, TrialConfig
from trainables.corpora import find_corpus
from trainables.g2lstm import G2LSTM, GateStatistics, evaluation_gates
from trainables.graphs import WindowGraphs
from trainables.lm_data import batchify, lm_batch, load_lm_corpus
from trainables.pulse import TRAIN, Pulse
from trainables.regularize import (
    NonMonotoneTrigger,
    activation_regularization,
    embedding_dropout,
    locked_dropout,
    temporal_activation_regularization,
)
from trainables.report import TRAIN_TOKENS
from trainables.task import Task, make_optimizer
from trainables.toy import generate_once, toy_grammar_corpus

log = logging.getLogger(__name__)
State = list[tuple[Tensor, Tensor]]     # per layer (h, c), each (1, B, H_k)
GATE_BATCHES = 8                        # validation windows scored for gate statistics
SELECTION_BATCH_SIZE = 10               # columns of the validation stream training decisions read (AWD's eval size)


@dataclass(frozen=True)
class LMOutput:
    """What one RNNLM forward gives: the logits and new state, and the last layer's outputs AR/TAR read."""

    logits: Tensor                      # (T, B, V)
    state: State
    raw_output: Tensor                  # (T, B, E) last layer's output, before the output dropout (TAR)
    dropped_output: Tensor              # (T, B, E) after it, what the decoder reads (AR)


class RNNLM(nn.Module):
    """Embedding → G2LSTM layers (one module per layer: sizes differ, e.g. 1150/1150/400) → tied decoder."""

    def __init__(self, cfg: LMConfig, g2: G2Config, vocab_size: int, *, impl: str = "auto",
                 precision: str = "fp32"):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        last = cfg.embed_dim if cfg.tie_weights else cfg.hidden_size
        sizes = [cfg.embed_dim] + [cfg.hidden_size] * (cfg.num_layers - 1) + [last]
        self.layers = nn.ModuleList(G2LSTM(sizes[k], sizes[k + 1], g2=g2, weight_drop=cfg.weight_drop, impl=impl,
                                           precision=precision)
                                    for k in range(cfg.num_layers))
        self.decoder = nn.Linear(last, vocab_size)
        if cfg.tie_weights:
            self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> State:
        w = self.embedding.weight
        return [(w.new_zeros(1, batch_size, layer.hidden_size), w.new_zeros(1, batch_size, layer.hidden_size))
                for layer in self.layers]

    def forward(self, tokens: Tensor, state: State, *,
                recurrent: Callable[..., tuple[Tensor, ...]] | None = None) -> LMOutput:
        """tokens (T, B) -> LMOutput: logits (T, B, V), new state, raw and dropped last outputs (T, B, E).

        `recurrent` stands in for `self.recurrent` (the training loop passes its CUDA graphs of it).
        """
        x = self._embed(tokens)
        if recurrent is None:
            raw, dropped, new_state = self._recur(x, state)
        else:
            raw, dropped, *flat = recurrent(x, *flatten_state(state))
            new_state = unflatten_state(flat)
        return LMOutput(self.decoder(dropped), new_state, raw, dropped)                 # logits (T, B, V)

    def forward_with_gates(self, tokens: Tensor, state: State) -> tuple[LMOutput, list[Tensor]]:
        """`forward`, and every layer's i/f gates (T, B, 2H), [i, f], in layer order (`G2LSTM.forward_with_gates`)."""
        gates: list[Tensor] = []
        raw, dropped, new_state = self._recur(self._embed(tokens), state, gates)
        return LMOutput(self.decoder(dropped), new_state, raw, dropped), gates

    def recurrent(self, x: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        """The recurrent window in tensors only, as CUDA graphs capture it: x (T, B, E), h_0, c_0, h_1, ...
        -> (raw (T, B, E), dropped (T, B, E), new h_0, c_0, h_1, ...)."""
        raw, dropped, new_state = self._recur(x, unflatten_state(flat_state))
        return (raw, dropped, *flatten_state(new_state))

    def _embed(self, tokens: Tensor) -> Tensor:
        x = embedding_dropout(self.embedding, tokens, self.cfg.dropout_embed, self.training)   # (T, B, E)
        return locked_dropout(x, self.cfg.dropout_input, self.training)

    def _recur(self, x: Tensor, state: State, gates: list[Tensor] | None = None):
        """The layers with locked dropout between them -> (raw, dropped, new state); each layer's gates are
        appended to `gates` when it is given."""
        cfg = self.cfg
        new_state = []
        for k, layer in enumerate(self.layers):
            if gates is not None:
                x, layer_state, layer_gates = layer.forward_with_gates(x, state[k])
                gates.extend(layer_gates)
            else:
                x, layer_state = layer(x, state[k])
            new_state.append(layer_state)
            raw = x
            if k < len(self.layers) - 1:
                x = locked_dropout(x, cfg.dropout_hidden, self.training)
        return raw, locked_dropout(raw, cfg.dropout, self.training), new_state


def flatten_state(state: State) -> list[Tensor]:
    return [t for pair in state for t in pair]


def unflatten_state(flat: Sequence[Tensor]) -> State:
    return [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]


def detach_state(state: State) -> State:
    """Truncated BPTT: keep the values, cut the graph."""
    return [(h.detach(), c.detach()) for h, c in state]


def variable_bptt(rng: random.Random, bptt: int) -> int:
    """AWD-LSTM's random window: N(bptt, 5), or half of it with probability 0.05, at least 5."""
    base = bptt if rng.random() < 0.95 else bptt / 2
    return max(5, int(rng.gauss(base, 5)))


def mean_window(bptt: int) -> float:
    """The mean of `variable_bptt` (int() takes half a token off on average): how many batches an epoch has."""
    return max(0.975 * bptt - 0.5, 5.0)


def cache_pointer_logprobs(logits: Tensor, hiddens: Tensor, targets: Tensor, memory: tuple[Tensor, Tensor] | None,
                           window: int, theta: float, lam: float) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Neural cache (Grave et al. 2017): mix the model with a pointer over the last `window` (hidden, next word)
    pairs. logits (T, B, V), hiddens (T, B, E), targets (T, B) -> log p(target) (T, B), updated memory.

    As in awd-lstm-lm's pointer.py (the paper's cache numbers), the pointer mixes only once its memory is full: the
    first `window` positions of the stream (memory carried over between calls) get the model's distribution alone.
    pointer.py's own test (`start_idx + idx > window`) also leaves position `window` and the first position of every
    later evaluation batch unmixed; both are off-by-ones of its bookkeeping, not of the method, and are not copied.
    """
    probs = F.softmax(logits, dim=-1)
    mem_h, mem_y = memory if memory is not None else (hiddens[:0], targets[:0])      # (W, B, E), (W, B)
    out = []
    for t in range(logits.shape[0]):
        p = probs[t]                                                                   # (B, V)
        if mem_h.shape[0] == window:
            scores = torch.einsum("be,wbe->bw", hiddens[t], mem_h) * theta             # (B, W)
            attn = F.softmax(scores, dim=-1)
            cache = torch.zeros_like(p).scatter_add_(1, mem_y.t(), attn)               # (B, V)
            p = (1 - lam) * p + lam * cache
        out.append(p.gather(1, targets[t][:, None]).squeeze(1).clamp_min(1e-12).log())
        mem_h = torch.cat([mem_h, hiddens[t:t + 1]])[-window:]
        mem_y = torch.cat([mem_y, targets[t:t + 1]])[-window:]
    return torch.stack(out), (mem_h, mem_y)


def resolve_lm_corpus(cfg: TrialConfig, work_dir: Path) -> Path:
    """The corpus folder: `toy` is generated (deterministically from the seed) under `work_dir`."""
    if cfg.data.corpus == "toy":
        return generate_once(Path(work_dir) / f"toy-grammar-{cfg.seed}",
                             lambda out: toy_grammar_corpus(out, cfg.seed))
    return find_corpus(cfg.data.corpus, cfg.data.data_dir or None)


class LMTask(Task):
    """Penn Treebank / WikiText-2 language modelling, as driven by `trainables.trainable.run_trial`."""

    metric = "ppl"

    def __init__(self, cfg: TrialConfig, device: torch.device, work_dir: Path):
        self.cfg, self.device = cfg, device
        corpus = load_lm_corpus(resolve_lm_corpus(cfg, work_dir))
        self.vocab = corpus.vocab                 # what an export ships beside the model (trainables/export.py)
        self.vocab_size = len(corpus.vocab)
        self.data = {"train": batchify(corpus.train, cfg.train.batch_size).to(device),     # (T, B)
                     "valid": batchify(corpus.valid, cfg.lm.eval_batch_size).to(device),
                     "test": batchify(corpus.test, cfg.lm.test_batch_size).to(device)}
        self.model = RNNLM(cfg.lm, cfg.g2, self.vocab_size, impl=cfg.train.impl,
                           precision=cfg.train.precision).to(device)
        # the validation stream training decisions read (`selection_loss`): the scored one where it is the same
        self.selection_data = (self.data["valid"] if cfg.lm.eval_batch_size == SELECTION_BATCH_SIZE
                               else batchify(corpus.valid, SELECTION_BATCH_SIZE).to(device))
        self.graphs = self._window_graphs()
        self.trigger = NonMonotoneTrigger(cfg.train.nonmono)
        self.optimizer = self._make_optimizer(asgd=False)

    def _window_graphs(self) -> WindowGraphs | None:
        """CUDA graphs of the training window (`train.cuda_graphs`), where the layers train on the fused path."""
        if not (self.cfg.train.cuda_graphs and self.device.type == "cuda"):
            return None
        paths = {layer.path(True, self.device) for layer in self.model.layers}
        if paths != {"fused"}:
            log.info("train.cuda_graphs: layers train on %s, not the fused path; running eagerly", sorted(paths))
            return None
        params = [p for layer in self.model.layers for p in layer.parameters()]
        return WindowGraphs(self.model.recurrent, params, module=self.model)

    def _make_optimizer(self, asgd: bool) -> torch.optim.Optimizer:
        """`train.optimizer`, or AWD's averaged SGD once NT-ASGD switched (or the fine-tune stage began)."""
        t = self.cfg.train
        if asgd:
            return torch.optim.ASGD(self.model.parameters(), lr=t.lr, t0=0, lambd=0.0, weight_decay=t.weight_decay)
        return make_optimizer(t, self.model.parameters())

    @property
    def averaging(self) -> bool:
        return isinstance(self.optimizer, torch.optim.ASGD)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        rng = random.Random(cfg.seed * 100_003 + epoch)     # window lengths: reproducible, resumable
        source = self.data["train"]
        state = model.init_state(source.shape[1])
        total_loss, total_tokens, batches, i = 0.0, 0, 0, 0
        expected = cfg.train.max_batches or max(round((source.shape[0] - 2) / mean_window(cfg.lm.bptt)), 1)
        self.pulse(Pulse(TRAIN, 0, expected, 0, epoch))   # the pass starts: its clock too
        while i < source.shape[0] - 2:
            seq_len = variable_bptt(rng, cfg.lm.bptt)
            x, y = lm_batch(source, i, seq_len)                                  # (L, B), (L, B)
            for group in self.optimizer.param_groups:      # a longer window takes a proportionally larger step
                group["lr"] = cfg.train.lr * x.shape[0] / cfg.lm.bptt
            state = detach_state(state)
            out = model(x, state, recurrent=self.graphs)
            state = out.state
            loss = F.cross_entropy(out.logits.reshape(-1, self.vocab_size), y.reshape(-1))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}, batch {batches}")
            full = (loss + activation_regularization(out.dropped_output, cfg.lm.alpha)
                    + temporal_activation_regularization(out.raw_output, cfg.lm.beta))
            self.optimizer.zero_grad(set_to_none=True)
            full.backward()
            if cfg.train.clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip)
            self.optimizer.step()
            total_loss += loss.item() * y.numel()
            total_tokens += y.numel()
            batches += 1
            i += x.shape[0]
            self.pulse(Pulse(TRAIN, batches, max(expected, batches), total_tokens, epoch))
            if cfg.train.max_batches and batches >= cfg.train.max_batches:
                break
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.train.lr
        return {"train_loss": total_loss / total_tokens, "train_ppl": math.exp(min(total_loss / total_tokens, 50)),
                TRAIN_TOKENS: float(total_tokens)}

    def evaluation_model(self) -> nn.Module:
        """The model to score: under ASGD a copy holding the averaged weights (AWD evaluates those)."""
        if not self.averaging:
            return self.model
        averaged = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), averaged.parameters()):
                ax = self.optimizer.state.get(p, {}).get("ax")
                if ax is not None:
                    q.copy_(ax)
        return averaged

    def end_epoch(self, selection_loss: float) -> None:
        """NT-ASGD: switch to averaged SGD when the validation loss stops improving."""
        t = self.cfg.train
        if t.optimizer == "sgd" and t.nt_asgd and self.trigger.update(selection_loss) and not self.averaging:
            log.info("non-monotone trigger: switching to ASGD")
            self.optimizer = self._make_optimizer(asgd=True)

    def start_finetune(self) -> None:
        """AWD's fine-tune stage restarts averaged SGD from the best weights."""
        self.optimizer = self._make_optimizer(asgd=True)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Perplexity on a split (with the cache pointer when `lm.cache_window` > 0)."""
        loss = self._nll(model, self.data[split], self.cfg.lm.cache_window, self.cfg.train.max_eval_batches)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    def selection_loss(self, model: nn.Module, val: dict[str, float]) -> float:
        cfg = self.cfg
        if (cfg.g2.eval_gate, cfg.lm.cache_window, cfg.train.max_eval_batches, cfg.lm.eval_batch_size) == \
                ("soft", 0, 0, SELECTION_BATCH_SIZE):
            return val["loss"]
        with evaluation_gates(model, "soft"):
            return self._nll(model, self.selection_data, cache_window=0, max_batches=0)

    @torch.no_grad()
    def _nll(self, model: nn.Module, source: Tensor, cache_window: int, max_batches: int) -> float:
        """Mean next-token NLL over `source` (T, B) in eval mode, mixed with the cache pointer if `cache_window`."""
        cfg = self.cfg
        model.eval()
        state = model.init_state(source.shape[1])
        memory = None
        total_nll, total_tokens, batches = 0.0, 0, 0
        for i in range(0, source.shape[0] - 1, cfg.lm.bptt):
            x, y = lm_batch(source, i, cfg.lm.bptt)
            out = model(x, state)
            state = out.state
            if cache_window:
                logp, memory = cache_pointer_logprobs(out.logits, out.raw_output, y, memory, cache_window,
                                                      cfg.lm.cache_theta, cfg.lm.cache_lambda)
                nll = -logp.sum()
            else:
                nll = F.cross_entropy(out.logits.reshape(-1, self.vocab_size), y.reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += y.numel()
            batches += 1
            if max_batches and batches >= max_batches:
                break
        return total_nll / total_tokens

    @torch.no_grad()
    def gate_statistics(self, model: nn.Module) -> GateStatistics:
        """i/f gate histograms of every layer over the first validation windows, in eval mode."""
        model.eval()
        source = self.data["valid"]
        stats = GateStatistics(len(model.layers))
        state = model.init_state(source.shape[1])
        for n, i in enumerate(range(0, source.shape[0] - 1, self.cfg.lm.bptt)):
            if n == GATE_BATCHES:
                break
            x, _ = lm_batch(source, i, self.cfg.lm.bptt)
            out, gates = model.forward_with_gates(x, state)
            state = out.state
            stats.update(gates)
        return stats

    def state_dict(self) -> dict:
        return {"trigger": self.trigger.state_dict(), "asgd": self.averaging}

    def load_state_dict(self, state: dict) -> None:
        """Restores the switch first, so the caller can then load the matching optimizer state."""
        self.trigger.load_state_dict(state["trigger"])
        if state["asgd"] and not self.averaging:
            self.optimizer = self._make_optimizer(asgd=True)
