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
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..calib import LayerContext, layer_output, walk_layers
from ..errors import LowbitError
from ..hardware import compute_dtype
from ..options import non_negative_int, option, positive_int
from ..quantizer import (
    SCALE_MAX,
    QTensor,
    QuantSpec,
    codes_of,
    dequantize,
    grouped,
    half_scale,
    latent_of,
    set_codes,
    set_latent,
)
from ..specmap import SpecMap, bits_per_weight, spec_for
from . import awq, gptq
from .awq import AWQConfig, AWQLayerStep
from .base import QuantReport, prepare
from .gptq import GPTQConfig, GPTQRounder, warn_if_few_tokens
from .qat import restore_flags, soft_round, ste_round, trainable_only
from .registry import Method, always
from .training import finite_mean, temperature

E2E_LOGIT_BYTES = 512 * 2**20  # float32 logits of one end-to-end step, at most
TEACHER_TOP_K = 64  # the float model's most likely next tokens kept per position for distillation
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
            if not spec.is_int:
                raise LowbitError(f"block-wise reconstruction learns codes on an integer grid; {spec.describe()} is "
                                  "not one (use int or a GGUF block type)")

    @property
    def bf16(self) -> bool:
        """Whether training runs under bfloat16 autocast (``dtype``, with auto resolved on this machine)."""
        return compute_dtype(self.dtype)[0] == "bf16"

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


# ---- one linear's weight as learnable codes -----------------------------------------------------------


def free_parameters(spec: QuantSpec) -> bool:
    """Whether training may move a grid's step sizes and offsets: lowbit's own grids, and GGUF types with float16
    block parameters (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0). K-quants' sub-block scales are integers on a super-block's
    grid: their codes move, their scales stay."""
    return spec.ggml is None or spec.ggml.super_block is None


def stored(spec: QuantSpec, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the file stores it: GGUF's legacy block parameters are float16 (rounded with a straight-through
    gradient, so training sees the values the file will hold); K-quants' stay as they are (not learned)."""
    if spec.ggml is None or spec.ggml.super_block is not None:
        return t
    return t.detach().half().float() + (t - t.detach())  # exactly the float16 value, t's gradient


def stored_scale(spec: QuantSpec, t: torch.Tensor) -> torch.Tensor:
    """A step size ``t`` as the file stores it: float16 for lowbit's integer grids too (a straight-through
    gradient, so training sees the step the file will hold; one trained beyond float16's range saturates, and the
    held-out check judges it); GGUF types as :func:`stored` says."""
    if spec.ggml is None and not (spec.zero_point == "float" and not spec.symmetric):
        return half_scale(t.detach().clamp(-SCALE_MAX, SCALE_MAX)) + (t - t.detach())
    return stored(spec, t)


