"""Throughput of the measurement path at large N, measured side by side in one run (`python -m bench
bench-throughput`; issue 22, item 1).

    from bench.benchmarks.throughput import ThroughputOptions, run_throughput
    report = run_throughput(bundle, ThroughputOptions(samples=5000))   # a dict; report["harness_over_raw"] ...

Three figures, each a ratio of quantities measured in the same run (never a comparison across runs):

1. harness_over_raw: wall time of `measure(bundle, "dense", samples=N, timing_rounds=0, flop_images=1)` over plain
   `generate` calls on the same N samples, batches, labels and seeds (bench.measure.SEED_SCHEME; timed before and
   after the harness, their mean is used). The quality reference is warm (its features computed first, outside
   both timings, into a temporary cache root that the harness then uses; the extractor built), one-time imports are
   done before, the row goes to a temporary directory. The harness's phase times (row["phase_s"]) say where its
   time went; `other` is its wall time outside them (validation, row write).
2. rss_growth_mb_per_1k: peak RSS growth per 1000 samples of a measurement. `python -m bench run --method dense
   --timing-rounds 0 --flop-images 0` in a child process at two sizes (default N/5 and N/2) with the same warm cache;
   each child's peak RSS is ru_maxrss (os.wait4) or, when larger, the VmHWM read from /proc/<pid>/status every
   POLL_S (the child's per-batch memory probe resets its high-water mark through /proc/self/clear_refs, so ru_maxrss
   alone can miss a peak from before the last reset). The child is started by a small launcher interpreter (LAUNCHER):
   a process's ru_maxrss includes the high-water mark of the one it was forked from. Growth = (peak_big -
   peak_small) / (n_big - n_small) * 1000, in MB (MiB, 2**20 bytes); projected to RSS_TARGET_SAMPLES against
   RSS_TARGET_MB. Read it at sizes above FIDELITY_CHUNK_VALUES' chunk of images (341 at 32 px): below it the SSIM
   chunk itself grows with N (a term that stops growing); quadratic terms of the quality metrics (k-NN distances, up
   to 10,000 rows) make the projection a lower bound.
3. fast_over_reference: images/s of raw generation on the same full batches for each path: fp32 (the reference:
   today's path), bf16 autocast (bench.precision), torch.compile of the VAR transformer's scale forward (fp32),
   interleaved batch by batch (round r runs batch r on every path, the order rotated each round, so that drift
   affects all alike; round 0 is every path's warm-up, and torch.compile compiles there within compile_limit_s;
   compiled: each transformer block, see compiled_net).
   A path that fails, produces non-finite output or compiles too long is recorded unavailable with the reason.
   fast_over_reference = images/s of the fastest available path / images/s of fp32; that path is `fast_path`.
   When it is not fp32, FID at fid_samples (default N) of both paths, same labels and seeds, same warm reference
   (bench.quality.quality_metrics, metric fid, `bootstrap` resamples: a 95% interval each) and whether the intervals
   overlap. The reference path's FID is the harness row's (the same N, labels, seeds and call) when the harness ran
   fp32 at N; otherwise it is generated too. When fp32 is the fastest, fid_fast is fid_reference and the intervals
   overlap by definition (fid_fast_note says so).
No value in the report is NaN (None instead).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.benchmarks.harness import one_time_imports, sync, time_raw_vs_harness
from bench.benchmarks.jsonfile import plain
from bench.benchmarks.peak_rss import MB, output_tail, peak_rss_child
from bench.errors import BenchError
from bench.log import get_logger, progress

# torch and the modules that import it load inside the functions: importing bench.benchmarks must stay as light as
# the commands that name its constants while parsing (tests/test_cli_instant.py).

KEYS = ("harness_over_raw", "fast_over_reference", "fid_reference", "fid_fast", "fid_ci_overlap",
        "rss_growth_mb_per_1k")
log = get_logger(__name__)
PATHS = ("fp32", "bf16", "compile")    # fp32 first: the reference, and the first of round 0 (token agreement)
RSS_TARGET_SAMPLES = 50_000            # the criterion: a 50k-sample measurement fits in 4 GB
RSS_TARGET_MB = 4096
HARNESS_TARGET = 1.1                   # harness_over_raw at N = 5000 (bench-harness asks <= 1.2 at N = 1000)
DEFAULT_SAMPLES = 5000
DEFAULT_SPEED_SAMPLES = 1000
DEFAULT_COMPILE_LIMIT_S = 300.0
DEFAULT_BOOTSTRAP = 100


@dataclass
class ThroughputOptions:
    samples: int = DEFAULT_SAMPLES                 # N of the harness / raw comparison
    batch_size: int = 50
    seed: int = 0
    sampling: Any = None                           # bench.sampling.SamplingConfig (default: the model's)
    dtype: str = "fp32"                            # the harness's and the memory children's --dtype
    flop_images: int = 1                           # the harness's FLOP count
    speed_samples: int = DEFAULT_SPEED_SAMPLES     # images per path in the fast-path comparison (full batches)
    compile: bool = True                           # try the torch.compile path
    compile_limit_s: float = DEFAULT_COMPILE_LIMIT_S
    memory_samples: Optional[Tuple[int, int]] = None   # the two children's N (default N/5, N/2)
    fid_samples: Optional[int] = None              # N of the fast-path FID (default: samples)
    bootstrap: int = DEFAULT_BOOTSTRAP             # FID interval resamples (harness and fast-path FID)
    reference_count: Optional[int] = None          # quality reference images (default: the quality default)
    classifier: Optional[str] = None               # quality classifier (default: the model's)
    child_model_args: Optional[List[str]] = None   # how a child `python -m bench run` loads the model (default:
    #                                                 from the bundle: --model NAME, or the official checkpoints)
    profile: Optional[str] = None                  # write cProfile stats of the harness measurement here
    cache_dir: Optional[str] = None                # the temporary cache root's parent (default: the system temp)

    def resolved_memory_samples(self) -> Tuple[int, int]:
        if self.memory_samples is not None:
            return tuple(self.memory_samples)       # type: ignore[return-value]
        small = max(self.samples // 5, 16)
        return small, max(self.samples // 2, 2 * small)

    def speed_rounds(self) -> int:
        """Full batches per path: the warm-up one and at least one timed."""
        return max(2, -(-self.speed_samples // self.batch_size))


def check_options(o: ThroughputOptions) -> None:
    """One line (BenchError) for a value that cannot run; nothing is done before this passes."""
    def whole(name, v, low):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BenchError(f"{name} must be an integer >= {low}, got {v!r}")
    whole("samples", o.samples, 2)
    whole("batch size", o.batch_size, 1)
    whole("seed", o.seed, 0)
    whole("flop images", o.flop_images, 0)
    whole("speed samples", o.speed_samples, 1)
    whole("bootstrap", o.bootstrap, 1)
    if o.fid_samples is not None:
        whole("fid samples", o.fid_samples, 2)
    small, big = o.resolved_memory_samples()
    whole("memory samples (small)", small, 1)
    whole("memory samples (big)", big, 1)
    if not small < big:
        raise BenchError(f"memory samples must be two sizes SMALL < BIG, got {small},{big}")
    if not (isinstance(o.compile_limit_s, (int, float)) and o.compile_limit_s > 0 and math.isfinite(o.compile_limit_s)):
        raise BenchError(f"compile time limit must be a number of seconds > 0, got {o.compile_limit_s!r}")


# ---------------------------------------------------------------------------------------------- small helpers
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def ci_overlap(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Optional[bool]:
    if None in (*a, *b):
        return None
    return max(a[0], b[0]) <= min(a[1], b[1])


def warm_reference(bundle, cache_root: str, reference_count: Optional[int], classifier: Optional[str]) -> dict:
    """The quality reference's features computed into <cache_root>/quality (where measure(cache_dir=cache_root) reads
    them) and the feature extractor built, outside every timing."""
    # lazy: pulls torch (see the note at the top)
    from bench.quality import parse_reference, reference_features, resolve_extractor
    t = time.perf_counter()
    extractor = resolve_extractor(bundle, None, classifier)
    ref = parse_reference(bundle, None, reference_count)
    reference_features(extractor, ref, device=bundle.device, cache_dir=os.path.join(cache_root, "quality"))
    extractor.module(bundle.device)
    return dict(reference=ref.desc, reference_count=ref.count, extractor=extractor.tag,
                seconds=round(time.perf_counter() - t, 3))


def model_args(bundle) -> List[str]:
    """How a child `python -m bench ...` loads the same model."""
    if bundle.source == "official":
        f = bundle.files
        return ["--var-ckpt", f["var"], "--vae-ckpt", f["vqvae"], "--depth", str(int(bundle.var.cfg.depth)),
                "--patch-nums", ",".join(map(str, bundle.var.patch_nums)), "--device", str(bundle.device)]
    return ["--model", bundle.name, "--device", str(bundle.device)]


def sampling_args(sampling) -> List[str]:
    out = ["--cfg", repr(float(sampling.cfg)), "--top-k", str(int(sampling.top_k)),
           "--top-p", repr(float(sampling.top_p))]
    return out + (["--more-smooth"] if sampling.more_smooth else [])


# ---------------------------------------------------------------------------------------------- 1. harness / raw
def harness_over_raw(bundle, o: ThroughputOptions, sampling, cache_root: str, say: Callable[[str], None]) -> dict:
    """Figure 1 (bench.benchmarks.harness.time_raw_vs_harness, with the warm reference in cache_root) and where the
    harness's time went."""
    t = time_raw_vs_harness(bundle, samples=o.samples, seed=o.seed, sampling=sampling, batch_size=o.batch_size,
                            dtype=o.dtype, profile=o.profile, say=say, flop_images=o.flop_images,
                            cache_dir=cache_root, classifier=o.classifier, reference_count=o.reference_count,
                            timing_rounds=0, bootstrap=o.bootstrap)
    row, harness, raw = t.row, t.harness_s, t.raw_s
    phases = json.loads(row["phase_s"])
    phases["other"] = round(harness - sum(phases.values()), 4)
    return dict(harness_over_raw=t.harness_over_raw, harness_over_raw_cpu=t.harness_over_raw_cpu,
                harness_cpu_s=t.harness_cpu_s, raw_cpu_s=[t.raw_cpu_s_before, t.raw_cpu_s_after],
                harness_s=harness, raw_s=raw, raw_s_before=t.raw_s_before,
                raw_s_after=t.raw_s_after, phase_s=phases, phase_share={k: v / harness for k, v in phases.items()},
                generate_over_raw=phases.get("generate", 0.0) / raw, harness_wall_s_inside=row["wall_s"],
                reference_cached=bool(row.get("reference_cached")), dense_cache=row.get("dense_cache"),
                mem_kind=row.get("mem_kind"),
                harness_row={k: row.get(k) for k in ("images_per_s", "time_median_s", "time_p10_s", "time_p90_s",
                                                     "timing_batches", "mem_peak_bytes", "quality_s", "wall_s")},
                row_fid=dict(fid=row.get("fid"), ci=[row.get("fid_ci_low"), row.get("fid_ci_high")],
                             samples=row.get("samples"), dtype=row.get("dtype"),
                             bootstrap=row.get("quality_bootstrap")))


