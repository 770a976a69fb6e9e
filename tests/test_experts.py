"""Expert-FFN execution (methods/_experts.py): both paths equal the definition on random routings (empty experts,
one token, all experts, no tokens), at d16 shapes, deterministically; the path choice (forced, cost model,
calibration cache) and its record (stats, FLOPs that ran, the row's expert_paths); bench-moe end to end."""
import json
import os

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.sampling import generate
from methods import _experts
from methods._experts import GROUPED, MASKED
from tests.conftest import run_cli


def reference(x2, mask, w1, b1, w2, act):
    """The definition, in float64: Σ over selected experts e of fc2_e(act(fc1_e x)), expert by expert."""
    x, w1, b1, w2 = (t.double() for t in (x2, w1, b1, w2))
    out = torch.zeros_like(x)
    for j in range(w1.shape[0]):
        h = x @ w1[j].t() + b1[j]
        h = torch.relu(h) if act == "relu" else torch.nn.functional.gelu(h, approximate="tanh")
        out += mask[:, j:j + 1].double() * (h @ w2[j].t())
    return out


def weights(C, E, e, seed=0, layout="split"):
    """(w1, b1, w2) as DMoE's contiguous split (layout 'split') or as ActVAR's views of fc1/fc2 ('views')."""
    g = torch.Generator().manual_seed(seed)
    W1, B1, W2 = torch.randn(E * e, C, generator=g) / C ** .5, torch.randn(E * e, generator=g) * .1, \
        torch.randn(C, E * e, generator=g) / (E * e) ** .5
    w2 = W2.view(C, E, e).permute(1, 0, 2)
    return W1.view(E, e, C), B1.view(E, e), (w2.contiguous() if layout == "split" else w2)


