"""Quality measures."""
from .perplexity import PPLResult, perplexity, tokenize_windows

__all__ = ["PPLResult", "perplexity", "tokenize_windows"]
