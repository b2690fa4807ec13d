"""Tests for trainables/toy.py: the generated grammar and copy/reverse corpora are deterministic and learnable."""
import math
import os
from collections import Counter

import pytest
import torch

from trainables.lm_data import batchify, lm_batch, load_lm_corpus
from trainables.parallel_data import load_parallel_text
from trainables.toy import GRAMMAR, toy_grammar_corpus, toy_parallel_corpus, toy_words


def test_toy_grammar_is_deterministic_and_learnable(tmp_path):
    a = toy_grammar_corpus(tmp_path / "a", seed=7, n_train=600, n_valid=100, n_test=50)
    b = toy_grammar_corpus(tmp_path / "b", seed=7, n_train=600, n_valid=100, n_test=50)
    c = toy_grammar_corpus(tmp_path / "c", seed=8, n_train=600, n_valid=100, n_test=50)
    for split in ("train", "valid", "test"):
        assert (a / f"{split}.txt").read_bytes() == (b / f"{split}.txt").read_bytes()
    assert (a / "train.txt").read_bytes() != (c / "train.txt").read_bytes()
    assert len((a / "valid.txt").read_text().splitlines()) == 100

    corpus = load_lm_corpus(a)
    vocab_size = len(corpus.vocab)
    assert 20 <= vocab_size <= 40
    # An add-0.1 bigram model already beats uniform by far; the grammar has structure to learn.
    train, valid = corpus.train.tolist(), corpus.valid.tolist()
    pairs, firsts = Counter(zip(train, train[1:])), Counter(train[:-1])
    bigram_ce = -sum(math.log((pairs[p, q] + 0.1) / (firsts[p] + 0.1 * vocab_size))
                     for p, q in zip(valid, valid[1:])) / (len(valid) - 1)
    assert bigram_ce < 0.65 * math.log(vocab_size)
    # Subject-verb agreement: in "det noun verb ..." the verb takes the noun's number.
    number = {w: n for n in ("sg", "pl") for k in ("noun", "vt", "vi") for w in GRAMMAR[f"{k}_{n}"]}
    simple = [s.split() for s in (a / "train.txt").read_text().splitlines()]
    simple = [s for s in simple if s[2] in number and s[2] not in GRAMMAR["noun_sg"] + GRAMMAR["noun_pl"]]
    assert len(simple) > 100 and all(number[s[1]] == number[s[2]] for s in simple)


def test_toy_grammar_lstm_oracle_beats_uniform(tmp_path):
    corpus = load_lm_corpus(toy_grammar_corpus(tmp_path, seed=0, n_train=1000, n_valid=100, n_test=10))
    vocab_size = len(corpus.vocab)
    embed, lstm, head = torch.nn.Embedding(vocab_size, 16), torch.nn.LSTM(16, 32), torch.nn.Linear(32, vocab_size)
    params = [*embed.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    source, valid = batchify(corpus.train, 16), batchify(corpus.valid, 4)
    for _ in range(3):
        for i in range(0, source.size(0) - 1, 25):
            x, y = lm_batch(source, i, 25)
            loss = torch.nn.functional.cross_entropy(head(lstm(embed(x))[0]).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        x, y = lm_batch(valid, 0, valid.size(0))
        valid_loss = torch.nn.functional.cross_entropy(head(lstm(embed(x))[0]).flatten(0, 1), y.flatten())
    assert valid_loss < 0.6 * math.log(vocab_size)            # uniform is log(31) = 3.43 nats; this reaches ~1.85


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_toy_parallel_corpus(tmp_path, task):
    kw = dict(task=task, n_train=50, n_valid=5, n_test=5, vocab=10, min_len=2, max_len=6)
    a = toy_parallel_corpus(tmp_path / "a", seed=1, **kw)
    b = toy_parallel_corpus(tmp_path / "b", seed=1, **kw)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in os.listdir(a))
    assert sorted(os.listdir(a)) == sorted(f"{s}.{e}" for s in ("train", "valid", "test") for e in ("src", "tgt"))
    pairs = load_parallel_text(a)
    assert [len(pairs[s]) for s in ("train", "valid", "test")] == [50, 5, 5]
    words = set()
    for src, tgt in pairs["train"]:
        assert 2 <= len(src.split()) <= 6
        assert tgt.split() == (src.split() if task == "copy" else src.split()[::-1])
        words.update(src.split())
    assert words <= set(toy_words(10))
    with pytest.raises(ValueError, match="task"):
        toy_parallel_corpus(tmp_path / "c", seed=1, task="sort")
