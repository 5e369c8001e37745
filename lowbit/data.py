"""Where evaluation and calibration text comes from.

Lookup order: an explicit ``data_dir``, then ``$LOWBIT_DATA_DIR``, then the Hugging Face
hub. Test text is for evaluation only and validation text for calibration only, so the
two never overlap.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import LowbitError

TEST_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
CALIB_FILE = Path("wikitext-2") / "valid.txt"
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
HUB_CALIB = ("mit-han-lab/pile-val-backup", None)
HUB_CALIB_ROWS = 20000  # pile-val's first rows: plenty for any calibration set, without reading all 214k


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file with line endings normalised to ``\\n``."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"data file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"data file {p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise LowbitError(f"cannot read data file {p}: {e.strerror}") from None
    return text.replace("\r\n", "\n")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory to use, or None to go to the hub."""
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise LowbitError(f"--data-dir {p} is not a directory")
        return p
    env = os.environ.get("LOWBIT_DATA_DIR")
    if env:
        p = Path(env)
        if not p.is_dir():
            raise LowbitError(f"LOWBIT_DATA_DIR={env} is not a directory")
        return p
    return None


def fetch_hub_rows(name: str, config: str | None, split: str, limit: int | None = None) -> list[dict]:
    """Rows of a Hugging Face hub dataset (the first ``limit``), or one clear error when it cannot be had."""
    try:
        import datasets
    except ImportError:
        raise LowbitError(
            "no local data directory (set LOWBIT_DATA_DIR or --data-dir) and the `datasets` package "
            "is not installed to fetch it from the Hugging Face hub"
        ) from None
    import logging

    # The hub client logs every retry; the one message below says what went wrong.
    for logger in ("huggingface_hub", "datasets", "fsspec"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 -- the hub client raises many types for "offline"
        raise LowbitError(
            f"could not fetch {name} ({split}) from the Hugging Face hub: {type(e).__name__}. "
            "Offline? Point LOWBIT_DATA_DIR or --data-dir at a local copy (see README)."
        ) from None
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return ds.to_list()


def _from_hub(name: str, config: str | None, split: str, column: str = "text", limit: int | None = None) -> list[str]:
    return [r[column] for r in fetch_hub_rows(name, config, split, limit)]


def eval_text(data: str | None = None, data_dir: str | None = None) -> str:
    """WikiText-2 test text (or the file ``data``), as the evaluation protocol reads it."""
    if data is not None:
        return read_text(data)
    d = resolve_data_dir(data_dir)
    if d is not None:
        return read_text(d / TEST_FILE)
    rows = _from_hub(*HUB_DATASET, split="test")
    # The local copy keeps rows in order and drops empty ones; do the same online.
    return "".join(r for r in rows if r.strip() != "")


def calib_text(calib_data: str | None = None, data_dir: str | None = None) -> str:
    """Calibration text: a given file, the local WikiText-2 validation split, or pile-val online."""
    if calib_data is not None:
        return read_text(calib_data)
    d = resolve_data_dir(data_dir)
    if d is not None:
        return read_text(d / CALIB_FILE)
    return "\n\n".join(_from_hub(*HUB_CALIB, split="validation", limit=HUB_CALIB_ROWS))
