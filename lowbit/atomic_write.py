"""Writing files atomically and refusing to clobber a user's output."""
from __future__ import annotations

import os
import shutil
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


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """A temporary directory beside ``dest``, put in its place only if the block succeeds.

    A failure (a full disk included) leaves nothing behind and an older ``dest`` untouched.
    """
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; a model directory is an ordinary one
        install_dir(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LowbitError(f"could not write {dest}: {e.strerror or e}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest`` (same file system); an old ``dest`` is set aside
    first and removed after."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
    os.replace(dest, old / "x")
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(old / "x", dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_document(path: str | os.PathLike, doc: dict) -> None:
    """A JSON document (one of lowbit's measurement files), written atomically."""
    import json

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1))


def read_document(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """The JSON document at ``path`` whose ``format`` is ``fmt``; one clear line naming ``what`` it should be
    (e.g. "a lowbit allocation (from --save-allocation)") when it cannot be read or is something else."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise LowbitError(f"{path} is not {what}")
    return doc
