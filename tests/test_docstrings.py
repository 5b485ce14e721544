"""Every public callable of the bundles' scripts has a docstring, and none cites files outside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bundles").glob("*/scripts/*.py"))


def public_callables(path: Path):
    """(qualified name, node) of public module-level functions and classes and their public methods."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        yield f"{node.name}.{item.name}", item


def test_scripts_are_found():
    assert len(SCRIPTS) >= 20


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_public_callable_has_a_docstring(path):
    missing = [name for name, node in public_callables(path) if not ast.get_docstring(node)]
    assert not missing, f"{path.relative_to(ROOT)}: no docstring for {', '.join(missing)}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_no_citation_of_files_outside_the_repository(path):
    text = path.read_text()
    for pattern in ("papers/0", "GUIDE §", "GUIDE.md"):
        assert pattern not in text, f"{path.relative_to(ROOT)} cites {pattern!r}: cite the paper by title and authors"
