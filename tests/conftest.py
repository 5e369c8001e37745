"""Shared fixtures: a tiny random Llama built here (no download) and the default model's paths."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from lowbit.models.byte_tokenizer import byte_tokenizer  # noqa: F401  (tests import it from here)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():  # as the Makefile does, so subprocesses see the local copies too
    os.environ.setdefault("LOWBIT_DATA_DIR", str(SHARED_DATA))


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 256):
    """A randomly initialised Llama small enough to run many times a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return model


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("LOWBIT_DATA_DIR") or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    if d is None:
        pytest.skip("no local data directory (set LOWBIT_DATA_DIR)")
    return Path(d)


@pytest.fixture(scope="session")
def default_model():
    """The default model and tokenizer, loaded once for the whole session (read-only use)."""
    from lowbit.models import load_model

    return load_model("smollm2-135m")


def with_outliers(model, channels=(3, 17, 41), factor: float = 50.0):
    """Give ``model`` outlier channels as real LLMs have: embedding and norm channels scaled by ``factor``."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, list(channels)] *= factor
        for layer in model.model.layers:
            layer.input_layernorm.weight[list(channels)] *= factor
            layer.post_attention_layernorm.weight[list(channels)] *= factor
    return model


def int_spec(bits: int, group: int | None, sym: bool | str):
    """The integer QuantSpec a test names by ``sym``: False (asymmetric), True, or "full" (full-range symmetric)."""
    from lowbit.quantizer import QuantSpec

    kw = dict(bits=bits, symmetric=bool(sym), full_range=sym == "full")
    return QuantSpec(group_size=group, **kw) if group else QuantSpec(granularity="channel", **kw)


def signed_like(scale: torch.Tensor, sym: bool | str, g: torch.Generator) -> torch.Tensor:
    """Full-range grids put a group's positive extreme on the lowest code: their scales take either sign."""
    if sym != "full":
        return scale
    return scale * (torch.randint(0, 2, scale.shape, generator=g) * 2 - 1).to(scale.dtype)


@pytest.fixture(scope="module")
def tiny_ckpt(default_model, tmp_path_factory) -> Path:
    """A tiny random Llama with the default model's tokenizer, saved as a Hugging Face checkpoint."""
    _, tok = default_model
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=49152, hidden=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def load_bench(file: str, name: str):
    """A bench script as a module (bench/ is not a package), registered under ``name``."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
