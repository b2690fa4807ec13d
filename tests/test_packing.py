"""Packed blocks against `trainables/compress.py`, the oracle: the same float32 block back, in the bits it charges."""
import math

import pytest
import torch

from trainables.compress import compress_block
from trainables.config import CompressConfig
from trainables.packing import BlockCode, decode_block, encode_block, pack_bits, unpack_bits

SETTINGS = [CompressConfig(bits=b) for b in (1, 2, 3, 4, 5, 8, 16)] + [
    CompressConfig(rank=4), CompressConfig(rank=4, bits=4), CompressConfig(rank=4, bits=1),
    CompressConfig(rank=64, bits=2),                         # a rank above min(m, n) keeps min(m, n) triplets
    CompressConfig(paper="round"), CompressConfig(paper="round", step=0.05), CompressConfig(paper="round_clip"),
    CompressConfig(paper="round_rel"), CompressConfig(paper="round_clip_rel", rel_step=0.3, rel_clip=1.5)]


@pytest.mark.parametrize("bits", range(1, 17))
def test_codes_pack_into_exactly_their_bits_and_back(bits):
    codes = torch.randint(0, 2 ** bits, (37, 11))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).view_as(codes), codes)


def test_packing_is_lsb_first_and_refuses_codes_out_of_range():
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    assert pack_bits(torch.tensor([3, 1]), 2).tolist() == [0b0111]
    with pytest.raises(ValueError, match=r"outside \[0, 2\^2\)"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="take 2 bytes, the stream has 1"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


@pytest.mark.parametrize("cfg", SETTINGS, ids=lambda c: f"{c.method}-r{c.rank}-b{c.bits}-s{c.step}")
def test_a_decoded_block_is_the_compressed_block_bit_for_bit(cfg):
    w = torch.randn(24, 40) * 0.4
    w[3] = 0.0                                      # an all-zero row keeps scale 1, as compress.quantize does
    expected, bits = compress_block(w, cfg)
    code, tensors = encode_block(w, cfg)
    assert torch.equal(decode_block(code, tensors), expected)
    assert code.stored_bits == bits
    stored = sum(t.numel() * t.element_size() * 8 for name, t in tensors.items() if name != "levels")
    assert 0 <= stored - bits < 8 * 2          # at most the byte padding of a and b's code streams
    assert BlockCode.from_json(code.to_json()) == code


def test_round_stores_codes_on_the_grid_of_the_levels_it_uses():
    w = torch.tensor([[0.01, 0.19, 0.41, -0.39, 2.0, -0.6]])
    code, tensors = encode_block(w, CompressConfig(paper="round_clip", step=0.2, clip=0.4))
    assert tensors["levels"].tolist() == [-2, 0, 1, 2] and code.code_bits == 2      # -0.4, 0, 0.2, 0.4
    torch.testing.assert_close(decode_block(code, tensors), torch.tensor([[0.0, 0.2, 0.4, -0.4, 0.4, -0.4]]))


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown block method 'relative_round'"):
        decode_block(BlockCode("relative_round", (2, 2)), {})
    with pytest.raises(ValueError, match="uncompressed setting"):
        encode_block(torch.ones(2, 2), CompressConfig())
