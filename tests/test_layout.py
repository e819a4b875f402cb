"""The folders show the architecture: the shared core depends on no shell around it."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def _imported(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_imports_neither_the_serve_app_nor_the_cluster_code():
    offenders = {p.name: sorted(_imported(p) & {"serve", "cluster", "bench"})
                 for p in (ROOT / "eventpulse").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_line_actors_import_no_serve_app():
    offenders = {p.name: sorted(_imported(p) & {"serve", "cluster", "bench"})
                 for p in (ROOT / "actors").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
