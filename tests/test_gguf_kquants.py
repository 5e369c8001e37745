"""llama.cpp's GGUF block types as lowbit grids: the bytes lowbit writes decode (by the gguf package, llama.cpp's
reference dequantizers ported to numpy) to exactly lowbit's weights; llama.cpp's recipes give each tensor the
type llama-quantize gives it; every weight method's codes go into the file unchanged."""
from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from lowbit import AWQConfig, GPTQConfig, RTNConfig, quantize_
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.gguf_recipes import recipe_specs
from lowbit.formats.ggml import (
    GGML_TYPES,
    block_params,
    block_range,
    exact_super_blocks,
    fit_super_scale,
    plain_weights,
    refine_signed,
    refine_unsigned,
    signed_extreme,
    split_scales,
    table_decode,
    table_encode,
    table_index,
    to_blocks,
)
from lowbit.methods import AWQGPTQConfig
from lowbit.models.families import family_for
from lowbit.models.inventory import quantizable_linears
from lowbit.quantizer import QuantSpec, decode, dequantize, encode, quantize
from lowbit.specmap import bits_per_weight

TYPES = sorted(GGML_TYPES)


def hard_weights(rows: int = 8, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of different scales, with an all-zero super-block, a lone outlier and an all-positive block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[0, :256] = 0
    w[1, 5] = 40
    w[2, 32:64] = w[2, 32:64].abs() + 1
    return w


def reference_dequantize(blocks: np.ndarray, name: str) -> np.ndarray:
    """The gguf package's dequantizer; for the types it lacks, ggml-quants.c's dequantize_row_q1_0/_q2_0 ported
    line by line (bench/gguf_decode_llamacpp.py checks every type against llama.cpp's own tools)."""
    if name not in ("Q1_0", "Q2_0"):
        return gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, name))
    rows = blocks.shape[0]
    b = blocks.reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)  # block: ggml_half d; uint8_t qs[16]
    qs = b[:, 2:]
    if name == "Q2_0":  # y[j] = ((qs[j / 4] >> 2·(j % 4)) & 3) - 1) · d
        q = np.stack([(qs >> (2 * k)) & 3 for k in range(4)], -1).reshape(-1, 64).astype(np.int32)
        return ((q - 1) * d).astype(np.float32).reshape(rows, -1)
    bit = np.stack([(qs >> k) & 1 for k in range(8)], -1).reshape(-1, 128)  # y[j] = bit j ? d : -d
    return np.where(bit == 1, d, -d).astype(np.float32).reshape(rows, -1)


@pytest.mark.parametrize("importance", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("name", TYPES)
def test_written_blocks_decode_to_lowbits_weights(name, importance):
    spec = QuantSpec(format=name)
    t = spec.ggml
    w = hard_weights()
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) if importance else None
    qt = quantize(w, spec, importance=imp)
    assert int(qt.q.min()) >= t.qmin and int(qt.q.max()) <= t.qmax
    blocks = to_blocks(qt.q, qt.scale, qt.zero, t)
    assert blocks.shape == (w.shape[0], w.shape[1] // t.span * t.type_size)
    theirs = reference_dequantize(blocks, t.name)
    assert np.array_equal(theirs, dequantize(qt).numpy())
    rel = float((dequantize(qt) - w)[3:].pow(2).mean().sqrt() / w[3:].std())
    assert rel < 2.0 ** -t.bits * 2.5, rel  # a grid of 2^b levels, not a broken one


@pytest.mark.parametrize("importance", [False, True], ids=["plain", "weighted"])
def test_a_q8_0_tensor_refit_onto_q8_0_is_llama_cpps_bytes(importance):
    """A Q8_0 tensor (llama.cpp's reference quantizer, as the gguf package ports it: |max| on +127) re-fit onto Q8_0
    gives back the same bytes, as re-quantizing with llama.cpp does. Putting the signed extreme on -128 instead, as
    the 4- and 5-bit types do, moves every weight of most blocks (Gemma 3's Q8_0 embedding: KLD 0.00018)."""
    w = hard_weights(8, 512, seed=7).numpy()
    ours = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    source = torch.from_numpy(gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q8_0))
    imp = torch.rand(512, generator=torch.Generator().manual_seed(8)) ** 4 if importance else None
    qt = quantize(source, QuantSpec(format="q8_0"), importance=imp)
    assert np.array_equal(to_blocks(qt.q, qt.scale, qt.zero, GGML_TYPES["q8_0"]), ours)
    assert torch.equal(dequantize(qt), source)


