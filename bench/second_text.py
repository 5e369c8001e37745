"""A second evaluation text that is not WikiText-2: the Jargon File (public domain), from Debian's jargon-text.

Orderings measured on WikiText-2 are checked on this text too: hacker-slang glossary entries, quotes
and cross-references, a register far from Wikipedia articles. The package comes from Debian's own
archive (``apt-get download``), as every machine of this project can reach it; the text kept starts at
the glossary's first entry (the front matter and the table of contents are dropped) and is written to
``results/data/jargon.txt`` (not committed), with its sha256 printed, for ``lowbit eval --data FILE``.

    python bench/second_text.py            # prints the path
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "jargon-text"
MEMBER = "usr/share/doc/jargon-text/jargon.txt.gz"
SHA256 = "4114c9e0615fa40e28b575e990cf0a5545aea26cc54e148ec6beef8cd8976284"  # of the kept text (jargon-text 4.4.7-4.1)
DEFAULT_OUT = REPO / "results" / "data" / "jargon.txt"


def glossary(text: str) -> str:
    """The text from the first glossary entry (a line ``   :word:``) on."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, ln in enumerate(lines) if ln.startswith("   :") and ln.rstrip().count(":") >= 2), None)
    if first is None:
        raise SystemExit("error: the Jargon File has no glossary entry where one was expected; the package changed")
    return "".join(lines[first:])


def fetch(out: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SystemExit("error: apt-get and dpkg-deb are needed to fetch Debian's jargon-text package")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, check=False)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if proc.returncode != 0 or not debs:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .deb downloaded"]
            raise SystemExit(f"error: apt-get download {PACKAGE} failed ({tail[0]}); run 'apt-get update' first")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        text = gzip.decompress((Path(tmp) / "x" / MEMBER).read_bytes()).decode("utf-8")
    kept = glossary(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part")
    part.write_text(kept, encoding="utf-8")
    part.replace(out)
    return out


def jargon(out: Path = DEFAULT_OUT) -> Path:
    """The kept text's path, fetched first if it is not there; says so when it is not the README's text."""
    out = out if out.exists() else fetch(out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}  sha256 {digest}  {out.stat().st_size} bytes", file=sys.stderr)
    if digest != SHA256:
        print(f"note: not the text the README's rows were measured on (sha256 {SHA256})", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    print(jargon(p.parse_args(argv).output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
