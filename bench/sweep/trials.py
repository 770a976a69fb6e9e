"""Trial expansion: a sweep spec as its trials in run order (twins after their parents), the checks a trial
needs before it runs (method configs, models), and what a trial takes from its model and its parent's row."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

from bench.errors import BenchError
from bench.registry import create_method, method_class
from bench.results import SCHEMA, json_value
from bench.sweep.spec import measure_config, method_params, model_key


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


def value_text(v) -> str:
    """A parameter value as point ids and the dry-run listing show it."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), sort_keys=True)


def _axes_text(axes: Dict[str, Any]) -> str:
    return ",".join(f"{k}={value_text(v)}" for k, v in axes.items())


def shared_settings(parent_method: str, twin_method: str) -> List[str]:
    """Parameters two methods declare with the same Param object: one recipe setting (bench.recipe) naming the same
    artifact, e.g. DMoE's fine-tune (hoyer_weight, finetune_steps, prepare_seed) that a Pruned-FFN twin prunes."""
    try:
        a, b = method_class(parent_method).params, method_class(twin_method).params
    except BenchError:   # an unknown method: the spec's checks name it
        return []
    return [p.name for p in b if any(p is q for q in a)]


def twin_params(parent_method: str, parent_params: Dict[str, Any], twin_method: str,
                twin: Dict[str, Any]) -> Dict[str, Any]:
    """A twin's fixed parameters: its own, and the parent's values of the settings they share (shared_settings)
    that the twin does not set: a DMoE point with finetune_steps=60 gets a Pruned-FFN twin on that fine-tune, not
    on the default 300-step one."""
    out = dict(twin)
    for p in shared_settings(parent_method, twin_method):
        if p in parent_params and p not in out:
            out[p] = parent_params[p]
    return out


def expand(spec: dict) -> List[Trial]:
    """The sweep's trials in run order: per model, per entry, the product of its axes; twins after parents."""
    trials: List[Trial] = []
    for m in spec["models"]:
        mk = model_key(m)
        for name, e in spec["points"].items():
            if not e["enabled"] or (e.get("models") is not None and mk not in e["models"]):
                continue
            if isinstance(e["grid"], list):
                points = [dict(pt) for pt in e["grid"]]
            else:
                axes = list(e["grid"].items())
                points = [{k: v for (k, _), v in zip(axes, combo)}
                          for combo in (itertools.product(*[v for _, v in axes]) if axes else [()])]
            for ax in points:
                pid = f"{mk}/{name}" + (f"/{_axes_text(ax)}" if ax else "")
                params = {**e["params"], **ax}
                trials.append(Trial(pid, m, name, e["method"], params, ax))
                for tname, t in e["twins"].items():
                    trials.append(Trial(f"{pid}/{tname}", m, name, t["method"],
                                        twin_params(e["method"], params, t["method"], t["params"]), ax, tname,
                                        pid, dict(t["from_parent"]), phase=1))
    ids = [t.point_id for t in trials]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BenchError(f"sweep {spec.get('name', '')}: two trials share the point id {dup[0]!r} (a model listed "
                         f"twice, or grid values that print alike such as 0.5 and '0.5'); list each once")
    return trials


