"""Result rows: one JSON object per line in bench/results/<name>.jsonl, each with where and how it was measured.

A benchmark takes its context before a row runs (the load average must not count the row itself), measures,
then appends:

    ctx = rows.context("python bench/ptq_table.py")
    ...                                    # quantize and evaluate
    rows.append_row("ptq_table", {**ctx, "split": "wikitext-2 test", "ppl": 40.32, "kld_mean": None,
                                  "bits_per_weight": 3.2969, "file_bytes": None, "seconds": 102.8,
                                  "method": "awq", "bits": 3, "group": 64, "tool": "lowbit"})

`seconds` is the quantization time (evaluation excluded). A table in the docs is regenerated from these rows by
bench/report.py; a re-measured row is appended, never edited, and the last matching row wins.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent

# every row has these; kld_mean and file_bytes may be None (not measured)
REQUIRED = ("command", "commit", "date", "machine", "load_avg", "split", "ppl", "kld_mean", "bits_per_weight",
            "file_bytes", "seconds")


def results_path(name: str | Path) -> Path:
    """`name` as a row file: a bare name becomes bench/results/<name>.jsonl, a path is kept."""
    path = Path(name)
    if path.suffix != ".jsonl" and len(path.parts) == 1:
        return RESULTS / f"{path}.jsonl"
    return path


def commit(root: Path = ROOT) -> str | None:
    """The short commit of HEAD, with '+dirty' when tracked files other than the row files differ from it; None
    outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        # the row files themselves are appended during a run: they do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """CPU model, AVX-512 (and its BF16 extension), cores, torch version and threads."""
    model, flags = None, set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        import torch
        torch_version, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, threads = None, None
    return {"cpu": model, "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "torch": torch_version, "threads": threads}


def machine_line(m: dict | None = None) -> str:
    """The machine as one line for a table's header: CPU, AVX-512 (BF16), cores, torch, threads and the load now,
    the same in every benchmark."""
    m = m or machine()
    avx = "AVX-512 BF16" if m["avx512_bf16"] else "AVX-512" if m["avx512"] else "no AVX-512"
    return (f"{m['cpu'] or 'unknown CPU'} ({avx}), {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
            f"load average {load_avg()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def load_avg() -> float | None:
    """The 1-minute load average now (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def context(command: str) -> dict:
    """What a row states about its run, taken before it runs: command, commit, UTC date, machine, load."""
    return {"command": command, "commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "load_avg": load_avg()}


def append_row(path: str | Path, row: dict) -> Path:
    """Append `row` as one JSON line to the row file `path` (a name means bench/results/<name>.jsonl)."""
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise ValueError(f"row lacks {', '.join(missing)}: take rows.context(command) before the run and add "
                         f"split, ppl, kld_mean, bits_per_weight, file_bytes and seconds")
    path = results_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a row file, in the order appended."""
    path = results_path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON row ({e.msg})") from None
    return rows
