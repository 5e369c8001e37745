"""Structural adaptation: every quantizable weight of a model becomes an ``nn.Linear``.

Methods, packing and kernels all work on ``nn.Linear``. Two common layouts are not:
GPT-2's ``Conv1D`` (weight stored [in, out]) and mixture-of-experts blocks whose experts are
3-D parameters (Mixtral, Qwen-MoE and gpt-oss in transformers 5). Both are rewritten in
place into modules that compute the same function with ``nn.Linear`` children, so every
expert is quantized (and calibrated on the tokens routed to it) like any other linear.
The layout of each family's experts is data (:class:`~lowbit.models.families.ExpertsLayout`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import LowbitError


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding ``weight`` [out, in] (and ``bias``) on their device and dtype, without initialising."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return lin


def _conv1d_to_linear(model: nn.Module) -> None:
    """Replace every transformers Conv1D (y = x W + b, W [in, out]) by the equivalent nn.Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _linear_like(mod.weight.T, mod.bias))


class ExpertMLP(nn.Module):
    """One expert: down(glu(gate(x), up(x)))."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, glu: Callable) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self._glu = glu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._glu(self.gate_proj(x), self.up_proj(x)))


class LinearExperts(nn.ModuleList):
    """Experts as a list of :class:`ExpertMLP` (named ``experts.0``, ``experts.1``, ... as in older
    checkpoints), called like transformers' fused experts module:
    ``(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _glu_for(kind: str, module: nn.Module) -> Callable:
    if kind == "act":
        act = module.act_fn
        return lambda gate, up: act(gate) * up
    if kind == "gpt_oss":
        alpha, limit = float(module.alpha), float(module.limit)

        def gpt_oss_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            gate = gate.clamp(max=limit)
            up = up.clamp(-limit, limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))

        return gpt_oss_glu
    raise LowbitError(f"unknown expert GLU {kind!r}")


def _split_experts(module: nn.Module, layout) -> LinearExperts:
    gate_up = getattr(module, layout.gate_up).detach()
    down = getattr(module, layout.down).detach()
    if layout.transposed:  # stored [E, in, out]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gu_bias = getattr(module, f"{layout.gate_up}_bias").detach() if layout.bias else None
    d_bias = getattr(module, f"{layout.down}_bias").detach() if layout.bias else None
    n_inter = gate_up.shape[1] // 2
    halves = (slice(0, None, 2), slice(1, None, 2)) if layout.interleaved else (slice(n_inter), slice(n_inter, None))
    gate_w, up_w = (gate_up[:, h] for h in halves)
    gate_b, up_b = (None, None) if gu_bias is None else (gu_bias[:, h] for h in halves)
    glu = _glu_for(layout.glu, module)
    experts = []
    for e in range(gate_up.shape[0]):
        pick = (lambda b, e=e: None if b is None else b[e])  # noqa: E731 -- per-expert slice of an optional bias
        experts.append(ExpertMLP(_linear_like(gate_w[e], pick(gate_b)), _linear_like(up_w[e], pick(up_b)),
                                 _linear_like(down[e], pick(d_bias)), glu))
    return LinearExperts(experts)


def _unfuse_experts(model: nn.Module, family) -> None:
    layout = family.experts
    for layer in model.get_submodule(family.layers):
        try:
            mod = layer.get_submodule(layout.path)
        except AttributeError:
            continue  # a dense layer among MoE ones
        if isinstance(mod, LinearExperts):
            continue
        if not isinstance(getattr(mod, layout.gate_up, None), torch.Tensor):
            raise LowbitError(f"{family.name}: {layout.path} has no 3-D parameter {layout.gate_up!r}; "
                              "its expert layout differs from lowbit/models/families.py")
        parent, _, child = layout.path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, _split_experts(mod, layout))


def adapt_(model: nn.Module, family=None) -> None:
    """Rewrite ``model`` in place so every quantizable weight is an nn.Linear (idempotent, same function)."""
    _conv1d_to_linear(model)
    if family is not None and family.experts is not None:
        _unfuse_experts(model, family)


__all__ = ["ExpertMLP", "LinearExperts", "adapt_"]
