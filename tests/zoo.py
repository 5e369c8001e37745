"""Tiny random causal LMs of many families, built from transformers' own configs (no download).

Every width is a multiple of 32, so group size 32 fits every linear input. The weights are
jittered so that what makes families differ is visible: norm gains away from one (and around
zero for Gemma's x*(1+w) norms), non-zero biases, a few salient hidden channels ×10, and
routers wide enough to spread tokens over experts.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

HIDDEN, LAYERS, VOCAB, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 256, 128, 4, 2, 16
EXPERTS, TOP_K, EXPERT_INTERMEDIATE = 4, 2, 64
SLIDING_WINDOW = 8  # well below the 32-token samples, so the sliding mask changes the result
SALIENT = 3  # hidden channels whose norm gain is ×10: AWQ's salient channels
ROUTER_STD = 0.5
# Llama-7B's weights have std ~0.02 at width 4096, a gain of ~1.3 per linear; 1/sqrt(64) keeps a similar gain
# here, so attention is not uniform and logits are not all near zero (0.02 at width 64 would make both so).
INIT_STD = HIDDEN ** -0.5

# Families that support grouped-query attention share this; the rest are spelled out in their own words.
_GQA = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=VOCAB, intermediate_size=INTERMEDIATE,
    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=128,
)
_MOE = dict(_GQA, num_experts_per_tok=TOP_K)
# Model-type defaults put these ids beyond a 256-token vocabulary (Phi-3's pad id is an embedding padding_idx).
_COMMON = dict(pad_token_id=None, bos_token_id=1, eos_token_id=2, initializer_range=INIT_STD)

# name -> (model_type, config overrides, attention implementation)
_FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", _GQA, "sdpa"),
    # Mistral-7B-v0.1's 4096 window would leave it a copy of llama at 32 tokens
    "mistral": ("mistral", dict(_GQA, sliding_window=SLIDING_WINDOW), "sdpa"),
    "qwen2": ("qwen2", _GQA, "sdpa"),  # q/k/v biases are its default
    "qwen3": ("qwen3", _GQA, "sdpa"),  # q_norm / k_norm per head
    "gemma": ("gemma", _GQA, "sdpa"),
    # soft-capping needs eager attention; Gemma-2's own caps (50, 30) already move this model's logits by 10-20%
    "gemma2": ("gemma2", dict(_GQA, query_pre_attn_scalar=HEAD_DIM, sliding_window=SLIDING_WINDOW,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "eager"),
    "gemma3": ("gemma3_text", dict(_GQA, query_pre_attn_scalar=HEAD_DIM, sliding_window=SLIDING_WINDOW,
                                   layer_types=["sliding_attention", "full_attention"]), "eager"),
    "phi3": ("phi3", _GQA, "sdpa"),  # fused qkv_proj and gate_up_proj
    "opt": ("opt", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=VOCAB, ffn_dim=INTERMEDIATE,
                        num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, do_layer_norm_before=True,
                        max_position_embeddings=128, init_std=INIT_STD), "sdpa"),
    "gpt2": ("gpt2", dict(n_embd=HIDDEN, n_layer=LAYERS, vocab_size=VOCAB, n_inner=INTERMEDIATE, n_head=HEADS,
                          n_positions=128), "sdpa"),  # Conv1D: weights stored [in, out]
    # Falcon-7B's shape: parallel attention, multi-query (one KV head), no biases, rotary
    "falcon": ("falcon", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                              num_attention_heads=HEADS, ffn_hidden_size=INTERMEDIATE), "sdpa"),
    "gpt_neox": ("gpt_neox", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                  intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                                  max_position_embeddings=128), "sdpa"),
    "olmo2": ("olmo2", _GQA, "sdpa"),  # norms after attention and MLP, q/k norms over all heads
    "bloom": ("bloom", dict(hidden_size=HIDDEN, n_layer=LAYERS, vocab_size=VOCAB, n_head=HEADS), "eager"),
    "mixtral": ("mixtral", dict(_MOE, intermediate_size=EXPERT_INTERMEDIATE, num_local_experts=EXPERTS), "sdpa"),
    "qwen2_moe": ("qwen2_moe", dict(_MOE, moe_intermediate_size=EXPERT_INTERMEDIATE, num_experts=EXPERTS,
                                    shared_expert_intermediate_size=EXPERT_INTERMEDIATE), "sdpa"),
    "qwen3_moe": ("qwen3_moe", dict(_MOE, moe_intermediate_size=EXPERT_INTERMEDIATE, num_experts=EXPERTS,
                                    norm_topk_prob=True), "sdpa"),
    # attention sinks need eager attention; layers alternate sliding and full by default; its YaRN rope
    # warns unless max_position_embeddings stays at its default
    "gpt_oss": ("gpt_oss", dict(_MOE, max_position_embeddings=131072, intermediate_size=EXPERT_INTERMEDIATE,
                                num_local_experts=EXPERTS, sliding_window=SLIDING_WINDOW), "eager"),
}

ZOO: tuple[str, ...] = tuple(_FAMILIES)

# Their norms compute x * (1 + w): w near zero is a gain near one.
OFFSET_NORM_TYPES = frozenset({"gemma", "gemma2", "gemma3_text"})
_PER_HEAD_NORMS = ("q_norm", "k_norm")  # not on the hidden stream: no salient channels


def tiny_config(name: str):
    """The transformers config of zoo family ``name``."""
    if name not in _FAMILIES:
        raise KeyError(f"no zoo family {name!r}; choose one of {', '.join(ZOO)}")
    model_type, overrides, _ = _FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**_COMMON, **overrides})


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of family ``name`` in float32, eval mode, without gradients."""
    cfg = tiny_config(name)
    with torch.random.fork_rng(devices=[]):  # from_config draws from the global generator; leave it as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=_FAMILIES[name][2])
    model.eval().requires_grad_(False)
    _jitter(model, seed)
    return model


