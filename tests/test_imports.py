"""The package's modules import each other without a circle (read from the source with ast, not by importing).

Every import counts, the ones inside functions too: a lazy import that closes a circle only hides it. The one
exception is a module-level ``__getattr__`` (PEP 562), which serves an old import path on demand after every
module is loaded (e.g. ``condformer.config.load_config_file``) and never runs at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import condformer

PACKAGE = Path(condformer.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _nodes_outside_getattr(tree: ast.Module) -> list[ast.AST]:
    nodes: list[ast.AST] = []
    for top in tree.body:
        if isinstance(top, ast.FunctionDef) and top.name == "__getattr__":
            continue
        nodes.extend(ast.walk(top))
    return nodes


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts ``a.b`` if that is a module)."""
    modules = module_names()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _nodes_outside_getattr(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t.split(".")[0] == "condformer":
                    dep = _resolve(t, modules)
                    if dep and dep != name:
                        graph[name].add(dep)
                        # importing a.b.c runs a.b's __init__ first (the root's, which loads the public API
                        # from its submodules, is left out: every module would sit in a circle through it)
                        parents = dep.split(".")[1:-1]
                        for i in range(len(parents)):
                            pkg = ".".join(["condformer", *parents[: i + 1]])
                            if pkg != name and not name.startswith(pkg + "."):
                                graph[name].add(pkg)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    # the package root imports its public API; a submodule importing the root would close a circle through it
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_config_is_a_leaf():
    """Config, the options base, the registry and the refusal table import nothing but each other and errors."""
    graph = import_graph()
    leaves = {"condformer.config", "condformer.options", "condformer.registry", "condformer.refusals",
              "condformer.errors"}
    for m in leaves:
        assert graph[m] <= leaves, (m, graph[m] - leaves)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "condformer.config" in graph["condformer.model"]  # the graph is read, not empty
    assert "condformer.config_files" in graph["condformer.cli"]  # imports inside functions count
