"""How llama.cpp stores a model family: its architecture name, its conventions and what it computes differently.

Each model type's :class:`Arch` is declared on its entry in :data:`lowbit.models.families.FAMILIES` (the
``gguf`` field), beside everything else lowbit knows about that family; the GGUF export reads it from there.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import Keys


@dataclass(frozen=True)
class Arch:
    """How llama.cpp stores one Hugging Face model type, and where its computation differs from it."""

    gguf: str  # llama.cpp's architecture name
    # llama.cpp's llama rotates adjacent pairs where Hugging Face rotates halves: q/k rows (and biases) are permuted.
    rotary_pairs: bool = False
    rope_dims: bool = False  # also states rope.dimension_count and vocab_size (llama)
    extra: tuple[tuple[str, str, type], ...] = ()  # (GGUF key, config attribute, int | float), written when set
    activations: tuple[str, ...] = ("silu",)  # the MLP activation llama.cpp computes for this architecture
    # llama.cpp fixes which layers use the sliding window: every n-th is full attention, the rest slide.
    swa_every: int = 0
    # llama.cpp scales attention scores by 1/sqrt(head_dim), except at this layer count (the 27B models),
    # where it uses 1/sqrt(hidden / heads); Hugging Face reads query_pre_attn_scalar.
    attn_scale_layers: int | None = None
    rope: bool = True  # rotary positions (rope.freq_base, rope.dimension_count); False: learned or ALiBi
    layer_norm: bool = False  # LayerNorm with bias (attention.layer_norm_epsilon), not RMSNorm
    rope_types: tuple[str, ...] | None = None  # the rope types it writes, when not default / linear (/ llama3)
    # llama.cpp's converter reorders a head-interleaved fused query_key_value (BLOOM) to [q; k; v]
    qkv_interleaved: bool = False
    sliding_window_key: bool = False  # writes attention.sliding_window (0: none), applied to every layer (Phi-3)
    # llama.cpp rotates only the first partial_rotary_factor of each head (GPT-NeoX): rope.dimension_count says so
    partial_rope: bool = False
    parallel_residual_key: bool = False  # writes use_parallel_residual (GPT-NeoX)
    # Whether llama.cpp renormalises the top-k routing weights of this architecture to sum to one (MoE only)
    norm_topk: bool | None = None
    # (config attribute, the value llama.cpp computes, what it computes instead): other values are refused
    requires: tuple[tuple[str, object, str], ...] = ()
    activation: str | None = None  # the activation it computes whatever the config says (BLOOM's GELU, gpt-oss)
    gelu_as_tanh: bool = False  # computes an exact GELU with the tanh approximation (as its converter accepts)
    q_norm_over_hidden: bool = False  # sizes q_norm by the hidden size, so heads × head_dim must equal it (OLMo 2)
    ffn_attr: str | None = "intermediate_size"  # the config's MLP width (None: 4 × hidden, BLOOM)
    expert_ffn_attr: str | None = None  # an expert's width when the config has no moe_intermediate_size
    multi_query: bool = False  # one key/value head (Falcon-7B)
    rope_dim_count: bool = False  # also writes rope.dimension_count (Falcon)


LLAMA = Arch("llama", rotary_pairs=True, rope_dims=True)
GELU_TANH = ("gelu_pytorch_tanh",)
SLIDING_WINDOW = (Keys.Attention.SLIDING_WINDOW, "sliding_window", int)
FINAL_SOFTCAP = (Keys.LLM.FINAL_LOGIT_SOFTCAPPING, "final_logit_softcapping", float)
ATTN_SOFTCAP = (Keys.LLM.ATTN_LOGIT_SOFTCAPPING, "attn_logit_softcapping", float)
