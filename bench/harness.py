"""What every benchmark shares: the run's arguments, declared once, and resuming a row file by settings.

An argument such as ``--calib-samples`` means the same thing, parses the same way and reads the same in
``--help`` in every script; a script passes its own default where it differs (the Gemma family table's
group of 128). Rows themselves (where, when and how they were measured, appended to
``bench/results/*.jsonl``) and the machine line of every table's header are :mod:`rows`; the peers'
venvs are ``bench/peers.py``'s.

    import harness
    harness.add_run_args(p, "model", "group_size", "calib_samples", max_windows=8)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (str(REPO), str(BENCH)):  # this checkout's lowbit, and bench/'s modules (bench/ is not a package)
    if _path not in sys.path:
        sys.path.insert(0, _path)
import rows  # noqa: E402

from lowbit.options import non_negative_int, positive_int  # noqa: E402

positive = positive_int  # bench/peers.py's counts: the CLI's own parser


# name -> (parser, default, help): the run settings every benchmark states the same way
RUN_ARGS = {
    "model": (str, "smollm2-135m", "lowbit model name, checkpoint directory or .gguf file"),
    "group_size": (non_negative_int, 64, "quantization group size along the input (0: per output channel)"),
    "calib_samples": (positive, 16, "calibration sequences"),
    "calib_seq_len": (positive, 512, "tokens per calibration sequence"),
    "max_windows": (positive, 16, "2048-token evaluation windows"),
    "seed": (int, 0, "calibration sample seed"),
}


def add_run_args(p: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the run arguments ``names`` (keys of :data:`RUN_ARGS`) to ``p``; ``defaults`` overrides a default."""
    for name in names:
        parse, default, text = RUN_ARGS[name]
        default = defaults.get(name, default)
        p.add_argument(f"--{name.replace('_', '-')}", type=parse, default=default,
                       help=f"{text} (default {default})")


def measured(path: str | Path, key: dict, commit: str | None) -> bool:
    """Whether the row file at ``path`` already holds a row with every setting of ``key``, measured at
    ``commit`` (a run that resumes skips it; another commit measures it again)."""
    path = Path(path)
    return path.exists() and any(all(r.get(k) == v for k, v in key.items()) and r.get("commit") == commit
                                 for r in rows.read_rows(path))
