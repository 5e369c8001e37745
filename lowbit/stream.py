"""Quantizing a model larger than memory: read it layer by layer from disk, write each layer when done.

The checkpoint is opened lazily (:mod:`lowbit.models.lazy`); memory holds the embedding
(only while the calibration inputs of the first layer are computed), one decoder layer, and
the calibration hidden states. Each finished step (embedding, every layer, the final norm and
head) is written at once as one safetensors shard of lowbit's packed format, so the output is
never whole in memory either.

The layers go through the in-memory methods' own layer walk (:func:`lowbit.walk.walk_layers`, with
'each calibrated method's own step of it (``Method.layer_step``: AWQ, GPTQ, AWQ+GPTQ) or RTN's rounding, and
:func:`lowbit.pack.checkpoint.pack_linear`);
streaming only says where each layer is read from and where its outputs and shard go, so the streamed
output holds the same codes, bit for bit.

Resume: the shards are written into ``OUT.partial/`` beside the output, with a manifest of what
the run is (spec, method, calibration and checkpoint digests) and how far it got, plus the
hidden states entering the next layer. ``resume=True`` checks the manifest and goes on from the
last finished step; the result equals an uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .atomic_write import atomic_path, install_dir
from .distributed import is_writer, share
from .errors import LowbitError
from .flops import LowerBound, MatmulCount, Shape, lower_bound
from .methods import REGISTRY
from .methods.awq import AWQConfig
from .methods.rtn import round_linears
from .models.families import family_for
from .models.inventory import check_spec_fits, quantizable_linears
from .models.lazy import LazyCheckpoint, check_matches, empty_model, materialise, release
from .pack.bits import packed_words
from .pack.checkpoint import (
    EMBED_CHOICES,
    FORMAT_VERSION,
    PackedModel,
    check_output_dir,
    finish_dir,
    merge_,
    pack_embedding_,
    pack_linear,
    packed_meta,
    save_shard,
    shard_name,
    write_index,
)
from .quantizer import QuantSpec
from .walk import Activations, Call, LayerContext, LayerStep, Streaming, first_layer_batches, walk_layers

MANIFEST = "manifest.json"
ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class StreamResult:
    """What a streamed run did, for the CLI's summary and the scale benchmark."""

    path: Path
    method: str
    layers: int
    resumed_at: int  # steps already done when this process started
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    disk_bytes: int = 0
    estimate_bytes: int = 0
    checkpoint_bytes: int = 0
    matmuls: Counter[Shape] = field(default_factory=Counter)  # the run's matrix products by shape

    def lower_bound(self) -> LowerBound:
        """The least time this machine needs for the run's matrix products (timed now)."""
        return lower_bound(self.matmuls)

    def row(self) -> dict:
        d = asdict(self)
        del d["matmuls"]
        d["path"] = str(self.path)
        ls = self.layer_seconds
        d["layer_seconds"] = [round(s, 3) for s in ls]
        d["mean_layer_seconds"] = round(sum(ls) / len(ls), 3) if ls else None
        d["seconds"] = round(self.seconds, 2)
        return d


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_dir(output: Path) -> Path:
    """Where an unfinished run keeps its shards, manifest and hidden states."""
    return output.parent / f"{output.name}.partial"


# ---- sizes and checks --------------------------------------------------------------------------


def estimate_output_bytes(model: nn.Module, spec: QuantSpec, embed: str, linears: dict[str, nn.Linear]) -> int:
    """Upper estimate of the packed output's size (float32 scales), from shapes alone."""
    total = 0
    for lin in linears.values():
        rows, cols = lin.weight.shape
        groups = cols // spec.group_size if spec.granularity == "group" else 1
        total += 4 * packed_words(rows * cols, spec.bits) + 4 * rows * groups
        if not spec.symmetric:
            total += 4 * packed_words(rows * groups, spec.bits)
    embeds = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None:
        embeds.setdefault(id(head.weight), head.weight)
    per = {"int8": 1 + 4 / 32, "fp16": 2, "fp32": 4}[embed]
    total += int(sum(w.numel() * per for w in embeds.values()))
    quantized = {f"{n}.weight" for n in linears} | {
        n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in embeds}
    total += sum(4 * t.numel() for n, t in model.state_dict().items() if n not in quantized)
    return total + (1 << 20)  # shard headers, index, config, tokenizer


