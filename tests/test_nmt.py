"""Tests for trainables/nmt.py: the attentional G2-LSTM encoder-decoder, decoding, BLEU and the trial task."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.paper import nmt_layer_names
from trainables import data
from trainables.compress import compress_model, gate_rows
from trainables.config import CompressConfig, G2Config, NMTConfig, TrialConfig
from trainables.g2lstm import G2LSTM
from trainables.nmt import (NMTTask, Seq2Seq, beam_search, bleu_scores, greedy_decode, reverse_index,
                            sequence_loss, translate)

VOCAB, PAD, BOS, EOS = 30, data.PAD_ID, data.BOS_ID, data.EOS_ID


def small_model(encoder_layers=2, decoder_layers=2, g2=G2Config(), **nmt) -> Seq2Seq:
    cfg = NMTConfig(embed_dim=16, hidden_size=24, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                    **{"dropout": 0.1, **nmt})
    return Seq2Seq(cfg, g2, VOCAB, PAD, BOS, EOS)


def random_examples(n, seed=0, min_len=1, max_len=9):
    g = torch.Generator().manual_seed(seed)
    def sentence():
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        return torch.randint(4, VOCAB, (length,), generator=g)
    return [(sentence(), sentence()) for _ in range(n)]


def run(model, batch, **kw):
    return model(batch.src, batch.src_mask, batch.tgt_in, **kw)


def tiny_cfg(cache_dir, **flat) -> TrialConfig:
    return TrialConfig.from_flat({"data.cache_dir": str(cache_dir), **flat}, base=TrialConfig.preset("nmt", "tiny"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds syncs, and on a busy machine OpenMP's
    spin-waiting made this file 10× slower with two threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One BPE cache for the module, so the toy BPE model is trained once."""
    return tmp_path_factory.mktemp("bpe-cache")


# --------------------------------------------------------------------------- model

@pytest.mark.parametrize("encoder_layers,decoder_layers", [(1, 1), (3, 2)])
def test_forward_shapes_and_gate_layers(encoder_layers, decoder_layers):
    model = small_model(encoder_layers, decoder_layers)
    batch = data.make_batches(random_examples(6), 6, shuffle=False)[0]
    (src_len, b), tgt_len = batch.src.shape, batch.tgt_in.size(0)
    logits, gates = run(model, batch, return_gates=True)
    assert logits.shape == (tgt_len, b, VOCAB)
    names = model.recurrent_layer_names()
    assert len(names) == len(gates) == encoder_layers + 1 + decoder_layers
    assert names[:2] == ["encoder.forward", "encoder.backward"] and names[-1] == f"decoder.l{decoder_layers - 1}"
    analysis_names = nmt_layer_names(encoder_layers, decoder_layers)          # what the notebooks call them
    assert [n.split()[0] for n in analysis_names] == [n.split(".")[0][:3] for n in names]
    n_enc = encoder_layers + 1
    assert all(g.shape == (src_len, b, 2 * 24) for g in gates[:n_enc])
    assert all(g.shape == (tgt_len, b, 2 * 24) for g in gates[n_enc:])
    assert model.encoder(batch.src, batch.src_mask).outputs.shape == (src_len, b, 48 if encoder_layers == 1 else 24)


