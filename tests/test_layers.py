"""The package's layers point down only: sparsity <- core <- report, training <- lockstep <- sweep <- bench."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "crisp"
# what each layer may import of crisp (besides itself): the layers below it
BELOW = {
    "sparsity": set(),
    "core": {"sparsity"},
    "report": {"sparsity", "core"},  # reads results.json files alone
    "training": {"sparsity", "core"},
    "lockstep": {"sparsity", "core", "training"},
    "sweep": {"sparsity", "core", "report", "training", "lockstep"},  # a sweep ends with its report
    "bench": {"sparsity", "core", "report", "training", "lockstep", "sweep"},  # nothing imports the benchmarks
}
ENTRY_POINTS = {"crisp.run", "crisp.report.__main__", "crisp.bench.__main__"}


def crisp_imports(path: Path) -> set[str]:
    """Every crisp module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name == "crisp" or name.startswith("crisp.")}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in BELOW else None


def test_no_module_imports_an_entry_point_or_a_layer_above_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name in crisp_imports(path):
            if name in ENTRY_POINTS or any(name.startswith(f"{e}.") for e in ENTRY_POINTS):
                wrong.append(f"{path.relative_to(ROOT)} imports the entry point {name}")
            elif own is not None and layer(name) not in (None, own, *BELOW[own]):
                wrong.append(f"{path.relative_to(ROOT)} ({own}) imports {name} ({layer(name)})")
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_an_upward_import():
    (fake := PACKAGE / "sparsity" / "_upward_probe.py").write_text("from crisp.sweep import pool\n")
    try:
        assert layer("crisp.sparsity._upward_probe") == "sparsity"
        assert "crisp.sweep.pool" in crisp_imports(fake)
        assert layer("crisp.sweep.pool") not in BELOW["sparsity"]
    finally:
        fake.unlink()
