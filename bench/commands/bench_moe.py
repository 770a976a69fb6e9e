"""`python -m bench bench-moe`: does the expert FFN turn FLOPs saved into time saved? (a benchmark, not a test)

Side by side in one run on the current device: the dense FFN fc2(relu(fc1 x)) and the expert execution that
DMoE-VAR uses (methods/_moe.run_experts: group tokens by expert, two matmuls per expert, scatter-add), at fixed
active fractions (every token keeps round(f·E) random experts) and expert sizes, at the token counts of the
last scales (CFG: 2 rows per image, times --batch). Prints, per configuration, time saved ÷ FLOPs saved:
1.0 means the saving is fully realised, 0 means no time saved, negative means slower than dense. The router is
timed separately (its cost is reported, not part of the ratio). Timing: warm-up runs, then the repeats
interleaved dense/expert, each sample long enough to time (inner loop of >= --min-sample-ms), median (p10/p90
reported); time saved = 1 - median of the paired expert/dense ratios, robust to drift of a shared machine;
CUDA events on GPU.
"""
from __future__ import annotations

import json
import platform
import time

from bench.errors import BenchError

ORDER = 72

# name -> (C, FFN width, patch sides of the timed scales)
SHAPES = {
    "official-d16": (1024, 4096, (13, 16)),   # VAR-d16's last two scales
    "default": (128, 512, (6, 8)),             # the embedded default (shapes-d4)'s last two scales
}


def register(sub):
    p = sub.add_parser("bench-moe", help="benchmark: expert FFN vs dense FFN, time saved per FLOP saved")
    p.add_argument("--shapes", default="official-d16,default",
                   help=f"comma-separated: {', '.join(SHAPES)}, or C:FFN:pn/pn (e.g. 1024:4096:13/16)")
    p.add_argument("--expert-sizes", default="32,64,128,256", help="expert widths (those dividing the FFN width run)")
    p.add_argument("--fractions", default="0.25,0.5,0.75", help="active expert fractions")
    p.add_argument("--batch", type=int, default=4, help="images per batch (tokens = 2·pn²·batch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="repeat a call within one sample until this long")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
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
            out.append((name, int(c), int(h), tuple(int(p) for p in pns.split("/"))))
        except ValueError:
            raise BenchError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}, or C:FFN:pn/pn") from None
    if not out:
        raise BenchError("--shapes is empty")
    return out


