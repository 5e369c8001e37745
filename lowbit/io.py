"""Writing files atomically and refusing to clobber a user's output."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LowbitError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """``path`` as a Path, or an error if it exists and ``force`` is off."""
    p = Path(path)
    if p.exists() and not force:
        raise LowbitError(f"{p} exists; pass --force to overwrite it")
    if not p.parent.exists():
        raise LowbitError(f"directory {p.parent} does not exist")
    return p


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside ``path``, renamed onto it only if the block succeeds."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent or ".", prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a user's output gets the usual mode
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
