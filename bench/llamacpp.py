"""llama-cpp-python for the benchmarks: built once into its own venv, driven through a subprocess.

llama-cpp-python has no wheel for this platform on PyPI, so it is compiled from source (about
10-15 minutes on 2 cores) into a separate venv; the benchmarks send it a small worker script and a
JSON job and read one JSON line back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP = "llama-cpp-python==0.3.36"
DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".venv-llamacpp"


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
