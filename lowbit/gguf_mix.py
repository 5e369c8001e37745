"""A GGUF file at the size a user names: each linear's block type chosen by measured sensitivity under a budget.

llama.cpp's recipes give every tensor a type by fixed rules. Here each quantizable linear and each GGUF type its
rows allow is *measured*: the KL divergence of the model's next-token distribution to the float model's when
that linear alone is rounded onto that type (llama.cpp's importance-weighted fit, the mean x² of its inputs on
the calibration windows), on dev windows (WikiText-2 validation's dev part; never test text), re-running only
the layers from that linear's on. Taking the changes as additive, one type per linear minimising the summed KLD
under a byte budget is a multiple-choice knapsack, solved exactly by :func:`lowbit.allocation.allocate`. The
measurements (a sensitivity file) are made once per model and reused for any budget; the chosen mix is written
as ``llama-quantize --tensor-type-file`` lines so llama.cpp's own tools can reproduce it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .atomic_write import read_document, write_document
from .errors import LowbitError
from .formats.ggml import GGML_TYPES, GGMLType
from .quantizer import QuantSpec, dequantize, quantize
from .specmap import SpecMap

# Every type lowbit writes, narrowest first: a linear may take any of them that its rows allow.
CANDIDATES = ("q1_0", "q2_0", "q2_k", "q3_k", "iq4_xs", "q4_0", "q4_k", "iq4_nl", "q4_1", "q5_0", "q5_k", "q5_1",
              "q6_k", "q8_0")
FORMAT = "lowbit-gguf-sensitivity"


def check_types(names: Sequence[str]) -> tuple[str, ...]:
    """Distinct known GGUF type names (lower case), in :data:`CANDIDATES` order; one clear line otherwise."""
    wanted = {str(n).lower() for n in names}
    unknown = sorted(wanted - set(CANDIDATES))
    if unknown or not wanted:
        raise LowbitError(f"unknown GGUF type {', '.join(u.upper() for u in unknown) or '(none given)'}; lowbit writes "
                          f"{', '.join(t.upper() for t in CANDIDATES)}")
    return tuple(t for t in CANDIDATES if t in wanted)


def tensor_bytes(t: GGMLType, shape: Sequence[int]) -> int:
    """Bytes of a [rows, cols] matrix of type ``t`` in a GGUF file (blocks of ``t.span`` weights per row)."""
    rows, cols = int(shape[0]), int(shape[1])
    return rows * (cols // t.span) * t.type_size


def fitting(types: Sequence[str], width: int) -> list[str]:
    """The types whose block (or super-block) divides a row of ``width`` weights."""
    return [t for t in types if width % GGML_TYPES[t].span == 0]


@dataclass
class Sensitivity:
    """KLD to the float model of each linear alone on each type (nats, mean over the dev positions)."""

    shapes: dict[str, tuple[int, int]]
    kld: dict[str, dict[str, float]]  # linear (or embedding) -> type -> KLD
    meta: dict = field(default_factory=dict)

    @property
    def embeddings(self) -> list[str]:
        """The embedding and an untied output head, if they were measured (their names are in ``shapes`` too)."""
        return list(self.meta.get("embeddings", []))

    def without_embeddings(self) -> Sensitivity:
        """The linears' measurements alone (the embedding's storage then fixed by ``--embed``)."""
        drop = set(self.embeddings)
        return Sensitivity({n: s for n, s in self.shapes.items() if n not in drop},
                           {n: k for n, k in self.kld.items() if n not in drop},
                           {k: v for k, v in self.meta.items() if k != "embeddings"})

    def save(self, path: str | Path) -> None:
        write_document(path, {"format": FORMAT, **self.meta, "shapes": {n: list(s) for n, s in self.shapes.items()},
                              "kld": self.kld})

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        doc = read_document(path, FORMAT, "a lowbit GGUF sensitivity file (from --save-gguf-sensitivity)")
        shapes = {n: tuple(s) for n, s in doc.pop("shapes").items()}
        kld = doc.pop("kld")
        doc.pop("format")
        return cls(shapes, kld, doc)

    def check_model(self, linears: Mapping[str, nn.Linear], types: Sequence[str],
                    embeddings: Mapping[str, nn.Module] | None = None) -> None:
        """Refuse measurements of another model, or that lack a type the allocation may choose (a file measured
        without the embeddings is still this model's)."""
        shapes = {n: tuple(lin.weight.shape) for n, lin in linears.items()}
        mine = {n: s for n, s in self.shapes.items() if n not in self.embeddings}
        if embeddings is not None:  # the embeddings the file measured must be this model's too
            shapes.update({n: tuple(m.weight.shape) for n, m in embeddings.items() if n in self.embeddings})
            mine = self.shapes
        if shapes != mine:
            raise LowbitError("the GGUF sensitivity file was measured on another model (its linears or shapes "
                              "differ); measure again without it or give the right file")
        missing = sorted({t for n, (_, cols) in shapes.items() for t in fitting(types, cols)
                          if t not in self.kld.get(n, {})})
        if missing:
            raise LowbitError(f"the GGUF sensitivity file has no measurements for {', '.join(missing)}; measure "
                              "again with those types")


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding and, if it has its own weight, the output head: the tensors besides the linears a
    GGUF file quantizes (a tied head is the embedding's tensor: llama.cpp's ``token_embd``)."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out = {names[id(emb)]: emb}
    if head is not None and head.weight is not emb.weight:
        out[names[id(head)]] = head
    return out


@torch.no_grad()
def channel_importances(model: nn.Module, linears: Mapping[str, nn.Linear], calib: torch.Tensor,
                        batch_size: int = 1) -> dict[str, torch.Tensor]:
    """The mean x² per input channel of every linear over the calibration tokens of every data-parallel worker
    (llama-imatrix's statistic, :func:`lowbit.methods.imatrix.channel_importance`, over whole-model forwards)."""
    from .distributed import all_sum

    sums = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in linears.items()}
    count = [0]

    def hook(name):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.pow(2).sum(0).cpu()
        return record
    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
    try:
        for i in range(0, len(calib), batch_size):
            batch = calib[i:i + batch_size]
            model(batch.to(next(model.parameters()).device), use_cache=False)
            count[0] += batch.numel()
    finally:
        for h in handles:
            h.remove()
    names = list(sums)
    total = all_sum(torch.cat([*(sums[n] for n in names), torch.tensor([float(count[0])], dtype=torch.float64)]))
    parts = total[:-1].split([sums[n].numel() for n in names])
    return {n: (part / max(float(total[-1]), 1.0)).float() for n, part in zip(names, parts)}


