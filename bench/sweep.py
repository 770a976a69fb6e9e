"""Sweeps: a grid of (model, method, parameters) points, each measured by one Ray Tune trial calling
bench.measure.measure, which appends one row per trial to the results store.

    python -m bench sweep tau                       # sweeps/tau.yaml on the embedded default
    python -m bench sweep tau --quick               # the smoke-sized form the YAML declares under `quick:`
    python -m bench sweep tau --resume              # finish the latest tau sweep of the store
    python -m bench sweep tau --set samples=200 --set points.dmoe.grid.tau=0.9,0.7
    python -m bench sweep tau --address auto        # on a running Ray cluster (`ray start --head`)

In code:

    spec = load_spec("tau", quick=True, sets=["samples=64"])     # validated dict (SCHEMA below)
    trials = expand(spec)                                        # [Trial], deterministic order and keys

YAML schema (every key optional except `points`; sweeps/tau.yaml is a commented example):

    description: one line shown by --list
    figure: which paper figure/table it reproduces
    models: [default]          # embedded names, or mappings {var_ckpt, vae_ckpt, depth, patch_nums, name}
    device: cpu                # cpu | cuda | cuda:N
    samples: 1000              # images per trial (quality and timing use all of them)
    batch_size: 50
    seed: 0
    sampling: {}               # cfg, top_k, top_p, more_smooth: overrides of the model's own settings
    reference: null            # quality reference (null: the model's held-out set)
    measure: {}                # further measure() options: flop_images, warmup_batches, timing_rounds, metrics, bootstrap,
                               #   classifier, reference_count, inception_weights, cache_dir
    modules: []                # extra Python modules that register methods (imported by driver and trials)
    points:                    # named entries; each expands to the product of its grid axes
      NAME:
        method: dmoe           # a registered method (bench.registry)
        params: {moe_scales: [4, 5, 6]}        # fixed parameters
        grid: {tau: [1.0, 0.8, 0.6]}            # axes: one trial per combination, in this order; or a
                                                #   list of mappings, one trial each (no product)
        enabled: true
        twins:                 # one extra trial per point of this entry, scheduled after it
          TWIN:
            method: pruned-ffn
            params: {scales: [4, 5, 6]}
            from_parent: {match_macs: macs_analytic_all}   # param <- that column of the parent's row
    quick: {samples: 16, points.dmoe.grid.tau: [1.0, 0.6]}   # dotted overrides applied by --quick

`--set KEY=VALUE` takes the same dotted keys (`samples`, `sampling.cfg`, `measure.flop_images`, `models`,
`points.NAME.params.P`, `points.NAME.grid.P`, `points.NAME.grid`, `points.NAME.enabled`, `points.NAME.twins.T.params.P`, ...); values
are YAML (`[0.9,0.8]`, `true`, `null`), a comma list where a list is expected. A parameter is either fixed or an
axis: setting `points.NAME.grid.P` removes `points.NAME.params.P` and the other way round.

Trial keys: `<sweep_id>/<point_id>`, point_id = `<model>/<entry>[/<axis>=<value>,...][/<twin>]`; sweep_id =
`<sweep>-<UTC time>-<4 hex>`. They are deterministic given the sweep's configuration, which is recorded with its
trials in `<results>/sweeps/<sweep_id>.json` before the first trial runs. `--resume` re-expands the latest manifest
of that sweep and runs exactly the trials that have no row in the store (a row is written atomically at the end of
its trial, under its key, so a killed sweep neither loses nor duplicates rows). Twins run in a later phase: their
derived parameters come from the parent's stored row, so they are the same on every resume.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import importlib
import itertools
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.errors import BenchError
from bench.log import counter_bar, get_logger

logger = get_logger(__name__)

MANIFEST_DIR = "sweeps"           # under the results directory, next to rows/
SPEC_VERSION = 1

TOP_DEFAULTS: Dict[str, Any] = dict(description="", figure="", models=["default"], device="cpu", samples=1000,
                                    batch_size=50, seed=0, sampling={}, reference=None, measure={}, modules=[],
                                    points={}, quick={})
SAMPLING_KEYS = {"cfg": float, "top_k": int, "top_p": float, "more_smooth": bool}
# measure() options a sweep may set (bench/measure.py); types for validation of --set values
MEASURE_KEYS = {"flop_images": int, "warmup_batches": int, "timing_rounds": int, "metrics": list, "bootstrap": int, "classifier": str,
                "reference_count": int, "inception_weights": str, "cache_dir": str}
ENTRY_KEYS = ("method", "params", "grid", "twins", "enabled")
TWIN_KEYS = ("method", "params", "from_parent")
MODEL_KEYS = ("name", "var_ckpt", "vae_ckpt", "depth", "patch_nums")


# ================================================================================================ sweep files
def sweeps_dir() -> str:
    import sweeps
    return os.path.dirname(os.path.abspath(sweeps.__file__))


def list_sweeps() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(sweeps_dir()) if f.endswith(".yaml"))


def sweep_path(name: str) -> str:
    """A shipped sweep name, or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        if not os.path.isfile(name):
            raise BenchError(f"sweep file {name!r} does not exist; valid: {', '.join(list_sweeps())} or a .yaml path")
        return name
    if name not in list_sweeps():
        raise BenchError(f"unknown sweep {name!r}; valid: {', '.join(list_sweeps())} (or a path to a .yaml file)")
    return os.path.join(sweeps_dir(), name + ".yaml")


