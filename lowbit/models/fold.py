"""Folding a per-channel scale between a producer and the linears that read its output.

X/s · (W·s)ᵀ = X·Wᵀ: AWQ and SmoothQuant divide the producer's output channels by s and
multiply the consumers' input channels by s. How a producer divides depends on what it is,
and that is family data (:class:`~lowbit.models.families.Family`):

- a norm computing x̂·w (+ b): w/s and b/s;
- a norm computing x̂·(offset + w) (Gemma's 1 + w): w' = (offset + w)/s − offset;
- a linear: its output rows (and bias) /s; of a fused linear (q/k/v, gate/up) only the rows
  of the ``part`` that feeds the consumers.

Float modules that read the same input (an MoE router) take s like the consumers. Grouped-
query attention ties the scale over the query heads that read one KV head (:func:`tie_index`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError


def config_head_dim(cfg) -> int | None:
    """The attention head width a transformers config states (head_dim, else hidden / heads), or None."""
    hd = getattr(cfg, "head_dim", None)
    if hd is None and cfg is not None and getattr(cfg, "num_attention_heads", None):
        hd = cfg.hidden_size // cfg.num_attention_heads
    return None if hd is None else int(hd)


def head_dim(model: nn.Module) -> int | None:
    """The attention head width of ``model``, or None."""
    return config_head_dim(getattr(model, "config", None))


def kv_width(model: nn.Module) -> int | None:
    """Channels of the attention values: KV heads × head width."""
    cfg = getattr(model, "config", None)
    hd = head_dim(model)
    n_kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    return None if hd is None or n_kv is None else int(n_kv) * int(hd)


def tie_index(prev_out: int, lin_in: int, head_dim: int | None, device: torch.device | None = None) -> torch.Tensor:
    """For each input channel of the consumer, the channel of ``prev`` that feeds it.

    Identity when widths match; for grouped-query attention query head h reads KV head
    h // (n_q / n_kv), so channel h*d + i maps to (h // rep)*d + i.
    """
    if prev_out == lin_in:
        return torch.arange(lin_in, device=device)
    if head_dim is None or lin_in % prev_out or prev_out % head_dim:
        raise LowbitError(f"cannot tie a {prev_out}-wide producer to a {lin_in}-wide consumer without head_dim")
    rep = lin_in // prev_out
    heads = torch.arange(lin_in // head_dim, device=device) // rep
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


@dataclass(frozen=True)
class Producer:
    """The channels a scale is folded into: ``module``'s output ``rows`` (all when None)."""

    module: nn.Module
    width: int
    rows: slice | None = None
    norm_offset: float = 0.0


def producer(prev: nn.Module, part: str | None, consumer_in: int, model: nn.Module | None = None,
             norm_offset: float = 0.0) -> Producer:
    """What folding into ``prev`` touches: a norm's weight, a linear's rows, or the ``part`` rows of a fused linear."""
    if isinstance(prev, nn.Linear):
        out = prev.out_features
        if part is None:
            return Producer(prev, out)
        if part == "v":
            width = kv_width(model) if model is not None else None
            if width is None or width > out:
                raise LowbitError(f"cannot find the value rows of a fused {out}-row projection")
        elif part == "up":
            width = consumer_in
            if 2 * width != out:
                raise LowbitError(f"a fused gate/up projection of {out} rows does not feed a {consumer_in}-wide input")
        else:
            raise LowbitError(f"unknown producer part {part!r}")
        return Producer(prev, width, slice(out - width, out))
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise LowbitError(f"cannot fold a scale into {type(prev).__name__}: it has no per-channel weight")
    return Producer(prev, weight.numel(), None, norm_offset)


@torch.no_grad()
def fold_scale(prod: Producer, linears: list[nn.Module], s: torch.Tensor, index: torch.Tensor,
               readers: list[nn.Module] = ()) -> None:
    """Divide the producer's channels by s and multiply the consumers' (and readers') inputs by s.

    ``s`` is over the consumers' input channels and constant on each tie class of ``index``.
    """
    prev = prod.module
    device = prev.weight.device
    s, index = s.to(device), index.to(device)  # a scale found elsewhere (a file, the CPU) folds where prev is
    s_prev = torch.zeros(prod.width, dtype=s.dtype, device=device).index_copy_(0, index, s)
    if isinstance(prev, nn.Linear):
        rows = prod.rows or slice(None)
        prev.weight[rows].div_(s_prev.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[rows].div_(s_prev.to(prev.bias.dtype))
    else:
        w = prev.weight
        if prod.norm_offset:
            w.copy_(((w.float() + prod.norm_offset) / s_prev - prod.norm_offset).to(w.dtype))
        else:
            w.div_(s_prev.to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s_prev.to(prev.bias.dtype))
    for lin in (*linears, *readers):
        lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


class Snapshot:
    """Copies of some modules' parameters, to undo a fold that failed its check."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self._saved = [(p, p.detach().clone()) for m in modules for p in m.parameters(recurse=False)]

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in self._saved:
            p.copy_(v)


def fold_error(before: torch.Tensor, after: torch.Tensor) -> float:
    """Largest relative change, position by position, of a module's output [..., width] made by a fold that
    should leave it unchanged.

    Each position is measured against its own norm: an attention sink (the first position) can hold 70-98 % of
    a layer output's energy, so a change of every other position would vanish in the relative change of the
    whole output.
    """
    if before.numel() == 0:
        return 0.0
    ref = before.float().reshape(-1, before.shape[-1])
    change = (after.float().reshape(-1, before.shape[-1]) - ref).norm(dim=-1)
    norm = ref.norm(dim=-1)
    floor = max(float(norm.max()) * 1e-6, 1e-12)  # an all-zero position is no scale to measure against
    return float((change / norm.clamp(min=floor)).max())


def fold_tolerance(dtype: torch.dtype) -> float:
    """Largest relative output change a correct fold can make, by the weights' precision."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
