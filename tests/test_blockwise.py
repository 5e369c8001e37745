"""Block-wise reconstruction: the learnable codes, the held-out early stopping, and the method on every family."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from zoo import ZOO, tiny_model, tiny_samples

from lowbit import QuantSpec, quantize_
from lowbit.errors import LowbitError
from lowbit.formats.ggml import to_blocks
from lowbit.methods import AWQConfig, AWQGPTQConfig, BlockwiseConfig, GPTQConfig
from lowbit.methods.blockwise import norm_parameters
from lowbit.methods.training import (
    LearnedCodes,
    Schedule,
    attach_codes,
    detach,
    distillation_loss,
    fit,
    teacher_top_k,
)
from lowbit.models.families import family_for
from lowbit.models.inventory import quantizable_linears
from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed
from lowbit.quantizer import codes_of, dequantize, grouped, quantize, round_weight_

SPEC3 = QuantSpec(bits=3, group_size=32)
GRIDS = [SPEC3, QuantSpec(bits=2, group_size=32), QuantSpec(bits=4, group_size=32, symmetric=True, full_range=True),
         QuantSpec(format="q4_0"), QuantSpec(format="q4_1")]


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: s.describe())
def test_learned_codes_start_exactly_at_the_given_codes(spec):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, spec)
    grid = LearnedCodes(qt, learn_scale=spec.ggml is None, learn_zero=spec.ggml is None, latent=w)
    grid.hard = True
    assert torch.equal(grid(w), dequantize(qt))
    again = grid.qtensor()
    assert torch.equal(again.q, qt.q) and torch.equal(again.scale, qt.scale) and torch.equal(again.zero, qt.zero)


def test_gradients_reach_offsets_step_sizes_and_zero_points():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    grid = LearnedCodes(quantize(w, SPEC3), learn_scale=True, learn_zero=True)
    with torch.no_grad():  # a smaller step clips the extremes: under the STE only they tell the zero point where to go
        grid.log_scale.sub_(0.3)
    x = torch.randn(4, 64)
    (x @ grid(w).T).pow(2).sum().backward()
    for p in (grid.offset, grid.log_scale, grid.zero_shift):
        assert p.grad is not None and (p.grad != 0).any()


def test_moved_offsets_change_codes_but_stay_on_the_grid():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    qt = quantize(w, SPEC3)
    grid = LearnedCodes(qt, True, True)
    with torch.no_grad():
        grid.offset.add_(torch.randn_like(grid.offset) * 2)
        grid.log_scale.add_(0.3)
        grid.zero_shift.add_(0.7)
    out = grid.qtensor()
    assert not torch.equal(out.q, qt.q)
    assert out.q.min() >= SPEC3.qmin and out.q.max() <= SPEC3.qmax
    assert torch.equal(out.zero, out.zero.round())  # an integer zero point, as packing stores it
    grid.hard = True
    assert torch.equal(grid(w), dequantize(out))


def test_tuned_steps_keep_codes_and_move_only_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, SPEC3)
    steps = LearnedCodes(qt, True, False, frozen_codes=True)
    with torch.no_grad():
        steps.log_scale.add_(0.1)
    out = steps.qtensor()
    assert torch.equal(out.q, qt.q) and torch.equal(out.zero, qt.zero)
    # the learned step as the file holds it: float16
    assert torch.equal(out.scale, (qt.scale * torch.exp(torch.tensor(0.1))).half().float())


def _toy_problem(seed: int = 0):
    """A linear layer's codes fit to reproduce the float layer on random inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(12, 32, 64, generator=g) * torch.linspace(0.2, 4, 64)  # a few inputs much larger
    target = x @ w.T
    grid = LearnedCodes(quantize(w, SPEC3), True, True, latent=w)  # RTN's codes, from w

    def loss_on(idx):
        return (x[idx] @ grid(w).T - target[idx]).pow(2).mean()

    return grid, loss_on


def test_fit_lowers_the_held_out_error():
    grid, loss_on = _toy_problem()
    groups = [{"params": [grid.offset], "lr": 1e-3}, {"params": [grid.log_scale, grid.zero_shift], "lr": 1e-2}]
    log = fit(loss_on, 12, groups, Schedule(120, 10, 3, 4, 3), torch.Generator().manual_seed(0), "toy", [grid])
    best = log.best
    assert best < 0.95 * log.start and log.best_step > 0
    with torch.no_grad():  # the parameters kept are those of the best check
        grid.hard = True
        hold = torch.randperm(12, generator=torch.Generator().manual_seed(0))[9:]
        assert abs(loss_on(hold).item() - best) < 1e-4 * best


