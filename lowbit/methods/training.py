"""Training rounded weights: the one stack QAT and block-wise reconstruction share.

Rounding that passes a gradient (straight-through, soft with an annealed temperature, stochastic);
the learned-weight wrappers, each a parametrization of a linear's weight (QAT's float weight on a
grid with learned steps, block-wise's codes that may move, or frozen codes with learned steps for
the end-to-end pass); distillation from the float model's top-k next-token log-probabilities; and
one loop, :func:`fit`: Adam over calibration samples, either checked on held-out samples with the
best parameters kept (block-wise) or run for a fixed number of steps (QAT).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..quantizer import (
    SCALE_MAX,
    SCALE_MIN,
    QTensor,
    QuantSpec,
    codes_of,
    compute_qparams,
    dequantize,
    fake_quantize,
    grouped,
    half_scale,
    latent_of,
    set_codes,
    set_latent,
)

TEACHER_TOP_K = 64  # the float model's most likely next tokens kept per position for distillation

# ---- rounding with a gradient ------------------------------------------------------------------------


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` forward, identity backward (the straight-through estimator)."""
    return u + (torch.round(u) - u).detach()


def stochastic_ste_round(u: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased random rounding forward (up with probability frac(u)), identity backward."""
    where = generator.device if generator is not None else u.device  # a generator draws on its own device
    noise = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=where).to(u.device)
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


def temperature(step: int, steps: int, start: float = 4.0, end: float = 400.0) -> float:
    """Soft rounding's temperature at ``step`` of ``steps``: geometric from ``start`` to ``end`` (hard rounding)."""
    return start * (end / start) ** (step / max(1, steps - 1))


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite values (a layer whose training stopped on a non-finite loss reports NaN)."""
    v = [x for x in values if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


# ---- what the file stores --------------------------------------------------------------------------------


def has_float_steps(spec: QuantSpec) -> bool:
    """Whether training may move a grid's step sizes and offsets: lowbit's own grids, and GGUF types with float16
    block parameters (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0). K-quants' sub-block scales are integers on a super-block's
    grid: their codes move, their scales stay."""
    return spec.ggml is None or spec.ggml.super_block is None


def as_stored(spec: QuantSpec, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the file stores it: GGUF's legacy block parameters are float16 (rounded with a straight-through
    gradient, so training sees the values the file will hold); K-quants' stay as they are (not learned)."""
    if spec.ggml is None or spec.ggml.super_block is not None:
        return t
    return t.detach().half().float() + (t - t.detach())  # exactly the float16 value, t's gradient


def as_stored_scale(spec: QuantSpec, t: torch.Tensor) -> torch.Tensor:
    """A step size ``t`` as the file stores it: float16 for lowbit's integer grids too (a straight-through
    gradient, so training sees the step the file will hold; one trained beyond float16's range saturates, and the
    held-out check judges it); GGUF types as :func:`as_stored` says."""
    if spec.ggml is None and not (spec.zero_point == "float" and not spec.symmetric):
        return half_scale(t.detach().clamp(-SCALE_MAX, SCALE_MAX)) + (t - t.detach())
    return as_stored(spec, t)


# ---- learned weights: parametrizations of a linear's weight -----------------------------------------------


class LearnedGrid(nn.Module):
    """QAT's weight: the float weight fake-quantized on the integer grid of ``spec``, a learned step per group.

    The optimizer moves the float weight and the steps (LSQ's gradient scale on the steps). The zero point
    stays at its initial integer value (packing stores integers).
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, rounding: str, lsq: bool,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        wg = grouped(weight.detach().float(), spec)
        scale, zero = compute_qparams(wg, spec)
        self.spec, self.stochastic, self.generator = spec, rounding == "stochastic", generator
        self.shape = tuple(weight.shape)
        # The step's magnitude is learned; its sign is fixed (negative only on full-range grids, where the
        # group's positive extreme sits on the lowest code).
        self.scale = nn.Parameter(scale.squeeze(-1).abs().clone(), requires_grad=lsq)
        self.register_buffer("sign", torch.where(scale.squeeze(-1) < 0, -1.0, 1.0))
        self.register_buffer("zero", zero.squeeze(-1).clone())
        self.grad_factor = 1.0 / math.sqrt(wg.shape[-1] * spec.qmax)
        self.temperature: float | None = None  # soft rounding's, None: straight-through (or stochastic)
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
        if self.temperature is not None:
            return soft_round(u, self.temperature), s
        if self.stochastic:
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
        self.spec, self.hard, self.temperature = spec, False, None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantize(w.detach(), self.spec) - w).detach()


class LearnedCodes(nn.Module):
    """Block-wise's weight: codes on their grid that training may move, with learned steps and zero points.

    Forward: ``q = clamp(round((ŵ₀ + v·s₀) / s + z))``, weight = ``(q - z)·s`` (or ``q·s + z`` for grids with
    a float offset), with the straight-through estimator (or soft rounding) for ``round``; ``s = s₀·exp(γ)``.
    With ``frozen_codes`` the codes stay as given and only the steps learn (EfficientQAT's E2E-QP).
    """

    def __init__(self, qt: QTensor, learn_scale: bool, learn_zero: bool, latent: torch.Tensor | None = None,
                 frozen_codes: bool = False) -> None:
        super().__init__()
        spec = qt.spec
        self.spec, self.shape = spec, tuple(qt.shape)
        self.float_zero = spec.zero_point == "float" and not spec.symmetric
        s0 = qt.scale.float().unsqueeze(-1)
        self.register_buffer("s0", s0)
        self.register_buffer("z0", qt.zero.float().unsqueeze(-1))
        self.frozen = frozen_codes
        if frozen_codes:
            self.register_buffer("q", grouped(qt.q.float(), spec))
        else:
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
        s = as_stored_scale(self.spec, self.s0 * torch.exp(self.log_scale))
        if self.float_zero:
            return s, as_stored(self.spec, self.z0 + self.zero_shift * self.s0.abs())
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
        if self.frozen:
            return self.q, s, z
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
    def qtensor(self, _original: torch.Tensor | None = None) -> QTensor:
        """The hard codes and the parameters as packing stores them."""
        hard, self.hard = self.hard, True
        try:
            q, s, z = self._codes()
        finally:
            self.hard = hard
        return QTensor(q.reshape(self.shape).to(torch.int16), s.squeeze(-1).clone(), z.squeeze(-1).clone(),
                       self.spec, self.shape)


def attach_codes(linears: dict[str, nn.Linear], frozen_codes: bool = False) -> dict[str, LearnedCodes]:
    """Parametrize each linear's weight by its recorded codes (the method before must have left them). K-quants
    keep their scales and mins (integers on a super-block's grid): only their codes move."""
    out = {}
    for name, lin in linears.items():
        qt = codes_of(lin)
        if qt is None:
            raise LowbitError(f"{name} has no codes to start from (its rounding step recorded none)")
        free = has_float_steps(qt.spec)
        out[name] = LearnedCodes(qt, free, free and not frozen_codes, latent_of(lin), frozen_codes)
        set_latent(lin, None)
        parametrize.register_parametrization(lin, "weight", out[name], unsafe=True)
    return out


@torch.no_grad()
def detach(linears: dict[str, nn.Linear]) -> None:
    """Round each parametrized weight hard onto its grid, write it back with its codes (a format without codes:
    its fake-quantized value), and remove the parametrization."""
    for lin in linears.values():
        if not parametrize.is_parametrized(lin, "weight"):
            continue
        grid = lin.parametrizations.weight[0]
        qt = grid.qtensor(lin.parametrizations.weight.original.detach()) if hasattr(grid, "qtensor") else None
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=qt is None)
        if qt is not None:
            lin.weight.copy_(dequantize(qt).to(lin.weight.dtype))
            set_codes(lin, qt)
        lin.weight.requires_grad_(False)


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


# ---- distillation from the float model -------------------------------------------------------------------


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


# ---- the loop ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How :func:`fit` trains. ``check_every`` 0 is QAT's fixed-step run: no held-out split, no checks, the
    last step's parameters kept; otherwise every ``check_every`` steps the held-out loss decides."""

    steps: int
    check_every: int
    patience: int
    batch_size: int
    holdout: int
    temperatures: tuple[float, float] | None = None  # soft rounding annealed from/to; None: the grids' own
    decay: bool = True  # learning rates fall linearly to 0 over the steps (AutoRound's)
    grad_clip: float = 0.0  # gradient norm clip (0: none)


@dataclass
class FitLog:
    """One training run: the held-out loss at the start and its best (and when), the steps run, the mean
    training loss over the first and the last few steps, and why it stopped early, if it did."""

    start: float = math.nan
    best: float = math.nan
    best_step: int = 0
    steps: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    stopped: str | None = None
    losses: list[float] = field(default_factory=list)


def _set_mode(grids, hard: bool, temperature: float | None) -> None:
    for g in grids:
        g.hard, g.temperature = hard, temperature


def fit(loss_on: Callable[[torch.Tensor], torch.Tensor], n: int, groups: list[dict], sched: Schedule,
        generator: torch.Generator, desc: str, grids: Iterable[nn.Module] = ()) -> FitLog:
    """Adam on ``loss_on(sample indices)`` over ``n`` samples, for the parameters in ``groups``.

    With checks, the last ``sched.holdout`` samples of a seeded order are held out: every ``check_every``
    steps their loss under hard rounding is measured, the parameters with the lowest one (the start
    included) are kept, and training stops after ``patience`` checks without improvement (with nothing held
    out the training samples are checked). A non-finite loss stops training with the best parameters (the
    last step's whose loss was finite, without checks). ``grids`` are set to hard rounding for checks and at
    the end, and to the annealed temperature while training.
    """
    grids, params = list(grids), [p for g in groups for p in g["params"]]
    checks = sched.check_every > 0
    order = torch.randperm(n, generator=generator) if checks else torch.arange(n)
    hold = order[n - sched.holdout:] if checks and 0 < sched.holdout < n else order[:0]
    train_idx = order[: n - hold.numel()]
    batch = min(sched.batch_size, train_idx.numel())

    @torch.no_grad()
    def held_out() -> float:
        _set_mode(grids, True, None)
        idx = hold if hold.numel() else train_idx
        return sum(loss_on(chunk).item() * chunk.numel() for chunk in idx.split(batch)) / idx.numel()

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    opt = torch.optim.Adam(groups)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / sched.steps) if sched.decay else None
    log = FitLog()
    if checks:
        log.start = log.best = held_out()
    best, since, step = snapshot(), 0, -1
    pool = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(sched.steps), desc=desc, unit="step", leave=False)
    for step in bar:
        if pool.numel() < batch:
            pool = train_idx[torch.randperm(train_idx.numel(), generator=generator)]
        idx, pool = pool[:batch], pool[batch:]
        _set_mode(grids, False, temperature(step, sched.steps, *sched.temperatures) if sched.temperatures else None)
        loss = loss_on(idx)
        if not torch.isfinite(loss):
            log.stopped = f"loss became {loss.item()} at step {step}; weights restored to step {log.best_step}"
            warnings.warn(f"{desc}: {log.stopped}", stacklevel=2)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sched.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, sched.grad_clip)
        if not checks:
            best, log.best_step = snapshot(), step
        opt.step()
        if decay is not None:
            decay.step()
        log.losses.append(loss.item())
        log.steps = step + 1
        if not checks:
            bar.set_postfix(loss=f"{log.losses[-1]:.4g}")
        elif (step + 1) % sched.check_every == 0 or step + 1 == sched.steps:
            now = held_out()
            bar.set_postfix(held_out=f"{now:.4g}", start=f"{log.start:.4g}")
            if now < log.best:
                log.best, best, log.best_step, since = now, snapshot(), step + 1, 0
            else:
                since += 1
                if since >= sched.patience:
                    break
    if checks or log.stopped:
        with torch.no_grad():
            for p, value in zip(params, best):
                p.copy_(value)
    if checks:
        log.steps = step + 1  # the step a check or a non-finite loss stopped at counts
    else:
        log.best_step = log.steps
    _set_mode(grids, True, None)
    k = max(1, min(4, len(log.losses) // 4))
    if log.losses:
        log.first_loss, log.last_loss = sum(log.losses[:k]) / k, sum(log.losses[-k:]) / k
    return log
