"""`python -m bench bench-moe`: does expert execution turn FLOPs saved into time saved? (a benchmark, not a test)

Side by side in one run on the current device: the dense FFN fc2(relu(fc1 x)) and both expert-execution paths of
methods/_experts.py (grouped: selected experts only; masked-dense: every expert, unselected ones zeroed), at fixed
active fractions (every token keeps round(f·E) random experts) and expert sizes, at the token counts of the
last scales (CFG: 2 rows per image, times --batch). Timing: warm-up runs, then the repeats interleaved
dense/grouped/masked-dense in a rotated order (ROTATION), each sample long enough to time (inner loop of
>= --min-sample-ms); time saved = 1 - median of the paired path/dense ratios, robust to drift of a shared machine;
CUDA events on GPU. The router
is timed separately (its cost is reported, not part of the ratio).

The measurements calibrate the per-machine cost model that picks a path per call (methods/_experts.CostModel;
merged into the cached calibration of this device/torch/threads/dtype unless --no-calibrate). Each row then
reports the path the calibrated model picks, its time saved, the FLOPs that path saves (0 for masked-dense: it
runs every expert) and ratio = time saved ÷ FLOPs the routing saves (1.0: the saving fully realised, 0: no time
saved, negative: slower than dense).
"""
from __future__ import annotations

import time

from bench.defaults import DTYPE_ALIASES
from bench.errors import BenchError

ORDER = 72

# Repeat r runs the three paths in the order rotated by r (dense-grouped-masked, grouped-masked-dense,
# masked-dense-grouped), so in every 3 repeats each path runs once right after the previous repeat's small router
# call and twice right after one of the other two large calls: what ran just before (large activations freed, caches
# refilled) costs the next call time, and now costs every path alike. In the fixed order before, grouped always ran
# right after dense and dense after the router; the same grouped call timed right after dense took 0.8-2.1% of
# dense's time more than right after another grouped call (d16 shapes, e = 128, 1 thread, 21 repeats each, load
# 1.1-1.4, 2026-11-30).
ROTATION = 3

# name -> (C, FFN width, patch sides of the timed scales)
SHAPES = {
    "official-d16": (1024, 4096, (13, 16)),   # VAR-d16's last two scales
    "default": (128, 512, (6, 8)),             # the embedded default (shapes-d4)'s last two scales
}


DTYPES = tuple(DTYPE_ALIASES)   # float32, bfloat16, float16


def register(sub):
    p = sub.add_parser("bench-moe", help="benchmark: expert FFN vs dense FFN, time saved per FLOP saved")
    p.add_argument("--shapes", default="official-d16,default",
                   help=f"comma-separated: {', '.join(SHAPES)}, or C:FFN:pn/pn (e.g. 1024:4096:13/16)")
    p.add_argument("--expert-sizes", default="32,64,128,256", help="expert widths (those dividing the FFN width run)")
    p.add_argument("--fractions", default="0.25,0.5,0.75", help="active expert fractions")
    p.add_argument("--batch", type=int, default=4, help="images per batch (tokens = 2·pn²·batch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9,
                   help=f"timed repeats per configuration (a multiple of {ROTATION} balances the rotated order)")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="repeat a call within one sample until this long")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not update this machine's cached expert cost model (methods/_experts.py)")
    p.add_argument("--json", default=None, help="also write the results (with the environment) to this file")
    p.set_defaults(func=run)


def parse_shapes(text):
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