def test_fit_keeps_the_start_when_training_only_hurts():
    grid, loss_on = _toy_problem(1)
    before = grid.qtensor()
    groups = [{"params": [grid.offset, grid.log_scale, grid.zero_shift], "lr": 50.0}]  # wildly too large
    log = fit(loss_on, 12, groups, Schedule(30, 5, 2, 4, 3), torch.Generator().manual_seed(0), "toy", [grid])
    assert log.best_step == 0 and log.best == log.start
    after = grid.qtensor()
    assert torch.equal(after.q, before.q) and torch.equal(after.scale, before.scale)


def test_recipes_and_their_overrides():
    assert BlockwiseConfig(SPEC3).recipe == {"steps": 160, "check_every": 20, "patience": 3, "e2e_steps": 64,
                                             "batch": 4}
    fast = BlockwiseConfig(SPEC3, fast=True).recipe
    assert (fast["steps"], fast["batch"], fast["e2e_steps"]) == (48, 2, 32)
    mine = BlockwiseConfig(SPEC3, fast=True, steps=10, batch_size=3, e2e_steps=0).recipe
    assert (mine["steps"], mine["batch"], mine["e2e_steps"]) == (10, 3, 0)
    with pytest.raises(LowbitError, match="batch size"):
        BlockwiseConfig(SPEC3, batch_size=0)


def test_bad_options_and_formats_are_refused():
    with pytest.raises(LowbitError, match="integer grid"):
        BlockwiseConfig(QuantSpec(format="nf4"))
    with pytest.raises(LowbitError, match="learning rate|lr"):
        BlockwiseConfig(SPEC3, lr=0.0)
    with pytest.raises(LowbitError, match="calibration"):
        quantize_(tiny_model("llama"), BlockwiseConfig(SPEC3, steps=2))
    with pytest.raises(LowbitError, match="e2e loss"):
        BlockwiseConfig(SPEC3, e2e_loss="mse")


def test_distillation_is_the_teachers_cross_entropy_and_least_at_the_teacher():
    """With every token kept, the loss is the full cross-entropy against the teacher's distribution; the teacher
    itself scores lower than a perturbed model; the top-k cut keeps the teacher's most likely tokens."""
    model = tiny_model("llama")
    ids = tiny_samples(model, 3, 16, seed=0)
    vocab = model.config.vocab_size
    full = teacher_top_k(model, ids, batch=2, k=vocab)
    ref = logits(model, ids)
    p, logq = F.softmax(ref, -1), F.log_softmax(ref, -1)
    assert torch.allclose(distillation_loss(ref, full), -(p * logq).sum(-1).mean(), atol=1e-5)
    assert distillation_loss(ref, full) < distillation_loss(ref + torch.randn_like(ref), full)
    top = teacher_top_k(model, ids, batch=3, k=8)
    assert top[0].shape == (3, 16, 8) and top[1].dtype == torch.int32
    assert torch.equal(top[1].long(), logq.topk(8, -1).indices)
    # with the rest of the vocabulary as one bucket, a sharper copy of the teacher scores worse than the teacher
    assert distillation_loss(ref, top) < distillation_loss(2 * ref, top)


def test_end_to_end_distillation_runs_and_keeps_its_best_held_out_step():
    model = tiny_model("llama")
    calib = tiny_samples(model, 8, 32, seed=0)
    report = quantize_(model, BlockwiseConfig(SPEC3, steps=6, e2e_steps=8, e2e_loss="kd"), calib)
    assert report.info["e2e_loss"] == "kd"
    # measured: 3.897 -> 3.846 (-1.3 %) at its 8th step; the pass must lower the held-out loss, not merely keep it
    assert report.info["e2e_best_step"] > 0
    assert report.info["e2e_heldout_best"] < 0.994 * report.info["e2e_heldout_start"]
    for lin in quantizable_linears(model, family_for(model)).values():
        qt = codes_of(lin)
        assert torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight)


