"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Per scaling group (linears that share one input), scale input channel j by
s_j = mean|x_j|^α, normalised; multiply the weights by s and fold 1/s into the op that
produces the input, so the float model computes the same function. Salient channels
then occupy more of the integer grid. α is chosen on a grid by the output error of the
module that contains the group. Then each weight group's range is shrunk by the ratio
with the least output error (clip search), and the weights are rounded.

Grouped-query attention: v_proj produces one channel per KV head and dimension, while
o_proj reads one per *query* head. o_proj input channels of query heads that share a KV
head are tied to one scale, so 1/s can still be folded into v_proj.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..distributed import all_max, all_sum, offset, token_count, token_mean
from ..errors import LowbitError
from ..models.families import Family, ScalingGroup
from ..models.fold import Snapshot, fold_error, fold_scale, fold_tolerance, head_dim, producer, tie_index
from ..options import option, positive_int
from ..quantizer import QuantSpec, clip_range, fake_quantize
from ..specmap import SpecLike, SpecMap, bits_per_weight, layer_specs, spec_for
from ..walk import LayerContext, LayerStep, walk_layers
from .base import QuantReport, input_transform, prepare
from .registry import Method
from .rtn import Rounder, rtn_rounder

# what feeds each layer's search when the config leaves it unset: the float layers' outputs, chosen on dev text
# (bench/results/dev_choices.jsonl, search awq-propagate; AWQ+GPTQ chose otherwise, methods/awq_gptq.py)
PROPAGATE = "float"


@dataclass(frozen=True)
class AWQConfig:
    spec: QuantSpec | SpecMap  # a SpecMap rounds each linear at its own width, in the search too
    n_grid: int = option(20, "points of the α grid over [0, 1)", parse=int)
    clip: bool = option(True, "skip the weight clipping search")
    clip_grid: int = option(20, "clip ratios tried per group", parse=int)
    max_shrink: float = option(0.5, "smallest clip ratio tried is 1 - this", parse=float)
    search_samples: int = option(
        4, "α is scored by re-running attention on this many calibration sequences and the MLP on as many "
           "sequences' worth of tokens drawn from all of them (scale statistics, single-linear groups and the clip "
           "search use every token)", parse=positive_int)
    propagate: str | None = option(
        None, "search each layer on the outputs of the float layers before it (float, as llm-awq) or of the already "
              "quantized ones (quantized); unset: each method's choice on dev text (awq: float, awq+gptq: quantized; "
              "docs/design.md)", choices=("float", "quantized"))
    load_search: str | None = option(None, "apply a saved AWQ search instead of calibrating", metavar="FILE")
    save_search: str | None = option(None, "write the AWQ search (safetensors) to FILE", metavar="FILE")

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise LowbitError(f"the α grid needs at least 1 point, got {self.n_grid}")
        if self.clip_grid < 1:
            raise LowbitError(f"the clip grid needs at least 1 point, got {self.clip_grid}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise LowbitError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.propagate not in (None, "float", "quantized"):
            raise LowbitError(f"propagate must be 'float' or 'quantized', got {self.propagate!r}")


@dataclass
class AWQSearch:
    """The outcome of a search, apart from the weights: scales per group, clip ratios per linear."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.prev" -> s over the linears' inputs
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.linear" -> ratio [out, n_groups]
    alphas: dict[str, float] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        from ..atomic_write import atomic_path

        tensors = {f"scale:{k}": v.cpu().contiguous() for k, v in self.scales.items()}
        tensors.update({f"clip:{k}": v.cpu().contiguous() for k, v in self.clips.items()})
        meta = {"lowbit_awq_search": json.dumps({**self.meta, "alphas": self.alphas, "fallbacks": self.fallbacks})}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str) -> AWQSearch:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("lowbit_awq_search")
                if raw is None:
                    raise LowbitError(f"{path} is not a lowbit AWQ search file")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise LowbitError(f"cannot read search file {path}: {e}") from None
        meta = json.loads(raw)
        out = cls(alphas=meta.pop("alphas", {}), fallbacks=meta.pop("fallbacks", []), meta=meta)
        for k, v in tensors.items():
            kind, name = k.split(":", 1)
            (out.scales if kind == "scale" else out.clips)[name] = v
        return out


def model_fingerprint(model: nn.Module, family: Family, spec: SpecLike) -> dict:
    """What a search file must match: architecture, shapes, spec and a digest of the weights."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach().float()
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_layers": len(model.get_submodule(family.layers)),
        "weights_digest": round(float(emb[: min(256, emb.shape[0])].double().abs().sum()), 4),
        "spec": spec.to_dict(),
    }


