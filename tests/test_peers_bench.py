"""bench/peers.py and its worker without the peer venvs: the plan of rows, the row store, the table, one-line
errors, and the checks that a peer's weights really sit on a low-bit grid."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_bench
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


peers = load_bench("peers.py", "bench_peers")
worker = load_bench("_peers_worker.py", "bench_peers_worker")


@pytest.fixture(autouse=True)
def rows_in_tmp(tmp_path, monkeypatch):
    """Rows a test's run measures go to a temporary row file, never to bench/results."""
    monkeypatch.setattr(peers.result_rows, "RESULTS", tmp_path / "rows")


def test_a_measured_row_is_appended_to_the_row_file(tmp_path):
    row = {"tool": "gptqmodel", "method": "gptq", "bits": 3, "ppl": 53.2, "quant_seconds": 751.0, "key": "k",
           "date": "d", "load_average": [1, 1, 1], "versions": {"gptqmodel": "7.7.0"}}
    ctx = peers.result_rows.context("python bench/peers.py")
    path = peers.result_rows.append_row("peers", peers.result_row(row, ctx, args()))
    (stored,) = peers.result_rows.read_rows(path)
    assert path.parent == tmp_path / "rows"
    assert stored["seconds"] == 751.0 and stored["ppl"] == 53.2 and stored["versions"] == {"gptqmodel": "7.7.0"}
    assert stored["split"] == "wikitext-2 test" and "key" not in stored


def args(*argv: str):
    return peers.build_parser().parse_args(list(argv))


def test_plan_runs_float_then_each_width_peers_before_lowbit():
    jobs = peers.plan(args("--peers", "autoround", "hqq", "--bits", "3", "4", "--lowbit-methods", "awq+gptq-r",
                           "--autoround-iters", "50"))
    assert [j.label for j in jobs] == [
        "float reference (lowbit CLI)", "float reference (.venv-autoround)",
        "autoround W3", "hqq W3", "lowbit awq+gptq-r W3", "autoround W4", "hqq W4", "lowbit awq+gptq-r W4"]
    ar = jobs[2]
    assert ar.key["iters"] == 50 and ar.base["recipe"] == "default: iters 50, lr auto, batch 8, dtype auto"
    assert ar.env == "autoround" and ar.worker_method == "autoround"
    assert "calib_samples" not in jobs[3].key  # HQQ reads no calibration data: its rows survive a calib change
    lowbit = jobs[4].command
    assert lowbit[lowbit.index("--method") + 1] == "awq+gptq" and "--act-order" in lowbit and lowbit[-1] == "--json"


def test_float_rows_do_not_depend_on_calibration():
    a = peers.plan(args("--peers", "hqq", "--calib-samples", "16"))[0]
    b = peers.plan(args("--peers", "hqq", "--calib-samples", "32"))[0]
    assert a.label == b.label and peers.row_key(a.key) == peers.row_key(b.key)


def test_eval_data_reaches_lowbit_and_the_worker_and_the_key(tmp_path):
    text = str(tmp_path / "held_out.txt")
    plain, other = args("--peers", "autoround", "--bits", "3"), args("--peers", "autoround", "--bits", "3",
                                                                      "--eval-data", text)
    jobs, other_jobs = peers.plan(plain), peers.plan(other)
    assert {peers.row_key(j.key) for j in jobs}.isdisjoint(peers.row_key(j.key) for j in other_jobs)
    lowbit = peers.lowbit_cmd(other, "gptq", 3)
    assert lowbit[lowbit.index("--data") + 1] == text
    cmd = peers.worker_cmd(Path("python"), other, "autoround", 3)
    assert cmd[cmd.index("--eval-data") + 1] == text and cmd[cmd.index("--iters") + 1] == "200"


