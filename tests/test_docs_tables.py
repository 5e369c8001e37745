"""The tables in README.md and docs/ marked <!-- table:NAME --> equal what bench/report.py makes of the row files,
and a drifted number is caught and named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parent.parent


report = load_bench("report.py", "bench_report")
rows = load_bench("rows.py", "bench_rows")


def test_docs_tables_equal_their_rows():
    problems = report.check(ROOT)
    assert not problems, "run `python bench/report.py`:\n" + "\n".join(problems)


def _row(**extra) -> dict:
    return {"command": "python bench/x.py", "commit": "abc1234", "date": "2026-12-03T10:00:00+00:00",
            "machine": {"cpu": "test", "cores": 2}, "load_avg": 0.5, "split": "wikitext-2 test", "kld_mean": None,
            "bits_per_weight": 3.297, "file_bytes": None, "seconds": 12.0, **extra}


TINY = {"tiny": report.Table(
    (report.Col("method", "method", right=False), report.Col("PPL", "ppl", "{:.3f}"),
     report.Col("KLD", "kld_mean", "{:.4f}")),
    (report.Heading("W3"), report.Pick("fake", {"method": "awq", "bits": 3}), report.Every("fake", {"bits": 4})))}


@pytest.fixture
def fake(tmp_path):
    for r in (_row(method="awq", bits=3, ppl=40.0), _row(method="awq", bits=3, ppl=40.3229),  # re-measured: last wins
              _row(method="rtn", bits=4, ppl=27.19), _row(method="awq", bits=4, ppl=23.5526)):
        rows.append_row(tmp_path / "fake.jsonl", r)
    return tmp_path


def test_drifted_number_is_named(fake):
    doc = ("intro\n<!-- table:tiny -->\n| method | PPL | KLD |\n| --- | ---: | ---: |\n| **W3** |  |  |\n"
           "| awq | 40.323 | – |\n| rtn | 27.190 | – |\n| awq | 23.552 | – |\n<!-- /table -->\nafter\n")
    fixed, problems = report.process(doc, fake, "fake.md", TINY)
    assert problems == ["fake.md: table tiny, row 'awq', column 'PPL': the doc says '23.552', the rows give '23.553'"]
    assert "| awq | 23.553 | – |" in fixed and fixed.startswith("intro\n") and fixed.endswith("after\n")
    assert report.process(fixed, fake, "fake.md", TINY)[1] == []


def test_missing_rows_and_unknown_markers_are_reported(fake):
    doc = "<!-- table:tiny -->\n| method | PPL | KLD |\n<!-- /table -->\n<!-- table:nope -->\n<!-- /table -->\n"
    _, problems = report.process(doc, fake, "d.md", TINY)
    assert problems[0] == "d.md: table tiny has 1 lines, its rows give 6"
    assert "names no table" in problems[-1]
    empty = {"t": report.Table((report.Col("PPL", "ppl"),), (report.Pick("fake", {"method": "gptq"}),))}
    with pytest.raises(ValueError, match="no row in fake.jsonl"):
        report.process("<!-- table:t -->\n<!-- /table -->\n", fake, "d.md", empty)


def test_check_command_exits_1_on_drift(fake, tmp_path, monkeypatch, capsys):
    (tmp_path / "README.md").write_text("<!-- table:tiny -->\n| method | PPL | KLD |\n<!-- /table -->\n")
    monkeypatch.setattr(report, "TABLES", TINY)
    monkeypatch.setattr(report, "check", lambda write=False, _c=report.check: _c(tmp_path, fake, write))
    assert report.main(["--check"]) == 1
    assert "table tiny" in capsys.readouterr().out
    assert report.main([]) == 0 and report.main(["--check"]) == 0


def test_append_row_states_its_run(tmp_path):
    ctx = rows.context("python bench/x.py --bits 3")
    assert set(ctx) == {"command", "commit", "date", "machine", "load_avg"}
    assert {"cpu", "avx512", "avx512_bf16", "cores", "torch", "threads"} <= set(ctx["machine"])
    path = rows.append_row(tmp_path / "r.jsonl", {**ctx, "split": "wikitext-2 test", "ppl": 1.5, "kld_mean": None,
                                                  "bits_per_weight": 4.3125, "file_bytes": 10, "seconds": 1.0,
                                                  "method": "rtn"})
    rows.append_row(path, _row(ppl=2.0))
    got = rows.read_rows(path)
    assert [r["ppl"] for r in got] == [1.5, 2.0] and got[0]["method"] == "rtn"
    assert json.loads(path.read_text().splitlines()[0])["command"] == "python bench/x.py --bits 3"
    with pytest.raises(ValueError, match="row lacks ppl"):
        rows.append_row(path, {k: v for k, v in _row().items()})
    assert rows.results_path("ptq_table") == ROOT / "bench" / "results" / "ptq_table.jsonl"


def test_machine_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f avx512_bf16\n")
    m = rows.machine(info)
    assert (m["cpu"], m["avx512"], m["avx512_bf16"]) == ("AMD EPYC 9R14", True, True)
