"""The sweep spec: a sweep YAML read, checked against its schema, and changed by the dotted `quick:`/`--set` overrides.

Sweeps: a grid of (model, method, parameters) points, each measured by one Ray Tune trial calling
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
    measure: {}                # further measurement settings (bench/measure_config.py: MeasureConfig's fields and
                               #   bounds): flop_images, warmup_batches, timing_rounds, metrics, bootstrap, classifier,
                               #   reference_count, inception_weights, cache_dir, dtype (fp32|bf16|fp16), resolve
                               #   (% of dense FID) with max_samples: samples grow by looks (bench/resolve.py)
    modules: []                # extra Python modules that register methods (imported by driver and trials)
    points:                    # named entries; each expands to the product of its grid axes
      NAME:
        method: dmoe           # a registered method (bench.registry)
        params: {moe_scales: [4, 5, 6]}        # fixed parameters
        grid: {tau: [1.0, 0.8, 0.6]}            # axes: one trial per combination, in this order; or a
                                                #   list of mappings, one trial each (no product)
        enabled: true
        models: [default]      # optional: the sweep's models this entry runs on (default: all of them)
        twins:                 # one extra trial per point of this entry, scheduled after it
          TWIN:
            method: pruned-ffn
            params: {scales: [4, 5, 6]}    # + the parent's values of settings both declare alike and the twin
                                           #   leaves out (a DMoE point's finetune_steps: the same fine-tune)
            from_parent: {match_macs: macs_analytic_all}   # param <- that column of the parent's row
    quick: {samples: 16, points.dmoe.grid.tau: [1.0, 0.6]}   # dotted overrides applied by --quick
    preset: imagenet           # a named protocol (bench/presets.py): its samples and sampling fill the keys the YAML
                               #   leaves out; it needs `reference` (ADM's .npz) and `measure.inception_weights`

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
import importlib
import json
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

from bench.errors import BenchError
from bench.measure_config import SETTINGS, MeasureConfig, check_setting, setting_kind, sweep_settings
from bench.presets import get_preset, resolve_preset
from bench.registry import method_class

# the measurement settings a sweep sets (bench/measure_config.py declares their types, defaults, bounds and help):
# samples, batch_size, seed, reference at the top level; the others under `measure:`
SWEEP_TOP = sweep_settings("top")
MEASURE_KEYS = {k: setting_kind(k) for k in sweep_settings("measure")}
TOP_DEFAULTS: Dict[str, Any] = dict(description="", figure="", models=["default"], device="cpu",
                                    **{k: SETTINGS[k].default for k in SWEEP_TOP}, sampling={}, measure={}, modules=[],
                                    points={}, quick={}, preset=None)
SAMPLING_KEYS = {"cfg": float, "top_k": int, "top_p": float, "more_smooth": bool}

ENTRY_KEYS = ("method", "params", "grid", "twins", "enabled", "models")
TWIN_KEYS = ("method", "params", "from_parent")
MODEL_KEYS = ("name", "var_ckpt", "vae_ckpt", "depth", "patch_nums")


def measure_config(spec: dict) -> MeasureConfig:
    """The MeasureConfig of the spec's trials: its top-level settings and its measure: section, checked together
    (resolve's plan against samples and batch size)."""
    values = {**{k: spec[k] for k in SWEEP_TOP}, **{k: v for k, v in spec["measure"].items() if v is not None}}
    return MeasureConfig.from_values(values, lambda k: k if k in SWEEP_TOP else f"measure.{k}")


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


class DuplicateKey(Exception):
    """A mapping of the YAML gives a key twice (PyYAML keeps the last value without a word)."""

    def __init__(self, path: str, first: int, second: int):
        super().__init__(f"key {path} given twice (lines {first} and {second}); give it once")


def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping, naming its dotted path and both lines."""
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode
    merge = "tag:yaml.org,2002:merge"

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            seen_nodes = set()
            stack = [(node, "")]
            while stack:
                n, where = stack.pop()
                if id(n) in seen_nodes:          # an alias of a node already checked (or a recursive one)
                    continue
                seen_nodes.add(id(n))
                if isinstance(n, MappingNode):
                    keys = {}
                    for k, v in n.value:
                        if k.tag == merge:
                            stack.append((v, where))
                            continue
                        name = k.value if isinstance(k, ScalarNode) else f"<{k.id}>"
                        path = f"{where}.{name}" if where else str(name)
                        if isinstance(k, ScalarNode):
                            ident = (k.tag, k.value)
                            if ident in keys:
                                raise DuplicateKey(path, keys[ident], k.start_mark.line + 1)
                            keys[ident] = k.start_mark.line + 1
                        stack.append((v, path))
                elif isinstance(n, SequenceNode):
                    stack.extend((v, f"{where}[{i}]") for i, v in enumerate(n.value))
            return super().construct_document(node)
    return UniqueKeyLoader


def read_yaml(path: str) -> dict:
    import yaml
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_unique_key_loader())   # noqa: S506 (a SafeLoader subclass)
    except DuplicateKey as e:
        raise BenchError(f"sweep file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise BenchError(f"sweep file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise BenchError(f"sweep file {path}: not UTF-8 text; valid: a YAML file") from None
    except OSError as e:
        raise BenchError(f"sweep file {path} cannot be read ({e.strerror or e})") from None
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


def method_params(method: str) -> Dict[str, Any]:
    """The parameters a registered method takes, by name."""
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
    for k in SWEEP_TOP:
        spec[k] = check_setting(k, spec[k], f"{where}: {k}")
    spec["preset"] = _check_type(f"{where}: preset", spec["preset"], str, nullable=True)
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
            if sect == "sampling":
                spec[sect][k] = _check_type(f"{where}: {sect}.{k}", v, keys[k], nullable=True)
                if keys[k] is float and spec[sect][k] is not None and not math.isfinite(spec[sect][k]):
                    raise BenchError(f"{where}: {sect}.{k} must be a finite number, got {spec[sect][k]}")
            elif v is not None:   # null: the setting's default
                v = check_setting(k, v, f"{where}: measure.{k}")
                spec[sect][k] = list(v) if isinstance(v, tuple) else v   # the spec stays plain YAML/JSON
    spec["modules"] = [spec["modules"]] if isinstance(spec["modules"], str) else spec["modules"]
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
                pt = _check_type(f"{w}.grid[{i}]", pt, dict)   # {}: the fixed parameters alone
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
        e["models"] = _entry_models(w, e.get("models"), spec["models"])
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


def model_key(m) -> str:
    """A model entry's key in point ids: its name, or for official weights the checkpoint's file name (+ depth)."""
    if isinstance(m, str):
        return m
    if m.get("name"):
        return str(m["name"])
    base = os.path.splitext(os.path.basename(str(m.get("var_ckpt", "official"))))[0]
    return base + (f"-d{m['depth']}" if m.get("depth") else "")


def _entry_models(w: str, models, sweep_models):
    """An entry's `models`: a subset of the sweep's model keys, or None (all of them, whatever --set models= says)."""
    keys = [model_key(m) for m in sweep_models]
    if models is None:
        return None
    models = [models] if isinstance(models, str) else _check_type(f"{w}.models", models, list)
    bad = [m for m in models if m not in keys]
    if bad or not models:
        raise BenchError(f"{w}.models: {bad[0] if bad else 'an empty list'!r} is not a model of this sweep; "
                         f"valid: {', '.join(keys)}")
    return list(dict.fromkeys(models))


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
        keys += [f"{pre}.enabled", f"{pre}.grid", f"{pre}.models"]
        for p in method_params(e["method"]):
            keys += [f"{pre}.params.{p}"] + ([f"{pre}.grid.{p}"] if isinstance(e["grid"], dict) else [])
        for tname, t in e["twins"].items():
            for p in method_params(t["method"]):
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
    elif parts[0] == "measure" and MEASURE_KEYS.get(parts[-1]) is tuple:
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
        else:   # each point keeps what else it sets: a point left empty is the fixed parameters alone
            kept: list = []
            for pt in e["grid"]:
                pt.pop(parts[3], None)
                if pt not in kept:   # points that differed only in the now fixed parameter: one trial
                    kept.append(pt)
            e["grid"] = kept if any(kept) else {}
    if parts[0] == "points" and len(parts) == 6 and parts[4] in ("params", "from_parent"):
        other = "from_parent" if parts[4] == "params" else "params"
        spec["points"][parts[1]]["twins"][parts[3]][other].pop(parts[5], None)


def parse_sets(pairs: Sequence[str]) -> List[Tuple[str, Any]]:
    out = []
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise BenchError(f"--set expects KEY=VALUE, got {p!r}")
        if any(k.strip() == seen for seen, _ in out):   # the last one would win without a word
            raise BenchError(f"--set {k.strip()} given twice (--model is --set models=); give it once")
        out.append((k.strip(), _parse_value(v.strip())))
    return out


def import_modules(names, where: str = "sweep") -> None:
    """Import a sweep's `modules:` (one name or a list of names; they register methods)."""
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(m, str) and m for m in names):
        raise BenchError(f"{where}: modules must be a list of module names (e.g. [mypkg.methods]), got {names!r}")
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
    import_modules(raw.get("modules") or [], where)
    _check_methods(raw, where)
    spec = normalize(apply_preset(raw, where), where)
    changes = []
    if quick:
        if not spec["quick"]:
            raise BenchError(f"{where} declares no quick form (a `quick:` mapping of dotted keys)")
        changes += [(k, v, f"{where}: quick") for k, v in spec["quick"].items()]
    changes += [(k, v, "--set") for k, v in parse_sets(sets)]
    for k, v, origin in changes:
        apply_override(spec, k, v, origin)
        spec = normalize(spec, where if origin != "--set" else f"--set {k}")
    check_preset(spec, where)
    spec["name"] = sweep_name(name)
    spec["source"] = os.path.abspath(path)
    spec["quick_applied"] = bool(quick)
    spec["sets"] = list(sets)
    return spec