def kl_to_reference(logits: torch.Tensor, ref_logp: torch.Tensor, ref_p: torch.Tensor | None = None) -> float:
    """Mean over positions of KL(P_ref || Q) in nats, both [n, seq, vocab] (``ref_p``: exp(ref_logp), if kept).
    In float64: a Q8_0 linear's KLD (1e-9 on a small model) is below float32's rounding of the log-probabilities."""
    logq = F.log_softmax(logits.double(), -1)
    return float(((ref_logp.exp() if ref_p is None else ref_p) * (ref_logp - logq)).sum(-1).mean())


@torch.no_grad()
def measure(model: nn.Module, calib: torch.Tensor, dev: torch.Tensor, types: Sequence[str],
            progress: bool = True, known: Sensitivity | None = None) -> Sensitivity:
    """The KLD of each quantizable linear alone rounded onto each type its rows allow (importance-weighted fit),
    and of the embedding and an untied head (the type's own fit; the embedding re-runs the whole model), on the
    ``dev`` windows; the weights are restored after each measurement. Data-parallel workers share the
    measurements out and sum them, so every worker returns the same numbers. What ``known`` (measured on the
    same calibration and dev windows) already holds is kept, not measured again: a type or the embedding added
    to a sensitivity file costs only its own forwards."""
    from .distributed import all_sum, rank, world_size
    from .models.families import family_for
    from .models.inventory import check_finite, quantizable_linears
    from .sensitivity import Suffix
    from .walk import first_layer_inputs

    types = check_types(types)
    family = family_for(model)
    linears = quantizable_linears(model, family)
    check_finite(model)
    embeddings = embedding_modules(model)
    modules = {**linears, **embeddings}
    have = known.kld if known is not None else {}
    if known is not None:
        known.check_model(linears, [], embeddings)
        if known.meta.get("dev") != list(dev.shape) or known.meta.get("calib") != list(calib.shape):
            raise LowbitError(f"the GGUF sensitivity file was measured on {known.meta.get('dev')} dev and "
                              f"{known.meta.get('calib')} calibration tokens, not {list(dev.shape)} and "
                              f"{list(calib.shape)}: its numbers and new ones would not add up; measure all again")
    todo = [(n, t) for n, m in modules.items() for t in fitting(types, m.weight.shape[1]) if t not in have.get(n, {})]
    values = torch.zeros(len(todo), dtype=torch.float64)
    if todo:  # a complete file needs neither the importances nor the float model's logits
        importance = channel_importances(model, linears, calib)
        suffix = Suffix(model, dev)
        ref = F.log_softmax(suffix.logits(len(suffix.layers)).double(), -1)
        ref_p = ref.exp()
        head = model.get_output_embeddings()
        # where each tensor's change enters: its layer's input, the head's (len(layers)), or the embedding (-1)
        start = {n: int(n[len(family.layers) + 1:].split(".")[0]) for n in linears}
        start.update({n: len(suffix.layers) if m is head else -1 for n, m in embeddings.items()})
    mine = range(rank(), len(todo), world_size())
    bar = tqdm(total=len(mine), desc="GGUF sensitivity", unit="fwd", disable=not progress, leave=False)
    try:
        for i in mine:
            name, t = todo[i]
            weight = modules[name].weight
            original = weight.detach().clone()
            weight.copy_(dequantize(quantize(original, QuantSpec(format=t), importance=importance.get(name))))
            if start[name] >= 0:
                logits = suffix.logits(start[name])
            else:  # the embedding: the first layer's input again, then every layer
                logits = suffix.logits(0, first_layer_inputs(model, family, dev, batch_size=len(dev))[0])
            values[i] = max(kl_to_reference(logits, ref, ref_p), 0.0)
            weight.copy_(original)
            bar.update()
    finally:
        bar.close()
    values = all_sum(values) if todo else values  # each measurement was made by exactly one worker
    kld: dict[str, dict[str, float]] = {n: dict(have.get(n, {})) for n in modules}
    for (name, t), v in zip(todo, values.tolist()):
        kld[name][t] = v
    measured = [n for n in embeddings if kld[n]]  # an embedding whose rows no type divides stays as --embed says
    shapes = {n: tuple(m.weight.shape) for n, m in modules.items() if n in linears or n in measured}
    types = check_types([*types, *(known.meta.get("types", []) if known is not None else [])])
    return Sensitivity(shapes, {n: kld[n] for n in shapes}, {"types": list(types), "calib": list(calib.shape),
                                                             "dev": list(dev.shape), "embeddings": measured})


