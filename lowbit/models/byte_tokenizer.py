"""A 256-token byte-level tokenizer built locally: for random-weight models (tests, scale benchmarks)
that need real token ids without downloading a vocabulary."""
from __future__ import annotations


def byte_tokenizer():
    """Every byte one token (ids 0-255), GPT-2's byte-to-character alphabet, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)
