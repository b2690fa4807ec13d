"""The CPU path of noisy g2 training (`trainables/g2lstm_cpu.py`) against the autograd reference, its oracle."""
import pytest
import torch
from torch.func import functional_call

from trainables import g2lstm_cpu
from trainables.config import SMOKE, G2Config, TrialConfig
from trainables.g2lstm import G2LSTM
from trainables.gates import GateMath, logistic_noise
from trainables.trainable import make_task, run_trial

T, B, IN, H, LAYERS = 9, 3, 5, 6, 2
RTOL = 1e-6        # fp32: the largest difference relative to the largest value, per tensor


def pair(g2: G2Config, **kw) -> tuple[G2LSTM, G2LSTM]:
    """A reference-path G2LSTM and an auto one (the CPU path here) with the same weights, in training mode."""
    ref = G2LSTM(IN, H, LAYERS, g2=g2, impl="reference", **kw).train()
    cpu = G2LSTM(IN, H, LAYERS, g2=g2, impl="auto", **kw).train()
    cpu.load_state_dict(ref.state_dict())
    return ref, cpu


def window(model: G2LSTM, x, state, seed: int = 3, weight_hh=None):
    """Forward with gates and every gradient of a loss that reaches y, h_T and c_T, under one seed; with `weight_hh`
    given, its gradient stands in for the module's own recurrent weights'."""
    torch.manual_seed(seed)
    y, (h, c), gates = model.forward_with_gates(x, state, weight_hh=weight_hh)
    loss = y.square().sum() + (h * torch.arange(H)).sum() + c.pow(3).sum()
    weights = [p for name, p in model.named_parameters() if weight_hh is None or "weight_hh" not in name]
    leaves = [x, *state, *weights, *(weight_hh or [])]
    return [y, h, c, *gates, *torch.autograd.grad(loss, leaves)], torch.get_rng_state()


def inputs(dtype=torch.float32):
    x = torch.randn(T, B, IN, dtype=dtype, requires_grad=True)
    state = tuple(torch.randn(LAYERS, B, H, dtype=dtype, requires_grad=True) for _ in range(2))
    return x, state


def assert_close(actual, expected, rtol=RTOL):
    for a, b in zip(actual, expected, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= rtol * b.abs().max().item()


def test_auto_trains_noisy_g2_on_the_cpu_path_and_nothing_else():
    g2 = G2LSTM(IN, H, g2=G2Config(gate_mode="g2"))
    cpu = torch.device("cpu")
    assert g2.path(True, cpu) == "cpu" and g2.path(False, cpu) == "plain"
    assert G2LSTM(IN, H, g2=G2Config(gate_mode="g2"), impl="reference").path(True, cpu) == "reference"
    assert G2LSTM(IN, H, g2=G2Config(gate_mode="g2", p=0.0)).path(True, cpu) == "plain"
    assert G2LSTM(IN, H, g2=G2Config(gate_mode="g2", eval_gate="hard")).path(False, cpu) == "reference"


@pytest.mark.parametrize("g2", [G2Config(gate_mode="g2", tau=0.7, p=0.3), G2Config(gate_mode="g2", tau=1.0, p=1.0),
                                G2Config(gate_mode="g2", tau=2.5, p=0.05)])
@pytest.mark.parametrize("weight_drop", [0.0, 0.5])
def test_equals_the_reference_under_the_same_seed(g2, weight_drop):
    """Forward, recorded gates, and the gradients of inputs, states and weights, DropConnect and dropout included:
    the same seed gives both paths the same masks and noise, and leaves the RNG in the same state."""
    ref, cpu = pair(g2, weight_drop=weight_drop, dropout=0.3)
    x, state = inputs()
    (expected, ref_rng), (actual, cpu_rng) = window(ref, x, state), window(cpu, x, state)
    assert_close(actual, expected)
    assert torch.equal(ref_rng, cpu_rng)       # the RNG stream a checkpoint saves is consumed alike


def test_recorded_gates_are_the_noisy_ones_of_the_forward():
    ref, cpu = pair(G2Config(gate_mode="g2", tau=0.5, p=1.0))
    x, state = inputs()
    torch.manual_seed(5)
    _, _, gates = cpu.forward_with_gates(x, state)
    torch.manual_seed(5)
    _, _, gates_ref = ref.forward_with_gates(x, state)
    torch.manual_seed(6)
    _, _, other = cpu.forward_with_gates(x, state)
    assert_close(gates, gates_ref)
    assert not torch.allclose(gates[0], other[0])                 # another seed, other noise
    assert all(not g.requires_grad for g in gates)


def test_explicit_weight_hh_gets_the_gradient():
    """A decoder passes its dropped recurrent weights per call (`weight_hh`): their gradient is the reference's."""
    ref, cpu = pair(G2Config(gate_mode="g2", tau=0.8, p=0.4))
    x, state = inputs()
    weight_hh = [torch.nn.functional.dropout(getattr(ref, f"weight_hh_l{k}").detach(), 0.4).requires_grad_()
                 for k in range(LAYERS)]
    (expected, _), (actual, _) = window(ref, x, state, weight_hh=weight_hh), window(cpu, x, state, weight_hh=weight_hh)
    assert_close(actual, expected)


def test_gradcheck_float64_through_the_module():
    m = G2LSTM(3, 4, 2, g2=G2Config(gate_mode="g2", tau=0.7, p=0.5), weight_drop=0.3, dropout=0.2).double().train()
    assert m.path(True, torch.device("cpu")) == "cpu"
    params = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def run(x, h0, c0, *weights):
        torch.manual_seed(11)          # the same noise and masks at every evaluation
        y, (h, c) = functional_call(m, dict(zip(params, weights)), (x, (h0, c0)))
        return y, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params.values()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4])
