"""Corpora for the study: where they live, word-level LM streams, BPE parallel text, and toy corpora for tests.

Layouts. A language-model stream is one 1-D LongTensor of word ids with `<eos>` closing every line;
`batchify` folds it time-major into `(T, B)` columns (AWD-LSTM) and `lm_batch` cuts `(L, B)` windows from it.
A translation batch is time-major and padded: `src (S, B)`, `tgt_in = [bos] + tgt` and `tgt_out = tgt + [eos]`,
both `(T, B)`, with boolean masks that are True at real tokens. BPE ids follow one convention everywhere:
pad 0, unk 1, bos 2, eos 3.

Corpora are never copied into the repository (DESIGN §4): they are read from `$G2_DATA_DIR` or
`../shared/data` beside the repository root, and the BPE model is cached wherever the caller says.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import sentencepiece as spm
import torch
from torch import Tensor

from trainables.checkpoint import written_aside

log = logging.getLogger(__name__)

ENV_VAR = "G2_DATA_DIR"
EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
LM_LAYOUTS = ("{split}.txt", "wiki.{split}.tokens")    # PTB (Mikolov), WikiText-2
BPE_FORMAT = "bpe-v1"    # bump when the trainer options below change, so stale caches are not reused

Example = tuple[Tensor, Tensor]    # (src ids (S,), tgt ids (T,)), no bos/eos


# --------------------------------------------------------------------------- corpus location

def default_data_dir() -> Path:
    """`<repo root>/../shared/data`, where the repo root is the parent of the `trainables` package."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_root(explicit: str | None = None) -> Path:
    """The corpus folder: `explicit` if given, else `$G2_DATA_DIR`, else `../shared/data` beside the repo."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else default_data_dir()


def cache_root(cache_dir: str = "") -> Path:
    """Where generated corpora and BPE models are cached: `data.cache_dir`, else ~/.cache/g2-study."""
    return Path(cache_dir or Path.home() / ".cache" / "g2-study").expanduser()


def find_corpus(name: str, data_dir: str | None = None) -> Path:
    """Resolve a corpus name (`ptb`, `wikitext-2`, `multi30k`) or an existing path to its directory.

    Looks in `data_dir` (if given), `$G2_DATA_DIR` (if set), `../shared/data`, and finally `name` as a path,
    taking the first that exists, so a cluster can point at shared storage without editing configs.
    """
    env = os.environ.get(ENV_VAR)
    places: list[tuple[Path, str]] = []
    if data_dir:
        places.append((Path(data_dir).expanduser() / name, "data_dir"))
    if env:
        places.append((Path(env).expanduser() / name, f"${ENV_VAR}={env}"))
    places.append((default_data_dir() / name, "../shared/data beside the repository"))
    places.append((Path(name).expanduser(), "as a path"))
    for path, where in places:
        if path.exists():
            log.info("corpus %s: %s (%s)", name, path, where)
            return path
    looked = "; ".join(f"{path} ({where})" for path, where in places[:-1])
    raise FileNotFoundError(
        f"corpus {name!r} not found. ${ENV_VAR} is {env or 'unset'}; looked in: {looked}; "
        f"and {name!r} is not an existing path. Set ${ENV_VAR} to a folder containing {name}/, or pass data_dir."
    )


# --------------------------------------------------------------------------- word-level language modelling

def read_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only (WikiText holds other Unicode line breaks inside lines)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def tokenize(line: str) -> list[str]:
    """Whitespace words plus `<eos>`: every line, empty ones included, ends a sentence (AWD-LSTM counting)."""
    return line.split() + [EOS]


class Vocabulary:
    """Word ↔ id map in order of first appearance; built from the training split only."""

    def __init__(self, words: Iterable[str] = ()):
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for word in words:
            self.add(word)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> "Vocabulary":
        return cls(word for line in lines for word in tokenize(line))

    def add(self, word: str) -> int:
        if word not in self.stoi:
            self.stoi[word] = len(self.itos)
            self.itos.append(word)
        return self.stoi[word]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    @property
    def unk_id(self) -> int | None:
        return self.stoi.get(UNK)

    def encode(self, tokens: Iterable[str]) -> Tensor:
        """Ids `(N,)`; a word not in the vocabulary becomes `<unk>`, or raises if there is no `<unk>`."""
        stoi, unk = self.stoi, self.unk_id
        try:
            ids = [stoi[w] for w in tokens] if unk is None else [stoi.get(w, unk) for w in tokens]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the vocabulary, which has no {UNK}") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | Tensor) -> list[str]:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return [self.itos[i] for i in ids]


@dataclass(frozen=True)
class LMCorpus:
    """A word-level corpus as three id streams `(N,)` sharing the train vocabulary."""

    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor


def lm_files(path: Path) -> dict[str, Path]:
    """The split files of a PTB-style (`train.txt`) or WikiText-style (`wiki.train.tokens`) folder."""
    for layout in LM_LAYOUTS:
        files = {split: path / layout.format(split=split) for split in SPLITS}
        if files["train"].exists():
            missing = [str(f) for f in files.values() if not f.exists()]
            if missing:
                raise FileNotFoundError(f"LM corpus {path} lacks {', '.join(missing)}")
            return files
    expected = " or ".join(layout.format(split="{train,valid,test}") for layout in LM_LAYOUTS)
    raise FileNotFoundError(f"{path} is not an LM corpus: expected {expected}")


def load_lm_corpus(path: Path) -> LMCorpus:
    """Read a PTB or WikiText-2 folder; valid/test words unseen in train map to `<unk>` (or raise)."""
    files = lm_files(Path(path))
    lines = {split: read_lines(f) for split, f in files.items()}
    vocab = Vocabulary.from_lines(lines["train"])
    streams = {}
    for split, split_lines in lines.items():
        tokens = [w for line in split_lines for w in tokenize(line)]
        try:
            streams[split] = vocab.encode(tokens)    # (N,)
        except ValueError as e:
            raise ValueError(f"{files[split]}: {e}") from None
    log.info("LM corpus %s: vocab %d, tokens %s", path, len(vocab),
             "/".join(str(streams[s].numel()) for s in SPLITS))
    return LMCorpus(vocab, streams["train"], streams["valid"], streams["test"])


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Fold a stream `(N,)` into `batch_size` contiguous columns `(T, B)`, dropping the last N mod B tokens."""
    steps = ids.numel() // batch_size
    if steps < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for batch size {batch_size}")
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()    # (T, B)


