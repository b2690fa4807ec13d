"""Compressed i/f blocks in their stored form: integer codes packed b bits to a weight, and what decodes them.

`trainables/compress.py` defines each method and the bits the accounting charges for it (DESIGN §3); this module
stores an m×n block in exactly those bits, so that an exported model is as small as its accounting says:

    quant, b ≥ 2 bits   codes (m·n·b bits) + scale (m,) fp32     w = scale · (code − (2^(b−1) − 1))
    quant, 1 bit        signs (m·n bits)   + scale (m,) fp32     w = ±scale (scale = mean |w_row|)
    svd, rank r         a (m, r) fp32 + b (n, r) fp32            w = a bᵀ
    svd + quant         a and b each quantised as above (per-row scales: m + n of them)
    round, round_clip   codes (m·n·⌈log2 L⌉ bits) + levels (L,)  w = levels[code] · step
    (and their _rel)    the same, `step` being the block's own (a multiple of its RMS, kept in its BlockCode)

Codes are unsigned and packed least significant bit first into one uint8 stream per tensor, padded to a whole byte
at its end; round's `levels` (the L multiples of the step that the block uses, int32) are the one part the
accounting does not charge: a few bytes per block. Decoding runs the float32 operations `compress_block` runs, so
a decoded block equals the block the sweep scored, bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from trainables.compress import FLOAT_BITS, low_rank_factors, rounding
from trainables.config import FULL_PRECISION_BITS, ROUND_MODES, CompressConfig

MAX_CODE_BITS = 16   # compress.bits goes up to 16


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer codes (any shape, each < 2^bits) as a uint8 stream of ⌈N·bits / 8⌉ bytes, LSB first."""
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"codes must have 1 to {MAX_CODE_BITS} bits, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, 2^{bits}) cannot be packed in {bits} bits")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)                 # (N·bits,) 0/1
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)  # (⌈N·bits/8⌉, 8)
    return (stream << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first `count` codes of `pack_bits`'s stream, as int64 (count,)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"a packed stream is a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != math.ceil(count * bits / 8):
        raise ValueError(f"{count} codes of {bits} bits take {math.ceil(count * bits / 8)} bytes, "
                         f"the stream has {packed.numel()}")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits)).sum(dim=1)


# --------------------------------------------------------------------------- per-row symmetric quantisation

def encode_quant(w: Tensor, bits: int) -> dict[str, Tensor]:
    """`compress.quantize(w, bits)` as {"codes": packed uint8, "scale": (m,) fp32}."""
    if bits == 1:
        return {"codes": pack_bits(w >= 0, 1), "scale": w.abs().mean(dim=1).contiguous()}
    offset = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / offset                     # (m, 1), as compress.quantize
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale)                                              # integers in [−offset, offset]
    return {"codes": pack_bits(q.to(torch.int64) + offset, bits), "scale": scale[:, 0].contiguous()}


def decode_quant(tensors: Mapping[str, Tensor], bits: int, shape: tuple[int, int]) -> Tensor:
    m, n = shape
    codes = unpack_bits(tensors["codes"], bits, m * n).view(m, n)
    scale = tensors["scale"].view(m, 1)
    if bits == 1:
        return torch.where(codes == 1, 1.0, -1.0).to(scale.dtype) * scale
    return (codes - (2 ** (bits - 1) - 1)).to(scale.dtype) * scale


# --------------------------------------------------------------------------- one block

