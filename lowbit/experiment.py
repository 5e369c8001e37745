"""One quantize-then-evaluate run, and a comparison of several on one model and data.

The CLI and the benchmarks call these; they hold no parsing and no printing.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import options
from .calibration_data import Calibration, calibration_windows
from .data import eval_source, eval_text
from .device import placed
from .distributed import is_writer
from .errors import LowbitError
from .eval.perplexity import perplexity, tokenize_windows
from .methods import REGISTRY, ActQuantConfig, Pipeline, needs_calibration, quantize_
from .methods.base import detach_runtime
from .methods.rotation import RotationConfig
from .models.inventory import retie, tied_parameters
from .quantizer import QuantSpec, set_codes
from .specmap import SpecMap, base_spec, bits_per_weight, code_bits


@dataclass
class CalibOptions:
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    data: str | None = None  # a text file, a chat JSONL or a hub dataset (lowbit.calibration_data)


@dataclass
class BudgetOptions:
    """Mixed precision: a budget to allocate widths under, or an allocation to reuse (docs/mixed.md)."""

    bits_budget: float | None = None  # average code bits per weight
    size_budget_mb: float | None = None  # codes + group parameters of the quantized linears
    allocation: str | None = None  # reuse a saved allocation (its widths; the spec's other fields apply)
    save_allocation: str | None = None
    sensitivity: str | None = None  # a table from `lowbit sensitivity` instead of measuring traces
    cost: str = "hessian"  # hessian: HAWQ-v2 trace/n · ||W - Q_b(W)||²; loss: measured loss changes (from the table)
    choices: tuple[int, ...] = (2, 3, 4, 8)
    probes: int = 4  # Hutchinson probes
    samples: int = 4  # calibration samples the traces are measured on

    @property
    def active(self) -> bool:
        return self.bits_budget is not None or self.size_budget_mb is not None or self.allocation is not None

    def check(self) -> None:
        """Refuse contradictory or out-of-range options before anything slow runs."""
        from .allocation import check_choices

        given = [n for n, v in (("--bits-budget", self.bits_budget), ("--size-budget-mb", self.size_budget_mb),
                                ("--allocation", self.allocation)) if v is not None]
        if len(given) > 1:
            raise LowbitError(f"{' and '.join(given)} each choose the widths; give one")
        choices = check_choices(list(self.choices))
        b = self.bits_budget
        if b is not None and not (math.isfinite(b) and choices[0] <= b <= choices[-1]):
            raise LowbitError(f"--bits-budget {b:g} is outside the widths {choices[0]}..{choices[-1]} bits that can "
                              f"be chosen ({', '.join(map(str, choices))})")
        if self.size_budget_mb is not None and not self.size_budget_mb > 0:
            raise LowbitError(f"--size-budget-mb must be positive, got {self.size_budget_mb:g}")
        if self.cost not in ("hessian", "loss"):
            raise LowbitError(f"cost must be 'hessian' or 'loss', got {self.cost!r}")
        if self.cost == "loss" and self.sensitivity is None:
            raise LowbitError("--cost loss reads measured loss changes from a table: add --sensitivity FILE "
                              "(from lowbit sensitivity --bits 2 3 4 8 -o FILE)")
        if self.probes < 1 or self.samples < 1:
            raise LowbitError("--probes and --sensitivity-samples must be at least 1")
        if not self.active and (self.save_allocation or self.sensitivity):
            raise LowbitError("--save-allocation and --sensitivity need a budget: add --bits-budget or "
                              "--size-budget-mb")


class MethodOptions(options.MethodOptions):
    """Every method's options by name (``n_grid``, ``act_order``, ``qat_steps``, ...): declared on the configs
    below, plus the pipeline's own (a rotation first, activation quantization last)."""

    configs = REGISTRY.configs_with_options()
    extra = {"rotate": False, "a_bit": None, "a_granularity": "token", "a_static": False}


