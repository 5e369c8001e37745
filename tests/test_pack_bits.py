"""Bit packing round-trips exactly at every width and shape, and lays bits out as documented."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.pack import pack_bits, packed_words, unpack_bits


def reference_words(codes: list[int], bits: int) -> list[int]:
    """Independent reference: one big integer with code i at bit i*bits, cut into 32-bit words."""
    big = sum(c << (i * bits) for i, c in enumerate(codes))
    n_words = packed_words(len(codes), bits)
    return [(big >> (32 * k)) & 0xFFFFFFFF for k in range(n_words)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_matches_a_big_integer_reference(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (77,), generator=g)
    words = pack_bits(codes, bits)
    assert [w & 0xFFFFFFFF for w in words.tolist()] == reference_words(codes.tolist(), bits)


def test_int3_has_no_wasted_bits_and_int4_is_nibbles_in_order():
    assert packed_words(32, 3) == 3 and packed_words(320, 3) == 30  # 96 bits for 32 codes
    w = pack_bits(torch.arange(16), 4)
    assert [x & 0xFFFFFFFF for x in w.tolist()] == [0x76543210, 0xFEDCBA98, 0, 0]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_any_shape(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, tuple(shape), generator=g, dtype=torch.int64)
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.numel() == packed_words(codes.numel(), bits)
    back = unpack_bits(words, bits, codes.numel())
    assert torch.equal(back.long().view_as(codes), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 31, 32, 33, 95, 1000])
def test_round_trip_every_width_extremes(bits, count):
    for fill in (0, (1 << bits) - 1):  # all-zero and all-ones codes, the sign bit of every word set
        codes = torch.full((count,), fill, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, count), codes)


def test_large_tensor_spans_several_chunks():
    codes = torch.randint(0, 8, (3 * 2**21 + 5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, codes.numel()).long(), codes)


def test_empty():
    assert pack_bits(torch.zeros(0, dtype=torch.int64), 3).numel() == 0
    assert unpack_bits(torch.zeros(0, dtype=torch.int32), 3, 0).numel() == 0


@pytest.mark.parametrize("codes,bits,msg", [
    (torch.tensor([0, 8]), 3, "must lie in [0, 7]"),
    (torch.tensor([-1, 0]), 4, "must lie in [0, 15]"),
    (torch.tensor([0.5]), 4, "integer tensor"),
    (torch.tensor([1]), 9, "1 to 8 bits"),
    (torch.tensor([1]), 0, "1 to 8 bits"),
])
def test_bad_codes_are_refused(codes, bits, msg):
    with pytest.raises(LowbitError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        pack_bits(codes, bits)


def test_truncated_stream_is_refused():
    words = pack_bits(torch.zeros(64, dtype=torch.int64), 3)
    with pytest.raises(LowbitError, match="need 6 int32 words, got 5"):
        unpack_bits(words[:-1], 3, 64)
    with pytest.raises(LowbitError, match="must be int32"):
        unpack_bits(words.long(), 3, 64)