def test_any_lowbit_method_with_extra_args():
    a = args("--peers", "--lowbit-methods", "blockwise", "--lowbit-args", "--foo 1 --bar", "--bits", "2")
    job = peers.plan(a)[-1]
    assert job.label == "lowbit blockwise W2" and job.command[-4:] == ["--foo", "1", "--bar", "--json"]
    assert job.base["recipe"] == "foo 1 bar" and job.key["args"] == ["--foo", "1", "--bar"]
    assert "--act-order" not in job.command and "--fast" not in job.command
    fast = peers.plan(args("--peers", "--lowbit-methods", "blockwise-fast", "gptq-r", "--bits", "3", "--skip-fp"))
    assert [j.command[j.command.index("--method") + 1] for j in fast] == ["blockwise", "gptq"]
    assert [j.key["method"] for j in fast] == ["blockwise-fast", "gptq-r"]
    assert "--fast" in fast[0].command and "--act-order" in fast[1].command


def test_none_means_no_rows_and_unknown_methods_fail_at_the_command_line(capsys, tmp_path):
    from lowbit.methods import REGISTRY

    # read from the registry and the headline's recipes, not a copy
    assert set(peers.LOWBIT_METHODS) == set(REGISTRY.names()) | {"gptq-r", "awq+gptq-r", "blockwise-fast"}
    bare = [j.label for j in peers.plan(args("--peers", "--lowbit-methods", "blockwise", "--bits", "3", "--skip-fp"))]
    named = [j.label for j in peers.plan(args("--peers", "none", "--lowbit-methods", "blockwise", "--bits", "3",
                                              "--skip-fp"))]
    assert bare == named == ["lowbit blockwise W3"]
    only_peer = peers.plan(args("--peers", "hqq", "--lowbit-methods", "none", "--bits", "3", "--skip-fp"))
    assert [j.label for j in only_peer] == ["hqq W3"]
    with pytest.raises(peers.PeersError, match="none takes no other"):
        peers.plan(args("--peers", "none", "hqq"))
    assert peers.main(["--peers", "none", "--lowbit-methods", "none", "--skip-fp", "--out",
                       str(tmp_path / "rows.json")]) == 1
    assert "nothing to run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        args("--lowbit-methods", "blockwize")
    assert "invalid choice" in capsys.readouterr().err


def test_table_is_aligned_and_marks_failures():
    rows = [{"tool": "float", "method": "fp", "recipe": "in .venv", "ppl": 20.8216},
            {"tool": "autoround", "method": "autoround", "bits": 3, "group_size": 64,
             "recipe": "iters 50, lr 0.02", "ppl": 40.1234, "quant_seconds": 1234.56},
            {"tool": "lowbit", "method": "blockwise", "bits": 3, "group_size": 64, "ppl": None, "error": "x"}]
    lines = peers.table(rows).splitlines()
    assert lines[0].split() == ["tool", "method", "bits", "group", "recipe", "PPL", "quant", "s"]
    assert set(lines[1]) == {"-", " "}
    end = lines[0].index("PPL") + 3  # numbers are right-aligned under their header
    assert all(line[end - 1] not in " -" or "failed" in line for line in lines[2:]) and "failed" in lines[4]
    assert "40.123" in lines[3] and "1234.6" in lines[3] and "failed" in lines[4]


def test_a_failing_job_is_one_line_naming_its_log(tmp_path):
    log = tmp_path / "peers.log"
    cmd = [sys.executable, "-c", "import sys; print('trace', file=sys.stderr); sys.exit('boom: the reason')"]
    with pytest.raises(peers.PeersError) as e:
        peers.run_json(cmd, log, "hqq W3")
    assert "\n" not in str(e.value) and "boom: the reason" in str(e.value) and str(log) in str(e.value)
    assert "trace" in log.read_text()


