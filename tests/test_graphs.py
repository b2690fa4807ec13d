"""CUDA graphs of the LM training window (trainables/graphs.py).

Off CUDA the bookkeeping (one capture per input shape, recapture when a parameter's storage is replaced,
eager evaluation) is tested on CPU windows, with a stand-in for `torch.cuda.make_graphed_callables` that returns
the window itself; the captures themselves are tested on CUDA, against the eager window, with compiled kernels.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from trainables import graphs as graphs_module
from trainables.config import G2Config, LMConfig
from trainables.graphs import WindowGraphs
from trainables.lm import RNNLM, flatten_state

from conftest import rerun_compiled

VOCAB = 50
QUIET = LMConfig(embed_dim=16, hidden_size=32, num_layers=2, dropout=0.0, dropout_hidden=0.0, dropout_input=0.0,
                 dropout_embed=0.0, weight_drop=0.0)   # deterministic with p = 0: graph and eager must agree


class RecordingCapture:
    """Stands in for torch.cuda.make_graphed_callables: records each capture, returns the window itself."""

    def __init__(self):
        self.shapes = []

    def __call__(self, window, sample_args, num_warmup_iters, pool=None):
        self.shapes.append(tuple(sample_args[0].shape))
        return window


@pytest.fixture
def capture(monkeypatch):
    """Captures of CPU windows, recorded by a stand-in for torch.cuda.make_graphed_callables."""
    recording = RecordingCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", recording)
    monkeypatch.setattr(graphs_module, "GRAPHED_DEVICE", "cpu")
    return recording


def lm_graphs(model, **kw):
    params = [p for layer in model.layers for p in layer.parameters()]
    return WindowGraphs(model.recurrent, params, module=model, **kw)


def step(model, graphs, tokens):
    """One training window: logits, and the gradients of a loss on them (and on the new state)."""
    model.zero_grad(set_to_none=True)
    out = model(tokens, model.init_state(tokens.shape[1]), recurrent=graphs)
    loss = (F.cross_entropy(out.logits.reshape(-1, VOCAB), tokens.roll(-1, 0).reshape(-1))
            + out.dropped_output.square().mean())
    loss.backward()
    return out.logits.detach().clone(), [p.grad.clone() for p in model.parameters()], out.state


def test_one_capture_per_window_shape_and_eager_evaluation(capture):
    model = RNNLM(QUIET, G2Config(gate_mode="g2", p=0.0), VOCAB)
    graphs = lm_graphs(model)
    for length in (7, 5, 7, 5, 9):
        step(model, graphs, torch.randint(0, VOCAB, (length, 3)))
    assert capture.shapes == [(7, 3, 16), (5, 3, 16), (9, 3, 16)]
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (4, 3)), model.init_state(3), recurrent=graphs)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (4, 3)), model.init_state(3), recurrent=graphs)
    assert len(capture.shapes) == 3                       # evaluation and no-grad forwards run eagerly


def test_recaptures_when_a_parameter_storage_is_replaced(capture):
    model = RNNLM(QUIET, G2Config(gate_mode="g2", p=0.0), VOCAB)
    graphs = lm_graphs(model)
    tokens = torch.randint(0, VOCAB, (6, 2))
    step(model, graphs, tokens)
    with torch.no_grad():
        model.layers[0].weight_hh_l0.mul_(0.5)           # in place, as optimisers and load_state_dict do
    step(model, graphs, tokens)
    assert len(capture.shapes) == 1
    model.layers[1].bias_ih_l0.data = model.layers[1].bias_ih_l0.data.clone()   # new storage: graphs are stale
    step(model, graphs, tokens)
    assert len(capture.shapes) == 2


def test_graphed_call_gives_the_eager_window_and_gradients(capture):
    """Through WindowGraphs (stand-in capture) the forward and every gradient are those of the plain model."""
    model = RNNLM(QUIET, G2Config(gate_mode="g2", p=0.0), VOCAB)
    tokens = torch.randint(0, VOCAB, (6, 2))
    eager = step(model, None, tokens)
    graphed = step(model, lm_graphs(model), tokens)
    assert torch.equal(eager[0], graphed[0])
    assert all(torch.equal(a, b) for a, b in zip(eager[1], graphed[1]))
    assert all(torch.equal(a, b) for a, b in zip(flatten_state(eager[2]), flatten_state(graphed[2])))


def test_shapes_beyond_the_cap_run_eagerly(capture):
    model = RNNLM(QUIET, G2Config(gate_mode="g2", p=0.0), VOCAB)
    graphs = lm_graphs(model, max_graphs=2)
    for length in (7, 5, 9, 7, 9):
        step(model, graphs, torch.randint(0, VOCAB, (length, 3)))
    assert capture.shapes == [(7, 3, 16), (5, 3, 16)] and graphs.replays == 3


def test_backward_after_another_graphed_forward_raises(capture):
    """The graphs share a memory pool: a window's backward must come before the next graphed forward."""
    model = RNNLM(QUIET, G2Config(gate_mode="g2", p=0.0), VOCAB)
    graphs = lm_graphs(model)
    tokens = torch.randint(0, VOCAB, (6, 2))
    first = model(tokens, model.init_state(2), recurrent=graphs).logits
    second = model(tokens, model.init_state(2), recurrent=graphs).logits
    second.sum().backward()                               # the latest window: fine
    with pytest.raises(RuntimeError, match="after another graphed forward"):
        first.sum().backward()


