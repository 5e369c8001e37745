"""lowbit: low-bit quantization of LLMs (RTN, AWQ, GPTQ, block-wise reconstruction, QAT, SmoothQuant, GGUF),
honestly measured. Every method's config is exported here (``lowbit.methods.REGISTRY`` lists them)."""
from .errors import LowbitError
from .methods import (
    REGISTRY,
    ActQuantConfig,
    AWQConfig,
    AWQGPTQConfig,
    AWQSearch,
    BlockwiseConfig,
    GPTQConfig,
    ImatrixConfig,
    Pipeline,
    QATConfig,
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
    "REGISTRY", "ActQuantConfig", "AWQConfig", "AWQGPTQConfig", "AWQSearch", "BlockwiseConfig", "GPTQConfig",
    "ImatrixConfig", "LowbitError", "Pipeline", "QATConfig", "QTensor", "QuantSpec", "RotationConfig", "RTNConfig",
    "SalientConfig", "SmoothQuantConfig", "SpecMap", "dequantize", "fake_quantize", "load", "load_model", "quantize",
    "quantize_",
]
