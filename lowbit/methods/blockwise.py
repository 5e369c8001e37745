"""Block-wise reconstruction: each decoder layer learns, on the calibration set, what rounding alone cannot.

The start is AWQ+GPTQ-R (AWQ's scales folded and clips applied, GPTQ's act-order rounding). Then,
for one decoder layer at a time, the quantized layer is trained to reproduce the *float* layer's
outputs. Its inputs are the quantized model's hidden states, its targets the float model's, so
each layer also corrects what the layers before it got wrong (AutoRound's, OmniQuant's and
EfficientQAT's choice). What is learned, per linear (EfficientQAT's Block-AP on GPTQ's weights):

- a rounding offset per weight, in steps of the grid (AutoRound's V, here unbounded and moved by
  Adam): the code of a weight is ``round((ŵ₀ + v·s₀) / s + z)`` where ŵ₀ is GPTQ's weight;
- the group's step size ``s = s₀·exp(γ)`` (a smaller step clips: OmniQuant's learnable clipping);
- the group's zero point (integer grids round it with the straight-through estimator).

Codes always stay on the target grid, so the result packs exactly; K-quants keep GPTQ's integer sub-block
scales and learn only the rounding; float16 scales (lowbit's integer grids, GGUF's legacy block scales) are
learned as float16 values. Training
runs in bfloat16 autocast where the CPU has native bfloat16 (AVX-512 BF16 makes a step about twice as fast;
without it bfloat16 is emulated and 14x slower, so float32 is chosen: ``lowbit.hardware``). With
``holdout > 0`` it stops early on a held-out slice of the calibration set, keeping the parameters with the
lowest held-out loss, the start included; the default (chosen on dev text, docs/blockwise.md) holds nothing
out and trains every step on all samples, the training samples judging the checks.

A last pass (EfficientQAT's E2E-QP) freezes every code and zero point and tunes only the step sizes, end
to end: by default (``e2e_loss="kd"``) on distillation from the float model's next-token distribution (its
top-k log-probabilities, taken before quantization), which teaches what the float model predicts rather
than what the calibration text says; or on next-token loss over the calibration text (``"ce"``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..hardware import compute_dtype
from ..options import non_negative_int, option, positive_int
from ..quantizer import QuantSpec, codes_of
from ..specmap import SpecMap, bits_per_weight, spec_for
from ..walk import LayerContext, layer_output, walk_layers
from . import awq, gptq
from .awq import AWQConfig, AWQLayerStep
from .base import QuantReport, prepare
from .gptq import GPTQConfig, GPTQRounder, warn_if_few_tokens
from .registry import Method, always
from .training import (
    FitLog,
    LearnedCodes,
    Schedule,
    attach_codes,
    detach,
    distillation_loss,
    finite_mean,
    fit,
    has_float_steps,
    restore_flags,
    teacher_top_k,
    trainable_only,
)

E2E_LOGIT_BYTES = 512 * 2**20  # float32 logits of one end-to-end step, at most
# The recipes: optimizer steps per layer, how often the held-out loss is checked, and the end-to-end steps.
RECIPES = {"default": {"steps": 160, "check_every": 20, "patience": 3, "e2e_steps": 64, "batch": 4},
           "fast": {"steps": 48, "check_every": 12, "patience": 2, "e2e_steps": 32, "batch": 2}}


@dataclass(frozen=True)
class BlockwiseConfig:
    spec: QuantSpec | SpecMap  # one grid, or one per linear (mixed widths, a GGUF recipe's types)
    awq: AWQConfig | None = None  # the start's AWQ (default AWQConfig(spec))
    gptq: GPTQConfig | None = None  # the start's rounding (default GPTQ-R: act order)
    fast: bool = option(False, "the fast recipe (48 steps per layer of 2 sequences, earlier stopping, 32 end-to-end "
                               "steps)")
    steps: int | None = option(None, "optimizer steps per decoder layer (default: the recipe's, 160 or 48 with "
                                     "--fast)", flag="--bw-steps", parse=positive_int)
    lr: float = option(5e-3, "Adam learning rate of the rounding offsets, in steps of the grid", flag="--bw-lr",
                       parse=float)
    scale_lr: float = option(4e-3, "Adam learning rate of log step sizes and of zero points", flag="--bw-scale-lr",
                             parse=float)
    norm_lr: float = option(1e-4, "Adam learning rate of the layer's norm weights (they stay in float; 0: frozen)",
                            flag="--bw-norm-lr", parse=float)
    batch_size: int | None = option(None, "calibration sequences per step (default: the recipe's, 4 or 2 with "
                                          "--fast)", flag="--bw-batch", parse=positive_int)
    holdout: int = option(0, "calibration sequences held out for early stopping (0: none, train all steps)",
                          flag="--bw-holdout", parse=non_negative_int, metavar="N")
    soft: bool = option(False, "soft rounding in training (annealed staircase) instead of the straight-through "
                               "estimator", flag="--bw-soft")
    dtype: str = option("auto", "training compute: auto (bfloat16 autocast where the device has native bfloat16, "
                                "e.g. AVX-512 BF16 or AMX; float32 elsewhere, where bfloat16 is emulated and 14x "
                                "slower), bf16 or fp32", flag="--bw-dtype", choices=("auto", "bf16", "fp32"))
    e2e_steps: int | None = option(None, "then tune only the step sizes end to end for N steps (E2E-QP; default: "
                                         "the recipe's, 64 or 32 with --fast; 0 skips it)", flag="--e2e-steps",
                                   parse=non_negative_int, metavar="N")
    e2e_lr: float = option(5e-3, "Adam learning rate of the log step sizes end to end", parse=float)
    e2e_loss: str = option("kd", "the end-to-end loss: ce (next-token cross-entropy on the calibration text) or kd "
                                 "(distillation from the float model's top-64 next-token probabilities)",
                           choices=("ce", "kd"))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise LowbitError(f"block-wise reconstruction needs a positive number of steps, got {self.steps!r}")
        if not (isinstance(self.norm_lr, (int, float)) and math.isfinite(self.norm_lr) and self.norm_lr >= 0):
            raise LowbitError(f"block-wise norm lr must be 0 or positive, got {self.norm_lr!r}")
        for name in ("lr", "scale_lr", "e2e_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise LowbitError(f"block-wise {name.replace('_', ' ')} must be positive, got {v!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise LowbitError(f"block-wise dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.e2e_loss not in ("ce", "kd"):
            raise LowbitError(f"block-wise e2e loss must be 'ce' or 'kd', got {self.e2e_loss!r}")
        if ((self.batch_size is not None and self.batch_size < 1) or self.holdout < 0
                or (self.e2e_steps is not None and self.e2e_steps < 0)):
            raise LowbitError("block-wise batch size must be at least 1, held-out sequences and E2E steps at least 0")
        specs = [self.spec] if isinstance(self.spec, QuantSpec) else [self.spec.default, *(s for _, s in
                                                                                      self.spec.overrides)]
        for spec in specs:
            if not spec.is_int or (spec.ggml is not None and spec.ggml.values is not None):
                raise LowbitError(f"block-wise reconstruction learns codes on an integer grid; {spec.describe()} is "
                                  "not one (use int or a GGUF integer type: q4_0 ... q8_0, q2_k ... q6_k; "
                                  "awq+gptq-r rounds onto table types)")

    def bf16_on(self, device: torch.device) -> bool:
        """Whether training on ``device`` runs under bfloat16 autocast (``dtype``, with auto resolved there)."""
        return compute_dtype(self.dtype, device)[0] == "bf16"

    @property
    def recipe(self) -> dict:
        r = dict(RECIPES["fast" if self.fast else "default"])
        if self.steps is not None:
            r["steps"] = self.steps
        if self.e2e_steps is not None:
            r["e2e_steps"] = self.e2e_steps
        if self.batch_size is not None:
            r["batch"] = self.batch_size
        return r


# ---- one decoder layer ---------------------------------------------------------------------------------


def norm_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the normalisation modules inside ``layer`` (RMSNorm, LayerNorm, q/k norms)."""
    norms = [m for m in layer.modules()
             if m is not layer and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("Norm", "NormGated")))]
    return [p for m in norms for p in m.parameters(recurse=False)]


