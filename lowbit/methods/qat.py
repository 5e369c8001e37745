"""Quantization-aware training: train through the quantizer, with learned step sizes and clips.

The forward pass sees fake-quantized weights (and optionally activations); rounding is
bridged in the backward pass by the straight-through estimator (STE): the gradient passes
through ``round`` unchanged and is zero where the value was clipped. Step sizes are learned
as in LSQ (gradient through ``(round(w/s) - w/s)`` inside the range, the clip level outside);
activation clips as in PACT (a learned symmetric bound α, whose gradient is the upstream
gradient of every clipped value). Instead of the STE, rounding can be soft: ``floor(u) +
sigmoid-like step`` whose temperature is annealed towards hard rounding (the idea of QIL and
"quantization networks"), or stochastic (unbiased random up/down during training).

Two ways to train (``mode``):

- ``block`` (default): each decoder layer in turn learns to reproduce its float outputs on its
  calibration inputs (mean squared error), inside AWQ's (or RTN's) layer walk. Memory is one
  layer's weights and its calibration activations, so it scales to models far larger than
  this machine could backpropagate through whole; every step costs one layer, so 2 CPU cores
  afford many steps.
- ``model``: every linear at once, end to end, on next-token loss mixed with distillation from
  the float model's logits (a frozen copy). It needs the whole model's activations for the
  backward pass and one full forward per step for the teacher.

Training starts from the method's own result (``init="awq"``: AWQ's scales folded and its
clips applied; the learned grid starts at AWQ's), so the comparison with that method is
"what training adds". The final weights are rounded hard onto the learned grid; their codes
are kept on each linear so that packing stores exactly what was trained.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..calib import LayerContext, walk_layers
from ..errors import LowbitError
from ..options import option, positive_int
from ..quantizer import (
    SCALE_MAX,
    SCALE_MIN,
    QTensor,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    grouped,
    half_scale,
    set_codes,
)
from . import awq
from .awq import AWQConfig, apply_awq
from .base import QuantReport, attach_runtime, prepare
from .registry import Method, always
from .training import finite_mean, temperature

Rounding = Literal["ste", "soft", "stochastic"]


@dataclass(frozen=True)
class QATConfig:
    spec: QuantSpec
    init: Literal["awq", "rtn"] = option("awq", "the method training starts from", choices=("awq", "rtn"))
    mode: Literal["block", "model"] = option(
        "block", "block: each decoder layer learns its float outputs, one layer in memory; model: all linears end "
                 "to end with distillation from the float logits", choices=("block", "model"))
    steps: int = option(32, "optimizer steps per layer (block) or in all (model)", flag="--qat-steps",
                        aliases=("--steps",), parse=positive_int)
    lr: float = option(1e-4, "AdamW learning rate of the weights", parse=float)
    scale_lr: float = option(1e-4, "learning rate of step sizes and clips", parse=float)
    batch_size: int = option(2, "calibration sequences per step", parse=positive_int)
    rounding: Rounding = option(
        "ste", "rounding in training: ste (nearest, straight-through gradient), soft (annealed smooth staircase) "
               "or stochastic; the final weights are always rounded to nearest", flag="--qat-rounding",
        choices=("ste", "soft", "stochastic"))
    temperature: tuple[float, float] = option((4.0, 400.0), "soft rounding's temperature, annealed geometrically",
                                              parse=float, nargs=2, metavar=("START", "END"))
    learn_weights: bool = option(True, "train step sizes (and clips) only")
    learn_scales: bool = option(True, "keep the initial step sizes fixed (no LSQ)", flag="--no-lsq")
    distill: float = option(1.0, "model mode: weight of the KL to the float logits; the rest is next-token loss",
                            parse=float)
    grad_clip: float = option(1.0, "gradient norm clip", parse=float)
    a_bit: int | None = None  # fake-quantize each linear's input to this many bits during training and after
    pact: bool = option(True, "with --a-bit: keep each clip at its calibration maximum")
    seed: int = 0
    awq: AWQConfig | None = None  # init="awq": the AWQ run to start from (default: AWQConfig(spec))
    propagate: Literal["float", "quantized"] = "quantized"  # block mode without AWQ: what feeds the next layer

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise LowbitError(f"QAT needs a positive number of steps, got {self.steps!r}")
        for name in ("lr", "scale_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise LowbitError(f"QAT {name.replace('_', ' ')} must be positive, got {v!r}")
        if self.batch_size < 1:
            raise LowbitError(f"QAT batch size must be at least 1, got {self.batch_size}")
        if self.rounding not in ("ste", "soft", "stochastic"):
            raise LowbitError(f"QAT rounding must be ste, soft or stochastic, got {self.rounding!r}")
        if self.init not in ("awq", "rtn") or self.mode not in ("block", "model"):
            raise LowbitError(f"QAT init must be awq or rtn and mode block or model, got {self.init}, {self.mode}")
        if not 0.0 <= self.distill <= 1.0:
            raise LowbitError(f"distillation weight must be in [0, 1], got {self.distill}")
        t0, t1 = self.temperature
        if not 0 < t0 <= t1:
            raise LowbitError(f"soft-rounding temperatures must satisfy 0 < start <= end, got {self.temperature}")
        if self.a_bit is not None and not 2 <= self.a_bit <= 8:
            raise LowbitError(f"activation bits must be from 2 to 8, got {self.a_bit}")


# ---- differentiable rounding ------------------------------------------------------------------


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` forward, identity backward (the straight-through estimator)."""
    return u + (torch.round(u) - u).detach()


