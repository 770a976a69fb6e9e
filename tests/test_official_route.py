"""Issue 11 item 4: official-format checkpoints at the released 10-scale layout end to end (prepare, run, sweep with a
`models:` mapping, report), the ImageNet preset, and sample generation that resumes after a kill.

The official route runs on random-weight checkpoints at depth 1 (V=4096, 680 tokens, 1000 classes, the released
VQ-VAE ch=160 at 256x256). On this 2-core CPU the VQ-VAE alone costs ~5 s to encode and ~7 s to decode one image,
so that part is sized to a few images per step and marked slow; the preset and resume tests are fast."""
import math
import os

import pytest
import torch

from bench.errors import BenchError
from tests.conftest import run_cli


# ------------------------------------------------------------------------------------------ resumable generation
class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in the harness catches it."""


def kill_after(monkeypatch, generation_module, n: int):
    """Generation (bench.generation) dies (Killed) when its (n+1)-th batch starts; returns the real batch function."""
    real, calls = generation_module.timed_batch, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise Killed()
        return real(*a, **k)
    monkeypatch.setattr(generation_module, "timed_batch", dying)
    return real


def _dense_outputs(cache):
    from bench.measure import load_dense_outputs
    d = os.path.join(cache, "dense-outputs")
    (name,) = os.listdir(d)
    return load_dense_outputs(os.path.join(d, name))


def test_killed_generation_resumes_and_gives_the_uninterrupted_row(tmp_path, monkeypatch, tiny, classifier):
    """Kill a 6-batch run after 4 batches; the same call again reuses those 4 batches and generates 2: its samples
    (tokens, images), quality and fidelity equal an uninterrupted run's, and the row says 4 batches were resumed."""
    from bench import generation as G
    from bench import measure as M
    from bench.registry import create_method
    from bench.resume import batches_root
    kw = dict(samples=24, batch_size=4, classifier=classifier, reference_count=32, metrics=("fid", "kid"),
              bootstrap=20, timing_rounds=0, flop_images=0)
    whole = M.measure(tiny, create_method("dense"), results_dir=str(tmp_path / "res1"),
                      cache_dir=str(tmp_path / "cache1"), **kw)
    assert whole["resumed_batches"] == 0

    real = kill_after(monkeypatch, G, 4)
    cache2 = str(tmp_path / "cache2")
    with pytest.raises(Killed):
        M.measure(tiny, create_method("dense"), results_dir=str(tmp_path / "res2"), cache_dir=cache2, **kw)
    (key_dir,) = os.listdir(batches_root(cache2))
    assert len([f for f in os.listdir(os.path.join(batches_root(cache2), key_dir)) if f.startswith("batch-")]) == 4
    assert not os.path.isdir(os.path.join(tmp_path, "res2", "rows")) or not os.listdir(tmp_path / "res2" / "rows")

    monkeypatch.setattr(G, "timed_batch", real)
    again = M.measure(tiny, create_method("dense"), results_dir=str(tmp_path / "res2"), cache_dir=cache2, **kw)
    assert again["resumed_batches"] == 4
    # timing covers only the 2 batches generated now (the first of them is the warm-up)
    assert again["timing_batches"] == 1 and whole["timing_batches"] == 5
    for col in ("fid", "fid_ci_low", "fid_ci_high", "kid_mean", "fidelity_token_agreement"):
        assert again[col] == whole[col], col
    t1, i1 = _dense_outputs(str(tmp_path / "cache1"))
    t2, i2 = _dense_outputs(cache2)
    assert all(torch.equal(a, b) for a, b in zip(t1, t2)) and torch.equal(i1, i2)
    assert not os.path.exists(batches_root(cache2))      # the row is stored: its checkpoints are gone