def make_config(method: str, spec: QuantSpec | SpecMap | None, opts: MethodOptions):
    """The config for a method name and options: one config, a Pipeline of several, or None (the float model).

    Order: a rotation of the float model (``--rotate``), the method's own steps as its declaration builds them
    (SmoothQuant: the smoothing, then RTN), then activation quantization at run time.
    """
    declared = REGISTRY[method]
    if method != "fp" and spec is None:
        raise LowbitError(f"method {method} needs a quantization spec")
    if isinstance(spec, SpecMap) and not declared.mixed:
        raise LowbitError(f"method {method} takes one spec for all linears; a bit allocation (--bits-budget, "
                          f"--size-budget-mb, --allocation) works with {', '.join(MIXED_METHODS)}")
    steps = (*((RotationConfig(seed=opts.seed),) if opts.rotate else ()), *declared.build(spec, opts))
    if opts.a_bit is not None and not declared.own_activations:
        steps += (ActQuantConfig(bits=opts.a_bit, granularity=opts.a_granularity, static=opts.a_static),)
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else Pipeline(steps)


# the methods that take a per-linear SpecMap
MIXED_METHODS = REGISTRY.names(mixed=True)


def check_positions(model: nn.Module, seq_len: int, window: str = "evaluation", flag: str = "--seq-len") -> None:
    """Refuse ``window`` windows (set by ``flag``) longer than a model with learned position embeddings (GPT-2,
    OPT) has rows for; rotary and ALiBi models run at any length."""
    token = model.get_input_embeddings()
    if not any(isinstance(m, nn.Embedding) and m is not token for m in model.modules()):
        return
    cfg = getattr(model, "config", None)
    limit = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(cfg, k, None), int)), None)
    if limit is not None and seq_len > limit:
        raise LowbitError(f"{seq_len}-token {window} windows are longer than the model's {limit} positions; "
                          f"use {flag} of at most {limit}")


def size_info(model: nn.Module, spec: QuantSpec | SpecMap) -> dict:
    """Code bits per weight and the size of the quantized linears (codes + group parameters) in MB."""
    from .models.families import family_for
    from .models.inventory import quantizable_linears

    linears = quantizable_linears(model, family_for(model))
    n = sum(m.weight.numel() for m in linears.values())
    return {"code_bits": round(code_bits(spec, linears), 4),
            "linear_mb": round(bits_per_weight(spec, linears) * n / 8e6, 4)}


@dataclass
class RunResult:
    method: str
    spec: QuantSpec | SpecMap | None
    ppl: float
    windows: int
    tokens: int
    bits_per_weight: float
    quant_seconds: float
    eval_seconds: float
    info: dict = field(default_factory=dict)

    def row(self) -> dict:
        """A flat, JSON-friendly record of this run."""
        s = base_spec(self.spec)
        mixed = isinstance(self.spec, SpecMap)
        return {
            "method": self.method,
            "ppl": self.ppl,
            "windows": self.windows,
            "tokens": self.tokens,
            "w_bit": "mixed" if mixed else (s.bits if s else 16),
            "format": s.format if s else "fp",
            "group_size": s.group_size if s and s.granularity == "group" else None,
            "sym": s.symmetric if s else None,
            **({"full_range": True} if s is not None and s.full_range else {}),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "quant_seconds": round(self.quant_seconds, 2),
            "eval_seconds": round(self.eval_seconds, 2),
            "seconds": round(self.quant_seconds + self.eval_seconds, 2),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }


