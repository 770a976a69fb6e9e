"""DMoE-VAR (methods/dmoe.py, methods/_moe.py): exact expert reconstruction, τ=1 == the fine-tuned dense model,
balanced k-means, router training, FLOP accounting (analytic and fvcore), dense_weights, stats, bad inputs."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from bench.analytic import dense_scale_macs
from bench.errors import BenchError
from bench.registry import create_method
from bench.sampling import generate
from bench.artifacts import read_meta
from methods import _moe, _moe_artifacts, _moe_recipe
from methods._moe import ExpertFFN, Router, SwitchNet, run_experts
from methods._moe_recipe import balanced_kmeans
from methods.dmoe import write_experts, write_finetune
from tests.conftest import run_cli

FT_STEPS, ROUTER_STEPS, EXPERT_SIZE = 3, 40, 8     # tiny: FFN 128 -> 16 experts
RECIPE = dict(batch=4, lr=1e-3, images=8, eval_images=4, data="shapes")


def sharp_tiny():
    """The tiny model with a 30x head: peaked logits, so that a wrong FFN output changes sampled tokens."""
    from bench.zoo import tiny_bundle
    b = tiny_bundle()
    with torch.no_grad():
        b.var.head.weight.mul_(30)
    return dataclasses.replace(b, model_id="tiny-sharp-test")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny bundle with dmoe artifacts (3 fine-tune steps, 40 router steps) in a private cache."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VARBENCH_CACHE", cache)
        b = sharp_tiny()
        ft_key = dmoe().finetune_key()
        ft_dir = write_finetune(b, ft_key, RECIPE, None, False)
        ft_var = _moe_artifacts.load_finetuned_var(b, ft_dir)
        write_experts(b, ft_var, dmoe().experts_key(), EXPERT_SIZE, ROUTER_STEPS,
                      0, "shapes", None, False, router_images=8)
        yield b, cache


@pytest.fixture
def cache_env(prepared, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", prepared[1])
    return prepared[0]


def dmoe(**kw):
    cfg = dict(expert_size=EXPERT_SIZE, finetune_steps=FT_STEPS, router_steps=ROUTER_STEPS)
    cfg.update(kw)
    return create_method("dmoe", **cfg)


def random_ffn(C=16, H=64, dtype=torch.float32, seed=0):
    from bench.models.var import FFN
    torch.manual_seed(seed)
    ffn = FFN(C, H, act="relu").to(dtype)
    labels = torch.from_numpy(np.random.default_rng(seed).permutation(np.arange(H) % (H // 8))).long()
    return ffn, labels


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_all_experts_reconstruct_the_ffn_output(dtype, atol):
    ffn, labels = random_ffn(dtype=dtype)
    x = torch.randn(3, 25, 16, dtype=dtype)
    router = Router(16, 8).to(dtype)
    moe = ExpertFFN(ffn, labels, router, {4: 1.0})
    dense = ffn(x)
    out = moe(x, 4)                      # τ=1: every expert runs, grouped and scatter-added
    assert moe.stats[4]["pairs"] == 3 * 25 * 8
    assert (out - dense).abs().max().item() <= atol
    assert torch.equal(moe(x, 3), dense)  # not a MoE scale: the very same FFN
    assert torch.equal(moe(x, None), dense)
    # a partial selection equals the FFN restricted to the selected experts' neurons
    mask = torch.rand(75, 8) < 0.4
    part = run_experts(x.reshape(-1, 16), mask, moe.w1, moe.b1, moe.w2)
    h = torch.relu(ffn.fc1(x.reshape(-1, 16))) * mask[:, labels].to(dtype)
    assert (part - h @ ffn.fc2.weight.t()).abs().max().item() <= 10 * atol


def test_tau_one_gives_the_finetuned_dense_tokens(cache_env):
    b = cache_env
    m = dmoe(tau=1.0)
    net = m.build(b)
    ft = _moe_artifacts.load_finetuned_var(b, net.dmoe_info["finetune"])
    labels = torch.tensor([0, 3, 7, 9])
    dense, moe = generate(ft, b.vqvae, labels, 5, b.sampling), generate(net, b.vqvae, labels, 5, b.sampling)
    assert all(torch.equal(a, c) for a, c in zip(dense.tokens, moe.tokens))
    # and the logits of the last scale agree tightly for the same inputs (not merely the sampled tokens)
    c1, c2 = ft.new_caches(), net.new_caches()
    x_in = None
    lab2 = torch.cat((labels, torch.full_like(labels, 10)))
    quant = b.vqvae.quantize
    f_hat = torch.zeros(4, quant.Cvae, 8, 8)
    for si, pn in enumerate(b.var.patch_nums):
        l1, l2 = ft.scale_forward(si, x_in, lab2, c1), net.scale_forward(si, x_in, lab2, c2)
        assert torch.allclose(l1, l2, atol=1e-4, rtol=1e-5), si
        h = quant.embedding(dense.tokens[si]).transpose(1, 2).reshape(4, quant.Cvae, pn, pn)
        f_hat, nxt = quant.next_input(si, f_hat, h)
        x_in = nxt.view(4, quant.Cvae, -1).transpose(1, 2)
    # sensitivity: with τ=0 (top expert only) the MoE scales' tokens change
    sparse = generate(dmoe(tau=0.0).build(b), b.vqvae, labels, 5, b.sampling)
    assert all(torch.equal(a, c) for a, c in zip(dense.tokens[:4], sparse.tokens[:4]))
    assert not all(torch.equal(a, c) for a, c in zip(dense.tokens[4:], sparse.tokens[4:]))


# ---------------------------------------------------------------------------------------------- preparation
def test_balanced_kmeans_equal_sizes_and_reproducible():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 3
    X = np.concatenate([centers[i % 4] + rng.normal(size=6) * 0.3 for i in range(60)]).reshape(60, 6)
    X = np.concatenate([X, rng.normal(size=(4, 6))])           # 64 points, unequal natural clusters
    labels, info = balanced_kmeans(X, 8, seed=3)
    assert np.bincount(labels, minlength=8).tolist() == [8] * 8
    again, _ = balanced_kmeans(X, 8, seed=3)
    assert np.array_equal(labels, again)
    # far better than an arbitrary balanced split
    arbitrary = rng.permutation(np.arange(64) % 8)
    cost = lambda lab: sum(((X[lab == j] - X[lab == j].mean(0)) ** 2).sum() for j in range(8))
    assert cost(labels) < 0.5 * cost(arbitrary)
    with pytest.raises(BenchError):
        balanced_kmeans(X, 7)


def test_kmeans_distances_in_row_blocks_equal_all_at_once():
    """The balanced k-means' distances are computed in row blocks (bounded memory at d16 sizes), bitwise equal to
    the all-at-once difference."""
    from methods._moe_recipe import _squared_distances
    rng = np.random.default_rng(1)
    X, c = rng.normal(size=(37, 5)), rng.normal(size=(4, 5))
    whole = ((X[:, None, :] - c[None]) ** 2).sum(-1)
    for budget in (1, 8 * 5 * 4 * 3, 1 << 26):        # one row, three rows, all rows per block
        assert np.array_equal(_squared_distances(X, c, budget), whole)


def test_router_training_lowers_its_loss(cache_env):
    b = cache_env
    ft = _moe_artifacts.load_finetuned_var(b, _find("dmoe-finetune", b))
    toks, labels = _moe.token_data(b, 8)
    lab = [torch.from_numpy(np.arange(128) % 16) for _ in ft.blocks]
    xs, ys = _moe_recipe.collect_router_data(ft, b.vqvae, toks, labels, lab, 100000, 0.1, 0)
    assert xs[0].shape == (16 * ft.L, 32) and ys[0].shape == (16 * ft.L, 16)
    # targets are the true expert output norms
    blk = ft.blocks[1]
    h = torch.relu(blk.ffn.fc1(xs[1][:50]))
    want = torch.stack([(h[:, lab[1] == e] @ blk.ffn.fc2.weight[:, lab[1] == e].t()).norm(dim=-1)
                        for e in range(16)], 1)
    assert torch.allclose(ys[1][:50], want, atol=1e-5)
    routers, meta = _moe_recipe.train_routers(xs, ys, steps=150, batch=256, lr=3e-3, seed=0, progress=False)
    for layer in meta["layers"]:
        assert layer["val_mse_after"] < 0.5 * layer["val_mse_before"]


def _find(kind, b):
    from bench.artifacts import find_artifact
    key = dict(recipe=1, hoyer_weight=1e-4, steps=FT_STEPS, seed=0)          # the keys written out in full
    return find_artifact(kind, b.model_id, key if kind == "dmoe-finetune" else dict(
        finetune=key, expert_size=EXPERT_SIZE, router_steps=ROUTER_STEPS, seed=0, router_width=128))


def test_prepared_artifacts_record_what_made_them(cache_env):
    meta = read_meta(_find("dmoe-finetune", cache_env))
    for k in ("original_gelu", "relu_zero_shot", "finetuned"):
        assert {"ce", "hoyer", "zero_fraction", "zero_fraction_per_scale"} <= set(meta[k])
    assert meta["original_gelu"]["zero_fraction"] == 0.0 and meta["finetuned"]["zero_fraction"] > 0.2
    assert meta["key"]["steps"] == FT_STEPS and meta["recipe"]["batch"] == 4 and meta["weights_dtype"] == "float16"
    ex = read_meta(_find("dmoe-experts", cache_env))
    assert ex["num_experts"] == 16 and ex["router"]["val_mse_after"] < ex["router"]["val_mse_before"]


# ---------------------------------------------------------------------------------------------- FLOPs
class ConstantRouter(Router):
    """A real Router (same MACs) whose output is fixed: a known selection."""

    def __init__(self, C, scores):
        super().__init__(C, len(scores))
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor(scores))


def test_flop_accounting_on_a_known_selection(cache_env):
    b = cache_env
    m = dmoe(tau=[1.0, 0.6, 0.95])
    net = m.build(b)
    scores = [0.1] * 16
    scores[3], scores[7], scores[11] = 1.0, 0.5, 0.45          # τ=0.6: {3, 7, 11}; τ=0.95: all 16; τ=1: all
    for blk in net.blocks:
        blk.ffn.router = ConstantRouter(32, scores)
    B = 3
    generate(net, b.vqvae, torch.arange(B), 0, b.sampling)
    got = m.analytic_macs(net, b, B)
    C, e, d, E = 32, EXPERT_SIZE, 2, 16
    router = C * 128 + 128 * E
    active = {4: 16, 5: 3, 6: 16}
    for si, sm in enumerate(dense_scale_macs(b.var.cfg, B)):
        want = sm.total
        if si in active:
            tokens = 2 * B * b.var.patch_nums[si] ** 2
            want = sm.total - sm.ffn + d * tokens * (active[si] * 2 * C * e + router)
        assert got[si] == pytest.approx(want, rel=1e-12), si
    row = m.row_metrics(net, b)
    assert row["active_experts_per_scale"] == [None] * 4 + [16.0, 3.0, 16.0]


def test_fvcore_counts_the_same_matmuls():
    from fvcore.nn import FlopCountAnalysis
    ffn, labels = random_ffn(C=16, H=64)
    x = torch.randn(2, 36, 16)
    from tests.test_experts import AtScale   # the MoE layer as a module fvcore can trace at scale 5
    for oracle in (False, True):
        moe = ExpertFFN(ffn, labels, Router(16, 8), {5: 0.5}, oracle=oracle)
        with torch.no_grad():
            mask = moe.select(x.reshape(-1, 16), 0.5)
        pairs = int(mask.sum())
        assert 72 <= pairs < 72 * 8
        fa = FlopCountAnalysis(AtScale(moe), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        router = 0 if oracle else 72 * (16 * 128 + 128 * 8)
        assert fa.total() == pairs * 2 * 16 * 8 + router
        moe.reset_stats()
        moe(x, 5)
        assert moe.macs_per_token(5) * 72 == fa.total()
        ops = fa.unsupported_ops()
        assert "aten::index_select" in ops and "aten::index_add_" in ops
        assert ("varbench::oracle_expert_norms" in ops) == oracle


def test_fvcore_whole_scale_matches_analytic_difference(cache_env):
    """fvcore on a full MoE scale minus fvcore on the fine-tuned dense scale == the analytic FFN difference."""
    import copy
    from fvcore.nn import FlopCountAnalysis
    b = cache_env
    m = dmoe(tau=0.5)
    net = m.build(b)
    ft = _moe_artifacts.load_finetuned_var(b, net.dmoe_info["finetune"])
    labels = torch.tensor([1, 2])
    gen = generate(ft, b.vqvae, labels, 0, b.sampling, decode=False)
    lab2 = torch.cat((labels, torch.full_like(labels, 10)))
    caches = ft.new_caches()
    quant, f_hat, x_in = b.vqvae.quantize, torch.zeros(2, 8, 8, 8), None
    with torch.no_grad():
        for si, pn in enumerate(b.var.patch_nums[:-1]):
            ft.scale_forward(si, x_in, lab2, caches)
            h = quant.embedding(gen.tokens[si]).transpose(1, 2).reshape(2, 8, pn, pn)
            f_hat, nxt = quant.next_input(si, f_hat, h)
            x_in = nxt.view(2, 8, -1).transpose(1, 2)
    S = len(b.var.patch_nums)

    class Last(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.scale_forward(S - 1, x, lab2, copy.deepcopy(caches))
    dense_count = FlopCountAnalysis(Last(ft), (x_in,)).unsupported_ops_warnings(False).total()
    for layer in m.moe_layers(net):
        layer.reset_stats()
    moe_count = FlopCountAnalysis(Last(net), (x_in,)).unsupported_ops_warnings(False).total()
    tokens = 2 * 2 * 64
    moe_ffn = sum(layer.macs_per_token(S - 1) for layer in m.moe_layers(net)) * tokens
    dense_ffn = 2 * tokens * 2 * 32 * 128
    assert moe_count - dense_count == pytest.approx(moe_ffn - dense_ffn, abs=0.5)


# ---------------------------------------------------------------------------------------------- options, stats
def test_dense_weights_original_runs_the_original_model_before_the_moe_scales(cache_env):
    b = cache_env
    m = dmoe(tau=0.7, moe_scales=[5, 6], dense_weights="original")
    net = m.build(b)
    assert isinstance(net, SwitchNet) and net.switch == 5
    labels = torch.tensor([4, 8])
    orig = generate(b.var, b.vqvae, labels, 11, b.sampling)
    ours = generate(net, b.vqvae, labels, 11, b.sampling)
    assert all(torch.equal(a, c) for a, c in zip(orig.tokens[:5], ours.tokens[:5]))
    fin = generate(dmoe(tau=0.7, moe_scales=[5, 6]).build(b), b.vqvae, labels, 11, b.sampling)
    assert not all(torch.equal(a, c) for a, c in zip(orig.tokens[:5], fin.tokens[:5]))
    assert m.config["dense_weights"] == "original" and "dense=original" in m.label


def test_stats_row_metrics_and_expert_maps(cache_env):
    b = cache_env
    m = dmoe(tau=[0.9, 0.5, 0.2])
    net = m.build(b)
    generate(net, b.vqvae, torch.arange(3), 0, b.sampling)
    row = m.row_metrics(net, b)
    act = row["active_experts_per_scale"]
    assert act[:4] == [None] * 4 and all(1 <= a <= 16 for a in act[4:])
    assert row["active_expert_fraction_per_scale"][6] == pytest.approx(act[6] / 16, abs=1e-4)
    maps = json.loads(row["expert_maps"])
    assert maps["samples"] == 3 and sorted(maps["maps"]) == ["4", "5", "6"]
    last = np.array(maps["maps"]["6"])
    assert last.shape == (3, 8, 8) and last.min() >= 1 and last.max() <= 16
    # the maps of the conditional rows are consistent with the per-scale means (which include the CFG rows)
    layers = m.moe_layers(net)
    assert all(layer.stats[6]["tokens"] == 2 * 3 * 64 for layer in layers)
    for layer in layers:
        layer.reset_stats()
    assert all(not layer.stats for layer in layers)
    with pytest.raises(BenchError, match="no recorded expert statistics"):
        m.analytic_macs(net, b, 3)


def test_oracle_selects_by_true_norms(cache_env):
    b = cache_env
    m = dmoe(tau=0.3, oracle=True)
    net = m.build(b)
    layer = m.moe_layers(net)[0]
    x = torch.randn(40, 32)
    norms = _moe.oracle_expert_norms(x, layer.w1, layer.b1, layer.w2, True)
    w1, w2 = layer.w1[2], layer.w2[2]       # expert 2 by hand
    assert torch.allclose(norms[:, 2], (torch.relu(x @ w1.t() + layer.b1[2]) @ w2.t()).norm(dim=-1), atol=1e-5)
    mask = layer.select(x, 0.3)
    assert torch.equal(mask, norms >= 0.7 * norms.amax(1, keepdim=True))
    generate(net, b.vqvae, torch.arange(2), 0, b.sampling)
    macs = m.analytic_macs(net, b, 2)
    st = layer.stats[6]
    assert st["pairs"] < st["tokens"] * 16 and macs[6] < dense_scale_macs(b.var.cfg, 2)[6].total


def test_experts_for_a_new_expert_size_are_made_and_cached_on_first_use(cache_env):
    b = cache_env
    from bench.artifacts import find_artifact
    m = dmoe(expert_size=32, router_steps=5)
    assert find_artifact("dmoe-experts", b.model_id, m.experts_key()) is None
    net = m.build(b)
    d = find_artifact("dmoe-experts", b.model_id, m.experts_key())
    assert d is not None and d.startswith(os.environ["VARBENCH_CACHE"])
    assert m.moe_layers(net)[0].num_experts == 4


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_clear_line(cache_env, tmp_path, monkeypatch):
    b = cache_env
    cases = [
        (dict(tau=1.5), "tau=1.5 is out of range; valid: float in [0.0, 1.0]"),
        (dict(tau=-0.1), "out of range"),
        (dict(tau=[0.5, 0.6], moe_scales=[4, 5, 6]), "tau has 2 values but moe_scales has 3"),
        (dict(moe_scales=[5, 5]), "lists a scale twice"),
        (dict(dense_weights="gelu"), "valid: one of finetuned, original"),
    ]
    for kw, msg in cases:
        with pytest.raises(BenchError, match=msg.replace("[", r"\[").replace("(", r"\(")):
            dmoe(**kw)
    model_cases = [
        (dict(tau=[0.5, 0.6]), "tau has 2 values but there are 3 MoE scales"),
        (dict(moe_scales=[4, 9]), "moe_scales index 9 out of range; valid: 0..6"),
        (dict(expert_size=48), "expert_size=48 does not divide the FFN width 128; valid: 1, 2, 4, 8, 16, 32, 64, 128"),
        (dict(hoyer_weight=0.5), "run `python -m bench prepare dmoe --model tiny --hoyer-weight 0.5"),
    ]
    for kw, msg in model_cases:
        with pytest.raises(BenchError) as e:
            dmoe(**kw).check_model(b)
        assert msg in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BenchError, match="no prepared dmoe-finetune artifact"):
        dmoe().build(b)
    assert not (tmp_path / "empty").exists()


def cli(capsys, *args):
    """The CLI in-process (no interpreter start): exit status and stderr."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def test_prepare_cli(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VARBENCH_CACHE", str(cache))
    code, err = cli(capsys, "prepare", "nosuch")
    assert code == 2 and "unknown method 'nosuch'; valid: " in err and "dmoe" in err
    code, err = cli(capsys, "prepare", "dense")
    assert code == 2 and "needs no preparation" in err
    code, err = cli(capsys, "prepare", "dmoe", "--model", "tiny", "--expert-size", "48")
    assert code == 2 and err.count("\n") == 1 and "does not divide the FFN width 128" in err
    code, err = cli(capsys, "prepare", "dmoe", "--model", "tiny", "--steps", "-1")
    assert code == 2 and "--steps must be >= 0" in err
    assert not cache.exists()
    args = ("prepare", "dmoe", "--model", "tiny", "--steps", "2", "--batch", "2", "--images", "4", "--eval-images",
            "2", "--router-images", "4", "--router-steps", "5", "--expert-size", "16,32")
    r = run_cli(*args, env={"VARBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"})   # end to end, a real process
    assert r.returncode == 0, r.stderr
    dirs = r.stdout.strip().splitlines()[:-1]
    assert len(dirs) == 3 and all(os.path.isfile(os.path.join(d, "DONE")) for d in dirs)
    meta = json.load(open(os.path.join(dirs[0], "meta.json")))
    assert meta["command"].startswith("python -m bench prepare dmoe --model tiny") and "finetuned" in meta
    code, err = cli(capsys, *args)            # the second run reuses everything
    assert code == 0 and err.count("reusing") == 3
    code, err = cli(capsys, *args[:-1], "16", "--lr", "0.1")
    assert code == 2 and "pass --force" in err
    over = list(args)
    over[over.index("--router-images") + 1] = "8"       # the experts' recorded router data, not in their key
    code, err = cli(capsys, *over)
    last = err.strip().splitlines()[-1]                  # after the log line reusing the fine-tune
    assert code == 2 and "'router_images': 4" in last and "pass --force" in last
    assert sorted(os.listdir(cache / "artifacts")) == sorted(os.path.basename(d) for d in dirs)
