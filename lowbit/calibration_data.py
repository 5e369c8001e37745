"""Calibration data of the user's choosing, as token windows, with a record of where they came from.

``--calib-data`` takes:

- nothing: the calibration part of WikiText-2 validation, from the data directory or the hub (never its dev
  part, never test: :mod:`lowbit.data`);
- a text file: its text;
- a JSONL file, one conversation per line (``{"messages": [{"role": ..., "content": ...}, ...]}``), each
  rendered with the tokenizer's chat template, as the model sees chats; lines with ``{"text": ...}``
  are taken as they are;
- ``hub:NAME[:CONFIG][@SPLIT]`` or a Hugging Face dataset id ``org/name`` that is not a local path: its
  ``messages`` (chats) or ``text`` column, fetched with ``datasets``; without ``@SPLIT``, its ``train`` split or
  else its first (AWQ's pile-val, asked for by name only: ``hub:mit-han-lab/pile-val-backup``).

Documents are tokenized one by one and joined; windows of ``seq_len`` tokens are then drawn at random
without overlap (seeded), as :func:`calib_samples` does for plain text.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import CALIB_SOURCE, HUB_CALIB_ROWS, calib_text, read_text
from .errors import LowbitError

HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class Calibration:
    """Where the calibration windows came from and how they were drawn: stated in reports and packed files."""

    source: str  # "wikitext-2 validation, calibration part", a file path, or hub:NAME...
    kind: str  # text, chat, hub-text, hub-chat
    documents: int
    tokens: int
    samples: int
    seq_len: int
    seed: int

    def describe(self) -> str:
        unit = "conversations" if self.kind.endswith("chat") else "documents"
        return (f"{self.source} ({self.kind}, {self.documents} {unit}, {self.tokens} tokens): {self.samples} × "
                f"{self.seq_len} tokens drawn at random, seed {self.seed}")

    def as_dict(self) -> dict:
        return asdict(self)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.-]+)?$")  # org/name[:config][@split]


def _is_hub_id(spec: str) -> bool:
    """``hub:...``, or an ``org/name`` id that is not a local path and does not look like a file name."""
    if spec.startswith(HUB_PREFIX):
        return True
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists() and Path(spec).suffix not in (".txt", ".jsonl")


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LowbitError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LowbitError(f"{where}: every message needs a string 'role' and a string 'content', got {m!r:.80}")
    return messages


def _render(tokenizer, messages: list[dict], where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError(f"{where} holds chat conversations, but the model's tokenizer has no chat template to "
                          "render them; give a plain text file instead")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 -- jinja raises its own types for a template that rejects the roles
        raise LowbitError(f"{where}: the chat template cannot render this conversation: {e}") from None


def _jsonl_documents(path: Path, tokenizer) -> tuple[list[str], str]:
    docs, chats = [], 0
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {i}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise LowbitError(f"{where} is not JSON: {e}") from None
        if isinstance(row, dict) and "messages" in row:
            docs.append(_render(tokenizer, check_messages(row["messages"], where), where))
            chats += 1
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(row["text"])
        else:
            raise LowbitError(f"{where}: expected an object with 'messages' (a chat) or 'text'")
    if not docs:
        raise LowbitError(f"{path} has no conversations or texts")
    return docs, "chat" if chats == len(docs) else "text" if chats == 0 else "chat+text"


def _hub_documents(spec: str, tokenizer) -> tuple[list[str], str]:
    from .data import fetch_hub_rows

    name = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    name, _, split = name.partition("@")
    name, _, config = name.partition(":")
    rows = fetch_hub_rows(name, config or None, split or None, limit=HUB_CALIB_ROWS)
    first = rows[0] if rows else {}
    if "messages" in first:
        return [_render(tokenizer, check_messages(r["messages"], f"{name} row {i}"), f"{name} row {i}")
                for i, r in enumerate(rows)], "hub-chat"
    if "text" in first:
        return [r["text"] for r in rows if isinstance(r["text"], str) and r["text"].strip()], "hub-text"
    raise LowbitError(f"hub dataset {name} has neither a 'messages' nor a 'text' column "
                      f"(it has {', '.join(sorted(first)) or 'no rows'})")


def _tokens(tokenizer, docs: list[str], templated: bool) -> torch.Tensor:
    """Each document's tokens, joined. A rendered chat already holds its special tokens; plain text gets the
    tokenizer's usual ones once, as one long text would."""
    if not templated:
        return tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    return torch.cat([tokenizer(d, add_special_tokens=False, return_tensors="pt").input_ids[0] for d in docs])


