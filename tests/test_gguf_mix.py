"""GGUF at any size (--gguf AUTO): per-linear KLD measured on dev windows, one type per linear chosen by an exact
knapsack under the budget, the file holding exactly those types and llama-quantize lines that name them."""
from __future__ import annotations

import copy
import itertools
import json

import gguf
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.gguf_table import tensor_table
from lowbit.formats.ggml import GGML_TYPES
from lowbit.gguf_mix import CANDIDATES, Sensitivity, check_types, choose, fitting, measure, parse_size, tensor_bytes
from lowbit.models.families import family_for
from lowbit.models.inventory import quantizable_linears
from lowbit.quantizer import QuantSpec, dequantize, quantize


def test_sizes_read_in_powers_of_1000():
    assert parse_size("93.5MB") == 93_500_000 and parse_size("120M") == 120_000_000
    assert parse_size("2G") == 2_000_000_000 and parse_size("500000") == 500_000 and parse_size("1.5 kb") == 1500
    for bad in ("", "MB", "12 XB", "-3M"):
        with pytest.raises(LowbitError, match="cannot read the size"):
            parse_size(bad)


def test_type_names_are_checked_and_rows_decide_what_fits():
    assert check_types(["Q8_0", "q2_k", "iq4_xs"]) == ("q2_k", "iq4_xs", "q8_0")  # narrowest first
    with pytest.raises(LowbitError, match="unknown GGUF type Q7_K"):
        check_types(["q4_0", "Q7_K"])
    # rows of 576: no 256-weight super-block, no Q1_0 block of 128; Q2_0's blocks of 64 fit
    assert fitting(CANDIDATES, 576) == ["q2_0", "q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0"]
    assert fitting(CANDIDATES, 1536) == list(CANDIDATES)
    assert tensor_bytes(GGML_TYPES["q4_k"], (10, 512)) == 10 * 2 * 144


