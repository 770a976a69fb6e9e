"""ActVAR (methods/actvar.py, methods/_tokens.py) on the tiny model: gating semantics, equivalence at rate 1,
FLOP accounting against a hand count and torch's FlopCounterMode, stage-1 learning, artifacts, bad input."""
import argparse
import functools
import json
import math
import os
import tempfile

import pytest
import torch

from bench.errors import BenchError
from bench.models.var import KVCache
from bench.registry import create_method
from bench.sampling import SamplingConfig, generate

SAMPLING = SamplingConfig(cfg=1.5, top_k=0, top_p=0.0)
TINY_STEPS = dict(steps1=6, steps2=3)          # artifact identity of the tiny test artifacts


# ------------------------------------------------------------------------------------------------ shared helpers
@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and far faster on a busy 2-core machine (no spin contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reset(net):
    for m in net.modules():
        if hasattr(m, "reset_stats"):
            m.reset_stats()


def counted_generate(net, vqvae, labels, seed=0, path="grouped"):
    """Generate with FlopCounterMode around every scale: (Generation, MACs per scale = FLOPs / 2). The counter
    sees what ran; expert layers run on `path` (grouped: exactly the routed pairs, what analytic_macs counts)."""
    from bench.flops import torch_flop_counter
    from methods import _experts
    reset(net)
    per = []

    def fn(si, x_in, lab, caches):
        with torch_flop_counter() as fc:
            out = net.scale_forward(si, x_in, lab, caches)
        per.append(fc.get_total_flops() / 2)
        return out
    with _experts.forced(path):
        return generate(net, vqvae, labels, seed, SAMPLING, decode=False, scale_fn=fn), per


def prepare_args(method: str, *argv):
    """The recipe values `prepare` would pass to the method's hook for these flags."""
    from bench.commands.prepare import method_parser
    from bench.registry import method_class
    cls = method_class(method)
    return cls.recipe.from_args(method_parser(method, cls, argparse.ArgumentParser).parse_args(list(argv)), cls)


@functools.lru_cache(maxsize=None)
def _cache_root() -> str:
    import atexit
    import shutil
    root = tempfile.mkdtemp(prefix="actvar-test-cache-")
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(maxsize=None)
def tiny_artifact(name: str) -> str:
    """Prepare (once per session, seconds) the tiny model's artifact of actvar / actvar-tokens / actvar-experts
    under a shared cache root, which tests point VARBENCH_CACHE at."""
    from bench.registry import method_class
    from bench.zoo import tiny_bundle
    root = _cache_root()
    old = os.environ.get("VARBENCH_CACHE")
    os.environ["VARBENCH_CACHE"] = root
    try:
        args = prepare_args(name, "--steps1", str(TINY_STEPS["steps1"]), "--steps2", str(TINY_STEPS["steps2"]),
                            "--images", "12", "--eval-images", "6", "--batch", "4")
        method_class(name).prepare(tiny_bundle(), args, None)
    finally:
        if old is None:
            os.environ.pop("VARBENCH_CACHE", None)
        else:
            os.environ["VARBENCH_CACHE"] = old
    return root


def use_artifacts(monkeypatch, *names) -> str:
    for n in names:
        tiny_artifact(n)
    monkeypatch.setenv("VARBENCH_CACHE", _cache_root())
    return _cache_root()


def fresh(tiny, parts, kept_t, kept_w, experts=16, seed=0):
    """An ActVAR net on the tiny model with untrained (seeded) gates."""
    from methods import _actvar_net as A
    var = tiny.var
    routers, selectors = A.new_gates(var.C, var.blocks[0].ffn.fc1.out_features, len(var.blocks), parts, experts,
                                     seed, "cpu")
    return A.attach(var, parts, routers, selectors, kept_w, kept_t).eval()


def hand_count(cfg, batch, kept_t, kept_w, experts, selector=True, router=True):
    """Per-scale MACs written out from the model's shapes and the kept counts (not from recorded statistics)."""
    C, d, V, H = cfg.embed_dim, cfg.depth, cfg.vocab_size, round(cfg.embed_dim * cfg.mlp_ratio)
    e = H // experts
    rows, keys, out = 2 * batch, 0, []
    for si, p in enumerate(cfg.patch_nums):
        n = p * p
        k = kept_t.get(si, n)
        keys += k                                            # every block appends only its kept tokens
        ffn = k * (kept_w[si] * 2 * C * e + (C * experts if router else 0)) if si in kept_w else k * 2 * C * H
        sel = n * C if (si in kept_t and selector) else 0
        block = k * 4 * C * C + 2 * k * keys * C + ffn + sel
        head = n * C * V
        adaln = (6 * d + 2) * C * C
        word = n * cfg.Cvae * C / 2 if si > 0 else 0         # embedded once per image, repeated for CFG
        out.append(rows * (d * block + head + adaln + word))
    return out


# ------------------------------------------------------------------------------------------------ semantics
def test_unselected_tokens_leave_block_bitwise_unchanged(tiny):
    from methods._tokens import LearnedGate, TokenGatedBlock
    torch.manual_seed(0)
    var = tiny.var
    blk = var.blocks[1]
    sel = torch.nn.Linear(var.C, 1)
    wrapper = TokenGatedBlock(blk, 1, LearnedGate(sel, {6: 20}))
    cond = var.class_emb(torch.tensor([1, 2, 10]))
    prior_k, prior_v = torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16)
    x = torch.randn(3, 64, var.C)
    cache = KVCache()
    cache.k, cache.v = prior_k, prior_v
    with torch.no_grad():
        out = wrapper(x, cond, None, cache, 6)
    idx = wrapper.last_idx[6]
    assert idx.shape == (3, 20)
    kept = torch.zeros(3, 64, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(out[~kept], x[~kept])                 # eq. 9: copies, bit for bit
    assert not torch.allclose(out[kept], x[kept])            # the kept ones were updated
    assert cache.k.shape[2] == 5 + 20                        # only kept tokens' keys were appended
    # the kept tokens are exactly the block run on the kept subset alone (with the same earlier cache)
    ref_cache = KVCache()
    ref_cache.k, ref_cache.v = prior_k, prior_v
    sub = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, var.C))
    with torch.no_grad():
        ref = blk(sub, cond, None, ref_cache, 6)
    assert torch.allclose(out.gather(1, idx.unsqueeze(-1).expand(-1, -1, var.C)), ref, atol=1e-6)
    # scales without a gate, and the teacher-forced masked pass, run the block unchanged
    with torch.no_grad():
        assert torch.equal(wrapper(x, cond, None, KVCache(), 5), blk(x, cond, None, KVCache(), 5))


