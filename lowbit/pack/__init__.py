"""Packed low-bit weights: bit packing, the packed model directory, and CPU kernels that keep weights packed."""
from .bits import pack_bits, packed_words, unpack_bits
from .checkpoint import load_packed, pack_model_, save_packed
from .kernels import QuantLinear

load = load_packed

__all__ = ["QuantLinear", "load", "load_packed", "pack_bits", "pack_model_", "packed_words", "save_packed",
           "unpack_bits"]
