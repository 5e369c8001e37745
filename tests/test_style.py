"""House rules the linter does not check: no module imports another module's private name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def private_imports(path: Path) -> list[str]:
    """``from X import _name`` and ``import a._b`` in ``path`` (``__future__`` and dunders aside)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {a.name}" for a in node.names
                      if any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    return found


@pytest.mark.parametrize("folder", ["lowbit", "bench", "tests"])
def test_no_module_imports_a_private_name(folder):
    found = [hit for f in sorted((ROOT / folder).rglob("*.py")) for hit in private_imports(f)]
    assert not found, found


def test_the_check_sees_relative_imports(tmp_path):
    f = ROOT / "tests" / "_probe_private_import.py"
    try:
        f.write_text("from .calib import _output\nimport a._b\n")
        assert len(private_imports(f)) == 2
    finally:
        f.unlink()
