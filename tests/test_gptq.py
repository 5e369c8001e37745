"""GPTQ: agrees with the textbook column-by-column algorithm, beats RTN on correlated inputs,
act-order helps, composes with AWQ, and copes with dead channels and indefinite Hessians."""
import copy
import warnings

import pytest
import torch
from conftest import tiny_llama
from test_awq import logits_error, make_salient, samples

from lowbit.errors import LowbitError
from lowbit.methods import AWQConfig, AWQGPTQConfig, GPTQConfig, RTNConfig, quantize_
from lowbit.methods.gptq import factor_hessian, gptq_quantize, hessian
from lowbit.quantizer import QuantSpec, compute_qparams, decode, dequantize, encode, fake_quantize

SPEC3 = QuantSpec(bits=3, group_size=32)


def correlated_linear(seed: int, inp: int = 128, out: int = 64, tokens: int = 2048):
    """A weight and calibration / held-out inputs X = Z A, channels of very different scale, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    scale = torch.exp(torch.randn(inp, generator=g))
    x, held = ((torch.randn(tokens, inp, generator=g) @ mix) * scale for _ in range(2))
    return torch.randn(out, inp, generator=g), x, held


def output_error(w, wq, x):
    return ((x @ (wq - w).T) ** 2).mean().item()


def textbook_gptq(w, h, spec, damp=0.01):
    """GPTQ as first written (OBQ order, float64): round column i, spread its error with the current
    inverse Hessian, then eliminate i from that inverse. Group parameters at each group's first column."""
    w, n = w.double().clone(), w.shape[1]
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))
    out = torch.zeros_like(w)
    for i in range(n):
        if i % spec.group_size == 0:
            s, z = (t.double() for t in compute_qparams(w[:, i : i + spec.group_size].float(), spec))
        out[:, i] = decode(encode(w[:, i : i + 1], s, z, spec), s, z, spec)[:, 0]
        w[:, i:] -= ((w[:, i] - out[:, i]) / hinv[i, i])[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_size,group", [(16, 8), (64, 32), (64, 8), (32, 64), (48, 24)])
def test_blocked_cholesky_form_equals_the_textbook_algorithm(seed, block_size, group):
    """Blocks, sub-blocks of 16 columns inside them (with groups shorter and longer than a sub-block) and groups
    longer than a block all give the textbook's weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 192, generator=g) @ torch.randn(192, 192, generator=g)
    w = torch.randn(16, 192, generator=g)
    spec = QuantSpec(bits=3, group_size=group)
    h = hessian(x)
    ours = dequantize(gptq_quantize(w, factor_hessian(h, 0.01), spec, block_size=block_size)).double()
    ref = textbook_gptq(w, h, spec)
    assert (ours - ref).abs().max() < 1e-5
    assert (fake_quantize(w, spec).double() - ref).abs().max() > 0.1  # GPTQ is not plain rounding here


def test_gptq_beats_rtn_and_act_order_helps_on_correlated_inputs():
    for seed in range(3):
        w, x, held = correlated_linear(seed)
        h = hessian(x)
        rtn = output_error(w, fake_quantize(w, SPEC3), held)
        plain = output_error(w, dequantize(gptq_quantize(w, factor_hessian(h, 0.01), SPEC3)), held)
        reordered = output_error(w, dequantize(gptq_quantize(w, factor_hessian(h, 0.01, act_order=True), SPEC3)), held)
        assert plain < 0.8 * rtn, (seed, plain, rtn)
        assert reordered <= plain, (seed, reordered, plain)


def test_act_order_keeps_contiguous_groups_and_codes_on_the_grid():
    w, x, _ = correlated_linear(0)
    qt = gptq_quantize(w, factor_hessian(hessian(x), 0.01, act_order=True), SPEC3)
    assert qt.scale.shape == (64, 128 // 32) and qt.zero.shape == (64, 4)
    assert qt.q.min() >= SPEC3.qmin and qt.q.max() <= SPEC3.qmax
    # static groups: the parameters are exactly those of the original weight's contiguous groups
    s, z = compute_qparams(w.view(64, 4, 32), SPEC3)
    assert torch.equal(qt.scale, s.squeeze(-1)) and torch.equal(qt.zero, z.squeeze(-1))
    # and re-quantizing the dequantized weight on those groups is the identity
    wq = dequantize(qt)
    assert torch.equal(decode(encode(wq.view(64, 4, 32), s, z, SPEC3), s, z, SPEC3).view_as(wq), wq)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=4, granularity="tensor"),
                                  QuantSpec(bits=3, group_size=32, symmetric=True),
                                  QuantSpec(bits=3, group_size=32, symmetric=True, full_range=True)])
def test_other_granularities_and_symmetric(spec):
    w, x, held = correlated_linear(2)
    qt = gptq_quantize(w, factor_hessian(hessian(x), 0.01), spec)
    assert output_error(w, dequantize(qt), held) < output_error(w, fake_quantize(w, spec), held)


def test_dead_columns_are_zeroed_and_the_rest_still_improves():
    w, x, held = correlated_linear(3)
    x[:, [5, 70]] = 0
    held[:, [5, 70]] = 0
    factor = factor_hessian(hessian(x), 0.01)
    assert factor.dead.nonzero().flatten().tolist() == [5, 70]
    wq = dequantize(gptq_quantize(w, factor, SPEC3))
    assert torch.isfinite(wq).all() and (wq[:, [5, 70]] == 0).all()
    assert output_error(w, wq, held) < output_error(w, fake_quantize(w, SPEC3), held)


def test_indefinite_hessian_gets_more_dampening_then_a_clear_error():
    h = torch.eye(8, dtype=torch.float64)
    h[0, 0] = -0.05  # mean diagonal ~0.87: 0.01 of it is not enough, 0.1 is
    factor = factor_hessian(h, 0.01)
    assert factor.damp == pytest.approx(0.1)
    h[0, 0] = -100.0  # no dampening of a few x10 steps fixes this one
    with pytest.raises(LowbitError, match="not positive definite even with dampening"):
        factor_hessian(h, 0.01, name="layer 3 (mlp.down_proj)")
    h[1, 1] = float("nan")
    with pytest.raises(LowbitError, match="non-finite calibration activations"):
        factor_hessian(h, 0.01)


def test_bad_config_is_refused():
    for damp in (0, -0.1, float("nan")):
        with pytest.raises(LowbitError, match="--damp must be a positive number"):
            GPTQConfig(SPEC3, damp=damp)
    with pytest.raises(LowbitError, match="block-size"):
        GPTQConfig(SPEC3, block_size=0)
    with pytest.raises(LowbitError, match="share one spec"):
        AWQGPTQConfig(AWQConfig(SPEC3), GPTQConfig(QuantSpec(bits=4, group_size=32)))
    with pytest.raises(LowbitError, match="needs calibration"):
        quantize_(tiny_llama(), GPTQConfig(SPEC3))


def test_gptq_on_tiny_llama_beats_rtn_and_awq_gptq_beats_awq():
    spec = QuantSpec(bits=3, group_size=16)
    base = make_salient(tiny_llama())
    calib, held = samples(16, 64, seed=1), samples(4, 64, seed=2)
    errors, reports = {}, {}
    for name, config in {
        "rtn": RTNConfig(spec),
        "gptq": GPTQConfig(spec),
        "gptq-r": GPTQConfig(spec, act_order=True),
        "awq": AWQConfig(spec, n_grid=10),
        "awq+gptq": AWQGPTQConfig(AWQConfig(spec, n_grid=10), GPTQConfig(spec)),
    }.items():
        model = copy.deepcopy(base)
        reports[name] = quantize_(model, config, calib)
        errors[name] = logits_error(model, base, held)
    assert errors["gptq"] < errors["rtn"] and errors["gptq-r"] < errors["rtn"]
    assert errors["awq+gptq"] < errors["awq"]
    assert reports["awq+gptq"].method == "awq+gptq" and len(reports["awq+gptq"].info["alphas"]) == 8
    assert reports["gptq"].info["damp_raised"] == 0


def test_awq_gptq_applies_a_saved_awq_search_then_calibrates_gptq(tmp_path):
    spec = QuantSpec(bits=3, group_size=16)
    path = tmp_path / "s.safetensors"
    a, b = tiny_llama(), tiny_llama()
    calib = samples(8, 32)
    quantize_(a, AWQGPTQConfig(AWQConfig(spec, n_grid=4, save_search=str(path)), GPTQConfig(spec)), calib)
    quantize_(b, AWQGPTQConfig(AWQConfig(spec, load_search=str(path)), GPTQConfig(spec)), calib)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_few_calibration_tokens_warn_with_the_number_needed():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(tiny_llama(), GPTQConfig(QuantSpec(bits=4, group_size=16)), samples(2, 32))  # 64 tokens, width 128
    msgs = [str(w.message) for w in caught if "calibration tokens" in str(w.message)]
    assert msgs and "at least 128 tokens" in msgs[0] and "--calib-samples 4" in msgs[0]


def test_an_exact_hessian_does_not_depend_on_where_its_chunks_begin():
    """Routed tokens (MoE experts) split over data-parallel workers where the router says, not at sample
    boundaries: their Hessian is summed from float64 products, which agree however the tokens are chunked."""
    from lowbit.methods.gptq import hessian

    x = torch.randn(1000, 48, generator=torch.Generator().manual_seed(0)) * 10
    exact = [hessian(x, chunk=c, exact=True) for c in (1000, 333, 64)]
    rough = [hessian(x, chunk=c) for c in (1000, 333, 64)]

    def spread(hs):  # the largest disagreement between chunkings, relative to the largest entry
        return max(((h - hs[0]).abs().max() / hs[0].abs().max()).item() for h in hs)

    assert spread(exact) < 1e-14 and spread(rough) > 1e-9  # float32 products round where the chunks begin