def test_rate_one_equals_dense(tiny):
    labels = torch.tensor([0, 3, 7, 9])
    dense = generate(tiny.var, tiny.vqvae, labels, 11, SAMPLING, decode=False)
    all_t = {5: 36, 6: 64}
    for parts, kw in (("both", {5: 16, 6: 16}), ("tokens", {}), ("experts", {5: 16, 6: 16})):
        net = fresh(tiny, parts, all_t if parts != "experts" else {}, kw)
        g = generate(net, tiny.vqvae, labels, 11, SAMPLING, decode=False)
        assert all(torch.equal(a, b) for a, b in zip(dense.tokens, g.tokens)), parts
        lab, x = torch.tensor([1, 10]), torch.randn(2, tiny.var.L - 1, tiny.var.Cvae)
        with torch.no_grad():
            ref, got = tiny.var.forward_by_scale(lab, x), net.forward_by_scale(lab, x)
        assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5), parts
        if parts == "tokens":                                # no expert sum reordering: bit for bit
            assert torch.equal(ref, got)


def test_expert_ffn_paths_agree(tiny):
    """Grouped sparse execution (inference), masked dense execution (training) and, with every expert, the FFN."""
    from methods.actvar import ActExpertFFN
    torch.manual_seed(1)
    ffn = tiny.var.blocks[0].ffn
    x = torch.randn(3, 10, tiny.var.C)
    for k in (16, 5):
        layer = ActExpertFFN(ffn, torch.nn.Linear(tiny.var.C, 16), {6: k})
        with torch.no_grad():
            sparse = layer(x, 6)
        masked = layer(x, 6).detach()                        # grad enabled: the training path
        assert torch.allclose(sparse, masked, atol=1e-6)
        if k == 16:
            assert torch.allclose(sparse, ffn(x), atol=1e-6)
        assert layer.stats[6]["pairs"] == 2 * 30 * k


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_match_hand_count_and_flop_counter(tiny):
    from methods.actvar import ActVAR
    kt, kw = {5: 27, 6: 48}, {5: 12, 6: 12}
    net = fresh(tiny, "both", kt, kw)
    from bench.analytic import counting_executed
    from bench.measure import expert_paths
    _, counted = counted_generate(net, tiny.vqvae, torch.tensor([2, 5]), path="auto")
    analytic = ActVAR().analytic_macs(net, tiny, batch=2)
    assert json.loads(expert_paths(net))["calls"].get("masked-dense")     # the cost model's choice at these shapes
    with counting_executed():       # torch's counter sees what ran (masked-dense calls: every expert)
        executed = ActVAR().analytic_macs(net, tiny, batch=2)
    hand = hand_count(tiny.var.cfg, 2, kt, kw, 16)
    for si in range(7):
        assert analytic[si] == pytest.approx(hand[si], rel=1e-12), si
        assert executed[si] == pytest.approx(counted[si], rel=1e-12), si
    # fvcore, as the measurement path runs it (bench/flops.py traces each real generation step), agrees too
    from bench.flops import count_generation
    reset(net)
    mc = count_generation(net, tiny.vqvae, torch.tensor([2, 5]), 0, SAMPLING)
    assert mc.per_scale == pytest.approx(ActVAR().analytic_macs(net, tiny, batch=2), rel=1e-12)
    assert "aten::bincount" not in mc.dynamic                  # statistics bookkeeping is not traced
    # the dense scales before the first sparse one are untouched; the sparse ones cost less
    from bench.analytic import dense_scale_macs
    dense = [s.total for s in dense_scale_macs(tiny.var.cfg, 2)]
    assert analytic[:5] == pytest.approx(dense[:5])
    assert analytic[5] < dense[5] and analytic[6] < dense[6]


