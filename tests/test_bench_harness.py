"""bench/harness.py: one definition of the run arguments, and resuming by settings and commit."""
from __future__ import annotations

import argparse
import json

import pytest
from conftest import load_bench

harness = load_bench("harness.py", "bench_harness")


def _parser(**defaults):
    p = argparse.ArgumentParser()
    harness.add_run_args(p, "model", "group_size", "calib_samples", "max_windows", **defaults)
    return p


def test_defaults_overrides_and_refusals(capsys):
    a = _parser().parse_args([])
    assert (a.model, a.group_size, a.calib_samples, a.max_windows) == ("smollm2-135m", 64, 16, 16)
    b = _parser(model="gemma3-270m", group_size=128).parse_args(["--group-size", "0"])
    assert (b.model, b.group_size) == ("gemma3-270m", 0)  # 0: per output channel
    assert "(default gemma3-270m)" in _parser(model="gemma3-270m").format_help()
    for bad in (["--calib-samples", "0"], ["--max-windows", "x"], ["--group-size", "-64"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
    assert "must be at least 1" in capsys.readouterr().err


def test_measured_needs_every_setting_and_the_commit(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"method": "awq", "bits": 3, "seed": 0, "commit": "abc"}) + "\n")
    assert harness.measured(path, {"method": "awq", "bits": 3}, "abc")
    assert not harness.measured(path, {"method": "awq", "bits": 4}, "abc")
    assert not harness.measured(path, {"method": "awq", "bits": 3}, "def")  # another commit measures again
    assert not harness.measured(tmp_path / "none.jsonl", {"method": "awq"}, "abc")
