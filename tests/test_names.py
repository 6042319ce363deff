"""One name, one meaning: no two classes or module-level constants of the package share a name (a name imported
from where it is defined, re-exported, is the same thing and counts once)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import ROOT


def definitions(path: Path) -> set[str]:
    """The classes and UPPER_CASE constants a module defines itself (not those it imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()}
    return names


def test_the_check_sees_a_class_and_a_constant_but_not_an_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from x import Y\nLIMIT = 3\nclass Run:\n    pass\nlower = 1\n")
    assert definitions(module) == {"LIMIT", "Run"}


def test_no_two_classes_or_constants_of_the_package_share_a_name():
    where = defaultdict(list)
    for path in sorted((ROOT / "crisp").rglob("*.py")):
        for name in definitions(path):
            where[name].append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not shared, shared