def sweep_name(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def read_yaml(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise BenchError(f"sweep file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BenchError(f"sweep file {path}: expected a mapping at the top level")
    return data


# ================================================================================================ the spec
def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
            dict: "a mapping"}.get(t, t.__name__)


def _check_type(where: str, value, typ, nullable: bool = False):
    if value is None and nullable:
        return None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if not ok:
        raise BenchError(f"{where} must be {_type_name(typ)}{' or null' if nullable else ''}, got {value!r}")
    return value


def _params_of(method: str) -> Dict[str, Any]:
    from bench.registry import method_class
    return {p.name: p for p in method_class(method).params}


def normalize(raw: dict, where: str) -> dict:
    """Fill defaults and check the structure (types, known keys); method parameters are checked by validate()."""
    unknown = sorted(set(raw) - set(TOP_DEFAULTS) - {"version"})
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(TOP_DEFAULTS)}")
    spec = copy.deepcopy(TOP_DEFAULTS)
    spec.update(copy.deepcopy({k: v for k, v in raw.items() if k != "version"}))
    for k in ("description", "figure", "device"):
        spec[k] = _check_type(f"{where}: {k}", spec[k] if spec[k] is not None else "", str)
    for k, low in (("samples", 1), ("batch_size", 1), ("seed", 0)):
        spec[k] = _check_type(f"{where}: {k}", spec[k], int)
        if spec[k] < low:
            raise BenchError(f"{where}: {k} must be >= {low}, got {spec[k]}")
    spec["reference"] = _check_type(f"{where}: reference", spec["reference"], str, nullable=True)
    if isinstance(spec["models"], (str, dict)):
        spec["models"] = [spec["models"]]
    _check_type(f"{where}: models", spec["models"], list)
    if not spec["models"]:
        raise BenchError(f"{where}: models is empty; give at least one model name")
    for i, m in enumerate(spec["models"]):
        if isinstance(m, dict):
            bad = sorted(set(m) - set(MODEL_KEYS))
            if bad:
                raise BenchError(f"{where}: models[{i}] has unknown key {bad[0]!r}; valid: {', '.join(MODEL_KEYS)}")
        elif not isinstance(m, str) or not m:
            raise BenchError(f"{where}: models[{i}] must be a model name or a mapping, got {m!r}")
    for sect, keys in (("sampling", SAMPLING_KEYS), ("measure", MEASURE_KEYS)):
        spec[sect] = _check_type(f"{where}: {sect}", spec[sect] or {}, dict)
        for k, v in list(spec[sect].items()):
            if k not in keys:
                raise BenchError(f"{where}: unknown key {sect}.{k}; valid: {', '.join(sect + '.' + x for x in keys)}")
            if keys[k] is list and isinstance(v, str):
                v = [x.strip() for x in v.split(",") if x.strip()]
            spec[sect][k] = _check_type(f"{where}: {sect}.{k}", v, keys[k], nullable=True)
    spec["modules"] = _check_type(f"{where}: modules", spec["modules"] or [], list)
    spec["quick"] = _check_type(f"{where}: quick", spec["quick"] or {}, dict)
    points = _check_type(f"{where}: points", spec["points"], dict)
    if not points:
        raise BenchError(f"{where}: points is empty; a sweep needs at least one entry")
    for name, e in points.items():
        w = f"{where}: points.{name}"
        e = _check_method_section(w, "entry", name, e, ENTRY_KEYS)
        e.setdefault("grid", {})
        e.setdefault("twins", {})
        e.setdefault("enabled", True)
        if isinstance(e["grid"], list):   # explicit points: one trial per mapping (no product)
            for i, pt in enumerate(e["grid"]):
                pt = _check_type(f"{w}.grid[{i}]", pt, dict)
                if not pt:
                    raise BenchError(f"{w}.grid[{i}] is empty; give the point's parameters")
                both = sorted(set(pt) & set(e["params"]))
                if both:
                    raise BenchError(f"{w}: {both[0]} is both a fixed parameter and set by grid[{i}]; keep one")
            keys = [json.dumps(pt, sort_keys=True) for pt in e["grid"]]
            if len(set(keys)) != len(keys):
                raise BenchError(f"{w}.grid lists a point twice")
            if not e["grid"]:
                raise BenchError(f"{w}.grid is an empty list; give at least one point (or omit grid)")
        e["grid"] = e["grid"] if isinstance(e["grid"], list) else _check_type(f"{w}.grid", e["grid"] or {}, dict)
        e["twins"] = _check_type(f"{w}.twins", e["twins"] or {}, dict)
        e["enabled"] = _check_type(f"{w}.enabled", e["enabled"], bool)
        for p, vals in (e["grid"].items() if isinstance(e["grid"], dict) else ()):
            if not isinstance(vals, list) or not vals:
                raise BenchError(f"{w}.grid.{p} must be a non-empty list of values, got {vals!r}")
            keys = [json.dumps(v, sort_keys=True) for v in vals]
            if len(set(keys)) != len(keys):
                raise BenchError(f"{w}.grid.{p} lists a value twice: {vals}")
            if p in e["params"]:
                raise BenchError(f"{w}: {p} is both a fixed parameter and a grid axis; keep one")
        for tname, t in e["twins"].items():
            tw = f"{w}.twins.{tname}"
            t = _check_method_section(tw, "twin", tname, t, TWIN_KEYS)
            t.setdefault("from_parent", {})
            t["from_parent"] = _check_type(f"{tw}.from_parent", t["from_parent"] or {}, dict)
            for p, col in t["from_parent"].items():
                _check_type(f"{tw}.from_parent.{p}", col, str)
                if p in t["params"]:
                    raise BenchError(f"{tw}: {p} is both fixed and taken from the parent; keep one")
            e["twins"][tname] = t
        points[name] = e
    if not any(e["enabled"] for e in points.values()):
        raise BenchError(f"{where}: every entry of points is disabled; enable at least one")
    return spec


def _check_method_section(w: str, what: str, name, section, allowed: Sequence[str]) -> dict:
    """What a point entry and a twin share: a name usable in trial keys, known keys, a method and its params."""
    if not isinstance(name, str) or "/" in name or "=" in name:
        raise BenchError(f"{w}: {what} names must be strings without '/' or '='")
    section = _check_type(w, section if section is not None else {}, dict)
    bad = sorted(set(section) - set(allowed))
    if bad:
        raise BenchError(f"{w}: unknown key {bad[0]!r}; valid: {', '.join(allowed)}")
    if "method" not in section:
        raise BenchError(f"{w}: no method given")
    section["method"] = _check_type(f"{w}.method", section["method"], str)
    section["params"] = _check_type(f"{w}.params", section.get("params") or {}, dict)
    return section


def valid_keys(spec: dict) -> List[str]:
    """Every dotted key --set / quick accept for this spec (method parameters from the registry)."""
    keys = ["description", "figure", "models", "device", "samples", "batch_size", "seed", "reference", "modules"]
    keys += [f"sampling.{k}" for k in SAMPLING_KEYS] + [f"measure.{k}" for k in MEASURE_KEYS]
    for name, e in spec["points"].items():
        pre = f"points.{name}"
        keys += [f"{pre}.enabled", f"{pre}.grid"]
        for p in _params_of(e["method"]):
            keys += [f"{pre}.params.{p}"] + ([f"{pre}.grid.{p}"] if isinstance(e["grid"], dict) else [])
        for tname, t in e["twins"].items():
            for p in _params_of(t["method"]):
                keys += [f"{pre}.twins.{tname}.params.{p}", f"{pre}.twins.{tname}.from_parent.{p}"]
    return keys


def compact_keys(keys: Sequence[str]) -> str:
    """['a.b.x', 'a.b.y', 'c'] -> 'a.b.{x,y}, c' (the valid-key list stays one readable line)."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        head, _, last = k.rpartition(".")
        groups.setdefault(head, []).append(last)
    out = []
    for head, lasts in groups.items():
        if not head:
            out += lasts
            continue
        out.append(f"{head}.{lasts[0]}" if len(lasts) == 1 else f"{head}.{{{','.join(lasts)}}}")
    return ", ".join(out)


def _parse_value(text: str):
    import yaml
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _as_list(value):
    """A --set value where a list is expected: a YAML list, a comma list, or one value."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and "," in value:
        return [_parse_value(x.strip()) for x in value.split(",") if x.strip()]
    return [value]


def apply_override(spec: dict, key: str, value, origin: str) -> None:
    """Set one dotted key in place; unknown keys are rejected with the valid ones listed."""
    valid = valid_keys(spec)
    if key not in valid:
        close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
        hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
        raise BenchError(f"{origin}: unknown key {key!r}{hint}; valid: {compact_keys(valid)}")
    parts = key.split(".")
    if parts[0] in ("models", "modules"):
        value = _as_list(value)
    elif parts[0] == "measure" and MEASURE_KEYS.get(parts[-1]) is list:
        value = _as_list(value)
    elif parts[0] == "points" and len(parts) == 4 and parts[2] == "grid":
        value = _as_list(value)
    elif parts[0] == "points" and len(parts) == 4 and parts[2] == "params" and isinstance(value, str):
        pass  # typed (and comma lists split) by the method's Param.validate
    node = spec
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    if parts[0] == "points" and len(parts) == 4 and parts[2] in ("grid", "params"):
        e = spec["points"][parts[1]]   # a parameter is fixed or an axis, not both
        if parts[2] == "grid":
            e["params"].pop(parts[3], None)
        elif isinstance(e["grid"], dict):
            e["grid"].pop(parts[3], None)
        else:
            for pt in e["grid"]:
                pt.pop(parts[3], None)
            e["grid"] = [pt for pt in e["grid"] if pt]
            if not e["grid"]:
                e["grid"] = {}
    if parts[0] == "points" and len(parts) == 6 and parts[4] in ("params", "from_parent"):
        other = "from_parent" if parts[4] == "params" else "params"
        spec["points"][parts[1]]["twins"][parts[3]][other].pop(parts[5], None)


def parse_sets(pairs: Sequence[str]) -> List[Tuple[str, Any]]:
    out = []
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise BenchError(f"--set expects KEY=VALUE, got {p!r}")
        out.append((k.strip(), _parse_value(v.strip())))
    return out


def import_modules(names: Sequence[str]) -> None:
    for m in names:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise BenchError(f"sweep module {m!r} cannot be imported ({e})") from None


def load_spec(name: str, quick: bool = False, sets: Sequence[str] = ()) -> dict:
    """Read a sweep, apply its `quick:` overrides (if asked) then --set ones; validate the result."""
    path = sweep_path(name)
    raw = read_yaml(path)
    where = f"sweep {sweep_name(name)}"
    import_modules(raw.get("modules") or [])
    _check_methods(raw, where)
    spec = normalize(raw, where)
    changes = []
    if quick:
        if not spec["quick"]:
            raise BenchError(f"{where} declares no quick form (a `quick:` mapping of dotted keys)")
        changes += [(k, v, f"{where}: quick") for k, v in spec["quick"].items()]
    changes += [(k, v, "--set") for k, v in parse_sets(sets)]
    for k, v, origin in changes:
        apply_override(spec, k, v, origin)
        spec = normalize(spec, where if origin != "--set" else f"--set {k}")
    spec["name"] = sweep_name(name)
    spec["source"] = os.path.abspath(path)
    spec["quick_applied"] = bool(quick)
    spec["sets"] = list(sets)
    return spec


def _check_methods(raw: dict, where: str) -> None:
    """Method names first, so that a typo is reported as such (with the valid names)."""
    from bench.registry import method_class
    for name, e in (raw.get("points") or {}).items():
        if isinstance(e, dict) and isinstance(e.get("method"), str):
            try:
                method_class(e["method"])
            except BenchError as err:
                raise BenchError(f"{where}: points.{name}: {err}") from None
            for tname, t in (e.get("twins") or {}).items():
                if isinstance(t, dict) and isinstance(t.get("method"), str):
                    try:
                        method_class(t["method"])
                    except BenchError as err:
                        raise BenchError(f"{where}: points.{name}.twins.{tname}: {err}") from None


# ================================================================================================ trials
@dataclass
class Trial:
    point_id: str                     # <model>/<entry>[/<axis>=<v>,...][/<twin>]
    model: Any                        # the spec's model entry (name or mapping)
    entry: str
    method: str
    params: Dict[str, Any]            # fixed + axis values (twins: fixed only; derived ones at run time)
    axes: Dict[str, Any] = field(default_factory=dict)
    twin: str = ""
    parent: str = ""                  # point_id of the trial a twin derives parameters from
    from_parent: Dict[str, str] = field(default_factory=dict)
    phase: int = 0

    def key(self, sweep_id: str) -> str:
        return f"{sweep_id}/{self.point_id}"


def _value_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), sort_keys=True)


