"""Outlier statistics and `lowbit inspect`: numbers checked against a direct computation, figures, refusals."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama, with_outliers

from lowbit import LowbitError
from lowbit.cli import main
from lowbit.eval.outliers import MASSIVE_FACTOR, activation_stats, kurtosis
from lowbit.methods import RotationConfig, quantize_

CHANNELS = (3, 17, 41)
SAMPLES = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))


def test_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    assert kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert kurtosis(torch.rand(200_000, generator=g)) == pytest.approx(1.8, abs=0.02)  # uniform: 9/5
    x = torch.randn(200_000, generator=g)
    x[::1000] *= 30  # rare large values: heavy tails
    assert kurtosis(x) > 50


def _direct_inputs(model, name: str) -> torch.Tensor:
    """The input of module ``name`` on SAMPLES, captured by a plain hook on a full forward."""
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()))
    try:
        model(SAMPLES)
    finally:
        h.remove()
    return torch.cat(got)


def test_statistics_match_a_direct_computation():
    model = with_outliers(tiny_llama(), CHANNELS)
    stats = activation_stats(model, SAMPLES, [1], batch_size=2)
    assert [s.name for s in stats] == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    assert all(s.layer == 1 and s.tokens == SAMPLES.numel() for s in stats)
    for s, module in zip(stats, ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]):
        x = _direct_inputs(model, f"model.layers.1.{module}")
        a = x.abs().reshape(-1, x.shape[-1])
        assert torch.allclose(s.channel_max, a.amax(0), rtol=1e-5)
        assert s.kurtosis == pytest.approx(kurtosis(x), rel=1e-4)
        assert s.massive == int((a > MASSIVE_FACTOR * a.median()).sum())
        assert s.max_median == pytest.approx(float(a.amax(0).max() / a.amax(0).median()), rel=1e-5)
    attn, mlp = stats[0], stats[2]
    assert {c for c, _ in attn.top_channels(3)} == set(CHANNELS)
    assert {c for c, _ in mlp.top_channels(3)} == set(CHANNELS)
    assert attn.massive > 0 and attn.max_median > 20


def test_rotation_flattens_outlier_channels():
    model = with_outliers(tiny_llama(), CHANNELS)
    before = activation_stats(model, SAMPLES, [0, 1])
    quantize_(model, RotationConfig())
    after = activation_stats(model, SAMPLES, [0, 1])
    for b, a in zip(before, after):
        assert b.name == a.name
        if b.name in ("q_proj+k_proj+v_proj", "gate_proj+up_proj"):  # fed by a norm: the injected outliers
            assert a.kurtosis < b.kurtosis / 5, (b.name, b.kurtosis, a.kurtosis)
            assert a.max_median < b.max_median / 5, (b.name, b.max_median, a.max_median)
            assert a.massive < b.massive


def test_bad_layer_names_the_valid_range():
    with pytest.raises(LowbitError, match="layer 2 does not exist: the model has 2 decoder layers, numbered 0 to 1"):
        activation_stats(tiny_llama(), SAMPLES, [2])


# ---- the command ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with outlier channels and a byte tokenizer, saved as a checkpoint, and calibration text."""
    d = tmp_path_factory.mktemp("tiny")
    with_outliers(tiny_llama(), CHANNELS).save_pretrained(d / "model")
    byte_tokenizer().save_pretrained(d / "model")
    (d / "calib.txt").write_text("Calibration text with a few different words in it, repeated. " * 40)
    return d


def _inspect(capsys, tiny_dir, out, *extra) -> tuple[int, str, str]:
    """`lowbit inspect` in this process (the subprocess path is covered by test_cli): (exit code, stdout, stderr)."""
    code = main(["inspect", "--model", str(tiny_dir / "model"), "--calib-data", str(tiny_dir / "calib.txt"),
                 "--calib-samples", "2", "--calib-seq-len", "48", "--out-dir", str(out), *extra])
    got = capsys.readouterr()
    return code, got.out, got.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_inspect_prints_table_writes_figures_and_keeps_them_without_force(capsys, tiny_dir, tmp_path):
    out = tmp_path / "figs"
    code, stdout, err = _inspect(capsys, tiny_dir, out, "--layer", "1", "--transform", "rotate")
    assert code == 0, err
    assert "kurtosis" in stdout and "max/median" in stdout and "top channels" in stdout
    table = [ln.split() for ln in stdout.splitlines() if ln.startswith(("float ", "rotate "))]
    assert [r[:2] for r in table] == [[st, name] for st in ("float", "rotate") for name in
                                      ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj")]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"layer1_{s}_{k}.png" for s in ("float", "rotate") for k in ("surface", "heatmap"))
    assert all((out / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    before = (out / "layer1_float_surface.png").read_bytes()
    inode = (out / "layer1_float_surface.png").stat().st_ino
    code, _, err = _inspect(capsys, tiny_dir, out, "--layer", "1")
    assert code == 2 and "layer1_float_" in err and "exists; pass --force" in _one_error_line(err)
    assert (out / "layer1_float_surface.png").read_bytes() == before

    code, stdout, err = _inspect(capsys, tiny_dir, out, "--layer", "1", "--force", "--json")
    assert code == 0, err
    rows = json.loads(stdout.strip().splitlines()[-1])
    assert [(r["stage"], r["layer"]) for r in rows] == [("float", 1)] * 4
    assert {c for c, _ in rows[0]["top_channels"][:3]} == set(CHANNELS)
    assert rows[0]["max_median"] > 20 and rows[0]["kurtosis"] > 10
    assert (out / "layer1_float_surface.png").stat().st_ino != inode  # --force replaced it
    assert not list(out.glob(".*.tmp"))


def test_inspect_bad_layer_is_one_clear_line(capsys, tiny_dir, tmp_path):
    code, _, err = _inspect(capsys, tiny_dir, tmp_path / "x", "--layer", "7")
    assert code == 2
    assert "layer 7 does not exist: the model has 2 decoder layers, numbered 0 to 1" in _one_error_line(err)