def test_kill_during_the_dense_reference_resumes_both_generations(tmp_path, monkeypatch, tiny, classifier):
    """A method run killed while generating its dense reference: the re-run reads back all of the method's batches
    (timing then repeats a batch, outputs discarded) and the dense reference's finished ones; the row equals an
    uninterrupted run's."""
    from bench import generation as G
    from bench import measure as M
    from bench.registry import create_method
    from bench.resume import batches_root
    kw = dict(samples=24, batch_size=4, classifier=classifier, reference_count=32, metrics=("fid",),
              bootstrap=20, timing_rounds=0, flop_images=0)
    whole = M.measure(tiny, create_method("cfg-skip"), results_dir=str(tmp_path / "res1"),
                      cache_dir=str(tmp_path / "cache1"), **kw)
    real = kill_after(monkeypatch, G, 6 + 2)   # the method's 6 batches, then 2 of the dense reference's
    cache2 = str(tmp_path / "cache2")
    with pytest.raises(Killed):
        M.measure(tiny, create_method("cfg-skip"), results_dir=str(tmp_path / "res2"), cache_dir=cache2, **kw)
    assert sorted(len(os.listdir(os.path.join(batches_root(cache2), d))) for d in os.listdir(batches_root(cache2))) \
        == [2, 6]
    monkeypatch.setattr(G, "timed_batch", real)
    again = M.measure(tiny, create_method("cfg-skip"), results_dir=str(tmp_path / "res2"), cache_dir=cache2, **kw)
    assert again["resumed_batches"] == 6 and again["timing_extra_batches"] == 2 and again["dense_cache"] == "generated"
    for col in ("fid", "fid_ci_low", "fid_ci_high", "fid_delta", "fidelity_token_agreement", "fidelity_psnr_db"):
        assert again[col] == whole[col], col
    assert not os.path.exists(batches_root(cache2))


