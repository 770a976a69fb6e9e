"""Expert-FFN execution: Σ over each token's selected experts of fc2_e(act(fc1_e x)), used by every method with
experts (DMoE's ExpertFFN, ActVAR's ActExpertFFN, and so every composition of them).

Two paths, chosen per call (`execute`):

  grouped        the (token, expert) pairs sorted once by expert into contiguous segments (one host sync for
                 the segment sizes); per expert one gather into a preallocated buffer, fc1 with its bias fused
                 (addmm), the activation in place, fc2 into a preallocated buffer, one index_add_ into the
                 preallocated output. Only the selected experts' MACs run (2·C·e per pair). On CUDA the segments
                 are padded to the longest and the two matmuls are single batched calls (baddbmm/bmm), since
                 per-expert kernel launches dominate there. On CPU at large widths (LARGE_WIDTH) a segment runs
                 in chunks of CHUNK_ROWS rows that stay in cache, and with several threads the experts are split
                 into one group per thread, each single-threaded into its own output, summed in a fixed order.
  masked-dense   every expert runs (the dense FFN), unselected experts' activations are zeroed: no MACs saved,
                 but nothing lost either where the grouped path's per-expert overhead costs more than it saves
                 (small C, small experts, most experts active).

The choice comes from a small cost model (CostModel): the grouped path's time over the masked-dense one, linear
in four features of the call (its share of the MACs, gathered elements per MAC, per-expert and per-call overhead
relative to the work). `python -m bench bench-moe` calibrates it per machine (device, torch, threads, dtype) from
its paired measurements and caches it under <cache root>/expert-cost/ (VARBENCH_CACHE, as bench/artifacts.py); without a
calibration the BUILTIN coefficients (this project's 2-core CPU, 1 thread) are used on CPU and the grouped path
elsewhere. The choice is on by default (VARBENCH_EXPERT_PATH=auto), so that a method is never slower than dense
because of this kernel; =grouped or =masked-dense forces a path (or `forced(path)` in-process);
VARBENCH_EXPERT_COST=<file>|builtin picks the cost model. Under a jit trace (fvcore's FLOP count) every call runs
the grouped segment path, whose ops are exactly the routed pairs' MACs.

Recording (`record`): the calling layer keeps, per scale in its stats dict, `paths` ({path: calls}), `pairs_run`
(the (token, expert) pairs whose MACs actually ran: all T·E on masked-dense calls, the padded slots of CUDA's
padded bmm too) beside its routed `pairs`, and `chooser`. Two MAC counts follow (`macs_pairs`): the method's
routed work (the default: macs_analytic*, macs_ratio, the sweeps' FLOP axis and FLOP-matched twins, as the papers
count) and, inside bench.analytic.counting_executed(), the work that ran (the row's macs_executed_all).
bench/measure.py gathers the path counts of a run into the row's `expert_paths` column.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from bench.analytic import executed_counting
from bench.artifacts import cache_root, config_hash
from bench.atomic import atomic_write_text
from bench.errors import BenchError

GROUPED, MASKED = "grouped", "masked-dense"
PATHS = (GROUPED, MASKED)
CHOICES = ("auto",) + PATHS
ENV_PATH = "VARBENCH_EXPERT_PATH"
DEFAULT_PATH = "auto"
ENV_COST = "VARBENCH_EXPERT_COST"
COST_VERSION = 3   # 3: chunked segments and one thread per expert group changed the grouped path's cost

# Fitted by `bench-moe --threads 1` (official-d16 and the embedded default's shapes, expert sizes 32-256, 25/50/75%
# active) on this project's 2-core AMD EPYC (torch 2.14, float32); used on CPU until a machine has its own
# calibration (see CostModel). On those 56 configurations (measured under load 3.5-9.7) it picks the faster path in
# 53, costing 0.05% on average over always picking the faster.
BUILTIN = (0.966, 26.0, 1.91e5, 2.80e6)

# The CPU grouped path at model widths C >= LARGE_WIDTH (d16: C = 1024, 32 MB of FFN weights, the size of L3):
# - each expert's segment runs in chunks of CHUNK_ROWS rows, so that its gathered rows and its output are still in
#   cache for the matmuls and the index_add_ (paired at d16 shapes, 1 thread, 75% of experts active: time saved
#   0.57 -> 0.79-0.87 of the FLOPs saved; 50%: unchanged within noise);
# - with several threads the experts are split across threads (_segments_in_threads), from MIN_THREADED_MACS per
#   call (below, a thread handoff costs what the work does): C = 1024, e = 64, 2 threads: 104 vs 194 ms per call.
# Below it (the embedded default, C = 128: weights of 0.5 MB stay in cache) one op per expert segment with per-op
# parallelism measured fastest (last scale, e = 32, 2 threads, each pair interleaved in one run: 12 vs 34 ms per
# call in 256-row chunks; 20 vs 28 ms split across threads).
LARGE_WIDTH = 512
CHUNK_ROWS = 256
MIN_THREADED_MACS = 1 << 22


# ------------------------------------------------------------------------------------------------ the two paths
def grouped(x2: torch.Tensor, mask: torch.Tensor, w1, b1, w2, act: str = "relu",
            counts: Optional[List[int]] = None, batched: Optional[bool] = None) -> torch.Tensor:
    """Selected experts only. x2 (T,C), mask (T,E) bool; weights in nn.Linear layout: w1 (E,e,C), b1 (E,e),
    w2 (E,C,e) (strided views of fc1/fc2 work). counts: the segment sizes (mask.sum(0)) if already on the host.
    batched: padded bmm over segments (default: on CUDA)."""
    if counts is None:
        counts = mask.sum(0).tolist()                     # the one host sync
    tok = mask.t().nonzero()[:, 1]                        # pairs sorted by expert: contiguous segments
    if batched if batched is not None else x2.is_cuda:
        return _grouped_bmm(x2, mask, tok, counts, w1, b1, w2, act)
    out = torch.zeros_like(x2)
    if not counts or max(counts) == 0:
        return out
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    plain = _plain(x2, w1, b1, w2)
    threads = torch.get_num_threads()
    active = [j for j, c in enumerate(counts) if c]
    if plain or x2.device.type != "cpu" or threads < 2 or len(active) < 2 or x2.shape[1] < LARGE_WIDTH \
            or starts[-1] * x2.shape[1] * w1.shape[1] < MIN_THREADED_MACS:
        return _segments(out, x2, tok, starts, active, w1, b1, w2, act, plain)
    return _segments_in_threads(out, x2, tok, starts, active, w1, b1, w2, act, min(threads, len(active)))


def _segments(out, x2, tok, starts, experts, w1, b1, w2, act, plain=False):
    """Add the given experts' outputs into `out`, each expert's segment in chunks of CHUNK_ROWS rows."""
    C, e = x2.shape[1], w1.shape[1]
    cmax = max(starts[j + 1] - starts[j] for j in experts)
    rows = cmax if plain or C < LARGE_WIDTH else min(cmax, CHUNK_ROWS)
    xb, hb, yb = x2.new_empty(rows, C), x2.new_empty(rows, e), x2.new_empty(rows, C)
    for j in experts:
        for s in range(starts[j], starts[j + 1], rows):
            n = min(rows, starts[j + 1] - s)
            idx = tok[s:s + n]
            if plain:
                h = torch.addmm(b1[j], x2.index_select(0, idx), w1[j].t())
                y = torch.mm(_act(h, act), w2[j].t())
            else:
                xg, h, y = xb[:n], hb[:n], yb[:n]
                torch.index_select(x2, 0, idx, out=xg)
                torch.addmm(b1[j], xg, w1[j].t(), out=h)
                torch.mm(_act(h, act), w2[j].t(), out=y)
            out.index_add_(0, idx, y.to(out.dtype))   # under autocast (--dtype) y may be reduced
    return out


_POOL: Dict[str, Any] = {}    # the worker threads of _segments_in_threads: {"pool": executor, "size": workers}


def _segments_in_threads(out, x2, tok, starts, active, w1, b1, w2, act, parts: int):
    """With several CPU threads: the experts split into `parts` contiguous groups of about equal pairs, each group
    run by one thread with one intra-op thread into its own output, summed in group order (deterministic).

    Why: an expert's matmuls are too small to split across threads well, and each of the chunk's ops is an OpenMP
    parallel region whose barrier waits for a descheduled thread on a busy machine (paired A/B in one run, 2
    threads, load 2-3.7, d16 shapes: per-op parallelism took up to 23x dense's time, this way 0.32-0.92x; README,
    bench-moe). torch's thread count is
    process-wide, so it is 1 for the duration of the call and restored after; grad mode, autocast and inference
    mode are thread-local, so each worker takes the caller's (under no_grad a module's weights require grad)."""
    from concurrent.futures import ThreadPoolExecutor
    pairs = starts[-1]
    groups, cur, done = [], [], 0
    for j in active:
        cur.append(j)
        done += starts[j + 1] - starts[j]
        if done >= pairs * (len(groups) + 1) / parts and len(groups) < parts - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    groups = [g for g in groups if g]
    if _POOL.get("size", 0) < len(groups) - 1:   # more threads now: replace the pool (its idle threads end)
        if "pool" in _POOL:
            _POOL["pool"].shutdown(wait=False)
        _POOL.update(pool=ThreadPoolExecutor(len(groups) - 1, thread_name_prefix="var-bench-experts"),
                     size=len(groups) - 1)
    dev = x2.device.type
    amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def work(experts):
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast(dev, dtype=amp[1], enabled=amp[0]):
            return _segments(torch.zeros_like(out), x2, tok, starts, experts, w1, b1, w2, act)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_POOL["pool"].submit(work, g) for g in groups[1:]]
        _segments(out, x2, tok, starts, groups[0], w1, b1, w2, act)
        for f in futures:
            out.add_(f.result())
    finally:
        torch.set_num_threads(threads)
    return out


def _plain(*tensors) -> bool:
    """Allocating ops instead of out=/in-place ones: under fvcore's jit trace, and where autograd records."""
    return torch.jit.is_tracing() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _act(h: torch.Tensor, act: str) -> torch.Tensor:
    return torch.relu_(h) if act == "relu" else F.gelu(h, approximate="tanh")


