"""Mixed precision: Hessian traces, the exact knapsack allocation, per-linear specs in every method."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from lowbit import QuantSpec, RTNConfig, quantize_
from lowbit.allocation import Allocation, allocate, allocate_bits, check_choices, hawq_costs, rounding_errors
from lowbit.errors import LowbitError
from lowbit.methods import AWQConfig, AWQGPTQConfig, GPTQConfig
from lowbit.models.families import family_for
from lowbit.models.inventory import quantizable_linears
from lowbit.quantizer import fake_quantize
from lowbit.sensitivity import hutchinson_traces, lm_loss, loss_deltas, probe_sums
from lowbit.specmap import SpecMap, code_bits

BASE = QuantSpec(bits=4, group_size=32)


def linears_of(model):
    return quantizable_linears(model, family_for(model))


# ---- Hutchinson ---------------------------------------------------------------------------


def test_hutchinson_matches_the_exact_hessian_trace():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    w1, w2 = torch.randn(4, 5, requires_grad=True), torch.randn(2, 4, requires_grad=True)

    def loss_of(a, b):
        return (torch.tanh(x @ a.T) @ b.T - y).pow(2).mean()

    exact = [torch.autograd.functional.hessian(lambda a: loss_of(a, w2), w1).reshape(20, 20),
             torch.autograd.functional.hessian(lambda b: loss_of(w1, b), w2).reshape(8, 8)]
    probes = 150
    est = probe_sums(lambda: loss_of(w1, w2), [w1, w2], probes, torch.Generator().manual_seed(1)) / probes
    for h, e in zip(exact, est):
        off = h - torch.diag(h.diagonal())
        std = math.sqrt(2 * float(off.pow(2).sum()) / probes)  # the estimator's standard error
        assert abs(float(e) - float(h.trace())) <= 4 * std + 1e-6, (float(e), float(h.trace()), std)


def test_hutchinson_on_a_tiny_llama_leaves_the_model_as_it_was():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = lm_loss(model, ids).item()
    traces = hutchinson_traces(model, ids, probes=2, progress=False)
    assert list(traces) == list(linears_of(model)) and all(math.isfinite(t) for t in traces.values())
    assert model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in model.parameters())
    assert lm_loss(model, ids).item() == before
    assert hutchinson_traces(model, ids, probes=2, progress=False) == traces  # seeded


def test_loss_deltas_restore_weights_and_measure_from_the_float_loss():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base, deltas = loss_deltas(model, ids, BASE, bits=(2, 8), progress=False)
    assert base == pytest.approx(lm_loss(model, ids).item(), abs=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    with torch.no_grad():
        lin.weight.copy_(fake_quantize(lin.weight, replace(BASE, bits=2)))
    assert deltas[name][2] == pytest.approx(lm_loss(model, ids).item() - base, abs=1e-5)
    _, per_layer = loss_deltas(tiny_llama(), ids, BASE, bits=(2,), unit="layer", progress=False)
    assert list(per_layer) == ["model.layers.0", "model.layers.1"]


# ---- the solver ---------------------------------------------------------------------------


def brute_force(costs, sizes, capacity):
    best = math.inf
    for pick in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        idx = torch.tensor(pick)
        if int(sizes[torch.arange(len(pick)), idx].sum()) <= capacity:
            best = min(best, float(costs[torch.arange(len(pick)), idx].sum()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_solver_is_optimal_and_within_budget(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (6,), generator=g) * 16
    widths = torch.tensor([2, 3, 4, 8])
    sizes = counts[:, None] * widths[None, :]
    costs = torch.rand(6, 4, generator=g, dtype=torch.float64).sort(1, descending=True).values
    for budget in (2.0, 2.7, 3.5, 5.0, 8.0):
        capacity = math.floor(budget * int(counts.sum()))
        choice, info = allocate(costs, sizes, capacity)
        used = int(sizes[torch.arange(6), choice].sum())
        assert used <= capacity and info["exact"]
        assert info["cost"] == pytest.approx(brute_force(costs, sizes, capacity))
        coarse, cinfo = allocate(costs, sizes, capacity, max_states=7)  # rounded-up sizes: feasible, maybe worse
        assert int(sizes[torch.arange(6), coarse].sum()) <= capacity
        assert cinfo["cost"] >= info["cost"] - 1e-12


def test_allocation_on_a_tiny_llama_respects_the_budget():
    model = tiny_llama()
    linears = linears_of(model)
    choices = (2, 3, 4, 8)
    costs = rounding_errors(linears, BASE, choices)  # strictly falling with the width
    n = sum(m.weight.numel() for m in linears.values())
    for budget in (2.0, 2.5, 3.0, 3.5, 4.0, 8.0):
        alloc = allocate_bits(linears, costs, BASE, bits_budget=budget, choices=choices)
        avg = sum(alloc.bits[k] * m.weight.numel() for k, m in linears.items()) / n
        assert avg <= budget + 1e-12 and alloc.meta["code_bits_per_weight"] == pytest.approx(avg)
        assert code_bits(alloc.spec_map(), linears) == pytest.approx(avg)
        assert alloc.meta["exact"]
    assert set(allocate_bits(linears, costs, BASE, bits_budget=2.0).bits.values()) == {2}
    assert set(allocate_bits(linears, costs, BASE, bits_budget=8.0).bits.values()) == {8}
    mb = allocate_bits(linears, costs, BASE, bits_budget=3.5).meta["linear_mb"]
    by_size = allocate_bits(linears, costs, BASE, size_budget_mb=mb)
    assert by_size.meta["linear_mb"] <= mb + 1e-12
    assert by_size.meta["cost"] <= allocate_bits(linears, costs, BASE, bits_budget=3.5).meta["cost"] + 1e-9


def test_hawq_costs_weight_rounding_error_by_mean_eigenvalue():
    model = tiny_llama(layers=1)
    linears = linears_of(model)
    traces = {k: float(i) for i, k in enumerate(linears)}
    costs = hawq_costs(linears, traces, BASE, (2, 4))
    errs = rounding_errors(linears, BASE, (2, 4))
    for i, (k, m) in enumerate(linears.items()):
        assert torch.allclose(costs[i], traces[k] / m.weight.numel() * errs[i])


@pytest.mark.parametrize("kw,msg", [
    ({"bits_budget": 1.9}, "outside the widths 2..8"),
    ({"bits_budget": 8.5}, "outside the widths 2..8"),
    ({"size_budget_mb": 1e-6}, "outside what the widths can give"),
    ({"size_budget_mb": 1e3}, "outside what the widths can give"),
    ({"bits_budget": 3.0, "size_budget_mb": 1.0}, "exactly one budget"),
    ({"bits_budget": 3.0, "choices": (2, 9)}, "integers from 2 to 8"),
    ({"bits_budget": 3.0, "choices": (1, 4)}, "integers from 2 to 8"),
])
def test_bad_budgets_are_refused(kw, msg):
    linears = linears_of(tiny_llama(layers=1))
    n_choices = len(kw.get("choices", (2, 3, 4, 8)))
    with pytest.raises(LowbitError, match=msg):
        allocate_bits(linears, torch.ones(len(linears), n_choices), BASE, **kw)


def test_allocation_file_round_trip_and_foreign_names(tmp_path):
    linears = linears_of(tiny_llama())
    alloc = allocate_bits(linears, rounding_errors(linears, BASE, (2, 3, 4, 8)), BASE, bits_budget=3.0)
    alloc.save(tmp_path / "a.json")
    again = Allocation.load(tmp_path / "a.json")
    assert again.bits == alloc.bits and again.base == BASE and again.meta["bits_budget"] == 3.0
    again.check_model(linears)
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["bits"]["model.layers.7.mlp.up_proj"] = 4
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(LowbitError, match="does not have: model.layers.7.mlp.up_proj"):
        Allocation.load(tmp_path / "b.json").check_model(linears)
    doc["bits"]["model.layers.7.mlp.up_proj"] = 9
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(LowbitError, match="integers from 2 to 8"):
        Allocation.load(tmp_path / "c.json")
    with pytest.raises(LowbitError, match="does not have"):
        quantize_(tiny_llama(), RTNConfig(SpecMap.from_bits(BASE, {"model.layers.9.mlp.up_proj": 2})))
    with pytest.raises(LowbitError, match="integers from 2 to 8"):
        check_choices([0])


# ---- methods with per-linear specs --------------------------------------------------------

MIXED = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 8, "model.layers.0.mlp.up_proj": 2,
         "model.layers.0.mlp.gate_proj": 8, "model.layers.1.self_attn.o_proj": 3, "model.layers.1.mlp.down_proj": 8}


def max_distinct_per_group(w: torch.Tensor, group: int = 32) -> int:
    g = w.detach().reshape(-1, group)
    s = g.sort(1).values
    return int(((s[:, 1:] != s[:, :-1]).sum(1) + 1).max())


@pytest.mark.parametrize("make", [
    lambda s: RTNConfig(s),
    lambda s: GPTQConfig(s),
    lambda s: AWQConfig(s, n_grid=3, clip_grid=4),
    lambda s: AWQGPTQConfig(AWQConfig(s, n_grid=3, clip_grid=4), GPTQConfig(s)),
], ids=["rtn", "gptq", "awq", "awq+gptq"])
def test_each_linear_is_rounded_at_its_own_width(make):
    model = tiny_llama()
    spec = SpecMap.from_bits(BASE, MIXED)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize_(model, make(spec), calib)
    for name, lin in linears_of(model).items():
        b = MIXED.get(name, BASE.bits)
        distinct = max_distinct_per_group(lin.weight)
        assert distinct <= 2**b, (name, b, distinct)
        if b == 8:
            assert distinct > 2**BASE.bits, name  # not rounded to the default width
    linears = linears_of(model)
    n = sum(m.weight.numel() for m in linears.values())
    want = sum(spec.spec_for(k).bits_per_weight() * m.weight.numel() for k, m in linears.items()) / n
    assert report.bits_per_weight == pytest.approx(want)


@pytest.mark.parametrize("make", [lambda s: GPTQConfig(s), lambda s: AWQConfig(s, n_grid=3, clip_grid=4)],
                         ids=["gptq", "awq"])
def test_a_map_of_one_width_is_the_uniform_method(make):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    a, b = tiny_llama(), tiny_llama()
    quantize_(a, make(BASE), calib)
    quantize_(b, make(SpecMap.from_bits(BASE, {k: 4 for k in linears_of(b)})), calib)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_mixed_widths_pack_and_reload_exactly(tmp_path):
    from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed

    model = tiny_llama()
    spec = SpecMap.from_bits(BASE, MIXED)
    quantize_(model, RTNConfig(spec))
    packed = pack_model_(model, spec, method="rtn", embed="fp32")
    assert packed.entries["model.layers.0.self_attn.q_proj"]["bits"] == 2
    assert packed.entries["model.layers.1.mlp.down_proj"]["bits"] == 8
    out = save_packed(packed, model.config, None, tmp_path / "m")
    loaded, _ = load_packed(out, kernel="dequant")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


# ---- the command line ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinybyte")
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_cli_eval_with_a_bits_budget_then_reuse_the_allocation(byte_ckpt, tmp_path, capsys):
    from lowbit.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    alloc = tmp_path / "alloc.json"
    common = ["--model", str(byte_ckpt), "--method", "rtn", "--group-size", "16", "--data", str(text),
              "--calib-data", str(text), "--seq-len", "64", "--max-windows", "2", "--calib-samples", "2",
              "--calib-seq-len", "32", "--json"]
    assert main(["eval", *common, "--bits-budget", "3", "--sensitivity-samples", "1", "--probes", "1",
                 "--save-allocation", str(alloc)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(alloc.read_text())
    assert row["w_bit"] == "mixed" and row["code_bits"] <= 3.0 and saved["code_bits_per_weight"] <= 3.0
    assert set(saved["bits"]) == set(linears_of(tiny_llama()))
    assert main(["eval", *common, "--allocation", str(alloc)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == row["ppl"] and again["code_bits"] == row["code_bits"]
    assert main(["eval", *common, "--bits-budget", "9"]) == 2
    assert "outside the widths" in capsys.readouterr().err
    assert main(["eval", *common, "--w-bit", "3", "--allocation", str(alloc)]) == 2
    assert "--w-bit sets one width" in capsys.readouterr().err
