"""Does expert execution turn FLOPs saved into time saved? (`python -m bench bench-moe`; a benchmark, not a test)

    from bench.benchmarks.moe import MoeBenchConfig, parse_shapes, run_moe
    report = run_moe(MoeBenchConfig(shapes=parse_shapes("32:128:3/4"), expert_sizes=[32], fractions=[0.5]))

Side by side in one run on the current device: the dense FFN fc2(relu(fc1 x)) and both expert-execution paths of
methods/_experts.py (grouped: selected experts only; masked-dense: every expert, unselected ones zeroed), at fixed
active fractions (every token keeps round(f·E) random experts) and expert sizes, at the token counts of the
last scales (CFG: 2 rows per image, times the batch). Timing: warm-up runs, then the repeats interleaved
dense/grouped/masked-dense in a rotated order (ROTATION), each sample long enough to time (inner loop of
>= min_sample_ms); time saved = 1 - median of the paired path/dense ratios, robust to drift of a shared machine;
CUDA events on GPU. The router is timed separately (its cost is reported, not part of the ratio).

The measurements calibrate the per-machine cost model that picks a path per call (methods/_experts.CostModel;
merged into the cached calibration of this device/torch/threads/dtype unless calibrate=False). Each row then
reports the path the calibrated model picks, its time saved, the FLOPs that path saves (0 for masked-dense: it
runs every expert) and ratio = time saved ÷ FLOPs the routing saves (1.0: the saving fully realised, 0: no time
saved, negative: slower than dense).
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.defaults import DTYPE_ALIASES, MAX_SEED, MAX_THREADS
from bench.errors import BenchError
from bench.log import get_logger

# torch and the modules that import it load inside the functions: the bench-moe command reads SHAPES, ROTATION and
# DTYPES while parsing, which must import no torch (tests/test_cli_instant.py).

log = get_logger(__name__)

# Repeat r runs the three paths in the order rotated by r (dense-grouped-masked, grouped-masked-dense,
# masked-dense-grouped), so in every 3 repeats each path runs once right after the previous repeat's small router
# call and twice right after one of the other two large calls: what ran just before (large activations freed, caches
# refilled) costs the next call time, and now costs every path alike. In the fixed order before, grouped always ran
# right after dense and dense after the router; the same grouped call timed right after dense took 0.8-2.1% of
# dense's time more than right after another grouped call (d16 shapes, e = 128, 1 thread, 21 repeats each, load
# 1.1-1.4, 2026-11-30).
ROTATION = 3

Shape = Tuple[str, int, int, Tuple[int, ...]]      # (name, C, FFN width, patch sides of the timed scales)
SHAPES = {
    "official-d16": (1024, 4096, (13, 16)),   # VAR-d16's last two scales
    "default": (128, 512, (6, 8)),             # the embedded default (shapes-d4)'s last two scales
}
DTYPES = tuple(DTYPE_ALIASES)   # float32, bfloat16, float16
TARGET = "mean ratio >= 0.9 for expert size >= 128, no configuration below 0.7"


def parse_shapes(text: str) -> List[Shape]:
    """'official-d16,default,1024:4096:13/16' -> shapes: names of SHAPES or C:FFN:pn/pn."""
    out = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        if name in SHAPES:
            out.append((name,) + SHAPES[name])
            continue
        try:
            c, h, pns = name.split(":")
            shape = (name, int(c), int(h), tuple(int(p) for p in pns.split("/")))
        except ValueError:
            raise BenchError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}, or C:FFN:pn/pn") from None
        if min(shape[1], shape[2], *shape[3]) < 1:
            raise BenchError(f"shape {name!r}: C, FFN and every pn must be >= 1; valid: {', '.join(SHAPES)}, or "
                             f"C:FFN:pn/pn")
        out.append(shape)
    if not out:
        raise BenchError("--shapes is empty")
    return out


@dataclass
class MoeBenchConfig:
    shapes: Sequence[Shape] = field(default_factory=lambda: parse_shapes("official-d16,default"))
    expert_sizes: Sequence[int] = (32, 64, 128, 256)   # those dividing a shape's FFN width run
    fractions: Sequence[float] = (0.25, 0.5, 0.75)     # active expert fractions, in (0, 1]
    batch: int = 4                                     # images per batch (tokens = 2·pn²·batch)
    warmup: int = 2
    repeats: int = 9                                   # timed repeats per configuration (a multiple of ROTATION)
    min_sample_ms: float = 20.0                        # repeat a call within one sample until this long
    device: str = "cpu"
    threads: int = 0                                   # torch threads (0: torch's default)
    seed: int = 0
    dtype: str = "float32"                             # weights and activations: one of DTYPES
    calibrate: bool = True                             # merge the timings into this machine's cost model


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(c: MoeBenchConfig, label: Callable[[str], str] = _flag) -> None:
    """One line (BenchError) for a setting that cannot run, naming it by label(field name); nothing runs before."""
    for name, values, low, high in (("expert_sizes", c.expert_sizes, 0, None), ("fractions", c.fractions, 0.0, 1.0)):
        if not values or any(not v > low or (high is not None and not v <= high) for v in values):   # NaN fails
            rng = f"in ({low}, {high}]" if high is not None else f"> {low}"
            raise BenchError(f"{label(name)} values must be {rng}, got {','.join(map(str, values))!r}")
    for name, low, high in (("batch", 1, None), ("warmup", 0, None), ("repeats", 1, None),
                            ("threads", 0, MAX_THREADS), ("min_sample_ms", 0, None), ("seed", 0, MAX_SEED)):
        v = getattr(c, name)
        if not v >= low or (high is not None and v > high) or v == math.inf:     # NaN fails v >= low
            raise BenchError(f"{label(name)} must be {'>= ' + str(low) if high is None else f'in {low}..{high}'}, "
                             f"got {v}")
    if c.dtype not in DTYPES:
        raise BenchError(f"{label('dtype')} {c.dtype!r}: valid: {', '.join(DTYPES)}")
    for name, C, H, pns in c.shapes:
        if not any(H % s == 0 for s in c.expert_sizes):
            raise BenchError(f"{label('expert_sizes')} {','.join(map(str, c.expert_sizes))}: none divides shape "
                             f"{name}'s FFN width {H}; valid: divisors of {H} "
                             f"({', '.join(str(d) for d in range(1, H + 1) if H % d == 0)})")


# ---------------------------------------------------------------------------------------------- memory
def tensor_bytes(C: int, H: int, pns, batch: int, sizes, element: int) -> int:
    """About the most memory one shape's tensors hold at once (an estimate, on the low side of what runs): the
    weights four times (W1, W2, the expert layout's copy of W2 and the dense copy masked-dense makes of it) plus the
    float32 randn and scaled temporaries of one weight; at the largest token count T = 2·pn²·batch the input,
    the FFN activations of two paths and three outputs, and the random expert choice (rand, argsort, mask) for
    the most experts H/e."""
    T = 2 * max(pns) ** 2 * batch
    E = max((H // e for e in sizes if H % e == 0), default=1)
    return element * (4 * H * C + 2 * T * H + 3 * T * C) + 8 * H * C + 13 * T * E


def memory_limit(device):
    """(bytes this process may allocate on `device`, what that is), or (None, why not known)."""
    if device.type == "cuda":
        import torch
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available memory (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (AttributeError, ValueError, OSError):
        return None, "unknown"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024


def check_memory(shapes, sizes, batch: int, element: int, device) -> None:
    """Refuse, before anything is allocated, a shape whose tensors cannot fit in the device's memory."""
    limit, what = memory_limit(device)
    if limit is None:
        return
    for name, C, H, pns in shapes:
        need = tensor_bytes(C, H, pns, batch, sizes, element)
        if need > limit:
            raise BenchError(f"shape {name} does not fit in memory: its tensors need about {human_bytes(need)} (C={C}, "
                             f"FFN={H}, {2 * max(pns) ** 2 * batch} tokens at --batch {batch}, {element} bytes an "
                             f"element), more than the {human_bytes(limit)} {what}; valid: shapes and --batch whose "
                             f"weights (4·C·FFN) and activations fit, e.g. {', '.join(SHAPES)}")


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Wall time of a callable: CUDA events on GPU (after a synchronize), perf_counter on CPU."""

    def __init__(self, device):
        import torch
        self.cuda = device.type == "cuda"
        self.torch = torch

    def __call__(self, fn, inner: int = 1) -> float:
        """Seconds per call, over `inner` back-to-back calls."""
        if self.cuda:
            s, e = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            self.torch.cuda.synchronize()
            s.record()
            for _ in range(inner):
                fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1000.0 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def quantiles(xs):
    """(median, p10, p90)."""
    import numpy as np
    return float(np.median(xs)), float(np.percentile(xs, 10)), float(np.percentile(xs, 90))


@dataclass
class MoeBenchReport:
    env: Dict[str, Any]            # device, torch, threads, dtype and the timing settings
    results: List[Dict[str, Any]]  # one row per (shape, scale, expert size, active experts)
    cost_model: Any                # methods/_experts.CostModel: the one that picked each row's path
    calibration: str               # where the cost model came from
    summary: List[Dict[str, Any]]  # per shape and expert size: mean and min ratio, configurations per path

    def to_dict(self) -> dict:
        """What --json writes: the environment (with the cost model) and the rows."""
        return dict(env=dict(self.env, cost_model=dict(source=self.cost_model.source, coef=self.cost_model.coef)),
                    results=self.results)


def _time_shape(cfg: MoeBenchConfig, shape: Shape, device, dtype, timer, g, on_row) -> Tuple[list, list]:
    """The rows of one shape and the cost-model points they give."""
    import torch
    import torch.nn.functional as F
    from methods import _experts   # lazy: pulls torch (see the note at the top)
    from methods._moe import Router   # lazy: pulls torch (see the note at the top)
    name, C, H, pns = shape
    rows, points = [], []
    W1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(device, dtype)
    B1 = (torch.randn(H, generator=g) * 0.1).to(device, dtype)
    W2 = (torch.randn(C, H, generator=g) / H ** 0.5).to(device, dtype)
    B2 = torch.zeros(C).to(device, dtype)
    for pn in pns:
        T = 2 * pn * pn * cfg.batch
        x = torch.randn(T, C, generator=g).to(device, dtype)

        def dense():
            return F.linear(F.relu(F.linear(x, W1, B1)), W2, B2)
        for e in [s for s in cfg.expert_sizes if H % s == 0]:
            E = H // e
            w1, b1 = W1.view(E, e, C), B1.view(E, e)      # as methods/_moe.split_ffn
            w2 = W2.view(C, E, e).permute(1, 0, 2).contiguous()
            router = Router(C, E).to(device, dtype)
            done = set()
            for f in cfg.fractions:
                k = max(1, round(f * E))
                if k >= E or k in done:
                    continue
                done.add(k)
                pick = torch.rand(T, E, generator=g).argsort(1)[:, :k]
                mask = torch.zeros(T, E, dtype=torch.bool).scatter_(1, pick, True).to(device)

                def grouped():
                    return _experts.grouped(x, mask, w1, b1, w2, "relu") + B2

                def masked():
                    return _experts.masked_dense(x, mask, w1, b1, w2, "relu") + B2
                for _ in range(cfg.warmup):
                    dense(), grouped(), masked(), router(x)
                one = min(timer(dense), timer(grouped), timer(masked))
                inner = max(1, min(1000, int(cfg.min_sample_ms / 1e3 / max(one, 1e-6))))
                td, tg, tm, tr = [], [], [], []
                paths = [(dense, td), (grouped, tg), (masked, tm)]
                for r in range(cfg.repeats):   # interleaved: drift affects all alike
                    for fn, ts in paths[r % ROTATION:] + paths[:r % ROTATION]:   # see ROTATION
                        ts.append(timer(fn, inner))
                    tr.append(timer(lambda: router(x), inner))
                (d50, d10, d90), (g50, g10, g90), (m50, _, _) = quantiles(td), quantiles(tg), quantiles(tm)
                flops_saved = 1 - k / E
                row = dict(shape=name, C=C, ffn=H, pn=pn, tokens=T, expert_size=e, experts=E, active=k,
                           active_fraction=k / E, dense_median_s=d50, dense_p10_s=d10, dense_p90_s=d90,
                           grouped_median_s=g50, grouped_p10_s=g10, grouped_p90_s=g90, masked_median_s=m50,
                           router_median_s=quantiles(tr)[0], inner_calls=inner, flops_saved=flops_saved,
                           time_saved_grouped=1 - quantiles([t / d for t, d in zip(tg, td)])[0],
                           time_saved_masked=1 - quantiles([t / d for t, d in zip(tm, td)])[0])
                row["ratio_grouped"] = row["time_saved_grouped"] / flops_saved
                row["grouped_over_masked"] = quantiles([t / m for t, m in zip(tg, tm)])[0]   # paired
                rows.append(row)
                points.append(dict(T=T, C=C, E=E, e=e, P=T * k, called=E, ratio=row["grouped_over_masked"]))
                on_row(row)
    return rows, points


def summarize(shapes, results) -> List[Dict[str, Any]]:
    """Per shape and expert size: mean and min ratio over its configurations, and how many ran each path."""
    from methods import _experts   # lazy: pulls torch (see the note at the top)
    out = []
    for name, *_ in shapes:
        for e in sorted({r["expert_size"] for r in results if r["shape"] == name}):
            rs = [r for r in results if r["shape"] == name and r["expert_size"] == e]
            ratios = [r["ratio"] for r in rs]
            out.append(dict(shape=name, expert_size=e, configurations=len(rs), mean_ratio=sum(ratios) / len(ratios),
                            min_ratio=min(ratios), paths={p: sum(r["path"] == p for r in rs) for p in _experts.PATHS}))
    return out


def run_moe(cfg: Optional[MoeBenchConfig] = None, on_start: Optional[Callable[[dict], None]] = None,
            on_row: Optional[Callable[[dict], None]] = None) -> MoeBenchReport:
    """Every configuration of the module docstring, timed on cfg.device; calls on_start(env) before the first and
    on_row(row) after each (default: logged). Refuses (BenchError, nothing allocated) a setting that cannot run or a
    shape that cannot fit in memory."""
    import torch
    from bench.env import check_device   # lazy: pulls torch (see the note at the top)
    from methods import _experts   # lazy: pulls torch (see the note at the top)
    cfg = cfg or MoeBenchConfig()
    check_config(cfg)
    device = torch.device(check_device(cfg.device))
    dtype = getattr(torch, cfg.dtype)
    check_memory(cfg.shapes, cfg.expert_sizes, cfg.batch, torch.empty((), dtype=dtype).element_size(), device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), dtype=cfg.dtype, batch=cfg.batch, warmup=cfg.warmup,
               repeats=cfg.repeats, min_sample_ms=cfg.min_sample_ms, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    (on_start or (lambda env: log.info(f"bench-moe on {env['device']} ({env['device_name']})")))(env)
    on_row = on_row or (lambda row: log.info(f"{row['shape']} T={row['tokens']} e={row['expert_size']} "
                                             f"{row['active']}/{row['experts']}: {row['time_saved_grouped']:.1%}"))
    timer = Timer(device)
    g = torch.Generator().manual_seed(cfg.seed)
    results, points = [], []
    with torch.no_grad():
        for shape in cfg.shapes:
            rows, pts = _time_shape(cfg, shape, device, dtype, timer, g, on_row)
            results += rows
            points += pts
    if cfg.calibrate:
        path, model = _experts.save_calibration(_experts.machine_key(device, dtype), points)
        where = f"calibrated on this run's {len(points)} configurations (merged with earlier ones), saved to {path}"
    else:
        model = _experts.cost_model(device, dtype)
        if model is None:
            model = _experts.fit(points, "this run")
        where = "not updated (--no-calibrate)"
    for row, p in zip(results, points):
        path = model.choose(p["T"], p["C"], p["E"], p["e"], p["P"], p["called"])
        row["path"] = path
        row["time_saved"] = row["time_saved_grouped"] if path == _experts.GROUPED else row["time_saved_masked"]
        row["flops_run_saved"] = row["flops_saved"] if path == _experts.GROUPED else 0.0
        row["ratio"] = row["time_saved"] / row["flops_saved"]
    return MoeBenchReport(env=env, results=results, cost_model=model, calibration=where,
                          summary=summarize(cfg.shapes, results))
