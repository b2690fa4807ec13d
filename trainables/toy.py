"""Generated corpora for tests and smoke runs: a small agreement grammar (LM) and copy/reverse translation.

Both are deterministic functions of their seed, written as the folders the real corpora use (`train.txt`, ...
for `load_lm_corpus`; `train.src`, `train.tgt`, ... for `load_parallel_text`). `generate_once` writes one where
concurrent trials may ask for it at the same time.
"""
from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from trainables.corpora import SPLITS
from trainables.durable import FileNotWrittenError, writing_directory

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
    aside and rename into place (`trainables/durable.py`), so no reader ever sees a half-written corpus."""
    target = Path(target)
    if not target.exists():
        try:
            with writing_directory(target) as staging:
                write(staging)
        except FileNotWrittenError as err:
            # another trial got there first (the rename found its corpus); it is the same one (same seed)
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
    return target
