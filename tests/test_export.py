"""Exports of real small models (trained a few batches, scored by the sweep): every method as small as its
accounting, the row's metrics reproduced by the loaded model, and every damaged or foreign directory refused."""
import json
import struct
from dataclasses import replace

import pytest
import torch

from trainables import export
from trainables.compress import compress_model
from trainables.config import TrialConfig
from trainables.factored_lstm import FactoredLSTM
from trainables.g2lstm import evaluation_gates
from trainables.report import EpochReport, scored
from trainables.serving import ExportedModel
from trainables.store import ModelStore
from trainables.trainable import make_task

from conftest import trial_reports

SIZE_TOLERANCE = 0.02     # the file against model_bits / 8 (the safetensors header is the difference)
METRIC_TOLERANCE = 1e-4   # relative, the re-scored metric against the row's

SETTINGS = [("none", 0, 32), ("quant", 0, 8), ("quant", 0, 4), ("quant", 0, 2), ("quant", 0, 1), ("svd", 8, 32),
            ("svd+quant", 8, 4), ("svd+quant", 8, 1), ("round", 0, 32), ("round_clip", 0, 32)]


class Trained:
    """One real trial: its config, final report, and its stored model loaded into a fresh task."""

    def __init__(self, cfg, root):
        self.cfg = cfg
        self.final = EpochReport.from_dict(trial_reports(cfg, root / "work", root / "store")[-1])
        assert self.final.finished, self.final.error
        self.task = make_task(cfg, torch.device("cpu"))
        ModelStore(root / "store").load(cfg.training_key(), self.task.model)

    def row(self, method, rank, bits, eval_gate="soft"):
        return next(r for r in self.final.sweep if (r.method, r.rank, r.bits, r.eval_gate) ==
                    (method, rank, bits, eval_gate))

    def export(self, out, method, rank, bits, eval_gate="soft"):
        row = self.row(method, rank, bits, eval_gate)
        cfg = row_config(self.cfg, row.rank, row.bits, row.paper, eval_gate)
        source = export.Source(training_key=self.cfg.training_key(), accounting=row.accounting, metrics=row.scores,
                               study="unit", trial_id="t0")
        tokenizer = self.task.vocab if self.cfg.task == "lm" else self.task.data.sp
        return row, export.export_model(out, self.task.model, cfg, tokenizer, source)


def row_config(cfg, rank, bits, paper, eval_gate):
    return replace(cfg, compress=replace(cfg.compress, rank=rank, bits=bits, paper=paper),
                   g2=replace(cfg.g2, eval_gate=eval_gate))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A g2 language model on the toy grammar, 2×96: big enough that the file's header is under 2 % of it."""
    root = tmp_path_factory.mktemp("export_lm")
    flat = {"lm.embed_dim": 96, "lm.hidden_size": 96, "train.epochs": 1, "train.max_batches": 6,
            "train.max_eval_batches": 2, "sweep.ranks": [0, 8], "sweep.bits": [32, 8, 4, 2, 1],
            "sweep.paper": ["round", "round_clip"], "data.cache_dir": str(root / "cache")}
    return Trained(TrialConfig.from_flat(flat, base=TrialConfig.preset("lm", "tiny")), root)


def relative(pair):
    measured, said = pair
    return abs(measured - said) / max(abs(said), 1e-12)


@pytest.mark.parametrize("method,rank,bits", SETTINGS, ids=[f"{m}-r{r}-b{b}" for m, r, b in SETTINGS])
def test_every_method_is_as_small_as_its_accounting_and_reproduces_its_row(lm, tmp_path, method, rank, bits):
    row, manifest = lm.export(tmp_path / "out", method, rank, bits)
    accounted = row.accounting.model_bits / 8
    size = (tmp_path / "out" / export.TENSORS_FILE).stat().st_size
    assert abs(size - accounted) <= SIZE_TOLERANCE * accounted, (size, accounted)
    # the tensors hold the accounted bits, plus the byte padding of each code stream and round's level tables
    levels = sum(4 * t["shape"][0] for name, t in manifest.tensors.items() if name.endswith("/levels"))
    codes = sum(1 for name in manifest.tensors if name.endswith("codes"))
    assert 0 <= manifest.sizes["payload_bytes"] - accounted <= levels + codes
    assert {b["method"] for b in manifest.blocks} == (set() if method == "none" else {method})
    scores = export.rescore(tmp_path / "out")
    assert set(scores) == {"val_metric", "test_metric", "val_loss", "test_loss"}
    assert all(relative(pair) <= METRIC_TOLERANCE for pair in scores.values()), scores
    model = export.load(tmp_path / "out")
    assert not model.training and {layer.path(False, torch.device("cpu")) for layer in model.layers} == {"plain"}
    compressed, _ = compress_model(lm.task.model, manifest.trial_config().compress)       # what the sweep scored
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[name], p) for name, p in compressed.named_parameters())
    assert model.decoder.weight is model.embedding.weight                               # still tied