def _grouped_bmm(x2, mask, tok, counts, w1, b1, w2, act):
    """Segments padded to the longest, the two matmuls as one baddbmm + one bmm; padded slots read and write a
    spare zero row T (dropped at the end), so they add nothing."""
    T, C = x2.shape
    E = mask.shape[1]
    cmax = max(counts) if counts else 0
    if cmax == 0:
        return torch.zeros_like(x2)
    cnt = torch.tensor(counts, device=x2.device)
    ex = torch.repeat_interleave(torch.arange(E, device=x2.device), cnt)
    pos = torch.arange(tok.shape[0], device=x2.device) - (cnt.cumsum(0) - cnt)[ex]
    idx = torch.full((E, cmax), T, dtype=torch.long, device=x2.device)
    idx[ex, pos] = tok
    xp = torch.cat((x2, x2.new_zeros(1, C)))
    xg = xp.index_select(0, idx.view(-1)).view(E, cmax, C)
    h = _act(torch.baddbmm(b1.unsqueeze(1), xg, w1.transpose(1, 2)), act)
    y = torch.bmm(h, w2.transpose(1, 2))
    out = torch.zeros_like(xp)
    out.index_add_(0, idx.view(-1), y.view(-1, C).to(out.dtype))   # autocast: bmm's y is reduced
    return out[:T]