def validate_trials(spec: dict, trials: List[Trial], models: str = "load") -> Dict[str, dict]:
    """Every check that needs no measurement: method configs, then the models: models="load" loads embedded ones
    and runs each method's check_model (official weights are only checked to exist), "names" checks that they are
    available, "skip" leaves them out. Returns {model key: info}."""
    from bench.env import check_device   # lazy: pulls torch; the CLI imports this module
    by_id = {t.point_id: t for t in trials}
    same: Dict[tuple, str] = {}
    for t in trials:
        try:
            config = create_method(t.method, **t.params).config
        except BenchError as e:
            raise BenchError(f"sweep {spec['name']}: point {t.point_id}: {e}") from None
        if not t.parent:   # two points the method sees as one (tau 1 and 1.0) would measure it twice
            key = (json.dumps(t.model, sort_keys=True, default=str), t.method,
                   json.dumps(config, sort_keys=True, default=str))
            if key in same:
                raise BenchError(f"sweep {spec['name']}: points {same[key]} and {t.point_id} run the same "
                                 f"configuration of {t.method}; list it once")
            same[key] = t.point_id
        unknown = sorted(set(t.from_parent) - set(method_params(t.method)))
        if unknown:
            raise BenchError(f"sweep {spec['name']}: point {t.point_id}: from_parent sets unknown parameter "
                             f"{unknown[0]!r} of {t.method}; valid: {', '.join(method_params(t.method))}")
        if t.parent:   # before any trial runs: a column the parent's row cannot have would fail after the parent
            columns = parent_columns(by_id[t.parent].method)
            for p, col in t.from_parent.items():
                if col not in columns:
                    close = [c for c in columns if c.startswith(("macs_analytic", "param_")) and "<" not in c]
                    raise BenchError(f"sweep {spec['name']}: point {t.point_id}: from_parent.{p} names column "
                                     f"{col!r}, which rows of {by_id[t.parent].method} do not have; valid "
                                     f"(e.g.): {', '.join(close)} (all: python -m bench results schema)")
    try:   # the measurement settings that go together (resolve's plan against samples and batch size)
        measure_config(spec)
    except BenchError as e:
        raise BenchError(f"sweep {spec['name']}: {e}") from None
    if not spec["device"].startswith("cuda"):
        check_device(spec["device"])
    elif spec["device"] != "cuda" and not spec["device"][5:].lstrip(":").isdigit():
        raise BenchError(f"unknown device {spec['device']!r}; valid: cpu, cuda, cuda:N")
    import torch
    if not spec["device"].startswith("cuda") or torch.cuda.is_available():   # else the trials check on their GPU
        from bench.precision import check_dtype   # lazy: pulls torch; the CLI imports this module
        check_dtype(spec["measure"].get("dtype"), spec["device"], f"sweep {spec['name']}: measure.dtype")
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
    from bench.zoo import list_models, resolve_name   # lazy: pulls torch; the CLI imports this module
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
    for t in trials:
        if t.parent:   # derived parameters are unknown until the parent has run; check the rest
            continue
        meth = create_method(t.method, **t.params)
        try:
            meth.check_model(bundle)
        except BenchError as e:
            raise BenchError(f"sweep {spec['name']}: point {t.point_id}: {e}") from None
    sampling = sampling_for(spec, bundle)
    from bench.sampling import validate_sampling   # lazy: pulls torch; the CLI imports this module
    validate_sampling(sampling, bundle.var.V)
    from bench.quality import check_reference   # lazy: pulls torch; the CLI imports this module
    try:   # what each trial's measure() would refuse, refused here before the manifest and the first trial
        from bench.checkpoints import check_writable_dir   # lazy: pulls torch; the CLI imports this module
        from bench.dense_cache import dense_cache_dir   # lazy: pulls torch; the CLI imports this module
        c = measure_config(spec)
        check_writable_dir(dense_cache_dir(c.cache_dir), "cache directory")
        check_reference(bundle, c.samples, c.reference, c.inception_weights, c.metrics,
                        reference_count=c.reference_count, classifier=c.classifier)
    except BenchError as e:
        raise BenchError(f"sweep {spec['name']}: model {model_key(m)}: {e}") from None
    return dict(model_id=bundle.model_id, source=bundle.source, depth=int(bundle.var.cfg.depth))


_BUNDLES: Dict[str, Any] = {}


def load_bundle(m, device: str):
    """Model of a trial, cached per process (Ray reuses a trial's worker process for the next trial)."""
    from bench.zoo import load_model   # lazy: pulls torch; the CLI imports this module
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


def parent_columns(method: str) -> List[str]:
    """Columns every row of `method` has: the results schema and its parameters' param_<name> columns."""
    return [c for c in SCHEMA if "<" not in c] + [f"param_{p}" for p in method_params(method)]


def derive_twin_params(trial: Trial, parent_row: dict) -> Dict[str, Any]:
    """A twin's parameters: its fixed ones, and those its from_parent takes from columns of the parent's row."""
    params = dict(trial.params)
    for p, col in trial.from_parent.items():
        if col not in parent_row:
            raise BenchError(f"twin {trial.point_id}: the parent's row has no column {col!r}")
        v = json_value(parent_row[col])
        if isinstance(v, float) and v != v:
            v = None
        if v is None and not col.startswith("param_"):   # a parameter may be null (its default); a metric not
            raise BenchError(f"twin {trial.point_id}: the parent's {col} is empty")
        params[p] = v
    return params
