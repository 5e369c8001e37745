"""Hadamard matrices and the QuaRot-style rotation: exact algebra, same function, fewer outliers, exact restore."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama, with_outliers
from test_cli import assert_clean_error, run

from lowbit import LowbitError, QuantSpec
from lowbit.experiment import MethodOptions, Session, make_config
from lowbit.hadamard import apply_hadamard, hadamard, is_paley_order, random_hadamard, split_order
from lowbit.methods import Pipeline, RotationConfig, RTNConfig, quantize_
from lowbit.methods.base import input_transform

SUPPORTED = [n for n in range(1, 257) if split_order(n)] + [576, 1536]


def test_supported_sizes_include_smollm2_widths_and_skip_others():
    assert {64, 576, 1536, 12, 20, 72}.issubset(SUPPORTED)
    assert split_order(576) == (8, 72) and split_order(1536) == (128, 12)
    assert not any(split_order(n) for n in (36, 52, 9, 577))
    # Paley orders are exactly q + 1 for a prime q = 3 mod 4
    assert [m for m in range(2, 90) if is_paley_order(m)] == [4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84]


@pytest.mark.parametrize("n", SUPPORTED)
def test_hadamard_is_orthogonal_with_unit_entries(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n))
    assert torch.equal(h @ h.T, n * torch.eye(n))


def test_unsupported_size_names_the_rule_and_neighbours():
    rule = r"size 36.*2\^k · m.*prime q ≡ 3 mod 4.*nearest supported sizes: .*32, 40"
    with pytest.raises(LowbitError, match=rule):
        hadamard(36)


@pytest.mark.parametrize("n", [12, 24, 64, 72, 576, 1536])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = random_hadamard(n, seed=3).double()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert torch.equal(random_hadamard(n, seed=3), random_hadamard(n, seed=3))
    assert not torch.equal(random_hadamard(n, seed=3), random_hadamard(n, seed=4))


@pytest.mark.parametrize("n", [1, 8, 12, 20, 48, 64, 160, 576, 1536])
def test_fast_transform_equals_dense_product(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    dense = x @ hadamard(n).double() / math.sqrt(n)
    assert torch.allclose(apply_hadamard(x, n), dense, atol=1e-10)
    x32 = x.float()
    assert apply_hadamard(x32).dtype == torch.float32
    assert torch.allclose(apply_hadamard(x32), dense.float(), atol=1e-4)


def _tied_model(seed: int = 0, **kw):
    """A tiny Llama with a head tied to its embedding (as SmolLM2) and norms that are not all ones."""
    m = tiny_llama(seed, **kw)
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)
    return m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_preserves_logits(tied):
    model = _tied_model() if tied else tiny_llama()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    report = quantize_(model, RotationConfig(seed=1))
    assert _rel(model(ids).logits, ref) < 1e-5
    assert report.info["untied_head"] is tied
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(64)) for layer in model.model.layers)
    assert input_transform(model.model.layers[0].mlp.down_proj) == "online Hadamard 128"
    # the weights did change: the same function in another basis
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)


def test_each_part_of_the_rotation_alone_preserves_logits():
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    for cfg in (RotationConfig(online=False, heads=False), RotationConfig(online=True, heads=False),
                RotationConfig(online=False, heads=True)):
        model = _tied_model()
        ref = model(ids).logits
        quantize_(model, cfg)
        assert _rel(model(ids).logits, ref) < 1e-5, cfg


def test_unsupported_width_is_refused_before_anything_changes():
    model = tiny_llama(hidden=36, heads=2, kv_heads=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LowbitError, match=r"residual stream \(width 36\).*nearest supported sizes: .*32, 40"):
        quantize_(model, RotationConfig())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _activation_quant_error(model, ids, bits: int = 4) -> float:
    """Output error of per-token symmetric fake quantization of every linear's input (A4-like)."""
    ref = model(ids).logits
    qmax = 2 ** (bits - 1) - 1

    def fq(_m, args):
        x = args[0]
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
        return ((x / s).round().clamp(-qmax - 1, qmax) * s,)

    hooks = [m.register_forward_pre_hook(fq) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    try:
        return _rel(model(ids).logits, ref)
    finally:
        for h in hooks:
            h.remove()


def _outlier_pair():
    plain, rotated = with_outliers(tiny_llama()), with_outliers(tiny_llama())
    quantize_(rotated, RotationConfig())
    return plain, rotated


IDS = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))


def test_rotation_lowers_activation_quantization_error_with_outliers():
    plain, rotated = _outlier_pair()
    e_plain, e_rot = _activation_quant_error(plain, IDS, bits=8), _activation_quant_error(rotated, IDS, bits=8)
    assert e_rot < 0.5 * e_plain, (e_rot, e_plain)


def test_rotation_lowers_rtn_weight_quantization_error_with_outliers():
    spec = QuantSpec(bits=4, group_size=16)
    errors = []
    for model in _outlier_pair():
        ref = model(IDS).logits
        quantize_(model, RTNConfig(spec))
        errors.append(_rel(model(IDS).logits, ref))
    assert errors[1] < 0.5 * errors[0], errors


# ---- composition and restore ------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def test_rotate_option_puts_rotation_first():
    cfg = make_config("rtn", QuantSpec(bits=4, group_size=16), MethodOptions(rotate=True, seed=5))
    assert isinstance(cfg, Pipeline) and cfg.steps[0] == RotationConfig(seed=5)
    assert make_config("fp", None, MethodOptions(rotate=True)) == RotationConfig(seed=0)
    assert make_config("fp", None, MethodOptions()) is None


@pytest.fixture
def session(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Some other words for calibration, not the evaluation text. " * 100)
    from lowbit.experiment import CalibOptions

    return Session(_tied_model(), byte_tokenizer(), text=TEXT, seq_len=64, max_windows=2,
                   calib=CalibOptions(samples=4, seq_len=64, data=str(calib)))


def test_session_restore_gives_the_exact_float_model_back(session):
    model = session.model
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp = session.run("fp", None, progress=False)
    rotated = session.run("fp", None, MethodOptions(rotate=True), progress=False)
    assert rotated.method == "rotate"
    assert rotated.ppl == pytest.approx(fp.ppl, rel=1e-4)
    session.run("rtn", QuantSpec(bits=4, group_size=16), MethodOptions(rotate=True), progress=False, evaluate=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    session.restore()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True
    assert input_transform(model.model.layers[0].mlp.down_proj) is None
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks
    assert all(torch.equal(float_state[k], v) for k, v in model.state_dict().items())
    assert session.run("fp", None, progress=False).ppl == fp.ppl


def test_rotation_composes_with_awq_without_folding_across_the_online_rotation(session):
    fp = session.run("fp", None, progress=False)
    res = session.run("awq", QuantSpec(bits=8, group_size=16), MethodOptions(rotate=True, n_grid=3), progress=False)
    assert res.method == "rotate+awq"
    skipped = [f for f in res.info["fallbacks"] if "run time" in f]
    assert sorted(f.split(":")[0] for f in skipped) == ["0.mlp.up_proj", "1.mlp.up_proj"]
    assert res.ppl == pytest.approx(fp.ppl, rel=0.01)  # 8 bits: a wrong fold would show far above this
    rtn = session.run("rtn", QuantSpec(bits=8, group_size=16), MethodOptions(rotate=True), progress=False)
    assert rtn.ppl == pytest.approx(fp.ppl, rel=0.01)


def test_quantize_refuses_rotate_with_packed_output(tmp_path):
    assert_clean_error(run("quantize", "--method", "rtn", "--rotate", "-o", str(tmp_path / "m")),
                       "--rotate cannot be saved with -o")