class LearnedCodes(nn.Module):
    """A linear's weight as codes on its grid that training may move (a parametrization of ``weight``).

    Forward: ``q = clamp(round((ŵ₀ + v·s₀) / s + z))``, weight = ``(q - z)·s`` (or ``q·s + z`` for grids with
    a float offset), with the straight-through estimator (or soft rounding) for ``round``.
    """

    def __init__(self, qt: QTensor, learn_scale: bool, learn_zero: bool, latent: torch.Tensor | None = None) -> None:
        super().__init__()
        spec = qt.spec
        self.spec, self.shape = spec, tuple(qt.shape)
        self.float_zero = spec.zero_point == "float" and not spec.symmetric
        s0 = qt.scale.float().unsqueeze(-1)
        self.register_buffer("s0", s0)
        self.register_buffer("z0", qt.zero.float().unsqueeze(-1))
        self.register_buffer("w0", grouped(dequantize(qt).float(), spec))
        if latent is not None:  # where its nearest rounding is the code, the value the codes came from
            lat = grouped(latent.float(), spec)
            self.w0 = torch.where(self._round(lat) == grouped(qt.q.float(), spec), lat, self.w0)
        self.offset = nn.Parameter(torch.zeros_like(self.w0))
        self.log_scale = nn.Parameter(torch.zeros_like(s0), requires_grad=learn_scale)
        self.zero_shift = nn.Parameter(torch.zeros_like(s0), requires_grad=learn_zero and not spec.symmetric)
        self.temperature: float | None = None  # soft rounding's, None: the straight-through estimator
        self.hard = False  # exact nearest rounding, no gradient (held-out checks and the final codes)

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = stored_scale(self.spec, self.s0 * torch.exp(self.log_scale))
        if self.float_zero:
            return s, stored(self.spec, self.z0 + self.zero_shift * self.s0.abs())
        z = self.z0 + self.zero_shift
        if not self.spec.symmetric:
            z = torch.clamp(torch.round(z) if self.hard else ste_round(z), self.spec.qmin, self.spec.qmax)
        return s, z

    def _position(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Where ``w`` falls on the grid, in codes, clamped to the grid's range."""
        safe = torch.where(s == 0, torch.full_like(s, math.inf), s)  # a K-quant sub-block whose scale is 0
        u = (w - z) / safe if self.float_zero else w / safe + z
        return torch.clamp(u, self.spec.qmin, self.spec.qmax)

    @torch.no_grad()
    def _round(self, w: torch.Tensor) -> torch.Tensor:
        return torch.round(self._position(w, self.s0, self.z0))

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, z = self._params()
        u = self._position(self.w0 + self.offset * self.s0.abs(), s, z)
        if self.hard:
            q = torch.round(u)
        elif self.temperature is not None:
            q = soft_round(u, self.temperature)
        else:
            q = ste_round(u)
        return q, s, z

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        q, s, z = self._codes()
        w = q * s + z if self.float_zero else (q - z) * s
        return w.reshape(self.shape)

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        """The hard codes and the parameters as packing stores them."""
        hard, self.hard = self.hard, True
        try:
            q, s, z = self._codes()
        finally:
            self.hard = hard
        return QTensor(q.reshape(self.shape).to(torch.int16), s.squeeze(-1).clone(), z.squeeze(-1).clone(),
                       self.spec, self.shape)

    def state(self) -> list[torch.Tensor]:
        return [self.offset.detach().clone(), self.log_scale.detach().clone(), self.zero_shift.detach().clone()]

    @torch.no_grad()
    def load(self, state: list[torch.Tensor]) -> None:
        for p, v in zip((self.offset, self.log_scale, self.zero_shift), state):
            p.copy_(v)


def attach(linears: dict[str, nn.Linear]) -> dict[str, LearnedCodes]:
    """Parametrize each linear's weight by its recorded codes (the method before must have left them). K-quants
    keep their scales and mins (integers on a super-block's grid): only their codes move."""
    out = {}
    for name, lin in linears.items():
        qt = codes_of(lin)
        if qt is None:
            raise LowbitError(f"{name} has no codes to start from (its rounding step recorded none)")
        free = free_parameters(qt.spec)
        grid = LearnedCodes(qt, free, free, latent_of(lin))
        set_latent(lin, None)
        parametrize.register_parametrization(lin, "weight", grid, unsafe=True)
        out[name] = grid
    return out


@torch.no_grad()
def detach(linears: dict[str, nn.Linear]) -> None:
    """Write each parametrized weight's hard codes back as its weight and codes; remove the parametrization."""
    for lin in linears.values():
        grid = lin.parametrizations.weight[0]
        qt = grid.qtensor()
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        lin.weight.copy_(dequantize(qt).to(lin.weight.dtype))
        lin.weight.requires_grad_(False)
        set_codes(lin, qt)


# ---- training ------------------------------------------------------------------------------------------


class FloatParams:
    """Float parameters trained beside the codes (a layer's norm weights), with the same state interface."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params, self.hard, self.temperature = params, False, None

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def load(self, state: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, state):
            p.copy_(v)


def norm_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the normalisation modules inside ``layer`` (RMSNorm, LayerNorm, q/k norms)."""
    norms = [m for m in layer.modules()
             if m is not layer and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("Norm", "NormGated")))]
    return [p for m in norms for p in m.parameters(recurse=False)]


@dataclass
class LayerLog:
    index: int
    start: float  # held-out loss at the start (GPTQ's weights); the training loss if nothing is held out
    best: float
    best_step: int
    steps: int


