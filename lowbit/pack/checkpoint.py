"""lowbit's packed model directory: write it atomically, read it back bit for bit.

A directory holds

- ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json``, as :mod:`lowbit.stream` writes): for each quantized linear ``NAME``,
  ``NAME.qweight`` (int32 bit
  stream, see :mod:`lowbit.pack.bits`), ``NAME.scales`` and, if asymmetric, ``NAME.qzeros``;
  the embedding (and an untied output head) the same way at 8 bits, or as float; every
  other tensor (norms, biases) as it was;
- ``lowbit.json``: format name and version, the method and spec, one entry per packed
  tensor (shape, bits, group size, symmetry, role, kernel) and a SHA-256 of every file;
- ``config.json`` (+ ``generation_config.json``) and the tokenizer, as Hugging Face writes them.

Nothing is pickled. The directory is built under a temporary name beside the target and
renamed into place only when complete, so a failed write (disk full, interrupt) leaves
nothing behind and never half-replaces an existing model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic_write import atomic_dir
from ..errors import LowbitError
from ..models.families import family_for
from ..models.inventory import quantizable_linears
from ..quantizer import QTensor, QuantSpec, codes_of, dequantize, quantize
from ..specmap import SpecLike, SpecMap, base_spec, check_names, spec_for
from .tensor import PackedTensor

FORMAT = "lowbit-packed"
FORMAT_VERSION = 3  # 2 added full-range symmetric tensors, 3 GGUF block types; files need the version of what they hold
READABLE_VERSIONS = (1, 2, 3)
CONFIG_NAME = "lowbit.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # a sharded directory (written by lowbit.stream)
EMBED_CHOICES = ("int8", "fp16", "fp32")  # or the name of a GGUF block type (q5_0, q6_k, ...): check_embed
EMBED_GROUP = 32  # llama.cpp's Q8_0 block: the default model's embedding is stored that way, so int8 g32 is exact


@dataclass
class PackedModel:
    """A model's tensors ready to write: packed matrices, float leftovers, and the config entries."""

    packed: dict[str, PackedTensor] = field(default_factory=dict)  # module name -> packed weight
    floats: dict[str, torch.Tensor] = field(default_factory=dict)  # state-dict name -> tensor
    entries: dict[str, dict] = field(default_factory=dict)  # module name -> role, kernel, ...
    meta: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as a safetensors file stores it: each packed weight's parts, then the floats."""
        out = {}
        for name, pt in self.packed.items():
            out.update(pt.tensors(name))
        out.update(self.floats)
        return {k: v.contiguous() for k, v in out.items()}


def is_packed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def check_embed(embed: str, width: int | None = None) -> None:
    """Refuse an embedding storage lowbit does not write, or a GGUF type whose blocks do not divide a row."""
    from ..formats.ggml import GGML_TYPES

    if embed in EMBED_CHOICES:
        return
    t = GGML_TYPES.get(str(embed).lower())
    if t is None:
        raise LowbitError(f"embedding storage must be one of {', '.join(EMBED_CHOICES)} or a GGUF type "
                          f"({', '.join(n.upper() for n in GGML_TYPES)}), got {embed!r}")
    if width is not None and width % t.span:
        raise LowbitError(f"a {embed.upper()} embedding needs rows that are a multiple of {t.span} weights; "
                          f"this one has {width}")


def _embed_spec(width: int) -> QuantSpec:
    if width % EMBED_GROUP == 0:
        return QuantSpec(bits=8, group_size=EMBED_GROUP, symmetric=True)
    return QuantSpec(bits=8, granularity="channel", symmetric=True)


