"""KL divergence of a quantized model's next-token distribution to the float model's, beside both perplexities.

The statistics ``llama-perplexity --kl-divergence`` reports (docs/kld.md), computed exactly over the full
vocabulary in float32 on the perplexity protocol's windows. The two models run side by side one window at a
time, so only one window's logits of each exist at once; what is kept across windows is one float per
predicted position (the KL values, for the quantiles) and running sums.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowbitError

# Positions per softmax step: the float32 temporaries stay a few x CHUNK x vocab, not seq_len x vocab.
CHUNK = 256


@dataclass
class KLDResult:
    kld_mean: float  # mean over predicted positions of KL(P_float || Q_quant), in nats
    kld_median: float
    kld_p99: float
    kld_p999: float
    top1_agreement: float  # fraction of positions where both models' most likely token is the same
    rms_dp: float  # sqrt(mean((q(next) - p(next))^2)) over positions: a probability, not a percentage
    ppl: float  # the quantized model's perplexity on the same windows
    ppl_ref: float  # the float model's
    windows: int
    tokens: int
    seconds: float
    per_token: torch.Tensor = field(repr=False)  # [positions] float32 KL values, window by window

    def as_dict(self) -> dict:
        """The statistics as a flat, JSON-friendly record (without the per-token values)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_token"}


def vocab_size(model: nn.Module) -> int | None:
    """The width of the model's logits, from its config (None when it does not say)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "vocab_size", None)


def check_same_vocabulary(reference: nn.Module, reference_tokenizer, model: nn.Module, tokenizer,
                          name: str = "the reference") -> None:
    """Refuse a reference whose logits or token ids do not mean the same tokens as the model's."""
    v_ref, v = vocab_size(reference), vocab_size(model)
    if v_ref is not None and v is not None and v_ref != v:
        raise LowbitError(f"{name} has a vocabulary of {v_ref} tokens and the evaluated model {v}; KL divergence "
                          "compares two models of one vocabulary: give --kld-reference the float model this one "
                          "was quantized from")
    n_ref, n = len(reference_tokenizer), len(tokenizer)
    if n_ref != n or reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise LowbitError(f"{name}'s tokenizer ({n_ref} tokens) is not the evaluated model's ({n} tokens), so the "
                          "same ids would be different text: give --kld-reference the float model this one was "
                          "quantized from")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def position_stats(ref_logits: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per position: KL(P_ref || Q), the target's NLL under Q and under P, and whether the top tokens agree."""
    lp = F.log_softmax(ref_logits.float(), dim=-1)
    lq = F.log_softmax(logits.float(), dim=-1)
    p = lp.exp()
    # p = 0 contributes nothing, even where Q also has -inf (0 * inf would be NaN)
    kld = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    nll = -lq.gather(-1, target[:, None])[:, 0]
    nll_ref = -lp.gather(-1, target[:, None])[:, 0]
    same = lp.argmax(-1) == lq.argmax(-1)
    return kld, nll, nll_ref, same


@torch.no_grad()
def kl_divergence(reference: nn.Module, model: nn.Module, windows: torch.Tensor, progress: bool = True) -> KLDResult:
    """KL(float || quantized) statistics of ``model`` against ``reference`` over token windows [n, seq_len]."""
    start = time.perf_counter()
    ref_device, device = _device(reference), _device(model)
    klds: list[torch.Tensor] = []
    nll = nll_ref = dp2 = kld_sum = 0.0
    same = count = 0
    bar = tqdm(windows, desc="KL divergence", unit="window", disable=not progress, leave=False)
    for w in bar:
        ids = w.unsqueeze(0)
        logits = model(ids.to(device), use_cache=False).logits[0, :-1]
        ref_logits = reference(ids.to(ref_device), use_cache=False).logits[0, :-1].to(device)
        if logits.shape[-1] != ref_logits.shape[-1]:
            raise LowbitError(f"the reference model gives {ref_logits.shape[-1]} logits per token and the evaluated "
                              f"model {logits.shape[-1]}; KL divergence needs one vocabulary")
        target = ids[0, 1:].to(device)
        for s in range(0, target.numel(), CHUNK):
            kld, n_q, n_p, top = position_stats(ref_logits[s:s + CHUNK], logits[s:s + CHUNK], target[s:s + CHUNK])
            klds.append(kld.cpu())
            kld_sum += kld.double().sum().item()
            nll += n_q.double().sum().item()
            nll_ref += n_p.double().sum().item()
            dp2 += ((-n_q).exp().double() - (-n_p).exp().double()).square().sum().item()
            same += int(top.sum())
        del logits, ref_logits
        count += target.numel()
        if not math.isfinite(nll):
            raise LowbitError("the model produced non-finite logits; the quantized weights are broken")
        if not math.isfinite(nll_ref):
            raise LowbitError("the reference model produced non-finite logits")
        bar.set_postfix(kld=f"{kld_sum / count:.4f}", ppl=f"{math.exp(nll / count):.3f}")
    per_token = torch.cat(klds)
    median, p99, p999 = np.percentile(per_token.double().numpy(), [50.0, 99.0, 99.9])  # linear, as llama.cpp's
    return KLDResult(
        kld_mean=per_token.double().mean().item(), kld_median=float(median), kld_p99=float(p99), kld_p999=float(p999),
        top1_agreement=same / count, rms_dp=math.sqrt(dp2 / count), ppl=math.exp(nll / count),
        ppl_ref=math.exp(nll_ref / count), windows=len(windows), tokens=windows.numel(),
        seconds=time.perf_counter() - start, per_token=per_token,
    )
