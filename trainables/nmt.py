"""Attentional LSTM encoder-decoder for translation, every recurrent layer a G2LSTM (DESIGN §4).

Layout: time-major throughout, `src (S, B)`, `tgt (T, B)`, hidden `(layers, B, H)`. The encoder's first layer is
bidirectional (two one-layer G2LSTMs, the backward one reading each sentence reversed within its own length, so
padding never enters a real position), the layers above it unidirectional. The decoder uses additive (Bahdanau)
attention scored against its top hidden state and input feeding (Luong et al. 2015): the attentional vector
h̃_t = tanh(W_c [ctx_t; h_t]) feeds the output layer and is concatenated to the next input embedding. Input
feeding makes every decoder step depend on the previous one, so training and decoding share one `step`.
Dropout (Zaremba et al. 2014) sits on non-recurrent connections only: embeddings, between layers, h̃_t.

Source and target share one embedding: the BPE vocabulary is joint, so a piece (a name, a number, a cognate)
is the same string on both sides, and on a 29k-pair corpus the halved embedding also keeps the model's bits
(DESIGN §3 accounting counts embeddings) from being dominated by two copies of the vocabulary.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from trainables import data
from trainables.config import G2Config, NMTConfig, TrialConfig
from trainables.g2lstm import G2LSTM, GateStatistics
from trainables.task import Task, make_optimizer

RecurrentFactory = Callable[..., G2LSTM]   # (input_size, hidden_size, num_layers, **kw) -> a G2LSTM

log = logging.getLogger(__name__)

TOY_CORPORA = {"toy-copy": "copy", "toy-reverse": "reverse"}
GATE_BATCHES = 4            # validation batches measured by `NMTTask.gate_statistics`


def run_rnn(rnn: G2LSTM, x: Tensor, state=None, return_gates: bool = False, weights: dict | None = None):
    """(y, (h, c), per-layer i/f gates or []); `weights` replaces some of the layer's parameters for this call."""
    kwargs = {"return_gates": True} if return_gates else {}
    out = rnn(x, state, **kwargs) if weights is None else functional_call(rnn, weights, (x, state), kwargs)
    return out if return_gates else (*out, [])


def reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """(S, B) time index reversing each column within its length and leaving its padding in place."""
    t = torch.arange(steps, device=lengths.device)[:, None]                # (S, 1)
    return torch.where(t < lengths[None], lengths[None] - 1 - t, t)        # (S, B); an involution


def take_time(x: Tensor, index: Tensor) -> Tensor:
    """x (S, B, F) gathered along time: by an (S, B) index -> (S, B, F), or a (B,) index -> (B, F)."""
    if index.dim() == 1:
        return x.gather(0, index.view(1, -1, 1).expand(1, -1, x.size(-1))).squeeze(0)
    return x.gather(0, index[:, :, None].expand_as(x))


@dataclass(frozen=True)
class EncoderOut:
    outputs: Tensor         # (S, B, D) top layer, D = 2H with one encoder layer, else H
    final: Tensor           # (B, D) top layer at each sentence's last real token (both ends when bidirectional)
    mask: Tensor            # (S, B) bool, True at real tokens
    gates: list[Tensor]     # per recurrent layer (S, B, 2H) [i, f], in source order; [] unless asked


@dataclass(frozen=True)
class Memory:
    """What attention reads at every decoder step; keys are projected once per sentence, not per step."""

    values: Tensor          # (S, B, D)
    keys: Tensor            # (S, B, A)
    mask: Tensor            # (S, B)

    def repeat(self, k: int) -> "Memory":
        """Each column repeated k times in place (b*k + j), for a flattened batch × beam."""
        return Memory(*(t.repeat_interleave(k, dim=1) for t in (self.values, self.keys, self.mask)))


@dataclass(frozen=True)
class DecoderState:
    h: Tensor               # (L, B, H)
    c: Tensor               # (L, B, H)
    feed: Tensor            # (B, H) previous attentional vector h̃_{t-1} (input feeding)

    def select(self, rows: Tensor) -> "DecoderState":
        return DecoderState(self.h.index_select(1, rows), self.c.index_select(1, rows), self.feed.index_select(0, rows))