@torch.no_grad()
def _pack_embedding(weight: torch.Tensor, how: str, name: str,
                    loaded: bool = True) -> tuple[PackedTensor | None, torch.Tensor | None, dict]:
    """(packed or None, the float weight the file will load as (if ``loaded``), config entry) for an
    embedding or head."""
    if how not in EMBED_CHOICES:  # a GGUF block type, rounded with the type's own scale fit
        check_embed(how, weight.shape[1])
        spec = QuantSpec(format=how.lower())
        pt = PackedTensor.from_weight(weight, spec, name, codes=lambda w, s, _n: quantize(w, s))
        return pt, pt.dequantize(weight.dtype) if loaded else None, {"storage": how.upper(), "exact": False}
    if how == "int8":
        spec = _embed_spec(weight.shape[1])
        try:
            pt, exact = PackedTensor.from_weight(weight, spec, name), True
        except LowbitError:
            pt, exact = PackedTensor.from_weight(weight, spec, name, codes=lambda w, s, _n: quantize(w, s)), False
        return pt, pt.dequantize(weight.dtype) if loaded else None, {"storage": f"int8 {spec.describe()}",
                                                                       "exact": exact}
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[how]
    stored = weight.to(dtype)
    return None, stored.to(weight.dtype), {"storage": how, "exact": bool(torch.equal(stored.to(weight.dtype), weight))}


def _method_codes(lin: nn.Linear, spec: QuantSpec) -> QTensor | None:
    """The codes the method rounded the linear to (:func:`lowbit.quantizer.codes_of`), if they still decode to
    its weight under ``spec``; None for a weight rounded elsewhere, whose codes are then searched for and
    verified (:func:`lowbit.pack.codes.grid_codes`)."""
    kept = codes_of(lin)
    if kept is not None and kept.spec == spec and torch.equal(dequantize(kept).to(lin.weight.dtype), lin.weight):
        return kept
    return None


@torch.no_grad()
def pack_linear(name: str, lin: nn.Linear, spec: QuantSpec, kernel: str = "auto") -> PackedModel:
    """One rounded linear's codes, config entry and bias, as a part of a :class:`PackedModel`."""
    from .kernels import choose_kernel

    out = PackedModel()
    kept = _method_codes(lin, spec)
    pt = PackedTensor.from_qtensor(kept, name=name) if kept is not None else \
        PackedTensor.from_weight(lin.weight.detach(), spec, name)
    out.packed[name] = pt
    out.entries[name] = {**pt.meta(), "role": "linear", "kernel": choose_kernel(pt, kernel)}
    if lin.bias is not None:
        out.floats[f"{name}.bias"] = lin.bias.detach()
    return out


@torch.no_grad()
def pack_embedding_(name: str, mod: nn.Module, role: str, embed: str, kernel: str, tied: bool,
                    update: bool = True) -> tuple[PackedModel, dict]:
    """The embedding or an untied head stored as ``embed`` says (and, if ``update``, ``mod`` set to what
    the file holds), with its storage record for the config."""
    from .kernels import choose_kernel

    check_embed(embed)
    out = PackedModel()
    pt, loaded, info = _pack_embedding(mod.weight.detach(), embed, name, loaded=update or embed != "int8")
    if update:
        mod.weight.copy_(loaded)
    if pt is None:
        out.floats[f"{name}.weight"] = loaded.to({"fp16": torch.float16, "fp32": torch.float32}[embed])
    else:
        out.packed[name] = pt
        # An embedding's own lookup always uses float rows; its kernel serves the tied output head.
        head_use = role == "lm_head" or tied
        out.entries[name] = {**pt.meta(), "role": role, "kernel": choose_kernel(pt, kernel) if head_use
                             else "dequant"}
    if role == "lm_head" and getattr(mod, "bias", None) is not None:
        out.floats[f"{name}.bias"] = mod.bias.detach()
    return out, info


def merge_(into: PackedModel, part: PackedModel) -> PackedModel:
    """Add ``part``'s tensors and entries to ``into``."""
    into.packed.update(part.packed)
    into.floats.update(part.floats)
    into.entries.update(part.entries)
    return into


def packed_meta(method: str, spec: QuantSpec, embed_info: dict, tied: bool, entries: dict, family: str,
                weights_dtype: torch.dtype) -> dict:
    """The model-wide part of ``lowbit.json``."""
    from .kernels import KERNEL_OPS

    used = sorted({e["kernel"] for e in entries.values()})
    return {
        "method": method, "spec": spec.to_dict(), "embedding": embed_info, "tied_embeddings": tied,
        "kernels": {k: KERNEL_OPS[k] for k in used},
        "family": family, "weights_dtype": str(weights_dtype).removeprefix("torch."),
    }


