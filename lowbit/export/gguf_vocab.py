"""A Hugging Face tokenizer written as llama.cpp's GGUF vocabulary (the ``tokenizer.ggml.*`` fields).

llama.cpp tokenizes on its own, from these fields only, so they must reproduce what the Hugging Face
tokenizer does. Two kinds of BPE tokenizer can be written:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): model "gpt2", the vocabulary and merges as they are,
  and ``pre``, llama.cpp's name for how text is split into words first. That name is found by running
  the tokenizer's own pre-tokenizer on a probe text next to each split llama.cpp knows; one that
  matches none is refused, since llama.cpp would then split words differently;
- SentencePiece-style BPE (Llama 2, Mistral, Gemma: spaces written as "▁", bytes as <0x..> tokens):
  model "llama". llama.cpp merges the pair whose result scores highest, so each token scores minus the
  rank of the first merge that makes it, which replays the merge order (tokens no merge makes score
  below all of them).

Ids the tokenizer does not use but the embedding has (padded vocabularies) become unused [PADn]
tokens, as llama.cpp's converter writes them: its token count must equal the embedding's rows.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import LowbitError

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's space

# Word splits before byte-level BPE, as Hugging Face tokenizers write them. Each is checked against the
# model's own pre-tokenizer on PROBE, never trusted by name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PROBE = ("Hello World! It's 2024-05-17, we'll see: 1234567 apples... \n\n\tTabs\r\n  two  spaces   three\n"
         "café naïve Ünïcödé 北京 3.14159 $100 (x+y)*z <tag> don'T I'M ok?!\n")


def _byte_level_splits() -> dict[str, object]:
    """llama.cpp pre-tokenizer name -> a Hugging Face pre-tokenizer that splits text as it does."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def regex_then_bytes(pattern: str):
        return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True),
                               pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "llama-bpe": regex_then_bytes(LLAMA3_SPLIT),
        "qwen2": regex_then_bytes(QWEN2_SPLIT),
    }


@dataclass
class Vocab:
    """The GGUF tokenizer fields of one model."""

    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre (byte-level only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece-style only
    merges: list[str]
    add_space_prefix: bool | None
    special_ids: dict[str, int]  # "bos", "eos", "unk", "pad" -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _contains(node: dict | None, kind: str) -> bool:
    """Whether a tokenizer.json normalizer / pre-tokenizer / decoder (possibly a Sequence) has a step of ``kind``."""
    if not node:
        return False
    if node.get("type") == kind:
        return True
    return any(_contains(n, kind) for n in node.get("pretokenizers", node.get("normalizers", node.get("decoders", []))))


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _byte_level_pre(backend) -> str:
    """llama.cpp's name for the word split ``backend`` does before BPE, or a LowbitError."""
    if backend.normalizer is not None and backend.normalizer.normalize_str(PROBE) != PROBE:
        # NFC (Qwen) leaves this probe unchanged and is harmless; anything that rewrites text is not in llama.cpp.
        raise LowbitError("GGUF export: this byte-level tokenizer rewrites text before splitting it (its normalizer), "
                          "which llama.cpp does not do")
    if backend.pre_tokenizer is None:
        raise LowbitError("GGUF export: this byte-level tokenizer has no pre-tokenizer, so llama.cpp cannot split "
                          "text as it does")
    ours = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(PROBE)]
    for name, split in _byte_level_splits().items():
        if [w for w, _ in split.pre_tokenize_str(PROBE)] == ours:
            return name
    raise LowbitError(f"GGUF export: this tokenizer splits words in a way none of llama.cpp's known pre-tokenizers "
                      f"({', '.join(_byte_level_splits())}) reproduces; llama.cpp would tokenize text differently")


