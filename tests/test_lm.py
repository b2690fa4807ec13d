import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import G2Config, LMConfig, TrialConfig
from trainables.g2lstm import G2LSTM
from trainables.lm import RNNLM, LMTask, cache_pointer_logprobs, variable_bptt
from trainables.regularize import (
    NonMonotoneTrigger,
    activation_regularization,
    embedding_dropout,
    locked_dropout,
    temporal_activation_regularization,
)


def tiny_cfg(**overrides) -> TrialConfig:
    return TrialConfig.from_flat(overrides, base=TrialConfig.preset("lm", "tiny"))


def test_rnnlm_shapes_tied_weights_and_layers():
    cfg = LMConfig(embed_dim=8, hidden_size=12, num_layers=3)
    model = RNNLM(cfg, G2Config(), vocab_size=50)
    assert model.decoder.weight is model.embedding.weight
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(8, 12), (12, 12), (12, 8)]
    assert all(isinstance(m, G2LSTM) and m.weight_drop == cfg.weight_drop for m in model.layers)
    tokens = torch.randint(50, (7, 4))
    out = model(tokens, model.init_state(4))
    assert out.logits.shape == (7, 4, 50) and out.raw_output.shape == out.dropped_output.shape == (7, 4, 8)
    assert [h.shape for h, _ in out.state] == [(1, 4, 12), (1, 4, 12), (1, 4, 8)]
    assert not hasattr(out, "gates")                             # gates come from forward_with_gates only
    with_gates, gates = model.eval().forward_with_gates(tokens, model.init_state(4))
    assert torch.allclose(with_gates.logits, model(tokens, model.init_state(4)).logits, atol=1e-5)
    assert [g.shape for g in gates] == [(7, 4, 24), (7, 4, 24), (7, 4, 16)]      # per layer (T, B, 2H), [i, f]


def test_locked_dropout_shares_one_mask_over_time():
    x = torch.ones(20, 3, 10)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:1].expand_as(y))                    # the same mask at every step
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)


def test_embedding_dropout_drops_whole_words():
    emb = nn.Embedding(10, 4)
    words = torch.tensor([[1, 2, 1, 2, 1]]).t().expand(5, 6).contiguous()   # (T, B): word 1 and 2 repeated
    out = embedding_dropout(emb, words, 0.5, training=True)
    zero_rows = (out.abs().sum(-1) == 0)                          # (T, B)
    for w in (1, 2):                                              # every occurrence of a word shares its fate
        assert zero_rows[words == w].all() or not zero_rows[words == w].any()
    assert torch.equal(embedding_dropout(emb, words, 0.5, training=False), emb(words))


def test_ar_and_tar():
    h = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])                # (T=2, B=1, 2)
    assert activation_regularization(h, 2.0).item() == pytest.approx(2 * (1 + 4 + 9 + 25) / 4)
    assert temporal_activation_regularization(h, 1.0).item() == pytest.approx((4 + 9) / 2)


def test_non_monotone_trigger_fires_once():
    trigger = NonMonotoneTrigger(nonmono=2)
    fired = [trigger.update(v) for v in [5.0, 4.0, 3.0, 3.5, 3.6, 2.0, 9.0]]
    # at 3.6 the history is [5, 4, 3, 3.5]; all but the last 2 are [5, 4] -> 3.6 < 4, no switch;
    # at 9.0 the history is [5, 4, 3, 3.5, 3.6, 2]; min of [5, 4, 3, 3.5] is 3 -> switch
    assert fired == [False] * 6 + [True]
    assert trigger.update(10.0) is False                           # only once
    clone = NonMonotoneTrigger()
    clone.load_state_dict(trigger.state_dict())
    assert clone == trigger


def test_variable_bptt_is_seeded_and_around_bptt():
    lengths = [variable_bptt(random.Random(3), 70) for _ in range(3)]
    assert len(set(lengths)) == 1
    rng = random.Random(0)
    many = [variable_bptt(rng, 70) for _ in range(2000)]
    assert min(many) >= 5 and 60 < sum(many) / len(many) < 70    # half-length windows pull the mean down


def test_cache_pointer_with_zero_lambda_is_the_model():
    logits, hidden = torch.randn(6, 2, 11), torch.randn(6, 2, 5)
    targets = torch.randint(11, (6, 2))
    logp, memory = cache_pointer_logprobs(logits, hidden, targets, None, window=4, theta=1.0, lam=0.0)
    expected = F.log_softmax(logits, -1).gather(2, targets[..., None]).squeeze(-1)
    assert torch.allclose(logp, expected, atol=1e-6)
    assert memory[0].shape == (4, 2, 5) and torch.equal(memory[1], targets[-4:])


