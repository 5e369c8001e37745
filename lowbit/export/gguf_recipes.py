"""llama.cpp's quantization recipes (``llama-quantize`` file types) as data: which GGUF block type each linear gets.

A recipe has a default type and rules per tensor category (llama.cpp's names: attn_v, ffn_down, ...): the
first rule whose condition holds gives the type. A type whose super-block does not divide the row falls
back as llama.cpp's ``tensor_type_fallback`` does. Read from llama.cpp's ``llama_tensor_get_type_impl``
(llama-cpp-python 0.3.36's sources); not reproduced: Falcon's and 70B's special cases, the IQ types other than
IQ4_NL and IQ4_XS.

``recipe_specs(model, "Q3_K_M")`` gives the :class:`~lowbit.specmap.SpecMap` every lowbit method takes, so
the method rounds each linear onto exactly the grid its GGUF tensor will hold.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from ..errors import LowbitError
from ..quantizer import QuantSpec
from ..specmap import SpecMap


@dataclass(frozen=True)
class Context:
    """What a rule may look at: the tensor's layer index among ``n`` of its category, the model's grouping."""

    i: int
    n: int
    gqa: int  # query heads per key/value head
    experts: int  # routed experts (0: dense)
    calibrated: bool  # llama.cpp: an importance matrix was given; lowbit: the method calibrates


def more_bits(c: Context) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return c.i < c.n // 8 or c.i >= 7 * c.n // 8 or (c.i - c.n // 8) % 3 == 2


CONDITIONS = {
    "always": lambda c: True,
    "first_16th": lambda c: c.i < c.n // 16,
    "first_8th": lambda c: c.i < c.n // 8,
    "first_2": lambda c: c.i < 2,
    "first_4": lambda c: c.i < 4,
    "more_bits": more_bits,
    "gqa>=4": lambda c: c.gqa >= 4,
    "8_experts": lambda c: c.experts == 8,
    "calibrated_first_8th": lambda c: c.calibrated and c.i < c.n // 8,
    "uncalibrated_first_8th": lambda c: not c.calibrated and c.i < c.n // 8,
}

# Rules of every recipe, applied after its own (they win).
EIGHT_EXPERTS = {"attn_v": (("8_experts", "q8_0"),), "attn_k": (("8_experts", "q8_0"),)}

# recipe: (default type, {category: ((condition, type), ...)})
RECIPES: dict[str, tuple[str, dict[str, tuple[tuple[str, str], ...]]]] = {
    "Q4_0": ("q4_0", {"ffn_down": (("calibrated_first_8th", "q4_1"),)}),
    "Q4_1": ("q4_1", {}),
    "Q5_0": ("q5_0", {"ffn_down": (("calibrated_first_8th", "q5_1"),)}),
    "Q5_1": ("q5_1", {}),
    "Q8_0": ("q8_0", {}),
    "Q2_K": ("q2_k", {"attn_v": (("gqa>=4", "q4_k"), ("always", "q3_k")), "ffn_down": (("always", "q3_k"),),
                      "attn_output": (("8_experts", "q5_k"), ("always", "q3_k"))}),
    "Q2_K_S": ("q2_k", {"attn_v": (("gqa>=4", "q4_k"),), "ffn_down": (("first_8th", "q4_k"),)}),
    "Q3_K_S": ("q3_k", {"attn_output": (("8_experts", "q5_k"),)}),
    "Q3_K_M": ("q3_k", {"attn_v": (("first_2", "q5_k"), ("always", "q4_k")),
                        "ffn_down": (("first_16th", "q5_k"), ("always", "q4_k")),
                        "attn_output": (("8_experts", "q5_k"), ("always", "q4_k"))}),
    "Q3_K_L": ("q3_k", {"attn_v": (("always", "q5_k"),), "ffn_down": (("always", "q5_k"),),
                        "attn_output": (("always", "q5_k"),)}),
    "Q4_K_S": ("q4_k", {"attn_v": (("first_4", "q5_k"),), "ffn_down": (("first_8th", "q5_k"),),
                        "attn_output": (("8_experts", "q5_k"),)}),
    "Q4_K_M": ("q4_k", {"attn_v": (("more_bits", "q6_k"),), "ffn_down": (("more_bits", "q6_k"),),
                        "attn_output": (("8_experts", "q5_k"),)}),
    "Q5_K_S": ("q5_k", {}),
    "Q5_K_M": ("q5_k", {"attn_v": (("more_bits", "q6_k"),), "ffn_down": (("more_bits", "q6_k"),)}),
    "Q6_K": ("q6_k", {}),
    "IQ4_NL": ("iq4_nl", {"attn_v": (("gqa>=4", "q5_k"),), "ffn_down": (("uncalibrated_first_8th", "q5_k"),),
                          "attn_output": (("8_experts", "q5_k"),)}),
    "IQ4_XS": ("iq4_xs", {"attn_v": (("gqa>=4", "q5_k"),), "ffn_down": (("uncalibrated_first_8th", "q5_k"),),
                          "attn_output": (("8_experts", "q5_k"),)}),
}

# llama.cpp's tensor_type_fallback: a type whose block does not divide the row
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}

# Category of a GGUF tensor name, as llama.cpp's tensor_get_category tests them (first match)
CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
              ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
              ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))


def category(gguf_name: str) -> str:
    return next((cat for key, cat in CATEGORIES if key in gguf_name), "other")


def tensor_type(recipe: str, cat: str, ctx: Context, width: int) -> str:
    """The block type of one tensor of row width ``width`` under ``recipe``."""
    default, rules = RECIPES[recipe]
    kind = default
    for cond, t in rules.get(cat, ()):
        if CONDITIONS[cond](ctx):
            kind = t
            break
    for cond, t in EIGHT_EXPERTS.get(cat, ()):
        if CONDITIONS[cond](ctx):
            kind = t
    if kind in FALLBACK and width % 256:
        kind = FALLBACK[kind]
    if width % 32:
        raise LowbitError(f"a row of {width} weights fits no GGUF block type (llama.cpp keeps such a tensor in "
                          "float16); lowbit cannot write this model with a GGUF recipe")
    return kind


def _layer_of(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    if m is None:
        raise LowbitError(f"cannot tell the layer of {name}")
    return int(m.group(1))


def recipe_specs(model: nn.Module, recipe: str, calibrated: bool) -> SpecMap:
    """Per-linear GGUF block types of ``model`` under llama.cpp's ``recipe`` (Q4_0, Q3_K_M, Q4_K_M, ...)."""
    from ..models.families import family_for
    from ..models.inventory import quantizable_linears
    from .gguf import gguf_linear_names

    key = recipe.upper()
    if key not in RECIPES:
        raise LowbitError(f"unknown GGUF recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    linears = quantizable_linears(model, family_for(model))
    names = gguf_linear_names(model, list(linears))
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    gqa = heads // (getattr(cfg, "num_key_value_heads", None) or heads)
    experts = next((int(getattr(cfg, k)) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(cfg, k, None)), 0)
    cats = {n: category(g) for n, g in names.items()}
    layers_per_cat = Counter(cat for cat, _ in {(cats[n], _layer_of(n)) for n in linears})
    specs = {}
    for n, lin in linears.items():
        ctx = Context(_layer_of(n), layers_per_cat[cats[n]], gqa, experts, calibrated)
        specs[n] = QuantSpec(format=tensor_type(key, cats[n], ctx, lin.in_features))
    default = QuantSpec(format=RECIPES[key][0])
    return SpecMap(default, {n: s for n, s in specs.items() if s != default}, recipe=key)