_DENSE_W2: Dict[int, tuple] = {}       # id(w2) -> (weakref to w2, its version, dense copy); dropped with w2


def _dense_w2(w2: torch.Tensor) -> torch.Tensor:
    """fc2's (C, H) weight from the (E, C, e) expert layout: a view for ActVAR's (views of fc2), a copy made once
    per weight tensor for DMoE's contiguous split."""
    E, C, e = w2.shape
    full = w2.permute(1, 0, 2)
    if full.is_contiguous():
        return full.reshape(C, E * e)
    hit = _DENSE_W2.get(id(w2))
    if hit is None or hit[0]() is not w2 or hit[1] != w2._version:
        hit = (weakref.ref(w2), w2._version, full.reshape(C, E * e))
        _DENSE_W2[id(w2)] = hit
        weakref.finalize(w2, _DENSE_W2.pop, id(w2), None)
    return hit[2]


def masked_dense(x2: torch.Tensor, mask: torch.Tensor, w1, b1, w2, act: str = "relu") -> torch.Tensor:
    """Every expert runs; unselected experts' activations are zeroed (same contract as `grouped`)."""
    E, e, C = w1.shape
    h = _act(torch.addmm(b1.reshape(E * e), x2, w1.reshape(E * e, C).t()), act)
    h = h.view(-1, E, e) * mask.unsqueeze(-1) if _plain(x2, w1, b1, w2) else h.view(-1, E, e).mul_(mask.unsqueeze(-1))
    return torch.mm(h.view(-1, E * e), _dense_w2(w2).t())


