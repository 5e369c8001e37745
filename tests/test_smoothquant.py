"""SmoothQuant on a tiny random Llama: the float function is kept, outliers move into the weights, W8A8 gains."""
import copy
import dataclasses
import json
import random

import pytest
import torch
from conftest import tiny_llama
from test_actquant import CALIB, logits, rel_error, with_outliers

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.methods import ActQuantConfig, Pipeline, RTNConfig, SmoothQuantConfig, quantize_
from lowbit.methods.smoothquant import smooth_scales
from lowbit.models import families
from lowbit.quantizer import QuantSpec

W8 = RTNConfig(QuantSpec(bits=8, granularity="channel", symmetric=True))


def input_absmax(model, names, ids=CALIB):
    """Per input channel max|x| of each named module over ``ids``."""
    seen = {}

    def hook(n):
        return lambda m, a: seen.__setitem__(n, torch.maximum(seen.get(n, torch.zeros(a[0].shape[-1])),
                                                             a[0].abs().reshape(-1, a[0].shape[-1]).amax(0)))

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    logits(model, ids)
    for h in handles:
        h.remove()
    return seen


def test_smoothing_keeps_the_float_model():
    model = with_outliers(tiny_llama())
    ref = logits(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = quantize_(model, SmoothQuantConfig(alpha=0.5), CALIB)
    assert report.method == "smoothquant" and report.info["sq_groups"] == (
        "input_layernorm->q_proj/k_proj/v_proj,post_attention_layernorm->gate_proj/up_proj,mlp.up_proj->down_proj")
    assert rel_error(model, ref) < 1e-5
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.1.input_layernorm.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed
    assert "model.layers.1.self_attn.o_proj.weight" not in changed


def test_tied_v_to_o_smoothing_keeps_the_float_model(monkeypatch):
    # 4 query heads on 2 KV heads: one scale per v_proj channel, shared by the two o_proj columns it feeds
    groups = tuple(dataclasses.replace(g, smooth=True) for g in families.LLAMA.groups)
    monkeypatch.setitem(families.FAMILIES, "llama", dataclasses.replace(families.LLAMA, groups=groups))
    model = with_outliers(tiny_llama())
    ref = logits(model)
    o_before = model.model.layers[0].self_attn.o_proj.weight.clone()
    report = quantize_(model, SmoothQuantConfig(alpha=0.5), CALIB)
    assert "self_attn.v_proj->o_proj" in report.info["sq_groups"]
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, o_before)
    assert rel_error(model, ref) < 1e-5


@pytest.mark.parametrize("linears", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.down_proj",)])
def test_half_migration_equalises_activation_and_weight_ranges(linears):
    # with α = 0.5, max|X_j / s_j| = max|W_j s_j| = sqrt(max|X_j| max|W_j|) on the calibration tokens
    model = with_outliers(tiny_llama())
    quantize_(model, SmoothQuantConfig(alpha=0.5), CALIB)
    layer = "model.layers.1."
    x = input_absmax(model, [layer + linears[0]])[layer + linears[0]]
    w = torch.stack([model.get_submodule(layer + n).weight.abs().amax(0) for n in linears]).amax(0)
    torch.testing.assert_close(x, w, rtol=1e-4, atol=0)


def test_full_migration_leaves_every_activation_channel_at_one():
    model = with_outliers(tiny_llama())
    quantize_(model, SmoothQuantConfig(alpha=1.0, linear_groups=False), CALIB)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]
    for x in input_absmax(model, names).values():
        torch.testing.assert_close(x, torch.ones_like(x), rtol=1e-4, atol=0)
    down = input_absmax(model, ["model.layers.1.mlp.down_proj"])["model.layers.1.mlp.down_proj"]
    assert not torch.allclose(down, torch.ones_like(down), rtol=1e-2)  # linear->linear groups were left alone


