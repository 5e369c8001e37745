"""GGUF blocks written from lowbit codes decode (by the gguf package's own reader) to our weights."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import int_spec, signed_like

from lowbit.errors import LowbitError
from lowbit.export.gguf import gguf_blocks, gguf_type, permute_rows
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor, QuantSpec


def packed(bits: int, group: int, sym: bool | str, rows: int = 8, cols: int = 128, seed: int = 0) -> PackedTensor:
    """Random codes; power-of-two scales, so GGUF's float16 d and m (= -z·s) hold them exactly."""
    g = torch.Generator().manual_seed(seed)
    spec = int_spec(bits, group, sym)
    q = torch.randint(spec.qmin, spec.qmax + 1, (rows, cols), generator=g, dtype=torch.int16)
    scale = signed_like(2.0 ** torch.randint(-10, -4, (rows, cols // group), generator=g).float(), sym, g)
    zero = torch.zeros_like(scale) if sym else torch.randint(0, spec.qmax + 1, scale.shape, generator=g).float()
    return PackedTensor.from_qtensor(QTensor(q, scale, zero, spec, (rows, cols)))


@pytest.mark.parametrize("bits,group,sym,kind", [
    (4, 32, True, "Q4_0"), (4, 64, True, "Q4_0"), (4, 64, False, "Q4_1"), (4, 128, False, "Q4_1"),
    (8, 32, True, "Q8_0"), (8, 64, True, "Q8_0"), (4, 32, "full", "Q4_0"), (4, 128, "full", "Q4_0"),
    (8, 32, "full", "Q8_0"),
])
def test_blocks_decode_to_our_weights(bits, group, sym, kind):
    import gguf

    pt = packed(bits, group, sym)
    got_kind, blocks, change = gguf_blocks(pt)
    assert got_kind == kind and change == 0.0
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    assert blocks.shape == gguf.quant_shape_to_byte_shape(pt.shape, qtype)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, qtype), pt.dequantize().numpy())


@pytest.mark.parametrize("sym", [True, False, "full"])
def test_float16_rounding_is_measured_in_steps(sym):
    import gguf

    pt = packed(4, 32, sym)
    pt.scales = pt.scales.float() * (1 + 3e-4)  # no longer float16 numbers
    kind, blocks, change = gguf_blocks(pt)
    decoded = torch.from_numpy(gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)))
    steps = ((decoded - pt.dequantize()).abs() / pt.scales.abs().repeat_interleave(32, 1)).max()
    assert 0 < change < 0.01
    assert float(steps) == pytest.approx(change, rel=1e-3)


def test_what_gguf_cannot_hold_is_named():
    with pytest.raises(LowbitError, match=r"Q4_0.*Q4_1.*Q8_0.*W3 g32 asym"):
        gguf_type(packed(3, 32, False))
    with pytest.raises(LowbitError, match="W8 g32 asym"):
        gguf_type(packed(8, 32, False))
    with pytest.raises(LowbitError, match="W4 g16 sym"):
        gguf_type(packed(4, 16, True, cols=64))


def test_rotary_permutation_matches_llama_cpp_convert():
    """llama.cpp's converter: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)."""
    pt = packed(4, 32, False, rows=24, cols=64)
    n_head = 3
    ref = pt.dequantize().reshape(n_head, 2, 4, 64).swapaxes(1, 2).reshape(24, 64)
    assert torch.equal(permute_rows(pt, n_head).dequantize(), ref)


# ---- whole models: export, read back with transformers' own GGUF loader, compare logits ----------------------------

TEXT = ["The quick brown fox jumps over the lazy dog.", "It's 2024 and we'll quantize 1234 models!",
        "Low-bit weights, honest numbers: caf\u00e9 na\u00efve.", "Hello world\n\nNew lines and  two spaces."]
PROBES = [*TEXT, "unseen \u00dc\u00f1\u00ed 99999 words, DON'T   stop"]
SP = "\u2581"


