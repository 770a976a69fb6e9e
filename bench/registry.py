"""Method registry in the style of timm's model registry.

    @register_method("dmoe")
    class DMoE(Method): ...

    create_method("dmoe", tau=[0.8, 0.8, 0.78])     # validated config -> Method instance
    list_methods(kind="weight")                     # names, filtered

A method declares its hyperparameters (`Param`: type, range, default, per-scale lists), what it changes
(`kind`), how reports name it (`display_name`) and group it (`family`), and which prepared artifacts it needs (`artifacts`, made by `python -m bench prepare <name>`).
`build(bundle)` returns the network the sampler runs: anything with `scale_forward`, `new_caches`,
`num_classes`, `patch_nums` (usually the bundle's VAR with some modules swapped). Every method goes
through the same measurement path (bench/measure.py); adding one is one new file in methods/.
"""
from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import importlib
import math
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple

from bench.analytic import dense_kv_cache_bytes, dense_scale_macs
from bench.errors import BenchError, choices_error

_REGISTRY: Dict[str, type] = {}
_DISCOVERED = False
KINDS = ("none", "weight", "token", "weight+token")


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False      # True: the low end is excluded, e.g. rates in (0, 1]
    high_open: bool = False
    choices: Optional[Tuple] = None
    list_ok: bool = False       # a list (e.g. one value per sparsified scale) is accepted
    nullable: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.type is bool:
            return "true or false"
        if self.low is not None or self.high is not None:
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            return f"{self.type.__name__} in {lo}{'-inf' if self.low is None else self.low}, " \
                   f"{'inf' if self.high is None else self.high}{hi}" + (" (or a list)" if self.list_ok else "")
        return self.type.__name__ + (" (or a list)" if self.list_ok else "")

    def _coerce_one(self, method: str, v):
        try:
            if self.type is bool and isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                v = v.lower() in ("true", "1", "yes")
            elif self.type is int and isinstance(v, float) and not v.is_integer():
                raise ValueError
            else:
                v = self.type(v)
            # nan/inf pass float() and every range comparison is False for nan, so reject them explicitly
            if self.type is float and not math.isfinite(v):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise BenchError(f"method {method}: {self.name}={v!r} is not a valid {self.type.__name__} "
                             f"(must be finite); valid: {self.describe()}") from None
        if self.choices is not None and v not in self.choices:
            raise BenchError(f"method {method}: {self.name}={v!r} is not allowed; valid: {self.describe()}")
        bad_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        bad_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if bad_low or bad_high:
            raise BenchError(f"method {method}: {self.name}={v} is out of range; valid: {self.describe()}")
        return v

    def validate(self, method: str, value):
        if value is None:
            if self.nullable:
                return None
            raise BenchError(f"method {method}: {self.name} must be set; valid: {self.describe()}")
        if isinstance(value, str) and self.list_ok and "," in value:
            value = [x for x in value.split(",") if x.strip()]
        if isinstance(value, (list, tuple)):
            if not self.list_ok:
                raise BenchError(f"method {method}: {self.name} takes one value, got a list; valid: {self.describe()}")
            if not value:
                raise BenchError(f"method {method}: {self.name} is an empty list; valid: {self.describe()}")
            return [self._coerce_one(method, v) for v in value]
        return self._coerce_one(method, value)


class Method:
    """Base class. Subclasses set the class attributes and implement `build`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "none"
    # Every registered method declares both in its own class body, as string literals (register_method refuses it
    # otherwise): reports read them from the source through method_catalog(), without importing torch.
    display_name: ClassVar[str] = ""   # its name in figures and tables, e.g. "DMoE-VAR"
    family: ClassVar[str] = ""         # the family it is compared in: the registered name of the family's own
    #                                    method (dmoe's is "dmoe"); a variant or ablation names its parent's
    #                                    ("actvar-tokens": "actvar"), a composition "composition"
    # Optional: its row label in a paper table a report reproduces, in that paper's words, keyed by the table
    # (e.g. {"actvar-table-3": "w/o DW"}); a dict literal in the class body, read from the source like the above.
    paper_names: ClassVar[Dict[str, str]] = {}
    params: ClassVar[Tuple[Param, ...]] = ()
    artifacts: ClassVar[Tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, **config):
        known = {p.name: p for p in self.params}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise BenchError(f"method {self.name}: unknown parameter {unknown[0]!r}; valid: "
                             f"{', '.join(known) if known else '(none)'}")
        self.config = {n: p.validate(self.name, config.get(n, copy.deepcopy(p.default))) for n, p in known.items()}
        self.check()

    # -- to override -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Cross-parameter validation that needs no model (raise BenchError)."""

    def check_model(self, bundle) -> None:
        """Validation against the model (scale indices, FFN width...), before anything is generated or written."""

    def build(self, bundle):
        """Return the network to sample with. Must not modify bundle.var in place (dense runs share it)."""
        raise NotImplementedError

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        """Per-scale multiply-accumulates of the transformer for `batch` images by formula (CFG doubles rows),
        using statistics the net recorded during the last generation for dynamic methods. None: the dense formula."""
        return None

    def macs_saved_fraction(self, net, bundle) -> float:
        """1 - transformer MACs per image (analytic_macs, from the last generation) / dense's."""
        dense = sum(s.total for s in dense_scale_macs(bundle.var.cfg, 1))
        return round(1 - sum(self.analytic_macs(net, bundle, 1)) / dense, 6)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        """Extra columns for the results row (e.g. active experts per scale), from the net's recorded statistics."""
        return {}

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        """K/V bytes per image held in the attention caches after the last scale's append (the largest cache), by
        formula from what the method keeps (CFG rows included). Default: the dense model keeps every token in every
        layer. Methods whose caches shrink (or grow) override it."""
        return dense_kv_cache_bytes(bundle.var.cfg, elem_bytes)

    # -- helpers -----------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Short human-readable identity for tables and legends."""
        return self.name

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"


