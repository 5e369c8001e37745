"""Quantization-aware training: the estimators, the learned grid and clip, and training on a tiny Llama."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import quantize_
from lowbit.errors import LowbitError
from lowbit.methods import AWQConfig, QATConfig
from lowbit.methods.base import detach_runtime
from lowbit.methods.qat import PACT, schedule
from lowbit.methods.qat import QATConfig as _QC
from lowbit.methods.training import FitLog, LearnedGrid, fit, soft_round, ste_round
from lowbit.pack.checkpoint import pack_model_
from lowbit.quantizer import QuantSpec, dequantize, fake_quantize
from tests.conftest import tiny_llama

SPEC = QuantSpec(bits=3, group_size=16)
FULL = QuantSpec(bits=3, group_size=16, symmetric=True, full_range=True)  # negative steps where the extreme is > 0


def test_ste_round_passes_gradient_through():
    u = torch.tensor([0.2, 1.7, -2.5, 3.49], requires_grad=True)
    y = ste_round(u)
    assert torch.equal(y.detach(), torch.round(u.detach()))
    y.sum().backward()
    assert torch.equal(u.grad, torch.ones(4))


def test_soft_round_anneals_to_round():
    u = torch.linspace(-3, 3, 1001)
    u = u[(u - u.round()).abs() < 0.45]  # away from the ties
    assert (soft_round(u, 1e-3) - u).abs().max() < 1e-3  # ~identity at T -> 0
    assert (soft_round(u, 200.0) - torch.round(u)).abs().max() < 1e-6
    errs = [float((soft_round(u, t) - torch.round(u)).abs().mean()) for t in (1, 4, 16, 64)]
    assert errs == sorted(errs, reverse=True)
    x = u.clone().requires_grad_(True)
    soft_round(x, 4.0).sum().backward()
    assert (x.grad > 0).all()  # a true gradient, no estimator


@pytest.mark.parametrize("spec", [SPEC, FULL], ids=lambda s: s.describe())
def test_learned_grid_starts_at_rtn_and_clips_gradient(spec):
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    q = LearnedGrid(w, spec, "ste", lsq=True)
    q.hard = True
    assert torch.equal(q(w), fake_quantize(w, spec))
    assert torch.equal(dequantize(q.qtensor(w)), q(w))
    q.hard = False
    # the weight gradient is zero exactly where the value lies beyond the grid's range
    w2 = w.clone()
    w2[0, 0] = 100.0
    w2[1, 5] = -100.0
    x = w2.clone().requires_grad_(True)
    q(x).sum().backward()
    assert x.grad[0, 0] == 0 and x.grad[1, 5] == 0
    assert (x.grad.flatten()[2:] != 0).sum() > 200


def test_lsq_step_gradient_matches_formula():
    """d ŵ / d s = round(u) - u inside the range, the clip level (q - z) outside; times LSQ's scale."""
    torch.manual_seed(1)
    spec = QuantSpec(bits=4, group_size=16, symmetric=True)
    w = torch.randn(2, 16)
    q = LearnedGrid(w, spec, "ste", lsq=True)
    with torch.no_grad():
        q.scale.mul_(0.7)  # shrink so some weights clip
    q(w).sum().backward()
    s = q.scale.detach().unsqueeze(-1)
    u = w.view(2, 1, 16) / s
    inside = (u >= spec.qmin) & (u <= spec.qmax)
    per = torch.where(inside, torch.round(u) - u, torch.clamp(u, spec.qmin, spec.qmax))
    expected = per.sum(-1) * q.grad_factor
    assert not inside.all()
    assert torch.allclose(q.scale.grad, expected, atol=1e-5)


def test_pact_alpha_gets_the_clipped_gradient():
    p = PACT(4, alpha=1.0)
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 2.0])
    p(x).sum().backward()
    # clipped values contribute +1 (above) and -1 (below) through the clamp; the rest only through the step
    a = p.alpha.detach()
    u = x.clamp(-a, a) / (a / p.qmax)
    step_part = ((torch.round(u) - u) / p.qmax)
    inside = x.abs() < a
    expected = (torch.where(inside, step_part, torch.round(u) / p.qmax)).sum()
    assert torch.allclose(p.alpha.grad, expected, atol=1e-6)


