"""The fused layer (trainables/g2lstm_kernels.py) against autograd of the reference recurrence.

On CPU the kernels run in Triton's interpreter: the session jits them for it (conftest `_triton_kernels`, for
tests marked `interpreted_kernels`), and each test here sets TRITON_INTERPRET=1 while it runs, which is what lets
`fused_lstm_layer` take CPU tensors. The CUDA test re-runs itself in a subprocess with G2_TRITON_COMPILED=1 to get
the compiled kernels instead.
"""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainables import g2lstm
from trainables.config import G2Config
from trainables.g2lstm import G2LSTM, lstm_layer_reference
from trainables.g2lstm_kernels import fused_available, fused_lstm_layer
from trainables.gates import NOISE_EPS, GateMath

from conftest import rerun_compiled
from kernel_noise import gate_noise

# triton is not imported here: the session imports it for the interpreter (conftest `_triton_kernels`)
pytestmark = [pytest.mark.interpreted_kernels,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]
COMPILED = os.environ.get("G2_TRITON_COMPILED") == "1"   # a compiled re-run of the CUDA test

T, B, IN, H = 5, 3, 4, 8
GATES = {  # the training-time gate maths of each mode that the fused path runs without noise
    "lstm": GateMath.of(G2Config(gate_mode="lstm"), training=True),
    "sharpened": GateMath.of(G2Config(gate_mode="sharpened"), training=True),
    "g2_p0": GateMath.of(G2Config(gate_mode="g2", tau=0.7, p=0.0), training=True),
}
NOISY = {
    "g2": GateMath.of(G2Config(gate_mode="g2", tau=0.9, p=0.2), training=True),
    "g2_p1": GateMath.of(G2Config(gate_mode="g2", tau=0.5, p=1.0), training=True),
}
# max |fused − reference| / max |reference|, per tensor. In bf16 the reference rounds the same GEMM operands to
# bf16 (`bf16_operand_reference`), so both accumulate the same products in fp32: measured < 1e-4 here, the
# rare operand that the two orders of fp32 operations round to neighbouring bf16 values. Storing a GEMM result
# in bf16 (fp32 accumulation promised, bf16 delivered) costs 1e-3 to 5e-3 and fails.
TOL = {"fp32": 1e-5, "bf16": 3e-4}
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_runs_interpreted():
    """TRITON_INTERPRET=1 for the duration of each test, as `fused_lstm_layer` asks before it takes CPU tensors."""
    if COMPILED:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
    assert "TRITON_INTERPRET" not in os.environ, "the interpreter leaked out of a kernels test"


def layer_inputs(steps=T, batch=B, in_size=IN, hidden=H, device="cpu", weight_drop=0.0):
    """(leaves, args): the leaves that get gradients, and the layer's arguments x, h0, c0, w_ih, w_hh, b_ih, b_hh."""
    bound = 2.0 / math.sqrt(hidden)      # twice nn.LSTM's init, so gates leave the linear region
    leaves = [torch.randn(steps, batch, in_size, device=device), torch.randn(batch, hidden, device=device),
              torch.randn(batch, hidden, device=device)]
    leaves += [torch.empty(*shape, device=device).uniform_(-bound, bound)
               for shape in ((4 * hidden, in_size), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))]
    leaves = [t.requires_grad_() for t in leaves]
    args = list(leaves)
    if weight_drop:
        args[4] = F.dropout(leaves[4], weight_drop, training=True)   # one mask, shared by both paths
    return leaves, args


