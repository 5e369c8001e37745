"""The execution device: where a layer's statistics, search and training run while the model stays home.

lowbit keeps the model where it was loaded (the CPU, or disk when streamed) and moves one decoder layer at a
time, with the calibration activations it reads, to the execution device; :func:`lowbit.walk.walk_layers` is
the one place that does. On the CPU every move is a no-op, so ``--device cpu`` is the CPU path bit for bit.
CUDA, MPS and XPU are written for but have not run on a GPU: the project's machines have none.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import LowbitError

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_HELP = ("where each layer's statistics, search and training run: auto (a GPU if torch sees one, else the "
               "CPU), cpu, cuda[:N], mps or xpu[:N] (default auto); the model itself stays on the CPU")


def _backend(kind: str):
    """torch's module for a device type (``torch.cuda``, ``torch.xpu``, ``torch.backends.mps``), or None."""
    return torch.backends.mps if kind == "mps" else getattr(torch, kind, None)


def available(kind: str) -> bool:
    """Whether this torch build and machine have a device of type ``kind``."""
    if kind == "cpu":
        return True
    backend = _backend(kind)
    return backend is not None and bool(backend.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto|cpu|cuda[:N]|mps|xpu[:N]`` as a device this machine has; one clear error for any other."""
    if spec is None or str(spec) == "auto":
        kind = next((k for k in ("cuda", "xpu", "mps") if available(k)), "cpu")
        return torch.device(kind, 0) if kind in ("cuda", "xpu") else torch.device(kind)
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise LowbitError(f"--device {spec}: not a device lowbit runs on; use auto, cpu, cuda[:N], mps or xpu[:N]")
    if not available(device.type):
        build = " (this torch build is CPU-only)" if "+cpu" in torch.__version__ else ""
        raise LowbitError(f"--device {spec}: this machine has no {device.type} device that torch "
                          f"{torch.__version__} can use{build}; use --device cpu")
    if device.type in ("cuda", "xpu"):
        count = _backend(device.type).device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            raise LowbitError(f"--device {spec}: there are {count} {device.type} devices (0 to {count - 1})")
        device = torch.device(device.type, index)
    return device


def home_of(module: nn.Module) -> torch.device:
    """The device a module's parameters live on (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(obj, device: torch.device):
    """``obj`` with every tensor inside it (tuples, lists, dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def placed(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """``module`` on ``device`` inside the block, and back on its own device after it (on error too)."""
    home = home_of(module)
    if device is None or device == home:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def fits(nbytes: int, device: torch.device, share: float = 0.5) -> bool:
    """Whether ``nbytes`` more fit in ``share`` of the device's free memory (the CPU: always, it is home)."""
    if device.type == "cpu":
        return True
    if device.type in ("cuda", "xpu"):
        free, _ = _backend(device.type).mem_get_info(device)
        return nbytes <= share * free
    return False  # MPS reports no free memory: keep activations on the CPU
