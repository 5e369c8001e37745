"""A k-means codebook learned from the weights, one per tensor or per group.

Codes are indices into the group's sorted codebook of 2^b values; the codebook itself is
the group's parameter (it takes the place of the scale), stored as 2^b fp16 numbers. Lloyd's
algorithm runs on all groups at once: in one dimension the nearest centroid is found by a
search among the midpoints of the sorted centroids, so memory stays one code per weight.
Initialised at evenly spaced quantiles, so the result is deterministic.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format


def kmeans_codebook(wg: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    """Sorted centroids [..., k] of the last axis of ``wg`` by Lloyd's algorithm."""
    lead = wg.shape[:-1]
    x = wg.reshape(-1, wg.shape[-1]).float()
    n = x.shape[-1]
    xs = x.sort(dim=-1).values
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)
    c = xs[:, pos].contiguous()
    for _ in range(iters):
        idx = _nearest(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, idx, x)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        empty = counts == 0
        rows = empty.any(dim=1)
        if rows.any():  # an idle centroid moves to the value served worst, so duplicates split
            worst = (x - new.gather(1, idx)).abs().argmax(dim=1)
            slot = empty.float().argmax(dim=1)
            r = rows.nonzero().squeeze(1)
            new[r, slot[r]] = x[r, worst[r]]
        new = new.sort(dim=-1).values
        if torch.equal(new, c):
            break
        c = new
    return c.reshape(*lead, k)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted centroids ``c`` [rows, k] for each of ``x`` [rows, n]."""
    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, x.contiguous()).clamp(max=c.shape[-1] - 1)


class KMeansFormat(Format):
    """2^b centroids per group; ``qparams`` returns the codebook [..., 2^b] in place of a scale."""

    table_params = True
    ties = "to the lower centroid"

    def __init__(self, bits: int, iters: int = 20):
        if not 1 <= bits <= 8:
            raise LowbitError(f"kmeans takes 1 to 8 bits, got {bits}")
        self.bits, self.iters = bits, iters
        self.k = 2**bits
        self.name = "kmeans"
        self.max_value = float("inf")

    def qparams(self, wg: torch.Tensor, ratio: torch.Tensor | float = 1.0):
        amax = wg.abs().amax(dim=-1, keepdim=True) * ratio
        book = kmeans_codebook(torch.maximum(torch.minimum(wg, amax), -amax), self.k, self.iters)
        return book, torch.zeros_like(amax)

    def encode_scaled(self, wg: torch.Tensor, book: torch.Tensor, stochastic: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices into each group's codebook ``book`` (what other formats take as the scale)."""
        lead = torch.broadcast_shapes(wg.shape[:-1], book.shape[:-1])
        x = wg.expand(*lead, wg.shape[-1]).reshape(-1, wg.shape[-1]).float()
        c = book.expand(*lead, self.k).reshape(-1, self.k).float().contiguous()
        if not stochastic:
            idx = _nearest(x, c)
        else:
            above = torch.searchsorted(c, x.contiguous()).clamp(max=self.k - 1)
            below = torch.where(c.gather(1, above) <= x, above, (above - 1).clamp(min=0))
            lo, hi = c.gather(1, below), c.gather(1, above)
            p = ((x - lo) / (hi - lo).clamp(min=1e-30)).clamp(0, 1)
            u = torch.rand(x.shape, generator=generator)
            idx = torch.where(u < p, above, below)
        return idx.reshape(*lead, wg.shape[-1])

    def round_scaled(self, wg, scale, stochastic=False, generator=None):
        return self.decode_scaled(self.encode_scaled(wg, scale, stochastic, generator), scale)

    def decode_scaled(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        lead = torch.broadcast_shapes(codes.shape[:-1], scale.shape[:-1])
        return scale.expand(*lead, self.k).gather(-1, codes.long().expand(*lead, codes.shape[-1]))

    def _round(self, x, stochastic, generator):
        flat = x.reshape(1, -1).float()
        book, _ = self.qparams(flat)
        return self.round_scaled(flat, book, stochastic, generator).reshape(x.shape)

    def encode(self, x):
        raise LowbitError("kmeans codes mean nothing without their codebook; quantize a tensor instead "
                          "(lowbit format --values ... --format kmeans)")

    decode = encode

    def values(self):
        raise LowbitError("kmeans has no fixed values: its codebook is learned from each tensor or group")

    def group_bits(self, scale_bits: int | None = None) -> int:
        return self.k * (self.scale_bits if scale_bits is None else scale_bits)

    def describe(self) -> str:
        return f"kmeans: {self.k} centroids learned per tensor or group (Lloyd, {self.iters} iterations)"