def test_rows_are_kept_and_rerun_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake(cmd, log, label):
        calls.append(label)
        if "gptq" in label:
            raise peers.PeersError(f"{label} failed")
        return {"ppl": 30.0 + len(calls), "quant_seconds": 1.0, "method": "ignored", "recipe": "default"}

    monkeypatch.setattr(peers, "run_json", fake)
    monkeypatch.setattr(peers, "machine", lambda: {"cpu": "test", "cores": 2, "load_average": [0.0]})
    out = str(tmp_path / "peers.json")
    argv = ["--peers", "--lowbit-methods", "awq", "gptq", "--bits", "3", "--skip-fp", "--out", out]
    assert peers.main(argv) == 1  # the failing gptq row
    assert calls == ["lowbit awq W3", "lowbit gptq W3"]
    assert peers.main(argv) == 1  # awq kept, the failed gptq row tried again
    assert calls[2:] == ["lowbit gptq W3"]
    assert peers.main(argv + ["--rerun"]) == 1
    assert calls[3:] == ["lowbit awq W3", "lowbit gptq W3"]
    assert peers.main(["--peers", "--lowbit-methods", "awq", "--bits", "4", "--skip-fp", "--out", out]) == 0
    stored = peers.load_rows(Path(out))
    assert sorted((r["method"], r["bits"]) for r in stored.values()) == [("awq", 3), ("awq", 4), ("gptq", 3)]
    assert {r["recipe"] for r in stored.values() if not r.get("error")} == {"default"}
    assert peers.main(["--peers", "--lowbit-methods", "awq", "--bits", "4", "--skip-fp", "--out", out,
                       "--lowbit-args", "--n-grid 10"]) == 0  # other options: another row, labelled by them
    assert [r["recipe"] for r in peers.load_rows(Path(out)).values()].count("default, n-grid 10") == 1


def test_unsplittable_lowbit_args_are_one_line_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        args("--lowbit-args", "--foo 'x")
    assert e.value.code == 2 and "cannot split" in capsys.readouterr().err


def test_recipe_label_keeps_lowbit_options_and_a_peers_own_words():
    assert peers.recipe_label("e2e-lr 5e-3", "default", "lowbit") == "default, e2e-lr 5e-3"
    assert peers.recipe_label("", "default", "lowbit") == "default"
    reported = "iters 50, lr 0.02, batch 8"
    assert peers.recipe_label("iters 50, lr auto", reported, "autoround") == reported
    assert peers.recipe_label("in .venv", None, "float") == "in .venv"