def _tied_mean(x_mean: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """Average a per-consumer-channel statistic over each tie class, then spread it back."""
    sums = torch.zeros(width, dtype=x_mean.dtype, device=x_mean.device).index_add_(0, index, x_mean)
    counts = torch.zeros(width, dtype=x_mean.dtype, device=x_mean.device).index_add_(0, index, torch.ones_like(x_mean))
    return (sums / counts.clamp(min=1))[index]


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X / T over all tokens: the mean squared output error of a weight change D is
    sum((D @ G) * D) / out, so candidates can be scored on every token at the cost of one
    [out, in] x [in, in] product instead of a pass over the data."""
    xt = x.reshape(-1, x.shape[-1]).float()
    return all_sum(xt.T @ xt) / token_count(xt)  # over every data-parallel worker's tokens


class Grams:
    """Gram matrices of one layer's linear inputs, each computed once.

    Linears that share an input share its matrices; when a scale s is folded into an input
    (x -> x / s) its full Gram matrix becomes G / (s s^T) without another pass over the tokens.
    """

    def __init__(self) -> None:
        self._full: dict[int, torch.Tensor] = {}
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}

    def full(self, x: torch.Tensor) -> torch.Tensor:
        if id(x) not in self._full:
            self._full[id(x)] = gram(x)
        return self._full[id(x)]

    def divided(self, x: torch.Tensor, s: torch.Tensor) -> None:
        """Record that ``x`` was divided by ``s`` channel-wise."""
        g = self._full.get(id(x))
        if g is not None:
            sf = s.float()
            g.div_(sf[:, None] * sf[None, :])
        self._blocks = {k: v for k, v in self._blocks.items() if k[0] != id(x)}

    def blocks(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """[n_groups, group, group]: the Gram matrix of each run of ``group`` input channels."""
        key = (id(x), group)
        if key not in self._blocks:
            g = self._full.get(id(x))
            n = x.shape[-1] // group
            if g is not None:
                self._blocks[key] = g.view(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
            else:
                xt = x.reshape(-1, x.shape[-1]).float().view(-1, n, group)
                self._blocks[key] = all_sum(torch.einsum("tgk,tgl->gkl", xt, xt)) / token_count(xt.flatten(1))
        return self._blocks[key]


def search_inputs(x: torch.Tensor, n_samples: int, token_wise: bool, seed: int = 0) -> torch.Tensor:
    """The inputs that score α: ``n_samples`` whole sequences for a module that mixes tokens
    (attention), or as many tokens drawn from all sequences for a token-wise one (an MLP),
    which estimates the error better for the same work since neighbouring tokens are alike.

    A data-parallel worker holding sequences ``start`` onwards of all of them returns its part of the same draw.
    """
    local, seq, width = x.shape
    start, n = offset(local)
    if n_samples >= n:
        return x
    if not token_wise:
        return x[: max(0, n_samples - start)]
    pick = torch.randperm(n * seq, generator=torch.Generator().manual_seed(seed))[: n_samples * seq].sort().values
    if local == n:
        return x.reshape(-1, width)[pick.to(x.device)].view(n_samples, seq, width)
    mine = pick[(pick >= start * seq) & (pick < (start + local) * seq)] - start * seq
    return x.reshape(-1, width)[mine.to(x.device)].view(1, -1, width)  # token-wise: any shape of batch


def _gathered(xs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Every data-parallel worker's part of the search inputs ``xs``, in one process's order and shape (token-wise
    parts are [1, tokens, width]; the whole draw is whole sequences of ``x``'s length)."""
    if not distributed.active():
        return xs
    return distributed.gather_rows(xs.reshape(-1, x.shape[-1])).view(-1, x.shape[1], x.shape[-1])


def _run(ctx: LayerContext, module: str, x: torch.Tensor) -> torch.Tensor:
    """``ctx.run``, or nothing for a data-parallel worker that holds none of the search's inputs."""
    return ctx.run(module, x) if x.numel() else x.new_zeros(0)


@torch.no_grad()
def search_scale(
    ctx: LayerContext, group: ScalingGroup, cfg: AWQConfig, index: torch.Tensor, width: int, grams: Grams,
    specs: SpecLike | None = None,
):
    """Best α and its scale for ``group``; (None, None, reason) when no candidate is usable.

    ``specs`` (default ``cfg.spec``) gives each linear of the layer its own spec, by its name
    in the layer: linears of one group at different widths are each rounded at theirs.

    A group whose inspected module is its single linear is scored exactly on all tokens
    through the Gram matrix; other modules (attention, MLP) are re-run on the equivalent
    of ``cfg.search_samples`` sequences (see :func:`search_inputs`).
    """
    x = ctx.group_input(group)
    x_mean = _tied_mean(token_mean(x.abs().reshape(-1, x.shape[-1]).float()), index, width)
    linears = [ctx.layer.get_submodule(n) for n in group.linears]
    own = [spec_for(cfg.spec if specs is None else specs, n) for n in group.linears]
    originals = [lin.weight.detach().clone() for lin in linears]
    # scored on the linears' own outputs: a single linear, or linears with no common module to re-run
    single = group.inspect == "" or (len(linears) == 1 and group.inspect == group.linears[0])
    if single:
        tokens = x.reshape(-1, x.shape[-1]).float()
        # score through the Gram matrix (in x in) unless there are fewer tokens than inputs
        # (a 7B down_proj with a small calibration set): then D X^T is the cheaper product
        g = grams.full(x) if token_count(tokens) >= tokens.shape[1] else None
    else:
        xs = _gathered(search_inputs(x, cfg.search_samples, group.token_wise, seed=ctx.index), x)
        ref = _run(ctx, group.inspect, xs)
    alphas = torch.arange(cfg.n_grid, dtype=torch.float32, device=x.device) / cfg.n_grid
    scales = x_mean[None, :].pow(alphas[:, None]).clamp(min=1e-4)  # [n_grid, in], all candidates
    scales = scales / (scales.amax(1, keepdim=True) * scales.amin(1, keepdim=True)).sqrt()
    try:
        if single:  # many candidates at once: D = Q(W s)/s - W, loss = tr(D G D^T) / out
            def scored(candidates: torch.Tensor) -> torch.Tensor:
                return sum(torch.cat([single_linear_losses(w0.float(), g, part, spec, tokens)
                                      for part in candidates.split(_candidates_per_chunk(w0.numel(), cfg.n_grid))])
                           for w0, spec in zip(originals, own))

            # through G every worker can score any candidate, so each scores its share of them; without G the
            # workers score every candidate on their own tokens
            losses = scored(scales) if g is None else distributed.split_rows(scored, scales)
        else:  # every worker holds the whole draw of search inputs and re-runs the module for its candidates
            def rerun(candidates: torch.Tensor) -> torch.Tensor:
                out = torch.full((len(candidates),), math.inf, device=x.device)
                for i, s in enumerate(candidates):
                    if not torch.isfinite(s).all():
                        continue
                    for lin, w, spec in zip(linears, originals, own):
                        lin.weight.copy_(fake_quantize(w * s, spec) / s)
                    out[i] = (_run(ctx, group.inspect, xs) - ref).float().pow(2).mean()
                return out

            losses = distributed.split_rows(rerun, scales)
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf))
    k = int(losses.argmin())
    if not math.isfinite(losses[k].item()):
        return None, None, "every α gave a non-finite error"
    return alphas[k].item(), scales[k], None


