"""GGUF export of a lowbit packed model for llama.cpp: lowbit's own codes, written as llama.cpp blocks.

No re-rounding: each packed weight maps onto a GGUF block type whose grid contains it.

- W4 symmetric (codes q in [-7, 7], or [-8, 7] on the full-range grid, which is exactly llama.cpp's:
  the signed extreme on -8, d negative when it is positive) -> Q4_0, x = d·(c - 8) with c = q + 8, d = s;
- W4 asymmetric (w = (u - z)·s)     -> Q4_1, x = d·c + m with c = u, d = s, m = -z·s;
- W8 symmetric (the 8-bit embedding) -> Q8_0, x = d·q.

Blocks hold 32 weights, so the group size must be a multiple of 32 (several blocks then share a
group's scale). The only loss is storing d and m as float16, as GGUF does; the export reports
the largest change this makes to any weight, in quantization steps.

Hyperparameters and tokenizer are copied from the GGUF file the model was quantized from when there
is one (the default model ships as one); otherwise they are written from the Hugging Face config.json
and tokenizer saved in the packed directory (:mod:`lowbit.export.gguf_vocab`). Either way the
family's conventions apply, as llama.cpp's own converter applies them:

- norms of a family that computes x·(offset + w) (Gemma: 1 + w, ``Family.norm_offset``) are stored
  as offset + w, llama.cpp's x·w; q_norm and k_norm included;
- llama.cpp's llama architecture rotates adjacent pairs where Hugging Face rotates halves, so q_proj
  and k_proj rows (and biases) are permuted; its qwen2, qwen3 and gemma architectures rotate halves;
- fused projections are written fused, in llama.cpp's row order: Phi-3's qkv_proj and gate_up_proj as they
  are, BLOOM's head-interleaved query_key_value reordered to [q; k; v], Falcon-7B's (multi-query, already
  [q; k; v]) as it is; GPT-2's Conv1D weights, made nn.Linear [out, in] by lowbit, are llama.cpp's layout;
- mixture-of-experts layers, which lowbit holds as one nn.Linear per expert, are written as llama.cpp's
  stacked [experts, out, in] tensors (ffn_gate_exps, ffn_up_exps, ffn_down_exps; biases likewise), the
  router (ffn_gate_inp) in float, Qwen2-MoE's shared expert and its gate as ffn_*_shexp;
- what llama.cpp computes differently (another activation, a sliding-window layout other than its
  fixed one, another attention scale, an unsupported rope scaling, other top-k routing weights) is
  refused, not written.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import Keys

from ..errors import LowbitError
from ..formats.ggml import GGUF_IDS_BEYOND_GGUF_PY, ggml_type, to_blocks
from ..models.fold import config_head_dim
from ..models.llamacpp import Arch
from ..pack.tensor import PackedTensor

BLOCK = 32
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
              "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
              "Q2_K_S": 21, "IQ4_NL": 25, "IQ4_XS": 30, "Q1_0": 40, "Q2_0": 41}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
PURE_FILE_TYPES = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}  # a single K type names its _S file type


def gguf_type(pt: PackedTensor) -> str:
    """The GGUF block type that holds ``pt`` exactly (up to float16 scales), or a LowbitError saying what fits."""
    if pt.ggml is not None:
        return pt.ggml.name
    if pt.group_size % BLOCK == 0:
        if pt.bits == 4:
            return "Q4_0" if pt.symmetric else "Q4_1"
        if pt.bits == 8 and pt.symmetric:
            return "Q8_0"
    raise LowbitError(
        f"GGUF export holds W4 symmetric (Q4_0), W4 asymmetric (Q4_1) and W8 symmetric (Q8_0) with group sizes "
        f"that are multiples of 32; this weight is {pt.spec.describe()}"
    )


def gguf_blocks(pt: PackedTensor) -> tuple[str, np.ndarray, float]:
    """(type, uint8 blocks [rows, bytes per row], largest change of a weight by the float16 d and m, in
    quantization steps of its group)."""
    kind = gguf_type(pt)
    rows = pt.shape[0]
    if pt.ggml is not None:  # quantized on the type's own grid: the codes and parameters go in as they are
        qt = pt.to_qtensor()
        return kind, to_blocks(qt.q, qt.scale, qt.zero, pt.ggml), 0.0
    u = pt.codes().to(torch.int16)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # [rows, n_groups] -> [rows, n_blocks, 1]
        return t.float().repeat_interleave(pt.group_size // BLOCK, 1).unsqueeze(-1)

    s = per_block(pt.scales)
    d = s.half()
    parts = [d.numpy().view(np.uint8).reshape(rows, -1, 2)]
    if kind == "Q8_0":
        q = (u - pt.offset).view(rows, -1, BLOCK)
        decoded = d.float() * q
        parts.append(q.to(torch.int8).numpy().view(np.uint8))
    else:
        c = (u + 8 - pt.offset if kind == "Q4_0" else u).view(rows, -1, BLOCK)  # Q4_0 stores q + 8
        if kind == "Q4_0":
            decoded = d.float() * (c - 8)
        else:
            m = (-per_block(pt.zeros()) * s).half()
            decoded = d.float() * c + m.float()
            parts.append(m.numpy().view(np.uint8).reshape(rows, -1, 2))
        c = c.to(torch.uint8).view(rows, -1, 2, BLOCK // 2)  # element j in the low nibble, j + 16 in the high
        parts.append((c[:, :, 0] | (c[:, :, 1] << 4)).numpy())
    ours = pt.dequantize().view(rows, -1, BLOCK)
    change = float(((decoded - ours).abs() / s.abs()).max()) if ours.numel() else 0.0
    return kind, np.concatenate(parts, -1).reshape(rows, -1), change


def rotary_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order taking Hugging Face's rotary layout (each head's halves) to llama.cpp's (adjacent pairs)."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def head_interleaved_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order taking a fused query_key_value interleaved per head ([head][q, k, v][head_dim], BLOOM) to
    llama.cpp's [all q; all k; all v], as its converter reorders it."""
    return torch.arange(rows).reshape(n_head, 3, rows // n_head // 3).transpose(0, 1).reshape(-1)


def permute_rows(pt: PackedTensor, n_head: int, order: torch.Tensor | None = None) -> PackedTensor:
    """Reorder output rows from Hugging Face's rotary layout (halves) to llama.cpp's (pairs), or by ``order``."""
    order = rotary_order(pt.shape[0], n_head) if order is None else order
    from ..pack.bits import pack_bits

    codes = pt.codes()[order]
    zeros = None if pt.symmetric or pt.qzeros is None else pack_bits(pt.zeros()[order].to(torch.int64), pt.bits)
    offsets = None if pt.offsets is None else pt.offsets[order].contiguous()
    return PackedTensor(pt.shape, pt.bits, pt.group_size, pt.symmetric, pack_bits(codes.to(torch.int64), pt.bits),
                        pt.scales[order].contiguous(), zeros, pt.full_range, pt.format, offsets)


def norm_offset(model_type: str, family: str | None = None) -> float:
    """What the family's norms add to their weight (Gemma's x·(1 + w)): llama.cpp stores the sum."""
    from ..models.families import FAMILIES

    fam = FAMILIES.get(model_type) or next((f for f in FAMILIES.values() if f.name == family), None)
    if fam is None:
        raise LowbitError(f"GGUF export: no model family is declared for model type {model_type!r}")
    return float(fam.norm_offset)


def arch_for(model_type: str) -> Arch:
    """The llama.cpp architecture for a Hugging Face model type (its family's ``gguf``), or a LowbitError naming
    it: a type without one is refused rather than written with conventions nobody checked."""
    from ..models.families import FAMILIES

    arch = getattr(FAMILIES.get(model_type), "gguf", None)
    if arch is None:
        raise LowbitError(f"GGUF export does not support model type {model_type!r}; it writes "
                          f"{', '.join(sorted(t for t, f in FAMILIES.items() if f.gguf is not None))}")
    return arch


def _rope(cfg, layer_type: str | None = None) -> dict:
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rp.setdefault("rope_type", "default")
    return rp


def _partial_rotary(cfg) -> float:
    return float(_rope(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None) or 1.0))