@pytest.mark.parametrize("name", [n for n in TYPES if GGML_TYPES[n].super_block])
def test_super_block_scales_are_recovered_exactly(name):
    t = GGML_TYPES[name]
    w = hard_weights(4, 1024)
    scale, zero = block_params(w.reshape(4, -1, t.block), t)
    s = scale.reshape(-1, t.super_block // t.block)
    d, sc = split_scales(s, t)
    lo, hi = t.scale_range
    assert torch.equal(d.half().float(), d) and int(sc.min()) >= lo and int(sc.max()) <= hi
    assert torch.equal(d.unsqueeze(-1) * sc, s)
    with pytest.raises(LowbitError, match="super-block grid"):
        split_scales(s + 1e-3, t)  # scales that are not d·sc are refused, not written wrong


def on_grid_weights(t, rows: int = 16, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Weights a K-quant file of type ``t`` holds, decoded as the gguf package decodes them in float32:
    (d·sc)·q, minus dmin·mn for the unsigned types, from random float16 d and dmin, random integer sub-block
    scales and mins (some 0) and random codes. In every super-block one sub-block's codes are all even and
    two others' lowest code is above 0: the cases where the smallest step or the lowest weight on code 0 is
    not the file's own."""
    g = np.random.default_rng(seed)
    per = t.super_block // t.block
    n = rows * cols // t.super_block
    lo_q, hi_q = t.scale_range
    d = (g.uniform(0.5, 2.0, (n, 1, 1)) * 1e-3 * (g.choice([-1, 1], (n, 1, 1)) if t.signed else 1)).astype(np.float16)
    sc = g.integers(lo_q, hi_q + 1, (n, per, 1)).astype(np.float32)
    q = g.integers(t.qmin, t.qmax + 1, (n, per, t.block))
    q[:, 0] -= q[:, 0] % 2  # even codes
    q[:, 1:3] = np.maximum(q[:, 1:3], t.qmin + 1 + (t.qmax - t.qmin) // 4)  # nothing on the lowest codes
    x = (d.astype(np.float32) * sc) * q.astype(np.float32)
    if not t.signed:
        dmin = (g.uniform(0.5, 2.0, (n, 1, 1)) * 1e-3).astype(np.float16).astype(np.float32)
        x = x - dmin * g.integers(lo_q, hi_q + 1, (n, per, 1)).astype(np.float32)
    return torch.from_numpy(x.astype(np.float32).reshape(rows, cols))


@pytest.mark.parametrize("importance", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("name", [n for n in TYPES if GGML_TYPES[n].super_block and GGML_TYPES[n].values is None])
def test_weights_already_on_a_k_quant_grid_come_back_unchanged(name, importance):
    """A model dequantized from a K-quant file (Gemma 3's Q4_K and Q6_K tensors) re-fit onto the same type keeps
    every weight (the fit alone moved 0.04-0.12 % of the Q4_K and Q6_K weights, llama.cpp's re-quantization 0.03-0.04
    %). The written bytes decode to the same weights."""
    t = GGML_TYPES[name]
    w = on_grid_weights(t)
    imp = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) ** 4 if importance else None
    qt = quantize(w, QuantSpec(format=name), importance=imp)
    assert torch.equal(dequantize(qt), w)
    assert np.array_equal(reference_dequantize(to_blocks(qt.q, qt.scale, qt.zero, t), t.name), w.numpy())


def test_weights_off_the_grid_are_fit_as_before():
    """The exact-grid search touches nothing else: one moved weight sends its super-block (only it) back to the
    fit, and of Gaussian weights only the all-zero super-block is on the grid."""
    t = GGML_TYPES["q4_k"]
    w = on_grid_weights(t, 4, 1024)
    exact = quantize(w, QuantSpec(format="q4_k"))
    w2 = w.clone()
    w2[1, 300] += 1e-4  # row 1, second super-block
    moved = dequantize(quantize(w2, QuantSpec(format="q4_k"))) != w2
    assert moved[1, 256:512].any() and not moved[:, :256].any() and not moved[1, 512:].any()
    assert torch.equal(dequantize(exact), w)
    noise = hard_weights(4, 1024)  # Gaussian, with one all-zero super-block: on every grid
    found = exact_super_blocks(noise.reshape(4, -1, t.block), t)[2].reshape(4, -1, 8)
    assert found[0, 0].all() and found.sum() == 8


INTEGER_TYPES = [n for n in TYPES if GGML_TYPES[n].values is None]
TABLE_TYPES = [n for n in TYPES if GGML_TYPES[n].values is not None]


@pytest.mark.parametrize("name", INTEGER_TYPES)
def test_the_weighted_fit_never_loses_on_its_own_objective(name):
    """The importance-weighted fit (llama.cpp's search) chooses per block, the plain range a candidate: per block
    its weighted error is never larger. K-quants then round each super-block's sub-block scales to d·sc; the
    weighted d never loses to the plain d on the error it minimises (a·(d·sc - s)²), but that is a proxy, so a few
    sub-blocks end worse than the plain fit (2-15 % of them here): per block the property holds before that
    rounding, and on the whole after it."""
    t = GGML_TYPES[name]
    w = hard_weights(16, 512, seed=3)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(4)) ** 4
    wg = w.reshape(16, -1, t.block)
    impg = imp.reshape(1, -1, t.block)
    spec = QuantSpec(format=name)

    def err(s, z):  # per block
        return (impg * (encode(wg, s, z, spec) * s + z - wg) ** 2).sum(-1)
    floats = [block_range(wg, t, 1.0, i) for i in (None, impg)]  # before any storage rounding
    e0, e1 = (err(s, z) for s, z in floats)
    assert bool((e1 <= e0 * (1 + 1e-6)).all()), float((e1 / e0.clamp(min=1e-30)).max())
    e0, e1 = (err(*block_params(wg, t, 1.0, i)) for i in (None, impg))
    if t.super_block is None:  # float16 block parameters: per block after storage too
        assert bool((e1 <= e0 * (1 + 1e-6)).all())
    # on the whole, no tolerance: measured 0.29-0.76 x the plain fit's error for K-quants, 0.27-0.90 x for the rest
    assert float(e1.sum()) <= float(e0.sum())
    if t.super_block is not None:
        per = t.super_block // t.block
        s = floats[1][0].reshape(16, -1, per)
        a = ((impg * wg ** 2).sum(-1) / (floats[1][0].squeeze(-1) ** 2).clamp(min=1e-30)).reshape(16, -1, per)
        lo_q, hi_q = t.scale_range
        plain = (signed_extreme(s) / lo_q) if t.signed else s.amax(-1, keepdim=True) / hi_q
        fits = [fit_super_scale(s, x, plain, lo_q, hi_q) for x in (None, a)]
        proxy = [(a * (d * sc - s) ** 2).sum(-1) for d, sc in fits]
        assert bool((proxy[1] <= proxy[0]).all())


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q3_k", "q4_k"])
def test_refinement_only_ever_lowers_each_blocks_weighted_error(name):
    """Alternating codes and least-squares parameters: per block never worse, and better somewhere."""
    t = GGML_TYPES[name]
    wg = hard_weights(16, 512, seed=5).reshape(16, -1, t.block)
    imp = (torch.rand(512, generator=torch.Generator().manual_seed(6)) ** 4).reshape(1, -1, t.block).expand_as(wg)
    if t.signed:
        s0 = signed_extreme(wg) / t.qmin
        z0 = torch.zeros_like(s0)
        s1, z1 = refine_signed(wg, t, s0, imp), z0
    else:
        z0 = wg.amin(-1, keepdim=True).clamp(max=0)
        s0 = (wg.amax(-1, keepdim=True).clamp(min=0) - z0) / t.qmax
        s1, z1 = refine_unsigned(wg, t, s0, z0, imp)
    spec = QuantSpec(format=name)

    def err(s, z):
        return (imp * (encode(wg, s, z, spec) * s + z - wg) ** 2).sum(-1)
    e0, e1 = err(s0, z0), err(s1, z1)
    assert bool((e1 <= e0 * (1 + 1e-6)).all()) and float(e1.sum()) < 0.99 * float(e0.sum())
    assert bool((z1 <= 0).all())


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_weighted_super_block_scales_lower_the_weighted_error(name):
    """With importance, d (and dmin) are fit to the sub-block scales by weighted least squares instead of
    putting the largest on the end of the range: the file's weights get closer where it matters."""
    t = GGML_TYPES[name]
    wg = hard_weights(16, 512, seed=7).reshape(16, -1, t.block)
    imp = (torch.rand(512, generator=torch.Generator().manual_seed(8)) ** 4).reshape(1, -1, t.block)
    spec = QuantSpec(format=name)
    scale, off = block_range(wg, t, 1.0, imp)
    per = t.super_block // t.block

    def err(s, z):
        return float((imp * (encode(wg, s, z, spec) * s + z - wg) ** 2).sum())
    s, z = block_params(wg, t, 1.0, imp)
    # the same sub-block fit with d from the extreme, as without importance
    lo_q, hi_q = t.scale_range
    sb = scale.reshape(16, -1, per)
    d0, sc0 = fit_super_scale(sb, None, (signed_extreme(sb) / lo_q) if t.signed else sb.amax(-1, keepdim=True) / hi_q,
                              lo_q, hi_q)
    s0 = (d0 * sc0).reshape_as(scale)
    if not t.signed:
        mins = (-off).reshape(16, -1, per)
        m0, mn0 = fit_super_scale(mins, None, mins.amax(-1, keepdim=True) / hi_q, lo_q, hi_q)
        z0 = -(m0 * mn0).reshape_as(off)
    else:
        z0 = torch.zeros_like(s0)
    assert err(s, z) < err(s0, z0)


@pytest.mark.parametrize("name", TABLE_TYPES)
def test_table_codes_are_the_nearest_table_values(name):
    """Each weight's code is the table value nearest weight / scale (a tie goes up, as llama.cpp's best_index_int8),
    by brute force over the table; beyond the ends, the end."""
    t = GGML_TYPES[name]
    v = torch.tensor(t.values, dtype=torch.float32)
    u = torch.cat([torch.randn(4000, generator=torch.Generator().manual_seed(9)) * 90,
                   (v[1:] + v[:-1]) / 2, v, v[:1] - 5, v[-1:] + 5])  # midpoints (ties), the values, beyond the ends
    dist = (u.unsqueeze(-1) - v).abs()
    nearest = dist.min(-1).values
    last_nearest = (v.numel() - 1) - (dist == nearest.unsqueeze(-1)).flip(-1).float().argmax(-1)  # ties: upper
    assert torch.equal(table_index(u, t), last_nearest)
    assert torch.equal(table_decode(table_encode(u, t), t), v[last_nearest])


@pytest.mark.parametrize("importance", [False, True], ids=["x2", "imatrix"])
@pytest.mark.parametrize("name", TABLE_TYPES)
def test_the_table_fit_beats_the_extreme_on_the_tables_end(name, importance):
    """llama.cpp's search for a table grid's scale (candidates, least squares, refinement) never loses, per block,
    to the plain scale that puts the extreme on the table's first value, on the error it weights (x² without an
    importance matrix, as llama.cpp), and wins on the whole."""
    t = GGML_TYPES[name]
    wg = hard_weights(16, 512, seed=11).reshape(16, -1, t.block)
    imp = (torch.rand(512, generator=torch.Generator().manual_seed(12)) ** 4).reshape(1, -1, t.block)
    weights = imp.expand_as(wg) if importance else plain_weights(wg, t)
    spec = QuantSpec(format=name)
    fit, _ = block_range(wg, t, 1.0, imp if importance else None)
    plain = signed_extreme(wg) / t.values[0]

    def err(s):
        return (weights * (decode(encode(wg, s, torch.zeros_like(s), spec), s, 0, spec) - wg) ** 2).sum(-1)
    e_fit, e_plain = err(fit), err(plain)
    assert bool((e_fit <= e_plain * (1 + 1e-6)).all())
    assert float(e_fit.sum()) < 0.8 * float(e_plain.sum()), float(e_fit.sum() / e_plain.sum())


def test_table_types_are_refused_where_training_needs_an_integer_grid():
    from lowbit.methods import BlockwiseConfig

    with pytest.raises(LowbitError, match="integer grid"):
        BlockwiseConfig(QuantSpec(format="iq4_nl"))
    with pytest.raises(LowbitError, match="nearest value of its table"):
        QuantSpec(format="iq4_xs", rounding="stochastic")


def test_widths_a_type_cannot_hold_are_refused_in_one_line():
    assert not QuantSpec(format="q4_k").fits(576) and QuantSpec(format="q4_0").fits(576)
    with pytest.raises(LowbitError, match="multiples of 256"):
        quantize(torch.randn(4, 576), QuantSpec(format="q4_k"))
    with pytest.raises(LowbitError, match="its own blocks"):
        QuantSpec(format="q4_k", group_size=128)
    with pytest.raises(LowbitError, match="has 4 bits"):
        QuantSpec(format="q4_0", bits=3)


def meta_llama(hidden: int, inter: int, layers: int, heads: int, kv: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


# What llama-quantize (llama-cpp-python 0.3.36's sources) wrote for SmolLM2-135M (30 layers, rows of 576 and
# 1536): the types of the 210 linears in its files, as bench/gguf_ppl.py prints them.
SMOLLM2_FILES = {
    ("Q4_0", True): {"Q4_0": 207, "Q4_1": 3},
    ("Q4_0", False): {"Q4_0": 210},
    ("Q2_K", True): {"Q4_0": 180, "Q3_K": 30},
    ("Q3_K_M", True): {"Q4_0": 120, "Q5_0": 58, "Q5_1": 2, "Q5_K": 1, "Q4_K": 29},
    ("Q4_K_M", True): {"Q5_0": 166, "Q4_K": 16, "Q8_0": 14, "Q6_K": 14},
}
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # use_more_bits: first/last eighth, every third
# The same files tensor by tensor, from llama_tensor_get_type: rows of 576 cannot hold a K-quant, which falls back
# (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); ffn_down's rows of 1536 can. A linear not named
# gets "rest"; a list gives the type of each layer.
SMOLLM2_TYPES = {
    ("Q4_0", True): {"down": ["Q4_1"] * 3 + ["Q4_0"] * 27, "rest": "Q4_0"},  # imatrix: first eighth of ffn_down
    ("Q4_0", False): {"rest": "Q4_0"},
    ("Q2_K", True): {"v": "Q4_0", "o": "Q4_0", "down": "Q3_K", "rest": "Q4_0"},  # v: Q3_K (3 q heads per kv head)
    ("Q3_K_M", True): {"v": ["Q5_1"] * 2 + ["Q5_0"] * 28, "o": "Q5_0", "down": ["Q5_K"] + ["Q4_K"] * 29,
                       "rest": "Q4_0"},
    ("Q4_K_M", True): {"v": ["Q8_0" if i in MORE_BITS_30 else "Q5_0" for i in range(30)],
                       "down": ["Q6_K" if i in MORE_BITS_30 else "Q4_K" for i in range(30)], "rest": "Q5_0"},
}


def expected_types(table: dict, layers: int) -> dict[str, str]:
    """Linear name -> type of every linear of a ``layers``-layer Llama, from a table as above."""
    out = {}
    for short, rel in LINEARS.items():
        kinds = table.get(short, table["rest"])
        for i in range(layers):
            out[f"model.layers.{i}.{rel}"] = kinds if isinstance(kinds, str) else kinds[i]
    return out


@pytest.mark.parametrize("recipe,calibrated", sorted(SMOLLM2_FILES))
def test_recipes_give_the_types_llama_quantize_gives(recipe, calibrated):
    model = meta_llama(576, 1536, 30, 9, 3)
    specs = recipe_specs(model, recipe, calibrated)
    want = expected_types(SMOLLM2_TYPES[recipe, calibrated], 30)
    assert Counter(want.values()) == Counter(SMOLLM2_FILES[recipe, calibrated])  # the table is what the files hold
    assert {name: specs.spec_for(name).ggml.name for name in want} == want


# An 8-layer Llama whose rows all hold K-quants (widths 256 and 512), 4 query heads per kv head: each tensor's type,
# read off llama_tensor_get_type by hand (use_more_bits(i, 8): layers 0, 3, 6, 7; n_layer / 16 = 0).
SMALL_TYPES = {
    ("Q4_K_M", True): {"v": "Q6_K Q4_K Q4_K Q6_K Q4_K Q4_K Q6_K Q6_K",
                       "down": "Q6_K Q4_K Q4_K Q6_K Q4_K Q4_K Q6_K Q6_K", "rest": "Q4_K"},
    ("Q2_K", True): {"v": "Q4_K", "o": "Q3_K", "down": "Q3_K", "rest": "Q2_K"},  # v: Q4_K as n_gqa >= 4
    ("Q3_K_M", True): {"v": "Q5_K Q5_K Q4_K Q4_K Q4_K Q4_K Q4_K Q4_K", "o": "Q4_K", "down": "Q4_K", "rest": "Q3_K"},
    ("Q4_0", True): {"down": "Q4_1 Q4_0 Q4_0 Q4_0 Q4_0 Q4_0 Q4_0 Q4_0", "rest": "Q4_0"},
    ("Q4_0", False): {"rest": "Q4_0"},
    # IQ4_NL/IQ4_XS: attn_v Q5_K when 4 or more query heads share a kv head; without an imatrix, the first eighth
    # of ffn_down Q5_K
    ("IQ4_XS", True): {"v": "Q5_K", "rest": "IQ4_XS"},
    ("IQ4_XS", False): {"v": "Q5_K", "down": "Q5_K IQ4_XS IQ4_XS IQ4_XS IQ4_XS IQ4_XS IQ4_XS IQ4_XS", "rest": "IQ4_XS"},
    ("IQ4_NL", True): {"v": "Q5_K", "rest": "IQ4_NL"},
}


@pytest.mark.parametrize("recipe,calibrated", sorted(SMALL_TYPES))
def test_each_tensor_gets_its_type_where_every_row_fits_a_super_block(recipe, calibrated):
    model = meta_llama(256, 512, 8, 4, 1)
    table = {k: v if len(v.split()) == 1 else v.split() for k, v in SMALL_TYPES[recipe, calibrated].items()}
    want = expected_types(table, 8)
    specs = recipe_specs(model, recipe, calibrated)
    assert {name: specs.spec_for(name).ggml.name for name in want} == want


def test_recipes_where_every_row_fits_a_super_block():
    """Widths of 256 multiples: no fallback; Q4_K_M's use_more_bits layers (first and last eighth, every third)
    get Q6_K for attn_v and ffn_down; Q2_K keeps Q2_K for q, k, gate, up."""
    model = meta_llama(256, 512, 8, 4, 1)  # 4 query heads per kv head
    m = recipe_specs(model, "Q4_K_M", calibrated=True)
    six = [i for i in range(8) if m.spec_for(f"model.layers.{i}.self_attn.v_proj").ggml.name == "Q6_K"]
    assert six == [0, 3, 6, 7]
    assert [m.spec_for(f"model.layers.{i}.mlp.down_proj").ggml.name for i in range(8)].count("Q6_K") == 4
    assert m.spec_for("model.layers.1.mlp.up_proj").ggml.name == "Q4_K"
    q2 = recipe_specs(model, "Q2_K", calibrated=True)
    assert q2.spec_for("model.layers.0.self_attn.v_proj").ggml.name == "Q4_K"  # 4 heads share a kv head
    assert q2.spec_for("model.layers.0.self_attn.o_proj").ggml.name == "Q3_K"
    assert q2.spec_for("model.layers.0.mlp.gate_proj").ggml.name == "Q2_K"
    assert abs(bits_per_weight(q2, quantizable_linears(model, family_for(model))) - 2.98) < 0.05


def tiny_256():
    return tiny_llama(hidden=256, layers=2, heads=4, kv_heads=2)


@pytest.mark.parametrize("recipe", ["Q2_K", "Q4_K_M", "IQ4_XS"])
@pytest.mark.parametrize("method", ["rtn", "imatrix", "awq", "gptq", "gptq-r", "awq+gptq-r"])
def test_every_method_writes_its_codes_into_the_gguf_file(method, recipe, tmp_path):
    """Quantized on the recipe's grids, packed, exported: transformers' GGUF reader (the gguf package's
    dequantizers) gives back the logits of the model in memory."""
    import warnings

    from test_export_gguf import read_back

    from lowbit.export import export_gguf
    from lowbit.methods import ImatrixConfig
    from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed

    model = tiny_256()
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    spec = recipe_specs(model, recipe, calibrated=method != "rtn")
    awq, gptq = AWQConfig(spec, n_grid=4, clip_grid=4), GPTQConfig(spec, act_order=method.endswith("-r"))
    config = {"rtn": RTNConfig(spec), "imatrix": ImatrixConfig(spec), "awq": awq, "gptq": gptq, "gptq-r": gptq,
              "awq+gptq-r": AWQGPTQConfig(awq, gptq)}[method]
    quantize_(model, config, calib)
    src = save_packed(pack_model_(model, spec, method=method, embed="fp32"), model.config, byte_tokenizer(),
                      tmp_path / "q", extra={"gguf_recipe": recipe})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = export_gguf(src, tmp_path / "m.gguf")
    assert info["file_type"] == recipe and info["max_change_steps"] == 0.0
    ours, _ = load_packed(src, kernel="dequant")
    theirs = read_back(tmp_path / "m.gguf", "llama", ours)
    ids = calib[:2]
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        assert torch.equal(a, model(ids).logits)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_types_the_gguf_package_lacks_are_written_and_read_back(tmp_path):
    """Q2_0 (which the gguf package 0.19.0 does not name) and Q1_0 (which it cannot decode), fitted with an
    importance matrix: lowbit's own table reader gives each tensor the type it was given, its bytes decode (by
    ggml-quants.c's dequantizers, ported) to lowbit's weights, and lowbit's table of a file the gguf package can
    read is the package's, tensor for tensor and byte for byte. Loading the Q2_0 file is one clear line."""
    import warnings

    from lowbit.export import export_gguf
    from lowbit.export.gguf import gguf_linear_names, rotary_order
    from lowbit.export.gguf_table import tensor_table
    from lowbit.methods import ImatrixConfig
    from lowbit.models import load_model
    from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed
    from lowbit.specmap import SpecMap

    model = tiny_llama(hidden=128, layers=2, heads=4, kv_heads=2)
    linears = list(quantizable_linears(model, family_for(model)))
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    files = {}
    for label, spec in {"mixed": SpecMap(QuantSpec(format="q2_0"), {n: QuantSpec(format="q1_0")
                                                                      for n in linears[::3]}),
                        "q1_0": QuantSpec(format="q1_0")}.items():
        m = tiny_llama(hidden=128, layers=2, heads=4, kv_heads=2)
        quantize_(m, ImatrixConfig(spec) if label == "mixed" else RTNConfig(spec), calib)
        src = save_packed(pack_model_(m, spec, method="imatrix", embed="fp32"), m.config, byte_tokenizer(),
                          tmp_path / label)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_gguf(src, tmp_path / f"{label}.gguf")
        files[label] = (src, tmp_path / f"{label}.gguf", spec)
    src, path, spec = files["mixed"]
    table = {e.name: e for e in tensor_table(path)}
    ours, _ = load_packed(src, kernel="dequant")
    raw = path.read_bytes()
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for name, gname in gguf_linear_names(ours, linears).items():
        kind = spec.spec_for(name).ggml.name
        entry = table[gname]
        w = ours.get_submodule(name).weight.detach()
        assert entry.type_name == kind and entry.shape == tuple(w.shape)
        blocks = np.frombuffer(raw[entry.offset:entry.offset + entry.n_bytes], dtype=np.uint8).reshape(w.shape[0], -1)
        short = name.split(".")[-1]
        want = w[rotary_order(w.shape[0], heads[short])] if short in heads else w
        assert np.array_equal(reference_dequantize(blocks, kind), want.numpy()), name
    assert {"Q1_0", "Q2_0"} <= {e.type_name for e in table.values()}
    with pytest.raises(LowbitError, match="Q2_0 tensors, which the gguf package"):
        load_model(str(path))
    readable = files["q1_0"][1]
    raw = readable.read_bytes()
    theirs = [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes),
               bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in gguf.GGUFReader(readable).tensors]
    assert [(e.name, e.type_name, e.shape, e.n_bytes, raw[e.offset:e.offset + e.n_bytes])
            for e in tensor_table(readable)] == theirs


def test_iq4_xs_falls_back_to_iq4_nl_on_rows_a_super_block_does_not_divide():
    """SmolLM2's shapes: rows of 576 take IQ4_NL (llama.cpp's tensor_type_fallback), ffn_down's rows of 1536 keep
    IQ4_XS; 3 query heads per kv head leave attn_v at the recipe's type."""
    specs = recipe_specs(meta_llama(576, 1536, 30, 9, 3), "IQ4_XS", calibrated=True)
    want = expected_types({"down": "IQ4_XS", "rest": "IQ4_NL"}, 30)
    assert {name: specs.spec_for(name).ggml.name for name in want} == want


@pytest.mark.parametrize("name,bar", [("q3_k", 0.5), ("iq4_nl", 0.5)])  # measured 0.22-0.25 without act-order
def test_gptq_on_a_gguf_grid_beats_rounding_to_nearest(name, bar):
    """Error feedback on the real Q3_K grid (and IQ4_NL's table) lowers the layer's output error against RTN on
    that grid."""
    from lowbit.methods.gptq import factor_hessian, gptq_quantize, hessian

    g = torch.Generator().manual_seed(0)
    # correlated inputs (what error feedback exploits), channels of unequal size
    x = (torch.randn(2048, 64, generator=g) @ torch.randn(64, 512, generator=g) + torch.randn(2048, 512, generator=g)
         ) * torch.linspace(0.2, 3, 512)
    w = torch.randn(64, 512, generator=g)
    spec = QuantSpec(format=name)
    for act_order in (False, True):
        qt = gptq_quantize(w, factor_hessian(hessian(x), 0.01, act_order, "test"), spec)
        rtn = quantize(w, spec)
        err = lambda q: float(((dequantize(q) - w) @ x.T).pow(2).mean())  # noqa: E731
        assert err(qt) < bar * err(rtn), (act_order, err(qt), err(rtn))
        if spec.ggml.super_block:
            split_scales(qt.scale.reshape(-1, 16), spec.ggml)  # its sub-block scales are on the super-block grid


def test_gguf_option_conflicts_are_one_line(capsys):
    assert main(["quantize", "--gguf", "Q3_K_M", "--w-bit", "3", "-o", "x"]) == 2
    assert "drop --w-bit" in capsys.readouterr().err
    assert main(["quantize", "--gguf", "Q7_K", "-o", "x"]) == 2
    assert "unknown GGUF recipe" in capsys.readouterr().err


@pytest.mark.model
def test_quantize_with_a_recipe_then_export_from_the_command_line(tiny_ckpt, tmp_path, data_dir, capsys):
    """`lowbit quantize --gguf RECIPE` then `lowbit export --to gguf`: the file states the recipe, holds its types
    (rows of 64 fall back from K-quants to 32-blocks as llama.cpp's do) and evaluates as the packed model."""
    import json

    data = ("--seq-len", "64", "--max-windows", "2", "--data-dir", str(data_dir), "--json")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "imatrix", "--gguf", "q4_k_m", "--calib-samples",
                 "4", "--calib-seq-len", "64", "-o", str(out), *data]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "imatrix" and json.loads((out / "lowbit.json").read_text())["gguf_recipe"] == "Q4_K_M"
    assert main(["export", "--model", str(out), "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    capsys.readouterr()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert int(reader.get_field("general.file_type").contents()) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    kinds = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} - {"F32"}
    assert kinds == {"Q5_0", "Q8_0"}  # Q4_K -> Q5_0, Q6_K -> Q8_0 on rows of 64
    assert main(["eval", "--model", str(out), *data]) == 0
    packed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", str(tmp_path / "m.gguf"), *data]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] == pytest.approx(packed["ppl"],
                                                                                                 rel=1e-5)


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q8_0", "iq4_xs"])
def test_fitting_rows_in_chunks_changes_nothing(name, monkeypatch):
    """block_params fits a big tensor (a 262k-row embedding) a few rows at a time to bound memory; each row's
    parameters are its own, so the codes and parameters are those of one fit."""
    import lowbit.formats.ggml as ggml

    w, imp = hard_weights(64, 1024), torch.rand(1024, generator=torch.Generator().manual_seed(5))
    whole = quantize(w, QuantSpec(format=name), importance=imp)
    monkeypatch.setattr(ggml, "FIT_CHUNK", 3000)  # three rows at a time
    chunked = quantize(w, QuantSpec(format=name), importance=imp)
    assert torch.equal(whole.q, chunked.q) and torch.equal(whole.scale, chunked.scale)
    assert torch.equal(whole.zero, chunked.zero)