@torch.no_grad()
def check_packable(spec: SpecLike) -> None:
    """Refuse, before any work, a spec whose codes a packed file cannot hold (it holds integer grids)."""
    s = base_spec(spec)
    if not s.is_int:
        raise LowbitError(f"a packed file holds integer grids (--format int: asymmetric, --sym or --full-range); "
                          f"{s.format} is measured with lowbit eval --format {s.format}, not packed")
    if not s.symmetric and s.zero_point == "float" and s.ggml is None:
        raise LowbitError("a packed file stores integer zero points; quantize with zero_point='int'")


def pack_model_(model: nn.Module, spec: SpecLike, *, method: str = "unknown", embed: str = "int8",
                kernel: str = "auto") -> PackedModel:
    """Pack a model whose linears a method has rounded with ``spec`` (one for all, or a SpecMap:
    each packed tensor records its own width).

    The embedding (and an untied head) is stored as ``embed`` says; the model's own copy is
    set to exactly what the file will hold (hence the trailing underscore), so evaluating
    ``model`` afterwards measures the saved model.
    """
    check_embed(embed)
    check_packable(spec)
    family = family_for(model)
    linears = quantizable_linears(model, family)
    check_names(spec, linears)
    out = PackedModel()
    for name, lin in linears.items():
        merge_(out, pack_linear(name, lin, spec_for(spec, name), kernel))
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    embeddings = {"embedding": model.get_input_embeddings()}
    if not tied and head is not None:
        embeddings["lm_head"] = head
    names = {id(m): n for n, m in model.named_modules()}
    embed_info = {}
    for role, mod in embeddings.items():
        part, embed_info[role] = pack_embedding_(names[id(mod)], mod, role, embed, kernel, tied)
        merge_(out, part)
    if tied and getattr(head, "bias", None) is not None:
        out.floats[f"{names[id(head)]}.bias"] = head.bias.detach()
    done = {f"{n}.weight" for n in out.packed} | set(out.floats)
    tied_head = f"{names[id(head)]}.weight" if tied else None
    for key, t in model.state_dict().items():
        if key not in done and key != tied_head:
            out.floats[key] = t.detach()
    out.meta = packed_meta(method, base_spec(spec), embed_info, tied, out.entries, family.name,
                           next(iter(linears.values())).weight.dtype)
    if isinstance(spec, SpecMap):  # "spec" is then the default; each tensor entry has its own bits
        out.meta["allocation"] = {n: spec_for(spec, n).bits for n in linears}
    return out


# ---- writing ------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output without ``force``, and never replace a directory lowbit did not write."""
    p = Path(path)
    if p.exists():
        if not force:
            raise LowbitError(f"{p} exists; pass --force to overwrite it")
        if not (p.is_dir() and is_packed_dir(p)):
            raise LowbitError(f"{p} exists and is not a lowbit model directory; refusing to replace it even with "
                              "--force")
    if not p.parent.is_dir():
        raise LowbitError(f"directory {p.parent} does not exist")
    return p


def save_packed(packed: PackedModel, config, tokenizer, path: str | os.PathLike, *, force: bool = False,
                generation_config=None, extra: dict | None = None) -> Path:
    """Write ``packed`` as a lowbit directory at ``path``, atomically."""
    from safetensors.torch import save_file

    dest = check_output_dir(path, force)
    with atomic_dir(dest) as tmp:
        save_file(packed.tensors(), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        finish_dir(tmp, {**packed.meta, **(extra or {})}, packed.entries, config, tokenizer, generation_config)
    return dest


def shard_name(index: int, count: int) -> str:
    """Hugging Face's shard file name, counting from 1."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def save_shard(part: PackedModel, path: Path) -> dict:
    """Write one shard's tensors atomically; returns its size, SHA-256 and tensor names for the index."""
    from safetensors.torch import save_file

    from ..atomic_write import atomic_path

    tensors = part.tensors()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path), "tensors": sorted(tensors)}


