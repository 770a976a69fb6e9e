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


def test_schema_is_generated_from_the_typed_records():
    """results.SCHEMA is not kept in sync by hand: it is the records' fields, in row order."""
    from dataclasses import fields
    from bench.records import PARAM_COLUMN, RECORDS, FlopsRecord, PairedTimingRecord
    from bench.results import NULLABLE, SCHEMA
    expected = []
    for rec in RECORDS:
        expected += [f.name for f in fields(rec)]
        if rec.__name__ == "MethodSetup":
            expected.append(PARAM_COLUMN[0])
    assert list(SCHEMA) == expected and len(SCHEMA) == len(set(SCHEMA))
    assert set(NULLABLE) <= set(SCHEMA) and "time_flop_efficiency" in NULLABLE
    assert SCHEMA["speedup"][0] == "float64" and "t_dense / t_method" in SCHEMA["speedup"][1]
    assert "GMACs/image" in FlopsRecord(macs_fvcore=2e9, macs_analytic=2e9, macs_fvcore_over_analytic=1.0,
                                        macs_decoder=1e9, flop_images=1).summary()
    assert PairedTimingRecord(timing_rounds=0).summary() == "paired timing: off (timing_rounds 0)"
