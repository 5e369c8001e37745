"""Perplexity by the project's protocol (shared/data/README.md).

Tokenize the whole text once, cut it into non-overlapping windows of ``seq_len`` tokens,
drop the last partial window, and report exp(mean next-token NLL over all windows).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..distributed import gather_shares, share
from ..errors import LowbitError


@dataclass
class PPLResult:
    ppl: float
    windows: int
    tokens: int
    nll: float
    seconds: float


def tokenize_windows(tokenizer, text: str, seq_len: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] token ids of ``text`` under the protocol."""
    if seq_len < 2:
        raise LowbitError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise LowbitError(f"--max-windows must be at least 1, got {max_windows}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise LowbitError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> PPLResult:
    """Perplexity of ``model`` over token windows [n, seq_len], one window per forward.

    Data-parallel workers (:mod:`lowbit.distributed`) each run their share of the windows; the per-window
    losses are gathered in window order and summed as one process sums them, so the result is the same.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    nlls = []
    bar = tqdm(share(windows, "evaluation windows"), desc="perplexity", unit="window", disable=not progress,
               leave=False)
    for w in bar:
        ids = w.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        if not math.isfinite(nll):
            raise LowbitError("the model produced non-finite logits; the quantized weights are broken")
        nlls.append(nll)
        bar.set_postfix(ppl=f"{math.exp(sum(nlls) / (len(nlls) * (windows.shape[1] - 1))):.3f}")
    total, count = 0.0, 0
    for nll in gather_shares(torch.tensor(nlls, dtype=torch.float64), len(windows)).tolist():
        total += nll
        count += windows.shape[1] - 1
    return PPLResult(math.exp(total / count), len(windows), windows.numel(), total / count, time.perf_counter() - start)
