"""How much each linear's rounding hurts: Hessian traces (HAWQ) and measured loss changes.

Both are measured on calibration text (never the evaluation text).

- **Hessian trace** by Hutchinson's estimator: for Rademacher vectors v (entries ±1),
  E[vᵀHv] = tr(H). Hv comes from differentiating the gradient once more (a Hessian-vector
  product, no Hessian is formed); one probe gives an estimate for every linear at once,
  from one forward and two backward passes. trace/n, the mean eigenvalue, says how sharply
  the loss rises when that linear's weights move (HAWQ-v2).
- **Loss change** when one linear (or one decoder layer) alone is rounded to b bits, the
  rest left in float: the direct measure the trace stands in for. Inputs of every decoder
  layer are computed once, so each measurement re-runs only the layers from that linear's on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import LowbitError
from .models.families import family_for
from .models.inventory import check_finite, quantizable_linears
from .quantizer import QuantSpec, fake_quantize
from .walk import first_layer_inputs, layer_output

FORMAT = "lowbit-sensitivity"


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on token samples [n, seq]."""
    logits = model(ids.to(next(model.parameters()).device), use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device))


def probe_sums(loss_fn, params: Sequence[torch.Tensor], probes: int, generator: torch.Generator,
               on_probe=None) -> torch.Tensor:
    """Σ over ``probes`` Rademacher vectors v of vᵀ(∂²L/∂p²)v, for each tensor p of ``params``.

    One graph of the gradient serves every probe; each probe is one more backward pass through it
    and gives an estimate for every tensor at once (v covers them all; the cross terms between
    tensors are what vᵀHv of the whole vector would add, and are not taken).
    """
    sums = torch.zeros(len(params), dtype=torch.float64)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        for k in range(probes):
            vs = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=k < probes - 1)
            sums += torch.stack([(v * hv).sum().double() for v, hv in zip(vs, hvs)])
            if on_probe is not None:
                on_probe()
    return sums


def hutchinson_traces(model: nn.Module, samples: torch.Tensor, probes: int = 4, batch_size: int = 1,
                      seed: int = 0, progress: bool = True) -> dict[str, float]:
    """tr(∂²L/∂W²) of each quantizable linear's weight, L the mean calibration loss.

    Each batch of samples gives one gradient graph; every probe reuses it (one more backward
    each). Estimates of all batches and probes are averaged, so the result is the trace of
    the Hessian of the loss over all ``samples``.
    """
    if probes < 1:
        raise LowbitError(f"Hutchinson's estimator needs at least 1 probe, got {probes}")
    linears = quantizable_linears(model, family_for(model))
    check_finite(model)
    params = [m.weight for m in linears.values()]
    flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    sums = torch.zeros(len(params), dtype=torch.float64)
    batches = samples.split(batch_size)
    # The fused CPU attention kernels have no double backward; the eager path is the same function.
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None:
        model.config._attn_implementation = "eager"
    bar = tqdm(total=len(batches) * probes, desc="hutchinson", unit="probe", disable=not progress, leave=False)
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            sums += probe_sums(lambda batch=batch: lm_loss(model, batch), params, probes, gen, bar.update)
    finally:
        bar.close()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        if attn is not None:
            model.config._attn_implementation = attn
    est = sums / (len(batches) * probes)
    if not torch.isfinite(est).all():
        raise LowbitError("the Hessian trace estimate is not finite; check the model and calibration text")
    return {n: float(t) for n, t in zip(linears, est)}