def synthetic(seed: int = 0) -> Sensitivity:
    """Four linears of two widths with random KLD, lower for wider types (as measured ones are)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (64, 256), "b": (64, 96), "c": (32, 512), "d": (48, 256)}
    kld = {}
    for n, (_, cols) in shapes.items():
        types = fitting(CANDIDATES, cols)
        vals = torch.rand(len(types), generator=g).sort(descending=True).values
        kld[n] = {t: float(v) for t, v in zip(types, vals)}
    return Sensitivity(shapes, kld)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_choice_is_the_best_mix_within_the_budget(seed):
    """Against brute force over every combination: the chosen mix fits and no mix that fits has less KLD."""
    sens = synthetic(seed)
    names = list(sens.shapes)
    options = [fitting(CANDIDATES, sens.shapes[n][1]) for n in names]

    def size(combo):
        return sum(tensor_bytes(GGML_TYPES[t], sens.shapes[n]) for n, t in zip(names, combo))
    combos = list(itertools.product(*options))
    lo, hi = min(map(size, combos)), max(map(size, combos))
    for capacity in torch.linspace(lo, hi, 7).long().tolist():
        mix = choose(sens, CANDIDATES, capacity)
        best = min(sum(sens.kld[n][t] for n, t in zip(names, c)) for c in combos if size(c) <= capacity)
        assert mix.meta["linear_bytes"] <= capacity
        assert mix.meta["linear_bytes"] == size([mix.types[n] for n in names])
        assert mix.meta["predicted_kld"] == pytest.approx(best, rel=1e-12)


def test_linears_stacked_into_one_tensor_take_one_type():
    """Experts llama.cpp stacks into one tensor are one item of the knapsack: one type for all of them, chosen
    on their summed KLD and bytes; the best such mix by brute force."""
    sens = synthetic(3)
    groups = {"a": "experts", "d": "experts"}  # both rows of 256
    names, keys = list(sens.shapes), ["experts", "b", "c"]
    members = {"experts": ["a", "d"], "b": ["b"], "c": ["c"]}
    options = [fitting(CANDIDATES, sens.shapes[members[k][0]][1]) for k in keys]

    def size(combo):
        return sum(tensor_bytes(GGML_TYPES[t], sens.shapes[m]) for k, t in zip(keys, combo) for m in members[k])

    def cost(combo):
        return sum(sens.kld[m][t] for k, t in zip(keys, combo) for m in members[k])
    combos = list(itertools.product(*options))
    for capacity in torch.linspace(min(map(size, combos)), max(map(size, combos)), 5).long().tolist():
        mix = choose(sens, CANDIDATES, capacity, groups=groups)
        assert mix.types["a"] == mix.types["d"] and set(mix.types) == set(names)
        assert mix.meta["linear_bytes"] <= capacity
        assert mix.meta["predicted_kld"] == pytest.approx(min(cost(c) for c in combos if size(c) <= capacity),
                                                          rel=1e-12)
    lines = mix.tensor_type_lines({"a": "blk.0.ffn_up_exps.weight", "d": "blk.0.ffn_up_exps.weight",
                                   "b": "blk.0.attn_q.weight", "c": "blk.0.ffn_down.weight"})
    assert len(lines) == 3 and lines[0].startswith("^blk\\.0\\.ffn_up_exps\\.weight$=")


def test_budgets_out_of_reach_are_one_line_naming_the_range():
    sens = synthetic()
    weights = sum(r * c for r, c in sens.shapes.values())
    # Q1_0 where rows allow (1.125 bits), Q4_0 on the rows of 96 (4.5): 1.53 bits per weight at the least
    with pytest.raises(LowbitError, match=r"reach .* MB \(1\.530 bits per linear weight\) to .* MB \(8\.500\)"):
        choose(sens, CANDIDATES, weights * 3 // 16)
    # without the small-block types: Q2_K where rows allow (2.625 bits): 2.85 bits per weight at the least
    big = [t for t in CANDIDATES if t not in ("q1_0", "q2_0")]
    with pytest.raises(LowbitError, match=r"reach .* MB \(2\.850 bits per linear weight\) to .* MB \(8\.500\)"):
        choose(sens, big, weights * 2 // 8)
    with pytest.raises(LowbitError, match="more than with float16 linears"):
        choose(sens, CANDIDATES, weights * 17 // 8)
    with pytest.raises(LowbitError, match="none of Q2_K, Q3_K"):
        choose(sens, ["q2_k", "q3_k"], weights)  # rows of 96 hold no K-quant


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama(hidden=256, layers=2, heads=4, kv_heads=2)
    g = torch.Generator().manual_seed(0)
    calib, dev = torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (2, 48), generator=g)
    before = copy.deepcopy(model.state_dict())
    sens = measure(model, calib, dev, ["q2_k", "q4_0", "q8_0"], progress=False)
    return model, calib, dev, before, sens


def test_measuring_leaves_the_weights_as_they_were(measured):
    model, _, _, before, _ = measured
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_each_kld_is_the_whole_models_with_that_linear_alone_rounded(measured):
    """The suffix re-run gives what a full forward of the model with that one linear rounded gives; wider types
    cost less KLD for every linear."""
    model, calib, dev, _, sens = measured
    linears = quantizable_linears(model, family_for(model))
    from lowbit.gguf_mix import channel_importances

    imp = channel_importances(model, linears, calib)
    with torch.no_grad():
        ref = F.log_softmax(model(dev).logits.double(), -1)
        # the embedding and the (untied) head are measured too, each with the type's own fit
        assert sens.embeddings == ["model.embed_tokens", "lm_head"]
        for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", *sens.embeddings):
            for t in ("q2_k", "q8_0"):
                m = copy.deepcopy(model)
                lin = m.get_submodule(name)
                lin.weight.copy_(dequantize(quantize(lin.weight, QuantSpec(format=t), importance=imp.get(name))))
                logq = F.log_softmax(m(dev).logits.double(), -1)
                full = float((ref.exp() * (ref - logq)).sum(-1).mean())
                assert sens.kld[name][t] == pytest.approx(full, rel=1e-4, abs=1e-9)
    assert all(k["q8_0"] < k["q4_0"] < k["q2_k"] for k in sens.kld.values())


def test_mixes_measured_whole_on_dev(measured):
    """whole_klds: one tensor rounded gives that tensor's measured KLD; a mix gives what a full forward of a copy
    with all its tensors rounded gives (not the sum), and the weights are restored. alternatives: the best
    predicted mix per embedding type, the unconstrained knapsack's first."""
    model, calib, dev, before, sens = measured
    name = "model.layers.1.mlp.down_proj"
    linears = quantizable_linears(model, family_for(model))
    from lowbit.gguf_mix import Mix, alternatives, channel_importances, whole_klds

    weights = sum(r * c for r, c in sens.shapes.values())
    mixes = alternatives(sens, ["q2_k", "q4_0", "q8_0"], weights * 5 // 8, close=float("inf"))
    assert [m.types for m in alternatives(sens, ["q2_k", "q4_0", "q8_0"], weights * 5 // 8, close=1.0)] == \
        [mixes[0].types]  # only those predicted within `close` times the best are measured
    assert mixes[0].types == choose(sens, ["q2_k", "q4_0", "q8_0"], weights * 5 // 8).types
    assert len(mixes) == 3 and len({m.embed for m in mixes}) == 3
    assert all(m.meta["chosen_bytes"] <= weights * 5 // 8 for m in mixes)
    assert [m.meta["predicted_kld"] for m in mixes] == sorted(m.meta["predicted_kld"] for m in mixes)
    alone = whole_klds(model, calib, dev, [Mix({name: "q2_k"}, {})])[0]
    assert alone == pytest.approx(sens.kld[name]["q2_k"], rel=1e-4)
    got = whole_klds(model, calib, dev, mixes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    imp = channel_importances(model, linears, calib)
    with torch.no_grad():
        ref = F.log_softmax(model(dev).logits.double(), -1)
        m = copy.deepcopy(model)
        for n, t in mixes[1].types.items():
            lin = m.get_submodule(n)
            lin.weight.copy_(dequantize(quantize(lin.weight, QuantSpec(format=t), importance=imp.get(n))))
        full = float((ref.exp() * (ref - F.log_softmax(m(dev).logits.double(), -1))).sum(-1).mean())
    assert got[1] == pytest.approx(full, rel=1e-4)
    assert got[1] != pytest.approx(mixes[1].meta["predicted_kld"], rel=1e-3)  # the whole is not the sum


def _measure_rank(rank: int, out: str) -> None:
    """One of two data-parallel workers: half the calibration windows each, the same dev windows; it counts its
    suffix re-runs."""
    import torch.distributed as dist

    from lowbit import distributed, sensitivity

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    runs, logits = [0], sensitivity.Suffix.logits

    def counting(self, *args, **kwargs):
        runs[0] += 1
        return logits(self, *args, **kwargs)
    sensitivity.Suffix.logits = counting
    try:
        model = tiny_llama(hidden=256, layers=2, heads=4, kv_heads=2)
        g = torch.Generator().manual_seed(0)
        calib, dev = torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (2, 48), generator=g)
        sens = measure(model, calib[2 * rank: 2 * rank + 2], dev, ["q2_k", "q4_0", "q8_0"], progress=False)
    finally:
        sensitivity.Suffix.logits = logits
        distributed.finish()
    torch.save({"kld": sens.kld, "runs": runs[0] - 1}, f"{out}/rank{rank}.pt")  # less the float reference's


def test_two_workers_measure_what_one_process_measures(measured, tmp_path):
    """Each worker holds half the calibration: the importances are summed over both, the measurements shared out
    and summed, so both workers return the one-process numbers."""
    import torch.multiprocessing as mp

    *_, alone = measured
    mp.start_processes(_measure_rank, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["kld"] == ranks[1]["kld"], "the workers disagree"
    measurements = sum(len(k) for k in alone.kld.values())
    assert sum(r["runs"] for r in ranks) == measurements and max(r["runs"] for r in ranks) < measurements
    for name, per_type in alone.kld.items():
        for t, v in per_type.items():
            assert ranks[0]["kld"][name][t] == pytest.approx(v, rel=1e-6, abs=1e-12), (name, t)


def test_a_sensitivity_file_is_completed_not_measured_again(measured):
    """Measuring with a known file measures only what it lacks (a kept number stays, even a wrong one) and the
    rest equals a measurement from scratch; a file of other windows is refused."""
    model, calib, dev, _, full = measured
    part = measure(model, calib, dev, ["q4_0"], progress=False)
    first = next(iter(part.kld))
    part.kld[first]["q4_0"] = 123.0
    done = measure(model, calib, dev, ["q2_k", "q8_0"], progress=False, known=part)
    assert done.kld[first]["q4_0"] == 123.0 and done.meta["types"] == ["q2_k", "q4_0", "q8_0"]
    for name, per_type in full.kld.items():
        for t in ("q2_k", "q8_0"):
            assert done.kld[name][t] == pytest.approx(per_type[t], rel=1e-9), (name, t)
    with pytest.raises(LowbitError, match="would not add up"):
        measure(model, calib, dev[:1], ["q8_0"], progress=False, known=part)
    calls = []  # a complete file runs the model not once (no importances, no float logits)
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = measure(model, calib, dev, ["q2_k", "q4_0"], progress=False, known=done)
    finally:
        hook.remove()
    assert calls == [] and again.kld == {n: done.kld[n] for n in again.kld}


def test_the_sensitivity_file_round_trips_and_refuses_another_model(measured, tmp_path):
    model, _, _, _, sens = measured
    sens.save(tmp_path / "s.json")
    back = Sensitivity.load(tmp_path / "s.json")
    assert back.kld == sens.kld and back.shapes == sens.shapes
    linears = quantizable_linears(model, family_for(model))
    back.check_model(linears, ["q2_k", "q8_0"])
    with pytest.raises(LowbitError, match="no measurements for q5_k"):
        back.check_model(linears, ["q5_k"])
    other = tiny_llama(hidden=64)
    with pytest.raises(LowbitError, match="another model"):
        back.check_model(quantizable_linears(other, family_for(other)), ["q8_0"])


@pytest.mark.model
def test_auto_mix_from_the_command_line_to_a_gguf_file(tiny_ckpt, tmp_path, data_dir, capsys, monkeypatch):
    """quantize --gguf AUTO: the linears hold at most the target's bits; the exported file's tensor types are the
    tensor-types.txt lines; reusing the saved measurements gives the same mix; a target below reach is one line."""
    data = ("--data-dir", str(data_dir), "--calib-samples", "2", "--calib-seq-len", "32", "--dev-windows", "1",
            "--dev-seq-len", "32", "--json")
    out, sens = tmp_path / "q", tmp_path / "sens.json"
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "imatrix", "--gguf", "auto", "--target-bpw",
                 "5.2", "--save-gguf-sensitivity", str(sens), "-o", str(out), *data]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bits_per_weight"] <= 5.2 and row["predicted_kld"] > 0
    lines = (out / "tensor-types.txt").read_text().split()
    chosen = {line.split("=")[0].strip("^$").replace("\\", ""): line.split("=")[1].upper() for line in lines}
    assert len(set(chosen.values())) > 1  # between Q5_0 (5.5) and Q4_0 (4.5): a mix
    assert main(["export", "--model", str(out), "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    table = tensor_table(tmp_path / "m.gguf")  # (the gguf package cannot read a file that holds Q2_0)
    written = {t.name: t.type_name for t in table if t.name in chosen}
    assert written == chosen
    bits = sum(t.n_bytes * 8 for t in table if t.name in chosen) / \
        sum(t.shape[0] * t.shape[1] for t in table if t.name in chosen)
    assert bits == pytest.approx(row["bits_per_weight"], abs=5e-5)  # the row rounds to 4 decimals
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--gguf", "auto", "--target-bpw", "5.2",
                 "--gguf-sensitivity", str(sens), "-o", str(tmp_path / "q2"), *data]) == 0
    assert (tmp_path / "q2" / "tensor-types.txt").read_text().split() == lines
    capsys.readouterr()
    # a whole-file budget: the file the mix predicts is the file written, byte for byte, within the budget
    budget = (tmp_path / "m.gguf").stat().st_size - 3000
    monkeypatch.setattr("lowbit.gguf_mix.CLOSE", float("inf"))  # measure the leading candidates however far apart
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--gguf", "auto", "--target-size",
                 f"{budget / 1000}K", "--gguf-sensitivity", str(sens), "-o", str(tmp_path / "q5"), *data]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["export", "--model", str(tmp_path / "q5"), "--to", "gguf", "-o", str(tmp_path / "m5.gguf")]) == 0
    assert row["predicted_file_bytes"] == (tmp_path / "m5.gguf").stat().st_size <= budget
    # the best predicted mix for each of the leading embedding types was measured whole on dev; the lowest won
    assert len(row["candidates"]) >= 2 and row["dev_kld"] == min(c["dev_kld"] for c in row["candidates"])
    assert row["check_windows"] > 1  # on more dev windows than the sensitivities' one (--dev-windows 1)
    # under a file budget the embedding and the untied head take one type chosen with the linears', named in the lines
    held = {t.name: t.type_name for t in tensor_table(tmp_path / "m5.gguf")}
    named = dict(line.split("=") for line in (tmp_path / "q5" / "tensor-types.txt").read_text().split())
    named = {k.strip("^$").replace("\\", ""): v.upper() for k, v in named.items()}
    assert {k: held[k] for k in named} == named and named["token_embd.weight"] == named["output.weight"]
    capsys.readouterr()
    # --embed fixes the embedding's storage: the linears are chosen for what is left, still byte for byte (the
    # budget is the first one less what Q5_0 saves on the Q8_0 embedding and head, so the linears get as much)
    both = sum(t.shape[0] * t.shape[1] for t in table if t.name in ("token_embd.weight", "output.weight"))
    budget = budget - both * (34 - 22) // 32
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--gguf", "auto", "--target-size",
                 str(budget), "--embed", "q5_0", "--gguf-sensitivity", str(sens), "-o", str(tmp_path / "q7"),
                 *data]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["export", "--model", str(tmp_path / "q7"), "--to", "gguf", "-o", str(tmp_path / "m7.gguf")]) == 0
    held = {t.name: t.type_name for t in tensor_table(tmp_path / "m7.gguf")}
    assert held["token_embd.weight"] == held["output.weight"] == "Q5_0"
    assert row["predicted_file_bytes"] == (tmp_path / "m7.gguf").stat().st_size <= budget
    assert "token_embd" not in (tmp_path / "q7" / "tensor-types.txt").read_text()
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--gguf", "auto", "--target-size", "1M",
                 "--gguf-sensitivity", str(sens), "-o", str(tmp_path / "q6"), *data]) == 2
    assert "the file" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--gguf", "auto", "--target-bpw", "1",
                 "--gguf-sensitivity", str(sens), "-o", str(tmp_path / "q3"), *data]) == 2
    assert "reach" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--target-bpw", "3", "-o",
                 str(tmp_path / "q4"), *data]) == 2
    assert "add --gguf AUTO" in capsys.readouterr().err