# ---------------------------------------------------------------------------------------------- 2. peak RSS
def memory_growth(bundle, o: ThroughputOptions, sampling, cache_root: str, say: Callable[[str], None]) -> dict:
    import torch
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
    env = dict(os.environ, PYTHONPATH=root + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""))
    small, big = o.resolved_memory_samples()
    out: Dict[str, Any] = dict(memory_samples=[small, big], rss_peak_mb={}, rss_ru_maxrss_mb={}, rss_polled_mb={},
                               rss_child_wall_s={})
    work = tempfile.mkdtemp(prefix="varbench-throughput-rss-")
    try:
        # each child gets a cache holding only the warm quality reference: none may read dense outputs an earlier
        # step (the harness's N samples) left, which would skip its generation and its generation's memory
        shutil.copytree(os.path.join(cache_root, "quality"), os.path.join(work, "cache", "quality"),
                        ignore=shutil.ignore_patterns("paired-features-*"))
        for n in (small, big):
            for made in ("dense-outputs", "generation-batches"):
                shutil.rmtree(os.path.join(work, "cache", made), ignore_errors=True)
            argv = [sys.executable, "-m", "bench", "run", "--method", "dense", "--samples", str(n),
                    "--batch-size", str(o.batch_size), "--seed", str(o.seed), "--timing-rounds", "0",
                    "--flop-images", "0", "--bootstrap", str(o.bootstrap), "--dtype", o.dtype,
                    "--threads", str(torch.get_num_threads()), "--results", os.path.join(work, f"results-{n}"),
                    "--cache-dir", os.path.join(work, "cache"), *(o.child_model_args or model_args(bundle)),
                    *sampling_args(sampling)]
            if o.reference_count is not None:
                argv += ["--reference-count", str(o.reference_count)]
            if o.classifier is not None:
                argv += ["--classifier", o.classifier]
            log = os.path.join(work, f"child-{n}.log")
            r = peak_rss_child(argv, env=env, log_path=log)
            if r["rc"] != 0:
                raise BenchError(f"the memory child (python -m bench run --samples {n}) failed with exit status "
                                 f"{r['rc']}: {output_tail(log)}")
            out["rss_peak_mb"][str(n)] = r["peak_bytes"] / MB
            out["rss_ru_maxrss_mb"][str(n)] = r["ru_maxrss_bytes"] / MB
            out["rss_polled_mb"][str(n)] = r["polled_hwm_bytes"] / MB
            out["rss_child_wall_s"][str(n)] = r["wall_s"]
            say(f"  child run --samples {n}: peak RSS {r['peak_bytes'] / MB:.1f} MB (ru_maxrss "
                f"{r['ru_maxrss_bytes'] / MB:.1f}, polled {r['polled_hwm_bytes'] / MB:.1f}), {r['wall_s']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p_small, p_big = out["rss_peak_mb"][str(small)], out["rss_peak_mb"][str(big)]
    growth = (p_big - p_small) / (big - small) * 1000
    projected = p_big + growth * (RSS_TARGET_SAMPLES - big) / 1000
    out.update(rss_growth_mb_per_1k=growth, rss_projected_mb=projected, rss_target_samples=RSS_TARGET_SAMPLES,
               rss_target_mb=RSS_TARGET_MB, rss_fits_target=projected <= RSS_TARGET_MB)
    return out


# ---------------------------------------------------------------------------------------------- 3. fast paths
class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CompileTimeout in the main thread after `seconds` (SIGALRM); elsewhere no limit (checked after)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise CompileTimeout(f"compilation took longer than {seconds:g} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class NetView:
    """The VAR with another scale_forward (generate() reads num_classes, patch_nums, new_caches, scale_forward)."""

    def __init__(self, net, scale_forward):
        self._net, self.scale_forward = net, scale_forward

    def __getattr__(self, name):
        return getattr(self._net, name)


def compiled_net(var):
    """The VAR with each transformer block torch.compile'd (static shapes: one graph per scale and batch size),
    sharing its parameters; `var` itself is left as it is. The blocks rather than the whole scale forward: blocks of
    one class share their compiled code, so compiling costs about the same at any depth (measured on the tiny model,
    loaded 2-core CPU: 99 s for the blocks, 231 s for the whole scale forward)."""
    import copy
    import torch
    net = copy.copy(var)
    net._modules = dict(var._modules)    # a shallow copy shares the module dict: replace it before assigning
    net.blocks = torch.nn.ModuleList([torch.compile(blk, dynamic=False) for blk in var.blocks])
    return net


@contextlib.contextmanager
def compile_settings(scales: int):
    """Room for one graph per scale and batch shape (dynamo's default limit, 8, is about the scale count)."""
    import torch
    try:
        import torch._dynamo as dynamo
    except ImportError:
        yield
        return
    cfg = dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(int(getattr(cfg, name, 8)), 8 * scales)}):
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def path_nets(bundle, o: ThroughputOptions) -> Dict[str, dict]:
    """{path: {net, dtype, available, reason}} for PATHS."""
    from bench.precision import check_dtype   # lazy: pulls torch (see the note at the top)
    out = {"fp32": dict(net=bundle.var, dtype="fp32", available=True, reason=None)}
    try:
        out["bf16"] = dict(net=bundle.var, dtype=check_dtype("bf16", bundle.device), available=True, reason=None)
    except BenchError as e:
        out["bf16"] = dict(net=None, dtype="bf16", available=False, reason=str(e))
    if not o.compile:
        out["compile"] = dict(net=None, dtype="fp32", available=False, reason="not tried (--no-compile)")
    else:
        try:
            out["compile"] = dict(net=compiled_net(bundle.var), dtype="fp32", available=True, reason=None)
        except Exception as e:   # noqa: BLE001  torch.compile missing or refusing: that path is unavailable
            out["compile"] = dict(net=None, dtype="fp32", available=False, reason=_first_line(e))
    return out