# ---- the method on every family --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starts():
    """Each family's float model and its AWQ+GPTQ-R errors (held-out, calibration), computed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = tiny_model(name)
            family_for(model)
            held = tiny_samples(model, 4, 32, seed=1)
            ref = logits(model, held)
            start = copy.deepcopy(model)
            calib = tiny_samples(model, 8, 32, seed=0)
            quantize_(start, AWQGPTQConfig(AWQConfig(SPEC3), GPTQConfig(SPEC3, act_order=True)), calib)
            errs = tuple(float((logits(start, ids) - r).pow(2).mean()) for ids, r in ((held, ref),
                                                                                     (calib, logits(model, calib))))
            cache[name] = (model, held, ref, calib, errs)
        model, held, ref, calib, errs = cache[name]
        return copy.deepcopy(model), held, ref, calib, errs

    return get


# The settings the margins below were measured with (the defaults before 2026-12-06): 2 sequences held out, so every
# layer and the end-to-end pass keep their start unless a step is better on held-out data, and next-token loss end to
# end. The defaults since (chosen on dev text on the real model) hold nothing out; with them on these 12-step tiny
# models gemma2's calibration error ends at 1.17 x its start's, which the guard exists to prevent.
GUARDED = {"holdout": 2, "scale_lr": 1e-3, "e2e_lr": 1e-3, "e2e_loss": "ce"}


@pytest.mark.parametrize("name", ZOO)
def test_blockwise_runs_packs_exactly_and_its_end_to_end_pass_improves(name, starts, tmp_path):
    model, held, ref, calib, (start_err, start_calib_err) = starts(name)
    float_calib = logits(model, calib)
    report = quantize_(model, BlockwiseConfig(SPEC3, steps=12, e2e_steps=4, **GUARDED), calib)
    out = logits(model, held)
    assert torch.isfinite(out).all()
    assert report.info["quantized_fraction"] > 0.99
    assert not [f for f in report.info["awq_fallbacks"] if "changed the float layer" in f]
    layers = report.info["layers"]
    assert len(layers) == len(model.get_submodule(family_for(model).layers))
    # A layer keeps its start exactly, or a trained step that is better on held-out data.
    assert all((lg["best_step"] == 0 and lg["best"] == lg["start"]) or (lg["best_step"] > 0 and lg["best"] <
                                                                         lg["start"]) for lg in layers), layers
    # Measured over the 18 families, in two runs while blockwise.py changed: the end-to-end pass lowers its
    # held-out loss by 0.24-1.1 % in every one; 12 steps leave 0-2 layers per model below their start (gpt2: none),
    # and the logits' error at 0.63-1.03 x the start's on the calibration samples, 0.79-1.04 x on unseen ones.
    assert report.info["e2e_best_step"] > 0
    assert report.info["e2e_heldout_best"] < 0.999 * report.info["e2e_heldout_start"]
    calib_err = float((logits(model, calib) - float_calib).pow(2).mean())
    assert calib_err <= 1.1 * start_calib_err, (calib_err, start_calib_err)
    err = float((out - ref).pow(2).mean())
    assert err <= 1.1 * start_err, (err, start_err)
    for name_, lin in quantizable_linears(model, family_for(model)).items():
        qt = codes_of(lin)
        assert qt is not None and torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight), name_
        per_group = grouped(qt.q.float(), SPEC3)
        assert per_group.min() >= 0 and per_group.max() <= SPEC3.qmax
    packed = pack_model_(model, SPEC3, method="blockwise")
    save_packed(packed, model.config, None, tmp_path / "q")
    reloaded, _ = load_packed(tmp_path / "q", kernel="dequant")
    assert torch.equal(logits(reloaded, held), logits(model, held))  # packing set the embedding to what it stores


def test_blockwise_lowers_the_error_of_its_start_on_a_llama():
    """Enough steps on a tiny Llama: the quantized model's logits move towards the float ones on unseen tokens."""
    model = tiny_model("llama")
    held = tiny_samples(model, 8, 32, seed=1)
    ref = logits(model, held)
    calib = tiny_samples(model, 32, 32, seed=0)
    start = copy.deepcopy(model)
    quantize_(start, AWQGPTQConfig(AWQConfig(SPEC3), GPTQConfig(SPEC3, act_order=True)), calib)
    report = quantize_(model, BlockwiseConfig(SPEC3, steps=160, holdout=4, e2e_steps=8, dtype="bf16"), calib)
    err, start_err = (float((logits(m, held) - ref).pow(2).mean()) for m in (model, start))
    # bf16 autocast, the condition the margin was measured under (emulated bf16 is cheap at this size). In float32
    # the same run gave 0.914 x at 80 steps (2026-12-06; 0.85-0.98 x with calibration seeds 2 and 3, against
    # 0.85-1.01 x in bf16): on 8 x 32 held-out tokens of a random tiny model the draw matters more than the dtype.
    # 80 steps measured 0.811 x the start's error on 2026-12-06 (AVX2 EPYC) but 0.909 x on 2026-12-07 (Xeon with
    # AVX-512 BF16 and AMX) at the same commit, and a one-ulp change in GPTQ's latent weights moved calibration
    # seeds 2 and 3 from 0.85 to 0.91-0.95 x: at 80 steps the margin sat inside the draw. 160 steps, 2026-12-07,
    # Xeon: 0.822 x (seeds 2 and 3: 0.896, 0.805; before that GPTQ change 0.86-0.88 x for all three).
    # At 80 steps the layers' held-out losses fell by 31 % and 9 % (>= 15 % and 5.5 % with other seeds), the
    # end-to-end pass's by 1.0 % (0.5-1.8 %).
    assert err < 0.9 * start_err, (err, start_err)
    assert all(lg["best"] < 0.97 * lg["start"] for lg in report.info["layers"]), report.info["layers"]


