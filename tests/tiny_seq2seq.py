"""A small Seq2Seq and random examples, shared by the seq2seq, decoding and translation-task tests."""
import torch

from trainables.config import G2Config, NMTConfig
from trainables.parallel_data import BOS_ID, EOS_ID, PAD_ID
from trainables.seq2seq import Seq2Seq

VOCAB, PAD, BOS, EOS = 30, PAD_ID, BOS_ID, EOS_ID


def small_model(encoder_layers=2, decoder_layers=2, g2=G2Config(), **nmt) -> Seq2Seq:
    cfg = NMTConfig(embed_dim=16, hidden_size=24, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                    **{"dropout": 0.1, **nmt})
    return Seq2Seq(cfg, g2, VOCAB, PAD, BOS, EOS)


def random_examples(n, seed=0, min_len=1, max_len=9):
    g = torch.Generator().manual_seed(seed)
    def sentence():
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        return torch.randint(4, VOCAB, (length,), generator=g)
    return [(sentence(), sentence()) for _ in range(n)]


def run(model, batch, **kw):
    return model(batch.src, batch.src_mask, batch.tgt_in, **kw)
