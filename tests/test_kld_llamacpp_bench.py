"""bench/kld_llamacpp.py's pieces that decide its numbers: llama.cpp's base-file tokens, the positions it scores,
and ggml's 8-bit activation rounding (checked against gguf-py's reference and the C reference's rules)."""
from __future__ import annotations

import gguf
import numpy as np
import torch
from conftest import load_bench

kl = load_bench("kld_llamacpp.py", "bench_kld_llamacpp")


def test_q8_0_activations_equal_gguf_reference():
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(kl.ggml_activations(x, "q8_0", 32).numpy(), ref)


def test_q8_k_activations_follow_the_c_reference():
    """quantize_row_q8_K_ref: iscale = -127 / (the signed value of largest magnitude), codes capped at 127."""
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(1)) * 2
    got = kl.ggml_activations(x, "q8_k", 256).numpy()
    for row, out in zip(x.numpy().reshape(-1, 256), got.reshape(-1, 256)):
        big = row[np.argmax(np.abs(row))]
        iscale = np.float32(-127.0) / big
        q = np.minimum(np.rint(iscale * row), 127)
        np.testing.assert_allclose(out, q / iscale, rtol=1e-6, atol=0)
        assert len(np.unique(q)) <= 255 and q.max() <= 127 and q.min() >= -127


def test_base_file_tokens_and_the_scored_positions(tmp_path):
    ids = np.arange(3 * 8, dtype=np.int32).reshape(3, 8)
    path = tmp_path / "base.kld"
    path.write_bytes(b"_logits_" + np.array([8, 100, 3], dtype=np.int32).tobytes() + ids.tobytes() + b"\0" * 64)
    assert np.array_equal(kl.base_tokens(path), ids)
    per_token = torch.arange(2 * (kl.SEQ - 1), dtype=torch.float32)  # position j of window w predicts token j+1
    half = kl.second_half(per_token, 2)
    assert half.shape == (2, kl.SEQ - 1 - kl.SEQ // 2)  # llama.cpp: n_ctx - 1 - n_ctx/2 positions per chunk
    assert half[0, 0] == kl.SEQ // 2 and half[0, -1] == kl.SEQ - 2 and half[1, 0] == (kl.SEQ - 1) + kl.SEQ // 2


def test_llama_perplexity_output_is_parsed():
    out = ("Mean    KLD:   0.058043 ±   0.001\nMedian  KLD:   0.037628\n99.0%   KLD:   0.387843\n"
           "RMS Δp    :  6.123 ± 0.1 %\nSame top p: 86.512 ± 0.3 %\n")
    stats = kl.kld_stats(out, kl.LLAMA_STATS)
    assert stats == {"kld_mean": 0.058043, "kld_median": 0.037628, "kld_p99": 0.387843,
                     "top1_agreement": 0.86512, "rms_dp": 0.06123}