@dataclass(frozen=True)
class BlockCode:
    """How one compressed block is stored: what decodes it and the bits it is charged (DESIGN §3)."""

    method: str                 # quant | svd | svd+quant | one of ROUND_MODES
    shape: tuple[int, int]      # (m, n) of the block
    bits: int = FULL_PRECISION_BITS   # bits per weight of quant codes (and of svd factors; 32 = fp32 factors)
    rank: int = 0               # singular triplets kept (svd, svd+quant)
    code_bits: int = 0          # bits per code of the rounding modes: ⌈log2 levels⌉, at least 1
    step: float = 0.0           # the rounding step of the block (absolute, or its RMS times rel_step)
    stored_bits: int = 0        # the accounting's bits for the block

    def to_json(self) -> dict:
        return {"method": self.method, "shape": list(self.shape), "bits": self.bits, "rank": self.rank,
                "code_bits": self.code_bits, "step": self.step, "stored_bits": self.stored_bits}

    @classmethod
    def from_json(cls, data: Mapping) -> BlockCode:
        return cls(method=data["method"], shape=tuple(data["shape"]), bits=data["bits"], rank=data["rank"],
                   code_bits=data["code_bits"], step=data["step"], stored_bits=data["stored_bits"])


def encode_block(w: Tensor, cfg: CompressConfig) -> tuple[BlockCode, dict[str, Tensor]]:
    """One m×n float32 block compressed as `cfg` says, in its stored form: (how to decode it, its tensors)."""
    m, n = w.shape
    w = w.detach().float().contiguous()
    if cfg.paper != "none":
        step, clip = rounding(w, cfg)
        clipped = w.clamp(-clip, clip) if clip is not None else w
        multiples = torch.round(clipped / step)
        levels, index = torch.unique(multiples, sorted=True, return_inverse=True)
        code_bits = max(1, math.ceil(math.log2(levels.numel())))
        code = BlockCode(cfg.paper, (m, n), code_bits=code_bits, step=step, stored_bits=m * n * code_bits)
        return code, {"codes": pack_bits(index, code_bits), "levels": levels.to(torch.int32)}
    if cfg.rank:
        a, b = low_rank_factors(w, cfg.rank)                                # (m, r), (n, r)
        r = a.shape[1]
        if cfg.bits == FULL_PRECISION_BITS:
            return (BlockCode("svd", (m, n), rank=r, stored_bits=r * (m + n) * FLOAT_BITS),
                    {"a": a.contiguous(), "b": b.contiguous()})
        tensors = {f"{name}.{field}": t for name, factor in (("a", a), ("b", b))
                   for field, t in encode_quant(factor, cfg.bits).items()}
        stored = r * (m + n) * cfg.bits + FLOAT_BITS * (m + n)
        return BlockCode("svd+quant", (m, n), bits=cfg.bits, rank=r, stored_bits=stored), tensors
    if cfg.bits != FULL_PRECISION_BITS:
        code = BlockCode("quant", (m, n), bits=cfg.bits, stored_bits=m * n * cfg.bits + FLOAT_BITS * m)
        return code, encode_quant(w, cfg.bits)
    raise ValueError("an uncompressed setting has no compressed blocks to encode")


def low_rank_of(code: BlockCode, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The float factors (a (m, r), b (n, r)) of a low-rank block, dequantised where they were quantised."""
    m, n = code.shape
    if code.method == "svd":
        return tensors["a"], tensors["b"]
    if code.method == "svd+quant":
        return (decode_quant({k: tensors[f"a.{k}"] for k in ("codes", "scale")}, code.bits, (m, code.rank)),
                decode_quant({k: tensors[f"b.{k}"] for k in ("codes", "scale")}, code.bits, (n, code.rank)))
    raise ValueError(f"a {code.method} block has no low-rank factors")


def decode_block(code: BlockCode, tensors: Mapping[str, Tensor]) -> Tensor:
    """The float32 block (m, n) that `compress_block` computed for the setting `code` was encoded under."""
    m, n = code.shape
    if code.method in ROUND_MODES:
        index = unpack_bits(tensors["codes"], code.code_bits, m * n).view(m, n)
        return tensors["levels"].to(torch.float32)[index] * code.step
    if code.method in ("svd", "svd+quant"):
        a, b = low_rank_of(code, tensors)
        return a @ b.t()
    if code.method == "quant":
        return decode_quant(tensors, code.bits, (m, n))
    raise ValueError(f"unknown block method {code.method!r}: this code decodes quant, svd, svd+quant, "
                     f"{', '.join(ROUND_MODES)}")