def _one_batch(net, bundle, labels, seed, sampling, dtype):
    """(seconds, Generation) of one generate() call as raw_generation_s runs it (images moved to the CPU)."""
    import torch
    from bench.precision import generation_dtype   # lazy: pulls torch (see the note at the top)
    from bench.sampling import generate   # lazy: pulls torch (see the note at the top)
    sync(bundle.device)
    t = time.perf_counter()
    with torch.no_grad(), generation_dtype(dtype):
        gen = generate(net, bundle.vqvae, labels.to(bundle.device), seed, sampling)
        images = gen.images.cpu()
    sync(bundle.device)
    return time.perf_counter() - t, gen, images


def speed_paths(bundle, o: ThroughputOptions, sampling, paths: Dict[str, dict], say: Callable[[str], None]) -> dict:
    """images/s of each available path over the same full batches, interleaved round by round."""
    from bench.measure import batch_seed, sample_labels   # lazy: pulls torch (see the note at the top)
    B, rounds = o.batch_size, o.speed_rounds()
    labels = sample_labels(rounds * B, bundle.num_classes)
    res = {p: dict(available=v["available"], reason=v["reason"], dtype=v["dtype"], laps=[], warmup_s=None,
                   token_agreement_vs_fp32=None) for p, v in paths.items()}
    ref_tokens = None
    with compile_settings(len(bundle.var.patch_nums)):
        for r in range(rounds):
            live = [p for p in PATHS if res[p]["available"]]
            order = live[r % len(live):] + live[:r % len(live)]    # round 0: fp32 first
            for p in order:
                lab = labels[r * B:(r + 1) * B]
                try:
                    with (time_limit(o.compile_limit_s) if p == "compile" and r == 0 else contextlib.nullcontext()):
                        dt, gen, _ = _one_batch(paths[p]["net"], bundle, lab, batch_seed(o.seed, r), sampling,
                                                paths[p]["dtype"])
                    if p == "compile" and r == 0 and dt > o.compile_limit_s:
                        raise CompileTimeout(f"compilation took {dt:.0f} s, longer than {o.compile_limit_s:g} s")
                except Exception as e:   # noqa: BLE001  a fast path that fails is unavailable, never a crash
                    if p == "fp32":
                        raise
                    res[p].update(available=False, reason=_first_line(e), laps=[])
                    say(f"  {p}: unavailable ({res[p]['reason']})")
                    if p == "compile":
                        with contextlib.suppress(Exception):
                            import torch._dynamo
                            torch._dynamo.reset()
                    continue
                if r == 0:
                    res[p]["warmup_s"] = dt
                    toks = [t.cpu() for t in gen.tokens]
                    if p == "fp32":
                        ref_tokens = toks
                    res[p]["token_agreement_vs_fp32"] = (
                        sum(int((a == b).sum()) for a, b in zip(toks, ref_tokens)) / sum(b.numel() for b in ref_tokens))
                else:
                    res[p]["laps"].append(dt)
    for p, v in res.items():
        if v["available"] and v["laps"]:
            v["images"] = B * len(v["laps"])
            v["seconds"] = sum(v["laps"])
            v["images_per_s"] = v["images"] / v["seconds"]
        else:
            v["images_per_s"] = None
    base = res["fp32"]["images_per_s"]
    for p, v in res.items():
        v["over_fp32"] = v["images_per_s"] / base if v["images_per_s"] else None
        v["laps"] = [round(x, 4) for x in v["laps"]]
    best = max((p for p in PATHS if res[p]["images_per_s"]), key=lambda p: res[p]["images_per_s"])
    return dict(paths=res, fast_path=best, fast_over_reference=res[best]["images_per_s"] / base,
                speed_rounds=rounds, speed_images_per_path=B * (rounds - 1))