def apply_preset(raw: dict, where: str) -> dict:
    """A YAML `preset:` fills samples and sampling where the YAML gives none (the YAML's own keys win)."""
    name = raw.get("preset")
    if name is None:
        return raw
    if not isinstance(name, str):
        raise BenchError(f"{where}: preset must be a string or null, got {name!r}")
    try:
        p = get_preset(name)
    except BenchError as e:
        raise BenchError(f"{where}: {e}") from None
    raw = copy.deepcopy(raw)
    raw.setdefault("samples", p.samples)
    sampling = raw.get("sampling") if isinstance(raw.get("sampling"), dict) else {}
    raw["sampling"] = {**p.sampling, **sampling}
    return raw


def check_preset(spec: dict, where: str) -> None:
    """The preset's required files, after every override (so --set reference=... counts)."""
    if spec.get("preset"):
        try:
            resolve_preset(spec["preset"], spec["reference"], spec["measure"].get("inception_weights"),
                           flag_names=("reference:", "measure.inception_weights:"))
        except BenchError as e:
            raise BenchError(f"{where}: {e}") from None


def _check_methods(raw: dict, where: str) -> None:
    """Method names first, so that a typo is reported as such (with the valid names). Nodes of the wrong type
    are left to normalize(), which names their key path."""

    def check(section, path):
        if isinstance(section, dict) and isinstance(section.get("method"), str):
            try:
                method_class(section["method"])
            except BenchError as err:
                raise BenchError(f"{where}: {path}: {err}") from None
    points = raw.get("points")
    for name, e in (points.items() if isinstance(points, dict) else ()):
        check(e, f"points.{name}")
        twins = e.get("twins") if isinstance(e, dict) else None
        for tname, t in (twins.items() if isinstance(twins, dict) else ()):
            check(t, f"points.{name}.twins.{tname}")


def absolutize_paths(spec: dict) -> None:
    """Paths in the spec are relative to where the command runs; trials may run elsewhere (Ray workers)."""
    for sect, key in (("measure", "classifier"), ("measure", "inception_weights"), ("measure", "cache_dir")):
        v = spec[sect].get(key)
        if isinstance(v, str) and v:
            spec[sect][key] = os.path.abspath(v)
    r = spec.get("reference")
    if isinstance(r, str) and os.path.exists(r):
        spec["reference"] = os.path.abspath(r)
    for m in spec["models"]:
        if isinstance(m, dict):
            for k in ("var_ckpt", "vae_ckpt"):
                if m.get(k):
                    m[k] = os.path.abspath(m[k])
