"""Parallel text for translation: line-aligned pairs, a joint BPE (sentencepiece), and padded time-major batches.

A translation batch is time-major and padded: `src (S, B)`, `tgt_in = [bos] + tgt` and `tgt_out = tgt + [eos]`,
both `(T, B)`, with boolean masks that are True at real tokens. BPE ids follow one convention everywhere:
pad 0, unk 1, bos 2, eos 3.
"""
from __future__ import annotations

import hashlib
import io
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import sentencepiece as spm
import torch
from torch import Tensor

from trainables.corpora import SPLITS, read_lines
from trainables.durable import write_bytes

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BPE_FORMAT = "bpe-v1"    # bump when the trainer options below change, so stale caches are not reused

Example = tuple[Tensor, Tensor]    # (src ids (S,), tgt ids (T,)), no bos/eos


def load_parallel_text(path: Path, src_ext: str = "src", tgt_ext: str = "tgt") -> dict[str, list[tuple[str, str]]]:
    """Line-aligned `(src, tgt)` pairs per split from `{train,valid,test}.{src_ext,tgt_ext}`."""
    path = Path(path)
    files = {(split, ext): path / f"{split}.{ext}" for split in SPLITS for ext in (src_ext, tgt_ext)}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"parallel corpus {path} lacks {', '.join(missing)}")
    pairs = {}
    for split in SPLITS:
        src = [line.strip() for line in read_lines(files[split, src_ext])]
        tgt = [line.strip() for line in read_lines(files[split, tgt_ext])]
        if len(src) != len(tgt):
            raise ValueError(f"{files[split, src_ext]} has {len(src)} lines but "
                             f"{files[split, tgt_ext]} has {len(tgt)}; they must be line-aligned")
        pairs[split] = list(zip(src, tgt))
    log.info("parallel corpus %s: %s pairs", path, "/".join(str(len(pairs[s])) for s in SPLITS))
    return pairs


def train_bpe(train_pairs: Sequence[tuple[str, str]], vocab_size: int, cache_dir: Path,
              seed: int = 0) -> spm.SentencePieceProcessor:
    """A joint source+target BPE model, trained in memory and cached as `<cache_dir>/bpe-<hash>.model`.

    The hash covers the training text and the vocabulary size, so trials sharing a cache directory
    train the model once. On a corpus too small for `vocab_size`, the vocabulary is allowed to be smaller.
    BPE uses every sentence (no sampling), so the model does not depend on `seed`; it is set for safety.
    """
    sentences = [s for pair in train_pairs for s in pair]
    digest = hashlib.sha256()
    for s in sentences:
        digest.update(s.encode("utf-8") + b"\n")
    key = hashlib.sha256(f"{BPE_FORMAT}:{digest.hexdigest()}:{vocab_size}".encode()).hexdigest()[:16]
    model_path = Path(cache_dir) / f"bpe-{key}.model"
    if model_path.exists():
        log.info("BPE: reusing %s", model_path)
        return spm.SentencePieceProcessor(model_file=str(model_path))
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0,    # de/en alphabets are small: keep every character rather than map rare ones to unk
        hard_vocab_limit=False, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, minloglevel=2,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(model_path, buffer.getvalue())     # replaced whole: concurrent trials never read half a model
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    log.info("BPE: trained %d pieces (asked %d) on %d sentences -> %s",
             len(sp), vocab_size, len(sentences), model_path)
    return sp


def encode_parallel(pairs: Sequence[tuple[str, str]], sp: spm.SentencePieceProcessor,
                    max_len: int | None = None) -> list[Example]:
    """BPE-encode pairs to `(src (S,), tgt (T,))`; with `max_len`, drop pairs empty or longer on either side.

    Pass `max_len` for train only: valid/test must keep every sentence so that BLEU covers the whole set.
    """
    src_ids = sp.encode([s for s, _ in pairs])
    tgt_ids = sp.encode([t for _, t in pairs])
    examples = []
    for s, t in zip(src_ids, tgt_ids):
        if max_len is not None and not (0 < len(s) <= max_len and 0 < len(t) <= max_len):
            continue
        examples.append((torch.tensor(s, dtype=torch.long), torch.tensor(t, dtype=torch.long)))
    if len(examples) < len(pairs):
        log.info("encode_parallel: dropped %d of %d pairs (empty or over %s tokens)",
                 len(pairs) - len(examples), len(pairs), max_len)
    return examples