def _space_prefix(backend) -> bool:
    """Whether a SentencePiece-style tokenizer writes "▁" before the text (Llama 2) or not (Gemma)."""
    text = "a b"
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is not None:
        text = "".join(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    if text.replace(SPIECE_SPACE, " ").strip() != "a b":
        raise LowbitError("GGUF export: this SentencePiece-style tokenizer does not write spaces as \u2581, "
                          "which llama.cpp's tokenizer assumes")
    return text.startswith(SPIECE_SPACE)


def read_vocab(model_dir: str | os.PathLike, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of the tokenizer saved in ``model_dir``, padded to ``n_vocab`` tokens."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LowbitError(f"GGUF export needs the model's tokenizer; none in {model_dir} loads: {e}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError(f"GGUF export reads a fast (tokenizers) tokenizer; the one in {model_dir} is "
                          f"{type(tok).__name__}")
    doc = json.loads(backend.to_str())
    model = doc["model"]
    if model.get("type") != "BPE":
        raise LowbitError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece-style); this one is "
                          f"{model.get('type')}")
    byte_level = _contains(doc.get("pre_tokenizer"), "ByteLevel") or _contains(doc.get("decoder"), "ByteLevel")
    spiece = not byte_level and (model.get("byte_fallback") or _contains(doc.get("pre_tokenizer"), "Metaspace")
                                 or SPIECE_SPACE in json.dumps(doc.get("normalizer"), ensure_ascii=False))
    if not (byte_level or spiece):
        raise LowbitError("GGUF export writes byte-level BPE (GPT-2 style) or SentencePiece-style BPE tokenizers; "
                          "this BPE tokenizer is neither")

    added = {a["id"]: a for a in doc.get("added_tokens", [])}
    unk = model.get("unk_token")
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in model["vocab"].items():
        kind = UNKNOWN if text == unk else BYTE if spiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else NORMAL
        by_id[i] = (text, kind)
    for i, a in added.items():
        if by_id.get(i, ("", 0))[1] == UNKNOWN:
            continue
        text = a["content"]
        if not a.get("special") and spiece:
            text = text.replace(SPIECE_SPACE, " ")  # llama.cpp matches user-defined tokens in the raw text
        by_id[i] = (text, CONTROL if a.get("special") else USER_DEFINED)
    if by_id and max(by_id) >= n_vocab:
        raise LowbitError(f"the tokenizer has ids up to {max(by_id)}, but the embedding has only {n_vocab} rows")
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n_vocab)]
    types = [by_id.get(i, ("", UNUSED))[1] for i in range(n_vocab)]

    pairs = _merges(model)
    scores = None
    if spiece:
        first_rank: dict[str, int] = {}
        for rank, (a, b) in enumerate(pairs):
            first_rank.setdefault(a + b, rank)
        # A longer token no merge makes would never appear in Hugging Face's output: score it below every merge.
        last = -float(len(pairs))
        scores = [-float(first_rank[t]) if t in first_rank else 0.0 if len(t) == 1 else last for t in tokens]
    # GGUF merges are "left right"; a space inside a part would split wrongly. In a byte-level vocabulary
    # a space byte is written Ġ (U+0120), which is what llama.cpp's converter writes too.
    if byte_level:
        merges = [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in pairs]
    else:
        merges = [] if any(" " in p for pair in pairs for p in pair) else [" ".join(pair) for pair in pairs]

    special_ids = {typ: i for typ, i in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id),
                                         ("unk", tok.unk_token_id), ("pad", tok.pad_token_id))
                   if isinstance(i, int) and 0 <= i < n_vocab}
    with_special = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    # Whether encoding adds BOS / EOS, as the loaded tokenizer does it (its config flags or its post-processor).
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    add_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return Vocab(model="gpt2" if byte_level else "llama", pre=_byte_level_pre(backend) if byte_level else None,
                 tokens=tokens, types=types, scores=scores, merges=merges,
                 add_space_prefix=_space_prefix(backend) if spiece else None, special_ids=special_ids,
                 add_bos=add_bos, add_eos=add_eos, chat_template=template)


def add_vocab(writer, vocab: Vocab) -> None:
    """Write ``vocab`` into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for typ, i in vocab.special_ids.items():
        getattr(writer, f"add_{typ}_token_id")(i)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