class Suffix:
    """Each decoder layer's input on the samples (from the float model), so a change inside layer i
    is scored by running layers i.. and the head only."""

    def __init__(self, model: nn.Module, samples: torch.Tensor) -> None:
        self.family = family_for(model)
        self.model, self.samples = model, samples
        self.layers = model.get_submodule(self.family.layers)
        h, self.calls = first_layer_inputs(model, self.family, samples, batch_size=len(samples))
        self.inputs = [h]
        for layer, call in zip(self.layers, self.calls):
            self.inputs.append(layer_output(call(layer, self.inputs[-1])))

    def logits(self, start: int, h: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits [n, seq, vocab] (float32) with layers from ``start`` on recomputed (from ``h`` in
        place of the stored input of layer ``start``)."""
        h = self.inputs[start] if h is None else h
        for layer, call in zip(self.layers[start:], self.calls[start:]):
            h = layer_output(call(layer, h))
        h = self.model.get_submodule(self.family.final_norm)(h)
        return self.model.get_submodule(self.family.head)(h).float()

    def loss(self, start: int) -> float:
        """Calibration loss with layers from ``start`` on recomputed."""
        logits = self.logits(start)[:, :-1]
        ids = self.samples[:, 1:].to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).item()


@torch.no_grad()
def loss_deltas(model: nn.Module, samples: torch.Tensor, base: QuantSpec, bits: Sequence[int] = (3,),
                unit: str = "linear", progress: bool = True) -> tuple[float, dict[str, dict[int, float]]]:
    """(float loss, {linear or layer name: {bits: loss change when it alone is rounded (RTN)}}).

    ``unit="layer"`` rounds all quantized linears of one decoder layer together. Weights are
    restored in place after each measurement.
    """
    if unit not in ("linear", "layer"):
        raise LowbitError(f"unit must be 'linear' or 'layer', got {unit!r}")
    family = family_for(model)
    linears = quantizable_linears(model, family)
    check_finite(model)
    suffix = Suffix(model, samples)
    base_loss = suffix.loss(len(suffix.layers))
    layer_of = {n: int(n[len(family.layers) + 1:].split(".")[0]) for n in linears}
    units: dict[str, list[str]] = {}
    for name in linears:
        units.setdefault(name if unit == "linear" else f"{family.layers}.{layer_of[name]}", []).append(name)
    out: dict[str, dict[int, float]] = {}
    bar = tqdm(total=len(units) * len(bits), desc="loss change", unit="fwd", disable=not progress, leave=False)
    try:
        for key, names in units.items():
            start = layer_of[names[0]]
            originals = [linears[n].weight.detach().clone() for n in names]
            out[key] = {}
            for b in bits:
                spec = replace(base, bits=b)
                for n in names:
                    linears[n].weight.copy_(fake_quantize(linears[n].weight, spec))
                out[key][b] = suffix.loss(start) - base_loss
                for n, w in zip(names, originals):
                    linears[n].weight.copy_(w)
                bar.update()
    finally:
        bar.close()
    return base_loss, out


def sensitivity_table(model: nn.Module, samples: torch.Tensor, base: QuantSpec, bits: Sequence[int] = (3,),
                      probes: int = 4, seed: int = 0, delta_samples: torch.Tensor | None = None,
                      deltas: bool = True, progress: bool = True) -> dict:
    """Both measures for every quantizable linear, as one JSON-ready document. Traces are estimated on
    ``samples``, loss changes measured on ``delta_samples`` (default the same)."""
    from .allocation import rounding_errors

    linears = quantizable_linears(model, family_for(model))
    traces = hutchinson_traces(model, samples, probes, seed=seed, progress=progress)
    ds = samples if delta_samples is None else delta_samples
    base_loss, measured = loss_deltas(model, ds, base, bits, progress=progress) if deltas else (None, {})
    errs = rounding_errors(linears, base, list(bits))
    rows = []
    for i, (name, lin) in enumerate(linears.items()):
        n = lin.weight.numel()
        row = {"name": name, "params": n, "trace": traces[name], "mean_eig": traces[name] / n}
        for j, b in enumerate(bits):
            row[f"hawq_{b}"] = max(traces[name], 0.0) / n * float(errs[i, j])
            if name in measured:
                row[f"dloss_{b}"] = measured[name][b]
        rows.append(row)
    return {"format": FORMAT, "base_spec": base.to_dict(), "bits": list(bits), "probes": probes,
            "samples": list(samples.shape), "delta_samples": list(ds.shape) if deltas else None,
            "float_loss": base_loss, "rows": rows}


def load_table(path: str | Path) -> dict:
    from .atomic_write import read_document

    return read_document(path, FORMAT, "a lowbit sensitivity table (from lowbit sensitivity -o)")


def table_traces(doc: dict) -> dict[str, float]:
    return {r["name"]: float(r["trace"]) for r in doc["rows"]}


def table_deltas(doc: dict) -> dict[str, dict[int, float]]:
    return {r["name"]: {int(k[6:]): v for k, v in r.items() if k.startswith("dloss_")} for r in doc["rows"]}


def save_chart(doc: dict, path: str | Path, title: str = "") -> None:
    """Bars per linear, in model order: mean Hessian eigenvalue (log scale) and the measured loss changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in rows}, key=[r["name"].rsplit(".", 1)[-1] for r in rows].index)
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    c = [colors[r["name"].rsplit(".", 1)[-1]] for r in rows]
    x = list(range(len(rows)))
    measured = [b for b in doc["bits"] if any(f"dloss_{b}" in r for r in rows)]
    fig, axes = plt.subplots(1 + len(measured), 1, figsize=(max(8, len(rows) * 0.06), 3 + 2.5 * len(measured)),
                             sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.bar(x, [max(r["mean_eig"], 1e-12) for r in rows], color=c, width=1.0)
    ax.set_yscale("log")
    ax.set_ylabel("trace(H) / n")
    ax.set_title(title or f"Sensitivity per linear ({doc['probes']} Hutchinson probes, calibration "
                          f"{' x '.join(map(str, doc['samples']))} tokens)")
    for k, b in enumerate(measured, start=1):
        a = axes[k, 0]
        a.bar(x, [r[f"dloss_{b}"] for r in rows], color=c, width=1.0)
        a.set_ylabel(f"loss change, W{b} alone")
    per_layer = max(1, len(kinds))
    axes[-1, 0].set_xticks(x[::per_layer], [str(i) for i in range(len(x[::per_layer]))], fontsize=6)
    axes[-1, 0].set_xlabel("decoder layer (bars: its linears in order)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    axes[0, 0].legend(handles, kinds, fontsize=7, ncol=min(7, len(kinds)), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)

