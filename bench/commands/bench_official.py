"""`python -m bench bench-official`: our dense sampler against the official VAR code (a checkout given by path), same
weights, labels and seed; bench/benchmarks/official.py measures, this command parses the flags and prints."""
from __future__ import annotations

from bench.benchmarks.jsonfile import write_json
from bench.benchmarks.official import (ALLOCATORS, OfficialConfig, check_config, check_var_code,
                                       compare_with_official)
from bench.commands._common import check_device, check_writable_file

ORDER = 94


def register(sub):
    p = sub.add_parser("bench-official", help="benchmark: our sampler's time over the official VAR code's, "
                       "same random weights (images checked equal)")
    p.add_argument("--var-code", required=True, metavar="PATH",
                   help="a checkout of FoundationVision/VAR (git clone https://github.com/FoundationVision/VAR)")
    p.add_argument("--depth", type=int, default=16, help="VAR depth, the release's builder (default 16)")
    p.add_argument("--patch-nums", default=None,
                   help="token-map sides (default the release's 1,2,3,4,5,6,8,10,13,16)")
    p.add_argument("--batch-size", type=int, default=2, help="images per generation (default 2)")
    p.add_argument("--reps", type=int, default=4, help="timed pairs, ABBA over reps (default 4)")
    p.add_argument("--seed", type=int, default=0, help="weights, labels and sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance (default 1.5)")
    p.add_argument("--top-k", type=int, default=900, help="default 900")
    p.add_argument("--top-p", type=float, default=0.96, help="default 0.96")
    p.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visualisation only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--allocator", default="fixed", choices=ALLOCATORS,
                   help="fixed: glibc's mmap/trim thresholds fixed for the run, so neither side's page faults "
                        "depend on the other's frees (default); default: glibc as it is")
    p.add_argument("--json", default=None, help="write the report and the environment to this JSON file")
    p.set_defaults(func=run)


def run(a):
    check_var_code(a.var_code)   # first: a wrong path is the likeliest mistake, and costs nothing to find
    if a.json:
        check_writable_file(a.json, (".json",), "--json")
    patch_nums = None
    if a.patch_nums is not None:
        from bench.zoo import parse_patch_nums   # lazy: --help stays instant (no torch)
        patch_nums = parse_patch_nums(a.patch_nums)
    cfg = OfficialConfig(depth=a.depth, patch_nums=patch_nums, batch_size=a.batch_size, reps=a.reps, seed=a.seed,
                         threads=a.threads, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p, more_smooth=a.more_smooth,
                         device=check_device(a.device), allocator=a.allocator)
    check_config(cfg)
    r = compare_with_official(a.var_code, cfg, say=lambda s: print(s, flush=True))
    print(f"ours / official, d{a.depth}, batch {a.batch_size}, {a.reps} reps ABBA, {a.threads} thread(s): "
          f"CPU time {r['ours_over_official']:.3f} [{r['ours_over_official_min']:.3f}..{r['ours_over_official_max']:.3f}]"
          f", wall {r['ours_over_official_wall']:.3f} [{r['ours_over_official_wall_min']:.3f}.."
          f"{r['ours_over_official_wall_max']:.3f}] (median [min..max] over reps); load average "
          f"{r['load_avg_before']} -> {r['load_avg_after']}")
    if "ours_over_official_user" in r:
        print(f"user time {r['ours_over_official_user']:.3f}; medians user / system s, minor faults: official "
              f"{r['official_user_s_median']:.2f} / {r['official_system_s_median']:.2f}, "
              f"{r['official_minor_faults_median']:.0f}; ours {r['ours_user_s_median']:.2f} / "
              f"{r['ours_system_s_median']:.2f}, {r['ours_minor_faults_median']:.0f} (allocator "
              f"{'fixed' if r['allocator_fixed'] else 'as glibc sets it'})")
    print("images bitwise equal" if r["images_equal"] else
          f"images NOT equal: max abs difference {r['max_abs_diff']}")
    if a.json:
        write_json(a.json, r)
        print(f"wrote {a.json}")
    return 0 if r["images_equal"] else 1   # unequal images: the two did not do the same work
