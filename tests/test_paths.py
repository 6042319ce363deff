"""Every path of this repository that its code, configs and docs name exists: no stale pointer survives a move."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

TOP = ("crisp", "conf", "tests", "docs", "hydra_plugins", ".ci", "multirun/results")
# a path is a top folder, then name characters and slashes; the extension (if any) ends it
PATH = re.compile(r"(?<![\w./-])(?:\.\./)?((?:" + "|".join(re.escape(t) for t in TOP) + r")(?:/[\w.@=+-]+)+/?)")
PLACEHOLDER = re.compile(r"[<>{}*$]|\.\.\.")


def sources() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "multirun" / "README.md"]
    for folder, pattern in (("crisp", "*.py"), ("hydra_plugins", "*.py"), ("tests", "*.py"), ("conf", "*.yaml"),
                            ("docs", "*.md"), ("multirun/results", "README.md"), (".ci", "*")):
        found += sorted(p for p in (ROOT / folder).rglob(pattern) if p.is_file())
    return found


def named_paths(text: str) -> set[str]:
    paths = set()
    for match in PATH.finditer(text):
        tail = text[match.end(): match.end() + 1]
        path = match.group(1).rstrip(".,:;)")
        if PLACEHOLDER.search(path) or (tail and tail in "<{*"):
            continue  # a pattern (multirun/results/<name>/), not a path
        paths.add(path.rstrip("/"))
    return paths


def test_the_checks_see_a_path_and_skip_a_pattern():
    text = "see `crisp/core/results.py`, conf/data/<task>.yaml and ../multirun/results/glue-minilm-l6/report.md."
    assert named_paths(text) == {"crisp/core/results.py", "multirun/results/glue-minilm-l6/report.md"}


def test_every_repository_path_named_in_code_configs_and_docs_exists():
    missing = []
    for source in sources():
        for path in sorted(named_paths(source.read_text(errors="replace"))):
            if not (ROOT / path).exists():
                missing.append(f"{source.relative_to(ROOT)} names {path}")
    assert not missing, "\n".join(missing)
