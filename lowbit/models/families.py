"""Model-family knowledge, declared as data.

A family says where the decoder layers are, which linears inside a layer get
quantized, and which linears share an input (a *scaling group*): the op that produces
that input (a norm or a previous linear), the linears that consume it, and the module
whose output measures the error of scaling them. AWQ and SmoothQuant read these
tables; nothing else in lowbit knows a model family by name.

Architectures not listed fall back to :func:`discover_family`, which finds the layer
list and the norm→linear groups by running one layer with hooks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LowbitError


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the output of ``prev``; ``inspect`` is re-run to score a scale.

    ``token_wise`` says ``inspect`` treats every token on its own (an MLP, unlike
    attention), so a scale can be scored on tokens drawn from all calibration sequences.
    ``smooth`` says SmoothQuant scales this group (AWQ scales every group).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    token_wise: bool = False
    smooth: bool = True


@dataclass(frozen=True)
class Family:
    """Where things are in one architecture. The defaults are the names Llama-like models use.

    The residual-stream fields are what a rotation needs: the embedding that starts the
    stream, the norms inside a layer that read it (their readers are the linears of the
    scaling groups whose ``prev`` is that norm), the linears that write back to it, the
    final norm and the head that read it last.
    """

    name: str
    layers: str  # dotted path of the decoder layer list from the top model
    linears: tuple[str, ...]  # quantized linears, relative to one layer
    groups: tuple[ScalingGroup, ...] = field(default=())
    embedding: str = "model.embed_tokens"  # from the top model
    final_norm: str = "model.norm"  # from the top model
    head: str = "lm_head"  # from the top model
    residual_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # per layer
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")  # per layer
    # The linear whose input gets a Hadamard rotation at run time (after the MLP's nonlinearity).
    online_rotated: str | None = "mlp.down_proj"
    # (producer, consumer) of the attention values: one rotation per head of v_proj's output
    # passes through the attention weights unchanged and is undone in o_proj's input.
    value_output: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")

    def norm_readers(self) -> dict[str, tuple[str, ...]]:
        """Residual norm -> the linears that read its output, from the scaling groups."""
        readers = {g.prev: g.linears for g in self.groups if g.prev in self.residual_norms}
        missing = [n for n in self.residual_norms if n not in readers]
        if missing:
            raise LowbitError(
                f"{self.name}: no scaling group says which linears read {', '.join(missing)}; "
                "declare them in lowbit/models/families.py"
            )
        return readers


LLAMA = Family(
    name="llama",
    layers="model.layers",
    linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ),
    groups=(
        ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        # With grouped-query attention v_proj is narrower than o_proj's input; the scale is
        # tied across the query heads that read one KV head (see methods/awq.py). SmoothQuant
        # leaves it: no gain measured, slightly worse per-tensor A8 (docs/ptq.md).
        ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", smooth=False),
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", token_wise=True),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)

# model_type -> family; these share Llama's module names and wiring.
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise LowbitError(f"{type(root).__name__} has no module {path!r}") from None


def family_for(model: nn.Module) -> Family:
    """The declared family of ``model``, or one discovered from its structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is not None:
        return fam
    return discover_family(model)


def _find_layer_list(model: nn.Module) -> str:
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len and any(
            isinstance(m, nn.Linear) for m in mod[0].modules()
        ):
            best, best_len = name, len(mod)
    if best is None:
        raise LowbitError(
            f"{type(model).__name__}: no list of decoder layers with linear layers found; "
            "declare its family in lowbit/models/families.py"
        )
    return best


def discover_family(model: nn.Module) -> Family:
    """Fallback for undeclared architectures: the layer list and its linears.

    Scaling groups are left empty here; :func:`discover_groups` traces them on a real
    forward of a layer once calibration inputs exist.
    """
    layers_path = _find_layer_list(model)
    layer = model.get_submodule(layers_path)[0]
    linears = tuple(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
    return Family(name=f"discovered:{type(model).__name__}", layers=layers_path, linears=linears, groups=())


def _common_parent(names: tuple[str, ...]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def discover_groups(layer: nn.Module, linears: tuple[str, ...], run: Callable[[], object]) -> tuple[ScalingGroup, ...]:
    """Norm→linear groups of ``layer``, traced while ``run()`` does one real forward of it.

    A group is a norm and the linears that receive the very tensor the norm returned; the
    error is measured on their closest common parent module (the attention or MLP block).
    Linear→linear groups (v→o, up→down) pass through attention or an activation that
    tracing cannot see through, so only a declared family gets those.
    """
    norms = {n: m for n, m in layer.named_modules() if "norm" in type(m).__name__.lower()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # keeps outputs alive so ids stay unique
    consumers: dict[str, list[str]] = {}
    hooks = [
        m.register_forward_hook(lambda m_, i, o, n=n: produced.__setitem__(id(o), (n, o))) for n, m in norms.items()
    ]
    for n in linears:
        hooks.append(
            layer.get_submodule(n).register_forward_pre_hook(
                lambda m_, args, n=n: consumers.setdefault(produced.get(id(args[0]), ("",))[0], []).append(n)
            )
        )
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for norm_name in norms:
        lins = tuple(dict.fromkeys(consumers.get(norm_name, ())))
        if lins:
            groups.append(ScalingGroup(norm_name, lins, _common_parent(lins) if len(lins) > 1 else lins[0]))
    return tuple(groups)