def bpe_tokenizer(split: str, vocab: int = 400):
    """A byte-level BPE trained on TEXT, splitting words as llama.cpp's pre-tokenizer ``split`` does."""
    from tokenizers import Regex, Tokenizer, decoders, models, trainers
    from tokenizers import pre_tokenizers as pt
    from transformers import PreTrainedTokenizerFast

    from lowbit.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    if split == "gpt-2":
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    else:
        regex = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[split]
        tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                                         pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 10, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pt.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def spm_tokenizer(prefix: bool, vocab: int = 300):
    """A SentencePiece-style BPE (spaces as ▁, byte fallback, Gemma's special ids; a leading ▁ if ``prefix``)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as pt
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pt.Metaspace(replacement=SP, prepend_scheme="always" if prefix else "never")
    trained.train_from_iterator(TEXT * 10, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                                show_progress=False))
    doc = json.loads(trained.to_str())["model"]
    pieces = [w for w, _ in sorted(doc["vocab"].items(), key=lambda x: x[1]) if w not in specials]
    vocab_ids = {w: i for i, w in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in doc["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab_ids, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP)] * prefix + [normalizers.Replace(" ", SP)])
    tok.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 256}
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}
MQA = {"num_attention_heads": 2, "num_key_value_heads": 1}
MOE = {"num_experts_per_tok": 2, "pad_token_id": None}
# model_type -> (config class, model class, tokenizer, config overrides). Head dims are the config defaults where
# transformers' GGUF reader does not read them back (Qwen3: 128; Gemma: 256, with query_pre_attn_scalar = head_dim).
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", lambda: bpe_tokenizer("llama-bpe"),
              {**GQA, "tie_word_embeddings": False, "attention_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", lambda: spm_tokenizer(prefix=True), {**GQA, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda: bpe_tokenizer("qwen2"),
              {**GQA, "tie_word_embeddings": True, "pad_vocab": 64}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda: bpe_tokenizer("qwen2"), {**MQA, "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", lambda: spm_tokenizer(prefix=False), MQA),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", lambda: spm_tokenizer(prefix=False), MQA),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", lambda: spm_tokenizer(prefix=False), MQA),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", lambda: spm_tokenizer(prefix=True), {**GQA, "pad_token_id": None}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", lambda: bpe_tokenizer("gpt-2"),
             {"small": {"n_embd": 64, "n_layer": 2, "n_head": 4}}),
    "bloom": ("BloomConfig", "BloomForCausalLM", lambda: bpe_tokenizer("gpt-2"),
              {"small": {"hidden_size": 64, "n_layer": 2, "n_head": 4}}),
    "falcon": ("FalconConfig", "FalconForCausalLM", lambda: bpe_tokenizer("gpt-2"),
               {"small": {"hidden_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "max_position_embeddings": 256}}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda: bpe_tokenizer("gpt-2"),
                 {"num_attention_heads": 4, "small": {**SMALL, "hidden_act": "gelu_pytorch_tanh"}}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", lambda: bpe_tokenizer("gpt-2"), {**GQA, "pad_token_id": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", lambda: spm_tokenizer(prefix=True),
                {**GQA, **MOE, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", lambda: bpe_tokenizer("qwen2"),
                  {**GQA, **MOE, "num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", lambda: bpe_tokenizer("qwen2"),
                  {**GQA, **MOE, "num_experts": 4, "moe_intermediate_size": 64, "norm_topk_prob": True,
                   "head_dim": 16}),
    # YaRN rope over its default 131072 positions, sliding window (8) on even layers, attention sinks
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", lambda: bpe_tokenizer("gpt-2"),
                {**GQA, **MOE, "num_local_experts": 4, "head_dim": 16, "sliding_window": 8,
                 "small": {**SMALL, "max_position_embeddings": 131072}}),
}
# Families transformers' GGUF loader does not read, read back by the gguf package (read_by_gguf_package) with
# llama.cpp's conventions as its converter states them, written out here apart from lowbit's tables:
# model type -> (llama.cpp architecture, norm offset, q/k rows in pairs, query_key_value as [q; k; v])
NOT_IN_TRANSFORMERS = {"gemma": ("gemma", 1.0, False, False), "gpt_neox": ("gptneox", 0.0, False, True),
                       "olmo2": ("olmo2", 0.0, False, False), "mixtral": ("llama", 0.0, True, False),
                       "gpt_oss": ("gpt-oss", 0.0, False, False)}  # transformers looks for other expert names
FUSED_QKV = ("qkv_proj.weight", "c_attn.weight", "query_key_value.weight")
NORMS = ("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight", "layer_norm.weight")


def tiny_model(model_type: str, seed: int = 0, sharp: bool = True):
    """(random model, tokenizer) of ``model_type``; norm weights jittered by ±0.5 so no norm offset can hide, q and k
    scaled up (``sharp``) so no rotary layout can."""
    import transformers

    cfg_cls, model_cls, make_tok, over = MODELS[model_type]
    tok = make_tok()
    over = dict(over)
    pad = over.pop("pad_vocab", 1)
    small = over.pop("small", SMALL)
    vocab = -(-len(tok) // pad) * pad
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         **small, **over)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval().requires_grad_(False)
    from lowbit.export.gguf import norm_offset

    base = 1.0 - norm_offset(model_type)  # a norm that multiplies by about 1 either way
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            p.mul_(20 if sharp else 1)  # sharp attention, so the rotary layout of q and k matters to the logits
        elif name.endswith(FUSED_QKV):
            p.mul_(10 if sharp else 1)
        elif name.endswith(NORMS):
            p.copy_(base + torch.empty_like(p).uniform_(-0.5, 0.5))
        elif name.endswith("bias"):
            p.normal_(0, 0.1)
        elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "mlp.router.weight")):
            p.normal_(0, 1.0)  # routing that spreads tokens over every expert, so a wrong expert shows
    return model, tok


def quantize_and_pack(model, tok, path, extra: dict | None = None, embed: str = "int8"):
    """RTN W4 g32 symmetric (-> Q4_0) with the 8-bit embedding (-> Q8_0), saved as a lowbit directory.

    The scales are then rounded to float16 in the file and in ``model`` alike: GGUF stores float16 block
    scales, so the file holds exactly the model's weights and logits must agree to float arithmetic.
    """
    from lowbit.methods import RTNConfig, quantize_
    from lowbit.pack.checkpoint import pack_model_, save_packed

    spec = QuantSpec(bits=4, group_size=32, symmetric=True)
    quantize_(model, RTNConfig(spec))
    packed = pack_model_(model, spec, method="rtn", embed=embed)  # sets the embedding to what the file holds
    modules = dict(model.named_modules())
    for name, pt in packed.packed.items():
        pt.scales = pt.scales.half()
        modules[name].weight.copy_(pt.dequantize(modules[name].weight.dtype))
    return save_packed(packed, model.config, tok, path, extra=extra)


def read_back(path, model_type: str, like):
    """The GGUF file as a transformers model: its own GGUF loader, or for the families it cannot read
    (``NOT_IN_TRANSFORMERS``) the gguf package's reader (:func:`read_by_gguf_package`)."""
    from transformers import AutoModelForCausalLM

    if model_type in NOT_IN_TRANSFORMERS:
        return read_by_gguf_package(path, like)
    # GGUF has no key for attention biases (llama.cpp loads them when present): say so, as llama.cpp would see.
    say = {"attention_bias": True} if getattr(like.config, "attention_bias", False) else {}
    # Nor does it read the expert widths llama.cpp reads (expert_feed_forward_length and the shared one): they
    # are passed as read from the file.
    import gguf

    fields = gguf.GGUFReader(path).fields
    for key, attr in (("expert_feed_forward_length", "moe_intermediate_size"),
                      ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")):
        field = next((f for name, f in fields.items() if name.endswith("." + key)), None)
        if field is not None:
            say[attr] = int(field.contents())
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **say).eval()