def test_binary_gates_are_exported_and_run_the_reference_recurrence(lm, tmp_path):
    _, manifest = lm.export(tmp_path / "out", "quant", 0, 2, eval_gate="hard")
    assert manifest.gates["inference"] == "binary"
    model = export.load(tmp_path / "out")
    assert {layer.path(False, torch.device("cpu")) for layer in model.layers} == {"reference"}
    assert all(relative(pair) <= METRIC_TOLERANCE for pair in export.rescore(tmp_path / "out").values())


def test_a_temperature_is_folded_into_the_gate_rows(lm, tmp_path):
    """`tempered` gates (σ(a/τ)), which the sweep does not score: the oracle is the compressed copy evaluated so."""
    cfg = row_config(lm.cfg, 8, 4, "none", "tempered")
    compressed, accounting = compress_model(lm.task.model, cfg.compress)
    with evaluation_gates(compressed, "tempered"):
        said = {k: v for split, prefix in (("valid", "val"), ("test", "test"))
                for k, v in scored(prefix, lm.task.evaluate(compressed, split), "ppl").items()}
    source = export.Source(training_key=cfg.training_key(), accounting=accounting, metrics=said)
    manifest = export.export_model(tmp_path / "out", lm.task.model, cfg, lm.task.vocab, source)
    assert manifest.gates["folded_scale"] == pytest.approx(1 / cfg.g2.tau)
    model = export.load(tmp_path / "out")
    first = model.layers[0]
    assert first.g2.gate_mode == "lstm" and first.path(False, torch.device("cpu")) == "plain"
    w = compressed.layers[0].weight_hh_l0.detach()
    torch.testing.assert_close(first.weight_hh_l0[:64], w[:64] / cfg.g2.tau, rtol=1e-6, atol=0)
    assert torch.equal(first.weight_hh_l0[192:], w[192:])          # g and o rows are not scaled
    assert all(relative(pair) <= METRIC_TOLERANCE for pair in export.rescore(tmp_path / "out").values())


def test_low_rank_blocks_can_run_as_two_thin_gemms(lm, tmp_path):
    lm.export(tmp_path / "out", "svd+quant", 8, 4)
    model = export.load(tmp_path / "out", low_rank="factored")
    assert all(isinstance(layer, FactoredLSTM) for layer in model.layers)
    assert model.layers[0].hh[0].right.shape == (2 * 8 + 2 * 96, 96)
    dense = export.load(tmp_path / "out")
    x = lm.task.data["valid"][:20]                                               # (T, B)
    with torch.no_grad():
        got, want = (m(x, m.init_state(x.shape[1])) for m in (model, dense))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)   # the dense model is the oracle
    torch.testing.assert_close(got.state[1][1], want.state[1][1], rtol=1e-5, atol=1e-5)
    scores = export.rescore(tmp_path / "out", low_rank="factored")
    assert all(relative(pair) <= METRIC_TOLERANCE for pair in scores.values()), scores


def test_the_model_scores_text_one_line_at_a_time_as_in_a_batch(lm, tmp_path):
    lm.export(tmp_path / "out", "quant", 0, 4)
    served = ExportedModel(tmp_path / "out")
    lines = [" ".join(served.tokenizer.itos[i] for i in (3, 5, 7, 4)), served.tokenizer.itos[6], "no-such-word"]
    if served.tokenizer.unk_id is None:
        lines = lines[:2]
    batch = served.predict(lines)
    alone = [served.predict([line]).iloc[0] for line in lines]
    assert batch["tokens"].tolist() == [len(line.split()) + 1 for line in lines]
    torch.testing.assert_close(torch.tensor(batch["nll"].tolist()), torch.tensor([float(r["nll"]) for r in alone]),
                               rtol=1e-5, atol=1e-5)
    assert (batch["ppl"] > 1).all()


# --------------------------------------------------------------------------- refusals

@pytest.fixture
def exported(lm, tmp_path):
    lm.export(tmp_path / "out", "svd+quant", 8, 2)
    return tmp_path / "out"


def test_a_changed_tensor_byte_is_refused_naming_the_file_and_tensor(exported):
    path = exported / export.TENSORS_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10                                   # inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(export.ExportError, match=r"model\.safetensors: tensor .* does not match its checksum"):
        export.load(exported)


