"""KL divergence to the float model: zero against itself, every statistic equal to a direct computation from the
full logits, and ``lowbit eval --kld`` on tiny checkpoints (in memory, packed, bad references)."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import byte_tokenizer, tiny_llama

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval import kld as kld_module
from lowbit.eval.kld import check_same_vocabulary, kl_divergence
from lowbit.eval.perplexity import perplexity


def sharp_tiny(seed: int = 0, vocab: int = 256):
    """A tiny random Llama whose next-token distributions are peaked (a random init's are nearly uniform, where
    every KL is too small to test relative agreement on)."""
    model = tiny_llama(seed=seed, vocab=vocab)
    with torch.no_grad():
        model.lm_head.weight *= 12
    return model


def windows(n: int = 3, seq_len: int = 40, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def test_a_model_against_itself_has_zero_divergence():
    model = sharp_tiny()
    w = windows()
    res = kl_divergence(copy.deepcopy(model), model, w, progress=False)
    assert res.per_token.shape == (3 * 39,)
    assert res.per_token.abs().max().item() == 0.0
    assert res.kld_mean == res.kld_median == res.kld_p99 == res.kld_p999 == 0.0
    assert res.top1_agreement == 1.0 and res.rms_dp == 0.0
    assert res.ppl == res.ppl_ref == pytest.approx(perplexity(model, w, progress=False).ppl, rel=1e-5)
    assert set(res.as_dict()) == {"kld_mean", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "rms_dp", "ppl",
                                  "ppl_ref", "windows", "tokens", "seconds"}


def test_every_statistic_equals_a_direct_computation(monkeypatch):
    monkeypatch.setattr(kld_module, "CHUNK", 7)  # positions split over several softmax steps, one a partial
    ref = sharp_tiny()
    quant = copy.deepcopy(ref)
    lowbit.quantize_(quant, lowbit.RTNConfig(lowbit.QuantSpec(bits=3, group_size=16)))
    w = windows()
    res = kl_divergence(ref, quant, w, progress=False)

    # the same forwards (one window each, so the logits are bit for bit the ones above), then plain formulas
    p_logits = torch.cat([ref(x[None], use_cache=False).logits[0, :-1] for x in w]).float()
    q_logits = torch.cat([quant(x[None], use_cache=False).logits[0, :-1] for x in w]).float()
    target = w[:, 1:].reshape(-1)
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # sum_v P (log P - log Q)
    assert kl.mean().item() > 1e-2  # a real divergence, so relative agreement means something
    rows = torch.arange(len(target))
    dp = lq.exp()[rows, target] - lp.exp()[rows, target]
    kl64 = kl.double().numpy()
    assert res.kld_mean == pytest.approx(kl64.mean(), rel=1e-5)
    assert res.kld_median == pytest.approx(np.median(kl64), rel=1e-5)
    assert res.kld_p99 == pytest.approx(np.percentile(kl64, 99), rel=1e-5)
    assert res.kld_p999 == pytest.approx(np.percentile(kl64, 99.9), rel=1e-5)
    assert res.top1_agreement == pytest.approx((p_logits.argmax(-1) == q_logits.argmax(-1)).double().mean().item())
    assert 0 < res.top1_agreement < 1
    assert res.rms_dp == pytest.approx(math.sqrt((dp.double() ** 2).mean().item()), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(F.cross_entropy(q_logits, target).item()), rel=1e-5)
    assert res.ppl_ref == pytest.approx(math.exp(F.cross_entropy(p_logits, target).item()), rel=1e-5)
    assert res.ppl == pytest.approx(perplexity(quant, w, progress=False).ppl, rel=1e-5)
    torch.testing.assert_close(res.per_token, kl, rtol=1e-5, atol=1e-7)


def test_another_vocabulary_is_refused():
    tok = byte_tokenizer()
    with pytest.raises(LowbitError, match="vocabulary of 300 tokens and the evaluated model 256"):
        check_same_vocabulary(tiny_llama(vocab=300), tok, tiny_llama(), tok)
    with pytest.raises(LowbitError, match="one vocabulary"):
        kl_divergence(tiny_llama(vocab=300), tiny_llama(), windows(n=1), progress=False)


# ---- the command line -----------------------------------------------------------------------------------------


def checkpoint(path, vocab: int = 256, seed: int = 0):
    """A tiny random Llama with the byte tokenizer, saved as a Hugging Face checkpoint."""
    tiny_llama(seed=seed, vocab=vocab).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("The quick brown fox jumps over the lazy dog; 1, 2, 3, 5, 8, 13. " * 20)
    return f


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


KEYS = ("kld_mean", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "rms_dp", "ppl_ref")


def test_eval_kld_in_memory_method_json_and_table(tmp_path, text, capsys):
    from lowbit.cli import main

    ckpt = checkpoint(tmp_path / "tiny")
    common = ["eval", "--model", str(ckpt), "--method", "rtn", "--w-bit", "3", "--group-size", "16", "--data",
              str(text), "--seq-len", "64", "--max-windows", "2"]
    assert main([*common, "--json"]) == 0
    plain = last_json(capsys.readouterr().out)
    assert main([*common, "--kld", "--json"]) == 0
    row = last_json(capsys.readouterr().out)
    assert all(isinstance(row[k], float) for k in KEYS), row
    assert row["kld_mean"] > 0 and 0 <= row["top1_agreement"] <= 1 and row["kld_p999"] >= row["kld_median"]
    assert row["kld_reference"] == "float (in memory)" and row["windows"] == 2 and row["tokens"] == 128
    assert row["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)  # the side-by-side pass is the same PPL
    assert main(["eval", "--model", str(ckpt), "--data", str(text), "--seq-len", "64", "--max-windows", "2",
                 "--json"]) == 0
    assert row["ppl_ref"] == pytest.approx(last_json(capsys.readouterr().out)["ppl"], rel=1e-6)
    assert main([*common, "--kld"]) == 0
    out = capsys.readouterr().out
    assert "KLD 99.9%" in out and "same top" in out and "PPL float" in out


def test_eval_kld_packed_dir_uses_its_source_model(tmp_path, text, capsys):
    from lowbit.cli import main

    ckpt = checkpoint(tmp_path / "tiny")
    packed = tmp_path / "packed"
    assert main(["quantize", "--model", str(ckpt), "--method", "rtn", "--w-bit", "4", "--group-size", "16",
                 "--embed", "fp32", "-o", str(packed)]) == 0
    capsys.readouterr()
    common = ["eval", "--data", str(text), "--seq-len", "64", "--max-windows", "2", "--kld", "--json"]
    assert main([*common, "--model", str(packed)]) == 0
    row = last_json(capsys.readouterr().out)
    assert row["kld_reference"] == str(ckpt) and row["kld_mean"] > 0
    # the same codes made in memory give the same divergence
    assert main([*common, "--model", str(ckpt), "--method", "rtn", "--w-bit", "4", "--group-size", "16"]) == 0
    assert last_json(capsys.readouterr().out)["kld_mean"] == pytest.approx(row["kld_mean"], rel=1e-4)


def test_eval_kld_bad_references_fail_with_one_line(tmp_path, text, capsys):
    from lowbit.cli import main

    ckpt = checkpoint(tmp_path / "tiny")
    other = checkpoint(tmp_path / "other", vocab=300, seed=1)
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "--model", str(ckpt), "--method", "rtn",
                           "--data", str(text), "--seq-len", "64", "--max-windows", "1", "--kld", "--kld-reference",
                           str(other)], capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and "vocabulary of 300 tokens" in lines[0], proc.stderr
    common = ["eval", "--model", str(ckpt), "--data", str(text), "--seq-len", "64", "--max-windows", "1"]
    assert main([*common, "--kld"]) == 2  # evaluated as it is: no float model to compare with
    assert "--kld-reference MODEL" in capsys.readouterr().err
    assert main([*common, "--kld-reference", str(ckpt)]) == 2
    assert "add --kld" in capsys.readouterr().err
