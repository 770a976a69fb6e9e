"""Our dense sampler against the official VAR code, timed side by side (`python -m bench bench-official`).

    from bench.benchmarks.official import OfficialConfig, compare_with_official
    report = compare_with_official("/path/to/VAR", OfficialConfig(depth=16, batch_size=2, reps=4))
    report["ours_over_official"]     # median over reps of our time / the release's time (CPU time)

The official code is a checkout of FoundationVision/VAR given by path; it is imported from there for this run only
(nothing of it is copied into this repo). Both samplers get the same random weights (the official checkpoints are
not needed for speed: ours are initialised by the release's `init_weights`, the release's modules load them), the
same labels, seed and sampling settings. Each rep times the two back to back, in ABBA order over reps (official
first in even reps, ours first in odd ones), so a drift of the machine's load hits both sides alike; the ratio is
taken within each rep. Times are the process's CPU time (what a loaded machine distorts least with one thread)
and wall time, both reported, with CPU time split into user and system time and the minor page faults of each side.
Both sides run in one process under one allocator: `allocator="fixed"` (the default) fixes glibc's mmap and trim
thresholds first (bench.memory.fix_allocator_thresholds), since with its dynamic ones the page faults a side pays
depend on the order of earlier frees, not on its own work; `allocator="default"` leaves glibc as it is.
Every output, the warm-up's included, is compared with the first official image.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

from bench.defaults import MAX_SEED, MAX_THREADS
from bench.errors import BenchError
from bench.log import get_logger

# torch loads inside the functions: the bench-official command imports this module while parsing.

log = get_logger(__name__)
RELEASE = "FoundationVision/VAR"
MAX_REPS = 100
ALLOCATORS = ("fixed", "default")


@dataclass
class OfficialConfig:
    depth: int = 16                              # the release's builder: width 64·depth, heads = depth
    patch_nums: Optional[Tuple[int, ...]] = None  # default: the release's (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    batch_size: int = 2
    reps: int = 4                                # timed pairs, ABBA over reps
    seed: int = 0                                # weights, labels and the sampling generator
    threads: int = 1                             # torch intra-op threads during the run (restored after)
    cfg: float = 1.5                             # the VAR paper's FID sampling setting
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False
    device: str = "cpu"
    allocator: str = "fixed"                     # ALLOCATORS: glibc's thresholds fixed (for the rest of the
                                                 # process: glibc has no way back to dynamic ones), or as they are


def check_config(c: OfficialConfig) -> None:
    """One line (BenchError) for a setting that cannot run; nothing runs before this passes."""
    for name, low, high in (("depth", 1, None), ("batch_size", 1, None), ("reps", 1, MAX_REPS),
                            ("seed", 0, MAX_SEED), ("threads", 1, MAX_THREADS), ("top_k", 0, 4096)):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise BenchError(f"{name} must be an integer {bound}, got {v!r}")
    if c.allocator not in ALLOCATORS:
        raise BenchError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {c.allocator!r}")
    if c.patch_nums is not None:
        pns = tuple(c.patch_nums)
        if not pns or any(not isinstance(p, int) or p < 1 for p in pns) or list(pns) != sorted(set(pns)):
            raise BenchError(f"patch_nums must be strictly increasing positive integers, got {c.patch_nums!r}")


def check_var_code(path: str) -> str:
    """The absolute path of an official VAR checkout, or one line (BenchError) saying what is missing there."""
    if not path or not os.path.isdir(path):
        raise BenchError(f"--var-code {path!r} is not a folder; give a checkout of {RELEASE} "
                         f"(git clone https://github.com/{RELEASE})")
    full = os.path.abspath(path)
    missing = [f for f in ("dist.py", os.path.join("models", "__init__.py"), os.path.join("models", "var.py"))
               if not os.path.isfile(os.path.join(full, f))]
    if missing:
        raise BenchError(f"--var-code {path!r} is not a checkout of {RELEASE}: no {', '.join(missing)} there")
    return full


@contextlib.contextmanager
def _hub_stub():
    """The release's models/var.py imports huggingface_hub only for its hub-download class (VARHF), which this
    benchmark never uses: where the package is not installed, an empty stand-in lets the import go through."""
    if importlib.util.find_spec("huggingface_hub") is not None:
        yield
        return
    stub = types.ModuleType("huggingface_hub")
    stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
    sys.modules["huggingface_hub"] = stub
    try:
        yield
    finally:
        sys.modules.pop("huggingface_hub", None)


def import_official(path: str) -> types.ModuleType:
    """The release's `models` package imported from `path`. Its top-level names (`models`, `dist`) are generic, so
    they are in sys.modules only while importing: whatever held those names before gets them back."""
    full = check_var_code(path)
    own = ("models", "dist")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in own}
    sys.path.insert(0, full)
    try:
        with _hub_stub():
            models = importlib.import_module("models")
    except Exception as e:   # any failure inside a foreign package: one line, not its traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise BenchError(f"--var-code {path!r}: importing its models failed ({type(e).__name__}: {first})") from None
    finally:
        sys.path.remove(full)
        for k in [k for k in sys.modules if k.split(".")[0] in own]:
            del sys.modules[k]
        sys.modules.update(saved)
    if not all(hasattr(models, n) for n in ("VAR", "VQVAE")) or not hasattr(models.VAR, "autoregressive_infer_cfg"):
        raise BenchError(f"--var-code {path!r}: its models package has no VAR.autoregressive_infer_cfg / VQVAE; "
                         f"give a checkout of {RELEASE}")
    return models


def build_models(official: types.ModuleType, c: OfficialConfig):
    """(our VAR, our VQ-VAE, the release's VAR holding its VQ-VAE), all sharing one set of random weights."""
    import torch
    # lazy, these two and those of compare_with_official: they pull torch, and the command checks its flags with
    # this module before torch loads
    from bench.models.var import VAR, VARConfig
    from bench.models.vqvae import OFFICIAL_VQVAE, VQVAE   # lazy: pulls torch
    torch.manual_seed(c.seed)
    var_cfg = VARConfig.official(c.depth)
    if c.patch_nums is not None:
        var_cfg.patch_nums = tuple(c.patch_nums)
    pns = tuple(var_cfg.patch_nums)
    var = VAR(var_cfg).init_weights()
    vq = VQVAE(**{**OFFICIAL_VQVAE, "v_patch_nums": pns})
    with contextlib.redirect_stdout(io.StringIO()):   # the release's constructor prints its configuration
        o_vae = official.VQVAE(vocab_size=OFFICIAL_VQVAE["vocab_size"], z_channels=OFFICIAL_VQVAE["z_channels"],
                               ch=OFFICIAL_VQVAE["ch"], share_quant_resi=OFFICIAL_VQVAE["share_quant_resi"],
                               v_patch_nums=pns, test_mode=True)
        # the arguments of the release's build_vae_var (called directly: build_vae_var switches off
        # reset_parameters of torch.nn's layer classes for the whole process)
        o_var = official.VAR(vae_local=o_vae, num_classes=var_cfg.num_classes, depth=c.depth,
                             embed_dim=var_cfg.embed_dim, num_heads=var_cfg.num_heads,
                             drop_path_rate=0.1 * c.depth / 24, norm_eps=var_cfg.norm_eps, shared_aln=False,
                             cond_drop_rate=var_cfg.cond_drop_rate, attn_l2_norm=True, patch_nums=pns,
                             flash_if_available=True, fused_if_available=True)
    # assign=True: the release's modules hold our tensors themselves (one copy of a d16's 1.2 GB, not two)
    o_vae.load_state_dict(vq.state_dict(), strict=True, assign=True)
    o_var.load_state_dict(var.state_dict(), strict=True, assign=True)
    device = torch.device(c.device)
    for m in (var, vq, o_var):
        m.to(device).eval().requires_grad_(False)
    o_var.rng = torch.Generator(device=device)   # the release makes it on its own idea of the device
    return var, vq, o_var


def _median_range(values) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def compare_with_official(var_code: str, c: OfficialConfig = OfficialConfig(),
                          say: Callable[[str], None] = log.info) -> dict:
    """Time the release's `autoregressive_infer_cfg` against our `generate` (bench/sampling.py) on the same weights,
    labels and seed; `say` gets one line per timed run. Returns the report (JSON-ready)."""
    check_config(c)
    official = import_official(var_code)
    import torch
    from bench.env import check_device, environment   # lazy: pulls torch (see build_models)
    from bench.sampling import SamplingConfig, generate   # lazy: pulls torch
    from bench.memory import fix_allocator_thresholds     # lazy: pulls torch
    check_device(c.device)
    threads_before = torch.get_num_threads()
    allocator_fixed = c.allocator == "fixed" and fix_allocator_thresholds()
    torch.set_num_threads(c.threads)
    try:
        var, vq, o_var = build_models(official, c)
        device = torch.device(c.device)
        labels = torch.randint(0, var.num_classes, (c.batch_size,),
                               generator=torch.Generator().manual_seed(c.seed)).to(device)
        sampling = SamplingConfig(cfg=c.cfg, top_k=c.top_k, top_p=c.top_p, more_smooth=c.more_smooth)

        def run_official():
            return o_var.autoregressive_infer_cfg(B=c.batch_size, label_B=labels, g_seed=c.seed, cfg=c.cfg,
                                                  top_k=c.top_k, top_p=c.top_p, more_smooth=c.more_smooth)

        def run_ours():
            return generate(var, vq, labels, c.seed, sampling).images

        def timed(fn):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            w0, c0, u0 = time.perf_counter(), time.process_time(), _usage()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            w, cpu, u1 = time.perf_counter() - w0, time.process_time() - c0, _usage()
            return out, w, cpu, {k: u1[k] - u0[k] for k in u1}

        sides = {"official": run_official, "ours": run_ours}
        reference = timed(run_official)[0]   # warm-up of both sides; the official image is the reference
        equal, max_diff = True, 0.0

        def check(img):
            nonlocal equal, max_diff
            equal = equal and torch.equal(img, reference)
            max_diff = max(max_diff, float((img.float() - reference.float()).abs().max()))

        check(timed(run_ours)[0])
        load_before, reps = _load(), []
        for r in range(c.reps):
            order = ("official", "ours") if r % 2 == 0 else ("ours", "official")
            rep = {"order": "-".join(order)}
            for side in order:
                img, wall, cpu, usage = timed(sides[side])
                check(img)
                rep[f"{side}_wall_s"], rep[f"{side}_cpu_s"] = wall, cpu
                rep.update({f"{side}_{k}": v for k, v in usage.items()})
                say(f"rep {r + 1}/{c.reps} {side:<8} wall {wall:7.2f} s  cpu {cpu:7.2f} s")
            rep["ratio_cpu"] = rep["ours_cpu_s"] / rep["official_cpu_s"]
            rep["ratio_wall"] = rep["ours_wall_s"] / rep["official_wall_s"]
            if usage:
                rep["ratio_user"] = rep["ours_user_s"] / rep["official_user_s"]
            reps.append(rep)
        env = environment(c.device)
    finally:
        torch.set_num_threads(threads_before)
    cpu, wall = _median_range([r["ratio_cpu"] for r in reps]), _median_range([r["ratio_wall"] for r in reps])
    usage = {}
    if "ratio_user" in reps[0]:
        usage = dict(ours_over_official_user=statistics.median(r["ratio_user"] for r in reps),
                     **{f"{side}_{k}_median": statistics.median(r[f"{side}_{k}"] for r in reps)
                        for side in ("official", "ours") for k in ("user_s", "system_s", "minor_faults")})
    cfg = asdict(c)
    cfg["patch_nums"] = list(var.patch_nums)
    return dict(
        ours_over_official=cpu["median"], ours_over_official_min=cpu["min"], ours_over_official_max=cpu["max"],
        ours_over_official_wall=wall["median"], ours_over_official_wall_min=wall["min"],
        ours_over_official_wall_max=wall["max"], **usage, allocator_fixed=allocator_fixed, images_equal=equal,
        max_abs_diff=max_diff,
        load_avg_before=load_before, load_avg_after=_load(), reps=reps, config=cfg,
        official_code=os.path.abspath(var_code), official_commit=_commit(var_code), **env)


def _usage() -> dict:
    """This process's user and system CPU seconds and minor page faults so far ({} where `resource` is missing)."""
    try:
        import resource
    except ImportError:
        return {}
    r = resource.getrusage(resource.RUSAGE_SELF)
    return dict(user_s=r.ru_utime, system_s=r.ru_stime, minor_faults=r.ru_minflt)


def _load() -> Optional[float]:
    try:
        return round(float(os.getloadavg()[0]), 2)
    except (OSError, AttributeError):
        return None


def _commit(path: str) -> str:
    """The checkout's git commit, or 'unknown' (an unpacked archive has none; a folder inside another repository
    is not that repository's commit)."""
    import subprocess
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(path):
        return "unknown"
    return lines[1]
