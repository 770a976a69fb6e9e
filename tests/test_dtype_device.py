"""GPU readiness on the CPU: `--dtype` (autocast) through run and sweep, and where a Ray trial measures.

Everything here runs on the tiny model on CPU; the GPU side of the same code is run by `scripts/gpu-check`."""
import json
import os

import pytest
import torch

from bench.errors import BenchError
from tests.conftest import ROOT, run_cli


def _measure(tiny, method, dtype, tmp_path, classifier):
    from bench.measure import measure
    return measure(tiny, method, samples=4, batch_size=2, results_dir=str(tmp_path / "res"),
                   cache_dir=str(tmp_path / "cache"), classifier=classifier, reference_count=32, metrics=("fid",),
                   bootstrap=5, timing_rounds=1, dtype=dtype)


# ------------------------------------------------------------------------------------------------ --dtype
def test_bf16_autocasts_the_transformer_only():
    """Under bf16 the VAR's linear layers run in bfloat16, the logits reaching the sampler are float32, the images
    float32; fp32 (the default) runs no autocast at all."""
    from bench.precision import current_dtype, generation_dtype
    from bench.sampling import generate
    from bench.zoo import tiny_bundle
    b = tiny_bundle()
    seen = {"linear": set(), "logits": set()}
    hooks = [m.register_forward_hook(lambda mod, i, o: seen["linear"].add(o.dtype))
             for m in b.var.modules() if isinstance(m, torch.nn.Linear)]
    fn = lambda *a: b.var.scale_forward(*a)   # noqa: E731
    with generation_dtype("bf16"):
        assert current_dtype() == "bf16"
        g = generate(b.var, b.vqvae, torch.arange(2), 1, b.sampling, scale_fn=fn)
    assert current_dtype() == "fp32"
    assert seen["linear"] == {torch.bfloat16} and g.images.dtype == torch.float32
    seen["linear"].clear()
    generate(b.var, b.vqvae, torch.arange(2), 1, b.sampling)
    assert seen["linear"] == {torch.float32}
    for h in hooks:
        h.remove()


def test_bf16_row_and_its_own_dense_cache(tiny, tmp_path, classifier):
    """A bf16 run records dtype=bf16 and pairs with dense outputs generated in bf16: an fp32 dense cache entry is
    never reused for it (its key differs), while a second bf16 run reuses the bf16 entry."""
    from bench.measure import dense_cache_key
    fp32 = _measure(tiny, "dense", "fp32", tmp_path, classifier)
    assert fp32["dtype"] == "fp32" and fp32["dense_cache"] == "stored"
    method = _measure(tiny, "skip-scales", "bf16", tmp_path, classifier)
    assert method["dtype"] == "bf16"
    assert method["dense_cache"] == "generated"        # not the fp32 entry stored above
    dense = _measure(tiny, "dense", "bfloat16", tmp_path, classifier)
    assert dense["dtype"] == "bf16" and dense["dense_cache"] == "reused"
    entries = os.listdir(tmp_path / "cache" / "dense-outputs")
    assert len(entries) == 2, entries
    keys = [dense_cache_key(tiny, tiny.sampling, 0, 4, 2, "cpu", dtype=d) for d in ("fp32", "bf16", "fp16")]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3
    assert "dtype" not in keys[0] and keys[1]["dtype"] == "bf16"   # fp32 keys as before --dtype existed
    assert all(r["env_cuda_visible_devices"] is None for r in (fp32, method, dense))   # CPU: null


def test_fp16_on_cpu_follows_what_torch_supports(monkeypatch):
    from bench import precision
    assert precision.check_dtype("fp16", "cpu") == "fp16"       # torch >= 2.3 autocasts fp16 on CPU
    assert precision.check_dtype("float16", "cpu") == "fp16"
    monkeypatch.setattr(precision, "autocast_works", lambda dev, dt: dt is torch.bfloat16)   # a torch without it
    with pytest.raises(BenchError) as e:
        precision.check_dtype("fp16", "cpu")
    assert "valid on cpu: fp32, bf16" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["fp8", "half-ish"])
