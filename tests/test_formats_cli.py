"""``lowbit format`` and ``--format``: the lecture's examples from the command line, and clean errors."""
from __future__ import annotations

import json

import pytest
from test_cli import assert_clean_error, run

from lowbit.cli import main


def call(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_fp32_fields_of_minus_13_24(capsys):
    code, out, _ = call(capsys, "format", "--format", "fp32", "--value", "-13.24")
    assert code == 0
    assert "sign      1" in out
    assert "10000010  field 130, bias 127, unbiased 3" in out
    assert "10100111101011100001010  = 0.6549999714" in out
    assert "stored    -13.239999771118164" in out
    code, out, _ = call(capsys, "format", "--format", "fp32", "--value", "-13.24", "--json")
    r = json.loads(out)
    assert (r["sign"], r["exponent_field"], r["exponent"]) == (1, 130, 3) and abs(r["error"]) < 1e-6


def test_int_lecture_examples(capsys):
    _, out, _ = call(capsys, "format", "--values", "1.1,2.4,-0.3,0.8", "--format", "int", "--bits", "3",
                     "--clip", "2", "--json")
    r = json.loads(out)
    s = 0.66650390625  # 2/3 as float16, as integer grids store their scales
    assert r["scale"] == [s] and r["zero_point"] == [0] and r["integers"] == [2, 3, 0, 1]
    assert r["dequantized"] == [2 * s, 3 * s, 0, s] == pytest.approx([4 / 3, 2, 0, 2 / 3], rel=2**-11)
    code, out, _ = call(capsys, "format", "--values=1.1,2.4,-0.3,0.8", "--format", "int", "--bits", "3",
                        "--clip=-0.5,2")
    assert code == 0
    assert "scale 0.357143; zero point -0.5 (x̂ = s·q + min)" in out
    rows = [ln.split() for ln in out.splitlines()[3:]]
    assert [int(r[1]) for r in rows] == [4, 7, 1, 4]
    assert [round(float(r[2]), 2) for r in rows] == [0.93, 2.0, -0.14, 0.93]


def test_other_formats_print_codes(capsys):
    _, out, _ = call(capsys, "format", "--values", "1.1,2.4,-0.3,0.8", "--format", "nf4", "--json")
    r = json.loads(out)
    assert r["scale"] == pytest.approx([2.4]) and r["codes"][1] == 15 and r["code_bits"][1] == "1111"
    _, out, _ = call(capsys, "format", "--format", "fp4_e2m1", "--value", "0.3", "--json")
    r = json.loads(out)
    assert (r["kind"], r["stored"], r["bits"]) == ("subnormal", 0.5, "0001")
    _, out, _ = call(capsys, "format", "--format", "fp8_e4m3", "--value", "1000")
    assert "stored    448.0" in out


@pytest.mark.parametrize("args,message", [
    (["--value", "1", "--values", "1,2"], "exactly one of --value"),
    (["--format", "fp4_e2m1", "--value", "nan"], "fp4_e2m1 has no NaN"),
    (["--format", "e4m3_b200", "--value", "1"], "bias 200 leaves"),
    (["--format", "e1m0", "--value", "1"], "needs at least 3"),
    (["--format", "nf4", "--bits", "3", "--value", "1"], "has 4 bits"),
    (["--format", "mxfp4", "--value", "1"], "use --values"),
    (["--format", "mxfp4", "--values", "1,2,3"], "multiple of 32"),
    (["--format", "int", "--bits", "3", "--values", "1,2", "--clip=2,1"], "empty"),
])
def test_format_errors_are_one_line(capsys, args, message):
    code, _, err = call(capsys, "format", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,fragments", [
    (["eval", "--method", "rtn", "--format", "nf4", "--w-bit", "3"], ["format nf4 has 4 bits, but bits=3"]),
    (["eval", "--method", "rtn", "--format", "mxfp4", "--group-size", "64"], ["blocks of 32"]),
    (["eval", "--method", "awq", "--format", "posit8"], ["unknown number format 'posit8'"]),
])
def test_bad_format_options_fail_before_loading_a_model(args, fragments):
    assert_clean_error(run(*args), *fragments)


def test_spec_from_the_command_line():
    from lowbit.cli import build_parser
    from lowbit.cli.common import spec_from_args

    spec = spec_from_args(build_parser().parse_args(["eval", "--format", "mxfp4"]))
    assert (spec.format, spec.bits, spec.group_size) == ("mxfp4", 4, 32)
    spec = spec_from_args(build_parser().parse_args(["eval", "--format", "fp8_e4m3", "--group-size", "0"]))
    assert (spec.bits, spec.granularity) == (8, "channel")
    spec = spec_from_args(build_parser().parse_args(["eval", "--format", "kmeans", "--w-bit", "3",
                                                     "--rounding", "stochastic"]))
    assert (spec.bits, spec.group_size, spec.rounding) == (3, 64, "stochastic")
    spec = spec_from_args(build_parser().parse_args(["eval", "--w-bit", "3", "--sym"]))
    assert spec == type(spec)(bits=3, symmetric=True)  # int specs as before
    spec = spec_from_args(build_parser().parse_args(["quantize", "--w-bit", "4", "--group-size", "32", "--full-range"]))
    assert spec == type(spec)(bits=4, group_size=32, symmetric=True, full_range=True)  # implies --sym


def test_full_range_values_put_the_extreme_on_minus_8(capsys):
    _, out, _ = call(capsys, "format", "--values=0.5,-1.6,0.1,1.2", "--format", "int", "--bits", "4", "--full-range",
                     "--json")
    r = json.loads(out)
    # s = 0.2 in float16, a little below 0.2: 0.5 and 0.1, ties at 0.2, now lie just above them (2.5006, 0.5001)
    assert r["full_range"] and r["scale"] == [0.199951171875] and r["integers"] == [3, -8, 1, 6]
    _, out, _ = call(capsys, "format", "--values=0.5,-1.6,0.1,1.2", "--format", "int", "--bits", "4", "--sym", "--json")
    assert json.loads(out)["integers"] == [2, -7, 0, 5]  # the restricted grid: s = 1.6 / 7


@pytest.mark.model
def test_eval_rtn_nf4_on_the_default_model(data_dir):
    proc = run("eval", "--method", "rtn", "--format", "nf4", "--max-windows", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["format"] == "nf4" and row["bits_per_weight"] == 4.25 and 10 < row["ppl"] < 60