def test_smoothing_lowers_w8a8_per_tensor_error_on_outlier_channels():
    base = with_outliers(tiny_llama())
    ref = logits(base)
    errs = {}
    for smooth in (False, True):
        model = copy.deepcopy(base)
        steps = ((SmoothQuantConfig(),) if smooth else ()) + (W8, ActQuantConfig(8, "tensor"))
        quantize_(model, Pipeline(steps), CALIB)
        errs[smooth] = rel_error(model, ref)
    assert errs[True] < 0.5 * errs[False]


def test_dead_channels_keep_scale_one():
    s = smooth_scales(torch.tensor([0.0, 4.0, 4.0, float("inf")]), torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5)
    assert s.tolist() == [1.0, 1.0, 2.0, 1.0]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(LowbitError, match=r"--alpha must be in \[0, 1\]"):
        SmoothQuantConfig(alpha=alpha)


def test_smoothquant_needs_calibration():
    with pytest.raises(LowbitError, match="calibration"):
        quantize_(tiny_llama(), SmoothQuantConfig())


# ---- the command line (in this process, to keep the file fast), on a tiny checkpoint ---------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``lowbit ARGS``."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer saved as a checkpoint, and a text file in its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("sq")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d / "ckpt")
    with_outliers(tiny_llama()).save_pretrained(d / "ckpt")
    rng = random.Random(0)
    text = d / "text.txt"
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(4000)))
    return d / "ckpt", text


def test_cli_smoothquant_with_activation_quantization(tiny_run, capsys):
    ckpt, text = tiny_run
    common = ("--model", str(ckpt), "--data", str(text), "--calib-data", str(text), "--calib-samples", "4",
              "--calib-seq-len", "32", "--seq-len", "64", "--max-windows", "2", "--w-bit", "8", "--group-size", "0",
              "--sym", "--json")
    rows = {}
    for extra in ((), ("--a-static",)):
        code, out, err = cli(capsys, "eval", "--method", "smoothquant", "--a-bit", "8", "--alpha", "0.6",
                             *extra, *common)
        assert code == 0, err
        rows[extra] = json.loads(out.strip().splitlines()[-1])
    dyn, static = rows[()], rows[("--a-static",)]
    assert dyn["method"] == "smoothquant+rtn+a8-token" and dyn["a_bit"] == 8 and dyn["alpha"] == 0.6
    assert static["method"] == "smoothquant+rtn+a8-tensor-static" and static["a_granularity"] == "tensor"
    assert dyn["windows"] == 2 and 1 < dyn["ppl"] < 1000 and static["ppl"] != dyn["ppl"]


@pytest.mark.parametrize("args,fragments", [
    (["eval", "--method", "smoothquant", "--alpha", "1.5"], ["--alpha must be in [0, 1]"]),
    (["eval", "--method", "rtn", "--a-bit", "9"], ["--a-bit", "bits must be from 2 to 8"]),
    (["eval", "--method", "rtn", "--a-bit", "8", "--a-granularity", "channel"], ["--a-granularity", "invalid choice"]),
    (["eval", "--method", "rtn", "--a-bit", "8", "--a-static", "--a-granularity", "token"], ["one per tensor"]),
    (["eval", "--method", "rtn", "--a-static"], ["add --a-bit B"]),
    (["quantize", "--method", "rtn", "--a-bit", "8", "-o", "out"], ["packed weights only", "lowbit eval"]),
])
def test_bad_activation_flags_fail_with_one_line(args, fragments, capsys):
    code, _, err = cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), err


def test_smoothquant_after_rotation_keeps_the_function_and_skips_rotated_inputs():
    """An online rotation on down_proj's input: the up->down group is left alone, the model is unchanged."""
    from lowbit.methods import Pipeline, RotationConfig

    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    calib = torch.randint(0, model.config.vocab_size, (4, 32))
    report = quantize_(model, Pipeline((RotationConfig(seed=0), SmoothQuantConfig(alpha=0.5))), calib)
    with torch.no_grad():
        out = model(ids).logits
    assert report.info["sq_skipped_transformed"] == model.config.num_hidden_layers
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