def fit_block(run, x: torch.Tensor, target: torch.Tensor, grids: list[LearnedCodes], cfg: BlockwiseConfig,
              generator: torch.Generator, desc: str = "block", norms: list[nn.Parameter] = ()) -> FitLog:
    """Train ``grids`` so that ``run(x[idx])`` matches ``target[idx]`` (mean squared error); see :func:`fit`."""
    r = cfg.recipe
    sched = Schedule(r["steps"], r["check_every"], r["patience"], r["batch"], cfg.holdout,
                     (4.0, 400.0) if cfg.soft else None)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_on(x.device))

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        with autocast:
            out = layer_output(run(x[idx]))
        return F.mse_loss(out.float(), target[idx].float())

    groups = [{"params": [g.offset for g in grids], "lr": cfg.lr}]
    scales = [p for g in grids for p in (g.log_scale, g.zero_shift) if p.requires_grad]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    if norms and cfg.norm_lr > 0:
        groups.append({"params": list(norms), "lr": cfg.norm_lr})
    return fit(loss_on, x.shape[0], groups, sched, generator, desc, grids)


class BlockReconstructor:
    """The rounding step of one decoder layer: GPTQ-R, then training against the float layer's outputs."""

    def __init__(self, cfg: BlockwiseConfig, gptq: GPTQRounder) -> None:
        self.cfg, self.gptq = cfg, gptq
        gptq.keep_latent = True
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.logs: list[FitLog] = []

    def __call__(self, ctx: LayerContext, linears: dict[str, nn.Linear], spec) -> None:
        self.gptq(ctx, linears, spec)
        if ctx.inputs is None or ctx.targets is None:
            raise LowbitError("block-wise reconstruction needs the layer's calibration inputs and float outputs")
        grids = attach_codes(linears)
        x = torch.cat(list(ctx.batches()))
        norms = norm_parameters(ctx.layer) if self.cfg.norm_lr > 0 else []
        flags = trainable_only(ctx.layer, [p for g in grids.values() for p in g.parameters() if p.requires_grad]
                               + norms)
        try:
            with torch.enable_grad():
                self.logs.append(fit_block(lambda xb: ctx.call(ctx.layer, xb), x, ctx.targets, list(grids.values()),
                                           self.cfg, self.generator, f"block {ctx.index}", norms))
        finally:
            restore_flags(flags)
            detach(linears)