def test_a_block_wise_auto_mix_chooses_among_integer_types(tiny_ckpt, tmp_path, data_dir, capsys):
    """Block-wise learns codes on an integer grid: its AUTO mix chooses among the integer types (said once) where
    imatrix's, from the same measurements and budget, takes table types; the file holds the mix's types."""
    data = ("--data-dir", str(data_dir), "--calib-samples", "4", "--calib-seq-len", "32", "--dev-windows", "1",
            "--dev-seq-len", "32")
    sens = tmp_path / "sens.json"
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "imatrix", "--gguf", "auto", "--target-bpw",
                 "4.5", "--save-gguf-sensitivity", str(sens), "-o", str(tmp_path / "i"), *data]) == 0
    lines = (tmp_path / "i" / "tensor-types.txt").read_text().split()
    assert any(line.endswith(("=iq4_nl", "=iq4_xs", "=q1_0")) for line in lines)  # else this test shows nothing
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_ckpt), "--method", "blockwise", "--gguf", "auto", "--target-bpw",
                 "4.5", "--gguf-sensitivity", str(sens), "--bw-steps", "2", "--e2e-steps", "0", "--n-grid", "2",
                 "-o", str(tmp_path / "b"), *data]) == 0
    assert "integer grids only" in capsys.readouterr().err
    chosen = dict(line.split("=") for line in (tmp_path / "b" / "tensor-types.txt").read_text().split())
    assert all(GGML_TYPES[t].values is None for t in chosen.values()), chosen
    assert main(["export", "--model", str(tmp_path / "b"), "--to", "gguf", "-o", str(tmp_path / "b.gguf")]) == 0
    held = {t.name: t.type_name for t in tensor_table(tmp_path / "b.gguf")}
    named = {k.strip("^$").replace("\\", ""): v.upper() for k, v in chosen.items()}
    assert {k: held[k] for k in named} == named


