import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from trainables.config import G2Config
from trainables.g2lstm import G2LSTM, GateStatistics
from trainables.gates import NOISE_EPS, logistic_noise

T, B, IN, H, LAYERS = 7, 3, 5, 6, 2
IMPLS = ["auto", "reference"]


def twins(g2: G2Config, impl: str, **kw):
    """A G2LSTM and an nn.LSTM sharing one state dict."""
    g2lstm = G2LSTM(IN, H, LAYERS, g2=g2, impl=impl, **kw)
    lstm = nn.LSTM(IN, H, LAYERS)
    lstm.load_state_dict(g2lstm.state_dict())
    return g2lstm, lstm


def inputs():
    x = torch.randn(T, B, IN)
    state = (torch.randn(LAYERS, B, H), torch.randn(LAYERS, B, H))
    return x, state


def assert_same_run(g2lstm, lstm, x, state, atol=1e-5):
    y, (h, c) = g2lstm(x, state)
    y_ref, (h_ref, c_ref) = lstm(x, state)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        assert (a - b).abs().max().item() <= atol


def test_state_dict_loads_both_ways():
    g2lstm = G2LSTM(IN, H, LAYERS)
    lstm = nn.LSTM(IN, H, LAYERS)
    assert {k: v.shape for k, v in g2lstm.state_dict().items()} == {k: v.shape for k, v in lstm.state_dict().items()}
    g2lstm.load_state_dict(lstm.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(g2lstm.parameters(), lstm.parameters()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_g2_without_noise_and_temperature_is_lstm(impl, training):
    g2lstm, lstm = twins(G2Config(gate_mode="g2", p=0.0, tau=1.0), impl)
    g2lstm.train(training), lstm.train(training)
    assert_same_run(g2lstm, lstm, *inputs())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g2", [G2Config(gate_mode="lstm"), G2Config(gate_mode="g2", tau=0.5, p=0.7),
                                G2Config(gate_mode="g2", tau=2.0, p=1.0)])
def test_soft_evaluation_is_lstm(impl, g2):
    g2lstm, lstm = twins(g2, impl)
    g2lstm.eval(), lstm.eval()
    assert_same_run(g2lstm, lstm, *inputs())