def stochastic_ste_round(u: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased random rounding forward (up with probability frac(u)), identity backward."""
    noise = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)
    return u + (torch.floor(u + noise) - u).detach()


def soft_round(u: torch.Tensor, temperature: float) -> torch.Tensor:
    """A smooth staircase that tends to ``round(u)`` as the temperature grows.

    floor(u) + 1/2 + tanh(T (r - 1/2)) / (2 tanh(T/2)), r = u - floor(u): equal to u at T -> 0 and to
    round(u) at T -> inf, with a true gradient (no estimator) in between.
    """
    base = torch.floor(u).detach()
    r = u - base
    t = temperature
    return base + 0.5 + 0.5 * torch.tanh(t * (r - 0.5)) / math.tanh(t / 2)


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


# ---- weight quantizer with learned steps --------------------------------------------------------


class LearnedGrid(nn.Module):
    """Fake quantization of a weight on the integer grid of ``spec`` with a learned step per group.

    Registered as a parametrization of a linear's weight: the linear computes with the
    fake-quantized weight, the optimizer moves the float weight and the steps. The zero point
    stays at its initial integer value (packing stores integers).
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, rounding: Rounding, lsq: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        wg = grouped(weight.detach().float(), spec)
        scale, zero = compute_qparams(wg, spec)
        self.spec, self.rounding, self.generator = spec, rounding, generator
        self.shape = tuple(weight.shape)
        # The step's magnitude is learned; its sign is fixed (negative only on full-range grids, where the
        # group's positive extreme sits on the lowest code).
        self.scale = nn.Parameter(scale.squeeze(-1).abs().clone(), requires_grad=lsq)
        self.register_buffer("sign", torch.where(scale.squeeze(-1) < 0, -1.0, 1.0))
        self.register_buffer("zero", zero.squeeze(-1).clone())
        self.grad_factor = 1.0 / math.sqrt(wg.shape[-1] * spec.qmax)
        self.temperature = math.inf
        self.hard = False  # True: round to nearest whatever the training rounding (the final weights)

    def _codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hard:  # exact integers and the exact step: what packing will store
            s = self.scale.detach().clamp(min=SCALE_MIN)
            if self.spec.ggml is None or self.spec.ggml.super_block is None:  # a float16 step in the file
                s = half_scale(s.clamp(max=SCALE_MAX))  # a step trained beyond float16's range saturates
            s = (s * self.sign).unsqueeze(-1)
            u = grouped(w.detach().float(), self.spec) / s + self.zero.unsqueeze(-1)
            return torch.clamp(torch.round(u), self.spec.qmin, self.spec.qmax), s
        s = (_scale_grad(self.scale, self.grad_factor).clamp(min=1e-8) * self.sign).unsqueeze(-1)
        u = torch.clamp(grouped(w.float(), self.spec) / s + self.zero.unsqueeze(-1), self.spec.qmin, self.spec.qmax)
        if self.rounding == "soft":
            return soft_round(u, self.temperature), s
        if self.rounding == "stochastic":
            return stochastic_ste_round(u, self.generator), s
        return ste_round(u), s

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q, s = self._codes(w)
        return ((q - self.zero.unsqueeze(-1)) * s).reshape(self.shape).to(w.dtype)

    @torch.no_grad()
    def qtensor(self, w: torch.Tensor) -> QTensor:
        """The hard codes of ``w`` with the learned steps, as packing stores them."""
        hard, self.hard = self.hard, True
        try:
            q, s = self._codes(w)
        finally:
            self.hard = hard
        return QTensor(q.reshape(self.shape).to(torch.int16), s.squeeze(-1).clone(), self.zero.clone(), self.spec,
                       self.shape)


class FixedGridSTE(nn.Module):
    """Any number format (FP4, NF4, MX, ...): the format's own rounding with the STE; no learned steps."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantize(w.detach(), self.spec) - w).detach()


def attach_quantizers(linears: dict[str, nn.Linear], cfg: QATConfig, generator: torch.Generator | None = None
                      ) -> dict[str, nn.Module]:
    """Parametrize each linear's weight with a fake quantizer; returns the quantizers by name."""
    out = {}
    for name, lin in linears.items():
        q = (LearnedGrid(lin.weight, cfg.spec, cfg.rounding, cfg.learn_scales, generator) if cfg.spec.is_int
             else FixedGridSTE(cfg.spec))
        parametrize.register_parametrization(lin, "weight", q, unsafe=True)
        out[name] = q
    return out


@torch.no_grad()
def finalize(linears: dict[str, nn.Linear]) -> None:
    """Round each parametrized weight hard onto its grid, keep its codes, and remove the parametrization."""
    for lin in linears.values():
        if not parametrize.is_parametrized(lin, "weight"):
            continue
        q = lin.parametrizations.weight[0]
        original = lin.parametrizations.weight.original.detach()
        codes = None
        if isinstance(q, LearnedGrid):
            q.hard = True  # the weight left behind is the hard-rounded one, the codes are its codes
            codes = q.qtensor(original)
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
        lin.weight.requires_grad_(False)
        if codes is not None:
            set_codes(lin, codes)


# ---- activations: PACT ------------------------------------------------------------------------


class PACT(nn.Module):
    """Symmetric activation fake quantization with a learned clip α (PACT, Choi et al. 2018).

    x̂ = round(clamp(x, -α, α) / s) s with s = α / qmax; autograd gives α the summed gradient of
    the clipped values (the PACT gradient) plus the STE path through the step.
    """

    def __init__(self, bits: int, alpha: float, learn: bool = True) -> None:
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.initial = float(alpha)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.abs().clamp(min=1e-6).to(x.dtype)
        xc = torch.minimum(torch.maximum(x, -a), a)
        s = a / self.qmax
        return ste_round(xc / s) * s


def attach_pact(model: nn.Module, linears: dict[str, nn.Linear], bits: int, alphas: dict[str, float], learn: bool
                ) -> dict[str, PACT]:
    """A PACT quantizer on each linear's input, as a run-time hook (removed by ``detach_runtime``)."""
    out = {}
    for name, lin in linears.items():
        pact = PACT(bits, alphas[name], learn)
        handle = lin.register_forward_pre_hook(lambda _m, args, p=pact: (p(args[0]), *args[1:]))
        attach_runtime(model, handle)
        lin.__dict__["_lowbit_pact"] = pact  # keeps the module (and its α) alive and inspectable
        out[name] = pact
    return out


# ---- the training loop ------------------------------------------------------------------------


@dataclass
class TrainLog:
    """Loss at the start and end of one training run (means over the first and last few steps)."""

    steps: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    stopped: str | None = None
    losses: list[float] = field(default_factory=list)


def train(param_groups: list[dict], loss_fn, n_samples: int, cfg: QATConfig, quantizers: list[nn.Module],
          desc: str, generator: torch.Generator) -> TrainLog:
    """AdamW on ``loss_fn(batch indices)`` for ``cfg.steps`` steps over shuffled calibration samples.

    A non-finite loss stops training: the weights go back to the last step whose loss was finite.
    """
    if n_samples < cfg.batch_size:
        raise LowbitError(f"QAT needs at least one batch of {cfg.batch_size} calibration sequences, got {n_samples}")
    params = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    last_good = [p.detach().clone() for p in params]
    log = TrainLog()
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", leave=False)
    for step in bar:
        if order.numel() < cfg.batch_size:
            order = torch.randperm(n_samples, generator=generator)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        for q in quantizers:
            if cfg.rounding == "soft" and isinstance(q, LearnedGrid):
                q.temperature = temperature(step, cfg.steps, *cfg.temperature)
        loss = loss_fn(idx)
        if not torch.isfinite(loss):
            with torch.no_grad():
                for p, good in zip(params, last_good):
                    p.copy_(good)
            log.stopped = f"loss became {loss.item()} at step {step}; weights restored to step {max(step - 1, 0)}"
            warnings.warn(f"QAT ({desc}): {log.stopped}", stacklevel=2)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with torch.no_grad():
            for p, good in zip(params, last_good):
                good.copy_(p)
        opt.step()
        log.losses.append(loss.item())
        log.steps = step + 1
        bar.set_postfix(loss=f"{log.losses[-1]:.4g}")
    k = max(1, min(4, len(log.losses) // 4))
    if log.losses:
        log.first_loss, log.last_loss = sum(log.losses[:k]) / k, sum(log.losses[-k:]) / k
    return log


def _param_groups(linears: dict[str, nn.Linear], quantizers: dict[str, nn.Module], cfg: QATConfig,
                  extra: list[nn.Parameter] = ()) -> list[dict]:
    groups = []
    if cfg.learn_weights:
        groups.append({"params": [lin.parametrizations.weight.original for lin in linears.values()], "lr": cfg.lr})
    scales = [q.scale for q in quantizers.values() if isinstance(q, LearnedGrid) and cfg.learn_scales]
    scales += [p for p in extra if p.requires_grad]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    if not groups:
        raise LowbitError("QAT has nothing to learn: enable weights, step sizes or PACT clips")
    return groups


def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> dict[nn.Parameter, bool]:
    """Freeze every parameter of ``model`` except ``params``; returns the previous flags."""
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return before


def restore_flags(flags: dict[nn.Parameter, bool]) -> None:
    for p, f in flags.items():
        p.requires_grad_(f)


def _input_alphas(ctx: LayerContext, names: list[str]) -> dict[str, float]:
    return {n: float(ctx.linear_inputs[n].abs().amax()) for n in names}


class BlockTrainer:
    """The last step of a layer walk: train the layer's linears to reproduce its float outputs."""

    def __init__(self, model: nn.Module, cfg: QATConfig) -> None:
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.logs: list[TrainLog] = []

    def __call__(self, ctx: LayerContext, linears: dict[str, nn.Linear], spec: QuantSpec) -> None:
        cfg = self.cfg
        if ctx.inputs is None or ctx.outputs is None:
            raise LowbitError("block-wise QAT needs the layer walk's float outputs (calibration samples)")
        quantizers = attach_quantizers(linears, cfg, self.generator)
        pacts = {}
        if cfg.a_bit is not None:
            pacts = attach_pact(self.model, linears, cfg.a_bit, _input_alphas(ctx, list(linears)), cfg.pact)
        groups = _param_groups(linears, quantizers, cfg, [p.alpha for p in pacts.values()])
        flags = trainable_only(ctx.layer, [p for g in groups for p in g["params"]])
        dtype = next(ctx.layer.parameters()).dtype
        x = torch.cat([b.to(dtype) for b in ctx.inputs])
        target = torch.cat(ctx.outputs)

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            out = ctx.call(ctx.layer, x[idx])
            out = out[0] if isinstance(out, tuple) else out
            return F.mse_loss(out.float(), target[idx].float())

        try:
            with torch.enable_grad():
                log = train(groups, loss_fn, x.shape[0], cfg, list(quantizers.values()), f"qat layer {ctx.index}",
                            self.generator)
        finally:
            restore_flags(flags)
            finalize(linears)
        self.logs.append(log)


def _no_rounding(ctx: LayerContext, linears: dict[str, nn.Linear], spec: QuantSpec) -> None:
    """A layer walk's last step that leaves the weights in float (model mode rounds them later)."""


def apply_qat(model: nn.Module, config: QATConfig, calib: torch.Tensor | None = None) -> QuantReport:
    if calib is None:
        raise LowbitError("QAT trains on calibration samples; none were given")
    family, linears = prepare(model, config.spec)
    if calib.shape[0] < config.batch_size:
        raise LowbitError(f"QAT needs at least one batch of {config.batch_size} calibration sequences, "
                          f"got {calib.shape[0]}")
    awq_cfg = config.awq or AWQConfig(config.spec)
    if config.init == "awq" and awq_cfg.spec != config.spec:
        raise LowbitError(f"QAT and its AWQ start must share one spec, got {config.spec} and {awq_cfg.spec}")
    teacher = copy.deepcopy(model).eval() if config.mode == "model" else None
    info: dict = {"init": config.init, "mode": config.mode, "rounding": config.rounding}
    if config.mode == "block":
        trainer = BlockTrainer(model, config)
        if config.init == "awq":
            apply_awq(model, awq_cfg, calib, rounder=trainer)
        else:
            walk_layers(model, family, calib, lambda ctx: trainer(ctx, {n: ctx.layer.get_submodule(n)
                                                                        for n in family.linears}, config.spec),
                        propagate=config.propagate, desc="qat")
        logs = trainer.logs
    else:
        if config.init == "awq":
            apply_awq(model, awq_cfg, calib, rounder=_no_rounding)
        logs = [_train_model(model, teacher, linears, calib, config)]
    info.update(steps=sum(lg.steps for lg in logs), first_loss=finite_mean(lg.first_loss for lg in logs),
                last_loss=finite_mean(lg.last_loss for lg in logs))
    stopped = [lg.stopped for lg in logs if lg.stopped]
    if stopped:
        info["stopped"] = "; ".join(stopped)
    name = f"qat-{config.mode}({config.init})"
    return QuantReport(name, config.spec, config.spec.bits_per_weight(), info=info)


def _train_model(model: nn.Module, teacher: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor,
                 cfg: QATConfig) -> TrainLog:
    """End-to-end: next-token loss mixed with KL(float logits || quantized logits)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    quantizers = attach_quantizers(linears, cfg, generator)
    pacts = {}
    if cfg.a_bit is not None:
        pacts = attach_pact(model, linears, cfg.a_bit, _calib_input_alphas(model, linears, calib[:cfg.batch_size]),
                            cfg.pact)
    groups = _param_groups(linears, quantizers, cfg, [p.alpha for p in pacts.values()])
    flags = trainable_only(model, [p for g in groups for p in g["params"]])
    was_training = model.training
    model.eval()  # no dropout: the float model is the target

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        ids = calib[idx]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        loss = torch.zeros((), dtype=torch.float32)
        if cfg.distill < 1:
            loss = loss + (1 - cfg.distill) * F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        if cfg.distill > 0:
            with torch.no_grad():
                t = teacher(ids, use_cache=False).logits[:, :-1].float()
            kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1),
                          log_target=True, reduction="batchmean")
            loss = loss + cfg.distill * kl
        return loss

    try:
        with torch.enable_grad():
            log = train(groups, loss_fn, calib.shape[0], cfg, list(quantizers.values()), "qat (model)", generator)
    finally:
        restore_flags(flags)
        finalize(linears)
        model.train(was_training)
    return log


@torch.no_grad()
def _calib_input_alphas(model: nn.Module, linears: dict[str, nn.Linear], samples: torch.Tensor) -> dict[str, float]:
    """Each linear's largest absolute input on a few calibration samples: PACT's starting clip."""
    seen: dict[str, float] = {}
    handles = [lin.register_forward_pre_hook(
        lambda _m, args, n=name: seen.__setitem__(n, max(seen.get(n, 0.0), float(args[0].abs().amax()))))
        for name, lin in linears.items()]
    try:
        model(samples, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def build(spec: QuantSpec, opts) -> tuple[QATConfig]:
    """QAT from the run's options: its AWQ start and its own activation bits."""
    if spec.ggml is not None:
        raise LowbitError("QAT learns float steps that no GGUF block type stores (float16 scales, K-quants' integer "
                          "sub-block scales); use --method awq+gptq --act-order for GGUF types")
    return (QATConfig(spec, awq=awq.METHOD.build(spec, opts)[0], a_bit=opts.a_bit, seed=opts.seed,
                      **opts.for_config(QATConfig)),)


METHOD = Method("qat", QATConfig, apply_qat, "train the rounded weights (and steps) layer by layer from AWQ",
                build=build, calibrates=always, chains=("awq",), trains=True, own_activations=True,
                options_title="qat (training from awq or rtn)", page="docs/qat.md")
