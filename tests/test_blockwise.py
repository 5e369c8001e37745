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
from lowbit.methods.blockwise import (
    LearnedCodes,
    Schedule,
    TunedSteps,
    attach,
    detach,
    distillation_loss,
    fit,
    norm_parameters,
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
    steps = TunedSteps(qt)
    with torch.no_grad():
        steps.log_scale.add_(0.1)
    out = steps.qtensor()
    assert torch.equal(out.q, qt.q) and torch.equal(out.zero, qt.zero)
    assert torch.allclose(out.scale, qt.scale * torch.exp(torch.tensor(0.1)))


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
    start, best, best_step, steps = fit(loss_on, 12, [grid], groups, Schedule(120, 10, 3, 4, 3),
                                        torch.Generator().manual_seed(0), "toy")
    assert best < 0.95 * start and best_step > 0
    with torch.no_grad():  # the parameters kept are those of the best check
        grid.hard = True
        hold = torch.randperm(12, generator=torch.Generator().manual_seed(0))[9:]
        assert abs(loss_on(hold).item() - best) < 1e-4 * best


def test_fit_keeps_the_start_when_training_only_hurts():
    grid, loss_on = _toy_problem(1)
    before = grid.qtensor()
    groups = [{"params": [grid.offset, grid.log_scale, grid.zero_shift], "lr": 50.0}]  # wildly too large
    start, best, best_step, _ = fit(loss_on, 12, [grid], groups, Schedule(30, 5, 2, 4, 3),
                                    torch.Generator().manual_seed(0), "toy")
    assert best_step == 0 and best == start
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
    assert report.info["e2e_heldout_best"] <= report.info["e2e_heldout_start"]
    for lin in quantizable_linears(model, family_for(model)).values():
        qt = codes_of(lin)
        assert torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight)


# ---- the method on every family --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starts():
    """Each family's float model and its AWQ+GPTQ-R error, computed once."""
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
            cache[name] = (model, held, ref, calib, float((logits(start, held) - ref).pow(2).mean()))
        model, held, ref, calib, err = cache[name]
        return copy.deepcopy(model), held, ref, calib, err

    return get


@pytest.mark.parametrize("name", ZOO)
def test_blockwise_runs_packs_exactly_and_keeps_its_start_quality(name, starts, tmp_path):
    model, held, ref, calib, start_err = starts(name)
    report = quantize_(model, BlockwiseConfig(SPEC3, steps=12, e2e_steps=4), calib)
    out = logits(model, held)
    assert torch.isfinite(out).all()
    assert report.info["quantized_fraction"] > 0.99
    assert not [f for f in report.info["awq_fallbacks"] if "changed the float layer" in f]
    layers = report.info["layers"]
    assert len(layers) == len(model.get_submodule(family_for(model).layers))
    assert all(lg["best"] <= lg["start"] for lg in layers)
    err = float((out - ref).pow(2).mean())
    # on unseen tokens of a random model, reconstruction must not undo its start (a loose check: a few steps)
    assert err <= 1.25 * start_err, (err, start_err)
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
    report = quantize_(model, BlockwiseConfig(SPEC3, steps=80, holdout=4, e2e_steps=8), calib)
    err, start_err = (float((logits(m, held) - ref).pow(2).mean()) for m in (model, start))
    assert err < 0.9 * start_err, (err, start_err)
    assert report.info["e2e_heldout_best"] <= report.info["e2e_heldout_start"]


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
    grid = attach({"x": lin})["x"]
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
    quantize_(starts, BlockwiseConfig(spec, steps=4, e2e_steps=0), calib)
    report = quantize_(model, BlockwiseConfig(spec, steps=4, e2e_steps=6, e2e_lr=2e-2), calib)
    assert report.info["e2e_steps"] > 0
    moved = 0
    for (name, lin), ref in zip(quantizable_linears(model, family_for(model)).items(),
                                quantizable_linears(starts, family_for(starts)).values()):
        qt = codes_of(lin)
        assert torch.equal(qt.q, codes_of(ref).q), name  # end to end moves step sizes only
        moved += not torch.equal(qt.scale, codes_of(ref).scale)
        to_blocks(qt.q, qt.scale, qt.zero, spec.ggml)
    assert moved or report.info["e2e_best_step"] == 0


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