class Encoder(nn.Module):
    """Bidirectional first layer, unidirectional G2LSTM layers above it."""

    def __init__(self, cfg: NMTConfig, rnn: RecurrentFactory, embed: nn.Embedding):
        super().__init__()
        self.embed, self.dropout = embed, cfg.dropout
        e, h = cfg.embed_dim, cfg.hidden_size
        self.forward_rnn = rnn(e, h, 1, weight_drop=cfg.weight_drop)
        self.backward_rnn = rnn(e, h, 1, weight_drop=cfg.weight_drop)
        self.upper = (rnn(2 * h, h, cfg.encoder_layers - 1, dropout=cfg.dropout,
                             weight_drop=cfg.weight_drop) if cfg.encoder_layers > 1 else None)
        self.output_dim = h if self.upper is not None else 2 * h

    def forward(self, src: Tensor, src_mask: Tensor, return_gates: bool = False) -> EncoderOut:
        """src, src_mask (S, B). Outputs at real positions never depend on the batch's padding."""
        lengths = src_mask.sum(0)                                            # (B,)
        last = (lengths - 1).clamp(min=0)                                    # (B,); an empty source reads step 0
        x = F.dropout(self.embed(src), self.dropout, self.training)         # (S, B, E)
        rev = reverse_index(lengths, src.size(0))                            # (S, B)
        fwd, _, gates_f = run_rnn(self.forward_rnn, x, return_gates=return_gates)              # (S, B, H)
        bwd, _, gates_b = run_rnn(self.backward_rnn, take_time(x, rev), return_gates=return_gates)
        final = torch.cat([take_time(fwd, last), take_time(bwd, last)], -1)  # (B, 2H): both directions' ends
        y = torch.cat([fwd, take_time(bwd, rev)], -1)                        # (S, B, 2H), bwd back in source order
        gates = gates_f + [take_time(g, rev) for g in gates_b]
        if self.upper is not None:
            y = F.dropout(y, self.dropout, self.training)
            y, _, gates_u = run_rnn(self.upper, y, return_gates=return_gates)   # (S, B, H)
            final, gates = take_time(y, last), gates + gates_u                  # (B, H)
        y = F.dropout(y, self.dropout, self.training)
        return EncoderOut(y, final, src_mask, gates)


class AdditiveAttention(nn.Module):
    """score(q, k_j) = vᵀ tanh(W_q q + W_k k_j) (Bahdanau et al. 2015), source padding masked."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)
        self.key_proj = nn.Linear(key_dim, attn_dim)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, query: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        """query (B, Q) -> context (B, D), weights (S, B)."""
        scores = self.v(torch.tanh(memory.keys + self.query_proj(query)[None])).squeeze(-1)   # (S, B)
        # finfo.min rather than -inf: an empty source then gets uniform weights instead of NaN.
        scores = scores.masked_fill(~memory.mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=0)                                                 # (S, B)
        return (weights[:, :, None] * memory.values).sum(0), weights


class Decoder(nn.Module):
    """Input-feeding attentional decoder of G2LSTM layers, run one target token per `step`."""

    def __init__(self, cfg: NMTConfig, rnn: RecurrentFactory, embed: nn.Embedding, memory_dim: int,
                 vocab_size: int):
        super().__init__()
        e, h, layers = cfg.embed_dim, cfg.hidden_size, cfg.decoder_layers
        self.embed, self.dropout, self.weight_drop = embed, cfg.dropout, cfg.weight_drop
        self.num_layers, self.hidden_size = layers, h
        # DropConnect is applied here, once per target sequence: G2LSTM's own would redraw it at every step.
        self.rnn = rnn(e + h, h, layers, dropout=cfg.dropout)
        self.bridge = nn.Linear(memory_dim, 2 * layers * h)     # encoder final state -> (h_0, c_0) of every layer
        self.attention = AdditiveAttention(h, memory_dim, h)
        self.combine = nn.Linear(memory_dim + h, h, bias=False)  # W_c of h̃ = tanh(W_c [ctx; h])
        self.output = nn.Linear(h, vocab_size)

    def start(self, enc: EncoderOut) -> tuple[Memory, DecoderState]:
        batch = enc.final.size(0)
        h0, c0 = self.bridge(enc.final).view(batch, 2, self.num_layers, self.hidden_size).permute(1, 2, 0, 3)
        state = DecoderState(torch.tanh(h0).contiguous(), c0.contiguous(),             # (L, B, H) each
                             enc.final.new_zeros(batch, self.hidden_size))              # (B, H)
        return Memory(enc.outputs, self.attention.key_proj(enc.outputs), enc.mask), state

    def sequence_weights(self) -> dict[str, Tensor] | None:
        """W_hh with one DropConnect mask for a whole target sequence (AWD-LSTM); None when off."""
        if not (self.training and self.weight_drop):
            return None
        return {f"weight_hh_l{k}": F.dropout(self.rnn.layer_weights(k)[1], self.weight_drop, True)
                for k in range(self.num_layers)}

    def step(self, tokens: Tensor, state: DecoderState, memory: Memory, weights: dict | None = None,
             return_gates: bool = False) -> tuple[Tensor, DecoderState, list[Tensor]]:
        """tokens (B,) -> attentional vector h̃_t (B, H), the next state, per-layer gates (1, B, 2H) or []."""
        emb = F.dropout(self.embed(tokens), self.dropout, self.training)        # (B, E)
        x = torch.cat([emb, state.feed], -1)[None]                               # (1, B, E + H)
        y, (h, c), gates = run_rnn(self.rnn, x, (state.h, state.c), return_gates, weights)   # y (1, B, H)
        context, _ = self.attention(y[0], memory)                                # (B, D)
        out = torch.tanh(self.combine(torch.cat([context, y[0]], -1)))          # (B, H)
        out = F.dropout(out, self.dropout, self.training)
        return out, DecoderState(h, c, out), gates

    def forward(self, tgt_in: Tensor, memory: Memory, state: DecoderState,
                return_gates: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Teacher forcing: tgt_in (T, B) -> attentional vectors (T, B, H), per-layer gates (T, B, 2H) or []."""
        weights = self.sequence_weights()
        outs, steps_gates = [], []
        for tokens in tgt_in.unbind(0):
            out, state, gates = self.step(tokens, state, memory, weights, return_gates)
            outs.append(out)
            steps_gates.append(gates)
        gates = [torch.cat(layer) for layer in zip(*steps_gates)] if return_gates else []
        return torch.stack(outs), gates


