"""Integer-only arithmetic: affine quantization, zero-point matmul with int32 accumulation,
fixed-point requantization, and how wide an accumulator must be."""
from .accumulator import accumulator_bits, int_dot, max_length, wrap
from .affine import Affine
from .linear import IntLinear, zero_point_matmul
from .requant import pow2_shift, quantize_multiplier, requantize, requantize_pow2, rounding_shift

__all__ = [
    "Affine", "IntLinear", "accumulator_bits", "int_dot", "max_length", "pow2_shift", "quantize_multiplier",
    "requantize", "requantize_pow2", "rounding_shift", "wrap", "zero_point_matmul",
]
