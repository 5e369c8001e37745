"""llama.cpp for the benchmarks, from the ``llama-cpp-python`` sdist on PyPI (no wheel for this platform).

Two builds, each once, into ignored folders of the repo:

- llama-cpp-python in its own venv (about 10-15 minutes on 2 cores); the benchmarks send it a small worker
  script and a JSON job and read one JSON line back;
- llama.cpp's command-line tools (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``), compiled with
  cmake from the sources the same sdist vendors, into ``.llamacpp-tools/`` (``python bench/llamacpp.py --tools``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP = "llama-cpp-python==0.3.36"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venv-llamacpp"
TOOLS_DIR = REPO / ".llamacpp-tools"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def ensure_llama_cpp(venv: str | os.PathLike = DEFAULT_VENV) -> Path:
    """The venv's python with ``llama_cpp`` importable, building it on first use."""
    venv = Path(venv)
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    print(f"building {LLAMA_CPP} into {venv} (once; about 15 minutes) ...", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", LLAMA_CPP, "numpy"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"installing {LLAMA_CPP} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    return python


def run_worker(python: Path, code: str, job: dict) -> dict:
    """Run ``code`` in the llama.cpp venv with ``job`` as argv[1]; its last stdout line is JSON."""
    proc = subprocess.run([str(python), "-c", code, json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"llama.cpp job {job} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_llama_tools(root: str | os.PathLike = TOOLS_DIR) -> Path:
    """The folder holding llama.cpp's ``llama-quantize``, ``llama-imatrix`` and ``llama-perplexity``, built
    from the sdist's vendored sources on first use (pip downloads the sdist; cmake + a C++ compiler needed)."""
    import shutil
    import tarfile

    root = Path(root)
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    if not shutil.which("cmake"):
        sys.exit("building llama.cpp's tools needs cmake (apt install cmake)")
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        name = "llama_cpp_python-" + LLAMA_CPP.split("==")[1]  # the sdist's file name
        sdist = root / f"{name}.tar.gz"
        if not sdist.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", str(root), LLAMA_CPP], check=True)
        print(f"extracting llama.cpp from {sdist.name} ...", file=sys.stderr, flush=True)
        prefix = f"{name}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            # not the submodule's ".git" link: it points into a repository the sdist does not ship, and cmake
            # would make the build depend on that repository's index (ninja then re-runs cmake forever)
            tar.extractall(src, members=[m for m in members if m.name and m.name != ".git"], filter="data")
    print(f"building {', '.join(TOOLS)} into {bin_dir} (once; about 10 minutes) ...", file=sys.stderr, flush=True)
    import time

    stray = src / ".git"  # (a source folder extracted before this rule)
    if stray.is_file() and stray.read_text().startswith("gitdir: ../"):
        stray.unlink()
    now = time.time()  # sources dated after this machine's clock keep ninja's manifest "dirty" forever
    for f in src.resolve().rglob("*"):
        if f.is_file() and f.stat().st_mtime > now:
            os.utime(f, (now, now))
    build = root / "build"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
             "-DBUILD_SHARED_LIBS=OFF"]
    if shutil.which("ninja"):
        flags += ["-G", "Ninja"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir


# ggml's AMX matrix products (weights repacked for Intel AMX, chosen by -march=native on a Xeon that has it)
# crash in ggml_backend_amx_mul_mat on this project's machine; repacking is turned off for every file alike
# (the plain CPU kernels, the same on every x86 machine).
RUNTIME_FLAGS = {"llama-perplexity": ("--no-repack",), "llama-imatrix": ("--no-repack",)}


def run_tool(bin_dir: Path, tool: str, *args: str) -> str:
    """Run one of llama.cpp's tools; its combined output (llama.cpp logs to stderr)."""
    args = (*args, *RUNTIME_FLAGS.get(tool, ()))
    proc = subprocess.run([str(Path(bin_dir) / tool), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        sys.exit(f"{tool} {' '.join(map(str, args))} failed:\n{tail}")
    return proc.stdout + proc.stderr


def llama_quantize(bin_dir: Path, src: Path, dst: Path, ftype: str, imatrix: Path | None = None,
                   threads: int = 2) -> None:
    args = ["--allow-requantize"] + (["--imatrix", imatrix] if imatrix else []) + [src, dst, ftype, threads]
    run_tool(bin_dir, "llama-quantize", *args)


def llama_imatrix(bin_dir: Path, model: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int = 2) -> None:
    run_tool(bin_dir, "llama-imatrix", "-m", model, "-f", text, "-o", out, "-c", ctx, "-b", ctx, "--chunks", chunks,
             "-t", threads, "--no-ppl")


def llama_perplexity(bin_dir: Path, model: Path, text: Path, ctx: int = 2048, chunks: int = 16,
                     threads: int = 2) -> float:
    """``llama-perplexity``'s final estimate (it scores the second half of each ``ctx``-token chunk)."""
    import re

    out = run_tool(bin_dir, "llama-perplexity", "-m", model, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks,
                   "-t", threads)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if m is None:
        sys.exit(f"llama-perplexity printed no final estimate for {model}:\n" + "\n".join(out.splitlines()[-10:]))
    return float(m.group(1))


# What ``llama-perplexity --kl-divergence`` prints; percentages (same top token, RMS of the probability change)
# are turned into fractions.
KLD_STATS = {"ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", "kld_mean": r"Mean\s+KLD:\s+([0-9.]+)",
             "kld_median": r"Median\s+KLD:\s+([0-9.]+)", "kld_p99": r"99\.0%\s+KLD:\s+([0-9.]+)",
             "kld_p999": r"99\.9%\s+KLD:\s+([0-9.]+)", "top1_agreement": r"Same top p:\s+([0-9.]+)",
             "rms_dp": r"RMS Δp\s*:\s+([0-9.]+)"}
PERCENT = ("top1_agreement", "rms_dp")


def kld_stats(out: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The named statistics of a ``llama-perplexity --kl-divergence`` run; one line and exit if one is missing."""
    import re

    stats = {}
    for key in keys:
        m = re.search(KLD_STATS[key], out)
        if m is None:
            sys.exit(f"llama-perplexity printed no {key}:\n" + "\n".join(out.splitlines()[-20:]))
        stats[key] = float(m.group(1)) / (100 if key in PERCENT else 1)
    return stats


def gguf_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds (matrices only)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) >= 2 and t.name != "token_embd.weight":
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="build llama.cpp for the benchmarks (once)")
    p.add_argument("--tools", action="store_true", help="the command-line tools (default: the Python venv)")
    a = p.parse_args()
    print(ensure_llama_tools() if a.tools else ensure_llama_cpp())