def routing(kind, T, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(T, E, generator=g) < 0.4
    if kind == "empty-experts":                       # experts 0, 2 and the last get no token at all
        m = torch.rand(T, E, generator=g) < 0.5
        m[:, [0, 2, E - 1]] = False
        return m
    if kind == "all":
        return torch.ones(T, E, dtype=torch.bool)
    if kind == "top1":
        return torch.nn.functional.one_hot(torch.randint(0, E, (T,), generator=g), E).bool()
    raise ValueError(kind)


def rel_err(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


PATHS = {"grouped": lambda *a: _experts.grouped(*a),
         "grouped-bmm": lambda *a: _experts.grouped(*a, batched=True),
         "masked-dense": lambda *a: _experts.masked_dense(*a)}


@pytest.mark.parametrize("layout", ["split", "views"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("kind,T", [("random", 75), ("empty-experts", 40), ("all", 33), ("top1", 50),
                                    ("random", 1), ("all", 1), ("random", 0)])
def test_every_path_equals_the_definition(kind, T, act, layout):
    C, E, e = 32, 8, 16
    w1, b1, w2 = weights(C, E, e, layout=layout)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(3))
    mask = routing(kind, T, E)
    ref = reference(x, mask, w1, b1, w2, act)
    for name, fn in PATHS.items():
        out = fn(x, mask, w1, b1, w2, act)
        assert out.shape == (T, C) and out.dtype == x.dtype, name
        assert rel_err(out, ref) <= 1e-5, (name, rel_err(out, ref))
    for path in ("auto", GROUPED, MASKED):
        with _experts.forced(path):
            out, ran = _experts.execute(x, mask, w1, b1, w2, act)
        assert rel_err(out, ref) <= 1e-5, path
        assert ran.pairs == (int(mask.sum()) if ran.path == GROUPED else T * E)


@pytest.mark.parametrize("kind,T", [("random", 75), ("empty-experts", 40), ("all", 33), ("all", 1)])
def test_grouped_path_in_chunks_equals_the_definition(kind, T, monkeypatch):
    """Segments longer than CHUNK_ROWS run in several chunks (a partial last one included): the same sum."""
    monkeypatch.setattr(_experts, "CHUNK_ROWS", 7)
    monkeypatch.setattr(_experts, "LARGE_WIDTH", 0)
    C, E, e = 32, 8, 16
    w1, b1, w2 = weights(C, E, e)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(3))
    mask = routing(kind, T, E)
    assert kind == "empty-experts" or T == 1 or int(mask.sum(0).max()) > 2 * 7
    out = _experts.grouped(x, mask, w1, b1, w2, "relu")
    assert rel_err(out, reference(x, mask, w1, b1, w2, "relu")) <= 1e-5


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads and no minimum size, so the CPU grouped path splits experts across threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(_experts, "MIN_THREADED_MACS", 0)
    monkeypatch.setattr(_experts, "LARGE_WIDTH", 0)
    calls = []
    inner = _experts._segments_in_threads
    monkeypatch.setattr(_experts, "_segments_in_threads", lambda *a: calls.append(a[-1]) or inner(*a))
    yield calls
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind,T", [("random", 75), ("empty-experts", 40), ("all", 33), ("top1", 50)])
def test_grouped_path_across_threads_equals_the_definition(kind, T, two_threads):
    C, E, e = 32, 8, 16
    w1, b1, w2 = weights(C, E, e)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(3))
    mask = routing(kind, T, E)
    with torch.inference_mode():
        out = _experts.grouped(x, mask, w1, b1, w2, "relu")
        again = _experts.grouped(x, mask, w1, b1, w2, "relu")
    assert two_threads == [2, 2]                          # the experts were split across two threads
    assert rel_err(out, reference(x, mask, w1, b1, w2, "relu")) <= 1e-5
    assert torch.equal(out, again)                        # deterministic: groups summed in a fixed order
    assert torch.get_num_threads() == 2                   # restored after the call


def test_threads_take_the_callers_autocast_and_inference_mode(two_threads, monkeypatch):
    import threading
    seen = []
    inner = _experts._segments

    def spy(*a, **k):
        seen.append((threading.current_thread() is threading.main_thread(), torch.is_autocast_enabled("cpu"),
                     torch.get_autocast_dtype("cpu"), torch.is_inference_mode_enabled()))
        return inner(*a, **k)
    monkeypatch.setattr(_experts, "_segments", spy)
    C, E, e, T = 64, 8, 16, 60
    w1, b1, w2 = weights(C, E, e)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        _experts.grouped(x, mask=routing("random", T, E), w1=w1, b1=b1, w2=w2)
    assert two_threads == [2]
    assert sorted(s[0] for s in seen) == [False, True]            # one group on the caller, one on a worker
    assert all(s[1:] == (True, torch.bfloat16, True) for s in seen), seen


def test_threads_take_the_callers_no_grad(two_threads):
    """A module's weights require grad; under the caller's no_grad the workers must not record either."""
    C, E, e, T = 64, 8, 16, 60
    w1, b1, w2 = (t.requires_grad_() for t in weights(C, E, e))
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(3))
    mask = routing("random", T, E)
    with torch.no_grad():
        out = _experts.grouped(x, mask, w1, b1, w2)
    assert two_threads == [2] and not out.requires_grad
    assert rel_err(out, reference(x, mask, w1.detach(), b1.detach(), w2.detach(), "relu")) <= 1e-5


def test_d16_shapes_and_determinism():
    """C = 1024, FFN 4096, expert size 128 (32 experts), 24 tokens: both paths within 1e-5 of the definition;
    the grouped path gives bitwise the same output on a repeat."""
    C, E, e, T = 1024, 32, 128, 24
    w1, b1, w2 = weights(C, E, e, seed=1)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(2))
    mask = routing("random", T, E, seed=4)
    ref = reference(x, mask, w1, b1, w2, "relu")
    for name, fn in PATHS.items():
        assert rel_err(fn(x, mask, w1, b1, w2, "relu"), ref) <= 1e-5, name
    a, b = _experts.grouped(x, mask, w1, b1, w2), _experts.grouped(x, mask, w1, b1, w2)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ the choice
