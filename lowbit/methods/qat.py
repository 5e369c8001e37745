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
  the float model's top-64 next tokens (taken once, before rounding; block-wise's loss). It needs
  the whole model's activations for the backward pass.

Training starts from the method's own result (``init="awq"``: AWQ's scales folded and its
clips applied; the learned grid starts at AWQ's), so the comparison with that method is
"what training adds". The final weights are rounded hard onto the learned grid; their codes
are kept on each linear so that packing stores exactly what was trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import LowbitError
from ..options import option, positive_int
from ..quantizer import QuantSpec
from ..walk import LayerContext, layer_output, walk_layers
from . import awq
from .awq import AWQConfig, apply_awq
from .base import QuantReport, attach_runtime, prepare
from .registry import Method, always
from .training import (
    FitLog,
    FixedGridSTE,
    LearnedGrid,
    Schedule,
    detach,
    distillation_loss,
    finite_mean,
    fit,
    restore_flags,
    ste_round,
    teacher_top_k,
    trainable_only,
)

Rounding = Literal["ste", "soft", "stochastic"]


@dataclass(frozen=True)
class QATConfig:
    spec: QuantSpec
    init: Literal["awq", "rtn"] = option("awq", "the method training starts from", choices=("awq", "rtn"))
    mode: Literal["block", "model"] = option(
        "block", "block: each decoder layer learns its float outputs, one layer in memory; model: all linears end "
                 "to end with distillation from the float model", choices=("block", "model"))
    steps: int = option(32, "optimizer steps per layer (block) or in all (model)", flag="--qat-steps",
                        aliases=("--steps",), parse=positive_int)
    lr: float = option(1e-4, "Adam learning rate of the weights", parse=float)
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
    distill: float = option(1.0, "model mode: weight of distillation from the float model; the rest: next-token loss",
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


# ---- weights and activations on their grids ---------------------------------------------------------------


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


# ---- training ------------------------------------------------------------------------------------------


def schedule(cfg: QATConfig) -> Schedule:
    """QAT's run in the shared loop: a fixed number of steps, no held-out checks, no decay, clipped gradients."""
    return Schedule(cfg.steps, 0, 0, cfg.batch_size, 0, cfg.temperature if cfg.rounding == "soft" else None,
                    decay=False, grad_clip=cfg.grad_clip)


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


def _input_alphas(ctx: LayerContext, names: list[str]) -> dict[str, float]:
    return {n: float(ctx.linear_inputs[n].abs().amax()) for n in names}


def train_linears(model: nn.Module, scope: nn.Module, linears: dict[str, nn.Linear], alphas: dict[str, float] | None,
                  loss_on, n: int, cfg: QATConfig, generator: torch.Generator, desc: str) -> FitLog:
    """Fake-quantize ``linears`` (and, with ``cfg.a_bit``, their inputs from the clips ``alphas``), train what
    ``cfg`` says learns on ``loss_on`` with everything else in ``scope`` frozen, then round them hard."""
    quantizers = attach_quantizers(linears, cfg, generator)
    pacts = attach_pact(model, linears, cfg.a_bit, alphas, cfg.pact) if cfg.a_bit is not None else {}
    groups = _param_groups(linears, quantizers, cfg, [p.alpha for p in pacts.values()])
    flags = trainable_only(scope, [p for g in groups for p in g["params"]])
    try:
        with torch.enable_grad():
            return fit(loss_on, n, groups, schedule(cfg), generator, desc, quantizers.values())
    finally:
        restore_flags(flags)
        detach(linears)


class BlockTrainer:
    """The last step of a layer walk: train the layer's linears to reproduce its float outputs."""

    def __init__(self, model: nn.Module, cfg: QATConfig) -> None:
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.logs: list[FitLog] = []

    def __call__(self, ctx: LayerContext, linears: dict[str, nn.Linear], spec: QuantSpec) -> None:
        if ctx.inputs is None or ctx.outputs is None:
            raise LowbitError("block-wise QAT needs the layer walk's float outputs (calibration samples)")
        alphas = _input_alphas(ctx, list(linears)) if self.cfg.a_bit is not None else None
        x = torch.cat(list(ctx.batches()))
        target = torch.cat(ctx.outputs)

        def loss_on(idx: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(layer_output(ctx.call(ctx.layer, x[idx])).float(), target[idx].float())

        self.logs.append(train_linears(self.model, ctx.layer, linears, alphas, loss_on, x.shape[0], self.cfg,
                                       self.generator, f"qat layer {ctx.index}"))


def _no_rounding(ctx: LayerContext, linears: dict[str, nn.Linear], spec: QuantSpec) -> None:
    """A layer walk's last step that leaves the weights in float (model mode rounds them later)."""


def apply_qat(model: nn.Module, config: QATConfig, calib: torch.Tensor | None = None,
              device: torch.device | None = None) -> QuantReport:
    if calib is None:
        raise LowbitError("QAT trains on calibration samples; none were given")
    family, linears = prepare(model, config.spec)
    if calib.shape[0] < config.batch_size:
        raise LowbitError(f"QAT needs at least one batch of {config.batch_size} calibration sequences, "
                          f"got {calib.shape[0]}")
    awq_cfg = config.awq or AWQConfig(config.spec)
    if config.init == "awq" and awq_cfg.spec != config.spec:
        raise LowbitError(f"QAT and its AWQ start must share one spec, got {config.spec} and {awq_cfg.spec}")
    # model mode distils from the float model's top-k next tokens, taken before anything is rounded
    teacher = (teacher_top_k(model, calib, config.batch_size) if config.mode == "model" and config.distill > 0
               else None)
    info: dict = {"init": config.init, "mode": config.mode, "rounding": config.rounding}
    if config.mode == "block":
        trainer = BlockTrainer(model, config)
        if config.init == "awq":
            apply_awq(model, awq_cfg, calib, rounder=trainer, device=device)
        else:
            walk_layers(model, family, calib, lambda ctx: trainer(ctx, {n: ctx.layer.get_submodule(n)
                                                                        for n in family.linears}, config.spec),
                        propagate=config.propagate, desc="qat", device=device)
        logs = trainer.logs
    else:
        if config.init == "awq":
            apply_awq(model, awq_cfg, calib, rounder=_no_rounding, device=device)
        logs = [_train_model(model, teacher, linears, calib, config)]
    info.update(steps=sum(lg.steps for lg in logs), first_loss=finite_mean(lg.first_loss for lg in logs),
                last_loss=finite_mean(lg.last_loss for lg in logs))
    stopped = [lg.stopped for lg in logs if lg.stopped]
    if stopped:
        info["stopped"] = "; ".join(stopped)
    name = f"qat-{config.mode}({config.init})"
    return QuantReport(name, config.spec, config.spec.bits_per_weight(), info=info)


def _train_model(model: nn.Module, teacher: tuple[torch.Tensor, torch.Tensor] | None,
                 linears: dict[str, nn.Linear], calib: torch.Tensor, cfg: QATConfig) -> FitLog:
    """End-to-end: next-token loss mixed with distillation from the float model's top-k next tokens."""
    alphas = _calib_input_alphas(model, linears, calib[:cfg.batch_size]) if cfg.a_bit is not None else None
    was_training = model.training
    model.eval()  # no dropout: the float model is the target

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        ids = calib[idx]
        logits = model(ids, use_cache=False).logits
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        if cfg.distill < 1:
            loss = loss + (1 - cfg.distill) * F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                              ids[:, 1:].flatten())
        if cfg.distill > 0:
            loss = loss + cfg.distill * distillation_loss(logits, (teacher[0][idx], teacher[1][idx]))
        return loss

    try:
        return train_linears(model, model, linears, alphas, loss_on, calib.shape[0], cfg,
                             torch.Generator().manual_seed(cfg.seed), "qat (model)")
    finally:
        model.train(was_training)


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