def _set_mode(grids, hard: bool, temperature: float | None) -> None:
    for g in grids:
        g.hard, g.temperature = hard, temperature


@dataclass(frozen=True)
class Schedule:
    steps: int
    check_every: int
    patience: int
    batch_size: int
    holdout: int
    soft: bool = False


def fit(loss_on, n: int, grids: list[nn.Module], groups: list[dict], sched: Schedule, generator: torch.Generator,
        desc: str) -> tuple[float, float, int, int]:
    """Adam on ``loss_on(sample indices)`` over ``n`` samples; returns (start, best, best step, steps run).

    The last ``sched.holdout`` samples of a seeded order are held out: every ``check_every`` steps their loss
    under hard rounding is measured, the parameters with the lowest one (the start included) are kept, and
    training stops after ``patience`` checks without improvement. With nothing held out, the training
    samples are checked instead. The learning rates decay linearly to 0 over ``sched.steps``.
    """
    order = torch.randperm(n, generator=generator)
    hold = order[n - sched.holdout:] if 0 < sched.holdout < n else order[:0]
    train_idx = order[: n - hold.numel()]
    batch = min(sched.batch_size, train_idx.numel())

    @torch.no_grad()
    def held_out() -> float:
        _set_mode(grids, True, None)
        idx = hold if hold.numel() else train_idx
        return sum(loss_on(chunk).item() * chunk.numel() for chunk in idx.split(batch)) / idx.numel()

    opt = torch.optim.Adam(groups)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / sched.steps)  # to 0, as AutoRound's
    start = best = held_out()
    best_state, best_step, since, step = [g.state() for g in grids], 0, 0, -1
    pool = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(sched.steps), desc=desc, unit="step", leave=False)
    for step in bar:
        if pool.numel() < batch:
            pool = train_idx[torch.randperm(train_idx.numel(), generator=generator)]
        idx, pool = pool[:batch], pool[batch:]
        _set_mode(grids, False, temperature(step, sched.steps) if sched.soft else None)
        loss = loss_on(idx)
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if (step + 1) % sched.check_every == 0 or step + 1 == sched.steps:
            now = held_out()
            bar.set_postfix(held_out=f"{now:.4g}", start=f"{start:.4g}")
            if now < best:
                best, best_state, best_step, since = now, [g.state() for g in grids], step + 1, 0
            else:
                since += 1
                if since >= sched.patience:
                    break
    for g, st in zip(grids, best_state):
        g.load(st)
    _set_mode(grids, True, None)
    return start, best, best_step, step + 1


def fit_block(run, x: torch.Tensor, target: torch.Tensor, grids: list[LearnedCodes], cfg: BlockwiseConfig,
              generator: torch.Generator, desc: str = "block", norms: list[nn.Parameter] = ()
              ) -> tuple[float, float, int, int]:
    """Train ``grids`` so that ``run(x[idx])`` matches ``target[idx]`` (mean squared error); see :func:`fit`."""
    r = cfg.recipe
    sched = Schedule(r["steps"], r["check_every"], r["patience"], r["batch"], cfg.holdout, cfg.soft)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        with autocast:
            out = layer_output(run(x[idx]))
        return F.mse_loss(out.float(), target[idx].float())

    groups = [{"params": [g.offset for g in grids], "lr": cfg.lr}]
    scales = [p for g in grids for p in (g.log_scale, g.zero_shift) if p.requires_grad]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    states: list = list(grids)
    if norms and cfg.norm_lr > 0:
        groups.append({"params": list(norms), "lr": cfg.norm_lr})
        states.append(FloatParams(list(norms)))
    return fit(loss_on, x.shape[0], states, groups, sched, generator, desc)