def _check_disk(where: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(where).free
    if need > free:
        raise LowbitError(f"not enough disk for {what}: about {need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free "
                          f"on {where}; free some space or write elsewhere")


def check_offload_dir(path: Path) -> Path:
    """``path`` created if needed and proven writable, or a clear error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lowbit-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise LowbitError(f"--offload-activations {path} is not a writable directory: {e.strerror or e}") from None
    return path


def calib_digest(calib: torch.Tensor | None) -> str | None:
    if calib is None:
        return None
    return hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes() + str(tuple(calib.shape)).encode()
                          ).hexdigest()


# ---- the run's record --------------------------------------------------------------------------


def _write_json(path: Path, doc: dict) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1))


def _mismatch(old: dict, new: dict) -> list[str]:
    return [f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _open_run(run: Path, identity: dict, resume: bool, force: bool) -> dict:
    """The manifest to continue from: a fresh one, or the matching one of an interrupted run."""
    fresh = {"identity": identity, "done": 0, "shards": {}, "entries": {}, "embedding": {}, "hidden": None}
    if not run.exists():
        if resume:
            print(f"lowbit: nothing to resume in {run}; starting from the beginning", file=sys.stderr)
        run.mkdir(parents=True)
        (run / "out").mkdir()
        _write_json(run / MANIFEST, fresh)
        return fresh
    try:
        doc = json.loads((run / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        if not force:
            raise LowbitError(f"{run} exists but its manifest is unreadable ({e}); remove it or pass --force") from None
        doc = None
    if not resume or doc is None:
        if not force:
            raise LowbitError(f"an interrupted run is in {run} ({doc['done']} steps done); pass --resume to continue "
                              "it or --force to start over")
        shutil.rmtree(run)
        return _open_run(run, identity, False, False)
    diffs = _mismatch(doc.get("identity", {}), identity)
    if diffs:
        raise LowbitError(f"{run} is from another run, cannot resume it ({'; '.join(diffs[:4])}); "
                          "use the same options, or pass --force (without --resume) to start over")
    return doc


# ---- the run -----------------------------------------------------------------------------------


@torch.no_grad()
def quantize_streamed(source: str | os.PathLike, output: str | os.PathLike, config,
                      calib: torch.Tensor | None = None, tokenizer=None, *, embed: str = "int8",
                      kernel: str = "auto", act_dtype: str = "fp32", offload: str | os.PathLike | None = None,
                      batch_size: int = 16, resume: bool = False, force: bool = False, progress: bool = True,
                      extra: dict | None = None, log=None, device: torch.device | None = None) -> StreamResult:
    """Quantize the safetensors checkpoint at ``source`` with RTN or a calibrated method that has a step of the
    layer walk (AWQ, GPTQ, AWQ+GPTQ: ``Method.layer_step``) into a sharded packed directory.

    ``device`` is where each layer's calibrated work runs (the walk moves it there and back before packing).

    ``act_dtype`` ("fp32" or "bf16") is how calibration hidden states are kept (bf16 halves them but
    changes the numbers); ``offload`` keeps them in files in that directory instead of memory.
    """
    start = time.perf_counter()
    _check_request(config, calib, act_dtype, embed)
    run = StreamRun(Path(source), Path(output), config, calib, embed=embed, kernel=kernel, act_dtype=act_dtype,
                    offload=offload, batch_size=batch_size, resume=resume, force=force,
                    log=log or (lambda msg: print(msg, file=sys.stderr)), device=device)
    with MatmulCount() as counted:
        run.steps(calib, progress)
    result = run.finish(tokenizer, extra, start)
    result.matmuls = counted.shapes
    return result


def own(name: str) -> str:
    """``name`` for this data-parallel worker's own copy (its share of the hidden states); ``name`` alone."""
    return f"{name}.rank{distributed.rank()}" if distributed.active() else name


def method_name(config) -> str:
    """The method as its packed file names it: GPTQ with act-order (alone or after AWQ) is GPTQ-R."""
    name = REGISTRY.of(config).name
    return f"{name}-r" if getattr(getattr(config, "gptq", config), "act_order", False) else name


def _settings(config) -> dict:
    """A config's settings for a run's identity (nested configs too), without its spec and search files."""
    return {k: _settings(v) if dataclasses.is_dataclass(v) and not isinstance(v, QuantSpec) else v
            for k, v in vars(config).items() if k not in ("spec", "load_search", "save_search")}


def _check_request(config, calib: torch.Tensor | None, act_dtype: str, embed: str) -> None:
    """Refuse what streaming cannot do before anything is read."""
    if type(config) not in {REGISTRY[name].config for name in REGISTRY.names(streams=True)}:
        raise LowbitError(f"streaming supports {', '.join(REGISTRY.names(streams=True))}, not "
                          f"{type(config).__name__}")
    awq = config if isinstance(config, AWQConfig) else getattr(config, "awq", None)
    if awq is not None and (awq.load_search or awq.save_search):
        raise LowbitError("streaming does not load or save AWQ searches; drop --load-search/--save-search")
    if REGISTRY.of(config).layer_step is not None and calib is None:
        raise LowbitError(f"{REGISTRY.of(config).name} needs calibration samples")
    if config.spec.rounding == "stochastic":
        raise LowbitError("streaming needs deterministic rounding (resuming must give the same result); "
                          "use --rounding nearest")
    if act_dtype not in ACT_DTYPES:
        raise LowbitError(f"activation dtype must be one of {', '.join(ACT_DTYPES)}, got {act_dtype!r}")
    if embed not in EMBED_CHOICES:
        raise LowbitError(f"embedding storage must be one of {', '.join(EMBED_CHOICES)}, got {embed!r}")


class StreamRun:
    """One streamed run: the empty model and its checkpoint, the run directory and its manifest, and the steps
    (the embedding, every decoder layer, the final norm and head), each committed as one shard."""

    def __init__(self, source: Path, output: Path, config, calib: torch.Tensor | None, *,
                 embed: str, kernel: str, act_dtype: str, offload, batch_size: int, resume: bool, force: bool,
                 log, device: torch.device | None = None) -> None:
        self.source, self.output, self.config, self.spec = source, output, config, config.spec
        self.method = method_name(config)
        self.calibrated = REGISTRY.of(config).layer_step is not None  # else RTN, which reads no activations
        self.embed, self.kernel, self.batch_size, self.device = embed, kernel, batch_size, device
        self.ckpt = LazyCheckpoint(source)
        self.model = model = empty_model(source)
        stored = {(n, tuple(p.shape)) for n, p in model.named_parameters()}
        self.family = family_for(model)
        if {(n, tuple(p.shape)) for n, p in model.named_parameters()} != stored:
            raise LowbitError(f"{self.family.name} stores some weights as Conv1D or 3-D expert tensors, which "
                              "streaming cannot read one linear at a time yet; quantize it in memory (lowbit quantize "
                              "without --stream)")
        linears = quantizable_linears(model, self.family)
        check_spec_fits(linears, self.spec)
        names = {id(m): n for n, m in model.named_modules()}
        self.emb_mod, self.head_mod = model.get_input_embeddings(), model.get_output_embeddings()
        self.tied = self.head_mod is not None and self.head_mod.weight is self.emb_mod.weight
        self.emb_name = names[id(self.emb_mod)]
        self.head_name = names[id(self.head_mod)] if self.head_mod is not None else None
        check_matches(model, self.ckpt, f"{self.head_name}.weight" if self.tied else None)
        check_output_dir(output, force)
        self.offload_dir = check_offload_dir(Path(offload)) if offload is not None else None
        self.layers = model.get_submodule(self.family.layers)
        self.n_steps = len(self.layers) + 2  # embedding, every layer, then the final norm and head
        self.estimate = estimate_output_bytes(model, self.spec, embed, linears)
        self.run = run_dir(output)
        self._check_space(calib, act_dtype, resume, log)
        identity = {
            "format_version": FORMAT_VERSION, "source": self.ckpt.fingerprint(), "method": self.method,
            "spec": self.spec.to_dict(),
            "config": _settings(config),
            "calib": calib_digest(calib), "embed": embed, "kernel": kernel, "act_dtype": act_dtype,
            "batch_size": batch_size, "offload": str(self.offload_dir.resolve()) if self.offload_dir else None,
            **({"workers": distributed.world_size()} if distributed.active() else {}),
        }
        # data-parallel workers share one run directory (one filesystem): the writer opens it, the others read it
        if is_writer():
            self.man = _open_run(self.run, identity, resume, force)
        distributed.barrier()
        if not is_writer():
            self.man = _open_run(self.run, identity, True, False)
        self.resumed_at = self.man["done"]
        dtype = ACT_DTYPES[act_dtype]
        self.store_dtype = None if dtype == torch.float32 else dtype
        self.layer_seconds: list[float] = []

    def _check_space(self, calib: torch.Tensor | None, act_dtype: str, resume: bool, log) -> None:
        act_bytes = 0
        if calib is not None:
            hidden_size = getattr(self.model.config, "hidden_size", 0)
            act_bytes = 2 * calib.numel() * hidden_size * ACT_DTYPES[act_dtype].itemsize  # two layers' states
        already = (sum(f.stat().st_size for f in (self.run / "out").glob("*.safetensors"))
                   if resume and self.run.exists() else 0)
        log = log if is_writer() else (lambda _msg: None)
        log(f"streaming {self.source} ({self.ckpt.nbytes() / 1e9:.2f} GB, {len(self.layers)} layers) -> "
            f"{self.output}: output about {self.estimate / 1e9:.2f} GB"
            + (f", calibration states {act_bytes / 1e9:.2f} GB" if act_bytes else ""))
        _check_disk(self.output.parent, self.estimate - already + (act_bytes if self.offload_dir is None else 0),
                    f"the output {self.output}")
        if self.offload_dir is not None:
            _check_disk(self.offload_dir, act_bytes, f"--offload-activations {self.offload_dir}")

    def new_store(self, step: int) -> Activations:
        if self.offload_dir is None:
            return Activations(self.store_dtype)
        d = self.offload_dir / own(f"hidden-{step}.tmp")
        shutil.rmtree(d, ignore_errors=True)
        return Activations(self.store_dtype, d)

    def keep_hidden(self, store: Activations, step: int) -> str:
        """Put the hidden states entering ``step`` where a resumed run finds them; returns that place, as the
        manifest names it (each data-parallel worker keeps its own share there: :func:`own`)."""
        place = (self.offload_dir or self.run) / f"hidden-{step}"
        final = Path(own(str(place)))
        shutil.rmtree(final, ignore_errors=True)
        if store.directory is None:
            tmp = self.run / own(f"hidden-{step}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            store.save(tmp)
            os.replace(tmp, final)
        else:
            os.replace(store.directory, final)
            store.directory = final
        return str(place)

    def commit(self, step: int, part: PackedModel | None, hidden_at: str | None,
               embed_info: dict | None = None) -> None:
        """Write ``step``'s shard and record it (and where the next step's inputs are) in the manifest: the
        writer, once every data-parallel worker has kept its inputs of the next step (the others pass None)."""
        man = self.man
        distributed.barrier()
        if is_writer():
            name = shard_name(step + 1, self.n_steps)
            man["shards"][name] = save_shard(part, self.run / "out" / name)
            man["entries"].update(part.entries)
            if embed_info:
                man["embedding"].update(embed_info)
        old = man.get("hidden")
        man["hidden"] = hidden_at
        man["done"] = step + 1
        if is_writer():
            _write_json(self.run / MANIFEST, man)
        if old and old != hidden_at:
            shutil.rmtree(own(old), ignore_errors=True)

    def steps(self, calib: torch.Tensor | None, progress: bool) -> None:
        """Every step not done yet, in order: the embedding (which starts the calibration), the decoder layers on
        the layer walk (:func:`lowbit.walk.walk_layers`, the in-memory methods' own), then the tail."""
        bar = tqdm(total=self.n_steps, initial=self.resumed_at, desc=f"stream {self.method}", unit="step",
                   disable=not progress or not is_writer())
        clock = [time.perf_counter()]

        def after(index: int, layer: nn.Module, hidden: Activations | None) -> None:
            if self.calibrated:
                part = pack_layer(layer, f"{self.family.layers}.{index}", self.family.linears, self.spec,
                                  self.kernel) if is_writer() else None
                release(layer)
                self.commit(index + 1, part, self.keep_hidden(hidden, index + 2))
            self.layer_seconds.append(time.perf_counter() - clock[0])
            clock[0] = time.perf_counter()
            bar.update(1)
            bar.set_postfix_str(f"peak RSS {peak_rss_mb() / 1024:.2f} GiB")

        try:
            inputs = self.embedding_step(calib) if self.resumed_at == 0 else self.kept_inputs()
            bar.update(self.resumed_at == 0)
            clock[0] = time.perf_counter()
            on = self.calibrated
            step = (REGISTRY.of(self.config).layer_step(self.model, self.family, self.config) if on
                    else LayerStep(self.rtn_layer, "float"))
            walk_layers(self.model, self.family, None, step.run, batch_size=self.batch_size,
                        desc=f"stream {self.method} layers", propagate=step.propagate,
                        streaming=Streaming(inputs, max(self.resumed_at, 1) - 1,
                                            lambda index: self.new_store(index + 2),
                                            self.read_layer if on else None, after),
                        device=self.device if on else None)
            if self.resumed_at < self.n_steps:
                self.tail_step()
                bar.update(1)
        finally:
            bar.close()

    def embedding_step(self, calib: torch.Tensor | None) -> tuple[Activations, list[Call]] | None:
        """Step 0: the float embedding starts the calibration (of a calibrated method), then it is packed."""
        materialise(self.emb_mod, self.emb_name, self.ckpt)
        inputs, hidden_at = None, None
        if self.calibrated:  # a data-parallel worker its share of the samples
            inputs = first_layer_batches(self.model, self.family, share(calib), self.batch_size, self.new_store(1))
            with atomic_path(self.run / own("layer_calls.pt")) as tmp:
                torch.save([c.state() for c in inputs[1]], tmp)
            hidden_at = self.keep_hidden(inputs[0], 1)
        part, info = None, None
        if is_writer():  # the embedding is also the head when tied, and packed as ``embed`` says
            part, info = pack_embedding_(self.emb_name, self.emb_mod, "embedding", self.embed, self.kernel,
                                         self.tied, update=False)
            if self.tied and getattr(self.head_mod, "bias", None) is not None:
                part.floats.update(self.ckpt.read([f"{self.head_name}.bias"], torch.float32))
        release(self.emb_mod)
        self.commit(0, part, hidden_at, {"embedding": info})
        return inputs

    def kept_inputs(self) -> tuple[Activations, list[Call]] | None:
        """A resumed calibrated run's hidden states entering its next layer, and every layer's call, as kept on
        disk."""
        if not self.calibrated or self.resumed_at > len(self.layers):
            return None
        calls = [Call.from_state(c) for c in torch.load(self.run / own("layer_calls.pt"), weights_only=True)]
        return Activations.load(Path(own(self.man["hidden"])), self.store_dtype,
                                keep_on_disk=self.offload_dir is not None), calls

    def read_layer(self, index: int, layer: nn.Module) -> None:
        materialise(layer, f"{self.family.layers}.{index}", self.ckpt)

    def rtn_layer(self, ctx: LayerContext) -> None:
        """RTN's step of the walk, which needs no calibration: each linear is read, rounded, packed and dropped in
        turn, then the layer's other tensors are read and the layer is committed."""
        prefix, rels = f"{self.family.layers}.{ctx.index}", self.family.linears
        if not is_writer():  # nothing to share out: the writer rounds and writes
            return self.commit(ctx.index + 1, None, None)
        part = PackedModel()
        for rel in rels:
            lin = ctx.layer.get_submodule(rel)
            materialise(lin, f"{prefix}.{rel}", self.ckpt)
            round_linears({rel: lin}, self.spec)
            merge_(part, pack_linear(f"{prefix}.{rel}", lin, self.spec, self.kernel))
            release(lin)
        done = {f"{rel}.weight" for rel in rels} | {f"{rel}.bias" for rel in rels}
        part.floats.update(self.ckpt.read([f"{prefix}.{k}" for k in ctx.layer.state_dict() if k not in done],
                                          torch.float32))
        self.commit(ctx.index + 1, part, None)

    def tail_step(self) -> None:
        """The last shard: every tensor outside the layers and the embedding (final norm), and an untied head."""
        if not is_writer():
            return self.commit(self.n_steps - 1, None, None)
        part, info = PackedModel(), {}
        if self.head_mod is not None and not self.tied:
            materialise(self.head_mod, self.head_name, self.ckpt)
            p, info["lm_head"] = pack_embedding_(self.head_name, self.head_mod, "lm_head", self.embed, self.kernel,
                                                 False, update=False)
            merge_(part, p)
            release(self.head_mod)
        skip = (f"{self.family.layers}.", f"{self.emb_name}.") + ((f"{self.head_name}.",) if self.head_name else ())
        part.floats.update(self.ckpt.read([k for k in self.model.state_dict() if not k.startswith(skip)],
                                          torch.float32))
        self.commit(self.n_steps - 1, part, None, info)

    def finish(self, tokenizer, extra: dict | None, start: float) -> StreamResult:
        """The shards become the output directory (config, tokenizer, index) and the run directory goes (the
        writer's work; the other data-parallel workers wait for it)."""
        if is_writer():
            self._install(tokenizer, extra)
        distributed.barrier()
        disk = sum(f.stat().st_size for f in self.output.iterdir() if f.is_file())
        return StreamResult(self.output, self.method, len(self.layers), self.resumed_at,
                            time.perf_counter() - start, self.layer_seconds, peak_rss_mb(), disk, self.estimate,
                            self.ckpt.nbytes())

    def _install(self, tokenizer, extra: dict | None) -> None:
        meta = packed_meta(self.method, self.spec, self.man["embedding"], self.tied, self.man["entries"],
                           self.family.name, torch.float32)
        finish = self.run / "out"
        write_index(finish, self.man["shards"])
        gen = None
        if (self.source / "generation_config.json").is_file():  # as from_pretrained reads it; from_config does not
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.source)
        finish_dir(finish, {**meta, **(extra or {})}, self.man["entries"], self.model.config, tokenizer, gen,
                   known=self.man["shards"])
        install_dir(finish, self.output)
        shutil.rmtree(self.run, ignore_errors=True)


def pack_layer(layer: nn.Module, prefix: str, rels: tuple[str, ...], spec: QuantSpec, kernel: str) -> PackedModel:
    """A rounded layer's linears packed, and its other tensors (norms) as they are now."""
    part = PackedModel()
    for rel in rels:
        merge_(part, pack_linear(f"{prefix}.{rel}", layer.get_submodule(rel), spec, kernel))
    done = {f"{rel}.weight" for rel in rels} | {f"{rel}.bias" for rel in rels}
    for k, t in layer.state_dict().items():
        if k not in done:
            part.floats[f"{prefix}.{k}"] = t.detach().clone()
    return part