class Session:
    """A loaded model with its float weights kept aside, so methods can be run one after another."""

    def __init__(self, model: nn.Module, tokenizer, *, text: str | None = None, data_dir: str | None = None,
                 seq_len: int = 2048, max_windows: int | None = None, calib: CalibOptions | None = None,
                 split: str = "test", data: str | None = None, evaluates: bool = True,
                 device: torch.device | None = None):
        """``device`` is the execution device (None: where the model is). ``text`` is the evaluation text
        (default: WikiText-2 ``split``, test or dev, from ``data_dir`` or the hub,
        read when first needed, so a run that only quantizes works without it); ``data`` names it in result rows.
        Window lengths are checked against the model when used: evaluation's now unless ``evaluates`` is False,
        calibration's when calibrating."""
        from .models.families import family_for

        family_for(model)  # adapts the structure (experts as linears) before the float weights are kept
        calib = calib or CalibOptions()
        if evaluates:
            check_positions(model, seq_len)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.data_dir = data_dir
        eval_source(None, split)  # an unknown split fails here, not at the first evaluation
        self.split = split
        self.data = data if data is not None else eval_source(None, split) if text is None else None
        self._eval = (text, seq_len, max_windows)
        self._windows: torch.Tensor | None = None
        self.calib_options = calib
        self._calib: torch.Tensor | None = None
        self.calibration_record: Calibration | None = None
        self._float_state = copy.deepcopy(model.state_dict())
        self.last_mix = None  # the GGUF AUTO choice of the last gguf_mix call (its types and predictions)
        # A rotation unties a tied head; loading the state dict alone would leave two equal copies.
        self._ties = tied_parameters(model)
        self._tie_flag = getattr(getattr(model, "config", None), "tie_word_embeddings", None)

    @property
    def windows(self) -> torch.Tensor:
        """The evaluation windows [n, seq_len] (tokenized once)."""
        if self._windows is None:
            text, seq_len, max_windows = self._eval
            check_positions(self.model, seq_len)
            text = eval_text(None, self.data_dir, self.split) if text is None else text
            self._windows = tokenize_windows(self.tokenizer, text, seq_len, max_windows)
        return self._windows

    def use_calibration(self, calib: CalibOptions) -> None:
        """Calibrate the next runs on other data (read when first needed)."""
        check_positions(self.model, calib.seq_len, "calibration", "--calib-seq-len")
        self.calib_options, self._calib, self.calibration_record = calib, None, None

    def calibration(self) -> torch.Tensor:
        """The calibration windows [samples, seq_len] (read once); where they came from: ``calibration_record``."""
        if self._calib is None:
            c = self.calib_options
            check_positions(self.model, c.seq_len, "calibration", "--calib-seq-len")
            self._calib, self.calibration_record = calibration_windows(self.tokenizer, c.data, self.data_dir,
                                                                       c.samples, c.seq_len, c.seed)
        return self._calib

    def restore(self) -> None:
        """The float model again: its weights, and no run-time hooks of an earlier method."""
        detach_runtime(self.model)
        retie(self.model, self._ties)
        if self._tie_flag is not None:
            self.model.config.tie_word_embeddings = self._tie_flag
        self.model.load_state_dict(self._float_state)
        for m in self.model.modules():  # the float weights have no codes
            set_codes(m, None)

    def float_model(self) -> nn.Module:
        """A second module with the float weights, before any method changed them (the reference of ``--kld``).
        Its tensors are the ones kept for :meth:`restore` (shared, never written), so it costs no extra weights."""
        self.restore()
        memo = {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            kept = self._float_state[key]
            memo[id(t)] = nn.Parameter(kept, requires_grad=False) if isinstance(t, nn.Parameter) else kept
        return copy.deepcopy(self.model, memo)

    def evaluation_device(self) -> torch.device | None:
        """Where the model is evaluated: the execution device, or the CPU while it holds torch's CPU-only packed
        kernels (a packed model loaded for another device takes the unpack kernel instead)."""
        from .pack.kernels import cpu_only

        return torch.device("cpu") if self.device is not None and cpu_only(self.model) else self.device

    def perplexity(self, windows: torch.Tensor | None = None, progress: bool = True):
        """The model's perplexity on ``windows`` (default: the evaluation windows), run on the execution device."""
        with placed(self.model, self.evaluation_device()):
            return perplexity(self.model, self.windows if windows is None else windows, progress=progress)

    def allocate(self, base: QuantSpec, budget: BudgetOptions, progress: bool = True) -> SpecMap:
        """Each linear's width under ``budget`` (or from a saved allocation), chosen on the float model."""
        from .allocation import Allocation, allocate_bits, check_choices, hawq_costs, loss_costs
        from .models.families import family_for
        from .models.inventory import quantizable_linears
        from .sensitivity import hutchinson_traces, load_table, table_deltas, table_traces

        budget.check()
        self.restore()
        linears = quantizable_linears(self.model, family_for(self.model))
        if budget.allocation is not None:
            alloc = Allocation.load(budget.allocation)
            alloc.check_model(linears)
            alloc.base = base
        else:
            choices = check_choices(list(budget.choices))
            if budget.sensitivity is not None:
                table = load_table(budget.sensitivity)
                if budget.cost == "loss":
                    costs = loss_costs(list(linears), table_deltas(table), choices)
                else:
                    costs = hawq_costs(linears, table_traces(table), base, choices)
                source = {"sensitivity": str(budget.sensitivity)}
            else:
                calib = self.calibration()[: budget.samples]
                traces = hutchinson_traces(self.model, calib, budget.probes, seed=self.calib_options.seed,
                                           progress=progress)
                costs = hawq_costs(linears, traces, base, choices)
                source = {"probes": budget.probes, "calib": list(calib.shape)}
            alloc = allocate_bits(linears, costs, base, bits_budget=budget.bits_budget,
                                  size_budget_mb=budget.size_budget_mb, choices=choices)
            alloc.meta.update(cost_model=budget.cost, **source)
        if budget.save_allocation and is_writer():  # one data-parallel worker writes
            alloc.save(budget.save_allocation)
        return alloc.spec_map()

    def gguf_mix(self, types, target_bpw: float | None = None, target_bytes: int | None = None,
                 sensitivity: str | None = None, save_sensitivity: str | None = None, dev_windows: int = 2,
                 dev_seq_len: int = 512, source_model: str | None = None, embed: str | None = None,
                 progress: bool = True, check_windows: int | None = None):
        """Each linear's GGUF type under ``target_bpw`` bits per linear weight or a whole file of ``target_bytes``
        (for the GGUF of ``source_model``), chosen by the KLD each type causes alone, measured on ``dev_windows``
        × ``dev_seq_len`` tokens of the dev text (or read from ``sensitivity``): a :class:`lowbit.gguf_mix.Mix`.
        Under ``target_bytes`` the embedding's type is chosen with the linears' unless ``embed`` fixes its
        storage (``--embed``; int8 otherwise). The best predicted mixes are then measured whole on
        ``check_windows`` dev windows (default :data:`lowbit.gguf_mix.CHECK_WINDOWS`) and the lowest wins."""
        from . import gguf_mix
        from .data import dev_text
        from .export.gguf import gguf_linear_names
        from .formats.ggml import GGML_TYPES
        from .models.families import family_for
        from .models.inventory import quantizable_linears

        types = gguf_mix.check_types(types)
        if (target_bpw is None) == (target_bytes is None):
            raise LowbitError("give exactly one budget: --target-bpw (bits per linear weight) or --target-size")
        if target_bpw is not None and (not math.isfinite(target_bpw) or target_bpw <= 0):
            raise LowbitError(f"--target-bpw must be a positive number of bits per weight, got {target_bpw:g}")
        self.restore()

        check_windows = gguf_mix.CHECK_WINDOWS if check_windows is None else check_windows

        @functools.cache
        def dev_windows_text():  # read and tokenized once, for the measurement and the whole-mix check alike
            check_positions(self.model, dev_seq_len, "dev", "--dev-seq-len")
            return tokenize_windows(self.tokenizer, dev_text(self.data_dir), dev_seq_len,
                                    max(dev_windows, check_windows))

        def dev_tokens(n: int = dev_windows) -> torch.Tensor:
            return dev_windows_text()[:n]
        linears = quantizable_linears(self.model, family_for(self.model))
        embeddings = gguf_mix.embedding_modules(self.model)
        known = None if sensitivity is None else gguf_mix.Sensitivity.load(sensitivity)
        if known is not None and save_sensitivity is None:  # measured before: used as it is
            known.check_model(linears, types, embeddings)
            sens = known
        else:  # measured now, or what the file lacks measured and the whole saved
            dev = dev_tokens()
            with placed(self.model, self.device):
                sens = gguf_mix.measure(self.model, self.calibration(), dev, types, progress=progress, known=known)
            sens.meta.update(dev_text="WikiText-2 validation (dev part)",
                             calibration=self.calibration_record.describe())
            if save_sensitivity is not None and is_writer():
                sens.save(save_sensitivity)
        if embed is not None or target_bytes is None:  # the embedding's storage is fixed: the linears are chosen
            sens = sens.without_embeddings()
        weights = sum(r * c for r, c in sens.shapes.values())
        stacked = gguf_linear_names(self.model, list(linears))  # experts stacked into one tensor take one type
        if target_bytes is not None:
            overhead = gguf_mix.file_overhead(self.model, self.tokenizer, source_model, embed or "int8")
            # a chosen embedding's bytes come out of the probe's (int8 in blocks of 32: Q8_0)
            for n in sens.embeddings:  # (another type's bytes may need up to 31 more of alignment padding)
                rows = sens.shapes[n][0]
                overhead += (31 if rows % 32 else 0) - gguf_mix.tensor_bytes(GGML_TYPES["q8_0"], sens.shapes[n])
            mixes = gguf_mix.alternatives(sens, types, target_bytes - overhead, overhead, groups=stacked)
            mix = mixes[0]
            if len(mixes) > 1:  # the best predicted mix per embedding type, measured whole on dev: the best wins
                with placed(self.model, self.device):
                    klds = gguf_mix.whole_klds(self.model, self.calibration(), dev_tokens(check_windows), mixes)
                mix = mixes[min(range(len(mixes)), key=klds.__getitem__)]
                mix.meta.update(dev_kld=min(klds), check_windows=len(dev_tokens(check_windows)), candidates=[
                    {"embedding": m.embed, "predicted_kld": m.meta["predicted_kld"], "dev_kld": k,
                     "linear_bytes": m.meta["linear_bytes"]} for m, k in zip(mixes, klds)])
            mix.meta.update(target_bytes=target_bytes, predicted_file_bytes=mix.meta["chosen_bytes"] + overhead)
        else:
            mix = gguf_mix.choose(sens, types, math.floor(target_bpw * weights / 8), groups=stacked)
            mix.meta.update(target_bpw=target_bpw)
        mix.meta.update(types=[t.upper() for t in types])
        self.last_mix = mix
        return mix

    def run(self, method: str, spec: QuantSpec | SpecMap | None, opts: MethodOptions | None = None,
            progress: bool = True, label: str | None = None, evaluate: bool = True,
            bound: bool = False) -> RunResult:
        """Quantize the float model with ``method`` and (unless told not to) measure its perplexity; ``bound``
        also times the run's matrix products on this machine, for its lower bound (:mod:`lowbit.flops`)."""
        self.restore()
        config = make_config(method, spec, opts or MethodOptions())
        quant_seconds, bpw, info, name = 0.0, 16.0, {}, method
        if config is not None:
            calib = self.calibration() if needs_calibration(config) else None
            start = time.perf_counter()
            report = quantize_(self.model, config, calib, device=self.device, count_matmuls=bound)
            quant_seconds, bpw, name = time.perf_counter() - start, report.bits_per_weight, report.method
            info = {k: v for k, v in report.info.items() if k != "search"}
            if bound:
                info.update(report.lower_bound().row(quant_seconds))
            if calib is not None:
                info["calibration"] = self.calibration_record.describe()
            if spec is not None:
                info.update(size_info(self.model, spec))
        if not evaluate:
            return RunResult(label or name, spec, math.nan, 0, 0, bpw, quant_seconds, 0.0, info)
        res = self.perplexity(progress=progress)
        if self.data is not None:
            info["data"] = self.data
        return RunResult(label or name, spec, res.ppl, res.windows, res.tokens, bpw, quant_seconds, res.seconds, info)
