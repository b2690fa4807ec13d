"""A compressed model you can take away: one scored compression setting of a trained model, in its stored form.

    <dir>/model.safetensors   every parameter outside the compressed i/f blocks as float32; each compressed block
                              as `trainables/packing.py` stores it (packed codes and scales, low-rank factors, ...)
    <dir>/vocab.txt           LM: the word list in id order, one word a line
    <dir>/bpe.model           NMT: the joint sentencepiece BPE model
    <dir>/manifest.json       what it is (`Manifest`): written last, so a directory with one is complete

`export_model` writes one from a model and the setting its row was scored under, `load` gives back an
evaluation-ready module, and `rescore` scores that module on the row's splits. The blocks are those
`trainables/compress.py` compresses, walked the same way, and a decoded block is the block the sweep scored, so
the loaded model is the row's model. A temperature (a sharpened model, g2's `tempered` evaluation gates) is folded
into the i/f rows as the plain path folds it at run time (`trainables/g2lstm.py`): every layer then runs PyTorch's
fused LSTM, unless the row scored binary gates, which run the reference recurrence.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from trainables.compress import FLOAT_BITS, _target_columns, account, gate_rows, recurrent_layers
from trainables.config import G2Config, TrialConfig
from trainables.durable import writing_directory
from trainables.g2lstm import G2LSTM
from trainables.gates import GateMath
from trainables.packing import BlockCode, decode_block, encode_block
from trainables.report import Accounting

EXPORT_FORMAT = "g2-study packed LSTM"
FORMAT_VERSION = 1            # bumped when the files' layout changes; `load` refuses versions it does not know
READABLE_VERSIONS = (1,)
MANIFEST_FILE, TENSORS_FILE, VOCAB_FILE, BPE_FILE = "manifest.json", "model.safetensors", "vocab.txt", "bpe.model"
LOW_RANK_MODES = ("dense", "factored")


class ExportError(ValueError):
    """A directory that is no complete, intact export this code can read; the message names the file."""


@dataclass(frozen=True)
class Source:
    """What an exported model is: its trained weights' key, the row's measured metrics and accounting, who made it."""

    training_key: str
    accounting: Accounting
    metrics: dict[str, float]            # the row's val_metric, test_metric (and losses where known)
    study: str | None = None
    trial_id: str | None = None
    code: dict[str, str] = field(default_factory=dict)   # the exporting code: package version, git commit


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`, read back and checked (`read_manifest`)."""

    task: str
    config: dict[str, Any]               # the row's flat TrialConfig: model, gates, its compression setting, data
    gates: dict[str, Any]                # gate mode, τ, τ_s, evaluation gates, and what inference computes
    source: Source
    tokenizer: dict[str, Any]            # its file, kind, size, checksum and special ids
    parameters: dict[str, dict[str, Any]]   # every parameter: shape, and whether compressed blocks make it up
    blocks: list[dict[str, Any]]         # every compressed block: param, gate, rows, cols, and its `BlockCode`
    tensors: dict[str, dict[str, Any]]   # every tensor of model.safetensors: dtype, shape, sha256
    sizes: dict[str, int]

    def trial_config(self) -> TrialConfig:
        return TrialConfig.from_flat(self.config)


def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gate_scale(g2: G2Config) -> tuple[bool, float]:
    """(binary gates, the temperature factor of the i/f pre-activations) at evaluation under `g2`."""
    gate = GateMath.of(g2, training=False)
    return gate.hard, gate.scale


def _blocks(model: nn.Module, cfg: TrialConfig):
    """Yield (param name, matrix, gate, rows, column slice or None) for every i/f block, as `compress_model` walks
    them; the columns are those its setting compresses, None for a block kept in float."""
    context = model.context_columns() if hasattr(model, "context_columns") else {}
    for prefix, module in recurrent_layers(model):
        suffixes = ("", "_reverse") if getattr(module, "bidirectional", False) else ("",)
        for k in range(module.num_layers):
            for name in ("weight_ih", "weight_hh"):
                for suffix in suffixes:
                    param = f"{prefix}.{name}_l{k}{suffix}" if prefix else f"{name}_l{k}{suffix}"
                    w = getattr(module, f"{name}_l{k}{suffix}")
                    cols = _target_columns(name, cfg.compress.targets, context.get(param))
                    for gate, rows in zip("if", gate_rows(module.hidden_size)):
                        yield param, w, gate, rows, None if cfg.compress.is_identity else cols


# --------------------------------------------------------------------------- writing

