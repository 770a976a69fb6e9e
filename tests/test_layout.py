"""The architecture the layout promises: the library (bench/, methods/, reports/) never imports the CLI."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = ("bench.commands", "bench.cli")


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            if node.module == "bench":
                yield from (f"bench.{a.name}" for a in node.names)


def test_library_never_imports_the_cli():
    offenders = []
    for top in ("bench", "methods", "reports"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(d, ROOT)
            if rel.startswith(os.path.join("bench", "commands")):
                continue
            for f in files:
                path = os.path.join(d, f)
                if not f.endswith(".py") or os.path.relpath(path, ROOT) in (os.path.join("bench", "cli.py"),
                                                                            os.path.join("bench", "__main__.py")):
                    continue
                offenders += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _imports(path)
                              if m.startswith(CLI)]
    assert not offenders, offenders