def scaled_lstm(g2lstm: G2LSTM, scale: float) -> nn.LSTM:
    """nn.LSTM whose i/f rows of W and b are multiplied by `scale` (docs/design.md §2 identity)."""
    lstm = nn.LSTM(IN, H, LAYERS)
    state = {k: v.clone() for k, v in g2lstm.state_dict().items()}
    for v in state.values():
        v[:2 * H] *= scale
    lstm.load_state_dict(state)
    return lstm


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False])
def test_sharpened_is_lstm_with_scaled_gate_rows(impl, training):
    g2lstm = G2LSTM(IN, H, LAYERS, g2=G2Config(gate_mode="sharpened", sharpen_tau=0.2), impl=impl)
    g2lstm.train(training)
    assert_same_run(g2lstm, scaled_lstm(g2lstm, 1 / 0.2), *inputs(), atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_tempered_evaluation_is_lstm_with_scaled_gate_rows(impl):
    g2lstm = G2LSTM(IN, H, LAYERS, g2=G2Config(tau=0.5, eval_gate="tempered"), impl=impl).eval()
    assert_same_run(g2lstm, scaled_lstm(g2lstm, 2.0), *inputs())


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_evaluation_gates_are_binary(impl):
    g2lstm = G2LSTM(IN, H, LAYERS, g2=G2Config(eval_gate="hard"), impl=impl).eval()
    x, state = inputs()
    y, _, gates = g2lstm.forward_with_gates(x, state)
    for g in gates:
        assert g.shape == (T, B, 2 * H)
        assert set(g.unique().tolist()) <= {0.0, 1.0}
    # hard gates change the output relative to soft ones
    soft = G2LSTM(IN, H, LAYERS, g2=G2Config(eval_gate="soft")).eval()
    soft.load_state_dict(g2lstm.state_dict())
    assert not torch.allclose(soft(x, state)[0], y)


def test_auto_and_reference_agree_on_gradients_when_plain():
    """The cuDNN/native dispatch (with folded temperature) matches the reference recurrence, gradients too."""
    torch.manual_seed(1)
    models = [G2LSTM(IN, H, LAYERS, g2=G2Config(gate_mode="sharpened"), impl=impl) for impl in IMPLS]
    models[1].load_state_dict(models[0].state_dict())
    x, state = inputs()
    grads = []
    for m in models:
        y, (h, c) = m(x, state)
        (y.square().sum() + h.sum() + c.sum()).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_weight_drop_one_mask_per_forward_same_in_both_paths():
    """Weight-drop draws its mask first, so the seeded fast and reference paths see the same mask."""
    models = [G2LSTM(IN, H, LAYERS, g2=G2Config(gate_mode="lstm"), weight_drop=0.5, impl=impl) for impl in IMPLS]
    models[1].load_state_dict(models[0].state_dict())
    outs = []
    for m in models:
        torch.manual_seed(4)
        outs.append(m(torch.ones(T, B, IN))[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_weight_drop_only_in_training():
    g2lstm, lstm = twins(G2Config(gate_mode="lstm"), "auto", weight_drop=0.5)
    x, state = inputs()
    g2lstm.train()
    assert not torch.allclose(g2lstm(x, state)[0], lstm(x, state)[0])
    first, second = g2lstm(x, state)[0], g2lstm(x, state)[0]
    assert not torch.allclose(first, second)      # a fresh mask every forward
    g2lstm.eval()
    assert_same_run(g2lstm, lstm, x, state)


def truncated_logistic_moments():
    """Mean and variance of log(U+ε) − log(1+ε−U) by numerical integration over U."""
    u = (torch.arange(2_000_000, dtype=torch.float64) + 0.5) / 2_000_000
    values = torch.log(u + NOISE_EPS) - torch.log1p(NOISE_EPS - u)
    return values.mean().item(), values.var().item()


def layer_noise(p: float, tau: float, steps: int = 50, batch: int = 40, hidden: int = 25):
    """Noise as the layer applies it: with zero weights the i/f pre-activation is 0, so the noise is
    τ·logit(gate)."""
    m = G2LSTM(4, hidden, g2=G2Config(gate_mode="g2", p=p, tau=tau), impl="reference")
    nn.init.zeros_(m.weight_ih_l0), nn.init.zeros_(m.weight_hh_l0)
    nn.init.zeros_(m.bias_ih_l0), nn.init.zeros_(m.bias_hh_l0)
    m.train()
    _, _, (gates,) = m.forward_with_gates(torch.randn(steps, batch, 4))
    return tau * torch.logit(gates.double())     # (steps, batch, 2H)


def test_noise_fraction_and_logistic_law():
    torch.manual_seed(0)
    noise = layer_noise(p=0.3, tau=0.7)
    noised = noise != 0
    assert abs(noised.double().mean().item() - 0.3) < 0.01
    values = noise[noised].float()
    mean, var = truncated_logistic_moments()
    assert abs(mean) < 1e-9 and 3.0 < var < math.pi ** 2 / 3
    assert abs(values.mean().item()) < 0.05
    assert abs(values.var().item() - var) < 0.06 * var
    # the whole law: Kolmogorov–Smirnov distance to the CDF of the ε-truncated logistic
    xs = values.double().sort().values
    ex = xs.exp()
    cdf = ((1 + NOISE_EPS) * ex - NOISE_EPS) / (1 + ex)
    empirical = torch.arange(1, xs.numel() + 1, dtype=torch.float64) / xs.numel()
    assert (cdf - empirical).abs().max().item() < 0.02


def test_noise_is_fresh_every_step_and_call_and_seeded():
    torch.manual_seed(5)
    first = layer_noise(p=1.0, tau=1.0)
    second = layer_noise(p=1.0, tau=1.0)
    assert not torch.allclose(first, second)                      # fresh at every call
    assert all(not torch.allclose(first[t], first[t + 1]) for t in range(first.shape[0] - 1))   # every step
    torch.manual_seed(5)
    assert torch.equal(layer_noise(p=1.0, tau=1.0), first)        # reproducible under a seed


def test_logistic_noise_p_zero_and_one():
    assert torch.count_nonzero(logistic_noise((100, 10), 0.0)) == 0
    assert torch.count_nonzero(logistic_noise((100, 10), 1.0)) == 1000


def test_gradcheck_reference_path_float64():
    m = G2LSTM(3, 4, 2, g2=G2Config(gate_mode="g2", tau=0.7, p=0.5), weight_drop=0.3, dropout=0.2,
               impl="reference").double().train()
    params = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    names = list(params)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)

    def run(x, h0, c0, *weights):
        torch.manual_seed(11)          # the same noise and masks at every evaluation
        y, (h, c) = functional_call(m, dict(zip(names, weights)), (x, (h0, c0)))
        return y, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params.values()), eps=1e-6, atol=1e-5)


def test_return_gates_matches_between_paths_in_eval():
    models = [G2LSTM(IN, H, LAYERS, impl=impl).eval() for impl in IMPLS]
    models[1].load_state_dict(models[0].state_dict())
    x, state = inputs()
    gates = [m.forward_with_gates(x, state)[2] for m in models]
    for a, b in zip(*gates):
        assert torch.allclose(a, b, atol=1e-5)


def test_gate_statistics():
    stats = GateStatistics(num_layers=1)
    i = torch.tensor([0.05, 0.05, 0.5, 0.95])
    f = torch.tensor([0.95, 0.99, 0.92, 0.15])
    stats.update([torch.stack([i, f], dim=-1).view(4, 1, 2)])
    s = stats.summary()
    assert s == pytest.approx({"gate_l0_i_lt01": 0.5, "gate_l0_i_gt09": 0.25,
                               "gate_l0_f_lt01": 0.0, "gate_l0_f_gt09": 0.75})
    hist = stats.histograms()
    assert hist["l0_i"] == pytest.approx([0.5, 0, 0, 0, 0, 0.25, 0, 0, 0, 0.25])
    assert sum(hist["l0_f"]) == pytest.approx(1.0)


