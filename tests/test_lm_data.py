"""Tests for trainables/lm_data.py: vocabulary, PTB/WikiText streams and AWD-LSTM's time-major batches."""
from pathlib import Path

import pytest
import torch

from trainables.lm_data import EOS, UNK, batchify, lm_batch, load_lm_corpus

from conftest import real_corpus


def write_lm(folder: Path, train: str, valid: str, test: str, names: str = "{split}.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / names.format(split=split)).write_text(text, encoding="utf-8")
    return folder


def test_vocabulary_eos_and_unk_handling(tmp_path):
    corpus = load_lm_corpus(write_lm(tmp_path, "a b\n\nb c a\n", "c a\n", "b\n"))
    # Ids in order of first appearance; the empty line still contributes an <eos>.
    assert corpus.vocab.itos == ["a", "b", EOS, "c"]
    assert corpus.train.tolist() == [0, 1, 2, 2, 1, 3, 0, 2]
    assert corpus.vocab.decode(corpus.train[:3]) == ["a", "b", EOS]
    assert len(corpus.vocab) == 4 and corpus.vocab.unk_id is None
    assert corpus.vocab.encode(["c", EOS]).tolist() == [3, 2]
    with pytest.raises(ValueError, match="'zebra' is not in the vocabulary"):
        corpus.vocab.encode(["a", "zebra"])
    with pytest.raises(ValueError, match=r"valid\.txt: word 'c' is not in the vocabulary, which has no <unk>"):
        load_lm_corpus(write_lm(tmp_path, "a b\n", "a c\n", "a\n"))

    corpus = load_lm_corpus(write_lm(tmp_path / "unk", "a <unk> b\n", "a q\n", "zebra b\n"))
    unk = corpus.vocab.unk_id
    assert unk == corpus.vocab.stoi[UNK]
    assert corpus.valid.tolist() == [0, unk, corpus.vocab.eos_id]
    assert corpus.test.tolist() == [unk, 2, corpus.vocab.eos_id]
    assert corpus.train.dtype == torch.long and corpus.train.dim() == 1


def test_wikitext_file_names_and_missing_splits(tmp_path):
    corpus = load_lm_corpus(write_lm(tmp_path / "w", " = T = \n\nx y\n", "x\n", "y\n", "wiki.{split}.tokens"))
    assert corpus.train.numel() == 4 + 1 + 3          # "= T =" is three words
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "train.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="valid.txt"):
        load_lm_corpus(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="not an LM corpus"):
        load_lm_corpus(tmp_path)


def test_batchify_is_time_major_and_trims():
    ids = torch.arange(11)
    source = batchify(ids, 3)                       # 11 // 3 = 3 steps, token 9 and 10 dropped
    assert source.shape == (3, 3)
    assert source[:, 0].tolist() == [0, 1, 2] and source[:, 2].tolist() == [6, 7, 8]
    assert source.is_contiguous()
    with pytest.raises(ValueError, match="too few"):
        batchify(torch.arange(3), 2)


def test_lm_batch_shifts_targets_and_shortens_last_window():
    source = batchify(torch.arange(20), 2)          # (10, 2)
    x, y = lm_batch(source, 0, 4)
    assert x.shape == y.shape == (4, 2)
    assert torch.equal(y, x + 1)                    # next word in each column
    x, y = lm_batch(source, 8, 4)                   # L = min(4, 10 - 1 - 8) = 1
    assert x.shape == (1, 2) and y[0].tolist() == [9, 19]
    with pytest.raises(IndexError):
        lm_batch(source, 9, 4)


# --------------------------------------------------------------------------- real corpora (skipped when absent)

def test_real_ptb_counts():
    corpus = load_lm_corpus(real_corpus("ptb"))
    assert len(corpus.vocab) == 10000
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929589, 73760, 82430)
    assert corpus.vocab.unk_id is not None
    assert (batchify(corpus.train, 20).shape) == (929589 // 20, 20)


def test_real_wikitext2_counts():
    corpus = load_lm_corpus(real_corpus("wikitext-2"))
    assert len(corpus.vocab) == 33278
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (2088628, 217646, 245569)