@pytest.mark.slow      # ~20 s: three CLI processes
def test_cli_run_killed_with_sigkill_resumes(tmp_path):
    """The real thing: `python -m bench run` killed (SIGKILL) once some batches are checkpointed; the same command
    again reads them back and its row equals that of the same command run uninterrupted elsewhere."""
    import signal
    import subprocess
    import sys
    import time
    from bench.resume import batches_root
    from bench.results import load_results
    from tests.conftest import ROOT

    def cmd(res, cache):
        return [sys.executable, "-m", "bench", "run", "--model", "tiny", "--samples", "120", "--batch-size", "6",
                "--timing-rounds", "0", "--flop-images", "0", "--reference-count", "32", "--metrics", "fid",
                "--bootstrap", "10", "--threads", "1", "--results", str(res), "--cache-dir", str(cache)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cache = tmp_path / "cache"
    p = subprocess.Popen(cmd(tmp_path / "res", cache), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    done = []
    try:
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            root = batches_root(str(cache))
            done = [f for d in (os.listdir(root) if os.path.isdir(root) else ())
                    for f in os.listdir(os.path.join(root, d)) if f.startswith("batch-")]
            if len(done) >= 3:
                break
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL and len(done) >= 3      # killed mid-generation
    _ok(run_cli(*cmd(tmp_path / "res", cache)[3:]))
    _ok(run_cli(*cmd(tmp_path / "res_whole", tmp_path / "cache_whole")[3:]))
    again, whole = (load_results(str(tmp_path / r)).iloc[0] for r in ("res", "res_whole"))
    assert again["resumed_batches"] >= 3 and whole["resumed_batches"] == 0
    for col in ("fid", "fid_ci_low", "fid_ci_high", "fidelity_token_agreement"):
        assert again[col] == whole[col], col


def test_batch_checkpoints_of_another_configuration_are_not_used(tmp_path, tiny):
    """The key is the trial's full configuration: another seed or sampling setting never reads these batches,
    and a damaged batch file is regenerated."""
    from dataclasses import replace
    from bench.measure import generation_key
    from bench.registry import create_method
    from bench.resume import BatchStore
    method = create_method("dense")
    key = generation_key(method, tiny.var, tiny, tiny.sampling, 0, 8, 4, "cpu")
    store = BatchStore.for_key(key, str(tmp_path))
    store.save(0, [torch.zeros(4, 1, dtype=torch.long)], torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    assert BatchStore.for_key(key, str(tmp_path)).load(0, 4) is not None
    for other in (generation_key(method, tiny.var, tiny, tiny.sampling, 1, 8, 4, "cpu"),
                  generation_key(method, tiny.var, tiny, replace(tiny.sampling, cfg=2.0), 0, 8, 4, "cpu"),
                  generation_key(create_method("cfg-skip"), tiny.var, tiny, tiny.sampling, 0, 8, 4, "cpu"),
                  generation_key(method, tiny.var, tiny, tiny.sampling, 0, 8, 4, "cpu", "bf16")):
        assert BatchStore.for_key(other, str(tmp_path)).load(0, 4) is None
    assert BatchStore.for_key(key, str(tmp_path)).load(0, 3) is None          # another batch size
    with open(store._file(0), "wb") as f:
        f.write(b"damaged")
    assert BatchStore.for_key(key, str(tmp_path)).load(0, 4) is None


def test_prepare_refuses_a_folder_with_more_classes_than_the_model(tmp_path):
    from tests.imagefolder import make_image_folder
    data = make_image_folder(tmp_path / "d12", classes=tuple("abcdefghijkl"), per_class=(3,) * 12)
    cache = tmp_path / "cache"
    r = run_cli("prepare", "pruned-ffn", "--model", "tiny", "--data", data, "--weights", "original",
                "--calib-images", "12", env=dict(VARBENCH_CACHE=str(cache)))
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "has 12 classes but model tiny has 10" in lines[0]
    assert not cache.exists()


def test_prepare_refuses_a_subset_of_imagenet_classes_for_an_imagenet_model(tmp_path):
    """Folders named by ImageNet synset take labels 0..k-1 in sorted order: right only for all 1000 of them."""
    from types import SimpleNamespace
    from bench.commands.prepare import check_data_classes
    from tests.imagefolder import make_image_folder
    wnids = ("n01440764", "n01443537", "n09999999")
    data = make_image_folder(tmp_path / "sub", classes=wnids, per_class=(3,) * 3)
    imagenet = SimpleNamespace(num_classes=1000, name="var-d16")
    with pytest.raises(BenchError, match=r"holds 3 of ImageNet's 1000 class folders \(n0...\): they would get "
                                         r"labels 0..2, not their ImageNet labels"):
        check_data_classes(data, imagenet)
    check_data_classes(data, SimpleNamespace(num_classes=10, name="mine"))      # a model of its own classes
    other = make_image_folder(tmp_path / "named", classes=("cat", "dog"), per_class=(3, 3))
    check_data_classes(other, imagenet)                                         # not ImageNet's folders


# ------------------------------------------------------------------------------------------ the ImageNet preset
@pytest.fixture
def preset_files(tmp_path):
    import numpy as np
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32)[:2, :2])
    inc = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    inc.write_bytes(b"x")
    return str(ref), str(inc)


def test_imagenet_preset_resolves_to_the_paper_protocol(preset_files):
    from bench.presets import check_preset_model, resolve_preset
    ref, inc = preset_files
    p = resolve_preset("imagenet", ref, inc)
    assert p.samples == 50_000 and p.preset.samples_per_class == 50
    assert p.sampling == dict(cfg=1.5, top_k=900, top_p=0.96)
    assert (p.reference, p.inception_weights) == (ref, inc)
    check_preset_model("imagenet", 1000, "official-d16")
    with pytest.raises(BenchError, match="preset imagenet is for 1000-class models .* has 10 classes"):
        check_preset_model("imagenet", 10, "tiny")
    for args, needle in (((None, inc), "preset imagenet needs --reference VIRTUAL_imagenet256_labeled.npz"),
                         ((ref, None), "preset imagenet needs --inception-weights weights-inception-2015"),
                         ((ref + ".missing", inc), "--reference file not found"),
                         ((ref, inc + ".missing"), "--inception-weights file not found")):
        with pytest.raises(BenchError, match=needle) as e:
            resolve_preset("imagenet", *args)
        assert "\n" not in str(e.value)
    with pytest.raises(BenchError, match="unknown preset 'cifar'; valid: imagenet"):
        resolve_preset("cifar", ref, inc)


def test_run_preset_fills_flags_and_explicit_flags_win(preset_files):
    import argparse
    from bench.commands.run import _apply_preset
    ref, inc = preset_files
    a = argparse.Namespace(preset="imagenet", samples=None, cfg=None, top_k=None, top_p=None, reference=ref,
                           inception_weights=inc)
    _apply_preset(a)
    assert (a.samples, a.cfg, a.top_k, a.top_p) == (50_000, 1.5, 900, 0.96)
    a = argparse.Namespace(preset="imagenet", samples=100, cfg=2.0, top_k=None, top_p=None, reference=ref,
                           inception_weights=inc)
    _apply_preset(a)
    assert (a.samples, a.cfg, a.top_k, a.top_p) == (100, 2.0, 900, 0.96)
    a = argparse.Namespace(preset=None, samples=None, cfg=None, top_k=None, top_p=None, reference=None,
                           inception_weights=None)
    _apply_preset(a)
    assert a.samples == 1000 and a.cfg is None


@pytest.mark.parametrize("drop,needle", [
    ("--reference", "preset imagenet needs --reference VIRTUAL_imagenet256_labeled.npz"),
    ("--inception-weights", "preset imagenet needs --inception-weights weights-inception-2015-12-05"),
    ("", "preset imagenet is for 1000-class models (50 samples per class); model tiny has 10 classes"),
])
def test_run_preset_bad_input_is_one_line_exit_2(tmp_path, preset_files, drop, needle):
    ref, inc = preset_files
    args = {"--reference": ref, "--inception-weights": inc}
    args.pop(drop, None)
    flat = [x for kv in args.items() for x in kv]
    r = run_cli("run", "--model", "tiny", "--preset", "imagenet", *flat, "--results", tmp_path / "res",
                "--cache-dir", tmp_path / "c")
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "res").exists() and not (tmp_path / "c").exists()