def test_the_end_to_end_pass_lowers_its_held_out_loss_after_short_layer_training():
    """After 80 layer steps (layers trained less, so the model-level pass has something left to fix) the end-to-end
    pass lowers its held-out loss by 0.5 % or more: 0.58 % on 2026-12-07 (Xeon, AVX-512 BF16), 1.0 % on 2026-12-06
    (AVX2 EPYC), 0.5-1.8 % with other seeds. After 160 layer steps it gains 0.2 %."""
    model = tiny_model("llama")
    calib = tiny_samples(model, 32, 32, seed=0)
    report = quantize_(model, BlockwiseConfig(SPEC3, steps=80, holdout=4, e2e_steps=8, dtype="bf16"), calib)
    assert report.info["e2e_heldout_best"] < 0.995 * report.info["e2e_heldout_start"]
    assert report.info["dtype"] == "bf16" and report.info["dtype_reason"] == "asked for"


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q3_k", "q2_k"])
def test_gguf_block_types_write_exact_blocks_and_learn_only_what_the_file_holds(fmt):
    """Float16 block scales (Q4_0, Q4_1) are learned and stay float16; K-quants' integer sub-block scales stay."""
    spec = QuantSpec(format=fmt)
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(4))
    lin = torch.nn.Linear(256, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    round_weight_(lin, spec)
    before = codes_of(lin)
    grid = attach_codes({"x": lin})["x"]
    free = spec.ggml.super_block is None
    assert grid.offset.requires_grad and grid.log_scale.requires_grad == free
    assert grid.zero_shift.requires_grad == (free and not spec.symmetric)
    with torch.no_grad():
        grid.offset.add_(torch.randn_like(grid.offset))
        if free:
            grid.log_scale.add_(0.01 * torch.randn_like(grid.log_scale))
        if grid.zero_shift.requires_grad:
            grid.zero_shift.add_(0.1 * torch.randn_like(grid.zero_shift))
    detach({"x": lin})
    qt = codes_of(lin)
    assert not torch.equal(qt.q, before.q)
    assert torch.equal(qt.scale, before.scale) != free
    if not free:
        assert torch.equal(qt.zero, before.zero)
    assert torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight)
    to_blocks(qt.q, qt.scale, qt.zero, spec.ggml)  # refuses parameters the file cannot hold (not float16)


def test_end_to_end_step_sizes_of_float16_block_types_stay_float16():
    model = tiny_model("llama")
    calib = tiny_samples(model, 8, 32, seed=0)
    spec = QuantSpec(format="q4_0")
    starts = copy.deepcopy(model)
    quantize_(starts, BlockwiseConfig(spec, steps=4, e2e_steps=0, **GUARDED), calib)
    report = quantize_(model, BlockwiseConfig(spec, steps=4, e2e_steps=6, **{**GUARDED, "e2e_lr": 2e-2}), calib)
    assert report.info["e2e_steps"] > 0
    moved = 0
    for (name, lin), ref in zip(quantizable_linears(model, family_for(model)).items(),
                                quantizable_linears(starts, family_for(starts)).values()):
        qt = codes_of(lin)
        assert torch.equal(qt.q, codes_of(ref).q), name  # end to end moves step sizes only
        moved += not torch.equal(qt.scale, codes_of(ref).scale)
        to_blocks(qt.q, qt.scale, qt.zero, spec.ggml)
    # measured: every linear's step sizes move (98-100 % of them), the held-out loss falls 7.81 -> 6.84 (-12 %;
    # the same with other seeds)
    assert moved == len(quantizable_linears(model, family_for(model)))
    assert report.info["e2e_best_step"] > 0
    assert report.info["e2e_heldout_best"] < 0.94 * report.info["e2e_heldout_start"]