def export_model(directory: str | os.PathLike, model: nn.Module, cfg: TrialConfig, tokenizer: Any,
                 source: Source) -> Manifest:
    """Write `model` compressed as `cfg.compress` says into `directory` (new, or empty); returns its manifest.

    Args:
        model: the trained float model (`RNNLM` or `Seq2Seq`), as the sweep scored it; it is not changed.
        cfg: the row's trial config: its `compress.*` setting and `g2.eval_gate` are what is exported.
        tokenizer: LM: the `Vocabulary`; NMT: the `SentencePieceProcessor` the task ran with.
        source: the row's key, metrics and accounting; the packed model must have exactly that accounting.
    """
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory: choose a new --output")
    if buffers := [name for name, _ in model.named_buffers()]:
        raise ValueError(f"the model has buffers ({', '.join(buffers)}); an export stores parameters only")
    tensors: dict[str, Tensor] = {}
    blocks: list[dict[str, Any]] = []
    split: set[str] = set()
    gate_params = gate_bits = 0
    with torch.no_grad():
        for param, w, gate, rows, cols in _blocks(model, cfg):
            block = w[rows].detach().cpu().float()
            gate_params += block.numel()
            if cols is None:
                gate_bits += block.numel() * FLOAT_BITS
                continue
            c0, c1, _ = cols.indices(block.shape[1])
            code, packed = encode_block(block[:, c0:c1], cfg.compress)
            gate_bits += code.stored_bits + (block.numel() - code.shape[0] * code.shape[1]) * FLOAT_BITS
            tensors |= {f"{param}/{gate}/{k}": t for k, t in packed.items()}
            for side, piece in (("left", block[:, :c0]), ("right", block[:, c1:])):
                if piece.numel():
                    tensors[f"{param}/{gate}/{side}"] = piece.contiguous()
            if param not in split:
                tensors[f"{param}/go"] = w[2 * block.shape[0]:].detach().cpu().float().contiguous()
                split.add(param)
            blocks.append({"param": param, "gate": gate, "rows": [rows.start, rows.stop], "cols": [c0, c1],
                           **code.to_json()})
        parameters = {}
        for name, p in model.named_parameters():
            parameters[name] = {"shape": list(p.shape), "split": name in split}
            if name not in split:
                tensors[name] = p.detach().cpu().float().contiguous()
    if gate_params == 0:
        raise ValueError("the model has no LSTM layer to export")
    packed_accounting = account(gate_params, gate_bits, sum(p.numel() for p in model.parameters()))
    said = source.accounting
    if (packed_accounting.gate_bits, packed_accounting.model_bits) != (said.gate_bits, said.model_bits):
        raise ValueError(f"the row says gate_bits {said.gate_bits}, model_bits {said.model_bits}; packing "
                         f"{cfg.compress.method} stores {packed_accounting.gate_bits} and {packed_accounting.model_bits}"
                         ": the row was scored under another setting or by another compression code")
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing_directory(out) as staging:   # fsynced and renamed whole: a crash leaves no half export
        safetensors.torch.save_file(tensors, staging / TENSORS_FILE, metadata={"format": EXPORT_FORMAT})
        hard, scale = _gate_scale(cfg.g2)
        manifest = Manifest(
            task=cfg.task, config=cfg.to_flat(),
            gates={"gate_mode": cfg.g2.gate_mode, "tau": cfg.g2.tau, "p": cfg.g2.p, "sharpen_tau": cfg.g2.sharpen_tau,
                   "eval_gate": cfg.g2.eval_gate, "inference": "binary" if hard else "sigmoid",
                   "folded_scale": 1.0 if hard else scale},
            source=source, tokenizer=_write_tokenizer(staging, cfg.task, tokenizer), parameters=parameters,
            blocks=blocks,
            tensors={name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": _sha256(t)}
                     for name, t in sorted(tensors.items())},
            sizes={"tensors_file_bytes": (staging / TENSORS_FILE).stat().st_size,
                   "payload_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                   "accounted_bytes": said.model_bits // 8})
        (staging / MANIFEST_FILE).write_text(json.dumps(_manifest_json(manifest), indent=1, sort_keys=False))
        os.chmod(staging / TENSORS_FILE, (staging / MANIFEST_FILE).stat().st_mode)   # safetensors writes it 0600
    return manifest


def _write_tokenizer(directory: Path, task: str, tokenizer: Any) -> dict[str, Any]:
    if task == "lm":
        path = directory / VOCAB_FILE
        path.write_text("".join(f"{word}\n" for word in tokenizer.itos), encoding="utf-8")
        meta = {"kind": "words", "size": len(tokenizer.itos)}
    else:
        path = directory / BPE_FILE
        path.write_bytes(tokenizer.serialized_model_proto())
        meta = {"kind": "sentencepiece-bpe", "size": len(tokenizer), "pad_id": tokenizer.pad_id(),
                "bos_id": tokenizer.bos_id(), "eos_id": tokenizer.eos_id()}
    return {"file": path.name, **meta, "sha256": _file_sha256(path)}


def _manifest_json(m: Manifest) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION, "task": m.task, "gates": m.gates,
            "source": {**asdict(m.source), "accounting": asdict(m.source.accounting)}, "sizes": m.sizes,
            "tokenizer": m.tokenizer, "config": m.config, "parameters": m.parameters, "blocks": m.blocks,
            "tensors": m.tensors}


# --------------------------------------------------------------------------- reading

def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The export's manifest, refused (`ExportError` naming the file) when missing, unreadable or of an unknown
    format version."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing; {Path(directory)} is not a complete g2-study export")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a g2-study export manifest (format {data.get('format')!r})"
                          if isinstance(data, dict) else f"{path}: not a g2-study export manifest")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise ExportError(f"{path}: format_version {data.get('format_version')!r} is unknown to this code, which "
                          f"reads version(s) {', '.join(map(str, READABLE_VERSIONS))}; written by "
                          f"{data.get('source', {}).get('code') or 'unknown code'}")
    try:
        src = dict(data["source"])
        src["accounting"] = Accounting.from_dict(src["accounting"])
        return Manifest(task=data["task"], config=data["config"], gates=data["gates"], source=Source(**src),
                        tokenizer=data["tokenizer"], parameters=data["parameters"], blocks=data["blocks"],
                        tensors=data["tensors"], sizes=data["sizes"])
    except (KeyError, TypeError) as err:
        raise ExportError(f"{path}: incomplete manifest ({type(err).__name__}: {err})") from None