# ------------------------------------------------------------------------------------------------ training
def test_stage1_lowers_distillation_losses(tiny):
    from methods import _actvar_train as T
    from methods import _moe
    from methods import _actvar_net as A
    toks, labels = _moe.token_data(tiny, 16, "train", "shapes")
    vtoks, vlabels = _moe.token_data(tiny, 8, "val", "shapes")
    var = tiny.var
    routers, selectors = A.new_gates(var.C, 128, 2, "both", 16, 0, "cpu")
    base = __import__("copy").deepcopy(var)
    net = A.attach(base, "both", routers, selectors, {5: 12, 6: 12}, {5: 27, 6: 48})
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    before = T.evaluate(net, var, tiny.vqvae, vtoks, vlabels)
    hist, _ = T.stage1(net, routers, selectors, 25, 2e-2, 8, 0, toks, labels, tiny.vqvae, 0.1)
    after = T.evaluate(net, var, tiny.vqvae, vtoks, vlabels)
    assert after["kl_w"] < before["kl_w"] and after["kl_t"] < before["kl_t"], (before, after)
    assert after["label_overlap_w"] > before["label_overlap_w"]
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters())   # everything else frozen
    assert hist and all(math.isfinite(h["loss"]) for h in hist)


def test_prepared_actvar_builds_generates_and_reports(tiny, monkeypatch):
    use_artifacts(monkeypatch, "actvar")
    from bench.analytic import dense_scale_macs
    m = create_method("actvar", **TINY_STEPS)
    net = m.build(tiny)
    d = net.actvar_info["artifact"]
    assert sorted(os.listdir(d)) == ["DONE", "gates.safetensors", "meta.json", "weights.safetensors"]
    from safetensors.torch import load_file
    w = load_file(os.path.join(d, "weights.safetensors"))
    assert all(v.dtype == torch.float16 for v in w.values()) and "head.weight" in w
    # stage 2 changed the weights of the net, never those of the loaded model
    ref = dict(tiny.var.named_parameters())
    assert torch.equal(ref["head.weight"], tiny_bundle_fresh().var.head.weight)
    assert not torch.equal(net.head.weight, ref["head.weight"])
    g, counted = counted_generate(net, tiny.vqvae, torch.tensor([1, 2, 3]))
    assert [t.shape[1] for t in g.tokens] == [p * p for p in tiny.var.patch_nums]
    macs = m.analytic_macs(net, tiny, 3)
    assert macs == pytest.approx(counted, rel=1e-12)
    row = m.row_metrics(net, tiny)
    assert row["kept_tokens_per_scale"][5:] == [27, 48] and row["kept_tokens_per_scale"][4] == 25
    assert row["token_rate_per_scale"] == [None] * 5 + [0.75, 0.75]
    assert row["active_experts_per_scale"][5:] == [12, 12] and row["weight_rate"] == 0.75
    dense = sum(s.total for s in dense_scale_macs(tiny.var.cfg, 1))
    assert row["macs_saved_fraction"] == pytest.approx(1 - sum(m.analytic_macs(net, tiny, 1)) / dense, abs=1e-6)
    assert 0 < row["macs_saved_fraction"] < 1 and row["eq12_flops_saved"] > 0
    assert row["eq12_saved_fraction"] == pytest.approx(row["eq12_flops_saved"] / (2 * dense), abs=1e-6)
    import json
    maps = json.loads(row["token_maps"])["maps"]
    assert set(maps) == {"5", "6"} and len(maps["6"]) == 3 and len(maps["6"][0]) == 8
    meta = json.load(open(os.path.join(d, "meta.json")))
    assert meta["key"]["weight_rate"] == [0.75, 0.75] and meta["recipe"]["lr2"] == 2e-4


def tiny_bundle_fresh():
    from bench.zoo import tiny_bundle
    return tiny_bundle()