def _calib(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _kl_to(teacher, model, ids) -> float:
    with torch.no_grad():
        t = F.log_softmax(teacher(ids).logits.float(), -1)
        s = F.log_softmax(model(ids).logits.float(), -1)
    return float(F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("mode,init,spec", [("block", "rtn", SPEC), ("block", "awq", SPEC), ("model", "rtn", SPEC),
                                           ("block", "awq", FULL)])
def test_qat_lowers_the_quantized_loss(mode, init, spec):
    fp = tiny_llama()
    calib = _calib()
    start = copy.deepcopy(fp)
    quantize_(start, QATConfig(spec, init=init, mode=mode, steps=1, lr=1e-12, scale_lr=1e-12), calib)
    trained = copy.deepcopy(fp)
    rep = quantize_(trained, QATConfig(spec, init=init, mode=mode, steps=40, lr=1e-4, scale_lr=1e-4,
                                       batch_size=2), calib)
    assert rep.info["steps"] == (40 * 2 if mode == "block" else 40)
    assert rep.info["last_loss"] < rep.info["first_loss"]
    held_out = _calib(4, 32, seed=1)
    assert _kl_to(fp, trained, held_out) < _kl_to(fp, start, held_out)
    # the result is on the grid: packing finds the trained codes, which decode to the weights exactly
    packed = pack_model_(trained, spec, method="qat")
    for name, lin in trained.named_modules():
        if name in packed.packed and isinstance(lin, torch.nn.Linear) and name.startswith("model.layers"):
            assert torch.equal(dequantize(packed.packed[name].to_qtensor()), lin.weight)
            assert len(torch.unique(packed.packed[name].to_qtensor().q)) <= 2 ** spec.bits


def test_qat_start_equals_awq():
    """With nothing learned, QAT's result is AWQ's: training starts exactly at the method it improves."""
    fp = tiny_llama()
    calib = _calib()
    awq = copy.deepcopy(fp)
    quantize_(awq, AWQConfig(SPEC, propagate="quantized"), calib)
    qat = copy.deepcopy(fp)
    quantize_(qat, QATConfig(SPEC, init="awq", steps=1, lr=1e-30, scale_lr=1e-30, learn_scales=False,
                             learn_weights=True, awq=AWQConfig(SPEC, propagate="quantized")), calib)
    for (n, a), (_, b) in zip(awq.named_parameters(), qat.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_pact_alpha_moves_and_stays_at_run_time():
    model = tiny_llama()
    rep = quantize_(model, QATConfig(SPEC, init="rtn", steps=10, lr=1e-3, scale_lr=1e-2, a_bit=4), _calib())
    pacts = [m.__dict__["_lowbit_pact"] for m in model.modules() if "_lowbit_pact" in m.__dict__]
    assert len(pacts) == 14
    assert rep.info["steps"] == 20
    # each α started at its linear's largest calibration input; training moved them
    with torch.no_grad():
        ids = _calib()
        h = model.model.layers[0].self_attn.q_proj
        seen = []
        handle = h.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        model(ids)
        handle.remove()
    assert len(torch.unique(seen[0])) <= 2 ** 4  # the hook quantizes the input at run time
    moved = [abs(float(p.alpha.detach().abs()) - p.initial) / p.initial for p in pacts]
    assert min(moved) > 1e-4 and max(moved) > 1e-2  # every α moved from its calibration max
    assert detach_runtime(model) == 14


@pytest.mark.parametrize("rounding", ["stochastic", "soft"])
def test_stochastic_and_soft_rounding_train(rounding):
    fp, calib, held_out = tiny_llama(), _calib(), _calib(4, 32, seed=1)
    start = copy.deepcopy(fp)
    quantize_(start, QATConfig(SPEC, init="rtn", steps=1, lr=1e-12, scale_lr=1e-12), calib)
    model = copy.deepcopy(fp)
    quantize_(model, QATConfig(SPEC, init="rtn", steps=30, lr=1e-4, scale_lr=1e-4, rounding=rounding), calib)
    assert _kl_to(fp, model, held_out) < _kl_to(fp, start, held_out)
    pack_model_(model, SPEC, method="qat")  # hard codes at the end, whatever the training rounding


def test_nan_loss_stops_and_restores_last_good_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    seen = []

    def loss_fn(_idx):
        seen.append(p.detach().clone())
        if len(seen) == 4:
            return (p * float("nan")).sum()
        return ((p - 1) ** 2).sum()

    cfg = _QC(SPEC, steps=10, lr=0.1, batch_size=1)
    with pytest.warns(UserWarning, match="at step 3"):
        log = fit(loss_fn, 4, [{"params": [p], "lr": 0.1}], schedule(cfg), torch.Generator().manual_seed(0), "t")
    assert isinstance(log, FitLog) and log.steps == 3 and "step 3" in log.stopped
    assert torch.equal(p.detach(), seen[2])  # the weights of the last step whose loss was finite


@pytest.mark.parametrize("kw,msg", [({"steps": 0}, "positive number of steps"), ({"lr": -1e-3}, "lr must be"),
                                    ({"scale_lr": 0.0}, "scale lr"), ({"rounding": "up"}, "rounding")])
def test_bad_qat_options(kw, msg):
    with pytest.raises(LowbitError, match=msg):
        QATConfig(SPEC, **kw)


def test_calibration_shorter_than_a_batch():
    with pytest.raises(LowbitError, match="at least one batch"):
        quantize_(tiny_llama(), QATConfig(SPEC, batch_size=4), _calib(n=2))