def path_fid(bundle, o: ThroughputOptions, sampling, net, dtype: str, n: int, cache_root: str,
             say: Callable[[str], None], what: str) -> dict:
    """FID (and its interval) of n samples of one path: same labels and seeds as measure() (SEED_SCHEME), the same
    quality_metrics call as the harness row's (warm reference), uint8 images kept (N x 3 x H x W)."""
    import torch
    from bench.measure import batch_ranges, batch_seed, sample_labels   # lazy: pulls torch (see the note at the top)
    from bench.quality import quality_metrics, to_uint8   # lazy: pulls torch (see the note at the top)
    labels = sample_labels(n, bundle.num_classes)
    t = time.perf_counter()
    parts = []
    with compile_settings(len(bundle.var.patch_nums)):
        for b, (s, e) in progress(list(enumerate(batch_ranges(n, o.batch_size))), desc=f"FID samples ({what})",
                                  unit="batch"):
            _, _, images = _one_batch(net, bundle, labels[s:e], batch_seed(o.seed, b), sampling, dtype)
            parts.append(to_uint8(images))
    images = torch.cat(parts)
    del parts
    gen_s = time.perf_counter() - t
    q = quality_metrics(images.to(bundle.device), bundle, labels=labels, metrics=("fid",), bootstrap=o.bootstrap,
                        seed=o.seed, cache_dir=os.path.join(cache_root, "quality"), reference_count=o.reference_count,
                        classifier=o.classifier)
    say(f"  FID {what} ({n} samples): {q['fid']:.4g} [{q['fid_ci_low']:.4g}, {q['fid_ci_high']:.4g}] "
        f"({gen_s:.1f} s generation)")
    return dict(fid=q["fid"], ci=[q["fid_ci_low"], q["fid_ci_high"]], samples=n, generation_s=gen_s,
                source="generated here")


