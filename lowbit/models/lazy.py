"""A Hugging Face safetensors checkpoint read one module at a time, for models larger than memory.

The model is built on the meta device from its config (parameters without storage; the small
buffers computed in ``__init__``, such as rotary frequencies, are real), then each module is
given its tensors from the memory-mapped shards just before it runs and returned to the meta
device after, so memory holds one module's weights, not the model's.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError, all_finite
from ..quantizer import set_codes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _header(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) and its raw bytes, read without mapping."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError("header length out of range")
            raw = f.read(n)
        head = json.loads(raw)
    except (OSError, ValueError, struct.error) as e:
        raise LowbitError(f"{path} is not a readable safetensors file: {e}") from None
    size = path.stat().st_size
    head.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in head.values()), default=0)
    if 8 + n + end > size:
        raise LowbitError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return head, raw


class LazyCheckpoint:
    """Tensor names, shapes and files of a local checkpoint directory; tensors are read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise LowbitError(f"{self.path} is not a Hugging Face checkpoint directory (no config.json)")
        if (self.path / INDEX).is_file():
            try:
                weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LowbitError(f"cannot read {self.path / INDEX}: {e}") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise LowbitError(f"{self.path} has no {SINGLE} or {INDEX}; streaming reads safetensors checkpoints")
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise LowbitError(f"checkpoint {self.path} is missing {len(missing)} shard(s) its index names: "
                              f"{', '.join(missing[:3])}")
        self.files: dict[str, dict] = {}
        self.where: dict[str, str] = {}
        self.info: dict[str, dict] = {}
        digest = hashlib.sha256()
        for f in files:
            head, raw = _header(self.path / f)
            self.files[f] = {"bytes": (self.path / f).stat().st_size}
            digest.update(f.encode() + b"\0" + str(self.files[f]["bytes"]).encode() + b"\0" + raw)
            self.where.update(dict.fromkeys(head, f))
            self.info.update(head)
        if weight_map is not None:
            wrong = sorted(n for n, f in weight_map.items() if self.where.get(n) != f)
            if wrong:
                n = wrong[0]
                raise LowbitError(f"checkpoint {self.path} does not match its index: {n} should be in {weight_map[n]} "
                                  f"but {'is in ' + self.where[n] if n in self.where else 'no shard holds it'}"
                                  f"{f' ({len(wrong)} tensors in all)' if len(wrong) > 1 else ''}")
        self.digest = digest.hexdigest()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def float32_bytes(self) -> int:
        """Memory the whole model would take in float32."""
        return sum(4 * math.prod(t["shape"]) for t in self.info.values())

    def nbytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def fingerprint(self) -> dict:
        """What identifies this checkpoint cheaply: its files' sizes and headers (names, dtypes, offsets)."""
        return {"path": str(self.path.resolve()), "files": len(self.files), "bytes": self.nbytes(),
                "headers_sha256": self.digest}

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors in ``dtype``; each shard is mapped only while its tensors are copied out."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise LowbitError(f"checkpoint {self.path} has no tensor {n}")
            by_file.setdefault(self.where[n], []).append(n)
        for f, group in by_file.items():
            with safe_open(self.path / f, framework="pt") as st:  # closed at once: mapped pages leave the RSS
                for n in group:
                    t = st.get_tensor(n)
                    out[n] = t.to(dtype) if t.is_floating_point() else t
        return out


def empty_model(path: Path) -> nn.Module:
    """The model of checkpoint ``path`` with its parameters on the meta device (buffers real), float32."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quiet import quiet_transformers

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read the model config in {path}: {e}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_config leaves a tied head untied; from_pretrained ties it
    return model.eval().requires_grad_(False)


def check_matches(model: nn.Module, ckpt: LazyCheckpoint, tied: str | None) -> None:
    """Refuse a checkpoint whose tensors are missing or shaped unlike the model its config describes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != tied}
    missing = [k for k in want if k not in ckpt.where]
    if missing:
        raise LowbitError(f"checkpoint {ckpt.path} lacks {len(missing)} tensor(s) the model needs, e.g. "
                          f"{', '.join(missing[:3])} (a missing or wrong shard?)")
    bad = [(k, s, ckpt.shape(k)) for k, s in want.items() if ckpt.shape(k) != s]
    if bad:
        k, s, got = bad[0]
        raise LowbitError(f"checkpoint {ckpt.path}: {k} has shape {list(got)}, the config says {list(s)} "
                          f"({len(bad)} mismatched tensors; a shard from another model?)")


@torch.no_grad()
def materialise(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, dtype: torch.dtype = torch.float32) -> None:
    """Give ``module`` (named ``prefix`` in the model) its tensors from the checkpoint, refusing non-finite ones."""
    keys = list(module.state_dict())
    full = [f"{prefix}.{k}" if prefix else k for k in keys]
    tensors = ckpt.read(full, dtype)
    bad = [n for n in full if not all_finite(tensors[n])]
    if bad:
        raise LowbitError(f"non-finite (NaN or inf) weights in {', '.join(bad[:5])}")
    module.load_state_dict({k: tensors[n] for k, n in zip(keys, full)}, strict=True, assign=True)


def release(module: nn.Module) -> None:
    """Drop ``module``'s weights (back to the meta device) and the codes a method recorded beside them (else a
    streamed run would keep every finished layer's codes: 88 MB a layer at 1.1B widths)."""
    module.to("meta")
    for m in module.modules():
        set_codes(m, None)
