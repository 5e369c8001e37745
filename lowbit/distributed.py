"""Data-parallel workers on torch.distributed: each rank walks its own share of the calibration samples.

Under ``torchrun --nproc-per-node N -m lowbit quantize ...`` every rank loads the model and draws the same
calibration windows; the layer walk keeps only the rank's contiguous share of them. What a method sums
over calibration tokens (GPTQ's Hessian, imatrix's mean x², token counts) is summed over the ranks with
:func:`all_sum`, which gives every rank the same bits, so every rank takes the same decisions and holds the
same weights; one rank writes the files. Work that needs no tokens (scoring candidates through a summed
Gram matrix, rounding one input's linears from its Hessian) is split instead of repeated: :func:`split_rows`
and :func:`owners` with :func:`from_rank`. With one process every function here is the identity, so the
single-process path is unchanged bit for bit.
"""
from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from .errors import LowbitError


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this rank writes files and prints results (rank 0; the only process without torchrun)."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL for CUDA devices, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return active()


def _bounds(n: int) -> list[int]:
    size = world_size()
    return [r * n // size for r in range(size + 1)]


def finish() -> None:
    """Leave the process group (if this process joined one), after every rank got here: gloo tearing down while
    another rank still talks to it aborts the process ("terminate called without an active exception"). A rank
    that never arrives (it failed) is waited for one minute at most (gloo's monitored barrier), then left."""
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a rank failed: leave anyway, its own error is the one to report
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank got here (nothing with one process)."""
    if active():
        dist.barrier()


def share(rows: torch.Tensor, what: str = "calibration samples") -> torch.Tensor:
    """This rank's contiguous share of ``rows`` (calibration samples, evaluation windows), in rank order."""
    if not active():
        return rows
    if rows.shape[0] < world_size():
        raise LowbitError(f"{rows.shape[0]} {what} cannot be shared by {world_size()} workers; give at least "
                          f"{world_size()}")
    b = _bounds(rows.shape[0])
    return rows[b[rank()]:b[rank() + 1]]


def gather_shares(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's ``local`` [its share of n, ...] back in row order: the single process's rows, bit for bit."""
    if not active():
        return local
    b = _bounds(n)
    return _gather(local, [hi - lo for lo, hi in zip(b, b[1:])])


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` [any number of rows, ...] concatenated in rank order, on every rank."""
    if not active():
        return local
    return _gather(local, _row_counts(local.shape[0]))


def _gather(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=_collective_device())
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(local.device)


def split_rows(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``fn(rows)`` for an ``fn`` that treats rows independently and calls no collective (a search over
    candidates, over output channels): each worker computes its contiguous share, every worker gets all rows."""
    if not active() or rows.shape[0] < world_size():
        return fn(rows)
    return gather_shares(fn(share(rows)), rows.shape[0])


def _collective_device() -> torch.device:
    """Where the backend reduces: NCCL only on the rank's CUDA device, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, the same bits on every rank; ``t`` itself with one process."""
    if not active():
        return t
    out = t.detach().to(_collective_device(), copy=True).contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def owners(costs: list[float], workers: int | None = None) -> list[int]:
    """The rank that does each of ``costs``' independent work items (a linear's GPTQ, an expert's): the costliest
    first, each to the least loaded of ``workers`` (default: this group's ranks), the same on every rank; all 0
    with one process."""
    size = world_size() if workers is None else workers
    load, owner = [0.0] * size, [0] * len(costs)
    if size > 1:
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            owner[i] = min(range(size), key=lambda r: (load[r], r))
            load[owner[i]] += costs[i]
    return owner


def from_rank(src: int, tensors: list[torch.Tensor] | None, extra: object = None,
              device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], object]:
    """(``tensors``, ``extra``) as rank ``src`` holds them, on every rank (the others pass None): one small
    message for their shapes and ``extra`` (picklable), one broadcast of their bytes. The identity alone."""
    if not active():
        return tensors, extra
    mine = rank() == src
    meta = [([(tuple(t.shape), t.dtype) for t in tensors], extra) if mine else None]
    dist.broadcast_object_list(meta, src, device=_collective_device())
    layout, extra = meta[0]
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in layout]
    if mine:
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).cpu() for t in tensors]
                         or [torch.empty(0, dtype=torch.uint8)]).to(_collective_device())
    else:
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=_collective_device())
    dist.broadcast(flat, src)
    if mine:
        return tensors, extra
    out = [part.cpu().clone().view(dtype).reshape(shape).to(device)  # a copy starts aligned for its dtype
           for part, (shape, dtype) in zip(flat.split(sizes), layout)]
    return out, extra


def all_max_ints(values: list[int]) -> list[int]:
    """The largest of every rank's ``values``, element by element (one collective)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_max(value: float) -> float:
    """The largest of every rank's ``value``."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def offset(rows: int) -> tuple[int, int]:
    """(where this rank's ``rows`` start among all ranks' rows, how many rows all ranks hold)."""
    if not active():
        return 0, rows
    counts = _row_counts(rows)
    return sum(counts[: rank()]), sum(counts)


def _row_counts(rows: int) -> list[int]:
    """Every rank's ``rows``, in rank order (one collective)."""
    return gather_shares(torch.tensor([[rows]], dtype=torch.int64), world_size()).flatten().tolist()


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every rank's tokens of ``x`` [tokens, width] (with one process exactly ``x.mean(0)``)."""
    if not active():
        return x.mean(0)
    total = all_sum(torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device))
    return (all_sum(x.sum(0, dtype=torch.float64)) / total.clamp(min=1)).to(x.dtype)


def token_counts(xs: list[torch.Tensor | None]) -> list[int]:
    """Calibration tokens in each of ``xs`` over every rank (one collective for all)."""
    local = [0 if x is None else x.numel() // max(1, x.shape[-1]) for x in xs]
    return all_sum(torch.tensor(local, dtype=torch.int64)).tolist() if active() and local else local


def token_count(x: torch.Tensor | None) -> int:
    """Calibration tokens in ``x`` [..., width] over every rank (0 for None)."""
    local = 0 if x is None else x.numel() // max(1, x.shape[-1])
    return int(all_sum(torch.tensor([local], dtype=torch.int64)).item()) if active() else local
