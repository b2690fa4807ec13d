"""Translation as one trial's task: the parallel corpus, the `Seq2Seq` model, its loss, epochs and BLEU.

`trainables.trainable.run_trial` drives an `NMTTask` like any `Task`: train an epoch, evaluate a (possibly
compressed) model by teacher-forced NLL and beam-search BLEU, measure gate statistics. The model lives in
`trainables/seq2seq.py`, decoding in `trainables/decoding.py`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import TrialConfig
from trainables.corpora import cache_root, find_corpus
from trainables.decoding import evaluating, translate
from trainables.g2lstm import GateStatistics, evaluation_gates
from trainables.parallel_data import ParallelData, Seq2SeqBatch, load_parallel_data, make_batches, spread
from trainables.pulse import TRAIN, Pulse
from trainables.report import TRAIN_TOKENS
from trainables.seq2seq import Seq2Seq
from trainables.task import Task, make_optimizer
from trainables.toy import generate_once, toy_parallel_corpus

log = logging.getLogger(__name__)

TOY_CORPORA = {"toy-copy": "copy", "toy-reverse": "reverse"}
GATE_BATCHES = 4            # validation batches measured by `NMTTask.gate_statistics`


def sequence_loss(logits: Tensor, target: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Summed (training loss, NLL) over real tokens; smoothing spreads ε uniformly over the vocabulary."""
    lprobs = F.log_softmax(logits.float(), dim=-1)                           # (T, B, V)
    nll = -lprobs.gather(-1, target[..., None]).squeeze(-1)                  # (T, B)
    loss = nll if not label_smoothing else (1 - label_smoothing) * nll - label_smoothing * lprobs.mean(-1)
    return loss[mask].sum(), nll[mask].sum()


def bleu_scores(hypotheses: list[str], references: list[str]) -> dict:
    """sacrebleu corpus BLEU on detokenised text and its signature, plus `tok_bleu`: lower-cased BLEU on
    sacrebleu's 13a tokenisation (mteval's, close to the Moses tokeniser behind the paper's multi-bleu scores)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = sacrebleu.metrics.BLEU()
    tok = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score, "bleu_signature": str(bleu.get_signature()),
            "tok_bleu": tok.corpus_score(hypotheses, [references]).score}


def teacher_forced_loss(model: nn.Module, batches: list[Seq2SeqBatch]) -> float:
    """Mean token NLL of the references given the previous reference tokens, in eval mode."""
    nll_sum, tokens = 0.0, 0
    with evaluating(model):
        for batch in batches:
            logits = model(batch.src, batch.src_mask, batch.tgt_in)
            nll_sum += sequence_loss(logits, batch.tgt_out, batch.tgt_mask)[1].item()
            tokens += batch.num_tgt_tokens
    return nll_sum / max(tokens, 1)


class NMTTask(Task):
    """Data, model and optimiser of one translation trial; `trainables.trainable` runs the epochs."""

    metric = "bleu"

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

    def _batches(self, examples, *, shuffle: bool, seed: int = 0) -> list[Seq2SeqBatch]:
        return make_batches(examples, self.cfg.train.batch_size, shuffle=shuffle, seed=seed,
                                 pad_id=self.data.pad_id, bos_id=self.data.bos_id, eos_id=self.data.eos_id)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the (shuffled) training batches; returns the mean token NLL and the token count."""
        cfg = self.cfg.train
        batches = self._batches(self.data.train, shuffle=True, seed=self.cfg.seed * 100_003 + epoch)
        if cfg.max_batches:
            batches = batches[:cfg.max_batches]
        self.model.train()
        nll_sum, tokens = 0.0, 0
        self.pulse(Pulse(TRAIN, 0, len(batches), 0, epoch))   # the pass starts: its clock too
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
            self.pulse(Pulse(TRAIN, i + 1, len(batches), int(tokens), epoch))
        return {"train_loss": nll_sum / max(tokens, 1), TRAIN_TOKENS: float(tokens)}

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Teacher-forced token NLL and beam-search BLEU on `split`; `model` may be a compressed copy."""
        if split not in self.eval_batches:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        batches = spread(self.eval_batches[split], self.cfg.train.max_eval_batches)
        loss = teacher_forced_loss(model, batches)
        nmt = self.cfg.nmt
        hyps = translate(model, batches, self.data.sp, nmt.beam_size, length_penalty=nmt.length_penalty,
                         max_len_ratio=nmt.max_decode_ratio)
        covered = sorted(i for batch in batches for i in batch.index.tolist())
        refs = [self.data.text[split][i][1] for i in covered]
        scores = bleu_scores(hyps, refs)
        log.info("%s: loss %.4f, %s", split, loss, scores["bleu_signature"])
        return {"loss": loss, "bleu": scores["bleu"], "tok_bleu": scores["tok_bleu"]}

    def selection_loss(self, model: nn.Module, val: dict[str, float]) -> float:
        """Teacher-forced token NLL, not BLEU: beam size and length penalty are scoring knobs (fairseq too keeps the
        checkpoint of the best validation loss)."""
        if self.cfg.train.max_eval_batches == 0 and self.cfg.g2.eval_gate == "soft":
            return val["loss"]
        with evaluation_gates(model, "soft"):
            return teacher_forced_loss(model, self.eval_batches["valid"])

    def gate_statistics(self, model: nn.Module) -> GateStatistics:
        """i/f gates of every recurrent layer (`recurrent_layer_names` order), teacher-forced, eval mode,
        over validation batches spread across the lengths, padding excluded."""
        stats = GateStatistics(len(model.recurrent_layer_names()))
        n_enc = len(model.recurrent_layer_names()) - model.decoder.num_layers
        with evaluating(model):
            for batch in spread(self.eval_batches["valid"], GATE_BATCHES):
                _, gates = model.forward_with_gates(batch.src, batch.src_mask, batch.tgt_in)
                stats.update([g[batch.src_mask] for g in gates[:n_enc]]
                             + [g[batch.tgt_mask] for g in gates[n_enc:]])   # each (N, 2H), pads dropped
        return stats

    def state_dict(self) -> dict:
        return {}   # batches are a pure function of (seed, epoch); nothing else to carry over

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"NMTTask keeps no loop state, got keys {sorted(state)}")


def load_corpus(cfg: TrialConfig, work_dir: Path) -> ParallelData:
    """The trial's parallel corpus, BPE-encoded: a generated toy one under `work_dir`, or a real directory."""
    corpus = cfg.data.corpus
    if corpus in TOY_CORPORA:
        path = generate_once(work_dir / f"{corpus}-{cfg.seed}",
                                  lambda out: toy_parallel_corpus(out, seed=cfg.seed, task=TOY_CORPORA[corpus]))
        src_ext, tgt_ext = "src", "tgt"
    elif corpus == "toy":
        raise ValueError("data.corpus='toy' is the language-model grammar; translation uses toy-copy or toy-reverse")
    else:
        path = find_corpus(corpus, cfg.data.data_dir or None)
        src_ext, tgt_ext = cfg.data.src_ext, cfg.data.tgt_ext
    return load_parallel_data(path, src_ext=src_ext, tgt_ext=tgt_ext, vocab_size=cfg.data.bpe_vocab_size,
                                   cache_dir=cache_root(cfg.data.cache_dir) / "bpe", max_len=cfg.data.max_len,
                                   seed=cfg.seed)