def test_cost_model_fit_and_choice():
    true = _experts.CostModel(coef=(0.95, 30.0, 2e5, 3e6))
    rng = np.random.default_rng(0)
    points = []
    for T, C, e, E in [(288, 128, 32, 16), (512, 128, 128, 4), (1352, 1024, 128, 32), (2048, 1024, 256, 16),
                       (800, 512, 64, 32), (100, 64, 8, 16)]:
        for f in (0.25, 0.5, 0.75):
            P = int(T * round(f * E))
            points.append(dict(T=T, C=C, E=E, e=e, P=P, called=E,
                               ratio=true.ratio(T, C, E, e, P, E) * (1 + rng.normal() * 1e-4)))
    got = _experts.fit(points, "test")
    np.testing.assert_allclose(got.coef, true.coef, rtol=0.05)
    # many small experts, most of them active: masked-dense; few large experts, a quarter active: grouped
    assert got.choose(288, 128, 16, 32, 288 * 12, 16) == MASKED
    assert got.choose(2048, 1024, 16, 256, 2048 * 4, 16) == GROUPED
    builtin = _experts.CostModel(coef=_experts.BUILTIN)
    assert builtin.choose(2048, 1024, 32, 128, 2048 * 8, 32) == GROUPED


def test_calibration_is_cached_per_machine_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(_experts.ENV_COST, raising=False)
    dev = torch.device("cpu")
    assert _experts.cost_model(dev, torch.float32).source == "builtin"       # no calibration yet
    key = _experts.machine_key(dev, torch.float32)
    slow_grouped = [dict(T=64, C=32, E=8, e=16, P=64 * k, called=8, ratio=3.0 + k) for k in range(1, 8)]
    path, model = _experts.save_calibration(key, slow_grouped)
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "expert-cost")
    stored = json.load(open(path))
    assert stored["key"] == key and len(stored["points"]) == 7
    assert _experts.cost_model(dev, torch.float32).source == path           # the cached model is the one used
    w1, b1, w2 = weights(32, 8, 16)
    x, mask = torch.randn(64, 32), routing("random", 64, 8)
    with _experts.forced("auto"):
        out, ran = _experts.execute(x, mask, w1, b1, w2)
    assert ran.path == MASKED and ran.chooser == f"auto ({os.path.basename(path)})"
    # a second calibration merges: a point of the same configuration replaces the old one
    _experts.save_calibration(key, slow_grouped[:1] + [dict(slow_grouped[1], ratio=2.0)])
    assert len(json.load(open(path))["points"]) == 7
    # VARBENCH_EXPERT_COST forces a model: builtin, or a file
    monkeypatch.setenv(_experts.ENV_COST, "builtin")
    assert _experts.cost_model(dev, torch.float32).source == "builtin"
    monkeypatch.setenv(_experts.ENV_COST, path)
    assert _experts.cost_model(dev, torch.float32).source == path


def test_bad_settings_raise_one_line(monkeypatch, tmp_path):
    w1, b1, w2 = weights(8, 2, 4)
    x, mask = torch.randn(3, 8), routing("all", 3, 2)
    monkeypatch.setenv(_experts.ENV_PATH, "fast")
    with pytest.raises(BenchError, match="VARBENCH_EXPERT_PATH must be one of auto, grouped, masked-dense"):
        _experts.execute(x, mask, w1, b1, w2)
    monkeypatch.setenv(_experts.ENV_PATH, "auto")
    monkeypatch.setenv(_experts.ENV_COST, str(tmp_path / "missing.json"))
    with pytest.raises(BenchError, match="no such file"):
        _experts.execute(x, mask, w1, b1, w2)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(_experts.ENV_COST, str(bad))
    with pytest.raises(BenchError, match="unreadable"):
        _experts.execute(x, mask, w1, b1, w2)
    with pytest.raises(BenchError, match="forced path must be one of"):
        with _experts.forced("dense"):
            pass


# ------------------------------------------------------------------------------------------------ the record
class AtScale(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x, 5)


