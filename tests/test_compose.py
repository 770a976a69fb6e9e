"""Compositions (methods/compose.py): a weight method + a token method in one run; config, FLOPs, bad input."""
import functools
import json
import os

import pytest
import torch

from bench.errors import BenchError
from bench.registry import create_method, list_methods
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import (TINY_STEPS, _cache_root, counted_generate, hand_count, prepare_args,
                               use_artifacts)

DMOE = dict(expert_size=8, finetune_steps=2, router_steps=10)


@functools.lru_cache(maxsize=None)
def tiny_dmoe() -> str:
    """DMoE artifacts of the tiny model (2 fine-tune steps, 10 router steps) in the shared test cache."""
    from methods.dmoe import DMoE
    from bench.zoo import tiny_bundle
    old = os.environ.get("VARBENCH_CACHE")
    os.environ["VARBENCH_CACHE"] = _cache_root()
    try:
        args = prepare_args("dmoe", "--expert-size", "8", "--steps", "2", "--router-steps", "10", "--images", "8",
                            "--eval-images", "4", "--router-images", "8", "--batch", "4")
        DMoE.prepare(tiny_bundle(), args, None)
    finally:
        if old is None:
            os.environ.pop("VARBENCH_CACHE", None)
        else:
            os.environ["VARBENCH_CACHE"] = old
    return _cache_root()


def test_registry_kinds_and_recorded_config():
    assert {"actvar-experts", "dmoe", "pruned-ffn"} <= set(list_methods(kind="weight"))
    assert {"actvar-tokens", "fixed-tokens"} <= set(list_methods(kind="token"))
    assert {"actvar", "compose"} <= set(list_methods(kind="weight+token"))
    m = create_method("compose", weight="pruned-ffn", token="fixed-tokens",
                      **{"weight.fraction": "0.25", "token.token_rate": "0.5,0.75", "token.criterion": "random"})
    c = m.config
    assert c["weight"] == "pruned-ffn" and c["token"] == "fixed-tokens"
    assert c["weight.fraction"] == 0.25 and c["token.token_rate"] == [0.5, 0.75] and c["token.seed"] == 0
    assert c["weight.weights"] == "finetuned"                      # defaults of both halves recorded in full
    assert json.dumps(c) and m.label == "pruned-ffn f=0.25 + fixed-tokens tok=0.5,0.75 random"


def test_pruned_ffn_with_fixed_tokens_flops(tiny, monkeypatch):
    """Static twin of everything: hand count = pruned FFN on the kept tokens only; FlopCounterMode agrees."""
    monkeypatch.setenv("VARBENCH_CACHE", _cache_root())
    m = create_method("compose", weight="pruned-ffn", token="fixed-tokens",
                      **{"weight.weights": "original", "weight.fraction": 0.25, "weight.scales": [4, 5, 6],
                         "weight.calib_images": 8, "token.token_rate": 0.75, "token.criterion": "norm"})
    net = m.build(tiny)
    assert not any(type(b).__name__ == "TokenGatedBlock" for b in tiny.var.blocks)   # the loaded model untouched
    gen, counted = counted_generate(net, tiny.vqvae, torch.tensor([3, 7]))
    assert [t.shape[1] for t in gen.tokens] == [p * p for p in tiny.var.patch_nums]
    macs = m.analytic_macs(net, tiny, 2)
    cfg = tiny.var.cfg
    C, H = cfg.embed_dim, 128
    hand = hand_count(cfg, 2, {5: 27, 6: 48}, {}, 16, selector=False)
    for si, k in ((4, 25), (5, 27), (6, 48)):                     # pruned neurons: 32 of 128 on scales 4..6
        hand[si] -= 2 * 2 * cfg.depth * k * 2 * C * 32
    assert macs == pytest.approx(hand, rel=1e-12)
    assert macs == pytest.approx(counted, rel=1e-12)
    row = m.row_metrics(net, tiny)
    assert row["compose_weight"] == "pruned-ffn" and row["compose_token"] == "fixed-tokens"
    assert row["compose_weight_scales"] == [4, 5, 6] and row["compose_token_scales"] == [5, 6]
    assert row["kept_tokens_per_scale"][5:] == [27, 48] and row["kept_neurons"] == 96
    assert 0 < row["macs_saved_fraction"] < 1


def test_actvar_halves_composed(tiny, monkeypatch):
    """actvar-experts (weights + router) + actvar-tokens (its selectors only): counts as ActVAR's hand count."""
    use_artifacts(monkeypatch, "actvar-tokens", "actvar-experts")
    m = create_method("compose", weight="actvar-experts", token="actvar-tokens",
                      **{f"weight.{k}": v for k, v in TINY_STEPS.items()},
                      **{f"token.{k}": v for k, v in TINY_STEPS.items()})
    net = m.build(tiny)
    experts_net = create_method("actvar-experts", **TINY_STEPS).build(tiny)
    assert torch.equal(net.head.weight, experts_net.head.weight)   # the weight half's fine-tuned weights run
    _, counted = counted_generate(net, tiny.vqvae, torch.tensor([1, 4]))
    macs = m.analytic_macs(net, tiny, 2)
    hand = hand_count(tiny.var.cfg, 2, {5: 27, 6: 48}, {5: 12, 6: 12}, 16)
    assert macs == pytest.approx(hand, rel=1e-12) and macs == pytest.approx(counted, rel=1e-12)
    row = m.row_metrics(net, tiny)
    assert row["active_experts_per_scale"][5:] == [12, 12] and row["kept_tokens_per_scale"][5:] == [27, 48]
    assert row["actvar_experts_artifact"] != row["actvar_tokens_artifact"]