# ------------------------------------------------------------------------------------------------ cost model
def machine_key(device: torch.device, dtype: torch.dtype) -> dict:
    """What a calibration is valid for."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                              platform.machine())
    return dict(version=COST_VERSION, device_type=device.type, device_name=name, torch=torch.__version__,
                threads=torch.get_num_threads() if device.type == "cpu" else 0, dtype=str(dtype).replace("torch.", ""))


@dataclass
class CostModel:
    """Predicted time of the grouped path over the masked-dense one for one call, r = Σ coef_i·feature_i, from
    features of the work (H = E·e; W = T·C·H, the masked-dense MACs): f = P/(T·E) the grouped path's share of
    those MACs, f/e its gathered/added elements per masked-dense MAC, experts called / W and 1 / W its per-expert
    and per-call overheads relative to the work. Grouped runs iff r <= 1. A ratio (not seconds) because the
    benchmark measures it paired, so machine load cancels."""
    coef: Tuple[float, float, float, float]
    source: str = "builtin"

    @staticmethod
    def features(T: int, C: int, E: int, e: int, P: int, called: int) -> Tuple[float, float, float, float]:
        W = max(1, T * C * E * e)
        f = P / max(1, T * E)
        return (f, f / e, called / W, 1.0 / W)

    def ratio(self, T: int, C: int, E: int, e: int, P: int, called: int) -> float:
        return sum(a * x for a, x in zip(self.coef, self.features(T, C, E, e, P, called)))

    def choose(self, T: int, C: int, E: int, e: int, P: int, called: int) -> str:
        return GROUPED if self.ratio(T, C, E, e, P, called) <= 1.0 else MASKED


def fit(points: Sequence[dict], source: str) -> CostModel:
    """Non-negative least squares on relative error. points: dicts with T, C, E, e, P, called and ratio (the
    median of paired grouped/masked-dense time ratios)."""
    import numpy as np
    from scipy.optimize import nnls
    if not points:
        raise BenchError("no measurements to calibrate the expert cost model from")
    A = np.array([CostModel.features(p["T"], p["C"], p["E"], p["e"], p["P"], p["called"]) for p in points])
    y = np.array([p["ratio"] for p in points], dtype=np.float64)
    scale = A.max(0)
    scale[scale == 0] = 1.0
    sol, _ = nnls(A / y[:, None] / scale, np.ones_like(y))
    return CostModel(coef=tuple(float(v) for v in sol / scale), source=source)


def cost_dir() -> str:
    return os.path.join(cache_root(), "expert-cost")


def cost_path(key: dict) -> str:
    return os.path.join(cost_dir(), f"cost-{key['device_type']}-{config_hash(key)}.json")


def save_calibration(key: dict, points: List[dict], path: Optional[str] = None) -> Tuple[str, CostModel]:
    """Merge `points` into this machine's calibration (a new point replaces an old one of the same configuration),
    refit, write atomically. Returns (file, model)."""
    path = path or cost_path(key)
    old = read_calibration(path).get("points", []) if os.path.isfile(path) else []
    ident = lambda p: (p["T"], p["C"], p["E"], p["e"], p["P"])
    merged = {ident(p): p for p in old}
    merged.update({ident(p): p for p in points})
    pts = list(merged.values())
    model = fit(pts, source=path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(dict(key=key, coef=model.coef, points=pts,
                                            fitted=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1))
    _MODELS.clear()
    return path, model


def read_calibration(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        if len(d["coef"]) != 4:
            raise ValueError("coef")
        return d
    except (OSError, ValueError, KeyError, TypeError) as ex:
        raise BenchError(f"expert cost model {path} is unreadable ({type(ex).__name__}); delete it or re-run "
                         f"`python -m bench bench-moe`") from None


_MODELS: Dict[str, Optional[CostModel]] = {}


def cost_model(device: torch.device, dtype: torch.dtype) -> Optional[CostModel]:
    """This machine's calibrated model, else BUILTIN on CPU, else None (grouped). VARBENCH_EXPERT_COST overrides:
    a file, or 'builtin'."""
    env = os.environ.get(ENV_COST, "")
    key = machine_key(device, dtype)
    memo = json.dumps(key, sort_keys=True) + "|" + env + "|" + cost_dir()   # the cache root can change (tests)
    if memo in _MODELS:
        return _MODELS[memo]
    if env == "builtin":
        model: Optional[CostModel] = CostModel(coef=BUILTIN, source="builtin")
    else:
        path = env or cost_path(key)
        if env and not os.path.isfile(env):
            raise BenchError(f"{ENV_COST}={env!r}: no such file; valid: a cost-model file written by bench-moe, "
                             f"or 'builtin'")
        if os.path.isfile(path):
            d = read_calibration(path)
            model = CostModel(coef=tuple(d["coef"]), source=path)
        else:
            model = CostModel(coef=BUILTIN, source="builtin") if device.type == "cpu" else None
    _MODELS[memo] = model
    return model


_FORCED: List[str] = []


@contextlib.contextmanager
def forced(path: str):
    """Run every expert call inside on `path` (auto, grouped, masked-dense)."""
    check_path(path, "forced path")
    _FORCED.append(path)
    try:
        yield
    finally:
        _FORCED.pop()


def check_path(path: str, what: str) -> str:
    if path not in CHOICES:
        raise BenchError(f"{what} must be one of {', '.join(CHOICES)}, got {path!r}")
    return path


def requested_path() -> str:
    if _FORCED:
        return _FORCED[-1]
    return check_path(os.environ.get(ENV_PATH, "") or DEFAULT_PATH, ENV_PATH)


# ------------------------------------------------------------------------------------------------ one call
class Ran(NamedTuple):
    path: str          # grouped | masked-dense
    pairs: int         # (token, expert) pairs whose MACs ran
    chooser: str       # 'auto (<cost model source>)' or 'forced'


def execute(x2: torch.Tensor, mask: torch.Tensor, w1, b1, w2, act: str = "relu") -> Tuple[torch.Tensor, Ran]:
    """Σ over selected experts of expert_e(x) per token (no fc2 bias), on the path chosen for this call.

    x2 (T,C), mask (T,E) bool, w1 (E,e,C), b1 (E,e), w2 (E,C,e). Returns (output (T,C), what ran)."""
    T, C, E, e = (int(v) for v in (*x2.shape, *w1.shape[:2]))   # plain ints, also under jit tracing
    want = requested_path()
    counts = mask.sum(0).tolist()                         # the one host sync (shared by the choice and grouped)
    P = sum(counts)
    if torch.jit.is_tracing():     # fvcore's count: the traced ops are then exactly the routed pairs' MACs
        return grouped(x2, mask, w1, b1, w2, act, counts=counts, batched=False), Ran(GROUPED, P, "traced")
    if want == "auto":
        model = cost_model(x2.device, x2.dtype)
        path = GROUPED if model is None else model.choose(T, C, E, e, P, sum(1 for c in counts if c))
        chooser = f"auto ({'none: grouped' if model is None else os.path.basename(model.source)})"
    else:
        path, chooser = want, "forced"
    if path == GROUPED:   # the padded bmm (CUDA) runs every padded slot's MACs too
        ran = E * max(counts, default=0) if x2.is_cuda else P
        return grouped(x2, mask, w1, b1, w2, act, counts=counts), Ran(GROUPED, ran, chooser)
    return masked_dense(x2, mask, w1, b1, w2, act), Ran(MASKED, T * E, chooser)


def macs_pairs(stats: dict) -> int:
    """The (token, expert) pairs a layer's MAC count uses: the routed ones, or inside
    bench.analytic.counting_executed() the ones whose MACs ran."""
    return stats.get("pairs_run", stats["pairs"]) if executed_counting() else stats["pairs"]


def execution_key(device: torch.device, dtype: torch.dtype) -> dict:
    """What the paths a generation takes depend on, for the keys of its checkpoints and generation workers
    (bench/measure.generation_key): the requested path and, for auto, the cost model's coefficients."""
    want = requested_path()
    if want != "auto":
        return dict(path=want)
    model = cost_model(device, dtype)
    return dict(path=want, coef=None if model is None else [float(c) for c in model.coef])


def record(stats: dict, ran: Ran) -> None:
    """Add one call to a layer's per-scale statistics (see the module docstring)."""
    paths = stats.setdefault("paths", {})
    paths[ran.path] = paths.get(ran.path, 0) + 1
    stats["pairs_run"] = stats.get("pairs_run", 0) + ran.pairs
    stats["chooser"] = ran.chooser