# ---- the budget ----------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as ``93.5MB``, ``120M``, ``2G`` or ``500000`` (K/M/G/T in powers of 1000)."""
    m = _SIZE.match(str(text))
    if m is None:
        raise LowbitError(f"cannot read the size {text!r}; write e.g. 93.5MB, 120M, 2G or a number of bytes")
    return int(float(m.group(1)) * 1000 ** " kmgt".index((m.group(2) or " ").lower()))


def file_overhead(model: nn.Module, tokenizer, source_model: str, embed: str = "int8") -> int:
    """Bytes of ``model``'s GGUF file outside its quantized linears (metadata and tokenizer, embedding, norms), read
    off a probe: a copy with every linear rounded to Q8_0, packed and exported as the real file will be. The
    linears' bytes depend only on their types, so a file budget minus this is what the linears may take. Where a
    linear's bytes need not be a multiple of the file's 32-byte alignment, 31 bytes of padding each are added."""
    import copy
    import tempfile

    from .export.gguf import export_gguf
    from .methods import RTNConfig, quantize_
    from .models.families import family_for
    from .models.inventory import quantizable_linears
    from .pack.checkpoint import pack_model_, save_packed

    shapes = [tuple(lin.weight.shape) for lin in quantizable_linears(model, family_for(model)).values()]
    probe = copy.deepcopy(model)
    spec = QuantSpec(format="q8_0")
    quantize_(probe, RTNConfig(spec))
    packed = pack_model_(probe, spec, method="rtn", embed=embed)
    with tempfile.TemporaryDirectory() as d:
        save_packed(packed, probe.config, tokenizer, Path(d) / "probe", extra={"source_model": source_model})
        size = export_gguf(Path(d) / "probe", Path(d) / "probe.gguf")["bytes"]
    del probe, packed
    padding = 0 if all(rows % 32 == 0 for rows, _ in shapes) else 31 * len(shapes)
    return size - sum(tensor_bytes(GGML_TYPES["q8_0"], s) for s in shapes) + padding