def test_gate_statistics_respects_mask():
    stats = GateStatistics(num_layers=1)
    gates = torch.full((3, 2, 4), 0.95)
    gates[2] = 0.05                                    # padding positions
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    stats.update([gates], mask=mask)
    assert stats.summary()["gate_l0_i_gt09"] == 1.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=0), "hidden_size"), (dict(num_layers=0), "num_layers"), (dict(dropout=1.0), "dropout"),
    (dict(weight_drop=-0.1), "weight_drop"), (dict(impl="cuda"), "impl")])
def test_constructor_refuses_bad_arguments(kwargs, field):
    args = dict(input_size=3, hidden_size=4) | kwargs
    with pytest.raises(ValueError, match=field):
        G2LSTM(**args)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects input \(T, B, 5\)"):
        G2LSTM(5, 4)(torch.randn(3, 2, 6))


@pytest.mark.slow
@pytest.mark.parametrize("gate_mode", ["lstm", "g2"])
def test_two_layer_g2lstm_learns_a_delayed_copy(gate_mode):
    """Output the input symbol seen 3 steps ago: needs memory, so only a working recurrence learns it."""
    torch.manual_seed(0)
    vocab, delay = 6, 3
    embed, rnn, head = nn.Embedding(vocab, 16), G2LSTM(16, 32, 2, g2=G2Config(gate_mode=gate_mode)), nn.Linear(32, vocab)
    params = [*embed.parameters(), *rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(300):
        seq = torch.randint(vocab, (20, 16))
        target = torch.roll(seq, delay, dims=0)[delay:]
        logits = head(rnn(embed(seq))[0])[delay:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[:10]) / 10 > 1.6                     # ≈ log 6 at the start
    assert sum(losses[-10:]) / 10 < 0.3


def recorded_fused_lstm_calls(monkeypatch) -> list[bool]:
    """The `train` flag of every call to PyTorch's fused LSTM (cuDNN on GPU), which still runs for real."""
    calls, fused = [], torch._VF.lstm

    def record(*args):
        calls.append(args[6])   # input, hx, params, has_biases, num_layers, dropout, train, ...
        return fused(*args)
    monkeypatch.setattr(torch._VF, "lstm", record)
    return calls


@pytest.mark.parametrize("gate_mode", ["lstm", "sharpened"])
def test_plain_path_calls_cudnn_in_training_mode_when_autograd_records(monkeypatch, gate_mode):
    """cuDNN refuses the backward of an RNN called with train=False: every recorded call must say train=True."""
    calls = recorded_fused_lstm_calls(monkeypatch)
    layer = G2LSTM(IN, H, LAYERS, g2=G2Config(gate_mode=gate_mode))
    x, state = inputs()
    layer.train()
    layer(x, state)[0].sum().backward()
    layer.eval()
    layer(x, state)[0].sum().backward()          # evaluation maths, still differentiated (e.g. a saliency probe)
    with torch.no_grad():
        layer(x, state)
    assert calls == [True] * LAYERS + [True] * LAYERS + [False] * LAYERS


def expected_path(gate_mode: str, impl: str, training: bool, device: str) -> str:
    """The dispatch table of `G2LSTM.impl`, written out independently of `GateMath`."""
    noisy = gate_mode == "g2" and training        # the default G2Config has p = 0.2
    if impl == "reference":
        return "reference"
    if impl == "fused":
        return "fused"
    if not noisy:
        return "plain"
    return "fused" if device == "cuda" else "cpu"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("impl", ["auto", "reference", "fused"])
@pytest.mark.parametrize("gate_mode", ["lstm", "sharpened", "g2"])
def test_path_for_every_mode_impl_phase_and_device(monkeypatch, gate_mode, impl, training, device):
    from trainables import g2lstm_kernels

    monkeypatch.setattr(g2lstm_kernels, "fused_available", lambda d: d.type == "cuda")   # a GPU with triton
    layer = G2LSTM(IN, H, g2=G2Config(gate_mode=gate_mode), impl=impl)
    assert layer.path(training, torch.device(device)) == expected_path(gate_mode, impl, training, device)


@pytest.mark.parametrize("impl", IMPLS + ["fused"])
def test_hard_evaluation_gates_always_take_the_reference_path(impl):
    layer = G2LSTM(IN, H, g2=G2Config(gate_mode="g2", eval_gate="hard"), impl=impl)
    assert layer.path(False, torch.device("cuda")) == "reference"
    assert layer.path(True, torch.device("cpu")) == {"auto": "cpu", "reference": "reference", "fused": "fused"}[impl]