def test_sweep_preset_key(tmp_path, preset_files):
    from bench.sweep import load_spec
    ref, inc = preset_files
    y = tmp_path / "imnet.yaml"
    y.write_text(f"preset: imagenet\nmodels: [{{var_ckpt: v.pth, vae_ckpt: a.pth, name: d16}}]\nreference: {ref}\n"
                 f"measure: {{inception_weights: {inc}}}\nsampling: {{cfg: 2.0}}\npoints: {{dense: {{method: dense}}}}\n")
    spec = load_spec(str(y))
    assert spec["samples"] == 50_000 and spec["preset"] == "imagenet"
    assert spec["sampling"] == dict(cfg=2.0, top_k=900, top_p=0.96)      # the YAML's own cfg wins
    assert load_spec(str(y), sets=["samples=500"])["samples"] == 500
    y.write_text(f"preset: imagenet\nmeasure: {{inception_weights: {inc}}}\npoints: {{dense: {{method: dense}}}}\n")
    with pytest.raises(BenchError, match="sweep imnet: preset imagenet needs reference: VIRTUAL_imagenet256"):
        load_spec(str(y))
    assert load_spec(str(y), sets=[f"reference={ref}"])["reference"] == ref
    y.write_text("preset: imagenet2\npoints: {dense: {method: dense}}\n")
    with pytest.raises(BenchError, match="sweep imnet: unknown preset 'imagenet2'; valid: imagenet"):
        load_spec(str(y))


# ------------------------------------------------------------------------------------------ official checkpoints
def random_inception_state_dict():
    """torch-fidelity's Inception-v3 with its own random initialisation (no weights file exists here): the module
    is built with the download and the load skipped, and its state dict returned."""
    from unittest import mock
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    torch.manual_seed(0)
    with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        fe = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    return {k: v.detach().clone() for k, v in fe.state_dict().items()}