def jsonl_text(tokenizer, path: str | os.PathLike) -> str:
    """A JSONL file of chats (rendered with the chat template) or texts as one text, e.g. to evaluate on."""
    docs, _ = _jsonl_documents(Path(path), tokenizer)
    return "".join(docs)


def check_source(calib_data: str | os.PathLike | None, data_dir: str | None) -> None:
    """Fail fast, before a slow model load, on a calibration file that is missing or unreadable."""
    if calib_data is None:
        from .data import CALIB_FILE, local_file, resolve_data_dir

        d = resolve_data_dir(data_dir)
        if d is not None:
            local_file(d, CALIB_FILE)
    elif not _is_hub_id(str(calib_data)):
        read_text(calib_data)


def calibration_windows(tokenizer, calib_data: str | os.PathLike | None, data_dir: str | None, samples: int,
                        seq_len: int, seed: int = 0) -> tuple[torch.Tensor, Calibration]:
    """``samples`` windows of ``seq_len`` tokens [samples, seq_len] from the chosen data, and their record."""
    if samples < 1 or seq_len < 2:
        raise LowbitError(f"need at least 1 calibration sample of 2+ tokens, got {samples} x {seq_len}")
    if calib_data is None:
        text = calib_text(None, data_dir)
        source, kind, docs, templated = CALIB_SOURCE, "text", [text], False
    else:
        spec = str(calib_data)
        if _is_hub_id(spec):
            docs, kind = _hub_documents(spec, tokenizer)
            source, templated = spec, kind == "hub-chat"
        elif spec.endswith(".jsonl"):
            docs, kind = _jsonl_documents(Path(spec), tokenizer)
            source, templated = spec, kind != "text"
        else:
            docs, kind, source, templated = [read_text(spec)], "text", spec, False
    ids = _tokens(tokenizer, docs, templated)
    windows = draw_windows(ids, samples, seq_len, seed, source)
    return windows, Calibration(source, kind, len(docs), int(ids.numel()), samples, seq_len, seed)


def draw_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int, source: str) -> torch.Tensor:
    """``samples`` distinct, non-overlapping windows of ``seq_len`` of the token stream ``ids``, at random (seeded)."""
    n_windows = ids.numel() // seq_len
    if n_windows < samples:
        raise LowbitError(f"calibration data {source} has {ids.numel()} tokens: enough for {n_windows} samples of "
                          f"{seq_len}, but {samples} were requested; use a longer --calib-data, fewer "
                          "--calib-samples or a shorter --calib-seq-len")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:samples].sort().values
    return ids[: n_windows * seq_len].view(n_windows, seq_len)[pick].clone()


def stated_calibration(rows: list[dict]) -> str:
    """What calibrated a table's rows, as their records say (each row's ``calibration``: the record's
    :meth:`Calibration.describe`), for the table's header; rows that calibrated nothing state nothing."""
    seen = list(dict.fromkeys(r["calibration"] for r in rows if r.get("calibration")))
    return "; ".join(seen) if seen else "not recorded"


def calib_samples(tokenizer, text: str, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` distinct, non-overlapping windows of ``seq_len`` tokens of ``text``, chosen at random (seeded).
    Files, chats and hub datasets: :func:`calibration_windows`."""
    if n_samples < 1 or seq_len < 2:
        raise LowbitError(f"need at least 1 calibration sample of 2+ tokens, got {n_samples} x {seq_len}")
    return draw_windows(tokenizer(text, return_tensors="pt").input_ids[0], n_samples, seq_len, seed, "text")