def lm_batch(source: Tensor, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-word targets, each `(L, B)` with L = min(seq_len, T - 1 - i)."""
    length = min(seq_len, source.size(0) - 1 - i)
    if length < 1:
        raise IndexError(f"window start {i} leaves no target in a stream of {source.size(0)} steps")
    return source[i : i + length], source[i + 1 : i + 1 + length]    # (L, B), (L, B)


# --------------------------------------------------------------------------- generated corpora for tests

GRAMMAR = {
    "det_sg": ("the", "a", "every"), "det_pl": ("the", "some", "many"),
    "noun_sg": ("cat", "dog", "bird", "child"), "noun_pl": ("cats", "dogs", "birds", "children"),
    "adj": ("big", "small", "young"), "prep": ("near", "with"),
    "vt_sg": ("sees", "likes", "chases"), "vt_pl": ("see", "like", "chase"),
    "vi_sg": ("sleeps", "runs"), "vi_pl": ("sleep", "run"),
}


def _noun_phrase(rng: random.Random, plural: bool, depth: int) -> list[str]:
    num = "pl" if plural else "sg"
    words = [rng.choice(GRAMMAR[f"det_{num}"])]
    if rng.random() < 0.3:
        words.append(rng.choice(GRAMMAR["adj"]))
    words.append(rng.choice(GRAMMAR[f"noun_{num}"]))
    if depth < 2:
        r = rng.random()
        if r < 0.15:    # a PP between subject and verb: agreement must be carried across it
            words += [rng.choice(GRAMMAR["prep"])] + _noun_phrase(rng, rng.random() < 0.5, depth + 1)
        elif r < 0.25:
            words += ["that"] + _verb_phrase(rng, plural, depth + 1)
    return words


def _verb_phrase(rng: random.Random, plural: bool, depth: int) -> list[str]:
    num = "pl" if plural else "sg"
    if rng.random() < 0.6:
        return [rng.choice(GRAMMAR[f"vt_{num}"])] + _noun_phrase(rng, rng.random() < 0.5, depth + 1)
    return [rng.choice(GRAMMAR[f"vi_{num}"])] + (["quietly"] if rng.random() < 0.3 else [])


def grammar_sentence(rng: random.Random) -> list[str]:
    """One sentence of a small agreement grammar (31 words with `<eos>`): learnable, far below uniform entropy."""
    plural = rng.random() < 0.5
    return _noun_phrase(rng, plural, 0) + _verb_phrase(rng, plural, 0)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def toy_grammar_corpus(out_dir: Path, seed: int, n_train: int = 2000, n_valid: int = 200,
                       n_test: int = 200) -> Path:
    """Write `train/valid/test.txt` of grammar sentences (a PTB-style folder for `load_lm_corpus`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in zip(SPLITS, (n_train, n_valid, n_test)):
        _write_lines(out_dir / f"{split}.txt", (" ".join(grammar_sentence(rng)) for _ in range(n)))
    return out_dir


def toy_words(vocab: int) -> list[str]:
    """`vocab` distinct pronounceable words (ba, be, ..., baba, ...), so BPE has real merges to learn."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = syllables + [a + b for a in syllables for b in syllables]
    if not 1 <= vocab <= len(words):
        raise ValueError(f"vocab must be in [1, {len(words)}], got {vocab}")
    return words[:vocab]


def toy_parallel_corpus(out_dir: Path, seed: int, task: Literal["copy", "reverse"] = "copy",
                        n_train: int = 1000, n_valid: int = 100, n_test: int = 100, vocab: int = 16,
                        min_len: int = 3, max_len: int = 8) -> Path:
    """Write `{train,valid,test}.{src,tgt}` of random word sequences and their copy or reversal."""
    if task not in ("copy", "reverse"):
        raise ValueError(f"task must be 'copy' or 'reverse', got {task!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    words = toy_words(vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in zip(SPLITS, (n_train, n_valid, n_test)):
        src = [[rng.choice(words) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]
        tgt = src if task == "copy" else [s[::-1] for s in src]
        _write_lines(out_dir / f"{split}.src", (" ".join(s) for s in src))
        _write_lines(out_dir / f"{split}.tgt", (" ".join(t) for t in tgt))
    return out_dir


def generate_once(target: Path, write: Callable[[Path], Path]) -> Path:
    """A generated corpus at `target`, written by `write(dir)` only if absent. Concurrent trials each write
    aside and rename into place, so no reader ever sees a half-written corpus."""
    target = Path(target)
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:        # another trial got there first; its corpus is the same (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- translation

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
    with written_aside(model_path) as tmp:     # concurrent trials never read a half-written model
        tmp.write_bytes(buffer.getvalue())
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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Seq2SeqBatch":
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
