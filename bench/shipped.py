"""The models that come with the harness: those shipped in bench/assets, recorded in its manifest.json (written
by `train ship`), and those built in code (bench.zoo.tiny_bundle). Their names are taken: `register` refuses them.
"""
from __future__ import annotations

import json
import os
from typing import List

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MANIFEST = os.path.join(ASSETS, "manifest.json")
BUILTIN = ("tiny",)  # random-weight models built in code, for tests and smoke runs


def read_manifest() -> dict:
    if not os.path.isfile(MANIFEST):
        return {"models": {}, "aliases": {}}
    with open(MANIFEST) as f:
        return json.load(f)


def shipped_names() -> List[str]:
    """Every name of a model that comes with the harness: shipped, aliases, built in code."""
    m = read_manifest()
    return sorted(set(m.get("models", {})) | set(m.get("aliases", {})) | set(BUILTIN))
