"""`python -m bench bench-moe`: does expert execution turn FLOPs saved into time saved? (a benchmark, not a test)

bench/benchmarks/moe.py times the dense FFN against both expert-execution paths and calibrates the per-machine cost
model; this command parses the flags and prints the tables."""
from __future__ import annotations

from bench.benchmarks.jsonfile import write_json
from bench.benchmarks.moe import DTYPES, MoeBenchConfig, ROTATION, SHAPES, TARGET, check_config, parse_shapes, run_moe
from bench.commands._common import check_writable_file
from bench.errors import BenchError

ORDER = 72


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


def parse_list(text, typ, flag):
    try:
        return [typ(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} must be comma-separated {typ.__name__}s, got {text!r}") from None


HEADER = (f"{'shape':>13} {'tokens':>6} {'e':>4} {'E':>4} {'active':>7} {'dense ms':>18} {'grouped ms':>18} "
          f"{'masked ms':>9} {'router ms':>9} {'grouped saved':>13} {'FLOPs saved':>11} {'ratio':>6}")


def print_start(env):
    print(f"bench-moe on {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads, "
          f"{env['dtype']}, batch {env['batch']}, warm-up {env['warmup']}, {env['repeats']} repeats "
          f"(median [p10, p90])")
    print(HEADER)


def print_row(r):
    ms = {k: r[k] * 1e3 for k in ("dense_median_s", "dense_p10_s", "dense_p90_s", "grouped_median_s", "grouped_p10_s",
                                  "grouped_p90_s", "masked_median_s", "router_median_s")}
    print(f"{r['shape']:>13} {r['tokens']:>6} {r['expert_size']:>4} {r['experts']:>4} {r['active']:>3}/"
          f"{r['experts']:<3} {ms['dense_median_s']:>7.2f} [{ms['dense_p10_s']:.1f},{ms['dense_p90_s']:.1f}] "
          f"{ms['grouped_median_s']:>7.2f} [{ms['grouped_p10_s']:.1f},{ms['grouped_p90_s']:.1f}] "
          f"{ms['masked_median_s']:>9.2f} {ms['router_median_s']:>9.2f} {r['time_saved_grouped']:>13.1%} "
          f"{r['flops_saved']:>11.1%} {r['ratio_grouped']:>6.2f}", flush=True)


def print_paths(report):
    coef = report.cost_model.coef
    print(f"cost model {report.calibration}")
    print(f"  grouped time / masked-dense time ≈ {coef[0]:.3g}·f + {coef[1]:.3g}·f/e + {coef[2]:.3g}·experts/W + "
          f"{coef[3]:.3g}/W (f = active fraction, W = T·C·FFN); grouped iff <= 1")
    print("path the cost model picks per configuration (ratio = time saved ÷ FLOPs the routing saves; FLOPs run "
          "saved = 0 on masked-dense):")
    print(f"{'shape':>13} {'tokens':>6} {'e':>4} {'active':>7} {'path':>12} {'time saved':>10} "
          f"{'FLOPs run saved':>15} {'ratio':>6}")
    for r in report.results:
        print(f"{r['shape']:>13} {r['tokens']:>6} {r['expert_size']:>4} {r['active']:>3}/{r['experts']:<3} "
              f"{r['path']:>12} {r['time_saved']:>10.1%} {r['flops_run_saved']:>15.1%} {r['ratio']:>6.2f}")
    print(f"target: {TARGET}")
    for s in report.summary:
        paths = ", ".join(f"{p} {n}" for p, n in s["paths"].items() if n)
        print(f"  {s['shape']} e={s['expert_size']}: mean ratio {s['mean_ratio']:.2f}, min {s['min_ratio']:.2f} over "
              f"{s['configurations']} configurations ({paths})")


def run(a):
    cfg = MoeBenchConfig(shapes=parse_shapes(a.shapes), expert_sizes=parse_list(a.expert_sizes, int, "--expert-sizes"),
                         fractions=parse_list(a.fractions, float, "--fractions"), batch=a.batch, warmup=a.warmup,
                         repeats=a.repeats, min_sample_ms=a.min_sample_ms, device=a.device, threads=a.threads,
                         seed=a.seed, dtype=a.dtype, calibrate=not a.no_calibrate)
    check_config(cfg)
    if a.json:
        check_writable_file(a.json, (".json",), "--json")
    report = run_moe(cfg, on_start=print_start, on_row=print_row)
    print_paths(report)
    if a.json:
        write_json(a.json, report.to_dict())
        print(f"wrote {a.json}")
    return 0
