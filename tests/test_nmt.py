"""Tests for trainables/nmt.py: the translation task (loss, BLEU, epochs, evaluation, gate statistics, learning)."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from trainables.config import TrialConfig
from trainables.corpora import find_corpus
from trainables.decoding import beam_search, greedy_decode
from trainables.nmt import NMTTask, bleu_scores, sequence_loss
from trainables.report import HIGHER_IS_BETTER
from trainables.toy import toy_parallel_corpus

from tiny_seq2seq import PAD, VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(cache_dir, **flat) -> TrialConfig:
    return TrialConfig.from_flat({"data.cache_dir": str(cache_dir), **flat}, base=TrialConfig.preset("nmt", "tiny"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One BPE cache for the module, so the toy BPE model is trained once."""
    return tmp_path_factory.mktemp("bpe-cache")


# --------------------------------------------------------------------------- loss and BLEU

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sequence_loss_matches_cross_entropy_ignoring_pad(smoothing):
    logits = torch.randn(5, 3, VOCAB)
    target = torch.randint(4, VOCAB, (5, 3))
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[3:, 0] = mask[4:, 2] = False
    target = target.masked_fill(~mask, PAD)
    loss, nll = sequence_loss(logits, target, mask, smoothing)
    expect = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), ignore_index=PAD, reduction="sum",
                             label_smoothing=smoothing)
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(nll, F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), ignore_index=PAD,
                                                    reduction="sum"))


def test_bleu_scores():
    refs = ["A man rides a horse .", "Two dogs play in the snow ."]
    same = bleu_scores(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["tok_bleu"] == pytest.approx(100.0)
    assert "nrefs:1" in same["bleu_signature"] and "tok:13a" in same["bleu_signature"]
    lower = bleu_scores([r.lower() for r in refs], refs)
    assert lower["bleu"] < 100.0 and lower["tok_bleu"] == pytest.approx(100.0)
    assert bleu_scores(["completely different words here"] * 2, refs)["bleu"] < 10.0
    with pytest.raises(ValueError, match="2 references"):
        bleu_scores(refs[:1], refs)


# --------------------------------------------------------------------------- the task

def test_task_epoch_evaluation_and_gate_statistics(cache_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, **{"train.max_batches": 3, "train.max_eval_batches": 2, "nmt.dropout": 0.1})
    task = NMTTask(cfg, torch.device("cpu"), tmp_path)
    assert (task.metric, HIGHER_IS_BETTER[cfg.task]) == ("bleu", True)
    stats = task.train_epoch(0)
    assert set(stats) == {"train_loss", "train_tokens"}
    assert 0 < stats["train_loss"] < 2 * math.log(task.data.vocab_size) and stats["train_tokens"] > 0
    task.model.train()
    first, second = task.evaluate(task.model, "valid"), task.evaluate(task.model, "valid")
    assert first == second and set(first) == {"loss", "bleu", "tok_bleu"}
    assert task.model.training                                       # evaluate() restores the mode it found
    assert task.evaluate(task.model, "test")["loss"] > 0
    with pytest.raises(ValueError, match="split"):
        task.evaluate(task.model, "train")
    gates = task.gate_statistics(task.model)
    names = task.model.recurrent_layer_names()
    assert gates.counts.shape[0] == len(names) == 3
    assert gates.total[:, 0].min() > 0
    for hist in gates.histograms().values():
        assert sum(hist) == pytest.approx(1.0)
    task.load_state_dict(task.state_dict())


def test_task_shuffles_per_epoch_and_reads_a_corpus_directory(cache_dir, tmp_path):
    corpus = toy_parallel_corpus(tmp_path / "mine", seed=5, task="reverse", n_train=300)
    cfg = tiny_cfg(cache_dir, **{"data.corpus": str(corpus), "data.src_ext": "src", "data.tgt_ext": "tgt",
                                 "train.max_batches": 2})
    task = NMTTask(cfg, torch.device("cpu"), tmp_path / "work")
    assert len(task.data.train) == 300
    assert task.train_epoch(0)["train_tokens"] != task.train_epoch(1)["train_tokens"]


def test_task_raises_on_a_non_finite_loss(cache_dir, tmp_path):
    task = NMTTask(tiny_cfg(cache_dir, **{"train.max_batches": 2}), torch.device("cpu"), tmp_path)
    with torch.no_grad():
        task.model.decoder.output.bias.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="epoch 3, batch 0"):
        task.train_epoch(3)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adadelta", torch.optim.Adadelta),
                                      ("sgd", torch.optim.SGD)])