def _n_experts(cfg) -> int | None:
    return getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)


def _n_kv(cfg, arch: Arch) -> int:
    return 1 if arch.multi_query else getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def check_config(cfg, arch: Arch) -> list[str]:
    """Refuse what llama.cpp would compute differently from the Hugging Face model; returns warnings."""
    name, notes = cfg.model_type, []
    act = (getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
           or getattr(cfg, "activation_function", None) or getattr(cfg, "activation", None))
    act = arch.activation or act
    if arch.gelu_as_tanh and act == "gelu":
        act = "gelu_pytorch_tanh"
        notes.append(f"llama.cpp computes {name}'s exact GELU with the tanh approximation (as its own converter "
                     "accepts): activations differ by up to about 1e-3")
    if arch.rope and not arch.partial_rope and _partial_rotary(cfg) != 1.0:
        raise LowbitError(f"GGUF export: {name} with partial_rotary_factor != 1 is not supported")
    if arch.norm_topk is not None:
        renorm = bool(getattr(cfg, "norm_topk_prob", True))  # Mixtral always renormalises
        if renorm != arch.norm_topk:
            raise LowbitError(f"GGUF export: {name} with norm_topk_prob={renorm}; llama.cpp's {arch.gguf} "
                              f"{'renormalises' if arch.norm_topk else 'does not renormalise'} the top-k weights")
    if arch.q_norm_over_hidden and config_head_dim(cfg) * cfg.num_attention_heads != cfg.hidden_size:
        raise LowbitError(f"GGUF export: {name} with heads × head_dim != hidden_size; llama.cpp's {arch.gguf} "
                          "sizes its q_norm by the hidden size")
    for attr, want, why in arch.requires:
        if getattr(cfg, attr, want) != want:
            raise LowbitError(f"GGUF export: {name} with {attr}={getattr(cfg, attr)!r}; {why}")
    if act not in arch.activations:
        raise LowbitError(f"GGUF export: {name} with activation {act!r}; llama.cpp's {arch.gguf} computes "
                          f"{' / '.join(arch.activations)}")
    if getattr(cfg, "use_sliding_window", False):
        raise LowbitError(f"GGUF export: {name} with use_sliding_window=True; llama.cpp's {arch.gguf} has no "
                          "sliding window")
    if arch.gguf == "llama" and getattr(cfg, "sliding_window", None):
        notes.append(f"llama.cpp ignores the sliding window ({cfg.sliding_window} tokens): longer contexts "
                        "attend further than in the original")
    layer_types = getattr(cfg, "layer_types", None)
    if arch.swa_every and layer_types is not None:
        want = ["full_attention" if (i + 1) % arch.swa_every == 0 else "sliding_attention"
                for i in range(cfg.num_hidden_layers)]
        if list(layer_types) != want:
            raise LowbitError(f"GGUF export: {name} layer_types differ from llama.cpp's fixed pattern (every "
                              f"{arch.swa_every}th layer full attention)")
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None:
        ok = scalar == config_head_dim(cfg) or (cfg.num_hidden_layers == arch.attn_scale_layers
                                          and scalar == cfg.hidden_size // cfg.num_attention_heads)
        if not ok:
            raise LowbitError(f"GGUF export: {name} with query_pre_attn_scalar={scalar}; llama.cpp scales "
                              f"attention by 1/sqrt(head_dim={config_head_dim(cfg)})")
    layers = ("sliding_attention", "full_attention") if arch.swa_every else (None,) if arch.rope else ()
    for lt in layers:
        kind = _rope(cfg, lt)["rope_type"]
        allowed = arch.rope_types if arch.rope_types else ("default",) if lt == "sliding_attention" else \
            ("default", "linear", "llama3") if arch.rotary_pairs else ("default", "linear")
        if kind not in allowed:
            raise LowbitError(f"GGUF export: {name} with rope_type {kind!r}"
                              f"{' on ' + lt + ' layers' if lt else ''} is not supported; it writes "
                              f"{', '.join(allowed)}")
    return notes


def add_hparams(writer, cfg, arch: Arch, name: str) -> dict[str, np.ndarray]:
    """Write ``cfg``'s hyperparameters under llama.cpp's keys; returns extra float tensors (rope_freqs)."""
    a = arch.gguf
    head_dim, n_head = config_head_dim(cfg), cfg.num_attention_heads
    writer.add_name(name)
    # BLOOM has no context length (ALiBi); llama.cpp's converter writes seq_length or else the width
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None) or cfg.hidden_size
    writer.add_context_length(int(ctx))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(int((getattr(cfg, arch.ffn_attr, None) if arch.ffn_attr else None)
                                       or 4 * cfg.hidden_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(_n_kv(cfg, arch))
    if arch.layer_norm:
        writer.add_layer_norm_eps(float(getattr(cfg, "layer_norm_epsilon", None) or cfg.layer_norm_eps))
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch.sliding_window_key:  # Phi-3 as llama.cpp's converter: 0 is no window
        writer.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))
        orig = getattr(cfg, "original_max_position_embeddings", None)
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    if arch.parallel_residual_key:
        writer.add_parallel_residual(bool(getattr(cfg, "use_parallel_residual", True)))
    if _n_experts(cfg):
        writer.add_expert_count(int(_n_experts(cfg)))
        writer.add_expert_used_count(int(cfg.num_experts_per_tok))
        ffn_exp = getattr(cfg, "moe_intermediate_size", None) or (getattr(cfg, arch.expert_ffn_attr)
                                                                   if arch.expert_ffn_attr else None)
        if ffn_exp:
            writer.add_expert_feed_forward_length(int(ffn_exp))
        if getattr(cfg, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(int(cfg.shared_expert_intermediate_size))
    if not arch.rope:
        return {}
    if arch.rope_dim_count:
        writer.add_rope_dimension_count(head_dim)
    if arch.partial_rope:
        writer.add_rope_dimension_count(int(head_dim * _partial_rotary(cfg)))
    full = _rope(cfg, "full_attention" if arch.swa_every else None)
    writer.add_rope_freq_base(float(full["rope_theta"]))
    if arch.swa_every:
        writer.add_float32(Keys.Rope.FREQ_BASE_SWA.format(arch=a), float(_rope(cfg, "sliding_attention")["rope_theta"]))
    if arch.rope_dims:
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    for key, attr, kind in arch.extra:
        value = getattr(cfg, attr, None)
        if value is not None:
            (writer.add_uint32 if kind is int else writer.add_float32)(key.format(arch=a), kind(value))
    extra: dict[str, np.ndarray] = {}
    if full["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif full["rope_type"] == "yarn":  # as llama.cpp's converter writes it
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(full["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if full.get(key) is not None:
                add(float(full[key]))
    elif full["rope_type"] == "llama3":
        extra[f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"] = llama3_rope_factors(cfg)
    return extra


def llama3_rope_factors(cfg) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3 rope scaling: what each rotary frequency is divided by, taken from
    Hugging Face's own computation of the scaled frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = config_head_dim(cfg)
    base = 1.0 / (float(_rope(cfg)["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    return (base / scaled.float()).numpy().astype(np.float32)


def _source_gguf(doc: dict) -> Path | None:
    """The GGUF file the model was quantized from, if that is where it came from and it is still there."""
    from ..models.loading import BUILTIN, builtin_gguf

    src = str(doc.get("source_model", ""))
    if src in BUILTIN:
        try:
            return builtin_gguf(src)
        except LowbitError:
            return None
    return Path(src) if src.endswith(".gguf") and Path(src).is_file() else None


def tensor_plan(doc: dict, tensors: dict[str, torch.Tensor], arch: Arch, n_head: int, n_kv: int, offset: float,
                names) -> tuple[list[tuple[str, np.ndarray, str | None]], set[str], float]:
    """(GGUF name, data, block type or None for float) for every tensor, with the family's conventions applied;
    the block types used and the largest float16 change in steps."""
    plan: list[tuple[str, np.ndarray, str | None]] = []  # Hugging Face names until the end
    packed_names: set[str] = set()
    types, worst = set(), 0.0
    for name, entry in doc["tensors"].items():
        pt = PackedTensor.from_parts(name, entry, tensors)
        packed_names |= set(pt.tensors(name))
        if arch.rotary_pairs and name.endswith("q_proj"):
            pt = permute_rows(pt, n_head)
        elif arch.rotary_pairs and name.endswith("k_proj"):
            pt = permute_rows(pt, n_kv)
        elif arch.qkv_interleaved and name.endswith("query_key_value"):
            pt = permute_rows(pt, n_head, head_interleaved_order(pt.shape[0], n_head))
        kind, blocks, change = gguf_blocks(pt)
        types.add(kind)
        worst = max(worst, change)
        plan.append((name + ".weight", blocks, kind))
    for key, t in tensors.items():
        if key in packed_names:
            continue
        # A float16 matrix (an embedding kept in fp16) stays float16; vectors are written float32, as llama.cpp wants.
        t = t if t.dtype == torch.float16 and t.dim() == 2 else t.float()
        if key.endswith("norm.weight"):  # every RMSNorm, q_norm and k_norm included, as llama.cpp's converter
            t = t + offset
        if arch.rotary_pairs and key.endswith(("q_proj.bias", "k_proj.bias")):
            t = t[rotary_order(t.shape[0], n_head if key.endswith("q_proj.bias") else n_kv)]
        if arch.qkv_interleaved and key.endswith("query_key_value.bias"):
            t = t[head_interleaved_order(t.shape[0], n_head)]
        if key.endswith("shared_expert_gate.weight"):  # [1, hidden] -> llama.cpp's {hidden}
            t = t.reshape(-1)
        plan.append((key, t.numpy(), None))
    return [(_gguf_name(names, n), data, kind) for n, data, kind in stack_experts(plan)], types, worst


_EXPERT = re.compile(r"^(?P<stem>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.(?P<part>weight|bias)$")


def stack_experts(plan: list[tuple[str, np.ndarray, str | None]]) -> list[tuple[str, np.ndarray, str | None]]:
    """lowbit's per-expert linears (``...experts.{e}.gate_proj.weight``) as llama.cpp's stacked tensors
    (``...experts.gate_proj.weight``, [experts, rows, row bytes]): every expert of a projection must be there,
    with one shape and one block type."""
    out: list[tuple[str, np.ndarray, str | None]] = []
    groups: dict[str, list[tuple[int, np.ndarray, str | None]]] = {}
    for name, data, kind in plan:
        m = _EXPERT.match(name)
        if m is None:
            out.append((name, data, kind))
            continue
        stacked = f"{m['stem']}.{m['proj']}.{m['part']}"
        if stacked not in groups:
            out.append((stacked, None, None))  # keeps the place of the first expert in the file
        groups.setdefault(stacked, []).append((int(m["e"]), data, kind))
    for i, (name, data, _) in enumerate(out):
        if data is not None:
            continue
        experts = sorted(groups[name], key=lambda x: x[0])
        if [e for e, _, _ in experts] != list(range(len(experts))):
            raise LowbitError(f"GGUF export: {name} is missing experts ({[e for e, _, _ in experts]})")
        if len({(d.shape, d.dtype, k) for _, d, k in experts}) != 1:
            raise LowbitError(f"GGUF export: the experts of {name} differ in shape or type; llama.cpp stacks "
                              "them into one tensor")
        out[i] = (name, np.stack([d for _, d, _ in experts]), experts[0][2])
    return out


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict:
    """Write the packed model in ``model_dir`` as a GGUF file at ``out``; returns what was written.

    Hyperparameters and tokenizer come from the GGUF file the model was quantized from when there is one
    (llama.cpp wrote them), else from the Hugging Face config and tokenizer saved beside the weights.
    """
    from transformers import AutoConfig

    from ..atomic_write import atomic_path, check_writable
    from ..pack.checkpoint import read_config, read_weights
    from .gguf_vocab import add_vocab, read_vocab

    out = check_writable(out, force)
    model_dir = Path(model_dir)
    doc = read_config(model_dir)
    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LowbitError(f"GGUF export needs the model's config.json in {model_dir}: {e}") from None
    arch = arch_for(cfg.model_type)
    offset = norm_offset(cfg.model_type, doc.get("family"))
    source = _source_gguf(doc)
    reader = gguf.GGUFReader(source) if source is not None else None
    notes: list[str] = []
    if reader is not None:
        got = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
        if got != arch.gguf:
            raise LowbitError(f"the source GGUF {source} has architecture {got!r}, but the model type "
                              f"{cfg.model_type!r} is written as {arch.gguf!r}")
        n_layers = int(reader.get_field(f"{got}.block_count").contents())
        n_head = int(reader.get_field(f"{got}.attention.head_count").contents())
        kv_field = reader.get_field(f"{got}.attention.head_count_kv")
        n_kv = int(kv_field.contents()) if kv_field else n_head
        vocab = None
    else:
        notes = check_config(cfg, arch)
        for note in notes:
            warnings.warn(f"GGUF export: {note}", stacklevel=2)
        n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
        n_kv = _n_kv(cfg, arch)
        vocab = read_vocab(model_dir, cfg.vocab_size)
    names = _tensor_names(arch, n_layers)
    tensors = read_weights(model_dir, doc)
    plan, types, worst = tensor_plan(doc, tensors, arch, n_head, n_kv, offset, names)
    main_type = file_type(doc, types)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.gguf)
        if reader is not None:
            _copy_fields(writer, reader)
        else:
            name = Path(str(doc.get("source_model") or model_dir)).name
            for tname, data in add_hparams(writer, cfg, arch, name).items():
                plan.append((tname, data, None))
            add_vocab(writer, vocab)
        writer.add_file_type(FILE_TYPES[main_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("lowbit.method", str(doc.get("method")))
        for gname, data, kind in plan:
            add_tensor(writer, gname, data, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out), "bytes": out.stat().st_size, "types": sorted(types), "file_type": main_type,
            "max_change_steps": worst, "tensors": len(plan), "architecture": arch.gguf,
            "metadata": "source GGUF" if reader is not None else "Hugging Face config", "warnings": notes}


def add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, kind: str | None) -> None:
    """One tensor: float data as is, or a block type's bytes [rows, row bytes]. A type the gguf package does not
    name yet (Q2_0) goes in by its ggml id with its shape in weights, as the package writes the others."""
    if kind is None:
        writer.add_tensor(name, data)
    elif hasattr(gguf.GGMLQuantizationType, kind):
        writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    else:
        t = ggml_type(kind)
        shape = (*data.shape[:-1], data.shape[-1] // t.type_size * t.span)
        writer.add_tensor(name, data.view(np.int8), raw_shape=shape, raw_dtype=GGUF_IDS_BEYOND_GGUF_PY[kind])


def gguf_linear_names(model, linear_names: list[str]) -> dict[str, str]:
    """llama.cpp's tensor name (``blk.3.attn_v.weight``) of each of ``model``'s linears; experts by their
    stacked tensor (``blk.3.ffn_down_exps.weight``)."""
    cfg = model.config
    names = _tensor_names(arch_for(cfg.model_type), cfg.num_hidden_layers)
    out = {}
    for n in linear_names:
        m = _EXPERT.match(n + ".weight")
        out[n] = _gguf_name(names, f"{m['stem']}.{m['proj']}.weight" if m else n + ".weight")
    return out


def file_type(doc: dict, types: set[str]) -> str:
    """The llama.cpp file type to state: the recipe the model was quantized for, else its main block type."""
    recipe = doc.get("gguf_recipe")
    if recipe in FILE_TYPES:
        return recipe
    for t in ("Q1_0", "Q2_0", "Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0",
              "Q5_1"):
        if t in types:
            return PURE_FILE_TYPES.get(t, t)
    return "Q8_0"


def _copy_fields(writer, reader) -> None:
    """Every metadata field of the source GGUF except those this export writes itself."""
    for field in reader.fields.values():
        written_here = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
                        gguf.Keys.General.QUANTIZATION_VERSION)
        if field.name in written_here or field.name.startswith(("GGUF.", "lowbit.")):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _tensor_names(arch: Arch, n_layers: int):
    """gguf's map from Hugging Face tensor names to llama.cpp's for ``arch`` with ``n_layers`` blocks."""
    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf), n_layers)


def _gguf_name(names, hf_name: str) -> str:
    # a bare parameter (gpt-oss's attention sinks) is written as .weight, as llama.cpp's converter names it
    base, suffix = (hf_name[: -len(".weight")], ".weight") if hf_name.endswith(".weight") else \
        (hf_name[: -len(".bias")], ".bias") if hf_name.endswith(".bias") else (hf_name, ".weight")
    mapped = names.get_name(base)
    if mapped is None and base.startswith("transformer."):  # gguf names some BLOOM tensors without the prefix
        mapped = names.get_name(base[len("transformer."):])
    if mapped is None:
        raise LowbitError(f"no GGUF name for tensor {hf_name}")
    return mapped + suffix
