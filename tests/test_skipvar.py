"""SkipVAR (methods/skipvar.py, methods/_skipvar_fit.py): the measure on one grid, the decision models fitted by
`prepare skipvar` on the tiny model and stored as JSON numbers, decisions that follow them, the identity setting,
the threshold variant, and bad parameters."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.registry import create_method
from bench.sampling import generate
from methods import _skipvar_fit as fitlib
from methods.skipvar import SkipVARPolicy
from methods.skipvar import KIND, RECIPE, SkipVAR, SkipVARPolicy, on_grid, read_models
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import SAMPLING, reset
from tests.test_field_methods import block_rows, macs_match

LABELS = torch.tensor([0, 1, 2, 3, 4, 5])
FIT = 12                    # samples of the tiny fits


@pytest.fixture(scope="module")
def tiny_samples():
    from bench.zoo import tiny_bundle
    b = tiny_bundle()
    return fitlib.collect(b, 3, 3, FIT, 0, policy_cls=SkipVARPolicy, batch=FIT, sampling=SAMPLING)


def split_target(samples) -> float:
    """An SSIM target that gives the skip model two classes on these samples (the median skip-1 SSIM)."""
    v = sorted(samples["ssim"]["skip1"])
    return round(float((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2), 6)


# ---------------------------------------------------------------------------------------------- the measure
class _Net:
    patch_nums = (1, 2, 3, 4, 5, 6, 8)
    f_hat = None


def test_measure_reads_zero_without_content_change_and_not_with_one(tiny):
    """Both maps come from the full-size f_hat, area-resampled to the decision scale's side: no content change
    between them is exactly 0; the earlier two-grid comparison (old map bicubic to the new grid) was not."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, tiny.vqvae.Cvae, 8, 8, generator=g)
    net, pol = _Net(), SkipVARPolicy(3, tiny.vqvae, None)
    for si, fh in ((3, f), (4, f.clone())):                          # scale 3 added nothing
        net.f_hat = fh
        pol.decide(si, None, 4, net)
    diff, ratio, rel = np.asarray(pol.features).T
    assert (diff == 0).all() and (rel == 0).all() and (ratio > 0).all()
    net.f_hat = f
    pol.decide(3, None, 4, net)
    net.f_hat = f + 0.3 * torch.randn(f.shape, generator=g)          # new content
    pol.decide(4, None, 4, net)
    assert (np.asarray(pol.features[4:])[:, 0] > 0).all()
    # the former reading of the same unchanged map: old on 4x4 bicubic to 5x5 against the new map on 5x5
    import torch.nn.functional as F
    old = F.interpolate(F.interpolate(f, size=(4, 4), mode="area"), size=(5, 5), mode="bicubic")
    two = fitlib.decision_features(old, F.interpolate(f, size=(5, 5), mode="area"), tiny.vqvae)
    assert (two[:, 0] > 0).all()
    assert on_grid(f, 4).shape == (4, tiny.vqvae.Cvae, 4, 4)


