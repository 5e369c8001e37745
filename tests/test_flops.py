"""A run's lower bound: its matrix products counted by shape, then timed on this machine."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import lowbit.flops as flops
from lowbit.flops import MatmulCount, lower_bound
from lowbit.methods import AWQConfig, BlockwiseConfig, GPTQConfig, quantize_
from lowbit.quantizer import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)
F32 = (torch.float32, "cpu")


def test_a_linear_and_attention_are_counted_by_shape_forward_and_backward():
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 5, 24, requires_grad=True)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    with MatmulCount() as count:
        y = lin(x)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        (y.sum() + a.sum()).backward()
        torch.mv(torch.randn(7, 9), torch.randn(9))
    assert count.shapes[(*F32, 1, 15, 24, 40)] == 1  # x W^T + b (addmm)
    assert count.shapes[(*F32, 1, 15, 40, 24)] == 1  # grad of x
    assert count.shapes[(*F32, 1, 40, 15, 24)] == 1  # grad of W
    assert count.shapes[(*F32, 1, 7, 9, 1)] == 1  # mv
    # attention: QK^T (6x8 by 8x6) and PV (6x6 by 6x8) over 2*4 heads, forward once and backward twice
    assert count.shapes[(*F32, 8, 6, 8, 6)] == 3 and count.shapes[(*F32, 8, 6, 6, 8)] == 3
    assert count.flops == 2 * (3 * 15 * 24 * 40 + 7 * 9 + 3 * 8 * 6 * 8 * 6 * 2)


@pytest.mark.parametrize("config", [GPTQConfig(SPEC, act_order=True), AWQConfig(SPEC, n_grid=4),
                                    BlockwiseConfig(SPEC, fast=True, steps=2, e2e_steps=1)],
                         ids=["gptq-r", "awq", "blockwise"])
def test_a_quantization_counts_what_torch_flop_counter_counts(config):
    """torch's own FlopCounterMode, as the reference, with attention written as matmuls (eager), and the
    matrix-vector products it does not count set aside."""
    model = tiny_llama()
    model.set_attn_implementation("eager")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as ref, _MatrixVector() as mv, MatmulCount() as count:
        quantize_(model, config, calib)
    assert count.flops - mv.flops == ref.get_total_flops() > 0


class _MatrixVector(TorchDispatchMode):
    """The FLOPs of matrix-vector products, which torch's counter leaves out."""

    flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mv.default:
            self.flops += 2 * args[0].numel()
        return func(*args, **(kwargs or {}))


def test_counting_changes_nothing_and_the_report_carries_the_count():
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    plain, counted = tiny_llama(), tiny_llama()
    config = AWQConfig(SPEC, n_grid=4)
    assert quantize_(plain, config, calib).matmuls is None
    report = quantize_(counted, config, calib, count_matmuls=True)
    assert sum(report.matmuls.values()) > 0
    for (name, a), b in zip(plain.state_dict().items(), counted.state_dict().values()):
        assert torch.equal(a, b), name


def test_lower_bound_times_the_heaviest_shapes_and_bounds_the_rest_by_the_best_rate(monkeypatch):
    # four shapes; the first two carry over 99% of the FLOPs
    big, mid, small, tiny = (*F32, 1, 512, 512, 512), (*F32, 1, 256, 256, 256), (*F32, 1, 8, 8, 8), (*F32, 1, 4, 4, 4)
    shapes = Counter({big: 10, mid: 4, small: 3, tiny: 1})
    rates = {big: 50e9, mid: 20e9, small: 1e9, tiny: 1e9}  # FLOP/s this "machine" gets per shape
    timed = []

    def fake_seconds(shape, **_kw):
        timed.append(shape)
        return flops.flops_of(shape) / rates[shape]

    monkeypatch.setattr(flops, "product_seconds", fake_seconds)
    bound = lower_bound(shapes)
    assert timed == [big, mid]  # 99% covered after two; the rest are not timed
    f = {s: flops.flops_of(s) * n for s, n in shapes.items()}
    want = f[big] / 50e9 + f[mid] / 20e9 + (f[small] + f[tiny]) / 50e9
    assert bound.seconds == pytest.approx(want, rel=1e-12)
    assert bound.flops == sum(f.values()) and (bound.shapes, bound.probed) == (4, 2)
    assert bound.gflops_by_dtype == {"float32": pytest.approx(50.0)}
    row = bound.row(3 * want)
    assert row["lower_bound_ratio"] == 3.0 and row["measured_gflops_float32"] == 50.0


def test_every_dtype_gets_its_own_measured_rate(monkeypatch):
    f32, bf16 = (*F32, 1, 512, 512, 512), (torch.bfloat16, "cpu", 1, 8, 8, 8)
    monkeypatch.setattr(flops, "product_seconds", lambda s, **_k: flops.flops_of(s) / (60e9 if s == f32 else 2e9))
    bound = lower_bound(Counter({f32: 100, bf16: 1}))
    assert bound.probed == 2 and bound.gflops_by_dtype == {"float32": pytest.approx(60.0),
                                                            "bfloat16": pytest.approx(2.0)}
    assert bound.seconds == pytest.approx(100 * flops.flops_of(f32) / 60e9 + flops.flops_of(bf16) / 2e9)


def test_products_on_the_meta_device_ran_nowhere_and_bound_nothing():
    bound = lower_bound(Counter({(torch.float32, "meta", 1, 512, 512, 512): 4}))
    assert (bound.seconds, bound.flops, bound.probed) == (0, 0, 0)


def test_product_seconds_measures_a_real_product():
    s = flops.product_seconds((*F32, 2, 64, 64, 64), min_seconds=0.0)
    assert 0 < s < 1


def test_cli_rows_report_seconds_beside_the_lower_bound(tmp_path, capsys):
    from lowbit.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    from conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["quantize", "--model", str(tmp_path / "m"), "--method", "gptq", "--act-order", "--w-bit", "4",
                 "--group-size", "32", "--calib-samples", "2", "--calib-seq-len", "32", "--json",
                 "-o", str(tmp_path / "q")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["matmul_gflop"] > 0 and row["lower_bound_seconds"] > 0 and row["measured_gflops_float32"] > 0
    # the row's seconds are rounded to 0.01 s, the bound to 4 digits and the ratio to 0.01
    assert row["lower_bound_ratio"] * row["lower_bound_seconds"] == pytest.approx(row["quant_seconds"], abs=0.006)
    assert main(["quantize", "--model", str(tmp_path / "m"), "--stream", "--method", "gptq", "--act-order",
                 "--w-bit", "4", "--group-size", "32", "--calib-samples", "2", "--calib-seq-len", "32", "--json",
                 "-o", str(tmp_path / "s")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "gptq-r" and row["matmul_gflop"] > 0 and row["lower_bound_ratio"] > 1
