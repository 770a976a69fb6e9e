"""Benchmarks with a Python API (one module per benchmark); the bench-* commands parse, call and print."""