def test_gradcheck_float64_of_the_layer(steps):
    """The layer function alone, one step and several, with a temperature and a given noise tensor."""
    x = torch.randn(steps, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((16, 3), (16, 4), (16,), (16,))]
    noise = logistic_noise((steps, 2, 8), 0.5, dtype=torch.float64)
    gate = GateMath(scale=1 / 0.6, noise_p=0.5)

    def run(*args):
        return g2lstm_cpu.cpu_lstm_layer(*args, gate, noise)[:3]

    assert torch.autograd.gradcheck(run, (x, h0, c0, *weights), eps=1e-6, atol=1e-6)


def test_oneDNN_and_general_gemms_agree(monkeypatch):
    """`Linear` runs oneDNN or torch.mm depending on the build and the size: the results must not depend on it."""
    ref, cpu = pair(G2Config(gate_mode="g2", tau=0.7, p=0.3))
    x, state = inputs()
    outputs = []
    for minimum in (0, 1 << 62):                    # every per-step GEMM on oneDNN (where built), then none
        monkeypatch.setattr(g2lstm_cpu, "ONEDNN_MIN_STEP_MACS", minimum)
        outputs.append(window(cpu, x, state)[0])
    monkeypatch.setattr(g2lstm_cpu, "_onednn_linear", lambda: False)
    outputs.append(window(cpu, x, state)[0])
    expected = window(ref, x, state)[0]
    for actual in outputs:
        assert_close(actual, expected)


@pytest.mark.parametrize("change, error", [
    (dict(x=torch.randn(4, 3, 7)), "bad shapes"),
    (dict(noise=torch.zeros(4, 3, 7)), "bad shapes"),
    (dict(h0=torch.zeros(3, 6, dtype=torch.float64)), "one floating dtype"),
])
def test_refuses_bad_input(change, error):
    args = dict(x=torch.randn(4, 3, 5), h0=torch.zeros(3, 6), c0=torch.zeros(3, 6), w_ih=torch.randn(24, 5),
                w_hh=torch.randn(24, 6), b_ih=torch.zeros(24), b_hh=torch.zeros(24), noise=None) | change
    exc = TypeError if "dtype" in error else ValueError
    with pytest.raises(exc, match=error):
        g2lstm_cpu.cpu_lstm_layer(**args, gate=GateMath(noise_p=0.2))
    with pytest.raises(ValueError, match="hard gates"):
        g2lstm_cpu.cpu_lstm_layer(**{**args, **dict(x=torch.randn(4, 3, 5))}, gate=GateMath(hard=True))


def test_noise_is_a_bernoulli_process():
    """The kept elements' positions: a fraction p, independent of the previous element (the sparse draw's steps)."""
    torch.manual_seed(0)
    kept = (logistic_noise((400, 500), 0.3) != 0).flatten().double()
    assert abs(kept.mean().item() - 0.3) < 0.005
    after_kept = (kept[1:] * kept[:-1]).sum() / kept[:-1].sum()
    assert abs(after_kept.item() - 0.3) < 0.005
    assert torch.count_nonzero(logistic_noise((7, 3), 1.0)) == 21 and torch.count_nonzero(logistic_noise((0, 3), 0.5)) == 0


@pytest.mark.slow
def test_a_resumed_trial_equals_an_uninterrupted_one_on_the_cpu_path(tmp_path, one_thread):
    """The real trainer, g2 training on the CPU path: stopping after epoch 1 and resuming from the checkpoint gives
    the uninterrupted run's curve exactly (the noise is drawn from the checkpointed RNG stream)."""
    cfg = TrialConfig.from_flat({**SMOKE, "train.epochs": 2, "data.cache_dir": str(tmp_path / "cache"),
                                 "g2.gate_mode": "g2", "g2.p": 0.5, "sweep.ranks": [0], "sweep.bits": [32],
                                 "sweep.paper": [], "sweep.hard_gates": False}, base=TrialConfig.preset("lm", "tiny"))
    layers = make_task(cfg, torch.device("cpu")).model.layers
    assert {layer.path(True, torch.device("cpu")) for layer in layers} == {"cpu"}

    def curve(reports):
        return [(r.epoch, r.train["train_loss"], r.val_metric) for r in reports]

    full, first, second = [], [], []
    run_trial(cfg, tmp_path / "full", report=lambda m, _: full.append(m))

    def stop_after_one(metrics, _):
        first.append(metrics)
        raise KeyboardInterrupt("stopped on purpose")
    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, tmp_path / "work", report=stop_after_one)
    run_trial(cfg, tmp_path / "work", report=lambda m, _: second.append(m), resume=tmp_path / "work" / "checkpoint")
    assert curve(first + second) == curve(full) and len(full) == 2