@pytest.fixture(scope="session")
def official_files(tmp_path_factory):
    """Random-weight checkpoints in the released formats at the released 10-scale layout, depth 1: the VAR as a
    torch.save'd plain tensor dict (var_d1.pth), the VQ-VAE (ch=160, V=4096, Cvae=32) as .safetensors; an image
    folder to prepare on and one to measure against (32px images: the loader resizes them to 256), random
    Inception weights and a random 1000-class feature classifier."""
    from safetensors.torch import save_file
    from bench.models.classifier import ShapesClassifier
    from bench.models.vqvae import OFFICIAL_VQVAE, VQVAE
    from tests.imagefolder import make_image_folder
    from tests.test_models import official_var_state_dict
    root = tmp_path_factory.mktemp("official")
    torch.save(official_var_state_dict(depth=1), root / "var_d1.pth")
    torch.manual_seed(0)
    vq = VQVAE(**OFFICIAL_VQVAE)
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(root / "vae_ch160v4096z32.safetensors"))
    torch.save(random_inception_state_dict(), root / "inception.pth")
    cls = ShapesClassifier(num_classes=1000, width=8, feature_dim=16, image_size=32)
    save_file({k: v.contiguous() for k, v in cls.state_dict().items()}, str(root / "classifier.safetensors"))
    return dict(root=root, var=str(root / "var_d1.pth"), vae=str(root / "vae_ch160v4096z32.safetensors"),
                inception=str(root / "inception.pth"), classifier=str(root / "classifier.safetensors"),
                data=make_image_folder(root / "data", classes=("a", "b", "c"), per_class=(3, 3, 3)),
                ref=make_image_folder(root / "ref", classes=("a", "b", "c"), per_class=(2, 2, 2), seed=1))


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow      # 2-4 minutes on the 2-core CPU (the more, the busier): the 256px VQ-VAE costs seconds per image
def test_official_checkpoints_prepare_run_sweep_report(official_files, tmp_path):
    """prepare dmoe|actvar|pruned-ffn on an image folder, run each method and dense, a sweep whose `models:` entry
    is a mapping naming the checkpoints, and report on its rows: at 680 tokens, V=4096, 1000 classes."""
    import time
    import yaml
    from bench.results import load_results
    f = official_files
    env = dict(VARBENCH_CACHE=str(tmp_path / "cache"), VARBENCH_HOME=str(tmp_path / "home"))
    model = ["--var-ckpt", f["var"], "--vae-ckpt", f["vae"], "--threads", "2"]
    times = {}

    def cli(name, *args):
        t = time.perf_counter()
        r = _ok(run_cli(*args, env=env))
        times[name] = round(time.perf_counter() - t, 1)
        return r

    # prepare, with tiny settings (the artifacts' keys are what `run --set` names below)
    r = cli("prepare dmoe", "prepare", "dmoe", *model, "--data", f["data"], "--steps", "0", "--images", "2",
            "--eval-images", "1", "--router-steps", "1", "--router-images", "2", "--batch", "2")
    assert "prepared dmoe for official-d1-" in r.stdout and r.stdout.count("dmoe-") >= 2
    cli("prepare actvar", "prepare", "actvar", *model, "--data", f["data"], "--steps1", "1", "--steps2", "0",
        "--batch", "2", "--images", "2", "--eval-images", "1")
    cli("prepare pruned-ffn", "prepare", "pruned-ffn", *model, "--data", f["data"], "--steps", "0",
        "--calib-images", "2")

    # run: without a feature extractor an official model says what to give, in one line
    res = str(tmp_path / "res")
    common = [*model, "--samples", "2", "--batch-size", "2", "--timing-rounds", "0", "--warmup-batches", "0",
              "--reference", f["ref"], "--bootstrap", "0", "--results", res]
    r = run_cli("run", "--method", "dense", *common, env=env)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--inception-weights" in lines[0], r.stderr
    # Inception features (KID only: a 2048-d FID of 2 samples costs a minute of matrix square roots here)
    cli("run dense", "run", "--method", "dense", *common, "--inception-weights", f["inception"],
        "--metrics", "kid", "--flop-images", "1")
    cls = ["--classifier", f["classifier"], "--metrics", "fid,kid"]
    cli("run dmoe", "run", "--method", "dmoe", "--set", "finetune_steps=0", "--set", "router_steps=1", *common, *cls,
        "--flop-images", "1")
    cli("run actvar", "run", "--method", "actvar", "--set", "steps1=1", "--set", "steps2=0", *common, *cls,
        "--flop-images", "0")
    cli("run pruned-ffn", "run", "--method", "pruned-ffn", "--set", "finetune_steps=0", "--set", "calib_images=2",
        *common, *cls, "--flop-images", "0")
    df = load_results(res)
    assert sorted(df["method"]) == ["actvar", "dense", "dmoe", "pruned-ffn"]
    for _, row in df.iterrows():
        assert row["model_source"] == "official" and row["model_depth"] == 1 and row["samples"] == 2
        assert (row["cfg"], row["top_k"], row["top_p"]) == (1.5, 900, 0.96)      # the release's sampling
        assert math.isfinite(row["kid_mean"]) and row["resumed_batches"] == 0
        assert math.isfinite(row["fid"]) or row["method"] == "dense"
        assert 0 <= row["fidelity_token_agreement"] <= 1
    dense, dmoe = (df[df["method"] == m].iloc[0] for m in ("dense", "dmoe"))
    assert len(dense["macs_fvcore_per_scale"]) == 10 and abs(dense["macs_fvcore_over_analytic"] - 1) <= 0.02
    assert dense["fidelity_token_agreement"] == 1.0
    assert list(dmoe["moe_scales"]) == [7, 8, 9]        # 'the last three' of the released 10 scales
    assert dmoe["macs_analytic_all"] != dense["macs_analytic_all"]

    # a sweep naming the checkpoints in its models: mapping, then report on its rows
    spec = dict(description="official d1, random weights", models=[dict(name="rand-d1", var_ckpt=f["var"],
                vae_ckpt=f["vae"])], samples=2, batch_size=2, reference=f["ref"],
                measure=dict(flop_images=0, warmup_batches=0, timing_rounds=0, metrics=["fid", "kid"], bootstrap=0,
                             classifier=f["classifier"]),
                points=dict(dmoe=dict(method="dmoe", params=dict(finetune_steps=0, router_steps=1),
                                      grid=dict(tau=[0.5]))))
    y = tmp_path / "official.yaml"
    y.write_text(yaml.safe_dump(spec))
    sres = str(tmp_path / "sres")
    r = cli("sweep", "sweep", str(y), "--results", sres)
    assert "1/1 trials have rows" in r.stdout
    sdf = load_results(sres)
    assert len(sdf) == 1 and sdf["trial_key"].iloc[0].endswith("/rand-d1/dmoe/tau=0.5")
    assert sdf["model_source"].iloc[0] == "official" and sdf["dense_cache"].iloc[0] == "reused"
    r = cli("report", "report", "--sweep", "official", "--results", sres, "--out", str(tmp_path / "rep"))
    assert os.listdir(tmp_path / "rep" / "official")
    print("official route times (s):", times)


@pytest.mark.slow      # the full-size VQ-VAE written, then loaded twice (5 s here, quiet; more when busy)
def test_official_model_id_names_both_checkpoints(official_files, tmp_path):
    """Prepared artifacts and caches are keyed by model_id: another VQ-VAE under the same VAR must not match."""
    from safetensors.torch import load_file, save_file
    from bench.zoo import load_official
    f = official_files
    sd = load_file(f["vae"])
    sd["quantize.embedding.weight"][0, 0] += 1
    other = str(tmp_path / "vae_other.safetensors")
    save_file(sd, other)
    a, b = load_official(f["var"], f["vae"]), load_official(f["var"], other)
    assert a.model_id.startswith("official-d1-") and a.model_id != b.model_id
    assert a.model_id.split("-")[2] == b.model_id.split("-")[2]        # same VAR hash
