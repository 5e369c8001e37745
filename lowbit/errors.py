"""User-facing errors: the CLI prints them as one line and exits with code 2."""

import torch


class LowbitError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: its minimum and maximum are finite (NaN propagates through both), read in one
    pass with no mask, unlike ``isfinite(t).all()``; streaming checks every weight it reads."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite() & hi.isfinite())
