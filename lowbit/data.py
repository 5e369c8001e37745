"""Where evaluation and calibration text comes from.

Lookup order: an explicit ``data_dir``, then ``$LOWBIT_DATA_DIR``, then the Hugging Face hub.
Evaluation reads WikiText-2 **test**; calibration reads WikiText-2 **validation**, so the two
never overlap. Validation is cut once, at a fixed article boundary, into a calibration part
(before the cut) and a **dev** part (after it): calibration windows come only from the first,
so the dev part can be scored to choose options without touching test and without scoring
text the model was calibrated on.

The cut: the start of the title line `` = Military history of Australia = `` (``CUT_TITLE``), the
start of an article, at 70.4 % of the text. In the local file (``wikitext-2/valid.txt``, word-level,
3,760 lines, 1,121,681 bytes) that is line 2,723 (1-based) at byte 789,891 (character 788,790):

    part                      articles   lines          bytes      SmolLM2-135M tokens
    calibration (before)      46         1-2,722        789,891    193,616
    dev (from the title on)   14         2,723-3,760    331,790    80,252 (39 windows of 2048)

The two parts tokenize to the whole text's 273,868 tokens. The nearest article boundary after 75 %
(`` = Ward Churchill = `` at 79.9 %) would leave 27 dev windows; this one leaves 39 and keeps
193,616 calibration tokens, three times the default 128 × 512.

Online, the same validation text is rebuilt from the hub's word-level rows
(``Salesforce/wikitext``, ``wikitext-2-v1``): :func:`wikitext_from_rows`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import LowbitError

TEST_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
CALIB_FILE = Path("wikitext-2") / "valid.txt"
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")  # evaluation: raw test
HUB_VALIDATION = ("Salesforce/wikitext", "wikitext-2-v1")  # calibration and dev: word-level validation, as valid.txt
HUB_CALIB_ROWS = 20000  # a hub dataset's first rows: plenty for any calibration set (pile-val has 214k)
PILE_VAL = "hub:mit-han-lab/pile-val-backup"  # AWQ's calibration corpus, only when asked for: --calib-data PILE_VAL

CUT_TITLE = " = Military history of Australia = "
CUT_LINE = 2722  # lines of the calibration part (the title's 0-based line index) in WikiText-2 validation
CUT_BYTE = 789891  # UTF-8 bytes of the calibration part
SPLITS = ("test", "dev")
SOURCES = {"test": "wikitext-2 test", "dev": "wikitext-2 validation, dev part"}
CALIB_SOURCE = "wikitext-2 validation, calibration part"


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


def local_file(d: Path, name: Path) -> Path:
    """``d / name``, or one error naming the path looked for (never a fall-back to another corpus)."""
    p = d / name
    if not p.is_file():
        raise LowbitError(f"data file not found: {p} (the data directory {d} needs {name}; see its README)")
    return p


def fetch_hub_rows(name: str, config: str | None, split: str | None, limit: int | None = None) -> list[dict]:
    """Rows of a Hugging Face hub dataset (the first ``limit``), or one clear error when it cannot be had.
    ``split`` None: ``train`` if the dataset has one, else its first split (pile-val has only ``validation``)."""
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
        if split is None:
            names = list(datasets.get_dataset_split_names(name, config))
            split = "train" if "train" in names or not names else names[0]
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 -- the hub client raises many types for "offline"
        raise LowbitError(
            f"could not fetch {name} ({split or 'its default split'}) from the Hugging Face hub: "
            f"{type(e).__name__}. Offline? Point LOWBIT_DATA_DIR or --data-dir at a local copy (see README)."
        ) from None
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return ds.to_list()


def _from_hub(name: str, config: str | None, split: str, column: str = "text", limit: int | None = None) -> list[str]:
    return [r[column] for r in fetch_hub_rows(name, config, split, limit)]


def wikitext_from_rows(rows: list[str]) -> str:
    """The word-level WikiText file the hub's rows were read from. The hub keeps each line of the file as a row
    with its ``\\n``, and an empty line (``" \\n"`` in the word-level files) as ``""``; put those back."""
    return "".join(r if r.strip() else " \n" for r in rows)


def validation_text(data_dir: str | None = None) -> str:
    """All of WikiText-2 validation (word-level), from the data directory or rebuilt from the hub's rows."""
    d = resolve_data_dir(data_dir)
    if d is not None:
        return read_text(local_file(d, CALIB_FILE))
    return wikitext_from_rows(_from_hub(*HUB_VALIDATION, split="validation"))


def cut_offset(text: str) -> int:
    """Where the dev part starts in ``text``: the start of its one line ``CUT_TITLE``."""
    hits = [m.start() + 1 for m in re.finditer(re.escape("\n" + CUT_TITLE + "\n"), text)]
    if len(hits) != 1:
        raise LowbitError(f"the calibration/dev cut, the line {CUT_TITLE.strip()!r}, appears {len(hits)} times in "
                          "this validation text, not once: it is not WikiText-2 validation (word-level, "
                          "wikitext-2/valid.txt)")
    return hits[0]


def split_validation(text: str) -> tuple[str, str]:
    """(calibration part, dev part) of WikiText-2 validation: disjoint, and together the whole text."""
    at = cut_offset(text)
    return text[:at], text[at:]


def eval_source(data: str | os.PathLike | None = None, split: str = "test") -> str:
    """What an evaluation reads, as a result row names it: the file given, or the WikiText-2 text of ``split``."""
    if data is not None:
        return str(data)
    if split not in SOURCES:
        raise LowbitError(f"unknown evaluation split {split!r}; choose from {', '.join(SPLITS)}")
    return SOURCES[split]


def eval_text(data: str | None = None, data_dir: str | None = None, split: str = "test") -> str:
    """Evaluation text: the file ``data``, else WikiText-2 test (``split="test"``) or validation's dev part
    (``split="dev"``), as the evaluation protocol reads them."""
    if data is not None:
        return read_text(data)
    eval_source(None, split)
    if split == "dev":
        return dev_text(data_dir)
    d = resolve_data_dir(data_dir)
    if d is not None:
        return read_text(local_file(d, TEST_FILE))
    rows = _from_hub(*HUB_DATASET, split="test")
    # The local copy keeps rows in order and drops empty ones; do the same online.
    return "".join(r for r in rows if r.strip() != "")


def calib_text(calib_data: str | None = None, data_dir: str | None = None) -> str:
    """Calibration text: a given file, else the calibration part of WikiText-2 validation (local or hub)."""
    return read_text(calib_data) if calib_data is not None else split_validation(validation_text(data_dir))[0]


def dev_text(data_dir: str | None = None) -> str:
    """The dev part of WikiText-2 validation (local or hub): never calibrated on, never test."""
    return split_validation(validation_text(data_dir))[1]