def write_index(directory: Path, shards: dict[str, dict]) -> None:
    """``model.safetensors.index.json`` for shards written by :func:`save_shard`."""
    weight_map = {t: name for name, info in shards.items() for t in info["tensors"]}
    doc = {"metadata": {"total_size": sum(i["bytes"] for i in shards.values())}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(doc, indent=1))


def finish_dir(tmp: Path, meta: dict, entries: dict, config, tokenizer, generation_config=None,
               known: dict[str, dict] | None = None) -> None:
    """Add config, tokenizer and ``lowbit.json`` (with every file's checksum) beside the weights in ``tmp``.

    ``known`` gives checksums already computed (shards written earlier), so large files are not hashed twice.
    """
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    known = known or {}
    files = {}
    for f in sorted(tmp.iterdir()):
        k = known.get(f.name)
        files[f.name] = {"bytes": f.stat().st_size,
                         "sha256": k["sha256"] if k and k["bytes"] == f.stat().st_size else file_sha256(f)}
    # A reader of version 1 would shift full-range codes by 2^(bits-1)-1 instead of 2^(bits-1): such files say 2,
    # so that reader refuses them; all others stay readable by it.
    full = any(isinstance(e, dict) and e.get("full_range") for e in entries.values())
    blocks = any(isinstance(e, dict) and e.get("format", "int") != "int" for e in entries.values())
    doc = {
        "format": FORMAT, "format_version": 3 if blocks else 2 if full else 1,
        "packing": "codes row-major, unsigned (symmetric shifted by 2^(bits-1)-1, by 2^(bits-1) where a tensor says "
                   "full_range); every 32 codes fill `bits` int32 words, code i at bits [i*bits, (i+1)*bits) "
                   "little-endian; w = (u - zero) * scale, or for a tensor with a GGUF block `format` "
                   "w = (u - 2^(bits-1)) * scale (signed types) or u * scale + offset",
        **meta, "tensors": entries, "files": files,
    }
    attn = getattr(config, "_attn_implementation", None)
    if isinstance(attn, str):  # eager and sdpa round differently: reload with the one that was evaluated
        doc["attn_implementation"] = attn
    (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=1))


# ---- reading ------------------------------------------------------------------------------


