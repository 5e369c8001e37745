"""Packed low-bit weights: bit packing, the packed model directory, and CPU kernels that keep weights packed."""
from .bits import pack_bits, packed_words, unpack_bits

__all__ = ["pack_bits", "packed_words", "unpack_bits"]
