"""Exports of packed models to other tools' formats."""
from .gguf import export_gguf

__all__ = ["export_gguf"]
