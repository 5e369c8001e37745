"""House rules the linter does not check: no module imports another module's private name, or reaches for one
through a module it imported (``peers._run_json``)."""
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


PROJECT = {"lowbit", "bench", *(p.stem for p in (ROOT / "bench").glob("*.py"))}


def private_attributes(path: Path) -> list[str]:
    """``name._private`` where ``name`` was imported from lowbit or bench/ (a module or what it defines)."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in PROJECT}
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PROJECT):
            imported |= {a.asname or a.name for a in node.names}
    return [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
            and node.attr.startswith("_") and not node.attr.startswith("__")]


@pytest.mark.parametrize("folder", ["lowbit", "bench", "tests"])
def test_no_module_imports_a_private_name(folder):
    found = [hit for f in sorted((ROOT / folder).rglob("*.py")) for hit in private_imports(f) + private_attributes(f)]
    assert not found, found


def test_the_check_sees_relative_imports(tmp_path):
    f = ROOT / "tests" / "_probe_private_import.py"
    try:
        f.write_text("from .walk import _output\nimport a._b\nimport peers\nfrom lowbit import calib\n"
                     "peers._run_json()\ncalib._output\nself._x\nargparse._Action\n")
        assert len(private_imports(f)) == 2
        assert sorted(h.split(": ")[1] for h in private_attributes(f)) == ["calib._output", "peers._run_json"]
    finally:
        f.unlink()