class Bf16MatMul(torch.autograd.Function):
    """a @ b with both operands rounded to bf16 and fp32 accumulation, forward and backward: the fused path's GEMMs
    (it feeds the bf16-rounded gradient dA into dx, dh and the weight gradients)."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = a.bfloat16().float(), b.bfloat16().float()
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.bfloat16().float()
        return grad @ b.t(), a.t() @ grad


def bf16_operand_reference(x, h, c, w_ih, w_hh, b_ih, b_hh, gate, record_gates=False):
    """`lstm_layer_reference` with every GEMM through Bf16MatMul: the oracle of precision="bf16"."""
    hidden = h.shape[-1]
    steps, batch, _ = x.shape
    xw = Bf16MatMul.apply(x.reshape(steps * batch, -1), w_ih.t()).view(steps, batch, -1) + b_ih + b_hh
    noise = g2lstm.logistic_noise((steps, batch, 2 * hidden), gate.noise_p) if gate.noise_p > 0 else None
    ys, gates = [], []
    for t in range(steps):
        a = xw[t] + Bf16MatMul.apply(h, w_hh.t())                 # (B, 4H), [i, f, g, o]
        gate_if = gate.apply(a[:, :2 * hidden], None if noise is None else noise[t])
        i, f = gate_if.chunk(2, dim=1)
        c = f * c + i * torch.tanh(a[:, 2 * hidden:3 * hidden])
        h = torch.sigmoid(a[:, 3 * hidden:]) * torch.tanh(c)
        ys.append(h)
        gates.append(gate_if)
    return torch.stack(ys), h, c, (torch.stack(gates) if record_gates else None)


def run(layer, leaves, args, gate, **kw):
    """Outputs (y, h_T, c_T, gates) and the gradients of a loss touching y, h_T and c_T w.r.t. every leaf."""
    y, h, c, gates = layer(*args, gate, record_gates=True, **kw)
    gen = torch.Generator(device=y.device).manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, device=y.device)).sum() for t in (y, h, c))
    return (y, h, c, gates), torch.autograd.grad(loss, leaves, retain_graph=True)   # the dropout node is shared


def assert_rel(actual, expected, tol, what):
    err = ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def compare(gate, precision, *, device="cpu", noise=None, weight_drop=0.0, seed=11, sizes=(T, B, IN, H)):
    """Fused vs reference: outputs, recorded gates and all seven gradients; `noise` feeds the reference."""
    leaves, args = layer_inputs(*sizes, device=device, weight_drop=weight_drop)
    fused, fused_grads = run(fused_lstm_layer, leaves, args, gate, seed=seed, precision=precision)
    reference = bf16_operand_reference if precision == "bf16" else lstm_layer_reference
    if noise is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(g2lstm, "logistic_noise", lambda shape, p, **_: noise.to(device).reshape(shape))
            ref, ref_grads = run(reference, leaves, args, gate)
    else:
        ref, ref_grads = run(reference, leaves, args, gate)
    for name, a, b in zip(("y", "h_T", "c_T", "gates"), fused, ref):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert_rel(a, b, TOL[precision], name)
    for name, a, b in zip(("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"), fused_grads, ref_grads):
        assert a.dtype == torch.float32
        assert_rel(a, b, TOL[precision], f"d{name}")


@pytest.mark.parametrize("weight_drop", [0.0, 0.5])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", GATES)
def test_matches_reference_without_noise(mode, precision, weight_drop):
    compare(GATES[mode], precision, weight_drop=weight_drop)


@pytest.mark.parametrize("weight_drop", [0.0, 0.5])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", NOISY)
def test_matches_reference_fed_the_kernels_noise(mode, precision, weight_drop):
    gate = NOISY[mode]
    noise = gate_noise(11, T, B, H, gate.noise_p)
    assert noise.shape == (T, B, 2 * H) and noise.count_nonzero() > 0
    compare(gate, precision, noise=noise, weight_drop=weight_drop, seed=11)


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (6, 2, 3, 5)])
def test_odd_sizes(sizes):
    steps, batch, _, hidden = sizes
    gate = NOISY["g2"]
    compare(gate, "fp32", noise=gate_noise(11, steps, batch, hidden, gate.noise_p), sizes=sizes)


def test_backward_from_outputs_alone():
    """y.sum() hands backward an expanded (stride-0) gradient and no gradient for h_T, c_T."""
    leaves, args = layer_inputs()
    gate = NOISY["g2"]
    fused = torch.autograd.grad(fused_lstm_layer(*args, gate, seed=5)[0].sum(), leaves)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(g2lstm, "logistic_noise", lambda shape, p, **_: gate_noise(5, T, B, H, p))
        ref = torch.autograd.grad(lstm_layer_reference(*args, gate)[0].sum(), leaves)
    for a, b in zip(fused, ref):
        assert_rel(a, b, TOL["fp32"], "grad")


def truncated_logistic_variance() -> float:
    """Var L = E L² for L = log(U+ε) − log(1+ε−U), U ~ U(0,1), by the midpoint rule (E L = 0 by symmetry)."""
    u = (torch.arange(2_000_000, dtype=torch.float64) + 0.5) / 2_000_000
    return ((torch.log(u + NOISE_EPS) - torch.log1p(NOISE_EPS - u)) ** 2).mean().item()


def test_noise_statistics_of_the_fused_forward():
    """With zero weights a_if = 0, so the recorded gates are σ(L·B): read the noise back through the logit."""
    steps, batch, hidden, p = 3, 8, 256, 0.3
    var = truncated_logistic_variance()
    assert 3.1 < var < 3.2                       # below π²/3 ≈ 3.29: the ε truncation
    zeros = [torch.zeros(steps, batch, 1), torch.zeros(batch, hidden), torch.zeros(batch, hidden),
             torch.zeros(4 * hidden, 1), torch.zeros(4 * hidden, hidden), torch.zeros(4 * hidden),
             torch.zeros(4 * hidden)]
    gates = fused_lstm_layer(*zeros, GateMath(noise_p=p), seed=123, record_gates=True)[3]
    noise = torch.logit(gates.double())                                   # (T, B, 2H), [i, f]
    noised = gates != 0.5
    n = noised.numel()
    assert abs(noised.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    values = noise[noised]
    assert abs(values.mean().item()) < 4 * math.sqrt(var / values.numel())
    assert values.var().item() == pytest.approx(var, rel=0.06)
    torch.testing.assert_close(noise.float(), gate_noise(123, steps, batch, hidden, p), rtol=0, atol=2e-4)


def test_noise_helper_statistics():
    steps, batch, hidden, p = 2, 32, 512, 0.2
    noise = gate_noise(7, steps, batch, hidden, p).double()
    values = noise[noise != 0]
    var = truncated_logistic_variance()
    assert abs(values.numel() / noise.numel() - p) < 4 * math.sqrt(p * (1 - p) / noise.numel())
    assert abs(values.mean().item()) < 4 * math.sqrt(var / values.numel())
    assert values.var().item() == pytest.approx(var, rel=0.03)
    assert values.abs().max().item() <= math.log((1 + NOISE_EPS) / NOISE_EPS) + 1e-4


def test_noise_is_fresh_per_step_and_seed_and_repeats_per_seed():
    noise = gate_noise(3, 4, B, H, 1.0)
    assert torch.equal(noise, gate_noise(3, 4, B, H, 1.0))
    assert torch.equal(noise, gate_noise(torch.tensor([3]), 4, B, H, 1.0))    # int and tensor seeds agree
    assert not torch.equal(noise, gate_noise(4, 4, B, H, 1.0))
    assert (noise[:, :, :H] != noise[:, :, H:]).all()                           # i and f draw separately
    for s in range(1, 4):
        assert (noise[s] != noise[s - 1]).all()
    assert gate_noise(3, 2, B, H, 0.0).count_nonzero() == 0
    leaves, args = layer_inputs()
    y1, y2, y3 = (fused_lstm_layer(*args, NOISY["g2"], seed=s)[0] for s in (9, 9, 10))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_refuses_what_it_does_not_run():
    assert fused_available(torch.device("cpu"))       # interpreted here
    _, args = layer_inputs()
    with pytest.raises(ValueError, match="hard gates"):
        fused_lstm_layer(*args, GateMath(hard=True), seed=0)
    with pytest.raises(ValueError, match="precision"):
        fused_lstm_layer(*args, GateMath(), seed=0, precision="fp16")
    with pytest.raises(TypeError, match="float32"):
        fused_lstm_layer(*[a.detach().double() for a in args], GateMath(), seed=0)
    with pytest.raises(ValueError, match="int64"):
        fused_lstm_layer(*args, GateMath(), seed=torch.tensor([1.0]))


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from trainables.gates import GateMath\n"
            "from trainables.g2lstm_kernels import fused_available, fused_lstm_layer\n"
            "assert not fused_available(torch.device('cpu'))\n"
            "args = [torch.zeros(2, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(4, 1),\n"
            "        torch.zeros(4, 1), torch.zeros(4), torch.zeros(4)]\n"
            "try:\n"
            "    fused_lstm_layer(*args, GateMath(), seed=0)\n"
            "except RuntimeError as err:\n"
            "    assert 'needs triton' in str(err), err\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})   # CPU tensors get as far as importing triton
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_cuda(monkeypatch):
    """The same comparisons at a moderate size with the compiled kernels (T=35, B=20, H=200)."""
    if rerun_compiled(__file__, "test_fused_matches_reference_on_cuda"):
        return
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)   # compare against true fp32 GEMMs
    sizes = (35, 20, 100, 200)
    tol = {"fp32": 1e-4, "bf16": 1e-3}   # GPU exp/log are approximate; over 35 steps 1e-5 is too tight
    monkeypatch.setattr(sys.modules[__name__], "TOL", tol)
    for precision in ("fp32", "bf16"):
        for weight_drop in (0.0, 0.5):
            for gate in GATES.values():
                compare(gate, precision, device="cuda", weight_drop=weight_drop, sizes=sizes)
            for gate in NOISY.values():
                noise = gate_noise(11, 35, 20, 200, gate.noise_p, device="cuda")
                compare(gate, precision, device="cuda", noise=noise, weight_drop=weight_drop, seed=11, sizes=sizes)
    seed = torch.tensor([2024], device="cuda")
    noise = gate_noise(seed, 8, 64, 512, 0.3, device="cuda").double()
    values = noise[noise != 0]
    assert abs(values.numel() / noise.numel() - 0.3) < 0.01
    assert abs(values.mean().item()) < 0.03
    assert values.var().item() == pytest.approx(truncated_logistic_variance(), rel=0.03)
    assert torch.equal(noise, gate_noise(2024, 8, 64, 512, 0.3, device="cuda").double())


def test_g2lstm_impl_fused_matches_the_reference_layer():
    """G2LSTM(impl="fused") dispatches its noisy training layers to the Triton path (interpreted here)."""
    torch.manual_seed(0)
    models = [G2LSTM(3, 4, 2, g2=G2Config(gate_mode="g2", tau=0.7, p=0.0), impl=impl) for impl in ("reference",
                                                                                                     "fused")]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(4, 2, 3)
    outs = [m(x)[0] for m in models]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    grads = []
    for m, y in zip(models, outs):
        y.square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    noisy = G2LSTM(3, 4, g2=G2Config(gate_mode="g2", p=0.5), impl="fused")
    assert not torch.allclose(noisy(x)[0], noisy(x)[0])           # fresh noise seed every forward


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 0.15)])
def test_language_model_trains_on_the_fused_path(precision, tol):
    """An RNNLM built with impl="fused" (as `train.impl` does) gives the reference model's loss and gradients."""
    from trainables.config import LMConfig
    from trainables.lm import RNNLM

    cfg = LMConfig(embed_dim=6, hidden_size=8, num_layers=2, dropout=0.0, dropout_hidden=0.0, dropout_input=0.0,
                   dropout_embed=0.0, weight_drop=0.0)
    g2 = G2Config(gate_mode="g2", tau=0.7, p=0.0)
    models = [RNNLM(cfg, g2, 20, impl="reference"), RNNLM(cfg, g2, 20, impl="fused", precision=precision)]
    models[1].load_state_dict(models[0].state_dict())
    tokens = torch.randint(0, 20, (5, 3))
    grads = []
    for model in models:
        logits = model(tokens, model.init_state(3)).logits
        F.cross_entropy(logits.reshape(-1, 20), tokens.roll(-1, 0).reshape(-1)).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if "layers" in name})
    for name, expected in grads[0].items():
        assert_rel(grads[1][name], expected, tol, name)


def test_kernels_launch_on_the_device_of_their_tensors(monkeypatch):
    """Triton launches on the *current* CUDA device; forward and backward make it the tensors' own."""
    from trainables import g2lstm_kernels

    guard = g2lstm_kernels._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1            # not entered: no GPU needed
    entered = []

    class Recorded:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(g2lstm_kernels, "_on_device", Recorded)
    leaves, args = layer_inputs()
    y = fused_lstm_layer(*args, NOISY["g2"], seed=3)[0]
    assert entered == [torch.device("cpu")]                                   # the forward
    y.sum().backward()
    assert entered == [torch.device("cpu")] * 2                               # and the backward
