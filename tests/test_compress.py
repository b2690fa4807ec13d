import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from trainables.compress import (
    account,
    compress_block,
    compress_model,
    gate_rows,
    low_rank,
    low_rank_factors,
    quantize,
    round_to_step,
    rounding,
)
from trainables.config import CompressConfig, G2Config, NMTConfig, TrialConfig
from trainables.g2lstm import G2LSTM
from trainables.lm import RNNLM
from trainables.parallel_data import BOS_ID, EOS_ID, PAD_ID
from trainables.seq2seq import Seq2Seq


def test_low_rank_is_exact_on_rank_r_matrices():
    w = torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, 30, dtype=torch.float64)
    assert torch.allclose(low_rank(w, 5), w, atol=1e-10)
    assert torch.allclose(low_rank(w, 12), w, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_low_rank_error_is_eckart_young(rank):
    w = torch.randn(30, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(w - low_rank(w, rank))
    assert err.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-9)
    a, b = low_rank_factors(w, rank)
    assert a.shape == (30, rank) and b.shape == (20, rank)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_uses_at_most_2_pow_bits_minus_1_levels_per_row(bits):
    w = torch.randn(16, 200)
    q = quantize(w, bits)
    max_levels = 2 if bits == 1 else 2 ** bits - 1
    for row in q:
        assert row.unique().numel() <= max_levels
    scale = w.abs().amax(1) if bits > 1 else w.abs().mean(1)
    assert torch.allclose(q.abs().amax(1), scale, rtol=1e-6)        # the extreme level is the row's max


def test_quantize_binary_is_sign_times_mean_abs():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.0]])
    assert torch.equal(quantize(w, 1), torch.tensor([[1.5, -1.5, 1.5, 1.5]]))


