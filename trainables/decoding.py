"""Decoding a `Seq2Seq`: greedy and batched beam search, and detokenised translation of whole batches.

Both decoders run the model's `Decoder.step` one target token at a time (input feeding makes every step depend
on the previous one) in eval mode without gradients, whatever mode the model was in (`in_eval_mode`).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import NMTConfig
from trainables.parallel_data import Seq2SeqBatch, decode_bpe
from trainables.seq2seq import Seq2Seq


def max_lengths(batch: Seq2SeqBatch, max_len: int | None, ratio: float) -> list[int]:
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
def greedy_decode(model: Seq2Seq, batch: Seq2SeqBatch, max_len: int | None = None, *,
                  max_len_ratio: float = NMTConfig.max_decode_ratio) -> list[list[int]]:
    """Argmax decoding; token ids per column of `batch` (batch order), without bos/eos."""
    batch = batch.to(_device(model))
    limits = max_lengths(batch, max_len, max_len_ratio)
    memory, state = model.encode(batch.src, batch.src_mask)
    tokens = batch.src.new_full((batch.batch_size,), model.bos_id)         # (B,)
    done = torch.zeros_like(tokens, dtype=torch.bool)
    steps = []
    for _ in range(max(limits)):
        out, state = model.decoder.step(tokens, state, memory)
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
def beam_search(model: Seq2Seq, batch: Seq2SeqBatch, beam_size: int = NMTConfig.beam_size,
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
        out, state = model.decoder.step(tokens, state, memory)
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


def translate(model: Seq2Seq, batches: list[Seq2SeqBatch], sp: spm.SentencePieceProcessor,
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
        found.update((i, decode_bpe(sp, ids)) for i, ids in zip(batch.index.tolist(), hyps))
    return [found[i] for i in sorted(found)]