def test_reverse_index_reverses_within_length_and_keeps_padding():
    rev = reverse_index(torch.tensor([3, 1, 0]), 4)
    assert rev.t().tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_backward_direction_reads_each_sentence_reversed():
    model = small_model(encoder_layers=1).eval()
    examples = random_examples(5, seed=1)
    batch = data.make_batches(examples, 5, shuffle=False)[0]
    out = model.encoder(batch.src, batch.src_mask).outputs                  # (S, B, 2H)
    for col, i in enumerate(batch.index.tolist()):
        src = examples[i][0]
        alone, _ = model.encoder.backward_rnn(model.embed(src.flip(0))[:, None])   # (L, 1, H), reversed time
        torch.testing.assert_close(out[:src.numel(), col, 24:], alone[:, 0].flip(0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("g2", [G2Config(gate_mode="lstm"), G2Config(), G2Config(eval_gate="hard")],
                         ids=["lstm", "g2-soft", "g2-hard"])
def test_padding_does_not_change_a_sentence(g2):
    """A short pair gives the same encoding and logits alone and batched with longer ones (eval mode)."""
    model = small_model(g2=g2).eval()
    short = random_examples(1, seed=2, min_len=2, max_len=2)
    longer = random_examples(4, seed=3, min_len=7, max_len=9)
    alone = data.make_batches(short, 1, shuffle=False)[0]
    mixed = data.make_batches(longer + short, 5, shuffle=False)[0]
    col = mixed.index.tolist().index(4)
    s, t = short[0][0].numel(), short[0][1].numel() + 1
    with torch.no_grad():
        enc_alone, enc_mixed = (model.encoder(b.src, b.src_mask) for b in (alone, mixed))
        torch.testing.assert_close(enc_mixed.outputs[:s, col], enc_alone.outputs[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(enc_mixed.final[col], enc_alone.final[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(run(model, mixed)[:t, col], run(model, alone)[:, 0], atol=1e-5, rtol=1e-5)


def test_training_mode_is_stochastic_and_trains_every_layer():
    model = small_model(weight_drop=0.3).train()
    batch = data.make_batches(random_examples(4), 4, shuffle=False)[0]
    assert set(model.decoder.sequence_weights()) == {"weight_hh_l0", "weight_hh_l1"}
    first, second = run(model, batch), run(model, batch)
    assert not torch.allclose(first, second)                                 # dropout, DropConnect, gate noise
    sequence_loss(first, batch.tgt_out, batch.tgt_mask)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.eval().decoder.sequence_weights() is None


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


def test_every_recurrent_layer_is_a_g2lstm_and_compress_finds_them():
    model = small_model(encoder_layers=2, decoder_layers=2)
    assert not any(isinstance(m, nn.RNNBase) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, G2LSTM)]
    assert len(layers) == 4 and sum(m.num_layers for m in layers) == len(model.recurrent_layer_names())
    assert all(m.g2 == model.encoder.forward_rnn.g2 for m in layers)
    gate_params = sum(2 * m.hidden_size * (m.layer_weights(k)[0].size(1) + m.hidden_size)
                      for m in layers for k in range(m.num_layers))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed, report = compress_model(model, CompressConfig(rank=4))
    assert report.gate_params == gate_params and report.gate_compression > 1
    for module in (m for m in compressed.modules() if isinstance(m, G2LSTM)):
        for k in range(module.num_layers):
            for w in module.layer_weights(k)[:2]:
                for rows in gate_rows(module.hidden_size):
                    assert torch.linalg.matrix_rank(w[rows], rtol=1e-5) <= 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # the original is untouched
    batch = data.make_batches(random_examples(3), 3, shuffle=False)[0]
    assert torch.isfinite(run(compressed.eval(), batch)).all()


# --------------------------------------------------------------------------- decoding

def test_beam_of_one_is_exactly_greedy():
    model = small_model(g2=G2Config(gate_mode="lstm")).eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS] += 2.0     # let some sentences end early, others run to the limit
    for batch in data.make_batches(random_examples(12, seed=4), 5, shuffle=False):
        greedy = greedy_decode(model, batch)
        assert beam_search(model, batch, beam_size=1) == greedy
        assert any(len(h) < max(batch.src_lengths.tolist()) for h in greedy)
        assert all(EOS not in h and BOS not in h for h in greedy)


def test_decoding_respects_length_limits():
    model = small_model().eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS] -= 100.0   # never stops by itself
    batch = data.make_batches(random_examples(4, seed=5), 4, shuffle=False)[0]
    limits = [int(0.5 * n) + 10 for n in batch.src_lengths.tolist()]
    for hyps in (greedy_decode(model, batch, max_len_ratio=0.5), beam_search(model, batch, 3, max_len_ratio=0.5)):
        assert [len(h) for h in hyps] == limits
    assert all(len(h) == 4 for h in beam_search(model, batch, 3, max_len=4))


def test_translate_returns_sentences_in_example_order(cache_dir, tmp_path):
    """Bucketed batches reorder the examples; translate() puts each translation back at its example's place."""
    corpus = data.toy_parallel_corpus(tmp_path, seed=0, n_train=200, n_valid=20, n_test=20)
    pairs = data.load_parallel_text(corpus)
    sp = data.train_bpe(pairs["train"], 60, cache_dir)
    examples = data.encode_parallel(pairs["valid"], sp)
    model = Seq2Seq(NMTConfig(embed_dim=16, hidden_size=24), G2Config(), len(sp), PAD, BOS, EOS).double().eval()
    batches = data.make_batches(examples, 6, shuffle=True, seed=1)
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(20))
    assert [i for b in batches for i in b.index.tolist()] != list(range(20))
    one_by_one = [translate(model, data.make_batches([ex], 1, shuffle=False), sp, 3)[0] for ex in examples]
    assert translate(model, batches, sp, 3) == one_by_one
    assert translate(model, batches[:2], sp, 3) == [one_by_one[i] for i in sorted(
        i for b in batches[:2] for i in b.index.tolist())]


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
    assert (task.metric, task.higher_is_better) == ("bleu", True)
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
    corpus = data.toy_parallel_corpus(tmp_path / "mine", seed=5, task="reverse", n_train=300)
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
        data.find_corpus("multi30k")
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
