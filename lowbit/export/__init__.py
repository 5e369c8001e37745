"""Exports of packed models to other tools' formats: GGUF (llama.cpp), compressed-tensors (vLLM,
transformers, llm-compressor) and AutoAWQ's GEMM layout."""
from .autoawq import export_autoawq
from .compressed_tensors import export_compressed_tensors
from .gguf import export_gguf

TARGETS = {"gguf": export_gguf, "compressed-tensors": export_compressed_tensors, "autoawq": export_autoawq}

__all__ = ["TARGETS", "export_autoawq", "export_compressed_tensors", "export_gguf"]