def read_by_gguf_package(path, like):
    """Every tensor of the file dequantized by the gguf package, with llama.cpp's conventions undone as its
    converter documents them (norms less the family's offset, llama's q/k rows back from pairs to halves, a
    [q; k; v] query_key_value back to head-interleaved, stacked experts split), loaded into a model built from
    ``like``'s config and adapted as lowbit adapts it (one nn.Linear per expert)."""
    import re

    import gguf

    from lowbit.export.gguf import head_interleaved_order, rotary_order
    from lowbit.models.families import family_for

    cfg = like.config
    arch_name, offset, pairs, qkv_fused = NOT_IN_TRANSFORMERS[cfg.model_type]
    model = type(like)(cfg).eval()
    family_for(model)  # adapts it as lowbit does
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    state, used = {}, set()
    for key, want in model.state_dict().items():
        base, _, suffix = key.rpartition(".")
        if suffix not in ("weight", "bias"):  # a bare parameter (attention sinks): .weight in GGUF
            base, suffix = key, "weight"
        expert = re.match(r"^(.+\.experts)\.(\d+)\.(.+)$", base)
        stem = f"{expert[1]}.{expert[3]}" if expert else base
        gname = f"{names.get_name(stem)}.{suffix}"
        if gname not in ours:
            assert key == "lm_head.weight" and cfg.tie_word_embeddings, key
            continue
        t = ours[gname]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        w = w[int(expert[2])] if expert else w
        w = w.reshape(want.shape)
        if key.endswith("norm.weight"):
            w = w - offset
        if pairs and key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            w = w[torch.argsort(rotary_order(w.shape[0], n_head if ".q_proj." in key else n_kv))]
        if qkv_fused and "query_key_value" in key:
            w = w[torch.argsort(head_interleaved_order(w.shape[0], n_head))]
        state[key] = w
        used.add(gname)
    assert used == set(ours), set(ours) - used  # every tensor of the file has a place in the model
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if missing:
        model.tie_weights()
    return model


