"""Tests for trainables/data.py: corpus lookup, LM streams, toy corpora, BPE and seq2seq batching."""
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from trainables import data
from trainables.data import (
    BOS_ID, EOS, EOS_ID, PAD_ID, UNK, batchify, decode_bpe, encode_parallel, find_corpus,
    lm_batch, load_lm_corpus, load_parallel_data, load_parallel_text, make_batches, toy_grammar_corpus,
    toy_parallel_corpus, train_bpe,
)


def write_lm(folder: Path, train: str, valid: str, test: str, names: str = "{split}.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / names.format(split=split)).write_text(text, encoding="utf-8")
    return folder


def real_corpus(name: str) -> Path:
    try:
        return find_corpus(name)
    except FileNotFoundError:
        pytest.skip(f"real corpus {name} not present (set $G2_DATA_DIR or provide ../shared/data)")


@pytest.fixture(scope="module")
def toy_bpe(tmp_path_factory):
    """A reverse-task corpus and its BPE model, shared by the translation tests."""
    root = tmp_path_factory.mktemp("toy")
    corpus = toy_parallel_corpus(root / "reverse", seed=3, task="reverse", n_train=400, n_valid=40, n_test=40)
    pairs = load_parallel_text(corpus)
    sp = train_bpe(pairs["train"], 120, root / "cache")
    return corpus, pairs, sp, root / "cache"


# --------------------------------------------------------------------------- corpus location

def test_find_corpus_prefers_data_dir_then_env(tmp_path, monkeypatch):
    (tmp_path / "env" / "ptb").mkdir(parents=True)
    (tmp_path / "explicit" / "ptb").mkdir(parents=True)
    monkeypatch.setenv("G2_DATA_DIR", str(tmp_path / "env"))
    assert find_corpus("ptb") == tmp_path / "env" / "ptb"
    assert find_corpus("ptb", data_dir=str(tmp_path / "explicit")) == tmp_path / "explicit" / "ptb"
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_find_corpus_accepts_existing_path(tmp_path, monkeypatch):
    monkeypatch.delenv("G2_DATA_DIR", raising=False)
    corpus = toy_grammar_corpus(tmp_path / "mine", seed=0, n_train=5, n_valid=2, n_test=2)
    assert find_corpus(str(corpus)) == corpus
    monkeypatch.chdir(tmp_path)
    assert find_corpus("mine").resolve() == corpus.resolve()


@pytest.mark.parametrize("env", [None, "set"])
def test_find_corpus_error_names_both_places(tmp_path, monkeypatch, env):
    if env:
        monkeypatch.setenv("G2_DATA_DIR", str(tmp_path / "nowhere"))
    else:
        monkeypatch.delenv("G2_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        find_corpus("no-such-corpus")
    msg = str(info.value)
    assert "'no-such-corpus'" in msg
    assert (f"G2_DATA_DIR is {tmp_path / 'nowhere'}" if env else "G2_DATA_DIR is unset") in msg
    assert str(data.default_data_dir() / "no-such-corpus") in msg
    assert data.default_data_dir() == Path(data.__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- language modelling

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


# --------------------------------------------------------------------------- generated corpora

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
    number = {w: n for n in ("sg", "pl") for k in ("noun", "vt", "vi") for w in data.GRAMMAR[f"{k}_{n}"]}
    simple = [s.split() for s in (a / "train.txt").read_text().splitlines()]
    simple = [s for s in simple if s[2] in number and s[2] not in data.GRAMMAR["noun_sg"] + data.GRAMMAR["noun_pl"]]
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
    assert words <= set(data.toy_words(10))
    with pytest.raises(ValueError, match="task"):
        toy_parallel_corpus(tmp_path / "c", seed=1, task="sort")


# --------------------------------------------------------------------------- translation

def test_parallel_reader_rejects_bad_folders(tmp_path):
    corpus = toy_parallel_corpus(tmp_path / "c", seed=0, n_train=10, n_valid=3, n_test=3)
    (corpus / "valid.tgt").write_text("only one line\n")
    with pytest.raises(ValueError, match=r"valid\.src has 3 lines but .*valid\.tgt has 1"):
        load_parallel_text(corpus)
    (corpus / "test.src").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.src"):
        load_parallel_text(corpus)
    with pytest.raises(FileNotFoundError, match=r"train\.de"):
        load_parallel_text(corpus, "de", "en")


def test_bpe_is_joint_cached_and_round_trips(toy_bpe):
    _, pairs, sp, cache = toy_bpe
    (model,) = cache.glob("bpe-*.model")
    mtime, pieces = model.stat().st_mtime_ns, [sp.id_to_piece(i) for i in range(len(sp))]
    again = train_bpe(pairs["train"], 120, cache)
    assert model.stat().st_mtime_ns == mtime and list(cache.iterdir()) == [model]
    assert [again.id_to_piece(i) for i in range(len(again))] == pieces
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, 1, BOS_ID, EOS_ID)
    assert 20 < len(sp) <= 120                      # merges were learned
    for src, tgt in pairs["valid"]:
        assert sp.decode(sp.encode(src)) == src and sp.decode(sp.encode(tgt)) == tgt
    # Another vocabulary size is another cache entry; a tiny corpus still trains with a too-large size.
    big = train_bpe(pairs["train"][:20], 5000, cache)
    assert len(list(cache.glob("bpe-*.model"))) == 2 and len(big) < 5000


def test_encode_parallel_filters_train_only(toy_bpe):
    _, pairs, sp, _ = toy_bpe
    everything = encode_parallel(pairs["train"], sp)
    assert len(everything) == len(pairs["train"])
    src, tgt = everything[0]
    assert src.dtype == tgt.dtype == torch.long and src.dim() == 1
    assert sp.decode(src.tolist()) == pairs["train"][0][0]
    limit = sorted(max(s.numel(), t.numel()) for s, t in everything)[len(everything) // 2]
    kept = encode_parallel(pairs["train"], sp, max_len=limit)
    assert 0 < len(kept) < len(everything)
    assert all(s.numel() <= limit and t.numel() <= limit for s, t in kept)


def examples_of_lengths(lengths):
    return [(torch.arange(4, 4 + n), torch.arange(10, 10 + m)) for n, m in lengths]


def test_collate_pads_and_masks():
    examples = examples_of_lengths([(2, 3), (4, 1), (3, 2)])
    (batch,) = make_batches(examples, 8, shuffle=False)
    assert batch.src_lengths.tolist() == [4, 3, 2] and batch.index.tolist() == [1, 2, 0]
    assert batch.src.shape == batch.src_mask.shape == (4, 3)
    assert batch.tgt_in.shape == batch.tgt_out.shape == batch.tgt_mask.shape == (4, 3)
    assert batch.src_mask.dtype == torch.bool
    assert batch.src[:, 2].tolist() == [4, 5, PAD_ID, PAD_ID]
    assert batch.src_mask[:, 2].tolist() == [True, True, False, False]
    assert batch.tgt_in[:, 0].tolist() == [BOS_ID, 10, PAD_ID, PAD_ID]     # example 1: tgt [10]
    assert batch.tgt_out[:, 0].tolist() == [10, EOS_ID, PAD_ID, PAD_ID]
    assert batch.tgt_mask[:, 0].tolist() == [True, True, False, False]
    assert batch.tgt_out[:, 2].tolist() == [10, 11, 12, EOS_ID]            # example 0: tgt [10, 11, 12]
    assert torch.equal(batch.src_mask, batch.src != PAD_ID)
    assert batch.num_tgt_tokens == 2 + 3 + 4 and batch.batch_size == 3
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_in, batch.tgt_in) and moved.src_lengths.device.type == "cpu"


@pytest.mark.parametrize("shuffle", [False, True])
def test_make_batches_cover_every_example_once(shuffle):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (503, 2), generator=gen).tolist()
    examples = examples_of_lengths(lengths)
    batches = make_batches(examples, 16, shuffle=shuffle, seed=5, chunk_batches=4)
    seen = torch.cat([b.index for b in batches]).tolist()
    assert sorted(seen) == list(range(len(examples)))
    for b in batches:
        assert b.batch_size <= 16
        assert (b.src_lengths[:-1] >= b.src_lengths[1:]).all()              # longest first, for packing
        for j, i in enumerate(b.index.tolist()):
            src, tgt = examples[i]
            assert torch.equal(b.src[: src.numel(), j], src)
            assert torch.equal(b.tgt_out[: tgt.numel(), j], tgt)
    # Bucketing keeps lengths in a batch close, so padding is a small share of the source tensor.
    bucketed = sum((~b.src_mask).sum() for b in batches) / sum(b.src_mask.numel() for b in batches)
    plain = make_batches(examples, 16, shuffle=shuffle, seed=5, bucket=False)
    unbucketed = sum((~b.src_mask).sum() for b in plain) / sum(b.src_mask.numel() for b in plain)
    assert bucketed < 0.5 * unbucketed


def test_make_batches_seeded_shuffle():
    examples = examples_of_lengths([(n % 7 + 1, 2) for n in range(200)])
    order = lambda seed: torch.cat([b.index for b in make_batches(examples, 8, shuffle=True, seed=seed)]).tolist()
    assert order(1) == order(1) and order(1) != order(2)
    fixed = [b.index.tolist() for b in make_batches(examples, 8, shuffle=False)]
    assert fixed == [b.index.tolist() for b in make_batches(examples, 8, shuffle=False)]


def test_decode_bpe_stops_at_eos(toy_bpe):
    _, pairs, sp, _ = toy_bpe
    text = pairs["test"][0][1]
    ids = sp.encode(text)
    generated = torch.tensor([BOS_ID] + ids + [EOS_ID] + ids[:2] + [PAD_ID, PAD_ID])
    assert decode_bpe(sp, generated) == text
    assert decode_bpe(sp, [PAD_ID] + ids) == text
    assert decode_bpe(sp, [EOS_ID] + ids) == ""


def test_load_parallel_data_end_to_end(toy_bpe, tmp_path):
    corpus, pairs, sp, cache = toy_bpe
    parallel = load_parallel_data(corpus, src_ext="src", tgt_ext="tgt", vocab_size=120, cache_dir=cache, max_len=6)
    assert parallel.vocab_size == len(sp) and (parallel.pad_id, parallel.bos_id, parallel.eos_id) == (0, 2, 3)
    assert len(parallel.valid) == len(pairs["valid"]) and len(parallel.train) <= len(pairs["train"])
    for (src, tgt), (src_text, tgt_text) in zip(parallel.test, parallel.text["test"]):
        assert decode_bpe(parallel.sp, src) == src_text and decode_bpe(parallel.sp, tgt) == tgt_text


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


def test_real_multi30k_counts_and_bpe(tmp_path):
    pairs = load_parallel_text(real_corpus("multi30k"), "de", "en")
    assert [len(pairs[s]) for s in ("train", "valid", "test")] == [29000, 1014, 1000]
    assert pairs["train"][0][1].startswith("Two young")
    sp = train_bpe(pairs["train"], 8000, tmp_path)
    assert len(sp) == 8000
    valid = encode_parallel(pairs["valid"], sp)
    assert len(valid) == 1014 and sum(decode_bpe(sp, t) == e for (_, t), (_, e) in zip(valid, pairs["valid"])) > 1000


def test_spread_covers_the_whole_range_evenly():
    items = list(range(10))
    assert data.spread(items, 0) == items and data.spread(items, 12) == items
    assert data.spread(items, 3) == [0, 4, 9]        # first, middle, last: short and long sentences alike
    assert data.spread(items, 1) == [5]
    assert len(set(data.spread(items, 7))) == 7
