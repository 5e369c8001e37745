"""Activation quantization on a tiny random Llama: the inputs linears see, their ranges, and clean removal."""
import copy

import pytest
import torch
from conftest import tiny_llama

from lowbit.errors import LowbitError
from lowbit.experiment import MethodOptions, make_config
from lowbit.methods import (
    ActQuantConfig,
    GPTQConfig,
    Pipeline,
    RTNConfig,
    SmoothQuantConfig,
    needs_calibration,
    quantize_,
)
from lowbit.methods.base import detach_runtime
from lowbit.quantizer import QuantSpec

OUTLIERS = (3, 17, 40)


def with_outliers(model, factor=50.0):
    """Channel outliers in every norm's output (×``factor`` on a few channels), as real LLMs have them.

    The linears reading those channels shrink by as much, so the float function is unchanged.
    """
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, parent, names in ((layer.input_layernorm, layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                        (layer.post_attention_layernorm, layer.mlp, ("gate_proj", "up_proj"))):
                norm.weight[list(OUTLIERS)] *= factor
                for n in names:
                    getattr(parent, n).weight[:, list(OUTLIERS)] /= factor
    return model


def tokens(seed, n=8, seq=32):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


IDS, CALIB = tokens(1), tokens(2)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def rel_error(model, ref_logits):
    return ((logits(model) - ref_logits).norm() / ref_logits.norm()).item()


def captured_inputs(model, name):
    """The input ``name`` receives, after every earlier pre-hook (so after rounding), on IDS."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    logits(model)
    handle.remove()
    return seen[0]


def test_dynamic_per_token_a8_is_close_to_float():
    model = tiny_llama()
    ref = logits(model)
    report = quantize_(model, ActQuantConfig(bits=8))
    assert report.method == "a8-token" and report.info["a_bit"] == 8 and report.info["a_static"] is False
    err = rel_error(model, ref)
    assert 0 < err < 0.02


def test_each_token_is_on_its_own_8_bit_grid():
    model = tiny_llama()
    quantize_(model, ActQuantConfig(bits=8))
    x = captured_inputs(model, "model.layers.1.mlp.down_proj").reshape(-1, 128)
    step = x.abs().amax(1, keepdim=True) / 127
    codes = x / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert (codes.round().abs().amax(1) == 127).all()  # the largest value of every row is the end of its grid


def test_per_token_beats_per_tensor_on_outlier_channels():
    errs = {}
    for gran in ("token", "tensor"):
        model = with_outliers(tiny_llama())
        ref = logits(model)
        quantize_(model, ActQuantConfig(bits=8, granularity=gran))
        errs[gran] = rel_error(model, ref)
    assert errs["token"] < errs["tensor"]


def test_static_range_is_the_extreme_over_all_calibration_inputs():
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].clone()))
               for n in names]
    for batch in CALIB.split(3):  # another batching than the calibration pass's
        logits(model, batch)
    for h in handles:
        h.remove()
    report = quantize_(model, ActQuantConfig(bits=8, granularity="tensor", static=True), CALIB)
    assert report.method == "a8-tensor-static" and len(report.info["a_ranges"]) == 14
    for n in names:
        x = torch.cat(seen[n])
        lo, hi = report.info["a_ranges"][n]
        assert lo == pytest.approx(x.min().item(), rel=1e-6) and hi == pytest.approx(x.max().item(), rel=1e-6)
    # inputs beyond the calibrated range saturate at its end: the grid step is fixed by it
    lo, hi = report.info["a_ranges"]["model.layers.1.mlp.down_proj"]
    step = max(abs(lo), abs(hi)) / 127
    codes = captured_inputs(model, "model.layers.1.mlp.down_proj") / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3


def test_static_ranges_are_measured_after_the_weight_method():
    model = tiny_llama()
    spec = QuantSpec(bits=2, group_size=16)
    before = quantize_(copy.deepcopy(model), ActQuantConfig(granularity="tensor", static=True), CALIB).info["a_ranges"]
    after = copy.deepcopy(model)
    quantize_(after, RTNConfig(spec))
    alone = quantize_(after, ActQuantConfig(granularity="tensor", static=True), CALIB).info["a_ranges"]
    piped = quantize_(model, Pipeline((RTNConfig(spec), ActQuantConfig(granularity="tensor", static=True))), CALIB)
    assert piped.info["a_ranges"] == alone != before


def test_hooks_are_removed_and_float_logits_return_exactly():
    model = tiny_llama()
    ref = logits(model)
    quantize_(model, ActQuantConfig(bits=4, granularity="tensor"))
    assert not torch.equal(logits(model), ref)
    assert detach_runtime(model) == 14  # 7 linears x 2 layers
    assert torch.equal(logits(model), ref)


def test_session_restore_removes_activation_hooks():
    from lowbit.experiment import Session

    class Tok:  # word -> id, enough for tokenize_windows
        def __call__(self, text, return_tensors=None):
            class Out:
                input_ids = torch.tensor([[hash(w) % 256 for w in text.split()]])
            return Out()

    model = tiny_llama()
    ref = logits(model)
    session = Session(model, Tok(), text="a b c d " * 64, seq_len=32)
    session.run("fp", None, MethodOptions(a_bit=4, a_granularity="tensor"), progress=False, evaluate=False)
    assert not torch.equal(logits(model), ref)
    session.restore()
    assert torch.equal(logits(model), ref)


def test_weight_methods_combine_with_activation_quantization():
    opts = MethodOptions(a_bit=8)
    spec = QuantSpec(bits=4)
    config = make_config("smoothquant", spec, opts)
    assert [type(s) for s in config.steps] == [SmoothQuantConfig, RTNConfig, ActQuantConfig]
    assert [type(s) for s in make_config("gptq", spec, opts).steps] == [GPTQConfig, ActQuantConfig]
    assert make_config("fp", None, opts) == ActQuantConfig(8)
    assert make_config("rtn", spec, MethodOptions()) == RTNConfig(spec)
    assert needs_calibration(ActQuantConfig(granularity="tensor", static=True))
    assert not needs_calibration(ActQuantConfig())


@pytest.mark.parametrize("kwargs,fragment", [
    ({"bits": 9}, "from 2 to 8"),
    ({"bits": 1}, "from 2 to 8"),
    ({"granularity": "channel"}, "'token' or 'tensor'"),
    ({"static": True}, "one per tensor"),
])
def test_bad_configs_are_refused(kwargs, fragment):
    with pytest.raises(LowbitError, match=fragment):
        ActQuantConfig(**kwargs)


def test_static_without_calibration_is_refused():
    with pytest.raises(LowbitError, match="need a calibration set"):
        quantize_(tiny_llama(), ActQuantConfig(granularity="tensor", static=True))