def test_cli_bad_dtype_one_line_exit_2_nothing_written(tmp_path, dtype):
    res = tmp_path / "res"
    r = run_cli("run", "--model", "tiny", "--samples", 4, "--results", res, "--dtype", dtype,
                env={"VARBENCH_CACHE": str(tmp_path / "cache")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"--dtype {dtype!r} is not a valid dtype; valid: fp32, bf16, fp16" in lines[0]
    assert os.listdir(tmp_path) == []


def test_sweep_dtype_key_is_validated(tmp_path):
    from bench.sweep.spec import load_spec
    assert load_spec("tau", sets=["measure.dtype=bfloat16"])["measure"]["dtype"] == "bf16"
    assert "dtype" not in load_spec("tau")["measure"]
    with pytest.raises(BenchError) as e:
        load_spec("tau", sets=["measure.dtype=fp8"])
    assert "measure.dtype 'fp8' is not a valid dtype; valid: fp32, bf16, fp16" in str(e.value)
    y = tmp_path / "s.yaml"
    y.write_text("models: [tiny]\nmeasure: {dtype: int8}\npoints:\n  dense: {method: dense}\n")
    with pytest.raises(BenchError) as e:
        load_spec(str(y))
    assert str(e.value) == "sweep s: measure.dtype 'int8' is not a valid dtype; valid: fp32, bf16, fp16"
    r = run_cli("sweep", str(y), "--dry-run", "--results", tmp_path / "res")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "measure.dtype" in r.stderr
    assert not (tmp_path / "res").exists()


# ------------------------------------------------------------------------------------------------ Ray trials
def test_environment_records_cuda_visible_devices(monkeypatch):
    from bench.env import cuda_visible_devices, environment
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert cuda_visible_devices("cuda") == "3" and cuda_visible_devices("cuda:0") == "3"
    assert cuda_visible_devices("cpu") is None and environment("cpu")["env_cuda_visible_devices"] is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_visible_devices("cuda") is None


def test_trial_device_is_the_first_gpu_the_trial_sees():
    from bench.sweep.process import trial_device
    assert trial_device("cuda", ["2"]) == "cuda:0"        # Ray granted GPU 2: the worker sees it as cuda:0
    assert trial_device("cuda:1", ["2"]) == "cuda:0"      # a machine-wide index means nothing inside the trial
    assert trial_device("cuda:1", []) == "cuda:1"         # outside Ray: as given
    assert trial_device("cpu", ["0"]) == "cpu"


def test_gpu_trials_request_their_gpu_share():
    from bench.sweep.runner import resources, trial_resources
    info = dict(max_node_cpus=8.0, max_node_gpus=2.0)
    assert resources(info, "cuda", 4, None) == (4.0, 2.0)          # default: the node's GPUs
    assert resources(info, "cuda:0", 4, 0.5) == (4.0, 0.5)
    assert resources(info, "cpu", 4, None) == (4.0, 0.0)
    assert trial_resources(4.0, 0.5) == {"CPU": 4.0, "GPU": 0.5}
    assert trial_resources(4.0, 0.0) == {"CPU": 4.0}
    with pytest.raises(BenchError, match="needs --gpus-per-trial > 0"):
        resources(info, "cuda", 4, 0)
    with pytest.raises(BenchError, match="no node of the cluster has a GPU"):
        resources(dict(max_node_cpus=8.0, max_node_gpus=0.0), "cuda", 4, None)


def test_run_trial_measures_on_the_device_ray_granted(monkeypatch):
    """The wiring inside a GPU trial, without a GPU: the granted GPU becomes cuda:0, made current, and the model
    is loaded there."""
    from bench.sweep import process, runner
    calls = {}
    monkeypatch.setattr(process, "ray_gpu_ids", lambda: ["1"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", str(d)))

    def load_bundle(model, device):
        calls["load_bundle"] = device
        raise BenchError("stop here")
    monkeypatch.setattr(process, "load_bundle", load_bundle)
    out = runner.run_trial(dict(modules=[], config=dict(threads=1), model="tiny", device="cuda:3"))
    assert out["status"] == "error" and out["error"] == "stop here"
    assert calls == {"set_device": "cuda:0", "load_bundle": "cuda:0"}


def test_sweep_trial_row_records_its_dtype(tmp_path, classifier, monkeypatch):
    """A sweep's measure.dtype reaches the trial's row (the trial function run directly, as a Ray worker runs it)."""
    from bench.results import load_results
    from bench.sweep.runner import SweepRunner, run_trial
    from bench.sweep.spec import load_spec
    from bench.sweep.trials import expand
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    y = tmp_path / "s.yaml"
    y.write_text(f"models: [tiny]\nsamples: 4\nbatch_size: 2\nmeasure: {{dtype: bf16, classifier: {classifier}, "
                 "reference_count: 32, metrics: [fid], bootstrap: 5, timing_rounds: 1}\n"
                 "points:\n  dense: {method: dense}\n")
    spec = load_spec(str(y))
    trials = expand(spec)
    info = dict(address="local", version="test", num_cpus=1, nodes=1)
    r = SweepRunner(spec, trials, "s-test", str(tmp_path / "res"), info, cpus=1, gpus=0)
    out = run_trial(r.job(trials[0], trials[0].params))
    assert out["status"] == "ok", out
    stored = load_results(str(tmp_path / "res"))
    assert len(stored) == 1 and stored.iloc[0]["dtype"] == "bf16"
    row = json.loads(out["row_json"])
    assert row["dtype"] == "bf16" and row["device"] == "cpu" and row["env_cuda_visible_devices"] is None


def test_expert_paths_run_under_autocast():
    """The grouped expert paths (padded bmm: CUDA's default; allocating ops: under fvcore's trace) accumulate
    autocast's reduced-precision expert outputs into their float32 output; the result matches float32."""
    from methods import _experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g)
    mask = torch.rand(24, 4, generator=g) > 0.5
    mask[:, 0] = True
    w1, b1, w2 = (torch.randn(4, 8, 16, generator=g) / 4, torch.randn(4, 8, generator=g) / 4,
                  torch.randn(4, 16, 8, generator=g) / 3)
    ref = _experts.grouped(x, mask, w1, b1, w2, batched=False)
    for batched in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _experts.grouped(x, mask, w1.requires_grad_(not batched), b1, w2, batched=batched)
        assert out.dtype == torch.float32
        assert torch.allclose(out.detach(), ref, atol=0.1, rtol=0.05), (batched, (out - ref).abs().max())
        w1.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ scripts/gpu-check
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu-check")


def _gpu_check(*args, env=None):
    import subprocess
    import sys
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop("OUT", None)
    e.update(env or {})
    return subprocess.run([sys.executable, GPU_CHECK, *map(str, args)], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would run")
def test_gpu_check_without_a_gpu_says_so_and_does_nothing(tmp_path):
    r = _gpu_check("--out", tmp_path / "out")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and "no GPU is present" in r.stdout
    assert not (tmp_path / "out").exists()
    r = _gpu_check("--cpu-smoke")                          # no --out and no $OUT
    assert r.returncode == 2 and r.stderr.strip() == "error: gpu-check: no output directory; give --out DIR or set $OUT"


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "out"
    r = _gpu_check("--cpu-smoke", env={"OUT": str(out)})     # the directory from $OUT, as on a lent GPU machine
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and summary["device"] == "cpu"
    steps = summary["steps"]
    assert sorted(steps) == ["a_agreement", "b_c_timing_memory", "d_bench_moe", "e_official_trial", "f_workers"]
    assert all(s["status"] == "ok" for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    greedy = steps["a_agreement"]["agreement"]["tiny"]["greedy_fp32"]["per_scale"]
    assert greedy == [1.0] * 7                              # CPU vs CPU in fp32: the same tokens
    assert set(steps["b_c_timing_memory"]["timing"]) == {"dense fp32", "dmoe tau=0.6 fp32", "dense bf16",
                                                         "dmoe tau=0.6 bf16"}
    assert json.loads((out / "bench-moe.json").read_text())["env"]["dtype"] == "bfloat16"
    row = steps["e_official_trial"]["row"]
    assert row["dtype"] == "bf16" and row["model"] == "official-d1" and row["method_label"].startswith("fastvar")
    workers = steps["f_workers"]["row"]
    assert workers["ray_generation_workers"] == 2 and workers["fidelity_token_agreement"] == 1.0
    assert (out / "gpu-check.log").read_text().count("\n") > 10
