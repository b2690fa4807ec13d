"""Attentional LSTM encoder-decoder for translation, every recurrent layer a G2LSTM (docs/design.md §4).

Layout: time-major throughout, `src (S, B)`, `tgt (T, B)`, hidden `(layers, B, H)`. The encoder's first layer is
bidirectional (two one-layer G2LSTMs, the backward one reading each sentence reversed within its own length, so
padding never enters a real position), the layers above it unidirectional. The decoder uses additive (Bahdanau)
attention scored against its top hidden state and input feeding (Luong et al. 2015): the attentional vector
h̃_t = tanh(W_c [ctx_t; h_t]) feeds the output layer and is concatenated to the next input embedding. Input
feeding makes every decoder step depend on the previous one, so training and decoding share one `step`.
Dropout (Zaremba et al. 2014) sits on non-recurrent connections only: embeddings, between layers, h̃_t.

Source and target share one embedding: the BPE vocabulary is joint, so a piece (a name, a number, a cognate)
is the same string on both sides, and on a 29k-pair corpus the halved embedding also keeps the model's bits
(docs/design.md §3 accounting counts embeddings) from being dominated by two copies of the vocabulary.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import G2Config, NMTConfig
from trainables.g2lstm import G2LSTM

RecurrentFactory = Callable[..., G2LSTM]   # (input_size, hidden_size, num_layers, **kw) -> a G2LSTM


def run_rnn(rnn: G2LSTM, x: Tensor, state=None, weight_hh: list[Tensor] | None = None,
            gates: list[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`rnn`'s (y, (h, c)); `weight_hh` replaces its layers' recurrent weights for this call. With a `gates` list,
    each layer's i/f gates (`G2LSTM.forward_with_gates`) are appended to it."""
    if gates is None:
        return rnn(x, state, weight_hh=weight_hh)
    y, new_state, layer_gates = rnn.forward_with_gates(x, state, weight_hh=weight_hh)
    gates.extend(layer_gates)
    return y, new_state


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


@dataclass(frozen=True)
class Memory:
    """What attention reads at every decoder step; keys are projected once per sentence, not per step."""

    values: Tensor          # (S, B, D)
    keys: Tensor            # (S, B, A)
    mask: Tensor            # (S, B)

    def repeat(self, k: int) -> Memory:
        """Each column repeated k times in place (b*k + j), for a flattened batch × beam."""
        return Memory(*(t.repeat_interleave(k, dim=1) for t in (self.values, self.keys, self.mask)))


