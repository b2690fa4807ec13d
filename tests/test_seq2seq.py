"""Tests for trainables/seq2seq.py: the attentional G2-LSTM encoder-decoder (shapes, padding, directions, layers)."""
import pytest
import torch
from torch import nn

from analysis.paper import nmt_layer_names
from trainables.compress import compress_model, gate_rows
from trainables.config import CompressConfig, G2Config
from trainables.g2lstm import G2LSTM
from trainables.nmt import sequence_loss
from trainables.parallel_data import make_batches
from trainables.seq2seq import reverse_index

from tiny_seq2seq import PAD, VOCAB, random_examples, run, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("encoder_layers,decoder_layers", [(1, 1), (3, 2)])
def test_forward_shapes_and_gate_layers(encoder_layers, decoder_layers):
    model = small_model(encoder_layers, decoder_layers)
    batch = make_batches(random_examples(6), 6, shuffle=False)[0]
    (src_len, b), tgt_len = batch.src.shape, batch.tgt_in.size(0)
    logits, gates = model.forward_with_gates(batch.src, batch.src_mask, batch.tgt_in)
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
    batch = make_batches(examples, 5, shuffle=False)[0]
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
    alone = make_batches(short, 1, shuffle=False)[0]
    mixed = make_batches(longer + short, 5, shuffle=False)[0]
    col = mixed.index.tolist().index(4)
    s, t = short[0][0].numel(), short[0][1].numel() + 1
    with torch.no_grad():
        enc_alone, enc_mixed = (model.encoder(b.src, b.src_mask) for b in (alone, mixed))
        torch.testing.assert_close(enc_mixed.outputs[:s, col], enc_alone.outputs[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(enc_mixed.final[col], enc_alone.final[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(run(model, mixed)[:t, col], run(model, alone)[:, 0], atol=1e-5, rtol=1e-5)


def test_training_mode_is_stochastic_and_trains_every_layer():
    model = small_model(weight_drop=0.3).train()
    batch = make_batches(random_examples(4), 4, shuffle=False)[0]
    assert len(model.decoder.sequence_weights()) == 2
    first, second = run(model, batch), run(model, batch)
    assert not torch.allclose(first, second)                                 # dropout, DropConnect, gate noise
    sequence_loss(first, batch.tgt_out, batch.tgt_mask)[0].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.eval().decoder.sequence_weights() is None


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
    batch = make_batches(random_examples(3), 3, shuffle=False)[0]
    assert torch.isfinite(run(compressed.eval(), batch)).all()


def test_shared_embedding_starts_at_the_authors_scale_and_the_knob_sets_it():
    """nmt.embed_init_std: N(0, 0.01²) by default (the authors'), the padding row 0; 1.0 is PyTorch's N(0, 1)."""
    from trainables.config import NMTConfig, TrialConfig
    from trainables.lm import RNNLM

    assert NMTConfig().embed_init_std == 0.01
    torch.manual_seed(0)
    for std in (0.01, 1.0):
        weight = small_model(embed_init_std=std).embed.weight.detach()            # (30, 16)
        assert torch.equal(weight[PAD], torch.zeros(16))
        rows = torch.cat([weight[:PAD], weight[PAD + 1:]])
        assert rows.std().item() == pytest.approx(std, rel=0.1) and abs(rows.mean().item()) < 0.1 * std
    cfg = TrialConfig.from_flat({"task": "nmt", "nmt.embed_init_std": 0.1})
    assert cfg.nmt.embed_init_std == 0.1 and cfg.training_key() != TrialConfig.from_flat({"task": "nmt"}).training_key()
    with pytest.raises(ValueError, match=r"nmt.embed_init_std must be a number in \(0.0, 10.0\]"):
        NMTConfig(embed_init_std=0.0)
    lm = TrialConfig.preset("lm", "tiny")                       # the language model keeps AWD's U(±0.1)
    embedding = RNNLM(lm.lm, lm.g2, 50).embedding.weight
    assert 0.09 < embedding.abs().max().item() <= 0.1