def read_tensors(directory: str | os.PathLike, manifest: Manifest) -> dict[str, Tensor]:
    """model.safetensors, checked against the manifest: the same tensor names, dtypes, shapes and checksums."""
    path = Path(directory) / TENSORS_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        tensors = safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None
    if missing := sorted(set(manifest.tensors) - set(tensors)):
        raise ExportError(f"{path}: lacks tensor(s) {', '.join(missing[:5])} that {MANIFEST_FILE} lists")
    if extra := sorted(set(tensors) - set(manifest.tensors)):
        raise ExportError(f"{path}: holds tensor(s) {', '.join(extra[:5])} that {MANIFEST_FILE} does not list")
    for name, t in tensors.items():
        want = manifest.tensors[name]
        got = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if got != {"dtype": want["dtype"], "shape": want["shape"]}:
            raise ExportError(f"{path}: tensor {name} is {got['dtype']} {got['shape']}, {MANIFEST_FILE} says "
                              f"{want['dtype']} {want['shape']}")
        if _sha256(t) != want["sha256"]:
            raise ExportError(f"{path}: tensor {name} does not match its checksum in {MANIFEST_FILE}: the file "
                              "was changed or damaged")
    return tensors


def read_tokenizer(directory: str | os.PathLike, manifest: Manifest) -> Any:
    """LM: the `Vocabulary`; NMT: the `SentencePieceProcessor`; checked against the manifest's checksum."""
    path = Path(directory) / manifest.tokenizer["file"]
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    if _file_sha256(path) != manifest.tokenizer["sha256"]:
        raise ExportError(f"{path}: does not match its checksum in {MANIFEST_FILE}")
    if manifest.task == "lm":
        from trainables.lm_data import Vocabulary

        return Vocabulary(path.read_text(encoding="utf-8").split("\n")[:-1])
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=path.read_bytes())


def _skeleton(manifest: Manifest, g2: G2Config) -> nn.Module:
    """The task's model, its parameters to be overwritten (initialised aside from the caller's random stream)."""
    cfg, tok = manifest.trial_config(), manifest.tokenizer
    with torch.random.fork_rng(devices=[]):
        if manifest.task == "lm":
            from trainables.lm import RNNLM

            model = RNNLM(cfg.lm, g2, tok["size"])
        else:
            from trainables.seq2seq import Seq2Seq

            model = Seq2Seq(cfg.nmt, g2, tok["size"], tok["pad_id"], tok["bos_id"], tok["eos_id"])
    return model


