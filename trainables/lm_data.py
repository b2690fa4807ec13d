"""Word-level language-model corpora (PTB, WikiText-2): vocabulary, id streams and AWD-LSTM's batches.

A language-model stream is one 1-D LongTensor of word ids with `<eos>` closing every line; `batchify` folds it
time-major into `(T, B)` columns (AWD-LSTM) and `lm_batch` cuts `(L, B)` windows from it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainables.corpora import SPLITS, read_lines

log = logging.getLogger(__name__)

EOS = "<eos>"
UNK = "<unk>"
LM_LAYOUTS = ("{split}.txt", "wiki.{split}.tokens")    # PTB (Mikolov), WikiText-2


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
    def from_lines(cls, lines: Iterable[str]) -> Vocabulary:
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