@dataclass(frozen=True)
class DecoderState:
    h: Tensor               # (L, B, H)
    c: Tensor               # (L, B, H)
    feed: Tensor            # (B, H) previous attentional vector h̃_{t-1} (input feeding)

    def select(self, rows: Tensor) -> DecoderState:
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

    def forward(self, src: Tensor, src_mask: Tensor) -> EncoderOut:
        """src, src_mask (S, B). Outputs at real positions never depend on the batch's padding."""
        return self._encode(src, src_mask, None)

    def forward_with_gates(self, src: Tensor, src_mask: Tensor) -> tuple[EncoderOut, list[Tensor]]:
        """`forward`, and every layer's i/f gates (S, B, 2H) [i, f] in source order: forward, backward, upper."""
        gates: list[Tensor] = []
        return self._encode(src, src_mask, gates), gates

    def _encode(self, src: Tensor, src_mask: Tensor, gates: list[Tensor] | None) -> EncoderOut:
        lengths = src_mask.sum(0)                                            # (B,)
        last = (lengths - 1).clamp(min=0)                                    # (B,); an empty source reads step 0
        x = F.dropout(self.embed(src), self.dropout, self.training)         # (S, B, E)
        rev = reverse_index(lengths, src.size(0))                            # (S, B)
        backward_gates = None if gates is None else []
        fwd, _ = run_rnn(self.forward_rnn, x, gates=gates)                               # (S, B, H)
        bwd, _ = run_rnn(self.backward_rnn, take_time(x, rev), gates=backward_gates)
        final = torch.cat([take_time(fwd, last), take_time(bwd, last)], -1)  # (B, 2H): both directions' ends
        y = torch.cat([fwd, take_time(bwd, rev)], -1)                        # (S, B, 2H), bwd back in source order
        if gates is not None:
            gates.extend(take_time(g, rev) for g in backward_gates)
        if self.upper is not None:
            y = F.dropout(y, self.dropout, self.training)
            y, _ = run_rnn(self.upper, y, gates=gates)                        # (S, B, H)
            final = take_time(y, last)                                       # (B, H)
        y = F.dropout(y, self.dropout, self.training)
        return EncoderOut(y, final, src_mask)


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

    def sequence_weights(self) -> list[Tensor] | None:
        """Each layer's W_hh with one DropConnect mask for a whole target sequence (AWD-LSTM); None when off."""
        if not (self.training and self.weight_drop):
            return None
        return [F.dropout(self.rnn.layer_weights(k)[1], self.weight_drop, True) for k in range(self.num_layers)]

    def step(self, tokens: Tensor, state: DecoderState, memory: Memory, weights: list[Tensor] | None = None,
             gates: list[Tensor] | None = None) -> tuple[Tensor, DecoderState]:
        """tokens (B,) -> attentional vector h̃_t (B, H) and the next state; with a `gates` list, each layer's
        i/f gates (1, B, 2H) are appended to it."""
        emb = F.dropout(self.embed(tokens), self.dropout, self.training)        # (B, E)
        x = torch.cat([emb, state.feed], -1)[None]                               # (1, B, E + H)
        y, (h, c) = run_rnn(self.rnn, x, (state.h, state.c), weights, gates)   # y (1, B, H)
        context, _ = self.attention(y[0], memory)                                # (B, D)
        out = torch.tanh(self.combine(torch.cat([context, y[0]], -1)))          # (B, H)
        out = F.dropout(out, self.dropout, self.training)
        return out, DecoderState(h, c, out)

    def forward(self, tgt_in: Tensor, memory: Memory, state: DecoderState) -> Tensor:
        """Teacher forcing: tgt_in (T, B) -> attentional vectors (T, B, H)."""
        return self._teacher_forced(tgt_in, memory, state, None)

    def forward_with_gates(self, tgt_in: Tensor, memory: Memory, state: DecoderState
                           ) -> tuple[Tensor, list[Tensor]]:
        """`forward`, and every layer's i/f gates (T, B, 2H) [i, f]."""
        steps: list[list[Tensor]] = []
        outs = self._teacher_forced(tgt_in, memory, state, steps)
        return outs, [torch.cat(layer) for layer in zip(*steps)]

    def _teacher_forced(self, tgt_in: Tensor, memory: Memory, state: DecoderState,
                        steps: list[list[Tensor]] | None) -> Tensor:
        weights = self.sequence_weights()
        outs = []
        for tokens in tgt_in.unbind(0):
            gates = None if steps is None else []
            out, state = self.step(tokens, state, memory, weights, gates)
            outs.append(out)
            if steps is not None:
                steps.append(gates)
        return torch.stack(outs)


class Seq2Seq(nn.Module):
    """Encoder-decoder over one joint vocabulary; `forward` returns teacher-forced logits (T, B, V)."""

    def __init__(self, cfg: NMTConfig, g2: G2Config, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, *,
                 impl: str = "auto", precision: str = "fp32"):
        super().__init__()
        self.cfg, self.pad_id, self.bos_id, self.eos_id = cfg, pad_id, bos_id, eos_id
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=pad_id)
        # N(0, σ²) at the authors' σ = 0.01 by default (`nmt.embed_init_std`); PyTorch's N(0, 1) (σ = 1) keeps W_ih·x
        # near unit scale from the start, which made the toy copy task learn sooner than fairseq's U(±0.1).
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=cfg.embed_init_std)
            self.embed.weight[pad_id].zero_()                                # the padding row stays 0
        rnn = functools.partial(G2LSTM, g2=g2, impl=impl, precision=precision)
        self.encoder = Encoder(cfg, rnn, self.embed)
        self.decoder = Decoder(cfg, rnn, self.embed, self.encoder.output_dim, vocab_size)

    def encode(self, src: Tensor, src_mask: Tensor) -> tuple[Memory, DecoderState]:
        return self.decoder.start(self.encoder(src, src_mask))

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """src, src_mask (S, B); tgt_in (T, B) -> teacher-forced logits (T, B, V)."""
        memory, state = self.decoder.start(self.encoder(src, src_mask))
        return self.decoder.output(self.decoder(tgt_in, memory, state))

    def forward_with_gates(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`forward`, and every layer's i/f gates in `recurrent_layer_names` order: encoder ones (S, B, 2H),
        decoder ones (T, B, 2H)."""
        enc, enc_gates = self.encoder.forward_with_gates(src, src_mask)
        memory, state = self.decoder.start(enc)
        outs, dec_gates = self.decoder.forward_with_gates(tgt_in, memory, state)
        return self.decoder.output(outs), enc_gates + dec_gates            # (T, B, V)

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
