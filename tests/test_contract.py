"""The contract every registered method passes on the tiny model (one test per name in bench.registry.list_methods(),
so a new file in methods/ is picked up by itself): it builds without touching the loaded model, generates, its
analytic MACs per scale equal fvcore's count of the same generation, and bench.measure.measure writes a row with
every results SCHEMA column of the right type.

Methods that need prepared artifacts or non-default parameters on the tiny model get them from SETUPS, made with the
shared tiny-artifact helpers of the method tests. A method without an entry runs with its defaults; if it cannot run
on the tiny model the test fails saying so (never a silent skip)."""
import math

import pytest
import torch

from bench.analytic import dense_scale_macs
from bench.registry import create_method, list_methods, method_class
from bench.results import SCHEMA, load_results
from bench.sampling import generate
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import TINY_STEPS, reset, use_artifacts
from tests.test_compose import DMOE, tiny_dmoe
from tests.test_run import _check_contract_types, classifier  # noqa: F401 (module fixture)


def _actvar(*names):
    return lambda monkeypatch: use_artifacts(monkeypatch, *names)


def _dmoe(monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", tiny_dmoe())


# name -> params for create_method, and `prepare(monkeypatch)`: makes the tiny artifacts (once per session) and points
# VARBENCH_CACHE at them. Without `prepare`, VARBENCH_CACHE is a fresh directory under tmp_path.
SETUPS = {
    "dense": dict(params={}),
    "actvar": dict(params=TINY_STEPS, prepare=_actvar("actvar")),
    "actvar-tokens": dict(params=TINY_STEPS, prepare=_actvar("actvar-tokens")),
    "actvar-experts": dict(params=TINY_STEPS, prepare=_actvar("actvar-experts")),
    "dmoe": dict(params=dict(DMOE, tau=0.5), prepare=_dmoe),
    # the default weights=finetuned: DMoE's fine-tuned tiny model (its calibration is made on first use)
    "pruned-ffn": dict(params=dict(finetune_steps=DMOE["finetune_steps"], fraction=0.25, calib_images=4),
                       prepare=_dmoe),
    "fixed-tokens": dict(params=dict(token_rate=0.75, criterion="norm")),
    # the release rule's decision models, fitted on first use on a few tiny samples (the default fits 512)
    "skipvar": dict(params=dict(fit_samples=8)),
    "compose": dict(params={"weight": "pruned-ffn", "token": "fixed-tokens", "weight.weights": "original",
                            "weight.fraction": 0.25, "weight.calib_images": 4, "token.token_rate": 0.75,
                            "token.criterion": "random"}),
    # the tiny model drafts for itself (its only partner on the same VQ-VAE): the prefill path still runs
    "code": dict(params=dict(drafter="tiny")),
    "scalekv": dict(params=dict(calib_images=2)),
}

# analytic vs fvcore MACs per scale: exact for every method here (the method tests compare at 1e-9 or tighter; only
# test_flops' dense check allows 2%, which dense does not need)
REL = 1e-6
LABELS = [1, 4]
SAMPLES, BATCH, REFERENCE = 12, 4, 32      # 12: IS needs >= 10 samples, so every quality column is filled
ROUNDS = 2                                 # paired timing rounds: enough for every timing column, and quick


def _fail(name, stage, err):
    pytest.fail(f"method {name!r} cannot {stage} on the tiny model: {type(err).__name__}: {err} -- give it "
                f"parameters / prepared artifacts that fit the tiny model in SETUPS of tests/test_contract.py",
                pytrace=False)


def _structure(var):
    return [(n, type(m).__name__) for n, m in var.named_modules()]


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, tiny, classifier, tmp_path, monkeypatch):  # noqa: F811
    from bench.flops import count_generation
    from bench.measure import measure
    from bench.zoo import tiny_bundle
    setup = SETUPS.get(name, {})
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    S = len(tiny.var.patch_nums)
    before = _structure(tiny.var)

    # -- builds (after preparing what it needs), leaving the loaded model as it was
    try:
        if setup.get("prepare"):
            setup["prepare"](monkeypatch)
        method = create_method(name, **setup.get("params", {}))
        method.check_model(tiny)
        net = method.build(tiny)
    except Exception as e:  # noqa: BLE001 -- any failure here means: does not run on the tiny model
        _fail(name, "build", e)
    assert method.name == name and method.kind == method_class(name).kind
    for attr in ("scale_forward", "new_caches", "num_classes", "patch_nums"):
        assert hasattr(net, attr), f"{name}: the built net has no {attr}"
    if isinstance(net, torch.nn.Module):
        net.eval()
    assert _structure(tiny.var) == before, f"{name}: build() swapped modules of the loaded model"
    fresh = dict(tiny_bundle().var.named_parameters())
    for n, p in tiny.var.named_parameters():
        assert torch.equal(p, fresh[n]), f"{name}: build() changed the loaded model's {n}"

    # -- generates
    labels = torch.tensor(LABELS)
    reset(net)
    try:
        gen = generate(net, tiny.vqvae, labels, 0, tiny.sampling)
    except Exception as e:  # noqa: BLE001
        _fail(name, "generate", e)
    assert [tuple(t.shape) for t in gen.tokens] == [(len(LABELS), p * p) for p in tiny.var.patch_nums]
    # step skipping (the sampler's scale_rows hook) marks the tokens of a scale an image did not run with -1
    skipped = {si for si, t in enumerate(gen.tokens) if int(t.max()) == -1}
    assert not skipped or hasattr(net, "scale_rows"), f"{name}: tokens -1 without the scale_rows hook"
    assert all(int(t.min()) >= (-1 if hasattr(net, "scale_rows") else 0) and int(t.max()) < tiny.var.V
               for t in gen.tokens)
    assert gen.images.shape == (len(LABELS), 3, tiny.image_size, tiny.image_size)
    assert torch.isfinite(gen.images).all()

    # -- analytic MACs per scale == fvcore's count of the same (traced) generation
    reset(net)
    mc = count_generation(net, tiny.vqvae, labels, 0, tiny.sampling)
    analytic = method.analytic_macs(net, tiny, len(LABELS))
    if analytic is None:
        analytic = [s.total for s in dense_scale_macs(tiny.var.cfg, len(LABELS))]
    assert len(analytic) == len(mc.per_scale) == S
    for si, (a, f) in enumerate(zip(analytic, mc.per_scale)):
        if si in skipped:        # a scale no image ran: no transformer work, by count and by formula
            assert a == f == 0, (name, si, a, f)
        else:
            assert f > 0 and a == pytest.approx(f, rel=REL), (name, si, a, f)

    # -- one measurement: a row with every SCHEMA column, typed (returned and as stored)
    res = tmp_path / "results"
    row = measure(tiny, method, samples=SAMPLES, batch_size=BATCH, seed=1, results_dir=str(res),
                  cache_dir=str(tmp_path / "measure-cache"), classifier=classifier, reference_count=REFERENCE,
                  timing_rounds=ROUNDS, trial_key=f"contract-{name}")
    missing = [c for c, (t, _) in SCHEMA.items() if t != "any" and c not in row]
    assert not missing, f"{name}: the row lacks {missing}"
    _check_contract_types(row, num_scales=S)
    df = load_results(str(res))
    assert len(df) == 1
    stored = df.iloc[0].to_dict()
    _check_contract_types(stored, num_scales=S)
    assert stored["method"] == name and stored["method_kind"] == method.kind and stored["samples"] == SAMPLES
    assert stored["run_id"] == row["run_id"]
    assert all(a == pytest.approx(f, rel=REL) for a, f in
               zip(stored["macs_analytic_per_scale"], stored["macs_fvcore_per_scale"])), name
    assert math.isfinite(stored["fid"]) and stored["mem_peak_bytes"] >= 0