def test_a_damaged_header_is_refused_naming_the_file(exported):
    path = exported / export.TENSORS_FILE
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    with pytest.raises(export.ExportError, match=r"model\.safetensors: not a readable safetensors file"):
        export.load(exported)


def test_a_missing_manifest_is_refused(exported):
    (exported / export.MANIFEST_FILE).unlink()
    with pytest.raises(export.ExportError, match=r"manifest\.json: missing; .* not a complete g2-study export"):
        export.load(exported)


def edit_manifest(directory, change):
    path = directory / export.MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_an_unknown_format_version_is_refused(exported):
    edit_manifest(exported, lambda m: m.update(format_version=99))
    with pytest.raises(export.ExportError, match=r"manifest\.json: format_version 99 is unknown to this code"):
        export.load(exported)


def test_tensors_that_do_not_match_the_manifest_are_refused(exported):
    def reshape(m):
        name = next(n for n in m["tensors"] if n.endswith("/a.scale"))
        m["tensors"][name]["shape"] = [1, 2]
    edit_manifest(exported, reshape)
    with pytest.raises(export.ExportError, match=r"model\.safetensors: tensor .*/a\.scale is float32 \[.*\], "
                                                 r"manifest\.json says float32 \[1, 2\]"):
        export.load(exported)
    edit_manifest(exported, lambda m: m["tensors"].pop(next(iter(m["tensors"]))))
    with pytest.raises(export.ExportError, match="holds tensor.* that manifest.json does not list"):
        export.load(exported)


def test_a_changed_vocabulary_is_refused(exported):
    (exported / export.VOCAB_FILE).write_text("a\nb\n")
    with pytest.raises(export.ExportError, match=r"vocab\.txt: does not match its checksum"):
        export.read_tokenizer(exported, export.read_manifest(exported))


def test_an_export_refuses_a_used_directory_and_a_row_of_another_setting(lm, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        lm.export(tmp_path / "used", "quant", 0, 4)
    row = lm.row("quant", 0, 2)
    cfg = row_config(lm.cfg, 0, 4, "none", "soft")                 # a 4-bit export of the 2-bit row
    source = export.Source(training_key="k", accounting=row.accounting, metrics=row.scores)
    with pytest.raises(ValueError, match="the row says gate_bits .* packing quant stores"):
        export.export_model(tmp_path / "other", lm.task.model, cfg, lm.task.vocab, source)
    assert not (tmp_path / "other").exists()



def test_an_export_is_fsynced_file_by_file_and_renamed_whole(lm, tmp_path, disk_log):
    (tmp_path / "out").mkdir()   # an empty directory the user made is replaced
    lm.export(tmp_path / "out", "quant", 0, 4)
    disk_log.assert_directory_replaced_durably(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # no staging directory left

# --------------------------------------------------------------------------- translation

@pytest.fixture(scope="module")
def nmt(tmp_path_factory):
    """A translation model on the toy copy task; its compression reaches the decoder's context columns only."""
    root = tmp_path_factory.mktemp("export_nmt")
    flat = {"train.epochs": 1, "train.max_batches": 4, "train.max_eval_batches": 2, "sweep.ranks": [0, 4],
            "sweep.bits": [32, 2], "sweep.paper": ["round_clip"], "sweep.hard_gates": False,
            "data.cache_dir": str(root / "cache")}
    return Trained(TrialConfig.from_flat(flat, base=TrialConfig.preset("nmt", "tiny")), root)


@pytest.mark.parametrize("method,rank,bits", [("svd+quant", 4, 2), ("round_clip", 0, 32)])
def test_a_translation_model_with_context_columns_round_trips(nmt, tmp_path, method, rank, bits, one_thread):
    row, manifest = nmt.export(tmp_path / "out", method, rank, bits)
    context = [b for b in manifest.blocks if b["param"] == "decoder.rnn.weight_ih_l0"]
    e, h = nmt.cfg.nmt.embed_dim, nmt.cfg.nmt.hidden_size
    assert context and all(b["cols"] == [e, e + h] for b in context)
    assert "decoder.rnn.weight_ih_l0/i/left" in manifest.tensors
    assert not any(b["param"].startswith("encoder") and "weight_ih" in b["param"] for b in manifest.blocks)
    scores = export.rescore(tmp_path / "out")
    assert all(relative(pair) <= METRIC_TOLERANCE for pair in scores.values()), scores
    translations = ExportedModel(tmp_path / "out").predict(["a b c", "d"])
    assert len(translations) == 2 and all(isinstance(t, str) for t in translations["translation"])