def read_config(path: str | os.PathLike, verify: bool = True) -> dict:
    """The directory's ``lowbit.json``, after checking format, version and (``verify``) every file's checksum."""
    p = Path(path)
    try:
        doc = json.loads((p / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read {p / CONFIG_NAME}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LowbitError(f"{p / CONFIG_NAME} is not a lowbit packed-model config")
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise LowbitError(f"{p} has format version {version!r}; this lowbit reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade lowbit, or re-export the model)")
    for name, want in doc.get("files", {}).items():
        f = p / name
        if not f.is_file():
            raise LowbitError(f"{p} is incomplete: {name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise LowbitError(f"{f} has {f.stat().st_size} bytes, expected {want['bytes']} (truncated or replaced)")
        if verify and file_sha256(f) != want["sha256"]:
            raise LowbitError(f"{f} fails its SHA-256 check (corrupt or modified)")
    if WEIGHTS_NAME not in doc.get("files", {}) and INDEX_NAME not in doc.get("files", {}):
        raise LowbitError(f"{p / CONFIG_NAME} lists neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return doc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise LowbitError(f"cannot read {path}: {e}") from None


def read_weights(p: Path, doc: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a packed directory: one ``model.safetensors``, or the shards its index names."""
    if WEIGHTS_NAME in doc["files"]:
        return read_tensors(p / WEIGHTS_NAME)
    try:
        weight_map = json.loads((p / INDEX_NAME).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LowbitError(f"cannot read {p / INDEX_NAME}: {e}") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if shard not in doc["files"]:
            raise LowbitError(f"{p / INDEX_NAME} names {shard}, which {CONFIG_NAME} does not list")
        got = read_tensors(p / shard)
        wrong = sorted(k for k in got if weight_map.get(k) != shard)
        if wrong:
            raise LowbitError(f"{p / shard} holds {wrong[0]}, which the index puts elsewhere")
        tensors.update(got)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise LowbitError(f"{p}: the index lists {missing[0]} but no shard holds it")
    return tensors


def _skeleton(path: Path, dtype: torch.dtype, attn: str | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read the model config in {path}: {e}") from None
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **({"attn_implementation": attn} if attn else {}))


@torch.no_grad()
def load_packed(path: str | os.PathLike, kernel: str = "auto", dtype: torch.dtype = torch.float32,
                verify: bool = True) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a lowbit directory.

    ``kernel="dequant"`` turns every packed weight back into float (exactly the weights that
    were quantized and evaluated); ``"auto"`` keeps linears packed with the kernel recorded at
    export; any other kernel name forces that kernel where it applies.
    """
    from transformers import AutoTokenizer

    from ..models.quiet import quiet_transformers
    from .kernels import KERNELS, QuantLinear, choose_kernel

    if kernel not in ("auto", "dequant", *KERNELS):
        raise LowbitError(f"unknown kernel {kernel!r}; choose from auto, dequant, {', '.join(KERNELS)}")
    quiet_transformers()
    p = Path(path)
    doc = read_config(p, verify=verify)
    tensors = read_weights(p, doc)
    model = _skeleton(p, dtype, doc.get("attn_implementation"))
    family_for(model)  # the structure the quantizer saw: Conv1D and 3-D experts as nn.Linear
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    modules = dict(model.named_modules())
    replaced: set[str] = set()
    for name, entry in doc["tensors"].items():
        if name not in modules:
            raise LowbitError(f"{p}: packed tensor {name} matches no module of the {doc.get('family')} model")
        pt = PackedTensor.from_parts(name, entry, tensors)
        used |= set(pt.tensors(name))
        mod = modules[name]
        want = tuple(mod.weight.shape)
        if want != pt.shape:
            raise LowbitError(f"{name}: packed shape {list(pt.shape)} does not match the model's {list(want)}")
        chosen = entry.get("kernel", "dequant") if kernel == "auto" else kernel
        chosen = chosen if chosen == "dequant" else choose_kernel(pt, chosen)  # what this tensor can run
        if entry["role"] == "embedding":
            state[f"{name}.weight"] = pt.dequantize(dtype)
            if not doc.get("tied_embeddings") or chosen == "dequant":
                continue
            name = next(n for n, m in modules.items() if m is model.get_output_embeddings())  # the tied head
        elif chosen == "dequant":
            state[f"{name}.weight"] = pt.dequantize(dtype)
            continue
        parent, _, child = name.rpartition(".")
        bias = tensors.get(f"{name}.bias")
        qlin = QuantLinear(pt, choose_kernel(pt, chosen), bias=None if bias is None else bias.to(dtype))
        used.add(f"{name}.bias")
        setattr(model.get_submodule(parent) if parent else model, child, qlin)
        replaced.add(name)
    for key, t in tensors.items():
        if key not in used and key.rpartition(".")[0] not in replaced:
            state[key] = t.to(dtype) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if doc.get("tied_embeddings") and head is not None and head_name not in replaced:
        head.weight = model.get_input_embeddings().weight
        missing = [k for k in missing if k != f"{head_name}.weight"]
        model.config.tie_word_embeddings = True
    missing = [k for k in missing if k.rpartition(".")[0] not in replaced]
    if missing or unexpected:
        raise LowbitError(f"{p / WEIGHTS_NAME} does not match the model: "
                          f"missing {', '.join(missing[:5]) or 'nothing'}; "
                          f"unexpected {', '.join(unexpected[:5]) or 'nothing'}")
    model.eval().requires_grad_(False)
    tok = None
    if "tokenizer_config.json" in doc["files"]:  # written without a tokenizer (tests, bare models): None
        try:
            tok = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError) as e:
            raise LowbitError(f"cannot load the tokenizer in {p}: {e}") from None
    model.lowbit_config = doc
    return model, tok