def _assemble(manifest: Manifest, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every parameter as a float32 tensor: dense ones as stored, split ones from their float parts and blocks."""
    params = {name: tensors[name] for name, entry in manifest.parameters.items() if not entry["split"]}
    for name, entry in manifest.parameters.items():
        if entry["split"]:
            w = torch.empty(entry["shape"])
            go = tensors[f"{name}/go"]
            w[w.shape[0] - go.shape[0]:] = go
            params[name] = w
    for block in manifest.blocks:
        w, (r0, r1), (c0, c1) = params[block["param"]], block["rows"], block["cols"]
        prefix = f"{block['param']}/{block['gate']}"
        w[r0:r1, c0:c1] = decode_block(BlockCode.from_json(block), _fields(tensors, prefix))
        if c0 > 0:
            w[r0:r1, :c0] = tensors[f"{prefix}/left"]
        if c1 < w.shape[1]:
            w[r0:r1, c1:] = tensors[f"{prefix}/right"]
    return params


def _fields(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: t for k, t in tensors.items() if k.startswith(f"{prefix}/")}


def _fold(model: nn.Module, scale: float) -> None:
    """σ(s·a) = σ((sW)x + sb): the i/f rows of every layer's weights and biases times `scale`, as
    `lstm_layer_plain` multiplies them at run time (the same float32 products)."""
    for module in model.modules():
        if isinstance(module, G2LSTM):
            for k in range(module.num_layers):
                for w in module.layer_weights(k):
                    s = torch.ones(w.shape[0], dtype=w.dtype)
                    s[: 2 * module.hidden_size] = scale
                    w.copy_(w * (s[:, None] if w.dim() == 2 else s))


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
         low_rank: str = "dense") -> nn.Module:
    """The exported model, in eval mode, on `device`: an `RNNLM` or a `Seq2Seq`.

    Args:
        low_rank: "dense" multiplies low-rank blocks back into their matrices (PyTorch's fused LSTM runs them);
            "factored" keeps them as their two factors, each such layer a `FactoredLSTM` (two thin GEMMs per step).
    Raises:
        ExportError naming the file, for a missing or unknown manifest or tensors that do not match it.
    """
    if low_rank not in LOW_RANK_MODES:
        raise ValueError(f"low_rank must be one of {', '.join(LOW_RANK_MODES)}, got {low_rank!r}")
    manifest = read_manifest(directory)
    tensors = read_tensors(directory, manifest)
    cfg = manifest.trial_config()
    hard, scale = _gate_scale(cfg.g2)
    # sigmoid gates with the temperature folded in are a plain LSTM: gate_mode lstm runs the fused kernel
    model = _skeleton(manifest, cfg.g2 if hard else G2Config(gate_mode="lstm"))
    params = _assemble(manifest, tensors)
    names = [name for name, _ in model.named_parameters()]
    if sorted(names) != sorted(params):
        raise ExportError(f"{Path(directory) / MANIFEST_FILE}: its parameters do not build a {manifest.task} model "
                          f"of its config (expected {len(names)}: {', '.join(sorted(set(names) ^ set(params))[:5])})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tuple(p.shape) != tuple(params[name].shape):
                raise ExportError(f"{Path(directory) / MANIFEST_FILE}: parameter {name} is "
                                  f"{list(params[name].shape)}, the config builds {list(p.shape)}")
            p.copy_(params[name])
        if not hard and scale != 1.0:
            _fold(model, scale)
        if low_rank == "factored":
            from trainables.factored_lstm import factor_layers

            factor_layers(model, manifest.blocks, tensors, 1.0 if hard else scale)
    return model.to(device).eval()


def rescore(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
            low_rank: str = "dense") -> dict[str, tuple[float, float]]:
    """Score the export on its row's splits, with its row's evaluation knobs and corpus.

    Returns {"val_metric": (measured, the row's), "test_metric": (...)}, and the losses where the row has them.
    The corpus must give the exported vocabulary (LM) or BPE model (NMT), else an `ExportError`.
    """
    from trainables.trainable import make_task

    manifest = read_manifest(directory)
    model = load(directory, device=device, low_rank=low_rank)
    task = make_task(manifest.trial_config(), torch.device(device))
    exported = read_tokenizer(directory, manifest)
    same = (task.vocab.itos == exported.itos if manifest.task == "lm"
            else task.data.sp.serialized_model_proto() == exported.serialized_model_proto())
    if not same:
        raise ExportError(f"{Path(directory) / manifest.tokenizer['file']}: the corpus "
                          f"{manifest.config['data.corpus']!r} found here gives another tokenizer; rescoring "
                          "needs the corpus the model was trained on")
    said, out = manifest.source.metrics, {}
    for split, prefix in (("valid", "val"), ("test", "test")):
        scores = task.evaluate(model, split)
        out[f"{prefix}_metric"] = (scores[task.metric], said[f"{prefix}_metric"])
        if f"{prefix}_loss" in said:
            out[f"{prefix}_loss"] = (scores["loss"], said[f"{prefix}_loss"])
    return out