@dataclass(frozen=True)
class ParallelData:
    """A BPE-encoded parallel corpus; `text` keeps the raw pairs (valid/test align with their examples)."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    sp: spm.SentencePieceProcessor
    text: dict[str, list[tuple[str, str]]]
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    @property
    def vocab_size(self) -> int:
        return len(self.sp)


def load_parallel_data(path: Path, *, src_ext: str, tgt_ext: str, vocab_size: int, cache_dir: Path,
                       max_len: int | None = None, seed: int = 0) -> ParallelData:
    """Read, learn (or reuse) the joint BPE on train, and encode all splits; only train is length-filtered."""
    text = load_parallel_text(path, src_ext, tgt_ext)
    sp = train_bpe(text["train"], vocab_size, cache_dir, seed=seed)
    return ParallelData(
        train=encode_parallel(text["train"], sp, max_len),
        valid=encode_parallel(text["valid"], sp),
        test=encode_parallel(text["test"], sp),
        sp=sp, text=text, pad_id=sp.pad_id(), bos_id=sp.bos_id(), eos_id=sp.eos_id(),
    )


@dataclass(frozen=True)
class Seq2SeqBatch:
    """A padded, time-major batch, columns sorted by decreasing source length (for packed sequences)."""

    src: Tensor           # (S, B) source ids, pad after the end
    src_lengths: Tensor   # (B,)
    src_mask: Tensor      # (S, B) bool, True at real tokens
    tgt_in: Tensor        # (T, B) [bos] + tgt, T = max target length + 1
    tgt_out: Tensor       # (T, B) tgt + [eos]
    tgt_mask: Tensor      # (T, B) bool, True at real tokens of tgt_out
    index: Tensor         # (B,) position of each column's example in the list given to make_batches

    @property
    def batch_size(self) -> int:
        return self.src.size(1)

    @property
    def num_tgt_tokens(self) -> int:
        return int(self.tgt_mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Seq2SeqBatch:
        # Lengths and index stay where they are: pack_padded_sequence wants CPU lengths.
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if f.name not in ("src_lengths", "index")}
        return replace(self, **moved)


def collate(examples: Sequence[Example], indices: Sequence[int], pad_id: int = PAD_ID,
            bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> Seq2SeqBatch:
    """Pad the examples at `indices` into one batch, longest source first."""
    indices = sorted(indices, key=lambda i: -examples[i][0].numel())    # stable: ties keep their order
    srcs = [examples[i][0] for i in indices]
    tgts = [examples[i][1] for i in indices]
    batch = len(indices)
    src_lengths = torch.tensor([s.numel() for s in srcs], dtype=torch.long)     # (B,)
    tgt_lengths = torch.tensor([t.numel() + 1 for t in tgts], dtype=torch.long)  # (B,), +1 for bos/eos
    src = torch.full((max(int(src_lengths.max()), 1), batch), pad_id, dtype=torch.long)   # (S, B)
    tgt_in = torch.full((int(tgt_lengths.max()), batch), pad_id, dtype=torch.long)       # (T, B)
    tgt_out = tgt_in.clone()                                                             # (T, B)
    for j, (s, t) in enumerate(zip(srcs, tgts)):
        src[: s.numel(), j] = s
        tgt_in[0, j] = bos_id
        tgt_in[1 : t.numel() + 1, j] = t
        tgt_out[: t.numel(), j] = t
        tgt_out[t.numel(), j] = eos_id
    return Seq2SeqBatch(
        src=src, src_lengths=src_lengths,
        src_mask=torch.arange(src.size(0))[:, None] < src_lengths[None, :],          # (S, B)
        tgt_in=tgt_in, tgt_out=tgt_out,
        tgt_mask=torch.arange(tgt_in.size(0))[:, None] < tgt_lengths[None, :],       # (T, B)
        index=torch.tensor(indices, dtype=torch.long),
    )


def make_batches(examples: Sequence[Example], batch_size: int, *, shuffle: bool, seed: int = 0,
                 bucket: bool = True, chunk_batches: int = 100, pad_id: int = PAD_ID, bos_id: int = BOS_ID,
                 eos_id: int = EOS_ID) -> list[Seq2SeqBatch]:
    """Split examples into padded batches; every example lands in exactly one batch.

    With `bucket`, examples are sorted by source length so a batch holds similar lengths and little padding:
    the whole list when not shuffling (evaluation), else within random chunks of `chunk_batches` batches,
    after which the batches themselves are shuffled, so training order stays random from epoch to epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        chunk = batch_size * chunk_batches if shuffle else max(len(order), 1)
        def by_length(i: int) -> tuple[int, int]:
            return -examples[i][0].numel(), -examples[i][1].numel()
        order = [i for start in range(0, len(order), chunk) for i in sorted(order[start:start + chunk], key=by_length)]
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(groups)
    return [collate(examples, g, pad_id, bos_id, eos_id) for g in groups]


def spread(items: Sequence, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when `count` is 0 or at least their number).

    Evaluation batches are sorted by length, so a capped evaluation that took the first ones would score only
    the longest sentences; an even spread covers short and long alike.
    """
    if count <= 0 or count >= len(items):
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


def decode_bpe(sp: spm.SentencePieceProcessor, ids: Sequence[int] | Tensor) -> str:
    """Detokenised text of a generated id sequence: stop at the first eos, drop pad and bos."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    out = []
    for i in ids:
        if i == sp.eos_id():
            break
        if i not in (sp.pad_id(), sp.bos_id()):
            out.append(i)
    return sp.decode(out)