class BlockReconstructor:
    """The rounding step of one decoder layer: GPTQ-R, then training against the float layer's outputs."""

    def __init__(self, cfg: BlockwiseConfig, gptq: GPTQRounder) -> None:
        self.cfg, self.gptq = cfg, gptq
        gptq.keep_latent = True
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.logs: list[LayerLog] = []

    def __call__(self, ctx: LayerContext, linears: dict[str, nn.Linear], spec) -> None:
        self.gptq(ctx, linears, spec)
        if ctx.inputs is None or ctx.targets is None:
            raise LowbitError("block-wise reconstruction needs the layer's calibration inputs and float outputs")
        grids = attach(linears)
        dtype = next(ctx.layer.parameters()).dtype
        x = torch.cat([b.to(dtype) for b in ctx.inputs])
        norms = norm_parameters(ctx.layer) if self.cfg.norm_lr > 0 else []
        flags = trainable_only(ctx.layer, [p for g in grids.values() for p in g.parameters() if p.requires_grad]
                               + norms)
        try:
            with torch.enable_grad():
                start, best, best_step, steps = fit_block(lambda xb: ctx.call(ctx.layer, xb), x, ctx.targets,
                                                          list(grids.values()), self.cfg, self.generator,
                                                          f"block {ctx.index}", norms)
        finally:
            restore_flags(flags)
            detach(linears)
        self.logs.append(LayerLog(ctx.index, start, best, best_step, steps))


# ---- end to end: step sizes only ----------------------------------------------------------------------


class TunedSteps(nn.Module):
    """A linear's weight from frozen codes and zero points with a learned step per group (E2E-QP)."""

    def __init__(self, qt: QTensor) -> None:
        super().__init__()
        spec = qt.spec
        self.spec, self.shape = spec, tuple(qt.shape)
        self.float_zero = spec.zero_point == "float" and not spec.symmetric
        self.register_buffer("q", grouped(qt.q.float(), spec))
        self.register_buffer("s0", qt.scale.float().unsqueeze(-1))
        self.register_buffer("z", qt.zero.float().unsqueeze(-1))
        self.log_scale = nn.Parameter(torch.zeros_like(self.s0))
        self.hard, self.temperature = False, None  # the codes are fixed: nothing to round

    def _scale(self) -> torch.Tensor:
        return stored_scale(self.spec, self.s0 * torch.exp(self.log_scale))

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        s = self._scale()
        w = self.q * s + self.z if self.float_zero else (self.q - self.z) * s
        return w.reshape(self.shape)

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        s = self._scale().squeeze(-1)
        return QTensor(self.q.reshape(self.shape).to(torch.int16), s, self.z.squeeze(-1).clone(), self.spec,
                       self.shape)

    def state(self) -> list[torch.Tensor]:
        return [self.log_scale.detach().clone()]

    @torch.no_grad()
    def load(self, state: list[torch.Tensor]) -> None:
        self.log_scale.copy_(state[0])


def e2e_batch(model: nn.Module, calib: torch.Tensor, batch_size: int) -> int:
    """Sequences per end-to-end step: the logits are the pass's largest tensor (Gemma 3's vocabulary has 262k
    entries), at most ~512 MB of them."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    return max(1, min(batch_size, E2E_LOGIT_BYTES // (4 * vocab * calib.shape[1])))


@torch.no_grad()
def teacher_top_k(model: nn.Module, calib: torch.Tensor, batch: int, k: int = TEACHER_TOP_K
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (float) model's k most likely next tokens at every calibration position: their log-probabilities
    [n, seq, k] and token ids. Kept instead of the logits (16 × 512 positions × 49k vocabulary would be 1.6 GB)."""
    was_training = model.training
    model.eval()
    values, indices = [], []
    for ids in calib.split(batch):
        logp = F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        values.append(top.values)
        indices.append(top.indices.to(torch.int32))
    model.train(was_training)
    return torch.cat(values), torch.cat(indices)