@dataclass
class Mix:
    """The chosen type of every linear, with what the choice predicts."""

    types: dict[str, str]  # linear (and embedding, if chosen) -> type
    meta: dict

    @property
    def embed(self) -> str | None:
        """The type chosen for the embedding (and an untied head: they take one), None if not chosen."""
        chosen = {self.types[n] for n in self.meta.get("embeddings", [])}
        return chosen.pop() if chosen else None

    def spec_map(self) -> SpecMap:
        """The linears' types as a recipe (the embedding is stored by :attr:`embed`)."""
        from collections import Counter

        linear = {n: t for n, t in self.types.items() if n not in self.meta.get("embeddings", [])}
        default = Counter(linear.values()).most_common(1)[0][0]
        return SpecMap(QuantSpec(format=default), {n: QuantSpec(format=t) for n, t in linear.items()
                                                   if t != default}, recipe="AUTO")

    def tensor_type_lines(self, gguf_names: Mapping[str, str]) -> list[str]:
        """``llama-quantize --tensor-type-file`` lines (``^blk\\.3\\.attn_v\\.weight$=q5_k``), one per GGUF tensor
        (experts stacked into one tensor share a line)."""
        lines = {f"^{re.escape(gguf_names[n])}$={t}": None for n, t in self.types.items()}
        return list(lines)


def choose(sens: Sensitivity, types: Sequence[str], capacity_bytes: int, overhead: int | None = None,
           groups: Mapping[str, str] | None = None, fixed: Mapping[str, str] | None = None) -> Mix:
    """One type per linear minimising the summed measured KLD with the linears' bytes at most ``capacity_bytes``
    (exact multiple-choice knapsack); a budget outside what the types can give is one line naming the range (as
    file sizes, given the file's ``overhead`` outside the linears). Linears that ``groups`` maps to one key (the
    experts llama.cpp stacks into one tensor) take one type together; ``fixed`` names tensors' types outright."""
    from .allocation import allocate

    types = check_types(types)
    groups = {**(groups or {}), **{n: "embeddings" for n in sens.embeddings}}  # one storage for embedding and head
    items: dict[str, list[str]] = {}
    for n in sens.shapes:
        items.setdefault(groups.get(n, n), []).append(n)
    fixed = fixed or {}
    options = [[t for t in types if all(sens.shapes[m][1] % GGML_TYPES[t].span == 0 for m in members)
                and fixed.get(members[0], t) == t] for members in items.values()]
    bare = [members[0] for members, o in zip(items.values(), options) if not o]
    if bare:
        raise LowbitError(f"{bare[0]} has rows of {sens.shapes[bare[0]][1]} weights, which none of "
                          f"{', '.join(t.upper() for t in types)} holds")
    width = max(map(len, options))
    sizes = torch.zeros(len(items), width, dtype=torch.long)
    costs = torch.zeros(len(items), width, dtype=torch.float64)
    for i, (members, opts) in enumerate(zip(items.values(), options)):
        for j in range(width):
            t = opts[min(j, len(opts) - 1)]  # items with fewer options repeat their last (widest) one
            sizes[i, j] = sum(tensor_bytes(GGML_TYPES[t], sens.shapes[m]) for m in members)
            costs[i, j] = sum(sens.kld[m][t] for m in members)
    lo, hi = int(sizes.min(1).values.sum()), int(sizes.max(1).values.sum())
    weights = sum(r * c for r, c in sens.shapes.values())
    extra, what = (0, "the linears") if overhead is None else (overhead, "the file")
    unit, tensors = ("weight", "tensors") if sens.embeddings else ("linear weight", "linears")
    if capacity_bytes > 2 * weights:
        raise LowbitError(f"the budget gives {what} {(capacity_bytes + extra) / 1e6:.3f} MB, more than with float16 "
                          f"{tensors} ({(2 * weights + extra) / 1e6:.3f} MB, 16 bits per weight): quantizing would "
                          "gain nothing")
    if not lo <= capacity_bytes:
        raise LowbitError(f"the budget gives {what} {(capacity_bytes + extra) / 1e6:.3f} MB; the types "
                          f"{', '.join(t.upper() for t in types)} reach {(lo + extra) / 1e6:.3f} MB "
                          f"({8 * lo / weights:.3f} bits per {unit}) to {(hi + extra) / 1e6:.3f} MB "
                          f"({8 * hi / weights:.3f})")
    choice, info = allocate(costs, sizes, min(capacity_bytes, hi))
    chosen = {m: opts[min(int(j), len(opts) - 1)] for members, opts, j in zip(items.values(), options, choice)
              for m in members}
    nbytes = {n: tensor_bytes(GGML_TYPES[t], sens.shapes[n]) for n, t in chosen.items()}
    linear = [n for n in chosen if n not in sens.embeddings]
    used = sum(nbytes[n] for n in linear)
    return Mix(chosen, {"linear_bytes": used, "chosen_bytes": sum(nbytes.values()), "capacity_bytes": capacity_bytes,
                        "bits_per_weight": 8 * used / sum(r * c for n, (r, c) in sens.shapes.items() if n in linear),
                        "predicted_kld": sum(sens.kld[n][t] for n, t in chosen.items()), "exact": info["exact"],
                        "embeddings": sens.embeddings})


