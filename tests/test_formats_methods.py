"""Methods depend on the quantizer's interface, not on one format: RTN, salient and AWQ with FP4, NF4, MX."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from test_awq import logits_error, make_salient, samples

from lowbit.errors import LowbitError
from lowbit.methods import AWQConfig, RTNConfig, SalientConfig, quantize_
from lowbit.quantizer import QuantSpec


@pytest.mark.parametrize("spec", [
    QuantSpec(format="nf4", group_size=16), QuantSpec(format="fp4_e2m1", group_size=16),
    QuantSpec(format="mxfp4", group_size=32), QuantSpec(format="e2m0", group_size=16),
], ids=lambda s: s.format)
def test_awq_beats_rtn_in_other_formats(spec):
    base = make_salient(tiny_llama())
    calib, held_out = samples(16, 64, seed=1), samples(4, 64, seed=2)
    rtn, awq = copy.deepcopy(base), copy.deepcopy(base)
    r_rtn = quantize_(rtn, RTNConfig(spec), calib)
    r_awq = quantize_(awq, AWQConfig(spec, n_grid=10), calib)
    assert r_rtn.bits_per_weight == r_awq.bits_per_weight == spec.bits_per_weight()
    assert not r_awq.info["fallbacks"]
    assert logits_error(awq, base, held_out) < logits_error(rtn, base, held_out)


def test_rtn_weights_lie_on_the_format_grid():
    model = tiny_llama()
    spec = QuantSpec(format="fp4_e2m1", group_size=16)
    quantize_(model, RTNConfig(spec))
    w = model.model.layers[0].mlp.down_proj.weight.detach().view(-1, 16)
    scale = w.abs().amax(1, keepdim=True) / 6
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    on_grid = ((w / scale).abs().unsqueeze(-1) - grid).abs().amin(-1)
    assert on_grid.max() < 1e-4


def test_salient_and_kmeans_run_and_keep_channels():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    spec = QuantSpec(format="kmeans", bits=3, group_size=16)
    quantize_(model, SalientConfig(spec, frac=0.1, by="weight"))
    lin, lin0 = model.model.layers[0].mlp.up_proj, ref.model.layers[0].mlp.up_proj
    kept = (lin.weight == lin0.weight).all(0)
    assert kept.sum() == round(0.1 * lin.in_features)


def test_awq_search_file_remembers_the_format(tmp_path):
    path = tmp_path / "s.safetensors"
    a = make_salient(tiny_llama())
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    spec = QuantSpec(format="nf4", group_size=16)
    quantize_(a, AWQConfig(spec, n_grid=4, save_search=str(path)), samples(8, 32))
    quantize_(b, AWQConfig(spec, load_search=str(path)))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(LowbitError, match="another model or spec"):
        quantize_(c, AWQConfig(QuantSpec(format="fp4_e2m1", group_size=16), load_search=str(path)))