def test_dmoe_layer_records_the_path_and_counts_routed_and_executed_macs():
    """ExpertFFN: the same output on both paths; stats hold the path calls, the routed pairs and the pairs that ran.
    The MAC count is the routed work on either path (fvcore's trace runs the routed pairs whatever path is asked);
    inside counting_executed() masked-dense counts every expert's MACs."""
    from fvcore.nn import FlopCountAnalysis
    from bench.analytic import counting_executed
    from bench.models.var import FFN
    from methods._moe import ExpertFFN, Router
    torch.manual_seed(0)
    C, H, E = 16, 64, 8
    ffn = FFN(C, H, act="relu")
    labels = torch.from_numpy(np.random.default_rng(0).permutation(np.arange(H) % E)).long()
    moe = ExpertFFN(ffn, labels, Router(C, E), {5: 0.5})
    x = torch.randn(2, 36, C)
    outs, routed, executed = {}, {}, {}
    for path in (GROUPED, MASKED):
        moe.reset_stats()
        with _experts.forced(path), torch.no_grad():
            outs[path] = moe(x, 5)
            moe(x, 5)
        st = moe.stats[5]
        assert st["paths"] == {path: 2} and st["chooser"] == "forced"
        assert st["pairs_run"] == (st["pairs"] if path == GROUPED else 2 * 72 * E)
        routed[path] = moe.macs_per_token(5)
        with counting_executed():
            executed[path] = moe.macs_per_token(5)

        with _experts.forced(path):
            fa = FlopCountAnalysis(AtScale(moe), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            moe.reset_stats()
            total = fa.total()
        assert moe.stats[5]["paths"] == {GROUPED: 1}
        assert total == pytest.approx(moe.macs_per_token(5) * 72, rel=1e-12), path
    assert torch.allclose(outs[GROUPED], outs[MASKED], atol=1e-5)
    router = C * 128 + 128 * E
    assert routed[GROUPED] == routed[MASKED] == executed[GROUPED] < 2 * C * H + router
    assert executed[MASKED] == 2 * C * H + router                     # masked-dense saves no FLOPs


def test_actvar_net_records_paths_and_the_row_column(tiny):
    """ActExpertFFN through a whole generation: the row's expert_paths column sums every layer's calls; a dense
    net has none (null)."""
    from bench.analytic import counting_executed, dense_scale_macs
    from bench.measure import expert_paths, reset_stats
    from methods.actvar import expert_layers, expert_only_macs
    from tests.test_actvar import fresh
    net = fresh(tiny, "experts", {}, {5: 8, 6: 8})
    macs, routed = {}, {}
    for path in (GROUPED, MASKED):
        reset_stats(net)
        with _experts.forced(path):
            generate(net, tiny.vqvae, torch.tensor([1, 4]), 0, tiny.sampling)
        col = json.loads(expert_paths(net))
        calls = 2 * len(expert_layers(net))                            # two sparse scales per layer
        assert col == dict(calls={path: calls}, chooser="forced")
        with counting_executed():
            macs[path] = expert_only_macs(net, tiny, 2)
        routed[path] = expert_only_macs(net, tiny, 2)
    assert routed[MASKED] == routed[GROUPED] == macs[GROUPED]        # top-K: the same routed pairs on both paths
    dense = [s.total for s in dense_scale_macs(tiny.var.cfg, 2)]
    assert macs[GROUPED][6] < dense[6] < macs[MASKED][6]               # masked-dense ran the dense FFN + the router
    assert expert_paths(tiny.var) is None


def test_generation_reports_routed_and_executed_macs_and_keys_the_path(tiny):
    """A generation's record: macs_ratio is the routed work on either path; macs_executed_ratio is what ran (above
    it on masked-dense, equal on grouped); the generation key differs by path, so checkpoints never mix them."""
    from bench.measure import generate_and_time, generation_key
    from methods.actvar import expert_only_macs
    from tests.test_actvar import fresh

    class Stand:
        name, config = "actvar-experts-standin", {}

        def analytic_macs(self, net, bundle, batch):
            return expert_only_macs(net, bundle, batch)

        def row_metrics(self, net, bundle):
            return {}

        def kv_cache_bytes(self, net, bundle, elem_bytes):
            return None          # the Method protocol's KV hook; not what this test is about
    net = fresh(tiny, "experts", {}, {5: 8, 6: 8})
    labels, rec, keys = torch.tensor([1, 4, 2, 7]), {}, {}
    for path in (GROUPED, MASKED):
        with _experts.forced(path):
            gen, _, paired, _ = generate_and_time(Stand(), net, tiny, labels, 0, tiny.sampling, 2, 0, 0)
            keys[path] = generation_key(Stand(), net, tiny, tiny.sampling, 0, 4, 2, "cpu")
        rec[path] = (paired.macs_ratio, paired.macs_executed_ratio)
    assert rec[GROUPED][0] == rec[MASKED][0] == rec[GROUPED][1] < 1 < rec[MASKED][1]
    assert keys[GROUPED]["expert_execution"] == dict(path=GROUPED) != keys[MASKED]["expert_execution"]
    assert "expert_execution" not in generation_key(Stand(), tiny.var, tiny, tiny.sampling, 0, 4, 2, "cpu")


def test_rows_have_the_expert_paths_column():
    from bench.results import NULLABLE, SCHEMA
    assert SCHEMA["expert_paths"][0] == "json" and "expert_paths" in NULLABLE


# ------------------------------------------------------------------------------------------------ bench-moe
def test_bench_moe_prints_summaries_and_calibrates(tmp_path):
    out = tmp_path / "moe.json"
    env = dict(VARBENCH_CACHE=str(tmp_path / "cache"))
    r = run_cli("bench-moe", "--shapes", "32:128:3/4", "--expert-sizes", "16,32", "--fractions", "0.25,0.5",
                "--repeats", "2", "--warmup", "0", "--min-sample-ms", "0", "--threads", "1", "--json", out, env=env)
    assert r.returncode == 0, r.stderr
    for e in (16, 32):
        assert f"32:128:3/4 e={e}: mean ratio " in r.stdout and ", min " in r.stdout
    files = os.listdir(tmp_path / "cache" / "expert-cost")
    assert len(files) == 1 and files[0].startswith("cost-cpu-")
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2 * (2 + 2)
    for row in data["results"]:
        assert row["path"] in (GROUPED, MASKED)
        assert row["flops_run_saved"] == (row["flops_saved"] if row["path"] == GROUPED else 0.0)
    # --no-calibrate leaves the cache alone; bad input: one line, exit 2, nothing written
    before = (tmp_path / "cache" / "expert-cost" / files[0]).read_text()
    r = run_cli("bench-moe", "--shapes", "32:128:3", "--expert-sizes", "32", "--fractions", "0.5", "--repeats", "1",
                "--warmup", "0", "--min-sample-ms", "0", "--no-calibrate", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / "expert-cost" / files[0]).read_text() == before
    r = run_cli("bench-moe", "--shapes", "nope", "--json", tmp_path / "x.json", env=env)
    assert r.returncode == 2 and "unknown shape 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_paths_are_differentiable():
    """With autograd recording, both paths use allocating ops and give the definition's gradients."""
    w1, b1, w2 = (t.clone().requires_grad_(True) for t in weights(16, 4, 8, layout="split"))
    x, mask = torch.randn(20, 16), routing("random", 20, 4)
    grads = []
    for fn in (_experts.grouped, _experts.masked_dense, lambda *a: reference(*a, "relu")):
        w1.grad = None
        fn(x, mask, w1, b1, w2).sum().backward()
        grads.append(w1.grad.clone().double())
    assert torch.allclose(grads[0], grads[2], atol=1e-5) and torch.allclose(grads[1], grads[2], atol=1e-5)


def test_default_path_is_the_per_call_choice_and_keys_generation(monkeypatch, tmp_path):
    """auto unless asked otherwise; the generation key (checkpoints, workers) carries the path and the cost model,
    so batches generated on other paths are never mixed in."""
    from methods import _experts
    monkeypatch.delenv(_experts.ENV_PATH, raising=False)
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    assert _experts.requested_path() == "auto"
    cpu = torch.device("cpu")
    assert _experts.execution_key(cpu, torch.float32) == dict(path="auto", coef=list(_experts.BUILTIN))
    monkeypatch.setenv(_experts.ENV_PATH, "grouped")
    assert _experts.execution_key(cpu, torch.float32) == dict(path="grouped")