# ---- end to end: step sizes only ----------------------------------------------------------------------


def e2e_batch(model: nn.Module, calib: torch.Tensor, batch_size: int) -> int:
    """Sequences per end-to-end step: the logits are the pass's largest tensor (Gemma 3's vocabulary has 262k
    entries), at most ~512 MB of them."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    return max(1, min(batch_size, E2E_LOGIT_BYTES // (4 * vocab * calib.shape[1])))


def tune_steps_e2e(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor, cfg: BlockwiseConfig,
                   teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """EfficientQAT's E2E-QP: every code and zero point frozen, each group's step size trained end to end on
    next-token loss over the calibration samples (or, given ``teacher``'s top-k log-probabilities, on
    distillation from them), the best held-out step kept. K-quants keep their scales."""
    tuned = {n: lin for n, lin in linears.items() if codes_of(lin) is not None and has_float_steps(codes_of(lin).spec)}
    if not tuned:
        return {"e2e": "skipped: no linear has codes with free step sizes (K-quants' are integers)"}
    grids = list(attach_codes(tuned, frozen_codes=True).values())
    params = [g.log_scale for g in grids]
    flags = trainable_only(model, params)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_on(device))

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        ids = calib[idx]
        with autocast:
            logits = model(ids, use_cache=False).logits
        if teacher is not None:
            return distillation_loss(logits, (teacher[0][idx], teacher[1][idx]))
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    batch = e2e_batch(model, calib, cfg.recipe["batch"])
    steps = cfg.recipe["e2e_steps"]
    sched = Schedule(steps, max(1, min(8, steps // 4)), 2, batch, cfg.holdout)
    try:
        with torch.enable_grad():
            log = fit(loss_on, calib.shape[0], [{"params": params, "lr": cfg.e2e_lr}], sched,
                      torch.Generator().manual_seed(cfg.seed + 1), "e2e step sizes", grids)
    finally:
        restore_flags(flags)
        detach(tuned)
        model.train(was_training)
    return {"e2e_loss": "kd" if teacher is not None else "ce", "e2e_heldout_start": log.start,
            "e2e_heldout_best": log.best, "e2e_best_step": log.best_step, "e2e_steps": log.steps}


# ---- the method ----------------------------------------------------------------------------------------


def apply_blockwise(model: nn.Module, config: BlockwiseConfig, calib: torch.Tensor | None = None,
                    device: torch.device | None = None) -> QuantReport:
    if calib is None:
        raise LowbitError("block-wise reconstruction trains on calibration samples; none were given")
    family, linears = prepare(model, config.spec)
    if calib.shape[0] < 2:
        raise LowbitError(f"block-wise reconstruction needs at least 2 calibration sequences, got {calib.shape[0]}")
    warn_if_few_tokens(calib, linears)
    awq_cfg = config.awq or AWQConfig(config.spec)
    gptq_cfg = config.gptq or GPTQConfig(config.spec, act_order=True)
    if awq_cfg.spec != config.spec or gptq_cfg.spec != config.spec:
        raise LowbitError("block-wise reconstruction, its AWQ and its GPTQ must share one spec")
    if awq_cfg.load_search:
        raise LowbitError("block-wise reconstruction searches AWQ's scales on its own layer walk; drop --load-search")
    started = time.perf_counter()
    e2e_steps = config.recipe["e2e_steps"]
    free = any(has_float_steps(spec_for(config.spec, name)) for name in linears)  # all K-quants: nothing to tune
    teacher = (teacher_top_k(model, calib, e2e_batch(model, calib, config.recipe["batch"]))
               if e2e_steps and free and config.e2e_loss == "kd" else None)  # from the float model, before rounding
    gptq = GPTQRounder(gptq_cfg)
    rounder = BlockReconstructor(config, gptq)
    awq = AWQLayerStep(model, family, awq_cfg, None, rounder)
    # the quantized model's hidden states in (what each layer will see), the float model's outputs as targets
    walk_layers(model, family, calib, awq, propagate="quantized", desc="blockwise", float_targets=True,
                device=device)
    logs = rounder.logs
    e2e = tune_steps_e2e(model, linears, calib, config, teacher) if e2e_steps else {}
    dtype, why = compute_dtype(config.dtype, device or next(model.parameters()).device)  # the block training's
    info: dict = {"recipe": "fast" if config.fast else "default", "dtype": dtype, "dtype_reason": why,
                  "steps": sum(lg.steps for lg in logs),
                  "block_seconds": round(time.perf_counter() - started, 1),
                  "heldout_start": finite_mean(lg.start for lg in logs),
                  "heldout_best": finite_mean(lg.best for lg in logs),
                  "layers_kept_start": sum(lg.best_step == 0 for lg in logs), "awq_fallbacks": awq.found.fallbacks,
                  **gptq.info(), **e2e}
    info["layers"] = [{"index": i, "start": lg.start, "best": lg.best, "best_step": lg.best_step, "steps": lg.steps}
                      for i, lg in enumerate(logs)]
    return QuantReport("blockwise", config.spec, bits_per_weight(config.spec, linears), info=info)


def build(spec, opts) -> tuple[BlockwiseConfig]:
    """Block-wise from the run's options; its start is AWQ+GPTQ-R (GPTQ with act-order, whatever the options say)."""
    start = gptq.METHOD.build(spec, opts.replace(act_order=True))[0]
    return (BlockwiseConfig(spec, awq=awq.METHOD.build(spec, opts)[0], gptq=start, seed=opts.seed,
                            **opts.for_config(BlockwiseConfig)),)


METHOD = Method("blockwise", BlockwiseConfig, apply_blockwise,
                "AWQ+GPTQ-R, then each decoder layer trained to reproduce the float one, then the model end to end "
                "(--fast: the short recipe)",
                build=build, calibrates=always, chains=("awq", "gptq"), mixed=True, table_grids=False, trains=True,
                options_title="blockwise (reconstruction per decoder layer from awq+gptq-r)", page="docs/blockwise.md")
