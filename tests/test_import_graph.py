"""The import graph of our packages (bench/, methods/, reports/) has no cycle.

The graph is read from the source with `ast`, not by importing: an edge A -> B for every `import B` /
`from B import x` in A, wherever it stands: at the top, inside a function or a class. An import inside a function
still makes A depend on B (it only defers the cost), so hiding a cycle that way does not break it. Not edges:
imports under `if TYPE_CHECKING:` (never run), the implicit import of a module's parent packages (`import
bench.sweep.runner` runs bench/sweep/__init__.py: a package importing its own parts is no cycle), and dynamic
imports by name (importlib: the method and report plugin discovery of bench.registry and reports/).
`from P import x` is an edge to P.x when that is a module of ours, else to P. Our imports are absolute (a relative
one fails the test rather than be read wrong).
"""
from __future__ import annotations

import ast
import os
from typing import Dict, Iterator

import pytest

import networkx as nx   # a dependency of torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("bench", "methods", "reports")


def our_modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of our packages (a package: its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for directory, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(directory, ROOT).replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[rel if f == "__init__.py" else f"{rel}.{f[:-3]}"] = os.path.join(directory, f)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every Import / ImportFrom node, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for field, value in ast.iter_fields(node):
            if isinstance(node, ast.If) and field == "body" and _is_type_checking(node.test):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    stack.append(child)


def import_graph() -> nx.DiGraph:
    modules = our_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = {a.name for a in node.names}
            else:
                assert not node.level, f"{path}:{node.lineno}: a relative import (ours are absolute; read as such here)"
                base = node.module
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            for t in targets:
                while t and t not in modules and "." in t:   # `import bench.x.y` of a non-module y: its module
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    graph.add_edge(name, t)
    return graph


def cycles(graph: nx.DiGraph):
    """One cycle per strongly connected component of more than one module: its modules, then one cycle through it."""
    out = []
    for component in sorted((sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)):
        cycle = nx.find_cycle(graph.subgraph(component), source=component[0])
        out.append((component, [a for a, _ in cycle] + [cycle[-1][1]]))
    return out


def test_the_graph_sees_the_imports():
    """Imports at the top and inside functions are edges; one under `if TYPE_CHECKING:` is not."""
    g = import_graph()
    assert len(g) > 50
    assert g.has_edge("bench.artifacts", "bench.errors")                # at the top
    assert g.has_edge("bench.cli", "bench.commands")                    # `import bench.commands` inside main()
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
                     "def f():\n    from d import e\n")
    assert sorted(n.names[0].name if isinstance(n, ast.Import) else n.module for n in _imports(tree)) == \
        ["a", "c", "d"]


def test_the_library_never_imports_the_cli():
    g = import_graph()
    cli = ("bench.commands", "bench.cli", "bench.__main__")
    wrong = sorted((s, t) for s, t in g.edges if not s.startswith(cli) and t.startswith(cli))
    assert not wrong, f"library modules import the CLI: {wrong}"


def _report(found) -> str:
    return "import cycles (each: its modules; one cycle through them):\n" + "\n".join(
        f"  {', '.join(c)}\n    {' -> '.join(path)}" for c, path in found)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, _report(found)


# ------------------------------------------------------------ imports inside functions say why
# Our imports stand at the top of the module; one left inside a function says why on its line or the line above
# (`# lazy: --help stays instant (no torch)`, `# lazy: pulls torch; the CLI imports this module`, ...).


def function_level_imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every import of our packages that stands inside a function (at any depth below it)."""
    def ours(node) -> bool:
        if isinstance(node, ast.Import):
            return any(a.name.split(".")[0] in PACKAGES for a in node.names)
        return bool(node.level) or (node.module or "").split(".")[0] in PACKAGES

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)) and ours(child):
                yield child
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.Lambda)))
    yield from visit(tree, False)


def unmarked(source: str) -> Iterator[int]:
    """Line numbers of function-level imports of ours with no comment on their lines or on the line above."""
    lines = source.splitlines()
    for node in function_level_imports(ast.parse(source)):
        own = lines[node.lineno - 1:node.end_lineno]
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        if not any("#" in line for line in own) and not above.startswith("#"):
            yield node.lineno


def test_unmarked_finds_what_it_should():
    source = ("import bench.a\n"
              "def f():\n    import bench.b\n    import torch\n"
              "    from methods import c   # lazy: why\n"
              "    # lazy: why\n    from reports.d import (e,\n        g)\n"
              "    def inner():\n        from bench import h\n"
              "class K:\n    def m(self):\n        from methods.x import y\n")
    assert list(unmarked(source)) == [3, 10, 13]


def test_every_function_level_import_of_ours_says_why():
    found = []
    for name, path in sorted(our_modules().items()):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        with open(path) as f:
            found += [f"{rel}:{n}" for n in unmarked(f.read())]
    assert not found, "imports of our modules inside a function with no comment saying why (move them to the " \
                      "top, or say why not on the line or the line above):\n  " + "\n  ".join(found)