def _axes_text(axes: Dict[str, Any]) -> str:
    return ",".join(f"{k}={_value_text(v)}" for k, v in axes.items())


def model_key(m) -> str:
    if isinstance(m, str):
        return m
    if m.get("name"):
        return str(m["name"])
    base = os.path.splitext(os.path.basename(str(m.get("var_ckpt", "official"))))[0]
    return base + (f"-d{m['depth']}" if m.get("depth") else "")


def expand(spec: dict) -> List[Trial]:
    """The sweep's trials in run order: per model, per entry, the product of its axes; twins after parents."""
    trials: List[Trial] = []
    for m in spec["models"]:
        mk = model_key(m)
        for name, e in spec["points"].items():
            if not e["enabled"]:
                continue
            if isinstance(e["grid"], list):
                points = [dict(pt) for pt in e["grid"]]
            else:
                axes = list(e["grid"].items())
                points = [{k: v for (k, _), v in zip(axes, combo)}
                          for combo in (itertools.product(*[v for _, v in axes]) if axes else [()])]
            for ax in points:
                pid = f"{mk}/{name}" + (f"/{_axes_text(ax)}" if ax else "")
                trials.append(Trial(pid, m, name, e["method"], {**e["params"], **ax}, ax))
                for tname, t in e["twins"].items():
                    trials.append(Trial(f"{pid}/{tname}", m, name, t["method"], dict(t["params"]), ax, tname,
                                        pid, dict(t["from_parent"]), phase=1))
    ids = [t.point_id for t in trials]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BenchError(f"sweep {spec.get('name', '')}: two trials share the point id {dup[0]!r}; list each model once")
    return trials


