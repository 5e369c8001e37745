"""Model-family knowledge, declared as data.

A family says where the decoder layers are, which linears inside a layer get
quantized, and which linears share an input (a *scaling group*): the op that produces
that input (a norm or a previous linear), the linears that consume it, and the module
whose output measures the error of scaling them. It also states the conventions a fold
must respect: a norm that multiplies by ``offset + w`` (Gemma's ``1 + w``), norms that sit
after a sublayer instead of before it (Gemma 2/3's sandwich norms, OLMo 2), fused
producers whose rows a group only partly owns (Phi-3's qkv_proj), float modules that read
a group's input too (an MoE router), and experts stored as 3-D tensors. AWQ, SmoothQuant,
rotation and the GGUF export (each entry's ``gguf``: how llama.cpp stores the type,
:mod:`lowbit.models.llamacpp`) read these tables; nothing else in lowbit knows a model family by name.

Patterns may hold ``{e}``, one per expert of a mixture-of-experts layer; they are expanded
for the model at hand by :func:`family_for`.

Architectures not listed fall back to :func:`discover_family`, which finds the layer
list and the norm→linear groups by running one layer with hooks. Every fold is checked
on calibration inputs before it is kept (:mod:`lowbit.models.fold`), so a wrong guess
costs a group its scale, never the model its function.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import LowbitError
from . import llamacpp
from .llamacpp import Arch


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the output of ``prev``; ``inspect`` is re-run to score a scale.

    ``token_wise`` says ``inspect`` treats every token on its own (an MLP, unlike
    attention), so a scale can be scored on tokens drawn from all calibration sequences.
    ``smooth`` says SmoothQuant scales this group (AWQ scales every group).
    ``part`` names the rows of a fused producer that feed the linears ("v": the value rows
    of a fused q/k/v projection, "up": the second half of a fused gate/up projection).
    ``readers`` are float modules that read the same input (an MoE router): their weights
    take the scale too, so their output is unchanged, and they are never quantized.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    token_wise: bool = False
    smooth: bool = True
    part: str | None = None
    readers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertsLayout:
    """How an MoE block stores its experts as 3-D parameters, so they can be split into linears.

    ``transposed``: stored [experts, in, out] and applied as x @ W (gpt-oss), else [experts, out, in].
    ``interleaved``: gate and up alternate along the fused axis (gpt-oss), else gate then up.
    ``glu``: "act" for act_fn(gate) * up; "gpt_oss" for gpt-oss's clamped (up + 1) * gate * sigmoid(α gate).
    """

    path: str  # the experts module, relative to a decoder layer
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    glu: str = "act"


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
    # Norms multiply by (norm_offset + weight): 0 for Llama, 1 for Gemma's x·(1 + w).
    norm_offset: float = 0.0
    # Norms applied to a sublayer's output before the residual add (sandwich or post-norm):
    # a residual rotation cannot pass through them.
    post_norms: tuple[str, ...] = ()
    # Norm→linear groups found by tracing one layer (wiring that depends on the config, e.g.
    # Falcon's parallel attention), in addition to the declared linear→linear groups.
    trace_norm_groups: bool = False
    experts: ExpertsLayout | None = None
    # q and k feed a softmax through their product: the error of one alone misjudges a clip, so AWQ leaves them
    # unclipped, as llm-awq does
    unclipped: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    gguf: Arch | None = None  # how llama.cpp stores this model type (None: the GGUF export refuses it)

    def norm_readers(self) -> dict[str, tuple[str, ...]]:
        """Residual norm -> the linears that read its output, from the scaling groups."""
        readers = {g.prev: g.linears + g.readers for g in self.groups if g.prev in self.residual_norms}
        missing = [n for n in self.residual_norms if n not in readers]
        if missing:
            raise LowbitError(
                f"{self.name}: no scaling group says which linears read {', '.join(missing)}; "
                "declare them in lowbit/models/families.py"
            )
        return readers


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_QKV_GROUP = ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")
# With grouped-query attention v_proj is narrower than o_proj's input; the scale is tied
# across the query heads that read one KV head (see methods/awq.py). SmoothQuant leaves it:
# no gain measured, slightly worse per-tensor A8 (docs/ptq.md).
_VO_GROUP = ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", smooth=False)
_UP_DOWN = ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")

LLAMA = Family(
    name="llama",
    layers="model.layers",
    linears=(*_ATTN, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    groups=(
        _QKV_GROUP,
        _VO_GROUP,
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", token_wise=True),
        _UP_DOWN,
    ),
)

# Gemma: RMSNorm computes x·(1 + w); GeGLU is still linear in up_proj's output.
GEMMA = replace(LLAMA, name="gemma", norm_offset=1.0)

# Gemma 2/3: sandwich norms. post_attention_layernorm and post_feedforward_layernorm normalise
# a sublayer's output before the residual add; pre_feedforward_layernorm feeds the MLP.
GEMMA2 = replace(
    GEMMA,
    name="gemma2",
    groups=(
        _QKV_GROUP,
        _VO_GROUP,
        ScalingGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", token_wise=True),
        _UP_DOWN,
    ),
    residual_norms=("input_layernorm", "pre_feedforward_layernorm"),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
)

# OLMo 2: norms only after the sublayers, so q/k/v and gate/up read the raw residual stream and
# no norm can absorb their scale; v→o and up→down remain.
OLMO2 = replace(
    LLAMA,
    name="olmo2",
    groups=(_VO_GROUP, _UP_DOWN),
    residual_norms=(),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
)

# Phi-3: fused projections; a group owns only the value rows of qkv_proj, the up half of gate_up_proj.
PHI3 = Family(
    name="phi3",
    unclipped=("self_attn.qkv_proj",),
    layers="model.layers",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    groups=(
        ScalingGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScalingGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", smooth=False, part="v"),
        ScalingGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp", token_wise=True),
        ScalingGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", part="up"),
    ),
    value_output=None,
)

# OPT (the AWQ paper's family): LayerNorm with a bias; ReLU between fc1 and fc2 commutes with s > 0.
OPT = Family(
    name="opt",
    layers="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(
        ScalingGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "self_attn"),
        ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", smooth=False),
        ScalingGroup("final_layer_norm", ("fc1",), "fc1", token_wise=True),
        ScalingGroup("fc1", ("fc2",), "fc2"),
    ),
    embedding="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    residual_norms=("self_attn_layer_norm", "final_layer_norm"),
    residual_writers=("self_attn.out_proj", "fc2"),
    online_rotated="fc2",
    value_output=("self_attn.v_proj", "self_attn.out_proj"),
)

# GPT-2: Conv1D layers (made nn.Linear on load, see models/adapt.py); fused c_attn; GELU MLP.
GPT2 = Family(
    name="gpt2",
    unclipped=("attn.c_attn",),
    layers="transformer.h",
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    groups=(
        ScalingGroup("ln_1", ("attn.c_attn",), "attn"),
        ScalingGroup("attn.c_attn", ("attn.c_proj",), "attn.c_proj", smooth=False, part="v"),
        ScalingGroup("ln_2", ("mlp.c_fc",), "mlp.c_fc", token_wise=True),
    ),
    embedding="transformer.wte",
    final_norm="transformer.ln_f",
    residual_norms=("ln_1", "ln_2"),
    residual_writers=("attn.c_proj", "mlp.c_proj"),
    online_rotated="mlp.c_proj",
    value_output=None,
)

# GPT-NeoX / Pythia and BLOOM: fused, head-interleaved query_key_value (no v→dense group); GELU MLP.
GPT_NEOX = Family(
    name="gpt_neox",
    unclipped=("attention.query_key_value",),
    layers="gpt_neox.layers",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    groups=(
        ScalingGroup("input_layernorm", ("attention.query_key_value",), "attention"),
        ScalingGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp.dense_h_to_4h", token_wise=True),
    ),
    embedding="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    head="embed_out",
    residual_writers=("attention.dense", "mlp.dense_4h_to_h"),
    online_rotated="mlp.dense_4h_to_h",
    value_output=None,
)
BLOOM = replace(
    GPT_NEOX,
    name="bloom",
    unclipped=("self_attention.query_key_value",),
    layers="transformer.h",
    linears=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    groups=(
        ScalingGroup("input_layernorm", ("self_attention.query_key_value",), "self_attention"),
        ScalingGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp.dense_h_to_4h", token_wise=True),
    ),
    embedding="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    head="lm_head",
    residual_writers=("self_attention.dense", "mlp.dense_4h_to_h"),
)

# Falcon: which norm feeds which linears depends on the config (parallel attention, one or two
# norms), so those groups are traced; no linear→linear group (fused qkv, GELU).
FALCON = Family(
    name="falcon",
    unclipped=("self_attention.query_key_value",),
    layers="transformer.h",
    linears=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    groups=(),
    trace_norm_groups=True,
    embedding="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    residual_norms=(),
    residual_writers=("self_attention.dense", "mlp.dense_4h_to_h"),
    online_rotated="mlp.dense_4h_to_h",
    value_output=None,
)

_EXPERT_LINEARS = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
_EXPERT_UP_DOWN = ScalingGroup("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",),
                               "mlp.experts.{e}.down_proj")

# Mixtral, Qwen3-MoE: a router ("gate", kept in float) and experts stored as 3-D tensors.
MIXTRAL = replace(
    LLAMA,
    name="mixtral",
    linears=(*_ATTN, *_EXPERT_LINEARS),
    groups=(
        _QKV_GROUP,
        _VO_GROUP,
        ScalingGroup("post_attention_layernorm", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "mlp",
                     token_wise=True, readers=("mlp.gate",)),
        _EXPERT_UP_DOWN,
    ),
    online_rotated=None,
    residual_writers=("self_attn.o_proj", "mlp.experts.{e}.down_proj"),
    experts=ExpertsLayout("mlp.experts"),
)

# Qwen2-MoE: Mixtral's layout plus a shared expert (plain linears) and its sigmoid gate (float).
QWEN2_MOE = replace(
    MIXTRAL,
    name="qwen2_moe",
    linears=(*_ATTN, *_EXPERT_LINEARS,
             "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
    groups=(
        _QKV_GROUP,
        _VO_GROUP,
        ScalingGroup("post_attention_layernorm",
                     ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                      "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp",
                     token_wise=True, readers=("mlp.gate", "mlp.shared_expert_gate")),
        _EXPERT_UP_DOWN,
        ScalingGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj"),
    ),
    residual_writers=("self_attn.o_proj", "mlp.experts.{e}.down_proj", "mlp.shared_expert.down_proj"),
)

# gpt-oss: experts stored [in, out], gate/up interleaved, with biases; its GLU computes
# (clamp(up) + 1)·glu(gate), not linear in up, so there is no up→down group.
GPT_OSS = replace(
    MIXTRAL,
    name="gpt_oss",
    groups=(
        _QKV_GROUP,
        _VO_GROUP,
        ScalingGroup("post_attention_layernorm", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), "mlp",
                     token_wise=True, readers=("mlp.router",)),
    ),
    experts=ExpertsLayout("mlp.experts", transposed=True, interleaved=True, bias=True, glu="gpt_oss"),
)

# model_type -> family, with how llama.cpp stores it (types without ``gguf`` are not exported to GGUF).
_Q2MOE_EVERY_LAYER = (("decoder_sparse_step", 1, "llama.cpp's qwen2moe has experts in every layer"),
                      ("mlp_only_layers", [], "llama.cpp's qwen2moe has experts in every layer"))
_Q3MOE_EVERY_LAYER = (("decoder_sparse_step", 1, "llama.cpp's qwen3moe has experts in every layer"),
                      ("mlp_only_layers", [], "llama.cpp's qwen3moe has experts in every layer"))
FAMILIES: dict[str, Family] = {
    "llama": replace(LLAMA, gguf=llamacpp.LLAMA),
    # llama.cpp converts Mistral as llama (and ignores its sliding window)
    "mistral": replace(LLAMA, gguf=llamacpp.LLAMA),
    "qwen2": replace(LLAMA, gguf=Arch("qwen2")),
    "qwen3": replace(LLAMA, gguf=Arch("qwen3")),
    "gemma": replace(GEMMA, gguf=Arch("gemma", activations=llamacpp.GELU_TANH)),
    "gemma2": replace(GEMMA2, gguf=Arch("gemma2", activations=llamacpp.GELU_TANH, swa_every=2, attn_scale_layers=46,
                                        extra=(llamacpp.ATTN_SOFTCAP, llamacpp.FINAL_SOFTCAP,
                                               llamacpp.SLIDING_WINDOW))),
    "gemma3_text": replace(GEMMA2, name="gemma3",
                           gguf=Arch("gemma3", activations=llamacpp.GELU_TANH, swa_every=6, attn_scale_layers=62,
                                     extra=(llamacpp.FINAL_SOFTCAP, llamacpp.SLIDING_WINDOW))),
    # OLMo 2: norms after attention and MLP (attn_post_norm, ffn_post_norm), q/k norms over all heads.
    "olmo2": replace(OLMO2, gguf=Arch("olmo2", rope_types=("default",), q_norm_over_hidden=True,
                                      requires=(("attention_bias", False, "llama.cpp's olmo2 has no attention "
                                                                          "biases"),))),
    # Phi-3: fused qkv_proj (attn_qkv, [q; k; v], halves rotated as llama.cpp's phi3 does) and gate_up_proj
    # (ffn_up, gate half first, as llama.cpp's fused SwiGLU splits it): written as they are.
    "phi3": replace(PHI3, gguf=Arch("phi3", rope_dims=True, rope_types=("default",), sliding_window_key=True)),
    "opt": OPT,
    # GPT-2: learned positions, LayerNorm, biases; lowbit's adapted nn.Linear weights [out, in] are llama.cpp's
    # layout already (its converter transposes the Conv1D [in, out] weights; transformers transposes them back).
    "gpt2": replace(GPT2, gguf=Arch(
        "gpt2", activations=("gelu_new", "gelu_pytorch_tanh"), rope=False, layer_norm=True, ffn_attr="n_inner",
        requires=(("scale_attn_weights", True, "llama.cpp scales attention by 1/sqrt(head_dim)"),
                  ("scale_attn_by_inverse_layer_idx", False, "llama.cpp does not scale attention by layer"),
                  ("add_cross_attention", False, "llama.cpp's gpt2 has no cross-attention")))),
    # GPT-NeoX / Pythia: head-interleaved query_key_value (as BLOOM), partial rotary over halves, parallel residual.
    "gpt_neox": replace(GPT_NEOX, gguf=Arch(
        "gptneox", activations=llamacpp.GELU_TANH, layer_norm=True, qkv_interleaved=True, partial_rope=True,
        parallel_residual_key=True, rope_types=("default",), gelu_as_tanh=True,
        requires=(("attention_bias", True, "llama.cpp's gptneox needs the attention biases"),
                  ("tie_word_embeddings", False, "llama.cpp's gptneox needs its own output matrix")))),
    # BLOOM: ALiBi, LayerNorm after the embedding, head-interleaved query_key_value reordered to [q; k; v];
    # BloomGelu is tanh-approximated, as llama.cpp's GELU.
    "bloom": replace(BLOOM, gguf=Arch(
        "bloom", activations=("bloom_gelu",), rope=False, layer_norm=True, qkv_interleaved=True,
        activation="bloom_gelu", ffn_attr=None,
        requires=(("apply_residual_connection_post_layernorm", False, "llama.cpp adds the residual before the norm"),
                  ("pretraining_tp", 1, "llama.cpp has no tensor-parallel slicing")))),
    # Falcon (7B layout): parallel attention, multi-query, query_key_value already [q; k; v], halves rotated.
    "falcon": replace(FALCON, gguf=Arch(
        "falcon", activations=llamacpp.GELU_TANH, layer_norm=True, rope_types=("default",), gelu_as_tanh=True,
        ffn_attr="ffn_hidden_size", multi_query=True, rope_dim_count=True,
        requires=(("new_decoder_architecture", False, "transformers' GGUF reader keeps Falcon-40B's grouped "
                   "query_key_value in llama.cpp's order, so it is not written"),
                  ("multi_query", True, "only Falcon-7B's multi-query layout is written"),
                  ("parallel_attn", True, "llama.cpp's falcon computes attention and MLP in parallel"),
                  ("alibi", False, "llama.cpp's falcon uses rotary positions"),
                  ("bias", False, "llama.cpp's falcon has no linear biases")))),
    # Mixtral is llama.cpp's llama with experts: pairs rotated, top-k weights renormalised.
    "mixtral": replace(MIXTRAL, gguf=replace(llamacpp.LLAMA, norm_topk=True)),
    "qwen3_moe": replace(MIXTRAL, name="qwen3_moe", gguf=Arch("qwen3moe", norm_topk=True, requires=_Q3MOE_EVERY_LAYER)),
    # its shared expert: ffn_*_shexp, sigmoid gate
    "qwen2_moe": replace(QWEN2_MOE, gguf=Arch("qwen2moe", norm_topk=False, requires=_Q2MOE_EVERY_LAYER)),
    # gpt-oss: attention sinks, biases everywhere, router softmax over the top-k logits, clamped SwiGLU
    # (llama.cpp's swiglu_oai: alpha 1.702, limit 7), sliding window on even layers, YaRN rope.
    "gpt_oss": replace(GPT_OSS, gguf=Arch(
        "gpt-oss", activations=("swiglu_oai",), swa_every=2, rope_types=("yarn", "default"), sliding_window_key=True,
        norm_topk=True, activation="swiglu_oai", expert_ffn_attr="intermediate_size",
        requires=(("swiglu_limit", 7.0, "llama.cpp's gpt-oss clamps the SwiGLU at 7"),
                  ("tie_word_embeddings", False, "llama.cpp's gpt-oss needs its own output matrix"),
                  ("attention_bias", True, "llama.cpp's gpt-oss needs the attention biases")))),
}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise LowbitError(f"{type(root).__name__} has no module {path!r}") from None


def family_for(model: nn.Module) -> Family:
    """The family of ``model``, its expert patterns expanded; the model's structure is adapted first
    (Conv1D and 3-D experts become nn.Linear, the same function; see :mod:`lowbit.models.adapt`)."""
    from .adapt import adapt_

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fam = FAMILIES.get(model_type)
    adapt_(model, fam)
    return discover_family(model) if fam is None else expand_experts(fam, model)


def _count_experts(layer: nn.Module, path: str) -> int:
    from .adapt import LinearExperts

    experts = layer.get_submodule(path)
    return len(experts) if isinstance(experts, LinearExperts) else 0


def expand_experts(fam: Family, model: nn.Module) -> Family:
    """``fam`` with every ``{e}`` pattern written out once per expert of the model's layers."""
    if not any("{e}" in n for n in (*fam.linears, *fam.residual_writers)):
        return fam
    layers = get_submodule(model, fam.layers)
    counts = {_count_experts(layer, fam.experts.path) for layer in layers}
    if len(counts) != 1 or 0 in counts:
        raise LowbitError(
            f"{fam.name}: decoder layers differ in structure (experts per layer: {sorted(counts)}); lowbit "
            "quantizes models whose layers are all alike (set mlp_only_layers=[] / decoder_sparse_step=1)"
        )
    n = counts.pop()

    def names(pats: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.format(e=e) for p in pats for e in (range(n) if "{e}" in p else (0,))))

    groups = []
    for g in fam.groups:
        if "{e}" in g.prev:  # one group per expert
            groups += [replace(g, prev=g.prev.format(e=e), linears=tuple(x.format(e=e) for x in g.linears),
                               inspect=g.inspect.format(e=e)) for e in range(n)]
        else:
            groups.append(replace(g, linears=names(g.linears)))
    return replace(fam, linears=names(fam.linears), groups=tuple(groups),
                   residual_writers=names(fam.residual_writers))


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
    forward of a layer once calibration inputs exist. Weights the fallback cannot see as
    linears (3-D parameters of an unknown MoE) make it refuse, rather than report bits it
    did not quantize.
    """
    layers_path = _find_layer_list(model)
    layer = model.get_submodule(layers_path)[0]
    linears = tuple(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
    stray = [n for n, p in layer.named_parameters() if p.dim() >= 3
             or (p.dim() == 2 and not isinstance(layer.get_submodule(n.rpartition(".")[0]), nn.Linear))]
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if stray:
        raise LowbitError(
            f"{model_type}: unknown architecture with weights that are not nn.Linear ({', '.join(stray[:3])}); "
            "lowbit would leave them in float, so it refuses. Declare the family in lowbit/models/families.py"
        )
    norms = [n for n, m in layer.named_modules() if "norm" in type(m).__name__.lower()]
    offset = _guess_norm_offset(layer, norms)
    unclipped = tuple(n for n in linears if any(t in n for t in _QUERY_KEY_NAMES))
    return Family(name=f"discovered:{model_type}", layers=layers_path, linears=linears, groups=(),
                  trace_norm_groups=True, residual_norms=(), norm_offset=offset, unclipped=unclipped)


# what the query and key projections are called across architectures, for a family found by tracing
_QUERY_KEY_NAMES = ("q_proj", "k_proj", "query", "key", "Wqkv", "qkv_proj", "c_attn")


def _guess_norm_offset(layer: nn.Module, norms: list[str]) -> float:
    """1 for norms that compute x·(1 + w) (their weights sit near 0), else 0. A wrong guess is caught by
    the fold check, which then leaves the group unscaled."""
    ws = [getattr(layer.get_submodule(n), "weight", None) for n in norms]
    ws = [w for w in ws if isinstance(w, torch.Tensor) and w.dim() == 1]
    return 1.0 if ws and all(float(w.detach().float().abs().mean()) < 0.3 for w in ws) else 0.0


def _common_parent(names: tuple[str, ...]) -> str:
    return ".".join(os.path.commonprefix([n.split(".")[:-1] for n in names]))


def discover_groups(layer: nn.Module, linears: tuple[str, ...], run: Callable[[], object]) -> tuple[ScalingGroup, ...]:
    """Norm→linear groups of ``layer``, traced while ``run()`` does one real forward of it.

    A group is a norm and the linears that receive the very tensor the norm returned; the
    error is measured on their closest common parent module (the attention or MLP block).
    Linear→linear groups (v→o, up→down) pass through attention or an activation that
    tracing cannot see through, so only a declared family gets those.
    """
    norms = {n: m for n, m in layer.named_modules() if "norm" in type(m).__name__.lower()
             and isinstance(getattr(m, "weight", None), torch.Tensor)}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # keeps outputs alive so ids stay unique
    consumers: dict[str, list[str]] = {}
    hooks = [m.register_forward_hook(lambda m_, i, o, n=n: produced.__setitem__(id(o), (n, o)))
             for n, m in norms.items()]
    hooks += [layer.get_submodule(n).register_forward_pre_hook(
        lambda m_, args, n=n: consumers.setdefault(produced.get(id(args[0]), ("",))[0], []).append(n))
        for n in linears]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for norm_name in norms:
        lins = tuple(dict.fromkeys(consumers.get(norm_name, ())))
        if lins:
            parent = _common_parent(lins) if len(lins) > 1 else lins[0]
            groups.append(ScalingGroup(norm_name, lins, parent, token_wise=bool(re.search(r"mlp|ffn|feed", parent))))
    return tuple(groups)