@pytest.mark.parametrize("dense_weights", ["finetuned", "original"])
def test_dmoe_with_actvar_tokens(tiny, monkeypatch, dense_weights):
    """DMoE's experts on its last three scales + ActVAR's token gate on the last two; with dense_weights=original
    both models of DMoE's SwitchNet are gated. FLOPs agree with FlopCounterMode."""
    tiny_dmoe()
    use_artifacts(monkeypatch, "actvar-tokens")
    m = create_method("compose", weight="dmoe", token="actvar-tokens",
                      **{f"weight.{k}": v for k, v in DMOE.items()}, **{"weight.tau": 0.5,
                         "weight.dense_weights": dense_weights}, **{f"token.{k}": v for k, v in TINY_STEPS.items()})
    net = m.build(tiny)
    _, counted = counted_generate(net, tiny.vqvae, torch.tensor([0, 5]))
    macs = m.analytic_macs(net, tiny, 2)
    assert macs == pytest.approx(counted, rel=1e-9)
    row = m.row_metrics(net, tiny)
    assert row["compose_weight_scales"] == [4, 5, 6] and row["kept_tokens_per_scale"][5:] == [27, 48]
    maps = json.loads(row["expert_maps"])["maps"]
    assert set(maps) <= {"4"}                                       # per-token maps only where all tokens ran


@pytest.mark.parametrize("dense_weights", ["finetuned", "original"])
def test_dmoe_with_fastvar_across_the_weight_switch(tiny, monkeypatch, dense_weights):
    """FastVAR caching scale 3 and pruning scales 4-5 under DMoE on scales 4-6: with dense_weights=original the
    cache scale runs on the original VAR and the pruned scales on the fine-tuned one, and they share the cache
    (it used to raise 'pruned scale 4 before caching scale 3'). FLOPs agree with FlopCounterMode."""
    monkeypatch.setenv("VARBENCH_CACHE", tiny_dmoe())
    m = create_method("compose", weight="dmoe", token="fastvar",
                      **{f"weight.{k}": v for k, v in DMOE.items()}, **{"weight.tau": 0.5,
                         "weight.dense_weights": dense_weights, "token.scales": [4, 5]})
    net = m.build(tiny)
    assert (type(net).__name__ == "SwitchNet") == (dense_weights == "original")
    out, counted = counted_generate(net, tiny.vqvae, torch.tensor([0, 5]))
    assert m.analytic_macs(net, tiny, 2) == pytest.approx(counted, rel=1e-9)
    again, _ = counted_generate(net, tiny.vqvae, torch.tensor([0, 5]))
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, again.tokens))     # the cache is rebuilt per batch
    row = m.row_metrics(net, tiny)
    assert row["fastvar_cache_scale"] == 3 and row["sparse_scales"] == [4, 5]


def test_incompatible_compositions_raise_one_line(tiny):
    cases = [
        (dict(weight="dmoe", token="dmoe"), "token='dmoe' is a 'weight' method"),
        (dict(weight="fixed-tokens", token="actvar-tokens"), "weight='fixed-tokens' is a 'token' method, not a "
                                                             "composable weight method; valid: "),
        (dict(weight="actvar", token="fixed-tokens"), "compose its halves: actvar-experts + actvar-tokens"),
        (dict(weight="dmoe"), "needs weight=<"),
        (dict(weight="nosuch", token="fixed-tokens"), "unknown method 'nosuch'; valid:"),
        (dict(weight="dmoe", token="fixed-tokens", tau=0.5), "unknown parameter 'tau'; valid: weight, token"),
        (dict(weight="dmoe", token="fixed-tokens", **{"weight.token_rate": 0.5}), "unknown parameter 'token_rate'"),
        (dict(weight="dmoe", token="fixed-tokens", **{"token.token_rate": 2}), "out of range"),
        (dict(weight="pruned-ffn", token="fixed-tokens", **{"token.weights": "artifact"}),
         "brings a second set of weights"),
    ]
    for cfg, msg in cases:
        with pytest.raises(BenchError) as e:
            create_method("compose", **cfg)
        assert msg in str(e.value) and "\n" not in str(e.value), (cfg, str(e.value))
    m = create_method("compose", weight="pruned-ffn", token="fixed-tokens",
                      **{"weight.weights": "original", "token.scales": [7]})
    with pytest.raises(BenchError, match="scale index 7 out of range; valid: 0..6"):
        m.check_model(tiny)