# ---------------------------------------------------------------------------------------------- the run
def run_throughput(bundle, o: Optional[ThroughputOptions] = None, say: Optional[Callable[[str], None]] = None) -> dict:
    """Every figure of the module docstring, measured in this process (and two children); returns the report."""
    import torch
    from bench.env import describe, environment   # lazy: pulls torch (see the note at the top)
    from bench.precision import check_dtype   # lazy: pulls torch (see the note at the top)
    from bench.quality import check_reference   # lazy: pulls torch (see the note at the top)
    o = o or ThroughputOptions()
    say = say or log.info
    check_options(o)
    o.dtype = check_dtype(o.dtype, bundle.device)
    sampling = o.sampling or bundle.sampling
    from bench.sampling import validate_sampling   # lazy: pulls torch (see the note at the top)
    validate_sampling(sampling, bundle.var.V)
    fid_n = o.fid_samples or o.samples
    small, big = o.resolved_memory_samples()
    from bench.measure import QUALITY_METRICS   # lazy: pulls torch (see the note at the top)
    for n, metrics in ((o.samples, QUALITY_METRICS), (small, QUALITY_METRICS), (fid_n, ("fid",))):
        # every quality call of the run can use the reference: one line if not, before anything runs
        check_reference(bundle, n, None, None, metrics, reference_count=o.reference_count, classifier=o.classifier)
    t_start, started = time.perf_counter(), _now()
    load_before = _load()
    env = environment(bundle.device)
    say(f"bench-throughput: {bundle.name} ({bundle.model_id}), N={o.samples}, batch {o.batch_size}, seed {o.seed}, "
        f"{o.dtype}; machine: {describe(env, bundle.device)}; load average {load_before}")
    cache_root = tempfile.mkdtemp(prefix="varbench-throughput-cache-", dir=o.cache_dir)
    report: Dict[str, Any] = {}
    try:
        imports = one_time_imports()
        warm = warm_reference(bundle, cache_root, o.reference_count, o.classifier)
        say(f"one-time imports {imports:.2f} s; quality reference {warm['reference']} ({warm['extractor']}) warm in "
            f"a temporary cache ({warm['seconds']:.1f} s), outside every timing")

        say(f"1. harness / raw (dense, N={o.samples}, timing rounds 0, flop images {o.flop_images})")
        h = harness_over_raw(bundle, o, sampling, cache_root, say)
        say("  harness phases (s): " + ", ".join(f"{k} {v:.2f} ({100 * h['phase_share'][k]:.1f}%)"
                                                  for k, v in h["phase_s"].items())
            + f"; generate / raw = {h['generate_over_raw']:.3f}")
        say(f"  harness_over_raw = {h['harness_over_raw']:.3f} wall, {h['harness_over_raw_cpu']:.3f} CPU time "
            f"(target <= {HARNESS_TARGET} at N = 5000; CPU time holds when the load changes between the runs)")

        rounds = o.speed_rounds()
        say(f"3. fast paths: {rounds} full batches of {o.batch_size} per path, interleaved (round 0: warm-up"
            f"{', compile' if o.compile else ''})")
        paths = path_nets(bundle, o)
        sp = speed_paths(bundle, o, sampling, paths, say)
        for p in PATHS:
            v = sp["paths"][p]
            say(f"  {p:<8} " + (f"{v['images_per_s']:.2f} images/s ({v['over_fp32']:.3f}x fp32; warm-up "
                               f"{v['warmup_s']:.1f} s; token agreement with fp32 on the warm-up batch "
                               f"{v['token_agreement_vs_fp32']:.4f})" if v["images_per_s"] else
                               f"unavailable: {v['reason']}"))
        say(f"  fast path: {sp['fast_path']}; fast_over_reference = {sp['fast_over_reference']:.3f}")
        rowfid = h["row_fid"]
        if o.dtype == "fp32" and fid_n == o.samples and rowfid["fid"] is not None:
            ref_fid = dict(rowfid, source="the harness row (fp32 dense, same N, labels, seeds)")
            say(f"  FID reference (fp32, {fid_n} samples, the harness row): {ref_fid['fid']:.4g} "
                f"[{ref_fid['ci'][0]:.4g}, {ref_fid['ci'][1]:.4g}]")
        else:
            ref_fid = path_fid(bundle, o, sampling, bundle.var, "fp32", fid_n, cache_root, say, "fp32 reference")
        if sp["fast_path"] == "fp32":
            fast_fid = dict(ref_fid, source="fp32 is the fastest path: fid_fast is fid_reference")
            note = "fp32 is the fastest path: fid_fast = fid_reference, the intervals overlap by definition"
            overlap = True
            say(f"  {note}")
        else:
            fp = paths[sp["fast_path"]]
            fast_fid = path_fid(bundle, o, sampling, fp["net"], fp["dtype"], fid_n, cache_root, say,
                                f"fast path {sp['fast_path']}")
            overlap = ci_overlap(ref_fid["ci"], fast_fid["ci"])
            note = f"FID of {sp['fast_path']} and fp32 at {fid_n} samples, same labels and seeds"
            say(f"  95% intervals overlap: {overlap}")

        say(f"2. peak RSS of a measurement (python -m bench run --method dense --timing-rounds 0 --flop-images 0) at "
            f"{small} and {big} samples")
        mem = memory_growth(bundle, o, sampling, cache_root, say)
        fits = "fits" if mem["rss_fits_target"] else "does NOT fit"
        say(f"  rss_growth_mb_per_1k = {mem['rss_growth_mb_per_1k']:.2f} MB per 1000 samples; projected at "
            f"{RSS_TARGET_SAMPLES} samples: {mem['rss_projected_mb']:.0f} MB ({fits} in {RSS_TARGET_MB} MB)")
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    load_after = _load()
    report = dict(
        harness_over_raw=h["harness_over_raw"], harness_over_raw_cpu=h["harness_over_raw_cpu"],
        harness_cpu_s=h["harness_cpu_s"], raw_cpu_s=h["raw_cpu_s"], fast_over_reference=sp["fast_over_reference"],
        fid_reference=ref_fid["fid"], fid_reference_ci=ref_fid["ci"], fid_fast=fast_fid["fid"],
        fid_fast_ci=fast_fid["ci"], fid_ci_overlap=overlap, rss_growth_mb_per_1k=mem["rss_growth_mb_per_1k"],
        fast_path=sp["fast_path"], fid_fast_note=note, fid_samples=fid_n,
        fid_reference_source=ref_fid["source"], fid_fast_source=fast_fid["source"], fid_bootstrap=o.bootstrap,
        harness_target=HARNESS_TARGET,
        samples=o.samples, batch_size=o.batch_size, seed=o.seed, dtype=o.dtype, flop_images=o.flop_images,
        sampling=sampling.to_dict(), model=bundle.name, model_id=bundle.model_id, device=str(bundle.device),
        threads=int(torch.get_num_threads()), cpu_count=os.cpu_count(), machine=env["env_device_name"],
        host=env["env_host"], platform=env["env_platform"], torch_version=torch.__version__,
        python_version=env["env_python"], commit=env["env_code_commit"], date=started, finished=_now(),
        wall_s=time.perf_counter() - t_start, load_avg_before=load_before, load_avg_after=load_after,
        one_time_imports_s=imports, reference=warm,
        raw_s=h["raw_s"], raw_s_before=h["raw_s_before"], raw_s_after=h["raw_s_after"], harness_s=h["harness_s"],
        phase_s=h["phase_s"], phase_share=h["phase_share"], generate_over_raw=h["generate_over_raw"],
        harness_dense_cache=h["dense_cache"], mem_kind=h["mem_kind"], harness_row=h["harness_row"],
        raw_images_per_s=o.samples / h["raw_s"],
        paths=sp["paths"], images_per_s={p: v["images_per_s"] for p, v in sp["paths"].items()},
        speed_rounds=sp["speed_rounds"], speed_images_per_path=sp["speed_images_per_path"],
        compile_limit_s=o.compile_limit_s,
        memory_samples=mem["memory_samples"], rss_peak_mb=mem["rss_peak_mb"],
        rss_ru_maxrss_mb=mem["rss_ru_maxrss_mb"], rss_polled_mb=mem["rss_polled_mb"],
        rss_child_wall_s=mem["rss_child_wall_s"], rss_projected_mb=mem["rss_projected_mb"],
        rss_target_samples=RSS_TARGET_SAMPLES, rss_target_mb=RSS_TARGET_MB, rss_fits_target=mem["rss_fits_target"],
        environment=env)
    return plain(report)


__all__ = ["KEYS", "PATHS", "ThroughputOptions", "run_throughput", "check_options", "ci_overlap", "speed_paths",
           "harness_over_raw", "memory_growth", "path_fid"]