def parse_list(text, typ, flag, low, high=None):
    try:
        vals = [typ(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} must be comma-separated {typ.__name__}s, got {text!r}") from None
    if not vals or any(v <= low or (high is not None and v > high) for v in vals):
        rng = f"in ({low}, {high}]" if high is not None else f"> {low}"
        raise BenchError(f"{flag} values must be {rng}, got {text!r}")
    return vals


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
    import torch
    import torch.nn.functional as F
    from bench.commands._common import check_device, check_writable_file
    from methods._moe import Router, run_experts
    shapes = parse_shapes(a.shapes)
    sizes = parse_list(a.expert_sizes, int, "--expert-sizes", 0)
    fracs = parse_list(a.fractions, float, "--fractions", 0.0, 1.0)
    for flag, v, lo in (("--batch", a.batch, 1), ("--warmup", a.warmup, 0), ("--repeats", a.repeats, 1),
                        ("--threads", a.threads, 0), ("--min-sample-ms", a.min_sample_ms, 0)):
        if v < lo:
            raise BenchError(f"{flag} must be >= {lo}, got {v}")
    if a.json:
        check_writable_file(a.json, (".json",))
    device = torch.device(check_device(a.device))
    if a.threads:
        torch.set_num_threads(a.threads)
    timer = Timer(device)
    g = torch.Generator().manual_seed(a.seed)
    results = []
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), batch=a.batch, warmup=a.warmup, repeats=a.repeats,
               min_sample_ms=a.min_sample_ms,
               started=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"bench-moe on {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads, "
          f"batch {a.batch}, warm-up {a.warmup}, {a.repeats} repeats (median [p10, p90])")
    hdr = f"{'shape':>13} {'tokens':>6} {'e':>4} {'E':>4} {'active':>7} {'dense ms':>18} {'experts ms':>18} " \
          f"{'router ms':>9} {'time saved':>10} {'FLOPs saved':>11} {'ratio':>6}"
    print(hdr)
    with torch.no_grad():
        for name, C, H, pns in shapes:
            W1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(device)
            B1 = (torch.randn(H, generator=g) * 0.1).to(device)
            W2 = (torch.randn(C, H, generator=g) / H ** 0.5).to(device)
            B2 = torch.zeros(C).to(device)
            for pn in pns:
                T = 2 * pn * pn * a.batch
                x = torch.randn(T, C, generator=g).to(device)

                def dense():
                    return F.linear(F.relu(F.linear(x, W1, B1)), W2, B2)
                for e in [s for s in sizes if H % s == 0]:
                    E = H // e
                    w1, b1 = W1.view(E, e, C), B1.view(E, e)      # as methods/_moe.split_ffn
                    w2 = W2.view(C, E, e).permute(1, 0, 2).contiguous()
                    router = Router(C, E).to(device)
                    done = set()
                    for f in fracs:
                        k = max(1, round(f * E))
                        if k >= E or k in done:
                            continue
                        done.add(k)
                        pick = torch.rand(T, E, generator=g).argsort(1)[:, :k]
                        mask = torch.zeros(T, E, dtype=torch.bool).scatter_(1, pick, True).to(device)

                        def experts():
                            return run_experts(x, mask, w1, b1, w2, "relu") + B2
                        for _ in range(a.warmup):
                            dense(), experts(), router(x)
                        one = min(timer(dense), timer(experts))
                        inner = max(1, min(1000, int(a.min_sample_ms / 1e3 / max(one, 1e-6))))
                        td, tm, tr = [], [], []
                        for _ in range(a.repeats):   # interleaved: drift affects both alike
                            td.append(timer(dense, inner))
                            tm.append(timer(experts, inner))
                            tr.append(timer(lambda: router(x), inner))
                        (d50, d10, d90), (m50, m10, m90) = quantiles(td), quantiles(tm)
                        r50 = quantiles(tr)[0]
                        flops_saved = 1 - k / E
                        time_saved = 1 - quantiles([m / d for m, d in zip(tm, td)])[0]
                        row = dict(shape=name, C=C, ffn=H, pn=pn, tokens=T, expert_size=e, experts=E, active=k,
                                   active_fraction=k / E, dense_median_s=d50, dense_p10_s=d10, dense_p90_s=d90,
                                   experts_median_s=m50, experts_p10_s=m10, experts_p90_s=m90, router_median_s=r50,
                                   inner_calls=inner, time_saved=time_saved, flops_saved=flops_saved,
                                   ratio=time_saved / flops_saved)
                        results.append(row)
                        print(f"{name:>13} {T:>6} {e:>4} {E:>4} {k:>3}/{E:<3} "
                              f"{d50 * 1e3:>7.2f} [{d10 * 1e3:.1f},{d90 * 1e3:.1f}] "
                              f"{m50 * 1e3:>7.2f} [{m10 * 1e3:.1f},{m90 * 1e3:.1f}] {r50 * 1e3:>9.2f} "
                              f"{time_saved:>10.1%} {flops_saved:>11.1%} {row['ratio']:>6.2f}", flush=True)
    print("ratio = time saved ÷ FLOPs saved (expert FFN vs dense FFN, router excluded; time saved = 1 - median paired "
          "expert/dense time); target >= 0.9 for expert size >= 128")
    for name, *_ in shapes:
        for e in sorted({r["expert_size"] for r in results if r["shape"] == name}):
            rs = [r["ratio"] for r in results if r["shape"] == name and r["expert_size"] == e]
            print(f"  {name} e={e}: mean ratio {sum(rs) / len(rs):.2f} over {len(rs)} configurations")
    if a.json:
        from bench.atomic import atomic_write_text
        atomic_write_text(a.json, json.dumps(dict(env=env, results=results), indent=1))
        print(f"wrote {a.json}")
    return 0