def test_cache_pointer_helps_on_repeated_words():
    """A word that keeps coming back, with a hidden state that says so, gets a higher probability."""
    steps, vocab = 12, 20
    targets = torch.full((steps, 1), 7)
    hidden = torch.ones(steps, 1, 4)
    logits = torch.zeros(steps, 1, vocab)
    plain = F.log_softmax(logits, -1)[..., 7]
    logp, _ = cache_pointer_logprobs(logits, hidden, targets, None, window=4, theta=1.0, lam=0.5)
    assert torch.allclose(logp[:4], plain[:4])                    # the cache is not full yet
    assert (logp[4:] > plain[4:]).all()


def test_cache_pointer_mixes_once_its_window_is_full():
    """awd-lstm-lm's pointer.py: the model alone for the first `window` positions of the stream (the memory carried
    across evaluation batches), then (1 - λ) p_model + λ p_cache over the previous `window` positions."""
    torch.manual_seed(3)
    steps, batch, vocab, dim, window, theta, lam = 9, 2, 6, 4, 5, 0.7, 0.3
    logits = torch.randn(steps, batch, vocab, dtype=torch.float64)
    hidden = torch.randn(steps, batch, dim, dtype=torch.float64)
    targets = torch.randint(vocab, (steps, batch))
    targets[2, 1] = targets[6, 1]             # a word that recurs inside the window of position 6
    model = F.log_softmax(logits, -1).gather(2, targets[..., None]).squeeze(-1)     # (T, B)
    first, memory = cache_pointer_logprobs(logits[:3], hidden[:3], targets[:3], None, window, theta, lam)
    second, _ = cache_pointer_logprobs(logits[3:], hidden[3:], targets[3:], memory, window, theta, lam)
    logp = torch.cat([first, second])         # two evaluation batches of one stream
    torch.testing.assert_close(logp[:window], model[:window], rtol=0, atol=1e-12)
    assert (logp[window:] != model[window:]).all()

    # Position 6, stream 1 by hand: attention over positions 1..5, the target's share of it is the cache's vote.
    t, b = 6, 1
    scores = [theta * float(hidden[t, b] @ hidden[j, b]) for j in range(t - window, t)]
    weights = [math.exp(s) for s in scores]
    cache = sum(w for w, j in zip(weights, range(t - window, t)) if targets[j, b] == targets[t, b]) / sum(weights)
    assert cache > 0
    expected = math.log((1 - lam) * math.exp(float(model[t, b])) + lam * cache)
    assert float(logp[t, b]) == pytest.approx(expected, rel=1e-12)


def test_lm_task_learns_the_toy_grammar(tmp_path):
    torch.manual_seed(0)
    task = LMTask(tiny_cfg(**{"data.cache_dir": str(tmp_path)}), torch.device("cpu"), tmp_path)
    uniform = math.log(task.vocab_size)
    before = task.evaluate(task.model, "valid")["loss"]
    for epoch in range(1, 4):
        task.train_epoch(epoch)
    after = task.evaluate(task.evaluation_model(), "valid")
    assert before > 0.95 * uniform
    assert after["loss"] < 0.65 * uniform
    assert after["ppl"] == pytest.approx(math.exp(after["loss"]))


def test_evaluation_is_deterministic(tmp_path):
    task = LMTask(tiny_cfg(), torch.device("cpu"), tmp_path)
    task.train_epoch(1)
    assert task.evaluate(task.model, "valid") == task.evaluate(task.model, "valid")


def test_nt_asgd_switch_and_averaged_evaluation_model(tmp_path):
    task = LMTask(tiny_cfg(**{"train.nonmono": 1, "train.max_batches": 3}), torch.device("cpu"), tmp_path)
    assert task.evaluation_model() is task.model
    for v in (3.0, 2.0, 3.5):       # 3.5 is worse than the best before the last check
        task.end_epoch(v)
    assert isinstance(task.optimizer, torch.optim.ASGD)
    task.train_epoch(1)
    averaged = task.evaluation_model()
    assert averaged is not task.model
    ax = task.optimizer.state[task.model.embedding.weight]["ax"]
    assert torch.equal(averaged.embedding.weight, ax)
    assert not torch.equal(averaged.embedding.weight, task.model.embedding.weight)


def test_nan_loss_raises_floating_point_error(tmp_path):
    task = LMTask(tiny_cfg(), torch.device("cpu"), tmp_path)
    with torch.no_grad():
        task.model.embedding.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1"):
        task.train_epoch(1)