def max_logit_diff(a, b, tok) -> tuple[float, float]:
    ids = tok(" ".join(TEXT), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref, got = a(ids).logits, b(ids).logits
    return float((got - ref).abs().max()), float(ref.abs().max())


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_exported_model_reads_back_with_the_same_logits(model_type, tmp_path):
    """From a Hugging Face-sourced lowbit directory: the same logits as the quantized model in memory; the tokenizer
    read back from the file encodes as the original."""
    from transformers import AutoTokenizer

    from lowbit.export import export_gguf

    model, tok = tiny_model(model_type)
    out = quantize_and_pack(model, tok, tmp_path / "m")
    # llama.cpp converts Mistral as llama, without its sliding window, and computes Falcon's GELU with the tanh
    # approximation: exported, with a warning.
    warns = {"mistral": "ignores the sliding window", "falcon": "tanh approximation"}
    with pytest.warns(UserWarning, match=warns[model_type]) if model_type in warns else nullcontext():
        info = export_gguf(out, tmp_path / "m.gguf")
    assert info["metadata"] == "Hugging Face config" and info["types"] == ["Q4_0", "Q8_0"]
    assert info["max_change_steps"] == 0.0
    diff, scale = max_logit_diff(model, read_back(tmp_path / "m.gguf", model_type, model), tok)
    print(f"{model_type}: max |logit diff| {diff:.2e} of max |logit| {scale:.2f}")
    assert diff < 1e-4 * scale
    if model_type not in NOT_IN_TRANSFORMERS:  # transformers reads no tokenizer of these files
        back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        for text in PROBES:
            assert back(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.parametrize("model_type,breaks", [
    ("gemma3_text", "norm_offset"), ("gemma", "norm_offset"), ("llama", "rotary_pairs"), ("mixtral", "rotary_pairs"),
    ("bloom", "qkv_interleaved"), ("gpt_neox", "qkv_interleaved")])
def test_a_wrong_convention_shows_in_the_logits(model_type, breaks, tmp_path, monkeypatch):
    """The read-back check is sharp enough to catch each convention: Gemma norms written as w, not 1 + w;
    llama q/k rows left in Hugging Face's rotary layout; BLOOM's query_key_value left head-interleaved."""
    from dataclasses import replace

    import lowbit.export.gguf as g

    if breaks == "norm_offset":
        monkeypatch.setattr(g, "norm_offset", lambda *a: 0.0)
    else:
        from lowbit.models.families import FAMILIES

        fam = FAMILIES[model_type]
        monkeypatch.setitem(FAMILIES, model_type, replace(fam, gguf=replace(fam.gguf, **{breaks: False})))
    model, tok = tiny_model(model_type)
    g.export_gguf(quantize_and_pack(model, tok, tmp_path / "m"), tmp_path / "m.gguf")
    diff, scale = max_logit_diff(model, read_back(tmp_path / "m.gguf", model_type, model), tok)
    print(f"{model_type} without {breaks}: max |logit diff| {diff:.2e} of max |logit| {scale:.2f}")
    assert diff > 0.05 * scale


def test_gguf_sourced_gemma_keeps_its_norm_convention(tmp_path):
    """A Gemma 3 quantized from a GGUF file: metadata and tokenizer are copied from that file, and the norms
    (1 + w in the file, w once transformers loaded it) still get their 1 back."""
    import gguf

    from lowbit.export import export_gguf
    from lowbit.models import load_model

    model, tok = tiny_model("gemma3_text")
    export_gguf(quantize_and_pack(model, tok, tmp_path / "a"), tmp_path / "a.gguf")
    again, again_tok = load_model(str(tmp_path / "a.gguf"))
    out = quantize_and_pack(again, again_tok, tmp_path / "b", extra={"source_model": str(tmp_path / "a.gguf")})
    info = export_gguf(out, tmp_path / "b.gguf")
    assert info["metadata"] == "source GGUF"
    diff, scale = max_logit_diff(again, read_back(tmp_path / "b.gguf", "gemma3_text", again), tok)
    assert diff < 1e-4 * scale
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    assert b.get_field("tokenizer.ggml.tokens").contents() == a.get_field("tokenizer.ggml.tokens").contents()


def test_float16_embedding_stays_float16(tmp_path):
    import gguf

    from lowbit.export import export_gguf

    model, tok = tiny_model("llama")
    info = export_gguf(quantize_and_pack(model, tok, tmp_path / "m", embed="fp16"), tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert info["types"] == ["Q4_0"] and tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["output.weight"].tensor_type.name == "F16"
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    diff, _ = max_logit_diff(model, read_back(tmp_path / "m.gguf", "llama", model), tok)
    assert diff == 0.0


def test_padded_vocabulary_and_special_tokens(tmp_path):
    """Embedding rows beyond the tokenizer become unused [PADn] tokens (llama.cpp needs one token per row); the
    BPE merges, BOS/EOS ids and the pre-tokenizer are written."""
    import gguf

    from lowbit.export import export_gguf

    model, tok = tiny_model("qwen2")
    export_gguf(quantize_and_pack(model, tok, tmp_path / "m"), tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens, types = r.get_field("tokenizer.ggml.tokens").contents(), r.get_field("tokenizer.ggml.token_type").contents()
    n = model.config.vocab_size
    assert n > len(tok) and len(tokens) == n
    assert tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), n)] and set(types[len(tok):]) == {5}
    assert types[tok.eos_token_id] == 3  # control
    assert r.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert r.get_field("tokenizer.ggml.pre").contents() == "qwen2"
    assert len(r.get_field("tokenizer.ggml.merges").contents()) > 50
    assert r.get_field("tokenizer.ggml.eos_token_id").contents() == tok.eos_token_id


def test_sentencepiece_style_vocabulary_fields(tmp_path):
    """Gemma-style tokenizer: model "llama", no space prefix, byte tokens typed BYTE, and scores that replay the
    merge order (llama.cpp merges the highest-scoring pair first): minus the rank of the merge making the token."""
    import json

    from lowbit.export.gguf_vocab import BYTE, CONTROL, UNKNOWN, read_vocab

    tok = spm_tokenizer(prefix=False)
    tok.save_pretrained(tmp_path)
    v = read_vocab(tmp_path, len(tok) + 3)
    assert (v.model, v.pre, v.add_space_prefix, v.add_bos, v.add_eos) == ("llama", None, False, True, False)
    assert v.types[tok.convert_tokens_to_ids("<0x41>")] == BYTE and v.types[3] == UNKNOWN and v.types[2] == CONTROL
    assert v.special_ids == {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    for rank, (a, b) in enumerate(merges[:30]):
        assert v.scores[v.tokens.index(a + b)] == -rank
    assert v.scores[v.tokens.index("T")] == 0.0 and v.tokens[-1] == f"[PAD{len(tok) + 2}]"
    assert v.merges[0] == " ".join(merges[0])
    spm_tokenizer(prefix=True).save_pretrained(tmp_path / "p")
    assert read_vocab(tmp_path / "p", 500).add_space_prefix is True


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.export.gguf_vocab import read_vocab

    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word).save_pretrained(tmp_path / "w")
    with pytest.raises(LowbitError, match="BPE tokenizers.*WordLevel"):
        read_vocab(tmp_path / "w", 2)
    odd = bpe_tokenizer("gpt-2")
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=True)])
    odd.save_pretrained(tmp_path / "o")
    with pytest.raises(LowbitError, match="none of llama.cpp's known pre-tokenizers"):
        read_vocab(tmp_path / "o", 400)