def validate_trials(spec: dict, trials: List[Trial], models: str = "load") -> Dict[str, dict]:
    """Every check that needs no measurement: method configs, then the models: models="load" loads embedded ones
    and runs each method's check_model (official weights are only checked to exist), "names" checks that they are
    available, "skip" leaves them out. Returns {model key: info}."""
    from bench.registry import create_method
    from bench.env import check_device
    for t in trials:
        try:
            create_method(t.method, **t.params)
        except BenchError as e:
            raise BenchError(f"sweep {spec['name']}: point {t.point_id}: {e}") from None
        unknown = sorted(set(t.from_parent) - set(_params_of(t.method)))
        if unknown:
            raise BenchError(f"sweep {spec['name']}: point {t.point_id}: from_parent sets unknown parameter "
                             f"{unknown[0]!r} of {t.method}; valid: {', '.join(_params_of(t.method))}")
    if not spec["device"].startswith("cuda"):
        check_device(spec["device"])
    elif spec["device"] != "cuda" and not spec["device"][5:].lstrip(":").isdigit():
        raise BenchError(f"unknown device {spec['device']!r}; valid: cpu, cuda, cuda:N")
    for k in ("top_k",):
        if k in spec["sampling"] and spec["sampling"][k] is not None and spec["sampling"][k] < 0:
            raise BenchError(f"sampling.{k} must be >= 0, got {spec['sampling'][k]}")
    if models == "skip":
        return {model_key(m): {} for m in spec["models"]}
    for m in spec["models"]:          # every name first: a missing model is reported before any is loaded
        _check_model(spec, m, [], load=False)
    return {model_key(m): _check_model(spec, m, [t for t in trials if t.model == m], models == "load")
            for m in spec["models"]}