def test_generation_measures_the_sampler_maps(tiny):
    """In a real generation the policy's features equal the measure of f_hat after scales 2 and 3 rebuilt from the
    tokens (both on the 4x4 grid)."""
    from methods import _steps
    probe = _steps.StepNet(tiny.var, SkipVARPolicy(3, tiny.vqvae, None))
    gen = generate(probe, tiny.vqvae, LABELS, 4, SAMPLING)
    q, pns = tiny.vqvae.quantize, tiny.var.patch_nums
    f_hat, maps = torch.zeros(6, q.Cvae, 8, 8), []
    for si in range(4):
        f_hat, _ = q.next_input(si, f_hat, q.embedding(gen.tokens[si]).transpose(1, 2).reshape(6, q.Cvae, pns[si],
                                                                                                pns[si]))
        maps.append(on_grid(f_hat, 4))
    want = fitlib.decision_features(maps[2], maps[3], tiny.vqvae)
    assert torch.allclose(torch.tensor(probe.policy.features, dtype=torch.float64), want, atol=1e-6)
    assert (want[:, 0] > 0).all()


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_fits_on_the_tiny_model_and_the_artifact_round_trips_without_pickle(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    values = RECIPE.values(fit_samples=FIT, ssim_target=[0.5, 0.9])
    dirs = SkipVAR.prepare(tiny, values, None)
    assert len(dirs) == 2 and all(os.path.basename(d).startswith(f"{KIND}-{tiny.model_id}-") for d in dirs)
    for d, target in zip(dirs, (0.5, 0.9)):
        assert sorted(os.listdir(d)) == ["DONE", "decision.json", "meta.json"]
        raw = json.load(open(os.path.join(d, "decision.json")))      # plain JSON numbers
        assert raw["ssim_target"] == target and raw["features"] == ["hf_diff", "hf_ratio"]
        assert len(raw["samples"]["features"]) == FIT and set(raw["samples"]["ssim"]) == set(
            fitlib.outcome_names(3)[1:])
        meta = json.load(open(os.path.join(d, "meta.json")))
        assert meta["key"]["decision_scale"] == 3 and meta["key"]["samples"] == FIT
        # the stored coefficients are scikit-learn's fit of the stored samples (refit here, compared)
        again = fitlib.fit(raw["samples"], target, 3)
        for part in ("skip", "uncond"):
            for k in ("classes", "mean", "scale", "coef", "intercept"):
                assert np.allclose(np.asarray(again[part][k], dtype=float), np.asarray(raw[part][k], dtype=float))

    def no_pickle(*a, **k):
        raise AssertionError("unpickled")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    m = create_method("skipvar", fit_samples=FIT, ssim_target=0.9)
    assert read_models(dirs[1])["skip"] == json.load(open(os.path.join(dirs[1], "decision.json")))["skip"]
    net = m.build(tiny)                                              # found, read, nothing refitted
    assert net.policy.models["ssim_target"] == 0.9
    # reused: a second prepare finds both and generates nothing
    monkeypatch.setattr(fitlib, "collect", no_pickle)
    assert SkipVAR.prepare(tiny, values, None) == dirs
    # refused: an artifact fitted under other sampling settings is not reused without --force
    meta_path = os.path.join(dirs[0], "meta.json")
    meta = json.load(open(meta_path))
    meta["sampling"] = dict(meta["sampling"], cfg=9.0)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(BenchError, match=r"was fitted on samples drawn with sampling .* pass --force"):
        SkipVAR.prepare(tiny, values, None)
    # a damaged model file is one line naming the fix, not a traceback
    bad = os.path.join(dirs[1], "decision.json")
    json.dump(dict(skip=dict(classes=[0, 1], coef=[[1.0]]), uncond={}), open(bad, "w"))
    with pytest.raises(BenchError, match=r"not a SkipVAR decision model .*prepare skipvar --force"):
        read_models(dirs[1])


def test_fit_labels_and_constant_models(tiny_samples):
    s = tiny_samples
    assert len(s["features"]) == FIT and all(len(r) == 3 for r in s["features"])
    y = fitlib.labels_for(s["ssim"], 0.0, "skip", 3)
    assert (y == 3).all()                                            # every outcome keeps SSIM >= 0
    m = fitlib.fit(s, 1.0, 3)                                        # nothing but dense keeps SSIM 1: one class
    assert m["skip"]["constant"] and m["skip"]["classes"] == [0]
    assert (fitlib.predict(m["skip"], np.asarray(s["features"])[:, :2]) == 0).all()
    ssim = {"skip1": [0.9, 0.5], "skip2": [0.85, 0.9], "skip3": [0.1, 0.2]}
    assert fitlib.labels_for(ssim, 0.8, "skip", 3).tolist() == [2, 2]  # the most steps that keep the target


# ---------------------------------------------------------------------------------------------- decisions
def test_decisions_follow_the_fitted_model(tiny, tiny_samples, tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    target = split_target(tiny_samples)
    monkeypatch.setattr(fitlib, "collect", lambda *a, **k: tiny_samples)   # the module's samples, fitted
    m = create_method("skipvar", fit_samples=FIT, ssim_target=target)
    net = m.build(tiny)
    models = net.policy.models
    assert len(models["skip"]["classes"]) >= 2
    X = np.asarray(tiny_samples["features"])[:, :2]                  # numpy predict == scikit-learn's predict
    for part in ("skip", "uncond"):
        y = fitlib.labels_for(tiny_samples["ssim"], target, part, 3)
        if len(set(y.tolist())) > 1:
            sc = StandardScaler().fit(X)
            want = LogisticRegression(max_iter=1000).fit(sc.transform(X), y).predict(sc.transform(X))
            assert (fitlib.predict(models[part], X) == want).all()
    labels = torch.arange(12) % 10
    seen = block_rows(net, tiny.var)
    reset(net)
    gen = generate(net, tiny.vqvae, labels, 4, SAMPLING)
    F = np.asarray(net.policy.features)[:, :2]
    sk, unc = fitlib.predict(models["skip"], F), fitlib.predict(models["uncond"], F)
    S = 7
    want = [(S - int(k), S - int(u) if k == 0 else S) for k, u in zip(sk, unc)]
    assert net.plans == want
    for i, (stop, nocfg) in enumerate(want):                        # skippers: no tokens on their skipped scales
        assert all(bool((gen.tokens[si][i] == -1).all()) == (si >= stop) for si in range(S))
    assert seen[3] == [24]                                           # dense up to the decision
    row = m.row_metrics(net, tiny)
    got = [fitlib.plan_outcome(s, c, S) for s, c in want]
    for o in fitlib.outcome_names(3):
        assert row[f"skipvar_share_{o}"] == pytest.approx(got.count(o) / 12, abs=1e-4)
    assert sum(row[f"skipvar_share_{o}"] for o in fitlib.outcome_names(3)) == pytest.approx(1.0, abs=1e-3)
    macs_match(m, net, tiny, labels, seed=4)                         # analytic == fvcore for the same generation


def test_identity_setting_is_dense_bitwise(tiny, tmp_path, monkeypatch):
    """max_last=0: the outcome set {dense}; nothing to decide or fit, images equal dense's bit for bit."""
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    m = create_method("skipvar", max_last=0)
    net = m.build(tiny)
    a = generate(net, tiny.vqvae, LABELS, 2, SAMPLING)
    b = generate(tiny.var, tiny.vqvae, LABELS, 2, SAMPLING)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    row = m.row_metrics(net, tiny)
    assert row["skipvar_share_dense"] == 1.0 and row["macs_saved_fraction"] == 0.0
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------- threshold variant
def test_threshold_rule_chooses_a_strategy_per_sample(tiny):
    probe = create_method("skipvar", rule="threshold", skip_below=0.0, uncond_below=0.0).build(tiny)
    generate(probe, tiny.vqvae, LABELS, 4, SAMPLING, decode=False)
    v = [f[2] for f in probe.policy.features]                         # measure=diff: the relative HF_diff
    assert len(v) == 6 and len(set(v)) == 6
    s = sorted(v)
    m = create_method("skipvar", rule="threshold", skip_below=(s[1] + s[2]) / 2, uncond_below=(s[3] + s[4]) / 2)
    net = m.build(tiny)
    seen = block_rows(net, tiny.var)
    reset(net)
    gen = generate(net, tiny.vqvae, LABELS, 4, SAMPLING, decode=False)
    assert [f[2] for f in net.policy.features] == v
    skip = [x < s[2] for x in v]
    assert (gen.tokens[6] == -1).all(dim=1).tolist() == skip
    assert seen[4] == [12] and seen[5] == [6 + 4] and seen[6] == [4 + 2]
    macs_match(m, net, tiny, LABELS, seed=4)
    row = m.row_metrics(net, tiny)
    assert (row["skipvar_share_skip1"], row["skipvar_share_uncond2"], row["skipvar_share_dense"]) == \
        (pytest.approx(1 / 3, abs=1e-3),) * 3
    assert row["skipvar_rule"] == "threshold" and 0 < row["macs_saved_fraction"] < 1


# ---------------------------------------------------------------------------------------------- KV-cache bytes
def test_kv_cache_bytes_are_each_images_cache_after_its_last_scale(tiny):
    """A batch of skip-1, CFG-free-2 and dense images (the threshold rule at the tertiles): per image, the K/V bytes
    its rows hold after the last scale it ran, read off the cache tensors, average to kv_cache_bytes."""
    from bench.analytic import dense_kv_cache_bytes
    probe = create_method("skipvar", rule="threshold", skip_below=0.0, uncond_below=0.0).build(tiny)
    generate(probe, tiny.vqvae, LABELS, 4, SAMPLING, decode=False)
    s = sorted(f[2] for f in probe.policy.features)
    m = create_method("skipvar", rule="threshold", skip_below=(s[1] + s[2]) / 2, uncond_below=(s[3] + s[4]) / 2)
    net = m.build(tiny)
    held = []                                          # after each scale run: {cache row (image, or B + image): bytes}
    run = net.var.scale_forward

    def spy(si, x, lab, caches):
        out = run(si, x, lab, caches)
        held.append({r: sum(t[p].numel() * t.element_size() for c in caches for t in (c.k, c.v))
                     for p, r in enumerate(net._cache_rows)})
        return out
    net.var.scale_forward = spy
    reset(net)
    generate(net, tiny.vqvae, LABELS, 4, SAMPLING, decode=False)
    B = len(LABELS)
    per_image = []
    for i in range(B):
        last = max(k for k, h in enumerate(held) if i in h)      # the last scale image i ran
        per_image.append(held[last][i] + held[last].get(B + i, 0))
    assert sorted(set(net.plans)) == [(6, 7), (7, 5), (7, 7)]      # the three outcomes, two images each
    assert sum(per_image) / B == m.kv_cache_bytes(net, tiny) < dense_kv_cache_bytes(tiny.var.cfg)
    L = [1 + 4 + 9 + 16 + 25 + 36, 155]                             # keys after scale 5 / 6
    assert m.kv_cache_bytes(net, tiny) == pytest.approx(2 * 2 * 32 * 4 * (2 * L[0] + L[1] + 2 * L[1]) / 3)


# ---------------------------------------------------------------------------------------------- bad parameters
def test_bad_parameters(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    with pytest.raises(BenchError, match=r"skip_below is a parameter of rule=threshold, not of rule=release .*"
                                         r"valid: rule=threshold"):
        create_method("skipvar", skip_below=0.2)
    with pytest.raises(BenchError, match=r"rule='fast' is not allowed; valid: one of release, threshold"):
        create_method("skipvar", rule="fast")
    with pytest.raises(BenchError, match=r"max_last=4 is out of range; valid: int in \[0, 3\]"):
        create_method("skipvar", max_last=4)
    with pytest.raises(BenchError, match=r"ssim_target=0.0 is out of range; valid: float in \(0.0, 1.0\]"):
        create_method("skipvar", ssim_target=0.0)
    with pytest.raises(BenchError, match=r"decision_scale=4 leaves 2 scale\(s\) after it, fewer than max_last=3 act "
                                         r"on; valid: decision_scale 1..3 with these"):
        create_method("skipvar", decision_scale=4).check_model(tiny)
    with pytest.raises(BenchError, match=r"uncond_below=0.01 is below skip_below=0.052"):
        create_method("skipvar", rule="threshold", uncond_below=0.01)
    with pytest.raises(BenchError, match=r"skip=6 is out of range for a model with 7 scales .*; valid: 1..5"):
        create_method("skipvar", rule="threshold", skip=6).check_model(tiny)
    with pytest.raises(BenchError, match=r"measure='fft' is not allowed; valid: one of diff, ratio"):
        create_method("skipvar", rule="threshold", measure="fft")
    with pytest.raises(BenchError, match=r"--data is not used"):
        SkipVAR.prepare(tiny, RECIPE.values(), None, data="shapes")
    with pytest.raises(BenchError, match=r"max_last=0 is the dense model.*valid: --max-last 1..3"):
        SkipVAR.prepare(tiny, RECIPE.values(max_last=0), None)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv,needle", [
    (["run", "--method", "skipvar", "--set", "skip_below=0.2"], "skip_below is a parameter of rule=threshold"),
    (["run", "--method", "skipvar", "--set", "max_last=5"], "max_last=5 is out of range; valid: int in [0, 3]"),
    (["prepare", "skipvar", "--ssim-target", "1.5"], "--ssim-target must be in (0, 1]"),
])
def test_cli_bad_parameter_is_one_line_exit_2(argv, needle, tmp_path):
    from tests.conftest import run_cli
    res = tmp_path / "results"
    extra = ["--samples", "4", "--results", res, "--cache-dir", tmp_path / "cache"] if argv[0] == "run" else []
    r = run_cli(*argv, "--model", "tiny", *extra, env={"VARBENCH_CACHE": str(tmp_path / "cache")})
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not res.exists() and not (tmp_path / "cache").exists()