def test_task_optimizers(cache_dir, tmp_path, name, cls):
    task = NMTTask(tiny_cfg(cache_dir, **{"train.optimizer": name, "train.lr": 0.5, "train.weight_decay": 1e-5}),
                   torch.device("cpu"), tmp_path)
    assert type(task.optimizer) is cls
    assert task.optimizer.defaults["lr"] == 0.5 and task.optimizer.defaults["weight_decay"] == 1e-5


def test_task_rejects_the_language_model_toy_corpus(cache_dir, tmp_path):
    with pytest.raises(ValueError, match="toy-copy or toy-reverse"):
        NMTTask(tiny_cfg(cache_dir, **{"data.corpus": "toy"}), torch.device("cpu"), tmp_path)


# --------------------------------------------------------------------------- learning the copy task

@pytest.fixture(scope="module")
def trained_copy(cache_dir, tmp_path_factory):
    """The tiny preset on toy-copy, trained until 2 validation batches reach BLEU 95 (at most 25 epochs)."""
    cfg = tiny_cfg(cache_dir, **{"train.max_eval_batches": 2})
    task = NMTTask(cfg, torch.device("cpu"), tmp_path_factory.mktemp("copy"))
    for epoch in range(25):
        task.train_epoch(epoch)
        if task.evaluate(task.model, "valid")["bleu"] >= 95:
            break
    task.cfg = replace(cfg, train=replace(cfg.train, max_eval_batches=0))    # whole splits from here on
    return task


@pytest.mark.slow
def test_learns_the_copy_task(trained_copy):
    result = trained_copy.evaluate(trained_copy.model, "test")
    assert result["bleu"] > 90 and result["tok_bleu"] > 90    # references in example order: a mix-up scores ~0
    assert result["loss"] < 0.5


@pytest.mark.slow
def test_beam_and_greedy_on_a_trained_model(trained_copy):
    model = trained_copy.model.train()          # decoding switches to eval mode by itself
    greedy, beam = [], []
    for batch in trained_copy.eval_batches["test"]:
        greedy += greedy_decode(model, batch)
        assert beam_search(model, batch, beam_size=1) == greedy[-batch.batch_size:]
        beam += beam_search(model, batch, beam_size=5)
    assert model.training
    assert sum(g == b for g, b in zip(greedy, beam)) / len(greedy) >= 0.9   # a peaked model: beam rarely matters


@pytest.mark.slow
def test_task_on_real_multi30k(tmp_path):
    try:
        find_corpus("multi30k")
    except FileNotFoundError:
        pytest.skip("multi30k not present (set $G2_DATA_DIR or provide ../shared/data)")
    cfg = TrialConfig.from_flat({"data.cache_dir": str(tmp_path),
                                 "data.bpe_vocab_size": 1000, "nmt.embed_dim": 16, "nmt.hidden_size": 16,
                                 "train.max_batches": 2, "train.max_eval_batches": 1, "train.batch_size": 8},
                                base=TrialConfig.preset("nmt", "default"))
    task = NMTTask(cfg, torch.device("cpu"), tmp_path)
    assert len(task.data.valid) == 1014 and len(task.data.test) == 1000
    assert math.isfinite(task.train_epoch(0)["train_loss"])
    assert math.isfinite(task.evaluate(task.model, "valid")["bleu"])
