"""Tests for trainables/parallel_data.py: parallel text, the joint BPE and its cache, and seq2seq batching."""
import pytest
import torch

from trainables.parallel_data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    decode_bpe,
    encode_parallel,
    load_parallel_data,
    load_parallel_text,
    make_batches,
    spread,
    train_bpe,
)
from trainables.toy import toy_parallel_corpus

from conftest import real_corpus


@pytest.fixture(scope="module")
def toy_bpe(tmp_path_factory):
    """A reverse-task corpus and its BPE model, shared by the translation tests."""
    root = tmp_path_factory.mktemp("toy")
    corpus = toy_parallel_corpus(root / "reverse", seed=3, task="reverse", n_train=400, n_valid=40, n_test=40)
    pairs = load_parallel_text(corpus)
    sp = train_bpe(pairs["train"], 120, root / "cache")
    return corpus, pairs, sp, root / "cache"


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


def test_spread_covers_the_whole_range_evenly():
    items = list(range(10))
    assert spread(items, 0) == items and spread(items, 12) == items
    assert spread(items, 3) == [0, 4, 9]        # first, middle, last: short and long sentences alike
    assert spread(items, 1) == [5]
    assert len(set(spread(items, 7))) == 7


# --------------------------------------------------------------------------- real corpora (skipped when absent)

def test_real_multi30k_counts_and_bpe(tmp_path):
    pairs = load_parallel_text(real_corpus("multi30k"), "de", "en")
    assert [len(pairs[s]) for s in ("train", "valid", "test")] == [29000, 1014, 1000]
    assert pairs["train"][0][1].startswith("Two young")
    sp = train_bpe(pairs["train"], 8000, tmp_path)
    assert len(sp) == 8000
    valid = encode_parallel(pairs["valid"], sp)
    assert len(valid) == 1014 and sum(decode_bpe(sp, t) == e for (_, t), (_, e) in zip(valid, pairs["valid"])) > 1000