class Seq2Seq(nn.Module):
    """Encoder-decoder over one joint vocabulary; `forward` returns teacher-forced logits (T, B, V)."""

    def __init__(self, cfg: NMTConfig, g2: G2Config, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, *,
                 impl: str = "auto", precision: str = "fp32"):
        super().__init__()
        self.cfg, self.pad_id, self.bos_id, self.eos_id = cfg, pad_id, bos_id, eos_id
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=pad_id)
        # PyTorch's N(0, 1) rows keep W_ih·x near unit scale under the LSTM's U(±1/√H) weights; fairseq's
        # U(±0.1) made the pre-activations ~17× smaller, and the toy copy task started learning epochs later.
        rnn = functools.partial(G2LSTM, g2=g2, impl=impl, precision=precision)
        self.encoder = Encoder(cfg, rnn, self.embed)
        self.decoder = Decoder(cfg, rnn, self.embed, self.encoder.output_dim, vocab_size)

    def encode(self, src: Tensor, src_mask: Tensor) -> tuple[Memory, DecoderState]:
        return self.decoder.start(self.encoder(src, src_mask))

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, *, return_gates: bool = False):
        """src, src_mask (S, B); tgt_in (T, B) -> logits (T, B, V), and with `return_gates` every layer's i/f
        gates in `recurrent_layer_names` order: encoder ones (S, B, 2H), decoder ones (T, B, 2H)."""
        enc = self.encoder(src, src_mask, return_gates)
        memory, state = self.decoder.start(enc)
        outs, dec_gates = self.decoder(tgt_in, memory, state, return_gates)
        logits = self.decoder.output(outs)                                   # (T, B, V)
        return (logits, enc.gates + dec_gates) if return_gates else logits

    def context_columns(self) -> dict[str, slice]:
        """{parameter name: columns} of the input weights through which attention reaches the gates.

        The decoder's first layer reads [embedding (E); h̃_{t-1} (H)] (`Decoder.step`): the h̃ columns are this
        model's counterpart of the authors' context-to-gate matrix `Wc`, which their NMT compression included and
        the embedding columns are not (`compress.targets = recurrent+context`).
        """
        e, h = self.cfg.embed_dim, self.cfg.hidden_size
        return {"decoder.rnn.weight_ih_l0": slice(e, e + h)}

    def recurrent_layer_names(self) -> list[str]:
        upper = self.encoder.upper.num_layers if self.encoder.upper is not None else 0
        return (["encoder.forward", "encoder.backward"] + [f"encoder.upper.l{k}" for k in range(upper)]
                + [f"decoder.l{k}" for k in range(self.decoder.num_layers)])