# Candidate scales scored together in one batched product; bounds the search's memory at
# ~4 x this many float32 elements (256 MiB); 1 << 26 (1 GiB) put the 1.1B shape's peak above 3 GiB.
# A candidate is one product at least as wide as the weight, so smaller chunks cost no speed.
SEARCH_CHUNK_ELEMENTS = 1 << 24


def _candidates_per_chunk(weights: int, n_grid: int) -> int:
    return max(1, min(n_grid, SEARCH_CHUNK_ELEMENTS // max(1, weights)))


def single_linear_losses(w0: torch.Tensor, g: torch.Tensor | None, scales: torch.Tensor, spec: QuantSpec,
                   tokens: torch.Tensor) -> torch.Tensor:
    """tr(D G D^T) / out for each candidate scale (a row of ``scales``) of a single linear; without
    ``g``, the same as ||D X^T||^2 / (T out) on the ``tokens`` X [T, in]."""
    scaled = (w0[None] * scales[:, None, :]).reshape(-1, w0.shape[1])  # rows keep their own groups
    d = fake_quantize(scaled, spec).view(len(scales), *w0.shape) / scales[:, None, :] - w0[None]
    if g is None:
        return all_sum((d @ tokens.T).pow(2).sum((1, 2))) / (d.shape[1] * token_count(tokens))
    return ((d @ g) * d).sum((1, 2)) / d.shape[1]


@torch.no_grad()
def search_clip(lin: nn.Linear, grams: torch.Tensor, cfg: AWQConfig, spec: QuantSpec | None = None) -> torch.Tensor:
    """Per (output channel, group) shrink ratio of the range with the least output error.

    The error of group g of output o is d^T G_g d with ``grams[g]`` that group's input Gram
    matrix, so every ratio is scored on all calibration tokens for O(out * in * group) work.
    """
    spec = cfg.spec if spec is None else spec
    w = lin.weight.detach().float()
    if spec.granularity == "tensor":
        return _clip_ratios(w, grams, cfg, spec)
    return distributed.split_rows(lambda rows: _clip_ratios(rows, grams, cfg, spec), w)  # each worker its rows


def _clip_ratios(w: torch.Tensor, grams: torch.Tensor, cfg: AWQConfig, spec: QuantSpec) -> torch.Tensor:
    out_f, in_f = w.shape
    n_groups = grams.shape[0]
    wg = w.view(out_f, n_groups, in_f // n_groups)
    n_steps = max(1, round(cfg.clip_grid * cfg.max_shrink))
    best_err = torch.full((out_f, n_groups), math.inf, device=w.device)
    best_ratio = torch.ones(out_f, n_groups, device=w.device)
    for i in range(n_steps):
        ratio = 1.0 - i / cfg.clip_grid
        d = fake_quantize(w, spec, clip_ratio=ratio).view_as(wg) - wg
        err = torch.einsum("ogk,gkl,ogl->og", d, grams, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def _group_width(spec: QuantSpec, in_features: int) -> int:
    return spec.group_size if spec.granularity == "group" else in_features


@torch.no_grad()
def apply_clip(lin: nn.Linear, ratio: torch.Tensor, spec: QuantSpec) -> None:
    """Clamp each weight group to its shrunk range, so later rounding uses that range."""
    w = lin.weight
    out_f, in_f = w.shape
    wg = w.view(out_f, -1, _group_width(spec, in_f))
    lo, hi = clip_range(wg, spec.symmetric, ratio.to(w.dtype).unsqueeze(-1))
    w.copy_(torch.maximum(torch.minimum(wg, hi), lo).view_as(w))


class AWQLayerStep:
    """AWQ on one decoder layer at a time: scales folded, clips applied, then ``rounder``.

    Every fold is checked before it is kept: the float layer's output at every position of up to 8
    calibration sequences must not move (beyond float rounding, relative to that position's own norm),
    else the group keeps s = 1 and the report says why.
    The in-memory walk (:func:`apply_awq`) and the streamed one (:mod:`lowbit.stream`) both call it.
    """

    def __init__(self, model: nn.Module, family: Family, cfg: AWQConfig, search: AWQSearch | None = None,
                 rounder: Rounder = rtn_rounder):
        if not family.groups and not family.trace_norm_groups:
            raise LowbitError(f"{family.name} declares no scaling groups; AWQ needs them")
        self.cfg = cfg
        self.rounder = rounder
        self.family = family
        self.model = model
        self.head_dim = head_dim(model)
        self.loaded = search
        self.found = AWQSearch()
        self.groups: tuple[ScalingGroup, ...] = ()
        self.unclipped: list[str] = []  # linears with no calibration tokens (experts never routed to)

    def _fold(self, ctx: LayerContext, group: ScalingGroup, key: str, grams: Grams, specs, check) -> None:
        layer = ctx.layer
        linears = [layer.get_submodule(n) for n in group.linears]
        readers = [layer.get_submodule(n) for n in group.readers]
        unit = torch.ones(linears[0].in_features, device=ctx.device)
        self.found.scales[key] = unit  # until a scale is found and passes its check

        def fallback(why: str) -> None:
            self.found.fallbacks.append(f"{key}: {why}")
            if self.loaded is None:
                self.found.alphas[key] = -1.0

        changed = [t for t in map(input_transform, linears) if t]
        if changed:  # a scale folded into prev would be mixed by the change, not undone
            return fallback(f"input changed at run time ({changed[0]}); no scale")
        try:
            prod = producer(layer.get_submodule(group.prev), group.part, linears[0].in_features, self.model,
                            self.family.norm_offset)
            index = tie_index(prod.width, linears[0].in_features, self.head_dim, ctx.device)
        except LowbitError as e:
            return fallback(f"{e}; no scale")
        if self.loaded is not None:
            s = self.loaded.scales.get(key)
            if s is None:
                raise LowbitError(f"search file has no scale for {key}; it was made for another model")
            s = s.to(ctx.device)
        elif token_count(ctx.group_input(group)) == 0:
            return fallback("no calibration token reached it (an expert never routed to); kept s=1")
        else:
            alpha, s, why = search_scale(ctx, group, self.cfg, index, prod.width, grams, specs)
            if s is None:
                return fallback(f"{why}; kept s=1")
            self.found.alphas[key] = alpha
        snapshot = Snapshot([prod.module, *linears, *readers])
        fold_scale(prod, linears, s, index, readers)
        why = check() if check is not None else None
        if why is not None:
            snapshot.restore()
            return fallback(f"folding the scale changed the float layer's output ({why}); kept s=1")
        self.found.scales[key] = s
        divided: set[int] = set()
        for x in (ctx.module_inputs.get(group.inspect), *(ctx.linear_inputs.get(n) for n in group.linears)):
            if x is not None and id(x) not in divided:
                divided.add(id(x))
                x.div_(s.to(x.dtype))
                grams.divided(x, s)

    def _checker(self, ctx: LayerContext, samples: int = 8):
        """A function that says why the layer's float output moved since now, or None: position by position,
        on the first ``samples`` calibration sequences (all the context has, up to ``samples`` sequences' layer run
        per fold; the search before it runs a module on search_samples sequences per α of the grid)."""
        if ctx.call is None or ctx.inputs is None:
            return None
        if distributed.active():  # a data-parallel worker checks its part of the first ``samples`` sequences
            samples = max(0, samples - offset(sum(b.shape[0] for b in ctx.inputs))[0])
        chunks, n = [], 0
        for batch in ctx.batches():
            if n >= samples:
                break
            chunks.append(batch[: samples - n])
            n += chunks[-1].shape[0]
        if not distributed.active() and not n:
            return None
        x = torch.cat(chunks) if n else None
        ref = ctx.run_layer(x) if n else None
        tol = fold_tolerance(next(ctx.layer.parameters()).dtype)

        def check() -> str | None:
            err = all_max(fold_error(ref, ctx.run_layer(x)) if n else 0.0)
            return None if err <= tol else f"relative change {err:.2g} > {tol:g} at its worst position"

        return check

    def __call__(self, ctx: LayerContext) -> None:
        cfg, layer = self.cfg, ctx.layer
        if not ctx.groups:
            raise LowbitError(
                f"{self.family.name}: no scaling groups declared or found (no norm feeds the linears); "
                "declare them in lowbit/models/families.py"
            )
        self.groups = ctx.groups
        specs = layer_specs(cfg.spec, f"{self.family.layers}.{ctx.index}.")
        grams = Grams()
        check = self._checker(ctx)
        for group in ctx.groups:
            self._fold(ctx, group, f"{ctx.index}.{group.prev}", grams, specs, check)
        for rel in self.family.linears:
            key = f"{ctx.index}.{rel}"
            lin, spec = layer.get_submodule(rel), spec_for(specs, rel)
            ratio = None
            if self.loaded is not None:
                ratio = self.loaded.clips.get(key)
                ratio = None if ratio is None else ratio.to(ctx.device)
            elif cfg.clip and rel not in self.family.unclipped:  # q and k stay unclipped (Family.unclipped)
                x = ctx.linear_inputs.get(rel)
                if token_count(x) == 0:
                    self.unclipped.append(key)
                else:
                    ratio = search_clip(lin, grams.blocks(x, _group_width(spec, lin.in_features)), cfg, spec)
            if ratio is not None:
                self.found.clips[key] = ratio
                apply_clip(lin, ratio, spec)
        self.rounder(ctx, {rel: layer.get_submodule(rel) for rel in self.family.linears}, specs)


def apply_awq(model: nn.Module, config: AWQConfig, calib: torch.Tensor | None = None,
              rounder: Rounder | None = None, device: torch.device | None = None) -> QuantReport:
    """AWQ scales (+ clips), then ``rounder`` (default RTN) on each layer, each on the execution ``device``;
    a custom rounder is given the captured inputs, so it calibrates even with a loaded search."""
    family, linears = prepare(model, config.spec)
    fingerprint = model_fingerprint(model, family, config.spec)
    loaded = None
    if config.load_search:
        loaded = AWQSearch.load(config.load_search)
        if loaded.meta.get("fingerprint") != fingerprint:
            raise LowbitError(
                f"search file {config.load_search} was made for another model or spec "
                f"({_mismatch(loaded.meta.get('fingerprint') or {}, fingerprint)})"
            )
    processor = AWQLayerStep(model, family, config, loaded, rounder or rtn_rounder)
    if loaded is not None and rounder is None:
        _apply_without_calibration(model, family, processor, device)
    else:
        if calib is None:
            raise LowbitError("AWQ needs calibration samples (or --load-search FILE)")
        walk_layers(model, family, calib, processor, propagate=config.propagate or PROPAGATE, desc="awq",
                    device=device)
    found = processor.found
    found.meta = {
        "fingerprint": fingerprint,
        "groups": [[g.prev, list(g.linears), g.inspect, g.part, list(g.readers)] for g in processor.groups],
        "config": {k: v for k, v in vars(config).items() if k not in ("spec", "load_search", "save_search")},
    }
    if config.save_search and distributed.is_writer():  # one data-parallel worker writes
        found.save(config.save_search)
    info = {"alphas": found.alphas, "fallbacks": found.fallbacks, "groups": len(found.scales),
            "unclipped": processor.unclipped, "search": found}
    return QuantReport("awq", config.spec, bits_per_weight(config.spec, linears), info=info)


def layer_step(model: nn.Module, family: Family, config: AWQConfig, rounder: Rounder = rtn_rounder) -> LayerStep:
    """AWQ on one layer of the walk (scales, clips, then ``rounder``), without a saved search."""
    return LayerStep(AWQLayerStep(model, family, config, None, rounder), config.propagate or PROPAGATE)


def _apply_without_calibration(model: nn.Module, family: Family, processor: AWQLayerStep,
                               device: torch.device | None) -> None:
    groups = tuple(ScalingGroup(prev, tuple(lins), insp, part=part, readers=tuple(readers))
                   for prev, lins, insp, *rest in processor.loaded.meta.get("groups", [])
                   for part, readers in [rest if rest else (None, ())])
    walk_layers(model, family, None, processor, groups=groups, desc="awq (loaded search)", device=device)


def _mismatch(a: dict, b: dict) -> str:
    diffs = [f"{k}: file {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "unknown difference"


METHOD = Method("awq", AWQConfig, apply_awq, "scale the salient input channels before rounding (activation-aware)",
                build=lambda spec, opts: (AWQConfig(spec, **opts.for_config(AWQConfig)),),
                calibrates=lambda config: config.load_search is None, mixed=True, streams=True,
                layer_step=layer_step, data_parallel=True,
                page="docs/design.md")