def test_an_auto_mix_of_a_moe_gives_each_stacked_expert_tensor_one_type(tmp_path):
    """Qwen3-MoE: every expert measured on its own, the experts of one projection (one tensor in llama.cpp's file)
    given one type; the file holds the mix and reads back with the model's logits."""
    from test_export_gguf import max_logit_diff, read_back
    from test_export_gguf import tiny_model as export_model

    from lowbit.export import export_gguf
    from lowbit.export.gguf import gguf_linear_names
    from lowbit.methods import ImatrixConfig, quantize_
    from lowbit.pack.checkpoint import pack_model_, save_packed

    model, tok = export_model("qwen3_moe")
    linears = quantizable_linears(model, family_for(model))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=g)
    dev = torch.randint(0, model.config.vocab_size, (2, 32), generator=g)
    types = ["q4_0", "q5_0", "q8_0"]
    sens = measure(model, calib, dev, types, progress=False)
    names = gguf_linear_names(model, list(linears))
    experts = [n for n in linears if ".experts." in n]
    assert experts and len({sens.kld[n]["q4_0"] for n in experts}) == len(experts)  # each expert its own value
    everything = sum(r * c for r, c in sens.shapes.values())  # the embedding is chosen too
    mix = choose(sens, types, everything * 5 // 8, groups=names)  # between Q4_0 (4.5) and Q5_0 (5.5): a mix
    assert len(set(mix.types.values())) > 1 and mix.embed in types
    stacked = {names[n]: {mix.types[m] for m in experts if names[m] == names[n]} for n in experts}
    assert all(len(kinds) == 1 for kinds in stacked.values())
    spec = mix.spec_map()
    quantize_(model, ImatrixConfig(spec), calib)
    src = save_packed(pack_model_(model, spec, method="imatrix", embed=mix.embed), model.config, tok, tmp_path / "m",
                      extra={"gguf_recipe": "AUTO"})
    export_gguf(src, tmp_path / "m.gguf")
    held = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert {names[n]: held[names[n]] for n in linears} == {names[n]: mix.types[n].upper() for n in linears}
    assert held["token_embd.weight"] == mix.embed.upper()
    diff, scale = max_logit_diff(model, read_back(tmp_path / "m.gguf", "qwen3_moe", model), tok)
    assert diff < 1e-4 * scale


def test_measurement_files_refuse_what_they_are_not(tmp_path):
    """The three measurement files (GGUF sensitivity, bit allocation, sensitivity table) read through one helper:
    unreadable, missing or another kind of file is one line naming what was expected."""
    from lowbit.allocation import Allocation
    from lowbit.sensitivity import load_table

    bad, other = tmp_path / "bad.json", tmp_path / "other.json"
    bad.write_text("{not json")
    other.write_text(json.dumps({"format": "something-else"}))
    for load, what in ((Sensitivity.load, "GGUF sensitivity file"), (Allocation.load, "allocation"),
                       (load_table, "sensitivity table")):
        for path in (bad, tmp_path / "missing.json"):
            with pytest.raises(LowbitError, match="cannot read"):
                load(path)
        with pytest.raises(LowbitError, match=f"is not a lowbit {what}"):
            load(other)
