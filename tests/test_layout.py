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


def _serve_imports(path) -> set[str]:
    """The `serve.*` modules a module of `serve/` imports at its top level or in a function."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("serve."))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "serve":
                out.update(f"serve.{a.name}" for a in node.names)
            elif node.module.startswith("serve."):
                out.add(node.module)
    return out


def _serve_modules() -> dict[str, object]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for p in (ROOT / "serve").rglob("*.py") if p.name != "__init__.py"}


def test_the_serve_app_has_no_import_circle():
    modules = _serve_modules()
    graph = {m: {d for d in _serve_imports(p) if d in modules} for m, p in modules.items()}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in graph[module]:
            if dep in path:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_no_module_of_the_serve_app_is_over_300_lines():
    long = {m: n for m, p in _serve_modules().items()
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}
