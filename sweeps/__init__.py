"""Shipped sweep definitions (YAML, package data): `python -m bench sweep --list` names them; the schema is in
bench/sweep/spec.py. Add a sweep by dropping NAME.yaml here (or pass any .yaml path to `python -m bench sweep`)."""
