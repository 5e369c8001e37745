"""lowbit: low-bit quantization of LLMs (RTN, salient FP16, AWQ, GPTQ, SmoothQuant, W8A8), honestly measured."""
from .errors import LowbitError
from .methods import (
    ActQuantConfig,
    AWQConfig,
    AWQGPTQConfig,
    AWQSearch,
    GPTQConfig,
    RotationConfig,
    RTNConfig,
    SalientConfig,
    SmoothQuantConfig,
    quantize_,
)
from .models import load_model
from .pack import load
from .quantizer import QTensor, QuantSpec, dequantize, fake_quantize, quantize
from .specmap import SpecMap

__version__ = "0.1.0"

__all__ = [
    "ActQuantConfig", "AWQConfig", "AWQGPTQConfig", "AWQSearch", "GPTQConfig", "LowbitError", "QTensor", "QuantSpec",
    "RotationConfig", "RTNConfig", "SalientConfig", "SmoothQuantConfig", "SpecMap", "dequantize", "fake_quantize",
    "load",
    "load_model", "quantize", "quantize_",
]
