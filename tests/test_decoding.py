"""Tests for trainables/decoding.py: greedy and beam search on an untrained model, and translation order."""
import pytest
import torch

from trainables.config import G2Config, NMTConfig
from trainables.decoding import beam_search, greedy_decode, translate
from trainables.parallel_data import encode_parallel, load_parallel_text, make_batches, train_bpe
from trainables.seq2seq import Seq2Seq
from trainables.toy import toy_parallel_corpus

from tiny_seq2seq import BOS, EOS, PAD, random_examples, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One BPE cache for the module."""
    return tmp_path_factory.mktemp("bpe-cache")


def test_beam_of_one_is_exactly_greedy():
    model = small_model(g2=G2Config(gate_mode="lstm")).eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS] += 2.0     # let some sentences end early, others run to the limit
    for batch in make_batches(random_examples(12, seed=4), 5, shuffle=False):
        greedy = greedy_decode(model, batch)
        assert beam_search(model, batch, beam_size=1) == greedy
        assert any(len(h) < max(batch.src_lengths.tolist()) for h in greedy)
        assert all(EOS not in h and BOS not in h for h in greedy)


def test_decoding_respects_length_limits():
    model = small_model().eval()
    with torch.no_grad():
        model.decoder.output.bias[EOS] -= 100.0   # never stops by itself
    batch = make_batches(random_examples(4, seed=5), 4, shuffle=False)[0]
    limits = [int(0.5 * n) + 10 for n in batch.src_lengths.tolist()]
    for hyps in (greedy_decode(model, batch, max_len_ratio=0.5), beam_search(model, batch, 3, max_len_ratio=0.5)):
        assert [len(h) for h in hyps] == limits
    assert all(len(h) == 4 for h in beam_search(model, batch, 3, max_len=4))


def test_translate_returns_sentences_in_example_order(cache_dir, tmp_path):
    """Bucketed batches reorder the examples; translate() puts each translation back at its example's place."""
    corpus = toy_parallel_corpus(tmp_path, seed=0, n_train=200, n_valid=20, n_test=20)
    pairs = load_parallel_text(corpus)
    sp = train_bpe(pairs["train"], 60, cache_dir)
    examples = encode_parallel(pairs["valid"], sp)
    model = Seq2Seq(NMTConfig(embed_dim=16, hidden_size=24), G2Config(), len(sp), PAD, BOS, EOS).double().eval()
    batches = make_batches(examples, 6, shuffle=True, seed=1)
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(20))
    assert [i for b in batches for i in b.index.tolist()] != list(range(20))
    one_by_one = [translate(model, make_batches([ex], 1, shuffle=False), sp, 3)[0] for ex in examples]
    assert translate(model, batches, sp, 3) == one_by_one
    assert translate(model, batches[:2], sp, 3) == [one_by_one[i] for i in sorted(
        i for b in batches[:2] for i in b.index.tolist())]
