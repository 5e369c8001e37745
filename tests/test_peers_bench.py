"""bench/peers.py and its worker without the peer venvs: the plan of rows, the row store, the table, one-line
errors, and the checks that a peer's weights really sit on a low-bit grid."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def load(file: str, name: str):
    """A bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


peers = load("peers.py", "bench_peers")
worker = load("_peers_worker.py", "bench_peers_worker")


def args(*argv: str):
    return peers.build_parser().parse_args(list(argv))


def test_plan_runs_float_then_each_width_peers_before_lowbit():
    jobs = peers.plan(args("--peers", "autoround", "hqq", "--bits", "3", "4", "--lowbit-methods", "awq+gptq",
                           "--autoround-iters", "50"))
    assert [j.label for j in jobs] == [
        "float reference (lowbit CLI)", "float reference (.venv-autoround)",
        "autoround W3", "hqq W3", "lowbit awq+gptq W3", "autoround W4", "hqq W4", "lowbit awq+gptq W4"]
    ar = jobs[2]
    assert ar.key["iters"] == 50 and ar.base["recipe"] == "iters 50, lr auto" and ar.env == "autoround"
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
    assert "--act-order" not in job.command


def test_none_means_no_rows_and_unknown_methods_fail_at_the_command_line(capsys, tmp_path):
    from lowbit.experiment import METHOD_NAMES

    assert peers.LOWBIT_METHODS == METHOD_NAMES
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