def test_all_k_quants_skip_the_end_to_end_pass_and_its_teacher(monkeypatch):
    """K-quants' scales are integers: nothing is free end to end, so neither the pass nor its teacher runs."""
    from conftest import tiny_llama

    import lowbit.methods.blockwise as bw

    model = tiny_llama(hidden=256, layers=1)  # rows that fill K-quant super-blocks
    calib = tiny_samples(model, 16, 32, seed=0)

    def no_teacher(*_a, **_k):
        raise AssertionError("the float model's teacher was computed for nothing")

    monkeypatch.setattr(bw, "teacher_top_k", no_teacher)
    report = quantize_(model, BlockwiseConfig(QuantSpec(format="q3_k"), steps=2, e2e_steps=4, e2e_loss="kd"), calib)
    assert report.info["e2e"].startswith("skipped")


def test_gguf_recipe_types_run_end_to_end():
    model = tiny_model("llama")
    calib = tiny_samples(model, 8, 32, seed=0)
    spec = QuantSpec(format="q4_1")
    quantize_(model, BlockwiseConfig(spec, steps=12, e2e_steps=2), calib)
    for lin in quantizable_linears(model, family_for(model)).values():
        qt = codes_of(lin)
        assert torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight)
        to_blocks(qt.q, qt.scale, qt.zero, spec.ggml)


def test_one_spec_per_linear_is_followed():
    from lowbit.specmap import SpecMap

    model = tiny_model("llama")
    calib = tiny_samples(model, 8, 32, seed=0)
    spec = SpecMap(QuantSpec(format="q4_0"), {"model.layers.0.mlp.down_proj": QuantSpec(format="q8_0"),
                                              "model.layers.1.self_attn.q_proj": SPEC3})
    report = quantize_(model, BlockwiseConfig(spec, steps=6, e2e_steps=2), calib)
    assert report.info["quantized_fraction"] > 0.99
    for name, lin in quantizable_linears(model, family_for(model)).items():
        qt = codes_of(lin)
        assert qt.spec == spec.spec_for(name), name
        assert torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight)
    with pytest.raises(LowbitError, match="integer grid"):
        BlockwiseConfig(SpecMap(SPEC3, {"model.layers.0.mlp.down_proj": QuantSpec(format="nf4")}))


@pytest.mark.parametrize("name", ZOO)
def test_every_family_has_norms_to_tune(name):
    model = tiny_model(name)
    layer = model.get_submodule(family_for(model).layers)[0]
    norms = norm_parameters(layer)
    assert norms and all(p.dim() == 1 for p in norms)
    linear_params = {id(m.weight) for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    assert not any(id(p) in linear_params for p in norms)


def test_a_blockwise_model_exported_to_gguf_reads_back_exactly(tmp_path):
    """Block-wise on Q4_0's grid, packed, exported: the gguf package decodes each linear's blocks to exactly the
    weights in memory, and the model loaded from the file (transformers' GGUF loader, as lowbit's loading uses it;
    lowbit.models.load_model itself cannot read this file's byte-level vocabulary back) gives the same logits."""
    import gguf
    from conftest import byte_tokenizer
    from test_export_gguf import read_back

    from lowbit.export.gguf import export_gguf, rotary_order

    model = tiny_model("llama")
    calib = tiny_samples(model, 8, 32, seed=0)
    spec = QuantSpec(format="q4_0")
    quantize_(model, BlockwiseConfig(spec, steps=4, e2e_steps=4, e2e_lr=2e-2), calib)
    src = save_packed(pack_model_(model, spec, method="blockwise"), model.config, byte_tokenizer(), tmp_path / "q")
    info = export_gguf(src, tmp_path / "m.gguf")
    assert info["max_change_steps"] == 0.0  # the learned float16 block scales are the file's
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    linears = quantizable_linears(model, family_for(model))
    for name, lin in linears.items():
        t = tensors[names.get_name(name) + ".weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(lin.weight.shape)
        n_head = heads.get(name.rsplit(".", 1)[1])
        if n_head:  # llama.cpp's rotary pairs back to Hugging Face's halves
            w = w[torch.argsort(rotary_order(w.shape[0], n_head))]
        assert torch.equal(w, lin.weight), name
    back = read_back(tmp_path / "m.gguf", "llama", model)
    ids = tiny_samples(model, 2, 32, seed=1)
    a, b = logits(model, ids), logits(back, ids)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