def test_halves_run_and_rates_at_inference(tiny, monkeypatch):
    """Table 3: both halves and the full method run; lower rates at inference reuse the trained artifact."""
    use_artifacts(monkeypatch, "actvar", "actvar-tokens", "actvar-experts")
    runs = {}
    for name in ("actvar", "actvar-tokens", "actvar-experts"):
        m = create_method(name, **TINY_STEPS)
        net = m.build(tiny)
        reset(net)
        generate(net, tiny.vqvae, torch.tensor([4, 5]), 0, SAMPLING, decode=False)
        runs[name] = sum(m.analytic_macs(net, tiny, 2))
    assert runs["actvar"] < runs["actvar-tokens"] and runs["actvar"] < runs["actvar-experts"]
    m = create_method("actvar", token_rate=[0.5, 0.25], train_token_rate=0.75, weight_rate=0.5,
                      train_weight_rate=0.75, **TINY_STEPS)
    net = m.build(tiny)
    reset(net)
    generate(net, tiny.vqvae, torch.tensor([4, 5]), 0, SAMPLING, decode=False)
    row = m.row_metrics(net, tiny)
    assert row["kept_tokens_per_scale"][5:] == [18, 16] and row["active_experts_per_scale"][5:] == [8, 8]
    assert row["actvar_trained_token_rate"] == [0.75, 0.75]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_one_line(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    for cfg in (dict(token_rate=0), dict(token_rate=1.5), dict(weight_rate=-0.1), dict(experts=0),
                dict(scales=[5, 6], token_rate=[0.5, 0.5, 0.5]), dict(scales=[6, 6])):
        with pytest.raises(BenchError) as e:
            create_method("actvar", **cfg)
        assert "\n" not in str(e.value)
    with pytest.raises(BenchError, match="unknown parameter 'weight_rate'"):
        create_method("actvar-tokens", weight_rate=0.5)
    with pytest.raises(BenchError, match=r"experts=5 does not divide the FFN width 128; valid: 1, 2, 4"):
        create_method("actvar", experts=5).check_model(tiny)
    with pytest.raises(BenchError, match=r"scale index 7 out of range; valid: 0..6"):
        create_method("actvar", scales=[5, 7]).check_model(tiny)
    with pytest.raises(BenchError, match=r"run `python -m bench prepare actvar-tokens --model tiny --scales 5,6 "
                                         r"--token-rates 0.75,0.75"):
        create_method("actvar-tokens").build(tiny)
    assert not os.listdir(tmp_path)


def cli(capsys, *args):
    """The CLI in-process (no interpreter start): exit status, stdout, stderr."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_prepare_cli_bad_input_exit_2_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    for argv, msg in ((["--weight-rate", "0"], "--weight-rate must be in (0, 1] (one value or a comma-separated list), "
                                                "got 0"),
                      (["--token-rates", "0.5,0.5,0.5"], "token_rate has 3 values but scales has 2"),
                      (["--experts", "5"], "experts=5 does not divide the FFN width 128; valid: 1, 2, 4, 8"),
                      (["--scales", "9"], "scale index 9 out of range; valid: 0..6"),
                      (["--batch", "0"], "--batch must be >= 1")):
        if "--token-rates" in argv:
            argv = argv + ["--scales", "5,6"]
        code, _, err = cli(capsys, "prepare", "actvar", "--model", "tiny", *argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], err
    assert not os.listdir(tmp_path)


def test_prepare_cli_gates_only(tmp_path, monkeypatch, capsys, tiny):
    """`prepare actvar-tokens --steps2 0`: stage 1 only; the artifact has gates and no weights, and the method then
    runs the loaded model's own weights."""
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    code, out, err = cli(capsys, "prepare", "actvar-tokens", "--model", "tiny", "--token-rates", "0.5", "--steps1",
                         "3", "--steps2", "0", "--images", "8", "--eval-images", "4", "--batch", "4")
    assert code == 0, err
    d = out.splitlines()[0]
    assert d.startswith(str(tmp_path)) and "prepared actvar-tokens for tiny-s0-d2-c32" in out
    assert sorted(os.listdir(d)) == ["DONE", "gates.safetensors", "meta.json"]
    m = create_method("actvar-tokens", token_rate=0.5, steps1=3, steps2=0)
    net = m.build(tiny)
    assert net.head.weight is tiny.var.head.weight
    code, out, err = cli(capsys, "prepare", "actvar-tokens", "--model", "tiny", "--token-rates", "0.5", "--steps1",
                         "3", "--steps2", "0", "--images", "8", "--eval-images", "4", "--batch", "8")
    assert code == 2 and "pass --force to redo it" in err       # same key, another recipe: never silently reused
