"""Bit packing: unsigned b-bit codes (1 <= b <= 8) as a dense little-endian stream of int32 words.

Every block of 32 codes occupies exactly ``b`` words: code i of a block sits at bits
[i*b, (i+1)*b) of the block's 32*b bits, counted from the least significant bit of the
first word. No bit is wasted at any width (3-bit: 32 codes in three words), and for
b in {2, 4, 8} this is the usual layout (code i in bits [b*(i % (32/b)), ...) of word
i // (32/b)), the one GPTQ and compressed-tensors use along a row. The last block is padded
with zero codes; the caller keeps the count.
"""
from __future__ import annotations

import math
from functools import cache

import torch

from ..errors import LowbitError

WORD_BITS = 32
BLOCK = 32  # codes per block; a block is ``bits`` words
CHUNK_BLOCKS = 1 << 16  # blocks per vectorised step: bounds the int64 temporaries to a few MB


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"packing supports 1 to 8 bits per code, got {bits!r}")


@cache
def _layout(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each code of a block: its first word, the next word (where it may spill) and its bit shift."""
    pos = torch.arange(BLOCK, dtype=torch.int64) * bits
    word = pos // WORD_BITS
    return word, (word + 1).clamp(max=bits - 1), pos % WORD_BITS


def packed_words(count: int, bits: int) -> int:
    """Number of int32 words that hold ``count`` codes of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(count / BLOCK) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (any shape, flattened in row-major order) into an int32 stream."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise LowbitError(f"codes must be an integer tensor, got {codes.dtype}")
    v = codes.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise LowbitError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got [{int(v.min())}, {int(v.max())}]"
        )
    n_blocks = math.ceil(v.numel() / BLOCK)
    v = torch.nn.functional.pad(v, (0, n_blocks * BLOCK - v.numel())).view(n_blocks, BLOCK)
    return torch.cat([_pack_blocks(chunk, bits) for chunk in v.split(CHUNK_BLOCKS)]) if n_blocks else v.new_empty(
        0, dtype=torch.int32)


def _pack_blocks(v: torch.Tensor, bits: int) -> torch.Tensor:
    n_blocks = v.shape[0]
    if WORD_BITS % bits == 0:  # no code spans two words: shift each into place and add
        per_word = WORD_BITS // bits
        words = (v.view(n_blocks * bits, per_word) << (torch.arange(per_word) * bits)).sum(1)
        return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    word, nxt, shift = _layout(bits)
    wide = v << shift  # up to 39 bits: the low 32 go to ``word``, the rest spill into the next
    words = torch.zeros(n_blocks, bits, dtype=torch.int64)
    words.scatter_add_(1, word.expand(n_blocks, -1), wide & 0xFFFFFFFF)
    words.scatter_add_(1, nxt.expand(n_blocks, -1), wide >> WORD_BITS)  # disjoint bit ranges: add == or
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as two's-complement int32
    return words.to(torch.int32).reshape(-1)


def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of an int32 stream made by :func:`pack_bits`, as uint8."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise LowbitError(f"packed words must be int32, got {words.dtype}")
    need = packed_words(count, bits)
    if words.numel() != need:
        raise LowbitError(f"{count} codes of {bits} bits need {need} int32 words, got {words.numel()}")
    blocks = words.reshape(-1, bits)
    out = torch.cat([_unpack_blocks(chunk, bits) for chunk in blocks.split(CHUNK_BLOCKS)]) if blocks.shape[0] else \
        torch.empty(0, dtype=torch.uint8)
    return out[:count]


def _unpack_blocks(blocks: torch.Tensor, bits: int) -> torch.Tensor:
    if WORD_BITS % bits == 0:  # int32 all the way: the mask drops what the arithmetic shift smears in
        per_word = WORD_BITS // bits
        shifts = torch.arange(per_word, dtype=torch.int32) * bits
        return ((blocks.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    w = blocks.to(torch.int64) & 0xFFFFFFFF
    word, nxt, shift = _layout(bits)
    both = w[:, word] | (w[:, nxt] << WORD_BITS)  # the code's word and the one it may spill into
    return ((both >> shift) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