def distillation_loss(logits: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the model's next-token distribution against the teacher's, over the teacher's top k
    tokens and one bucket for all the rest, averaged over positions. The bucket matters: without it the loss
    falls when the model piles the tail's mass onto the top k, which sharpens it and costs every rarer token."""
    values, indices = teacher
    logq = F.log_softmax(logits.float(), dim=-1).gather(-1, indices.long())
    p_tail = (1 - values.exp().sum(-1)).clamp_min(0)
    logq_tail = torch.log1p(-logq.exp().sum(-1).clamp(max=1 - 1e-6))
    return -((values.exp() * logq).sum(-1) + p_tail * logq_tail).mean()


def tune_steps_e2e(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor, cfg: BlockwiseConfig,
                   teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """EfficientQAT's E2E-QP: every code and zero point frozen, each group's step size trained end to end on
    next-token loss over the calibration samples (or, given ``teacher``'s top-k log-probabilities, on
    distillation from them), the best held-out step kept. K-quants keep their scales."""
    tuned = {n: lin for n, lin in linears.items() if codes_of(lin) is not None and free_parameters(codes_of(lin).spec)}
    if not tuned:
        return {"e2e": "skipped: no linear has codes with free step sizes (K-quants' are integers)"}
    grids = []
    for lin in tuned.values():
        grids.append(TunedSteps(codes_of(lin)))
        parametrize.register_parametrization(lin, "weight", grids[-1], unsafe=True)
    params = [g.log_scale for g in grids]
    flags = trainable_only(model, params)
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)

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
            start, best, best_step, steps = fit(loss_on, calib.shape[0], grids, [{"params": params, "lr": cfg.e2e_lr}],
                                                sched, torch.Generator().manual_seed(cfg.seed + 1), "e2e step sizes")
    finally:
        restore_flags(flags)
        detach(tuned)
        model.train(was_training)
    return {"e2e_loss": "kd" if teacher is not None else "ce", "e2e_heldout_start": start, "e2e_heldout_best": best,
            "e2e_best_step": best_step, "e2e_steps": steps}


# ---- the method ----------------------------------------------------------------------------------------


def apply_blockwise(model: nn.Module, config: BlockwiseConfig, calib: torch.Tensor | None = None) -> QuantReport:
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
    free = any(free_parameters(spec_for(config.spec, name)) for name in linears)  # all K-quants: nothing to tune
    teacher = (teacher_top_k(model, calib, e2e_batch(model, calib, config.recipe["batch"]))
               if e2e_steps and free and config.e2e_loss == "kd" else None)  # from the float model, before rounding
    gptq = GPTQRounder(gptq_cfg)
    rounder = BlockReconstructor(config, gptq)
    awq = AWQLayerStep(model, family, awq_cfg, None, rounder)
    # the quantized model's hidden states in (what each layer will see), the float model's outputs as targets
    walk_layers(model, family, calib, awq, propagate="quantized", desc="blockwise", float_targets=True)
    logs = rounder.logs
    e2e = tune_steps_e2e(model, linears, calib, config, teacher) if e2e_steps else {}
    dtype, why = compute_dtype(config.dtype)
    info: dict = {"recipe": "fast" if config.fast else "default", "dtype": dtype, "dtype_reason": why,
                  "steps": sum(lg.steps for lg in logs),
                  "block_seconds": round(time.perf_counter() - started, 1),
                  "heldout_start": finite_mean(lg.start for lg in logs),
                  "heldout_best": finite_mean(lg.best for lg in logs),
                  "layers_kept_start": sum(lg.best_step == 0 for lg in logs), "awq_fallbacks": awq.found.fallbacks,
                  **gptq.info(), **e2e}
    info["layers"] = [vars(lg) for lg in logs]
    return QuantReport("blockwise", config.spec, bits_per_weight(config.spec, linears), info=info)


def build(spec, opts) -> tuple[BlockwiseConfig]:
    """Block-wise from the run's options; its start is AWQ+GPTQ-R (GPTQ with act-order, whatever the options say)."""
    start = gptq.METHOD.build(spec, opts.replace(act_order=True))[0]
    return (BlockwiseConfig(spec, awq=awq.METHOD.build(spec, opts)[0], gptq=start, seed=opts.seed,
                            **opts.for_config(BlockwiseConfig)),)


METHOD = Method("blockwise", BlockwiseConfig, apply_blockwise,
                "AWQ+GPTQ-R, then each decoder layer trained to reproduce the float one, then the model end to end "
                "(--fast: the short recipe)",
                build=build, calibrates=always, chains=("awq", "gptq"), mixed=True, trains=True,
                options_title="blockwise (reconstruction per decoder layer from awq+gptq-r)", page="docs/blockwise.md")