def resolve_scales(method: str, value, num_scales: int, default_last: int, what: str = "scale") -> List[int]:
    """A method's scale-index parameter as a list (None: the last `default_last` scales), checked against the
    model's scale count; one-line error naming the valid range."""
    if value is None:
        return list(range(max(0, num_scales - default_last), num_scales))
    scales = [value] if isinstance(value, int) else list(value)
    bad = [s for s in scales if not 0 <= s < num_scales]
    if bad:
        raise BenchError(f"method {method}: {what} index {bad[0]} out of range; valid: 0..{num_scales - 1} "
                         f"(the model has {num_scales} scales)")
    return scales


def check_distinct_scales(method: str, value, what: str = "scales") -> None:
    """Model-free check of a scale-list parameter: no scale listed twice."""
    if isinstance(value, list) and len(set(value)) != len(value):
        raise BenchError(f"method {method}: {what} lists a scale twice: {value}")


def clone_structure(module):
    """A copy of `module` whose submodules are new objects but whose parameters and buffers are shared.

    Methods swap submodules of the copy (e.g. `blocks[i].ffn`) without touching the loaded model, at no memory cost."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def register_method(name: str):
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        if cls.kind not in KINDS:
            raise RuntimeError(f"method {name!r}: kind must be one of {KINDS}")
        for attr in IDENTITY:
            value = cls.__dict__.get(attr)
            if not isinstance(value, str) or not value.strip():
                raise RuntimeError(f"method {name!r} ({cls.__module__}.{cls.__qualname__}) declares no {attr}: set "
                                   f"both display_name and family as string class attributes of the method itself "
                                   f"(e.g. display_name = \"DMoE-VAR\", family = \"dmoe\"); reports read them")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


IDENTITY = ("display_name", "family")


class MethodInfo(NamedTuple):
    """What reports need of a method, read without importing it (method_catalog)."""
    name: str
    display_name: str
    family: str
    paper_names: Tuple[Tuple[str, str], ...] = ()   # (table, row label): Method.paper_names


def _registered_classes(tree: ast.Module):
    """(registered name, class node) of each `@register_method("name")` class in a parsed module."""
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            fn = deco.func if isinstance(deco, ast.Call) else None
            fname = getattr(fn, "id", None) or getattr(fn, "attr", None)
            if fname == "register_method" and deco.args and isinstance(deco.args[0], ast.Constant):
                yield deco.args[0].value, node


def _class_strings(node: ast.ClassDef) -> Dict[str, object]:
    """The class body's assignments of literals (strings, and dicts of strings such as paper_names)."""
    out = {}
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) \
            else []
        for t in targets:
            if not isinstance(t, ast.Name) or getattr(stmt, "value", None) is None:
                continue
            try:
                value = ast.literal_eval(stmt.value)
            except ValueError:   # not a literal (a tuple of Params, a call ...): not something reports read
                continue
            if isinstance(value, str) or (isinstance(value, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                out[t.id] = value
    return out


def method_catalog() -> Dict[str, MethodInfo]:
    """name -> MethodInfo of every method in the `methods` package, read from the source (ast), so that reports
    can name and group methods without importing torch; equal to the imported registry's attributes (a test)."""
    return dict(_read_catalog())


@functools.lru_cache(maxsize=None)
def _read_catalog() -> Tuple[Tuple[str, MethodInfo], ...]:
    import methods   # the package's __init__ is empty: nothing heavy runs
    out = {}
    for info in pkgutil.iter_modules(methods.__path__):
        if info.name.startswith("_"):
            continue
        path = os.path.join(info.module_finder.path, info.name + ".py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for name, node in _registered_classes(tree):
            found = _class_strings(node)
            missing = [a for a in IDENTITY if not (isinstance(found.get(a), str) and found[a].strip())]
            if missing:
                raise RuntimeError(f"method {name!r} ({path}, class {node.name}) declares no {missing[0]} as a "
                                   f"string literal in its class body; reports read display_name and family there")
            out[name] = MethodInfo(name, found["display_name"], found["family"],
                                   tuple(sorted(found.get("paper_names", {}).items())))
    return tuple(sorted(out.items()))


def _discover():
    """Import every module of the top-level `methods` package so their decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import methods   # lazy: plugin discovery (importing the methods imports torch)
    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"methods.{info.name}")


def list_methods(filter: str = "*", kind: Optional[str] = None, needs_artifacts: Optional[bool] = None) -> List[str]:
    _discover()
    out = []
    for n, cls in sorted(_REGISTRY.items()):
        if not fnmatch.fnmatch(n, filter):
            continue
        if kind is not None and cls.kind != kind:
            continue
        if needs_artifacts is not None and bool(cls.artifacts) != needs_artifacts:
            continue
        out.append(n)
    return out


def method_class(name: str) -> type:
    _discover()
    if name not in _REGISTRY:
        raise choices_error("method", name, sorted(_REGISTRY))
    return _REGISTRY[name]


def create_method(name: str, **config) -> Method:
    return method_class(name)(**config)


def parse_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    """['tau=0.8,0.8,0.7', 'oracle=true'] -> {'tau': '0.8,0.8,0.7', 'oracle': 'true'} (typed by Param.validate)."""
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise BenchError(f"expected key=value, got {p!r}")
        if k.strip() in out:   # the last one would win without a word
            raise BenchError(f"{k.strip()} given twice ({out[k.strip()]!r}, then {v.strip()!r}); give it once")
        out[k.strip()] = v.strip()
    return out