def sequence_loss(logits: Tensor, target: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Summed (training loss, NLL) over real tokens; smoothing spreads ε uniformly over the vocabulary."""
    lprobs = F.log_softmax(logits.float(), dim=-1)                           # (T, B, V)
    nll = -lprobs.gather(-1, target[..., None]).squeeze(-1)                  # (T, B)
    loss = nll if not label_smoothing else (1 - label_smoothing) * nll - label_smoothing * lprobs.mean(-1)
    return loss[mask].sum(), nll[mask].sum()


# --------------------------------------------------------------------------- decoding

def max_lengths(batch: data.Seq2SeqBatch, max_len: int | None, ratio: float) -> list[int]:
    """Per-sentence output limit ratio·source + 10, capped by `max_len` when given."""
    limits = [int(ratio * n) + 10 for n in batch.src_lengths.tolist()]
    return [min(m, max_len) for m in limits] if max_len else limits


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no grad for the block, then the mode the model had: callers may be mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def in_eval_mode(fn):
    """Run `fn(model, ...)` under `evaluating(model)`: decoding with gate noise or dropout on is never wanted."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with evaluating(model):
            return fn(model, *args, **kwargs)
    return wrapper


@in_eval_mode
def greedy_decode(model: Seq2Seq, batch: data.Seq2SeqBatch, max_len: int | None = None, *,
                  max_len_ratio: float = NMTConfig.max_decode_ratio) -> list[list[int]]:
    """Argmax decoding; token ids per column of `batch` (batch order), without bos/eos."""
    batch = batch.to(_device(model))
    limits = max_lengths(batch, max_len, max_len_ratio)
    memory, state = model.encode(batch.src, batch.src_mask)
    tokens = batch.src.new_full((batch.batch_size,), model.bos_id)         # (B,)
    done = torch.zeros_like(tokens, dtype=torch.bool)
    steps = []
    for _ in range(max(limits)):
        out, state, _ = model.decoder.step(tokens, state, memory)
        tokens = model.decoder.output(out).argmax(-1)                        # (B,)
        steps.append(tokens)
        done |= tokens == model.eos_id
        if done.all():
            break
    seqs = torch.stack(steps, 1).tolist()                                    # (B, t)
    return [_until_eos(seq[:limit], model.eos_id) for seq, limit in zip(seqs, limits)]


def _until_eos(seq: list[int], eos: int) -> list[int]:
    return seq[:seq.index(eos)] if eos in seq else seq


@in_eval_mode
def beam_search(model: Seq2Seq, batch: data.Seq2SeqBatch, beam_size: int = NMTConfig.beam_size,
                max_len: int | None = None, length_penalty: float = NMTConfig.length_penalty, *,
                max_len_ratio: float = NMTConfig.max_decode_ratio) -> list[list[int]]:
    """Batched beam search; the best finished hypothesis per sentence by logprob / len^α (len counts eos).

    Batch × beam is one flattened batch (row b·K + k). As in fairseq, only an eos among the K best candidates
    of a step finishes a hypothesis, so beam 1 is exactly greedy; the K best non-eos candidates stay alive.
    A sentence is done with K finished hypotheses or at its length limit, where its live beams are finished.
    Returns token ids per column of `batch` (batch order), without bos/eos.
    """
    batch = batch.to(_device(model))
    k, b_size = beam_size, batch.batch_size
    limits = max_lengths(batch, max_len, max_len_ratio)
    memory, state = model.encode(batch.src, batch.src_mask)
    memory, state = memory.repeat(k), state.select(torch.arange(b_size, device=batch.src.device).repeat_interleave(k))
    scores = torch.full((b_size, k), -math.inf, device=batch.src.device)     # (B, K) summed logprobs
    scores[:, 0] = 0.0                                                        # one live beam at the start
    tokens = batch.src.new_full((b_size * k,), model.bos_id)                 # (B·K,)
    seqs = batch.src.new_empty((b_size * k, 0))                              # (B·K, t)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b_size)]
    done = [False] * b_size
    row0 = torch.arange(b_size, device=tokens.device)[:, None] * k          # (B, 1)
    for t in range(1, max(limits) + 1):
        out, state, _ = model.decoder.step(tokens, state, memory)
        lprobs = F.log_softmax(model.decoder.output(out).float(), -1)       # (B·K, V)
        vocab = lprobs.size(-1)
        cand = (scores.view(-1, 1) + lprobs).view(b_size, k * vocab)         # (B, K·V)
        top, idx = cand.topk(min(2 * k, cand.size(1)), dim=1)               # (B, 2K): ≥ K non-eos among them
        beam, tok = idx // vocab, idx % vocab
        is_eos = tok == model.eos_id
        ended = [(b, j) for b, j in is_eos[:, :k].nonzero().tolist() if not done[b]]
        if ended:   # this step's finished candidates reach the host in one transfer each, not one per candidate
            top_k, beam_k = top[:, :k].tolist(), beam[:, :k].tolist()
            prefixes = seqs[[b * k + beam_k[b][j] for b, j in ended]].tolist()
            for (b, j), prefix in zip(ended, prefixes):
                if len(finished[b]) < k and top_k[b][j] > -math.inf:
                    finished[b].append((top_k[b][j] / t ** length_penalty, prefix))
        scores, pos = top.masked_fill(is_eos, -math.inf).topk(k, dim=1)    # (B, K) best live candidates
        rows = (row0 + beam.gather(1, pos)).view(-1)                         # (B·K,) parent rows
        tokens = tok.gather(1, pos).view(-1)
        seqs = torch.cat([seqs[rows], tokens[:, None]], 1)
        state = state.select(rows)
        for b in range(b_size):
            if not done[b] and t >= limits[b]:
                live = [(s / t ** length_penalty, seqs[b * k + j].tolist()) for j, s in enumerate(scores[b].tolist())
                        if s > -math.inf]
                finished[b].extend(live[:k - len(finished[b])])
            done[b] = done[b] or len(finished[b]) >= k or t >= limits[b]
        if all(done):
            break
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]