def test_gradients_accumulate_over_graphed_windows_as_eagerly(capture):
    model = RNNLM(QUIET, G2Config(gate_mode="g2", p=0.0), VOCAB)
    windows = [torch.randint(0, VOCAB, (6, 2)) for _ in range(2)]
    sums = []
    for graphs in (None, lm_graphs(model)):
        model.zero_grad(set_to_none=True)
        for tokens in windows:                             # no zero_grad between the windows
            model(tokens, model.init_state(2), recurrent=graphs).logits.square().mean().backward()
        sums.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*sums))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_the_eager_window(monkeypatch, tmp_path):
    """Captured fused windows of two lengths replay the eager results, before and after an optimiser step;
    gradients summed over graphed windows are the eager sums; an LM epoch trains through the graphs."""
    if rerun_compiled(__file__, "test_cuda_graphs_match_the_eager_window"):
        return
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)   # exact fp32 GEMMs in both runs
    for g2 in (G2Config(gate_mode="g2", tau=0.7, p=0.0), G2Config(gate_mode="lstm"),
               G2Config(gate_mode="sharpened")):
        for precision in ("fp32", "bf16"):
            model = RNNLM(QUIET, g2, VOCAB, impl="fused", precision=precision).cuda()
            graphs = lm_graphs(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            for length in (7, 5, 7, 5):
                tokens = torch.randint(0, VOCAB, (length, 4), device="cuda")
                eager, graphed = step(model, None, tokens), step(model, graphs, tokens)
                torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-6)
                for a, b in zip(graphed[1], eager[1]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                optimizer.step()                         # the graphs must read the updated weights
            assert len(graphs.graphs) == 2
    noisy = RNNLM(QUIET, G2Config(gate_mode="g2", tau=0.9, p=0.5), VOCAB, impl="fused").cuda()
    noisy_graphs = lm_graphs(noisy)
    tokens = torch.randint(0, VOCAB, (6, 4), device="cuda")
    first, second = step(noisy, noisy_graphs, tokens)[0], step(noisy, noisy_graphs, tokens)[0]
    assert not torch.equal(first, second)               # every replay draws fresh noise
    assert torch.isfinite(first).all() and os.environ.get("TRITON_INTERPRET") != "1"

    model = RNNLM(QUIET, G2Config(gate_mode="g2", tau=0.7, p=0.0), VOCAB, impl="fused").cuda()
    windows = [torch.randint(0, VOCAB, (length, 4), device="cuda") for length in (6, 6, 4)]
    sums = []
    for graphs in (None, lm_graphs(model)):
        model.zero_grad(set_to_none=True)
        for tokens in windows:                           # accumulate: a graph's buffer must not become .grad
            model(tokens, model.init_state(4), recurrent=graphs).logits.square().mean().backward()
        sums.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    from trainables.config import TrialConfig
    from trainables.lm import LMTask

    cfg = TrialConfig.from_flat({"data.corpus": "toy", "data.cache_dir": str(tmp_path), "train.max_batches": 30,
                                 "train.cuda_graphs": True, "g2.gate_mode": "g2"},
                                base=TrialConfig.preset("lm", "tiny"))
    task = LMTask(cfg, torch.device("cuda"), tmp_path)
    first_epoch, second_epoch = task.train_epoch(1), task.train_epoch(2)   # hidden state passes graph to graph
    assert task.graphs is not None and len(task.graphs.graphs) >= 2 and task.graphs.replays >= 30
    assert math.isfinite(first_epoch["train_loss"]) and second_epoch["train_loss"] < math.log(task.vocab_size)
