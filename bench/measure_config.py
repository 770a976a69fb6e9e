"""The settings of one measurement, declared once: MeasureConfig's fields, each with its type, default, bounds and help.

    config = MeasureConfig(samples=1000, resolve=1)      # checked: a bad value is one line (BenchError)
    row = measure(bundle, method, config)                # bench.measure

Everything else reads them from here: `run`'s flags (bench/commands/run.py: MeasureConfig.from_args), the sweep
YAML's top-level `samples`/`batch_size`/`seed`/`reference` and its `measure:` section (bench/sweep/spec.py:
SWEEP_TOP / SWEEP_MEASURE, checked by check_setting), and a sweep trial's job (MeasureConfig.as_dict ->
MeasureConfig.from_dict in the trial). A new setting is one field here.

A bad value is refused with the setting's name as its caller spells it (`--samples`, `measure.bootstrap`,
`samples`) and its valid range, e.g. "--warmup-batches must be in 0..1000, got 99999".
Standard library and bench.defaults/errors/resolve only: the CLI parses without importing torch (tests/
test_cli_instant.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Tuple, Union, get_type_hints

from bench.defaults import (DEFAULT_BATCH_SIZE, DEFAULT_DTYPE, DEFAULT_FLOP_IMAGES, DEFAULT_TIMING_ROUNDS,
                            DTYPE_ALIASES, DTYPE_NAMES, MAX_BOOTSTRAP, MAX_REFERENCE_COUNT, MAX_RESOLVE_PCT, MAX_SEED,
                            MAX_THREADS, MAX_TIMING_ROUNDS, MAX_WARMUP_BATCHES, QUALITY_METRICS)
from bench.errors import BenchError
from bench.resolve import make_plan


def setting(default, help: str, *, low=None, high=None, low_open: bool = False, sweep: Optional[str] = "measure",
            group: str = "", metavar: Optional[str] = None):
    """A MeasureConfig field. low/high: inclusive bounds (low_open: low itself excluded); sweep: where a sweep YAML
    sets it ("top": a top-level key, "measure": the measure: section, None: not in sweeps); group: the `run --help`
    group."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, low_open=low_open, sweep=sweep,
                                                group=group, metavar=metavar))


@dataclass(frozen=True)
class MeasureConfig:
    samples: int = setting(1000, "images to generate (quality, timing)", low=1, sweep="top")
    seed: int = setting(0, "base seed of the seed scheme", low=0, high=MAX_SEED, sweep="top")
    batch_size: int = setting(DEFAULT_BATCH_SIZE, "images per generation batch", low=1, sweep="top")
    flop_images: int = setting(DEFAULT_FLOP_IMAGES, "images of the fvcore-counted generation (0: no FLOP count)",
                               low=0)
    warmup_batches: int = setting(1, "leading batches left out of the time statistics", low=0,
                                  high=MAX_WARMUP_BATCHES)
    timing_rounds: int = setting(DEFAULT_TIMING_ROUNDS, "paired ABBA rounds against dense for `speedup` (0: off)",
                                 low=0, high=MAX_TIMING_ROUNDS)
    threads: Optional[int] = setting(None, "torch intra-op threads (default: torch's; recorded); a sweep gives each "
                                     "trial one per CPU", low=1, high=MAX_THREADS, sweep=None)
    dtype: str = setting(DEFAULT_DTYPE, f"{' | '.join(DTYPE_NAMES)}: autocast of the VAR transformer forward "
                         "(sampling and VQ-VAE decode stay float32; the paired dense side and the dense reference "
                         "run in the same dtype)")
    cache_dir: Optional[str] = setting(None, "cache root for dense outputs and reference statistics (default "
                                       "VARBENCH_CACHE or ~/.cache/var-bench)")
    reference: Optional[str] = setting(None, "reference set: shapes[:val|test], an image folder, or an .npz "
                                       "(default: the embedded model's held-out set)", sweep="top", group="quality")
    reference_count: Optional[int] = setting(None, "reference images to use (default: all / 5000)", low=1,
                                             high=MAX_REFERENCE_COUNT, group="quality")
    inception_weights: Optional[str] = setting(None, "torch-fidelity Inception weights file (Inception features "
                                               "instead of the shipped classifier)", group="quality")
    classifier: Optional[str] = setting(None, "classifier .safetensors as feature extractor (default: the model's "
                                        "shipped one)", group="quality")
    metrics: Tuple[str, ...] = setting(QUALITY_METRICS, f"comma-separated subset of {','.join(QUALITY_METRICS)}",
                                       group="quality")
    bootstrap: int = setting(100, "FID bootstrap resamples (0: no intervals)", low=0, high=MAX_BOOTSTRAP,
                             group="quality")
    resolve: Optional[float] = setting(None, "sample size as a target: the samples are the first look; the "
                                       "method's samples double (dense's reused from the cache) until the paired "
                                       "ΔFID interval's half-width is <= PCT % of dense FID, or it excludes 0, or "
                                       "max samples is reached; intervals corrected for the repeated looks "
                                       "(bench/resolve.py)", low=0, low_open=True, high=MAX_RESOLVE_PCT,
                                       group="quality", metavar="PCT")
    max_samples: Optional[int] = setting(None, "the budget of resolve: its last look (default 20 x samples)", low=1,
                                         group="quality")

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))
        self.resolve_plan()   # the settings that only make sense together

    # --------------------------------------------------------------------------------------- built from
    @classmethod
    def from_values(cls, values: Dict[str, Any], label: Callable[[str], str] = str) -> "MeasureConfig":
        """A config from {setting: value} (missing ones: their default), each checked under label(name), then
        the settings that go together (resolve's)."""
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise BenchError(f"unknown measurement setting {unknown[0]!r}; valid: {', '.join(SETTINGS)}")
        checked = {k: check_setting(k, v, label(k)) for k, v in values.items()}
        check_resolve_settings(checked, label)
        return cls(**checked)

    @classmethod
    def from_args(cls, args) -> "MeasureConfig":
        """From parsed `run` flags (flag_name(k) each; a flag left out is None: the setting's default)."""
        values = {k: getattr(args, k) for k in SETTINGS if getattr(args, k, None) is not None}
        return cls.from_values(values, flag_name)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MeasureConfig":
        """The inverse of as_dict (a sweep trial's job)."""
        return cls.from_values(d)

    def as_dict(self) -> Dict[str, Any]:
        """Plain JSON-able values (metrics as a list)."""
        d = asdict(self)
        d["metrics"] = list(d["metrics"])
        return d

    def resolve_plan(self):
        """The --resolve plan (bench.resolve.ResolvePlan: its looks and level), or None without resolve."""
        return check_resolve_settings(asdict(self), str)