def test_quantize_error_shrinks_with_bits_and_keeps_zero_rows():
    w = torch.randn(8, 64)
    w[3] = 0
    errors = [(quantize(w, b) - w).norm().item() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert torch.equal(quantize(w, 4)[3], torch.zeros(64))


def test_papers_round_clip_values():
    w = torch.linspace(-2, 2, 401)
    out = round_to_step(w, 0.2, clip=0.4)
    assert set(torch.round(out * 10).int().tolist()) == {-4, -2, 0, 2, 4}
    rounded = round_to_step(w, 0.2)
    assert torch.allclose(rounded, torch.round(w / 0.2) * 0.2)
    assert rounded.abs().max().item() == pytest.approx(2.0)


def test_block_bits_match_the_design_table():
    w = torch.randn(12, 10)
    m, n = w.shape
    assert compress_block(w, CompressConfig(rank=3))[1] == 3 * (m + n) * 32
    assert compress_block(w, CompressConfig(bits=4))[1] == m * n * 4 + 32 * m
    assert compress_block(w, CompressConfig(rank=3, bits=4))[1] == 3 * (m + n) * 4 + 32 * (m + n)
    out, bits = compress_block(w, CompressConfig(paper="round_clip", step=0.2, clip=0.4))
    assert bits == m * n * math.ceil(math.log2(out.unique().numel()))


def hand_model():
    """Embedding 10×4, a 1-layer G2LSTM 4→3 and a 3→10 head: sizes to account by hand."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), G2LSTM(4, 3), nn.Linear(3, 10))


def test_accounting_matches_hand_computed_figures():
    model = hand_model()
    total = 40 + (12 * 4 + 12 * 3 + 12 + 12) + (30 + 10)          # 188 parameters
    assert sum(p.numel() for p in model.parameters()) == total
    _, report = compress_model(model, CompressConfig(rank=1))
    # four i/f blocks: two 3×4 (weight_ih) and two 3×3 (weight_hh), 42 parameters
    gate_params = 2 * 12 + 2 * 9
    gate_bits = 2 * 1 * (3 + 4) * 32 + 2 * 1 * (3 + 3) * 32      # 832
    assert (report.gate_params, report.gate_bits) == (gate_params, gate_bits)
    assert report.model_params == total
    assert report.model_bits == gate_bits + 32 * (total - gate_params)
    assert report.gate_compression == pytest.approx(32 * 42 / 832)
    assert report.model_compression == pytest.approx(32 * total / report.model_bits)
    assert account(gate_params, gate_bits, total) == replace(report, relative_error=0.0, fraction_zeroed=0.0)


def test_targets_restrict_the_compressed_matrices():
    model = hand_model()
    _, recurrent = compress_model(model, CompressConfig(bits=2, targets="recurrent"))
    assert recurrent.gate_bits == 2 * 12 * 32 + 2 * (9 * 2 + 32 * 3)    # weight_ih blocks stay float


def test_only_the_if_rows_change_and_the_original_is_untouched():
    model = nn.Sequential(G2LSTM(6, 8, 2), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed, report = compress_model(model, CompressConfig(bits=2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.relative_error > 0
    i_rows, f_rows = gate_rows(8)
    for name, new in compressed.state_dict().items():
        old = before[name]
        if name.startswith("0.weight_"):
            assert not torch.equal(new[i_rows], old[i_rows]) and not torch.equal(new[f_rows], old[f_rows])
            assert torch.equal(new[16:], old[16:])                       # g and o rows
        else:
            assert torch.equal(new, old)                                # biases, head


def test_identity_setting_changes_nothing():
    model = hand_model()
    compressed, report = compress_model(model, CompressConfig())
    assert report.gate_compression == 1.0 and report.model_compression == 1.0 and report.relative_error == 0.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), compressed.parameters()))


def test_works_on_bidirectional_nn_lstm():
    model = nn.LSTM(4, 5, bidirectional=True)
    compressed, report = compress_model(model, CompressConfig(rank=2))
    assert report.gate_params == 2 * 2 * (5 * 4 + 5 * 5)
    assert not torch.equal(compressed.weight_hh_l0_reverse[:10], model.weight_hh_l0_reverse[:10])


def test_model_without_lstm_is_refused():
    with pytest.raises(ValueError, match="no LSTM layer"):
        compress_model(nn.Linear(3, 3), CompressConfig(rank=1))


def test_compressed_g2lstm_still_runs_and_degrades_gracefully():
    torch.manual_seed(0)
    model = G2LSTM(16, 32, 2).eval()
    x = torch.randn(10, 4, 16)
    y = model(x)[0]
    errs = []
    for rank in (4, 16, 32):
        compressed, _ = compress_model(model, CompressConfig(rank=rank))
        errs.append((compressed(x)[0] - y).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def small_seq2seq() -> Seq2Seq:
    """A real attentional encoder-decoder: embeddings 16, hidden 24, 2 + 2 layers (the first bidirectional)."""
    torch.manual_seed(0)
    cfg = NMTConfig(embed_dim=16, hidden_size=24, encoder_layers=2, decoder_layers=2)
    return Seq2Seq(cfg, G2Config(), 30, PAD_ID, BOS_ID, EOS_ID)


@pytest.mark.parametrize("preset", ["default", "paper", "tiny"])
def test_nmt_default_compresses_what_the_authors_did(preset):
    """Recurrent i/f rows and the decoder's context-to-gate columns change; embedding columns, every other input
    matrix, g/o rows and everything else stay bit-identical (the authors' `U` and `Wc`, never `W`)."""
    setting = replace(TrialConfig.preset("nmt", preset).compress, bits=2)
    assert setting.targets == "recurrent+context"
    model = small_seq2seq()
    e, h = 16, 24
    compressed, report = compress_model(model, setting)
    old, new = model.state_dict(), compressed.state_dict()
    i_rows, f_rows = gate_rows(h)
    hh = [k for k in old if ".weight_hh_l" in k]
    assert len(hh) == 5                                         # encoder fwd, bwd, upper; decoder l0, l1
    for name in hh:
        for rows in (i_rows, f_rows):
            assert not torch.equal(new[name][rows], old[name][rows]), name
        assert torch.equal(new[name][2 * h:], old[name][2 * h:])
    ctx = "decoder.rnn.weight_ih_l0"
    assert old[ctx].shape == (4 * h, e + h)                     # [embedding; h̃_{t-1}] columns
    for rows in (i_rows, f_rows):
        assert not torch.equal(new[ctx][rows, e:], old[ctx][rows, e:])
    assert torch.equal(new[ctx][:, :e], old[ctx][:, :e])        # embedding columns, all gates
    assert torch.equal(new[ctx][2 * h:], old[ctx][2 * h:])
    for name in old:
        if name not in hh and name != ctx:
            assert torch.equal(new[name], old[name]), name      # other W_ih, biases, embeddings, attention, head

    # Accounting: every i/f block is a gate parameter; the parts left alone are float32.
    in_sizes = {"encoder.forward_rnn": [e], "encoder.backward_rnn": [e], "encoder.upper": [2 * h],
                "decoder.rnn": [e + h, h]}
    gate_params = sum(2 * h * (n + h) for sizes in in_sizes.values() for n in sizes)
    quantised = 2 * (5 * (h * h * 2 + 32 * h) + (h * h * 2 + 32 * h))     # i and f: 5 W_hh and the context part
    assert report.gate_params == gate_params
    assert report.gate_bits == quantised + 32 * (gate_params - 2 * 6 * h * h)


def test_nmt_targets_both_and_input_still_compress_the_embedding_columns():
    model = small_seq2seq()
    ctx = "decoder.rnn.weight_ih_l0"
    i_rows, _ = gate_rows(24)
    for targets in ("both", "input"):
        compressed, _ = compress_model(model, CompressConfig(bits=2, targets=targets))
        assert not torch.equal(compressed.state_dict()[ctx][i_rows, :16], model.state_dict()[ctx][i_rows, :16])
    recurrent, _ = compress_model(model, CompressConfig(bits=2, targets="recurrent"))
    assert torch.equal(recurrent.state_dict()[ctx], model.state_dict()[ctx])


def test_recurrent_and_context_is_refused_without_context_inputs():
    with pytest.raises(ValueError, match=r"compress.targets='recurrent\+context' needs a model with context inputs"):
        compress_model(hand_model(), CompressConfig(bits=2, targets="recurrent+context"))
    with pytest.raises(ValueError, match=r"compress.targets='recurrent\+context' is for translation"):
        TrialConfig.from_flat({"task": "lm", "compress.targets": "recurrent+context"})
    with pytest.raises(ValueError, match=r"compress.targets must be one of 'both', 'recurrent', 'input', "
                                         r"'recurrent\+context', got 'context'"):
        CompressConfig(targets="context")


def test_relative_step_is_a_multiple_of_the_blocks_rms_and_scales_with_it():
    torch.manual_seed(0)
    w = torch.randn(16, 24) * 0.02
    rms = float(np.sqrt(np.mean(w.double().numpy() ** 2)))
    cfg = CompressConfig(paper="round_clip_rel", rel_step=0.5, rel_clip=2.0)
    step, clip = rounding(w, cfg)
    assert step == pytest.approx(0.5 * rms, rel=1e-12) and clip == pytest.approx(2.0 * rms, rel=1e-12)
    assert rounding(w, CompressConfig(paper="round_rel"))[1] is None                  # no clip without _clip
    assert rounding(w, CompressConfig(paper="round", step=0.2)) == (0.2, None)        # the paper's: absolute
    small, bits = compress_block(w, cfg)
    big, big_bits = compress_block(w * 64, cfg)          # ×64: a power of two, so every quotient is the same
    assert torch.equal(big, small * 64) and big_bits == bits
    assert small.unique().numel() == 9 and bits == 16 * 24 * 4    # levels −4..4 steps: 4 bits a weight
    # the paper's absolute step does not scale: at 0.2 these small weights all round to 0, at ×64 few do
    assert compress_block(w, CompressConfig(paper="round"))[0].count_nonzero() == 0
    assert compress_block(w * 64, CompressConfig(paper="round"))[0].count_nonzero() > 0.8 * w.numel()


def test_relative_clip_below_the_blocks_max_changes_the_largest_weights():
    torch.manual_seed(1)
    w = torch.randn(32, 32)
    rms = float(w.double().pow(2).mean().sqrt())
    assert 1.5 * rms < float(w.abs().max())
    clipped, _ = compress_block(w, CompressConfig(paper="round_clip_rel", rel_step=0.25, rel_clip=1.5))
    rounded, _ = compress_block(w, CompressConfig(paper="round_rel", rel_step=0.25))
    step, top = 0.25 * rms, round(1.5 / 0.25) * 0.25 * rms                # the largest level: 6 steps
    large = w.abs() > 1.5 * rms + step / 2
    assert large.sum() > 0
    torch.testing.assert_close(clipped[large], torch.sign(w[large]) * top)   # every large weight sits at ±clip
    assert (rounded[large].abs() > top + step / 2).all()                       # unclipped, they would not
    assert float((rounded - w).abs().max()) <= step / 2 * (1 + 1e-6)           # round_rel: half a step at most
    assert torch.equal(clipped[~large], rounded[~large])
    # the paper's absolute clip (0.4) binds on these N(0, 1) weights but not on weights 100× smaller; the relative
    # one binds on both
    absolute = {m: [compress_block(x, CompressConfig(paper=m))[0] for x in (w, w / 100)] for m in ("round", "round_clip")}
    assert not torch.equal(absolute["round"][0], absolute["round_clip"][0])
    assert torch.equal(absolute["round"][1], absolute["round_clip"][1])
    cfg = CompressConfig(paper="round_clip_rel", rel_step=0.25, rel_clip=1.5)
    torch.testing.assert_close(compress_block(w / 100, cfg)[0], clipped / 100)


def small_trained_lm() -> RNNLM:
    """The `tiny` preset's G2-LSTM language model (2 layers, 24/32 wide), 15 Adam steps on a repeating sequence."""
    torch.manual_seed(0)
    cfg = TrialConfig.preset("lm", "tiny")
    model = RNNLM(cfg.lm, cfg.g2, vocab_size=20)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.arange(20)[:, None].repeat(1, 4)                           # (20, 4)
    for _ in range(15):
        out = model(tokens[:-1], model.init_state(4))
        loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def numpy_weight_effects(before: nn.Module, after: nn.Module, matrices: tuple[str, ...] = ("ih", "hh")):
    """fraction_zeroed and relative_error recomputed from the two models' parameters with numpy alone: the i/f rows
    (0:2H of the [i, f, g, o] layout) of every `weight_{ih|hh}_l{k}`, each block once."""
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    zeroed = nonzero = 0
    err_sq = norm_sq = 0.0
    for name, p in old.items():
        m = re.search(r"weight_(ih|hh)_l\d+(_reverse)?$", name)
        if not m or m[1] not in matrices:
            continue
        hidden = p.shape[0] // 4
        w, w_hat = (t.detach().numpy()[: 2 * hidden].astype(np.float64) for t in (p, new[name]))
        zeroed += int(np.sum((w_hat == 0) & (w != 0)))
        nonzero += int(np.sum(w != 0))
        err_sq += float(np.sum((w_hat - w) ** 2))
        norm_sq += float(np.sum(w ** 2))
    return zeroed / nonzero, math.sqrt(err_sq / norm_sq)


@pytest.mark.parametrize("cfg", [
    CompressConfig(paper="round", step=0.2), CompressConfig(paper="round_clip", step=0.2, clip=0.4),
    CompressConfig(paper="round_rel"), CompressConfig(paper="round_clip_rel", rel_step=1.0, rel_clip=1.5),
    CompressConfig(bits=2), CompressConfig(rank=4), CompressConfig(paper="round", step=0.2, targets="recurrent")],
    ids=lambda c: f"{c.method}-{c.targets}")
def test_fraction_zeroed_and_relative_error_agree_with_numpy_on_a_trained_lm(trained_lm, cfg):
    compressed, report = compress_model(trained_lm, cfg)
    zeroed, error = numpy_weight_effects(trained_lm, compressed, ("hh",) if cfg.targets == "recurrent" else
                                         ("ih", "hh"))
    assert report.fraction_zeroed == pytest.approx(zeroed, abs=1e-12)
    assert report.relative_error == pytest.approx(error, rel=1e-9)
    if cfg.paper in ("round", "round_clip"):
        # the paper's rounding in numpy: the blocks the copy holds, so the numbers above measure the right thing
        for name, p in trained_lm.named_parameters():
            if re.search(r"weight_hh_l\d+$", name):
                h = p.shape[0] // 4
                w = p.detach().numpy()[: 2 * h]
                w = np.clip(w, -cfg.clip, cfg.clip) if cfg.paper == "round_clip" else w
                np.testing.assert_allclose(dict(compressed.named_parameters())[name].detach().numpy()[: 2 * h],
                                           np.round(w / cfg.step) * cfg.step, atol=1e-6)
    if cfg.method in ("round", "round_rel", "round_clip_rel"):
        assert 0.05 < report.fraction_zeroed < 0.95     # rounding prunes some weights, not none or all
    if cfg.method == "svd":
        assert report.fraction_zeroed == 0.0            # a low-rank product has no exact zeros to speak of


@pytest.fixture(scope="module")
def trained_lm() -> RNNLM:
    return small_trained_lm()


def test_fraction_zeroed_counts_each_block_on_a_seq2seq_with_a_bidirectional_encoder():
    model = small_seq2seq()
    compressed, report = compress_model(model, CompressConfig(paper="round", step=0.5 / 8))
    zeroed, error = numpy_weight_effects(model, compressed)
    assert report.fraction_zeroed == pytest.approx(zeroed, abs=1e-12) and 0 < zeroed < 1
    assert report.relative_error == pytest.approx(error, rel=1e-9)
    assert compress_model(model, CompressConfig())[1].fraction_zeroed == 0.0