def quantized_linear(rows: int = 4, cols: int = 128, bits: int = 3, group: int = 64) -> nn.Linear:
    """A linear whose weight is scale * (q - zp), with AutoRound's float16 scale and integer zp on it."""
    g = torch.Generator().manual_seed(0)
    scale = (torch.rand(rows, cols // group, generator=g) * 0.02 + 0.01).half()
    zp = torch.randint(0, 2**bits, (rows, cols // group), generator=g).float()
    q = torch.randint(0, 2**bits, (rows, cols // group, group), generator=g).float()
    m = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        m.weight.copy_((scale.float().unsqueeze(-1) * (q - zp.unsqueeze(-1))).reshape(rows, cols))
    m.scale, m.zp = scale, zp
    return m


def test_check_grid_counts_levels_in_every_group():
    m = quantized_linear()
    assert worker.check_grid({"a": m.weight}, 3, 64) <= 8
    w = m.weight.detach().clone()
    w[-1, -9:] += torch.arange(1, 10) * 1e-4  # stray values in the very last group are enough
    with pytest.raises(worker.NotQuantized, match="b: .* more than 2\\*\\*3"):
        worker.check_grid({"a": m.weight, "b": w}, 3, 64)
    with pytest.raises(worker.NotQuantized, match="the tool left float weights"):
        worker.check_grid({"float": torch.randn(4, 128)}, 3, 64)


def test_autoround_weights_read_from_scale_and_zero_point():
    model = nn.Sequential(quantized_linear())
    before = model[0].weight.detach().clone()
    out = worker.autoround_weights(model, ["0"], 3, 64)
    assert torch.equal(out["0"], before)
    model[0].weight.data.add_(torch.randn_like(before) * 0.01)  # float weights written back
    with pytest.raises(worker.NotQuantized, match="grid steps off"):
        worker.autoround_weights(model, ["0"], 3, 64)
    del model[0].scale
    with pytest.raises(worker.NotQuantized, match="no scale"):
        worker.autoround_weights(model, ["0"], 3, 64)


def test_coverage_must_match_lowbit_linears():
    worker.check_coverage({"a", "b"}, {"a", "b"}, "tool")
    with pytest.raises(worker.NotQuantized, match="1 missing"):
        worker.check_coverage({"a"}, {"a", "b"}, "tool")
    with pytest.raises(worker.NotQuantized, match="nothing was quantized"):
        worker.check_coverage(set(), {"a"}, "tool")


def test_second_text_reaches_both_and_keys_only_when_given(tmp_path):
    text = str(tmp_path / "jargon.txt")
    plain, second = args("--peers", "autoround", "--bits", "3"), args("--peers", "autoround", "--bits", "3",
                                                                       "--second-text", text)
    assert all("second_text" not in j.key for j in peers.plan(plain))  # older rows keep their keys
    assert all(j.key["second_text"] == text for j in peers.plan(second))
    lowbit = peers.lowbit_cmd(second, "blockwise", 3)
    assert lowbit[lowbit.index("--second-text") + 1] == text
    cmd = peers.worker_cmd(Path("python"), second, "autoround", 3)
    assert cmd[cmd.index("--second-text") + 1] == text
    assert "PPL 2nd text" in peers.table([{"tool": "x", "method": "y", "ppl": 1.0, "ppl_second": 2.0}])
    assert "PPL 2nd text" not in peers.table([{"tool": "x", "method": "y", "ppl": 1.0}])


def test_runs_side_by_side_keep_each_others_rows(tmp_path):
    out = tmp_path / "peers.json"
    peers.save_rows(out, {"a": {"key": "a", "ppl": 1.0}}, {"date": "1"})
    peers.save_rows(out, {"b": {"key": "b", "ppl": 2.0}}, {"date": "2"})  # another run: knew nothing of "a"
    peers.save_rows(out, {"a": {"key": "a", "ppl": 3.0}}, {"date": "3"})
    assert peers.load_rows(out) == {"a": {"key": "a", "ppl": 3.0}, "b": {"key": "b", "ppl": 2.0}}


def test_gptqmodel_rows_run_its_gptq_and_gptaq_in_their_own_venv():
    jobs = peers.plan(args("--peers", "gptqmodel", "--bits", "3", "4", "--lowbit-methods", "none"))
    assert [j.label for j in jobs] == ["float reference (.venv-gptqmodel)", "gptqmodel gptq W3", "gptqmodel gptaq W3",
                                       "gptqmodel gptq W4", "gptqmodel gptaq W4"]
    assert {j.env for j in jobs} == {"gptqmodel"}
    assert [j.worker_method for j in jobs] == ["fp"] + ["gptqmodel-gptq", "gptqmodel-gptaq"] * 2
    assert set(j.worker_method for j in jobs) <= set(worker.METHODS)
    assert {worker.TOOLS[j.worker_method] for j in jobs[1:]} == {"gptqmodel"}
    gptaq = jobs[2]
    assert gptaq.base == {"bits": 3, "group_size": 64, "tool": "gptqmodel", "method": "gptaq", "recipe": "defaults"}
    assert gptaq.key["calib_samples"] == 16 and gptaq.key["tool"] == "gptqmodel"
    assert peers.row_key(gptaq.key) != peers.row_key(jobs[1].key)
    cmd = peers.worker_cmd(Path("python"), args("--peers", "gptqmodel"), gptaq.worker_method, 3)
    assert cmd[cmd.index("--method") + 1] == "gptqmodel-gptaq" and cmd[cmd.index("--group-size") + 1] == "64"
    only = peers.plan(args("--peers", "gptqmodel", "--gptqmodel-methods", "gptaq", "--bits", "4", "--skip-fp",
                           "--lowbit-methods", "none"))
    assert [j.label for j in only] == ["gptqmodel gptaq W4"]


def test_gptqmodel_goes_in_without_its_torch_requirement(tmp_path, monkeypatch):
    env = peers.ENVS["gptqmodel"]
    assert env.default_dir == ".venv-gptqmodel" and env.no_deps == ("gptqmodel==7.7.0",)
    assert not any(r.startswith("torch") and r != "torchao" for r in env.requirements)
    assert "gptqmodel==7.7.0" in peers._requirements(env, "smollm2-135m")  # the probe checks its pin
    calls, missing = [], [["gptqmodel==7.7.0"], []]
    monkeypatch.setattr(peers, "missing_requirements", lambda python, env, model: missing.pop(0))
    monkeypatch.setattr(peers, "_pip", lambda python, *a, what, log: calls.append(a))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    peers.ensure_venv(venv, env, "smollm2-135m", tmp_path / "log")
    assert calls[0][0] == peers.TORCH_PIN and "gptqmodel==7.7.0" not in calls[0]
    assert calls[1] == ("--no-deps", "gptqmodel==7.7.0")


def test_autoround_recipes_and_its_own_dtype():
    def job(*extra):
        return peers.plan(args("--peers", "autoround", "--bits", "3", "--skip-fp", "--lowbit-methods", "none",
                               *extra))[0]

    default, best = job(), job("--autoround-recipe", "best")
    assert default.key["iters"] == 200 and default.key["batch_size"] == 8 and default.key["amp"] == "auto"
    assert "autoround_recipe" not in default.key
    assert best.key["iters"] == 1000 and best.key["autoround_recipe"] == "best"
    assert best.base["recipe"] == "best: iters 1000, lr auto, batch 8, dtype auto"
    assert job("--autoround-recipe", "best", "--autoround-iters", "300").key["iters"] == 300
    forced = job("--autoround-float32")  # what the worker always did before: those rows keep their keys
    assert "amp" not in forced.key and forced.base["recipe"].endswith("float32")
    a = args("--peers", "autoround", "--autoround-recipe", "best")
    cmd = peers.worker_cmd(Path("python"), a, "autoround", 3)
    assert cmd[cmd.index("--iters") + 1] == "1000" and cmd[cmd.index("--recipe") + 1] == "best"
    assert "--float32" not in cmd and "--lr" not in cmd
    cmd = peers.worker_cmd(Path("python"), args("--peers", "autoround", "--autoround-float32"), "autoround", 3)
    assert "--float32" in cmd and cmd[cmd.index("--iters") + 1] == "200"
    w = worker.parse_args(cmd[2:])
    assert w.float32 and w.recipe == "default" and w.iters == 200 and w.method == "autoround"
    assert not worker.parse_args(["--method", "autoround"]).float32


def test_autoround_weights_held_in_bfloat16_decode_to_float32_grid_values():
    model = nn.Sequential(quantized_linear(bits=4))
    exact = model[0].weight.detach().clone()
    model[0].weight.data = exact.bfloat16()  # a bf16 tuning run keeps the grid values rounded to bf16
    out = worker.autoround_weights(model, ["0"], 4, 64)
    assert out["0"].dtype == torch.float32 and torch.equal(out["0"], exact)
    model[0].weight.data = (exact + torch.randn_like(exact) * 0.01).bfloat16()
    with pytest.raises(worker.NotQuantized, match="grid steps off"):
        worker.autoround_weights(model, ["0"], 4, 64)


def test_gptqmodel_weights_are_its_own_dequantized_linears(monkeypatch):
    import types

    class BaseQuantLinear(nn.Module):  # stands in for gptqmodel's: what the reader touches
        def __init__(self, weight: torch.Tensor, bits: int, group: int):
            super().__init__()
            self.bits, self.w, self.pack_dtype, self.format = bits, weight, torch.int32, 1
            self.g_idx = (torch.arange(weight.shape[1]) // group).int()

        def qzero_format(self):
            return self.format

        def clear_weight_cache(self):
            pass

        def dequantize_weight(self):
            assert self.format == 2, "decoded with the v1 zero points: a grid step off"
            return self.w.t().half()  # GPTQ packing is [in, out]; its scales are float16

    def to_v2(module, bits, pack_dtype):
        module.format = 2

    qlinear = types.ModuleType("gptqmodel.nn_modules.qlinear")
    qlinear.BaseQuantLinear = BaseQuantLinear
    utils = types.ModuleType("gptqmodel.utils.model")
    utils.convert_gptq_v1_to_v2_format_module = to_v2
    monkeypatch.setitem(sys.modules, "gptqmodel.nn_modules.qlinear", qlinear)
    monkeypatch.setitem(sys.modules, "gptqmodel.utils.model", utils)
    grid = quantized_linear(bits=3).weight.detach()
    model, quant = nn.Sequential(nn.Linear(128, 4, bias=False)), nn.Sequential(BaseQuantLinear(grid, 3, 64))
    out = worker.gptqmodel_weights(quant, model, 3, 64)  # freshly packed (v1 zero points): converted first
    assert list(out) == ["0"] and torch.equal(model[0].weight, grid.half().float()) and quant[0].format == 2
    assert worker.check_grid(out, 3, 64) <= 8
    with pytest.raises(worker.NotQuantized, match="at 3 bits, not 4"):
        worker.gptqmodel_weights(quant, model, 4, 64)
    quant[0].g_idx = quant[0].g_idx.flip(0)  # groups scattered by a real act-order
    with pytest.raises(worker.NotQuantized, match="not contiguous"):
        worker.gptqmodel_weights(quant, model, 3, 64)


def test_worker_prints_nothing_but_its_result_on_stdout():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('w', sys.argv[1]); "
            "w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w); out = w._result_stream(); "
            "print('a progress bar'); print('{}', file=out, flush=True)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench" / "_peers_worker.py")],
                          capture_output=True, text=True, check=True)
    assert proc.stdout == "{}\n" and "a progress bar" in proc.stderr


def test_every_quantized_row_reports_kld_unless_asked_not_to():
    """Peers and lowbit alike are compared with the float model on the same windows; old PPL-only rows not reused."""
    on, off = args("--peers", "hqq", "--bits", "3"), args("--peers", "hqq", "--bits", "3", "--no-kld")
    for a, want in ((on, True), (off, False)):
        jobs = {j.label: j for j in peers.plan(a)}
        lowbit_awq = next(j for label, j in jobs.items() if label.startswith("lowbit awq"))
        assert ("--kld" in lowbit_awq.command) is want
        assert ("--no-kld" in peers.worker_cmd(Path("python"), a, "hqq", 3)) is not want
        assert all(("kld" in j.key) is want for j in jobs.values())
    float_row = next(j for j in peers.plan(on) if j.key.get("method") == "fp" and j.key.get("tool") == "float")
    assert "--kld" not in float_row.command  # the reference itself is evaluated for PPL only
    assert {"kld_mean", "top1_agreement", "ppl_ref"} <= set(peers.RESULT_FIELDS)


def test_ptq_table_runs_its_peer_rows_through_the_peers_worker(monkeypatch, tmp_path):
    """bench/ptq_table.py calls peers.py's public functions (it once called ones renamed away, and its catch-all
    turned the error into rows): its llm-compressor row's worker command is peers.py's own."""
    ptq = load_bench("ptq_table.py", "bench_ptq_table")
    seen = {}

    def fake_run_json(cmd, log, label):
        seen.update(cmd=cmd, label=label)
        return {"ppl": 1.0}

    monkeypatch.setattr(ptq.peers, "run_json", fake_run_json)
    run = ptq.Run("W3 g64, weights only", "llm-compressor GPTQ", "llmc-gptq", 3)
    args = ptq.argparse.Namespace(calib_samples=4, calib_seq_len=64, max_windows=2, model="m", seed=1)
    assert ptq.peer_row(Path("/venv/bin/python"), run, args, tmp_path / "log") == {"ppl": 1.0}
    cmd = seen["cmd"]
    assert cmd[:2] == ["/venv/bin/python", str(ROOT / "bench" / "_peers_worker.py")]
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--method"] == "gptq" and flags["--bits"] == "3" and flags["--group-size"] == "64"
    assert (flags["--calib-samples"], flags["--calib-seq-len"], flags["--max-windows"], flags["--seed"]) == \
        ("4", "64", "2", "1")