SETTINGS: Dict[str, Any] = {f.name: f for f in fields(MeasureConfig)}
_TYPES = get_type_hints(MeasureConfig)


def flag_name(name: str) -> str:
    """The `run` flag of a setting: --batch-size for batch_size."""
    return "--" + name.replace("_", "-")


def setting_kind(name: str) -> type:
    """int, float, str or tuple (of str): the setting's type without Optional."""
    t = _TYPES[name]
    if getattr(t, "__origin__", None) is Union:
        t = next(a for a in t.__args__ if a is not type(None))
    return tuple if getattr(t, "__origin__", None) is tuple else t


def sweep_settings(where: str) -> Tuple[str, ...]:
    """The settings a sweep YAML sets at `where` ("top" or "measure")."""
    return tuple(k for k, f in SETTINGS.items() if f.metadata["sweep"] == where)


def range_text(name: str) -> str:
    m = SETTINGS[name].metadata
    low, high = m["low"], m["high"]
    if m["low_open"]:
        return f"in ({low:g}, {high:g}]"
    return f">= {low}" if high is None else f"in {low}..{high}"


def check_setting(name: str, value, label: Optional[str] = None):
    """One setting's value, normalised (3.0 -> 3 for an integer, a comma string -> a tuple of metrics, bf16's long
    name -> bf16; None -> the default where the setting has one), or one line naming `label` and the valid values."""
    label = label or name
    f = SETTINGS[name]
    if value is None:
        return f.default
    kind = setting_kind(name)
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BenchError(f"{label} must be an integer {range_text(name)}, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BenchError(f"{label} must be a number {range_text(name)}, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise BenchError(f"{label} must be a finite number {range_text(name)}, got {value}")
    elif kind is tuple:
        return _check_metrics(value, label)
    elif not isinstance(value, str):
        raise BenchError(f"{label} must be a string, got {value!r}")
    if name == "dtype":
        key = DTYPE_ALIASES.get(value.strip().lower(), value.strip().lower())
        if key not in DTYPE_NAMES:
            raise BenchError(f"{label} {value!r} is not a valid dtype; valid: {', '.join(DTYPE_NAMES)}")
        return key
    m = f.metadata
    if kind in (int, float) and m["low"] is not None:
        below = value <= m["low"] if m["low_open"] else value < m["low"]
        if below or (m["high"] is not None and value > m["high"]):
            raise BenchError(f"{label} must be {range_text(name)}, got {value:g}" if kind is float else
                             f"{label} must be {range_text(name)}, got {value}")
    return value


def _check_metrics(value, label: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",") if m.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise BenchError(f"{label} must be a list of quality metrics ({', '.join(QUALITY_METRICS)}), got {value!r}")
    unknown = [m for m in value if m not in QUALITY_METRICS]
    if unknown or not value:
        raise BenchError(f"{label}: unknown quality metric {unknown[0] if unknown else '(none)'!r}; valid: "
                         f"{', '.join(QUALITY_METRICS)}")
    return tuple(dict.fromkeys(value))


def check_resolve_settings(values: Dict[str, Any], label: Callable[[str], str] = str):
    """resolve with max_samples, bootstrap and metrics, checked together; returns the plan (or None)."""
    resolve, max_samples = values.get("resolve"), values.get("max_samples")
    if resolve is None:
        if max_samples is not None:
            raise BenchError(f"{label('max_samples')} is the budget of {label('resolve')}; give {label('resolve')} "
                             f"too (e.g. {label('resolve')} 1), or drop it")
        return None
    bootstrap = values.get("bootstrap", SETTINGS["bootstrap"].default)
    if bootstrap < 1 or "fid" not in values.get("metrics", QUALITY_METRICS):
        raise BenchError(f"{label('resolve')} decides on the paired ΔFID interval: it needs the fid metric and "
                         f"{label('bootstrap')} >= 1")
    return make_plan(values.get("samples", SETTINGS["samples"].default), max_samples,
                     values.get("batch_size", SETTINGS["batch_size"].default), resolve)