def salient_channels(model: torch.nn.Module, seed: int = 0) -> torch.LongTensor:
    """The hidden channels whose norm gains ``tiny_model(..., seed)`` made ×10 larger."""
    hidden = model.get_input_embeddings().embedding_dim
    return torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:SALIENT]


def tiny_samples(model: torch.nn.Module, n: int = 8, seq: int = 32, seed: int = 0) -> torch.LongTensor:
    """``n`` rows of ``seq`` random token ids in the vocabulary of ``model``."""
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _uniform(shape, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


@torch.no_grad()
def _jitter(model: torch.nn.Module, seed: int) -> None:
    """Move norm gains, biases and routers away from their all-equal initial values, as trained models are."""
    hidden = model.get_input_embeddings().embedding_dim
    offset = model.config.model_type in OFFSET_NORM_TYPES
    salient = salient_channels(model, seed)
    g = torch.Generator().manual_seed(seed + 1)  # apart from the stream salient_channels draws from
    for mod_name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__
        for p_name, p in module.named_parameters(recurse=False):
            if p_name.endswith("bias"):  # also gpt-oss's per-expert [experts, out] biases, zero at init
                p.copy_(_uniform(p.shape, -0.1, 0.1, g))
            elif is_norm and p.dim() == 1:
                p.copy_(_uniform(p.shape, -0.5, 0.5, g) if offset else _uniform(p.shape, 0.5, 1.5, g))
                if p.numel() == hidden and mod_name.rsplit(".", 1)[-1] not in _PER_HEAD_NORMS:
                    # ×10 on the gain actually applied: 1 + w for offset norms, w for the rest
                    p[salient] = 10 * (1 + p[salient]) - 1 if offset else 10 * p[salient]
            elif p_name == "weight" and type(module).__name__.endswith("Router"):
                p.copy_(torch.randn(p.shape, generator=g) * ROUTER_STD)