# ---- the choice, checked on dev ---------------------------------------------------------------------------------

VERIFIED = 3  # mixes measured whole on dev: the best predicted one for each of the embedding types predicted best,
CLOSE = 1.5  # those predicted within this factor of the best (farther ones the whole would have to beat by 1.5x)


def alternatives(sens: Sensitivity, types: Sequence[str], capacity_bytes: int, overhead: int | None = None,
                 groups: Mapping[str, str] | None = None, keep: int = VERIFIED, close: float | None = None
                 ) -> list[Mix]:
    """The best mix (by predicted KLD) for each type the embedding can take: the ``keep`` best of them predicted
    within ``close`` times the best. The summed KLDs of tensors measured alone are the knapsack's model; where it
    trades the embedding (one tensor, a large share of the bytes) against many linears, it can misjudge the whole,
    so these few are measured whole."""
    if not sens.embeddings:
        return [choose(sens, types, capacity_bytes, overhead, groups)]
    first = sens.embeddings[0]
    mixes = []
    for t in fitting(types, sens.shapes[first][1]):
        try:
            mixes.append(choose(sens, types, capacity_bytes, overhead, groups, fixed={first: t}))
        except LowbitError:  # this embedding type leaves the linears out of reach
            continue
    if not mixes:  # names the reachable range
        return [choose(sens, types, capacity_bytes, overhead, groups)]
    mixes = sorted(mixes, key=lambda m: m.meta["predicted_kld"])[:keep]
    close = CLOSE if close is None else close
    return [m for m in mixes if m.meta["predicted_kld"] <= close * mixes[0].meta["predicted_kld"]]


CHECK_WINDOWS = 16  # dev windows of the whole-mix check; one window ordered two SmolLM2 mixes wrong (16 agree)


@torch.no_grad()
def whole_klds(model: nn.Module, calib: torch.Tensor, dev: torch.Tensor, mixes: Sequence[Mix]) -> list[float]:
    """The KLD to the float model on the ``dev`` windows of the model with every tensor of each mix rounded onto
    its type at once (the fits :func:`measure` uses), window by window (many windows of a 262k-token vocabulary's
    logits would not fit at once); the weights are restored afterwards. Each rounded tensor is fit once."""
    from .models.families import family_for
    from .models.inventory import quantizable_linears

    linears = quantizable_linears(model, family_for(model))
    modules = {**linears, **embedding_modules(model)}
    importance = channel_importances(model, linears, calib)
    device = next(model.parameters()).device
    originals = {n: modules[n].weight.detach().clone() for mix in mixes for n in mix.types}
    rounded: dict[tuple[str, str], torch.Tensor] = {}  # shared by the mixes and the windows
    totals = [0.0] * len(mixes)
    try:
        for window in dev.split(1):
            ids = window.to(device)
            ref = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
            ref_p = ref.exp()
            for i, mix in enumerate(mixes):
                for n, t in mix.types.items():
                    if (n, t) not in rounded:
                        rounded[(n, t)] = dequantize(quantize(originals[n], QuantSpec(format=t),
                                                              importance=importance.get(n)))
                    modules[n].weight.copy_(rounded[(n, t)])
                totals[i] += kl_to_reference(model(ids, use_cache=False).logits, ref, ref_p)
                for n in mix.types:
                    modules[n].weight.copy_(originals[n])
    finally:
        for n, w in originals.items():
            modules[n].weight.copy_(w)
    return [max(total / len(dev), 0.0) for total in totals]