def _check_model(spec: dict, m, trials: List[Trial], load: bool) -> dict:
    from bench.zoo import list_models, resolve_name
    if isinstance(m, dict):
        for k in ("var_ckpt", "vae_ckpt"):
            if not m.get(k) or not os.path.isfile(str(m[k])):
                raise BenchError(f"sweep {spec['name']}: model {model_key(m)}: {k} {m.get(k)!r} is not a file")
        return dict(model_id=None, source="official")
    try:
        resolve_name(m)
    except BenchError:
        listed = ", ".join(map(str, spec["models"]))
        raise BenchError(f"sweep {spec['name']}: model {m!r} is not available (the sweep lists {listed}); valid: "
                         f"{', '.join(list_models())}; run the others with --set models=NAME[,NAME]") from None
    if not load:
        return dict(model_id=None, source="embedded")
    bundle = load_bundle(m, "cpu")
    from bench.registry import create_method
    for t in trials:
        if t.parent:   # derived parameters are unknown until the parent has run; check the rest
            continue
        meth = create_method(t.method, **t.params)
        try:
            meth.check_model(bundle)
        except BenchError as e:
            raise BenchError(f"sweep {spec['name']}: point {t.point_id}: {e}") from None
    sampling = sampling_for(spec, bundle)
    from bench.sampling import validate_sampling
    validate_sampling(sampling, bundle.var.V)
    return dict(model_id=bundle.model_id, source=bundle.source, depth=int(bundle.var.cfg.depth))


_BUNDLES: Dict[str, Any] = {}


def load_bundle(m, device: str):
    """Model of a trial, cached per process (Ray reuses a trial's worker process for the next trial)."""
    from bench.zoo import load_model
    key = json.dumps([m, device], sort_keys=True)
    if key not in _BUNDLES:
        _BUNDLES.clear()   # one model at a time: official weights are large
        if isinstance(m, str):
            _BUNDLES[key] = load_model(m, device=device)
        else:
            _BUNDLES[key] = load_model(m.get("name", "default"), m.get("var_ckpt"), m.get("vae_ckpt"), m.get("depth"),
                                       device, m.get("patch_nums"))
    return _BUNDLES[key]


def sampling_for(spec: dict, bundle):
    from dataclasses import replace
    s = bundle.sampling
    over = {k: v for k, v in spec["sampling"].items() if v is not None}
    return replace(s, **over) if over else s


# ================================================================================================ the store
def manifest_dir(results_dir: str) -> str:
    return os.path.join(results_dir, MANIFEST_DIR)


def new_sweep_id(name: str) -> str:
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{name}-{ts}-{secrets.token_hex(2)}"


def write_manifest(results_dir: str, manifest: dict) -> str:
    from bench.atomic import atomic_write_text
    d = manifest_dir(results_dir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, manifest["sweep_id"] + ".json")
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return path


def read_manifests(results_dir: str, name: Optional[str] = None) -> List[dict]:
    """Sweep manifests of the store, oldest first (by creation time)."""
    d = manifest_dir(results_dir)
    out = []
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith(".json") and not f.startswith("."):
                try:
                    with open(os.path.join(d, f)) as fh:
                        m = json.load(fh)
                except (OSError, ValueError) as e:
                    logger.warning(f"skipping unreadable sweep manifest {f}: {e}")
                    continue
                if name is None or m.get("sweep") == name:
                    out.append(m)
    return sorted(out, key=lambda m: (m.get("created_at", ""), m.get("sweep_id", "")))


def stored_rows(results_dir: str, sweep_id: str):
    """{trial_key: row dict} of a sweep invocation."""
    from bench.results import load_results
    if not os.path.isdir(results_dir):
        return {}
    df = load_results(results_dir)
    if df.empty or "sweep_id" not in df.columns:
        return {}
    df = df[df["sweep_id"] == sweep_id]
    return {r["trial_key"]: r for r in df.to_dict("records")}


def derive_twin_params(trial: Trial, parent_row: dict) -> Dict[str, Any]:
    params = dict(trial.params)
    for p, col in trial.from_parent.items():
        if col not in parent_row:
            raise BenchError(f"twin {trial.point_id}: the parent's row has no column {col!r}")
        from bench.results import json_value
        v = json_value(parent_row[col])
        if isinstance(v, float) and v != v:
            v = None
        if v is None and not col.startswith("param_"):   # a parameter may be null (its default); a metric not
            raise BenchError(f"twin {trial.point_id}: the parent's {col} is empty")
        params[p] = v
    return params