def test_unsupported_architectures_and_settings_are_named():
    from transformers import FalconConfig, Gemma2Config, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    from lowbit.export.gguf import arch_for, check_config

    with pytest.raises(LowbitError, match="does not support model type 'opt'"):
        arch_for("opt")
    with pytest.raises(LowbitError, match="query_pre_attn_scalar=144.*head_dim=256"):
        check_config(Gemma2Config(num_hidden_layers=2, query_pre_attn_scalar=144), arch_for("gemma2"))
    with pytest.raises(LowbitError, match="layer_types differ"):
        check_config(Gemma2Config(num_hidden_layers=2, layer_types=["full_attention"] * 2), arch_for("gemma2"))
    with pytest.raises(LowbitError, match="use_sliding_window"):
        check_config(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64), arch_for("qwen2"))
    with pytest.raises(LowbitError, match="rope_type 'yarn'"):
        check_config(LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 2048}), arch_for("llama"))
    with pytest.raises(LowbitError, match="activation 'gelu'"):
        check_config(LlamaConfig(hidden_act="gelu"), arch_for("llama"))
    with pytest.raises(LowbitError, match="rope_type 'longrope'"):
        check_config(Phi3Config(num_hidden_layers=2, max_position_embeddings=8192,
                                original_max_position_embeddings=4096,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                 "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}),
                     arch_for("phi3"))
    with pytest.raises(LowbitError, match="scale_attn_by_inverse_layer_idx"):
        check_config(GPT2Config(n_layer=2, scale_attn_by_inverse_layer_idx=True), arch_for("gpt2"))
    with pytest.raises(LowbitError, match="new_decoder_architecture"):
        check_config(FalconConfig(num_hidden_layers=2, new_decoder_architecture=True), arch_for("falcon"))
    with pytest.raises(LowbitError, match="alibi"):
        check_config(FalconConfig(num_hidden_layers=2, alibi=True), arch_for("falcon"))
    from transformers import GPTNeoXConfig, Olmo2Config, Qwen2MoeConfig, Qwen3MoeConfig

    with pytest.raises(LowbitError, match="norm_topk_prob=True.*does not renormalise"):
        check_config(Qwen2MoeConfig(num_hidden_layers=2, norm_topk_prob=True), arch_for("qwen2_moe"))
    with pytest.raises(LowbitError, match="norm_topk_prob=False.*renormalises"):
        check_config(Qwen3MoeConfig(num_hidden_layers=2, norm_topk_prob=False), arch_for("qwen3_moe"))
    with pytest.raises(LowbitError, match="mlp_only_layers"):
        check_config(Qwen3MoeConfig(num_hidden_layers=2, norm_topk_prob=True, mlp_only_layers=[0]),
                     arch_for("qwen3_moe"))
    with pytest.raises(LowbitError, match="q_norm by the hidden size"):
        check_config(Olmo2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=32),
                     arch_for("olmo2"))
    with pytest.raises(LowbitError, match="attention biases"):
        check_config(GPTNeoXConfig(num_hidden_layers=2, attention_bias=False), arch_for("gpt_neox"))
    assert "tanh approximation" in check_config(GPTNeoXConfig(num_hidden_layers=2), arch_for("gpt_neox"))[0]
    from transformers import GptOssConfig

    with pytest.raises(LowbitError, match="swiglu_limit"):
        check_config(GptOssConfig(num_hidden_layers=2, swiglu_limit=10.0), arch_for("gpt_oss"))
    with pytest.raises(LowbitError, match="layer_types differ"):
        check_config(GptOssConfig(num_hidden_layers=2, layer_types=["full_attention"] * 2), arch_for("gpt_oss"))


def test_llama3_rope_scaling_becomes_rope_freqs():
    """llama.cpp divides each rotary frequency by rope_freqs: base / factors must be Hugging Face's scaled ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.export.gguf import llama3_rope_factors

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    factors = torch.from_numpy(llama3_rope_factors(cfg))
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    inv_freq = LlamaForCausalLM(cfg).model.rotary_emb.inv_freq
    torch.testing.assert_close(base / factors, inv_freq.float())
    assert factors.min() == 1.0 and factors.max() == 8.0