def parse_list(text, typ, flag, low, high=None):
    try:
        vals = [typ(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} must be comma-separated {typ.__name__}s, got {text!r}") from None
    if not vals or any(not v > low or (high is not None and not v <= high) for v in vals):   # NaN fails both
        rng = f"in ({low}, {high}]" if high is not None else f"> {low}"
        raise BenchError(f"{flag} values must be {rng}, got {text!r}")
    return vals


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
        import os
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
    import numpy as np
    return float(np.median(xs)), float(np.percentile(xs, 10)), float(np.percentile(xs, 90))


def run(a):
    import json
    import platform

    import torch
    import torch.nn.functional as F
    from bench.commands._common import check_device, check_writable_file
    from methods import _experts
    from methods._moe import Router
    shapes = parse_shapes(a.shapes)
    sizes = parse_list(a.expert_sizes, int, "--expert-sizes", 0)
    fracs = parse_list(a.fractions, float, "--fractions", 0.0, 1.0)
    from bench.measure import MAX_SEED, MAX_THREADS
    for flag, v, lo, hi in (("--batch", a.batch, 1, None), ("--warmup", a.warmup, 0, None),
                            ("--repeats", a.repeats, 1, None), ("--threads", a.threads, 0, MAX_THREADS),
                            ("--min-sample-ms", a.min_sample_ms, 0, None), ("--seed", a.seed, 0, MAX_SEED)):
        if not v >= lo or (hi is not None and v > hi) or v == float("inf"):     # NaN fails v >= lo
            raise BenchError(f"{flag} must be {'>= ' + str(lo) if hi is None else f'in {lo}..{hi}'}, got {v}")
    for name, C, H, pns in shapes:
        if not any(H % s == 0 for s in sizes):
            raise BenchError(f"--expert-sizes {a.expert_sizes}: none divides shape {name}'s FFN width {H}; valid: "
                             f"divisors of {H} ({', '.join(str(d) for d in range(1, H + 1) if H % d == 0)})")
    if a.json:
        check_writable_file(a.json, (".json",), "--json")
    device = torch.device(check_device(a.device))
    dtype = getattr(torch, a.dtype)
    check_memory(shapes, sizes, a.batch, torch.empty((), dtype=dtype).element_size(), device)
    if a.threads:
        torch.set_num_threads(a.threads)
    timer = Timer(device)
    g = torch.Generator().manual_seed(a.seed)
    results, points = [], []
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), dtype=a.dtype, batch=a.batch, warmup=a.warmup, repeats=a.repeats,
               min_sample_ms=a.min_sample_ms, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"bench-moe on {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads, "
          f"{a.dtype}, batch {a.batch}, warm-up {a.warmup}, {a.repeats} repeats (median [p10, p90])")
    hdr = f"{'shape':>13} {'tokens':>6} {'e':>4} {'E':>4} {'active':>7} {'dense ms':>18} {'grouped ms':>18} " \
          f"{'masked ms':>9} {'router ms':>9} {'grouped saved':>13} {'FLOPs saved':>11} {'ratio':>6}"
    print(hdr)
    with torch.no_grad():
        for name, C, H, pns in shapes:
            W1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(device, dtype)
            B1 = (torch.randn(H, generator=g) * 0.1).to(device, dtype)
            W2 = (torch.randn(C, H, generator=g) / H ** 0.5).to(device, dtype)
            B2 = torch.zeros(C).to(device, dtype)
            for pn in pns:
                T = 2 * pn * pn * a.batch
                x = torch.randn(T, C, generator=g).to(device, dtype)

                def dense():
                    return F.linear(F.relu(F.linear(x, W1, B1)), W2, B2)
                for e in [s for s in sizes if H % s == 0]:
                    E = H // e
                    w1, b1 = W1.view(E, e, C), B1.view(E, e)      # as methods/_moe.split_ffn
                    w2 = W2.view(C, E, e).permute(1, 0, 2).contiguous()
                    router = Router(C, E).to(device, dtype)
                    done = set()
                    for f in fracs:
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
                        for _ in range(a.warmup):
                            dense(), grouped(), masked(), router(x)
                        one = min(timer(dense), timer(grouped), timer(masked))
                        inner = max(1, min(1000, int(a.min_sample_ms / 1e3 / max(one, 1e-6))))
                        td, tg, tm, tr = [], [], [], []
                        paths = [(dense, td), (grouped, tg), (masked, tm)]
                        for r in range(a.repeats):   # interleaved: drift affects all alike
                            for fn, ts in paths[r % ROTATION:] + paths[:r % ROTATION]:   # see ROTATION
                                ts.append(timer(fn, inner))
                            tr.append(timer(lambda: router(x), inner))
                        (d50, d10, d90), (g50, g10, g90), (m50, _, _) = quantiles(td), quantiles(tg), quantiles(tm)
                        saved = lambda ts: 1 - quantiles([t / d for t, d in zip(ts, td)])[0]   # noqa: E731
                        flops_saved = 1 - k / E
                        row = dict(shape=name, C=C, ffn=H, pn=pn, tokens=T, expert_size=e, experts=E, active=k,
                                   active_fraction=k / E, dense_median_s=d50, dense_p10_s=d10, dense_p90_s=d90,
                                   grouped_median_s=g50, grouped_p10_s=g10, grouped_p90_s=g90, masked_median_s=m50,
                                   router_median_s=quantiles(tr)[0], inner_calls=inner, flops_saved=flops_saved,
                                   time_saved_grouped=saved(tg), time_saved_masked=saved(tm))
                        row["ratio_grouped"] = row["time_saved_grouped"] / flops_saved
                        results.append(row)
                        row["grouped_over_masked"] = quantiles([t / m for t, m in zip(tg, tm)])[0]   # paired
                        points.append(dict(T=T, C=C, E=E, e=e, P=T * k, called=E, ratio=row["grouped_over_masked"]))
                        print(f"{name:>13} {T:>6} {e:>4} {E:>4} {k:>3}/{E:<3} "
                              f"{d50 * 1e3:>7.2f} [{d10 * 1e3:.1f},{d90 * 1e3:.1f}] "
                              f"{g50 * 1e3:>7.2f} [{g10 * 1e3:.1f},{g90 * 1e3:.1f}] {m50 * 1e3:>9.2f} "
                              f"{row['router_median_s'] * 1e3:>9.2f} {row['time_saved_grouped']:>13.1%} "
                              f"{flops_saved:>11.1%} {row['ratio_grouped']:>6.2f}", flush=True)
    key = _experts.machine_key(device, dtype)
    if a.no_calibrate:
        model = _experts.cost_model(device, dtype)
        where = "not updated (--no-calibrate)"
        if model is None:
            model = _experts.fit(points, "this run")
    else:
        path, model = _experts.save_calibration(key, points)
        where = f"calibrated on this run's {len(points)} configurations (merged with earlier ones), saved to {path}"
    print(f"cost model {where}")
    print(f"  grouped time / masked-dense time ≈ {model.coef[0]:.3g}·f + {model.coef[1]:.3g}·f/e + "
          f"{model.coef[2]:.3g}·experts/W + {model.coef[3]:.3g}/W (f = active fraction, W = T·C·FFN); grouped "
          f"iff <= 1")
    print("path the cost model picks per configuration (ratio = time saved ÷ FLOPs the routing saves; FLOPs run "
          "saved = 0 on masked-dense):")
    for row, p in zip(results, points):
        path = model.choose(p["T"], p["C"], p["E"], p["e"], p["P"], p["called"])
        row["path"] = path
        row["time_saved"] = row["time_saved_grouped"] if path == _experts.GROUPED else row["time_saved_masked"]
        row["flops_run_saved"] = row["flops_saved"] if path == _experts.GROUPED else 0.0
        row["ratio"] = row["time_saved"] / row["flops_saved"]
    print(f"{'shape':>13} {'tokens':>6} {'e':>4} {'active':>7} {'path':>12} {'time saved':>10} "
          f"{'FLOPs run saved':>15} {'ratio':>6}")
    for r in results:
        print(f"{r['shape']:>13} {r['tokens']:>6} {r['expert_size']:>4} {r['active']:>3}/{r['experts']:<3} "
              f"{r['path']:>12} {r['time_saved']:>10.1%} {r['flops_run_saved']:>15.1%} {r['ratio']:>6.2f}")
    print("target: mean ratio >= 0.9 for expert size >= 128, no configuration below 0.7")
    for name, *_ in shapes:
        for e in sorted({r["expert_size"] for r in results if r["shape"] == name}):
            rs = [r for r in results if r["shape"] == name and r["expert_size"] == e]
            ratios = [r["ratio"] for r in rs]
            paths = {p: sum(r["path"] == p for r in rs) for p in _experts.PATHS}
            print(f"  {name} e={e}: mean ratio {sum(ratios) / len(ratios):.2f}, min {min(ratios):.2f} over "
                  f"{len(rs)} configurations ({', '.join(f'{p} {n}' for p, n in paths.items() if n)})")
    if a.json:
        from bench.atomic import atomic_write_text
        env["cost_model"] = dict(source=model.source, coef=model.coef)
        atomic_write_text(a.json, json.dumps(dict(env=env, results=results), indent=1))
        print(f"wrote {a.json}")
    return 0