def translate(model: Seq2Seq, batches: list[data.Seq2SeqBatch], sp: spm.SentencePieceProcessor,
              beam_size: int = NMTConfig.beam_size, *, length_penalty: float = NMTConfig.length_penalty,
              max_len_ratio: float = NMTConfig.max_decode_ratio, max_len: int | None = None) -> list[str]:
    """Detokenised translations in example order: sorted by `batch.index` over the examples the batches hold
    (all of them when the batches cover the set). Beam 1 is greedy decoding."""
    found: dict[int, str] = {}
    for batch in batches:
        if beam_size == 1:
            hyps = greedy_decode(model, batch, max_len, max_len_ratio=max_len_ratio)
        else:
            hyps = beam_search(model, batch, beam_size, max_len, length_penalty, max_len_ratio=max_len_ratio)
        found.update((i, data.decode_bpe(sp, ids)) for i, ids in zip(batch.index.tolist(), hyps))
    return [found[i] for i in sorted(found)]


def bleu_scores(hypotheses: list[str], references: list[str]) -> dict:
    """sacrebleu corpus BLEU on detokenised text and its signature, plus `tok_bleu`: lower-cased BLEU on
    sacrebleu's 13a tokenisation (mteval's, close to the Moses tokeniser behind the paper's multi-bleu scores)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.metrics.BLEU()
    tok = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score, "bleu_signature": str(bleu.get_signature()),
            "tok_bleu": tok.corpus_score(hypotheses, [references]).score}


# --------------------------------------------------------------------------- the task the trial loop drives

class NMTTask(Task):
    """Data, model and optimiser of one translation trial; `trainables.trainable` runs the epochs."""

    metric = "bleu"
    higher_is_better = True

    def __init__(self, cfg: TrialConfig, device: torch.device, work_dir: Path):
        self.cfg, self.device = cfg, torch.device(device)
        self.data = load_corpus(cfg, Path(work_dir))
        torch.manual_seed(cfg.seed)   # same knobs and seed -> same initial weights (checkpoint reuse)
        self.model = Seq2Seq(cfg.nmt, cfg.g2, self.data.vocab_size, self.data.pad_id, self.data.bos_id,
                             self.data.eos_id, impl=cfg.train.impl, precision=cfg.train.precision).to(self.device)
        self.optimizer = make_optimizer(cfg.train, self.model.parameters())
        if cfg.train.cuda_graphs:   # decoder steps are one-token windows with attention in between: nothing to graph
            log.info("train.cuda_graphs applies to language models only; translation trains eagerly")
        self.eval_batches = {split: [b.to(self.device) for b in self._batches(getattr(self.data, split),
                                                                               shuffle=False)]
                             for split in ("valid", "test")}   # on the device once, not at every evaluation
        log.info("NMT: vocab %d, %d parameters, %s train pairs", self.data.vocab_size,
                 sum(p.numel() for p in self.model.parameters()), len(self.data.train))

    def _batches(self, examples, *, shuffle: bool, seed: int = 0) -> list[data.Seq2SeqBatch]:
        return data.make_batches(examples, self.cfg.train.batch_size, shuffle=shuffle, seed=seed,
                                 pad_id=self.data.pad_id, bos_id=self.data.bos_id, eos_id=self.data.eos_id)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the (shuffled) training batches; returns the mean token NLL and the token count."""
        cfg = self.cfg.train
        batches = self._batches(self.data.train, shuffle=True, seed=self.cfg.seed * 100_003 + epoch)
        if cfg.max_batches:
            batches = batches[:cfg.max_batches]
        self.model.train()
        nll_sum, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            logits = self.model(batch.src, batch.src_mask, batch.tgt_in)
            loss_sum, nll = sequence_loss(logits, batch.tgt_out, batch.tgt_mask, self.cfg.nmt.label_smoothing)
            n = batch.num_tgt_tokens
            loss = loss_sum / n
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} in epoch {epoch}, batch {i}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
            self.optimizer.step()
            nll_sum += nll.item()
            tokens += n
        return {"train_loss": nll_sum / max(tokens, 1), "train_tokens": float(tokens)}

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Teacher-forced token NLL and beam-search BLEU on `split`; `model` may be a compressed copy."""
        if split not in self.eval_batches:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        batches = data.spread(self.eval_batches[split], self.cfg.train.max_eval_batches)
        nll_sum, tokens = 0.0, 0
        with evaluating(model):
            for batch in batches:
                logits = model(batch.src, batch.src_mask, batch.tgt_in)
                nll_sum += sequence_loss(logits, batch.tgt_out, batch.tgt_mask)[1].item()
                tokens += batch.num_tgt_tokens
        nmt = self.cfg.nmt
        hyps = translate(model, batches, self.data.sp, nmt.beam_size, length_penalty=nmt.length_penalty,
                         max_len_ratio=nmt.max_decode_ratio)
        covered = sorted(i for batch in batches for i in batch.index.tolist())
        refs = [self.data.text[split][i][1] for i in covered]
        scores = bleu_scores(hyps, refs)
        log.info("%s: loss %.4f, %s", split, nll_sum / max(tokens, 1), scores["bleu_signature"])
        return {"loss": nll_sum / max(tokens, 1), "bleu": scores["bleu"], "tok_bleu": scores["tok_bleu"]}

    def gate_statistics(self, model: nn.Module) -> GateStatistics:
        """i/f gates of every recurrent layer (`recurrent_layer_names` order), teacher-forced, eval mode,
        over validation batches spread across the lengths, padding excluded."""
        stats = GateStatistics(len(model.recurrent_layer_names()))
        n_enc = len(model.recurrent_layer_names()) - model.decoder.num_layers
        with evaluating(model):
            for batch in data.spread(self.eval_batches["valid"], GATE_BATCHES):
                _, gates = model(batch.src, batch.src_mask, batch.tgt_in, return_gates=True)
                stats.update([g[batch.src_mask] for g in gates[:n_enc]]
                             + [g[batch.tgt_mask] for g in gates[n_enc:]])   # each (N, 2H), pads dropped
        return stats

    def state_dict(self) -> dict:
        return {}   # batches are a pure function of (seed, epoch); nothing else to carry over

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"NMTTask keeps no loop state, got keys {sorted(state)}")


def load_corpus(cfg: TrialConfig, work_dir: Path) -> data.ParallelData:
    """The trial's parallel corpus, BPE-encoded: a generated toy one under `work_dir`, or a real directory."""
    corpus = cfg.data.corpus
    if corpus in TOY_CORPORA:
        path = data.generate_once(work_dir / f"{corpus}-{cfg.seed}",
                                  lambda out: data.toy_parallel_corpus(out, seed=cfg.seed, task=TOY_CORPORA[corpus]))
        src_ext, tgt_ext = "src", "tgt"
    elif corpus == "toy":
        raise ValueError("data.corpus='toy' is the language-model grammar; translation uses toy-copy or toy-reverse")
    else:
        path = data.find_corpus(corpus, cfg.data.data_dir or None)
        src_ext, tgt_ext = cfg.data.src_ext, cfg.data.tgt_ext
    return data.load_parallel_data(path, src_ext=src_ext, tgt_ext=tgt_ext, vocab_size=cfg.data.bpe_vocab_size,
                                   cache_dir=data.cache_root(cfg.data.cache_dir) / "bpe", max_len=cfg.data.max_len,
                                   seed=cfg.seed)