# ================================================================================================ Ray
def _quiet_ray_env() -> None:
    """Before ray is imported: short progress (we print our own lines), no usage reporting, no result loggers."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")


def _probe(host: str, port: int, timeout: float = 5.0) -> Optional[str]:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return e.strerror or str(e)


def check_address(address: str) -> str:
    """Fail fast (one line) on an address that cannot be a reachable Ray cluster; creates nothing. Returns the
    address to connect to ('auto' resolved the way Ray does: RAY_ADDRESS, else the last `ray start` here)."""
    if address == "auto":
        _quiet_ray_env()
        try:   # ray's own resolution of 'auto' (a private API: pyproject bounds ray below 3)
            from ray._private.services import get_ray_address_from_environment
            found = get_ray_address_from_environment("auto", None)
        except ImportError:
            found = os.environ.get("RAY_ADDRESS")
        except Exception:   # ray raises ConnectionError when several or none are found
            found = None
        if not found or found == "auto":
            raise BenchError("--address auto: no running Ray cluster found on this machine (start one with "
                             "`ray start --head`); valid: HOST:PORT, ray://HOST:PORT, or no --address for a local Ray")
        host, _, port = found.rpartition(":")
        err = _probe(host, int(port)) if port.isdigit() else "not HOST:PORT"
        if err:
            raise BenchError(f"--address auto: the Ray cluster recorded here ({found}) is not reachable ({err}); "
                             f"start one with `ray start --head`, or give HOST:PORT")
        return found
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BenchError(f"--address {address!r} is not valid; valid: auto, HOST:PORT (a head's GCS address), "
                         f"ray://HOST:PORT (Ray Client)")
    if address.startswith("ray://"):
        import importlib.util
        if importlib.util.find_spec("grpc") is None:   # what ray[client] adds to ray
            raise BenchError(f"--address {address}: Ray Client is not installed here (pip install 'ray[client]'); "
                             f"valid instead: auto or the head's GCS address HOST:PORT")
    err = _probe(host.strip("[]"), int(port))
    if err:
        raise BenchError(f"cannot reach a Ray cluster at {address} ({err}); valid: auto, HOST:PORT or ray://HOST:PORT "
                         f"of a running head (`ray start --head`), or no --address for a local Ray")
    return address


def connect_ray(address: Optional[str], verbose: bool) -> dict:
    """Start a private local Ray (default) or connect to a cluster; returns what the rows record about it."""
    import logging
    _quiet_ray_env()
    import ray
    if ray.is_initialized():
        ray.shutdown()
    kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=verbose, configure_logging=True)
    t = time.time()
    try:
        if address is None:
            import torch
            # "local": never attach to a cluster someone else started on this machine
            ray.init(address="local", num_cpus=os.cpu_count() or 1,
                     num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0, **kw)
        else:
            env = {k: v for k, v in os.environ.items() if k.startswith("VARBENCH_")}
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kw)
    except Exception as e:   # ConnectionError, RuntimeError, ValueError ... from ray.init: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if address is None else ("; if the cluster uses token authentication set RAY_AUTH_MODE=token "
                                           "(token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        where = "start a local Ray" if address is None else f"connect to the Ray cluster at {address}"
        raise BenchError(f"could not {where}: {msg}{hint}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    gpus = [float(n.get("Resources", {}).get("GPU", 0)) for n in nodes]
    return dict(address=address or "local", version=ray.__version__, nodes=len(nodes),
                num_cpus=float(sum(cpus)), max_node_cpus=max(cpus) if cpus else 0.0,
                max_node_gpus=max(gpus) if gpus else 0.0, start_s=round(time.time() - t, 2))


def resources(ray_info: dict, device: str, cpus: Optional[float], gpus: Optional[float]) -> Tuple[float, float]:
    """Per-trial resources: by default a whole machine (its CPUs; its GPUs when the device is cuda)."""
    cpus = ray_info["max_node_cpus"] if cpus is None else float(cpus)
    if gpus is None:
        gpus = ray_info["max_node_gpus"] if device.startswith("cuda") else 0.0
    gpus = float(gpus)
    if cpus <= 0:
        raise BenchError(f"--cpus-per-trial must be > 0, got {cpus:g}")
    if cpus > ray_info["max_node_cpus"]:
        raise BenchError(f"--cpus-per-trial {cpus:g} exceeds the largest node's CPUs; valid: 0 < N <= "
                         f"{ray_info['max_node_cpus']:g}")
    if gpus < 0 or gpus > ray_info["max_node_gpus"]:
        raise BenchError(f"--gpus-per-trial {gpus:g} is not available; valid: 0 .. {ray_info['max_node_gpus']:g} "
                         f"(GPUs of the largest node)")
    if device.startswith("cuda") and gpus == 0:
        raise BenchError(f"device {device} needs --gpus-per-trial > 0 (no node of the cluster has a GPU)"
                         if ray_info["max_node_gpus"] == 0 else f"device {device} needs --gpus-per-trial > 0")
    return cpus, gpus


# ================================================================================================ one trial (worker)
def run_trial(job: dict) -> dict:
    """Measure one trial (called inside a Ray worker, or directly); returns a short summary, never raises."""
    import traceback
    t0 = time.time()
    try:
        import torch
        from bench.measure import measure
        from bench.registry import create_method
        import_modules(job["modules"])
        if job.get("threads"):
            torch.set_num_threads(max(1, int(job["threads"])))
        bundle = load_bundle(job["model"], job["device"])
        method = create_method(job["method"], **job["params"])
        sampling = sampling_for(job["spec_sampling"], bundle)
        row = measure(bundle, method, samples=job["samples"], seed=job["seed"], sampling=sampling,
                      batch_size=job["batch_size"], results_dir=job["results_dir"], reference=job["reference"],
                      sweep=job["sweep"], sweep_id=job["sweep_id"], trial_key=job["trial_key"],
                      extra=dict(job["extra"], ray_node=socket.gethostname()), **job["measure"])
        keep = ("fid", "fid_ci_low", "fid_ci_high", "macs_analytic_all", "macs_analytic", "macs_fvcore",
                "time_median_s", "images_per_s", "method_label", "run_id", "speedup", "speedup_ci_low",
                "speedup_ci_high", "fid_delta", "fid_delta_ci_low", "fid_delta_ci_high", "timing_noisy")
        out = {k: row.get(k) for k in keep}
        # the whole row travels back too: on a multi-node cluster the worker's disk may not be the driver's
        out.update(status="ok", trial_s=round(time.time() - t0, 2), row_json=json.dumps(row, default=str))
        return out
    except BenchError as e:
        return dict(status="error", error=str(e), traceback="", trial_s=round(time.time() - t0, 2))
    except Exception as e:  # a bug: keep the traceback for the driver to print
        return dict(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                    trial_s=round(time.time() - t0, 2))


def _trainable(config):
    from ray import tune
    job = config["job"]
    from bench.log import setup_logging
    # the worker's messages: only with -v (then prefixed with the trial), else warnings only
    setup_logging(0 if job.get("verbose") else -1, stream=sys.stdout, prefix=f"[{job['point_id']}] ")
    tune.report(run_trial(job))


# ================================================================================================ the driver
def _fmt_macs(v) -> str:
    return "-" if v is None else f"{v / 1e9:.4g} GMACs"


def _fmt(v, spec=".4g") -> str:
    try:
        return "-" if v is None or v != v else format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def trial_line(done: int, total: int, trial: Trial, res: dict) -> str:
    head = f"[{done}/{total}] {trial.point_id}"
    if res.get("status") != "ok":
        return f"{head}: FAILED ({res.get('trial_s', 0):.0f} s): {res.get('error', 'no result')}"
    ci = f" [{_fmt(res.get('fid_ci_low'))}, {_fmt(res.get('fid_ci_high'))}]"
    paired = ""
    if res.get("speedup") is not None:
        paired = (f" | speedup {_fmt(res.get('speedup'), '.3f')}x [{_fmt(res.get('speedup_ci_low'), '.3f')}, "
                  f"{_fmt(res.get('speedup_ci_high'), '.3f')}]{' (noisy)' if res.get('timing_noisy') else ''}")
    if res.get("fid_delta") is not None:
        paired += (f" | ΔFID {_fmt(res.get('fid_delta'), '+.3g')} [{_fmt(res.get('fid_delta_ci_low'), '+.3g')}, "
                   f"{_fmt(res.get('fid_delta_ci_high'), '+.3g')}]")
    return (f"{head}: FID {_fmt(res.get('fid'))}{ci} | {_fmt_macs(res.get('macs_analytic_all'))}/image | "
            f"{_fmt(res.get('time_median_s'))} s/batch{paired} | {res.get('trial_s', 0):.0f} s")


class SweepRunner:
    """Runs the pending trials of one sweep invocation, phase by phase, through Ray Tune."""

    def __init__(self, spec: dict, trials: List[Trial], sweep_id: str, results_dir: str, ray_info: dict,
                 cpus: float, gpus: float, concurrent: int = 1, verbose: bool = False,
                 status_every_s: float = 60.0):
        self.spec, self.trials, self.sweep_id = spec, trials, sweep_id
        self.results_dir = os.path.abspath(results_dir)
        self.ray_info, self.cpus, self.gpus, self.concurrent = ray_info, cpus, gpus, concurrent
        self.verbose, self.status_every_s = verbose, status_every_s
        self.failed: Dict[str, str] = {}
        self.skipped: Dict[str, str] = {}
        self.interrupted = False     # Ctrl-C: Ray Tune stops the phase; later phases are not started

    def job(self, t: Trial, params: dict) -> dict:
        s = self.spec
        extra = dict(sweep_point=t.point_id, sweep_entry=t.entry, sweep_twin=t.twin, sweep_parent=t.parent,
                     sweep_axes=json.dumps(t.axes, sort_keys=True), sweep_quick=bool(s.get("quick_applied")),
                     ray_address=self.ray_info["address"], ray_version=self.ray_info["version"],
                     ray_num_cpus=self.ray_info["num_cpus"], ray_nodes=self.ray_info["nodes"],
                     ray_cpus_per_trial=self.cpus, ray_gpus_per_trial=self.gpus,
                     ray_concurrent_trials=self.concurrent)
        return dict(point_id=t.point_id, model=t.model, method=t.method, params=params, device=s["device"],
                    samples=s["samples"], seed=s["seed"], batch_size=s["batch_size"], reference=s["reference"],
                    spec_sampling={"sampling": dict(s["sampling"])}, measure=dict(s["measure"]),
                    modules=list(s["modules"]),
                    results_dir=self.results_dir, sweep=s["name"], sweep_id=self.sweep_id,
                    trial_key=t.key(self.sweep_id), extra=extra, verbose=self.verbose, threads=int(self.cpus))

    def ensure_row(self, row_json: Optional[str]) -> None:
        """Store the trial's row here if the worker wrote it elsewhere (another node without shared storage)."""
        from bench.results import ROWS, append_row, row_filename
        if not row_json:
            return
        row = json.loads(row_json)
        if not os.path.exists(os.path.join(self.results_dir, ROWS, row_filename(row))):
            append_row(self.results_dir, row)
            logger.info(f"  (row of {row.get('trial_key')} written here: the trial ran on {row.get('ray_node')})")

    def run(self) -> Tuple[int, int]:
        """Returns (trials that reported now, trials failed or skipped). On a terminal a bar with ETA counts the
        trials; every finished trial is one log line either way."""
        rows = stored_rows(self.results_dir, self.sweep_id)
        before = len([t for t in self.trials if t.key(self.sweep_id) in rows])
        with counter_bar(len(self.trials), f"sweep {self.spec['name']}", "trial", initial=before) as self.bar:
            return self._run_phases()

    def _run_phases(self) -> Tuple[int, int]:
        total = len(self.trials)
        ran = 0
        for phase in sorted({t.phase for t in self.trials}):
            rows = stored_rows(self.results_dir, self.sweep_id)
            done = len([t for t in self.trials if t.key(self.sweep_id) in rows])
            jobs = []
            for t in self.trials:
                if t.phase != phase or t.key(self.sweep_id) in rows:
                    continue
                params = t.params
                if t.parent:
                    prow = rows.get(f"{self.sweep_id}/{t.parent}")
                    if prow is None:
                        self.skipped[t.point_id] = f"its parent {t.parent} has no row"
                        logger.info(f"[skip] {t.point_id}: its parent {t.parent} has no row")
                        self.bar.update(1)
                        continue
                    try:
                        params = derive_twin_params(t, prow)
                        from bench.registry import create_method
                        create_method(t.method, **params)
                    except BenchError as e:
                        self.failed[t.point_id] = str(e)
                        logger.info(f"[{done}/{total}] {t.point_id}: FAILED: {e}")
                        self.bar.update(1)
                        continue
                jobs.append((t, self.job(t, params)))
            if jobs:
                ran += self._tune(jobs, done, total)
            if self.interrupted:
                break
        return ran, len(self.failed) + len(self.skipped)

    def _tune(self, jobs, done: int, total: int) -> int:
        """Run one phase's jobs as one Ray Tune grid; returns how many trials reported."""
        import shutil
        import tempfile
        from ray import tune
        by_id = {j["point_id"]: t for t, j in jobs}
        runner = self
        counter = {"done": done}
        t_start = time.time()

        class Progress(tune.Callback):
            """One line per finished trial; Ray's own status in one line at most every status_every_s."""

            def __init__(self):
                self.last = time.time()
                self.seen = set()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self.record(trial.config["job"]["point_id"], result)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.record(trial.config["job"]["point_id"], None)

            def record(self, pid, result):
                """One finished trial (result None: its worker died), once."""
                if pid in self.seen:
                    return
                self.seen.add(pid)
                counter["done"] += 1
                runner.bar.update(1)
                if result is None:
                    runner.failed[pid] = "the trial's worker died"
                    logger.info(f"[{counter['done']}/{total}] {pid}: FAILED: the trial's worker died (see Ray's log)")
                    return
                if result.get("status") != "ok":
                    runner.failed[pid] = result.get("error", "")
                else:
                    runner.ensure_row(result.get("row_json"))
                logger.info(trial_line(counter["done"], total, by_id[pid], result))
                if result.get("traceback"):
                    logger.info(result["traceback"].rstrip())

            def on_step_end(self, iteration, trials, **info):
                if time.time() - self.last >= runner.status_every_s:
                    self.last = time.time()
                    from collections import Counter
                    c = Counter(t.status for t in trials)
                    running = [t.config["job"]["point_id"] for t in trials if t.status == "RUNNING"]
                    logger.info(f"ray: {', '.join(f'{n} {s}' for s, n in sorted(c.items()))} | "
                               f"{counter['done']}/{total} done | {time.time() - t_start:.0f} s"
                               + (f" | running {', '.join(running)}" if running else ""))

        progress = Progress()
        res = {"CPU": self.cpus}
        if self.gpus:
            res["GPU"] = self.gpus
        storage = tempfile.mkdtemp(prefix="var-bench-ray-")
        try:
            tuner = tune.Tuner(
                tune.with_resources(_trainable, res),
                param_space={"job": tune.grid_search([j for _, j in jobs])},
                tune_config=tune.TuneConfig(max_concurrent_trials=self.concurrent, reuse_actors=True,
                                            trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                run_config=tune.RunConfig(name=self.sweep_id, storage_path=storage, verbose=0,
                                          callbacks=[progress], failure_config=tune.FailureConfig(max_failures=0),
                                          log_to_file=False))
            grid = tuner.fit()
            # Through Ray Client (ray://) the Tune loop and its callbacks run on the cluster, so the trials'
            # results reach this process only here, with the result grid: record those the callback did not see
            for r in grid:
                pid = ((r.config or {}).get("job") or {}).get("point_id")
                if pid in by_id and pid not in progress.seen and (r.metrics or r.error is not None):
                    progress.record(pid, r.metrics if r.metrics and "status" in r.metrics else None)
            if any(pid not in progress.seen for pid in by_id):    # stopped before every trial reported
                self.interrupted = True
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        return len(progress.seen)


def plan(spec: dict, trials: List[Trial], sweep_id: str, results_dir: str) -> List[Trial]:
    rows = stored_rows(results_dir, sweep_id)
    return [t for t in trials if t.key(sweep_id) not in rows]


def manifest_for(spec: dict, trials: List[Trial], sweep_id: str, models: Dict[str, dict]) -> dict:
    return dict(version=SPEC_VERSION, sweep=spec["name"], sweep_id=sweep_id,
                created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                spec={k: v for k, v in spec.items()}, models=models,
                trials=[dict(asdict(t), key=t.key(sweep_id)) for t in trials])


def spec_fingerprint(spec: dict) -> str:
    """What makes two invocations the same sweep (not description or where the file lives)."""
    keep = {k: spec[k] for k in ("models", "device", "samples", "batch_size", "seed", "sampling", "reference",
                                 "measure", "modules", "points")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
