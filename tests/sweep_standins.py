"""Stand-in methods for the sweep tests (imported by sweeps through `modules: [tests.sweep_standins]`).

`standin-budget` runs the dense network but reports `keep` times the dense FFN MACs on the last three scales:
a cheap, artifact-free method with one parameter and a MAC count that depends on it, so that a sweep's grid,
twins (FLOP matching reads the parent's MACs) and resume logic can be exercised on the tiny model.
`standin-slow` is the dense network with a delay per batch (generation workers need batches slow enough to share)."""
import time

import torch

from bench.registry import Method, Param, register_method


@register_method("standin-budget")
class StandinBudget(Method):
    kind = "weight"
    display_name, family = "Stand-in budget (test)", "test"
    description = "test stand-in: dense network, FFN MACs of the last three scales reported x keep"
    params = (Param("keep", float, 1.0, "share of the FFN MACs reported on the last three scales", low=0.0,
                    high=1.0, low_open=True),)

    def build(self, bundle):
        return bundle.var

    def analytic_macs(self, net, bundle, batch):
        from bench.analytic import dense_scale_macs
        dense = dense_scale_macs(bundle.var.cfg, batch)
        last = range(len(dense) - 3, len(dense))
        return [s.total - (s.ffn * (1 - self.config["keep"]) if i in last else 0.0) for i, s in enumerate(dense)]

    def row_metrics(self, net, bundle):
        return dict(standin_keep=self.config["keep"])


class _SlowNet(torch.nn.Module):
    """The dense network, `delay` seconds slower per batch (at its first scale); outputs unchanged."""

    def __init__(self, var, delay: float):
        super().__init__()
        self.var, self.delay = var, delay
        self.num_classes, self.patch_nums = var.num_classes, var.patch_nums

    def new_caches(self):
        return self.var.new_caches()

    def scale_forward(self, si, x_in, label_2B, caches):
        if si == 0:
            time.sleep(self.delay)
        return self.var.scale_forward(si, x_in, label_2B, caches)


@register_method("standin-slow")
class StandinSlow(Method):
    kind = "weight"
    display_name, family = "Stand-in slow (test)", "test"
    description = "test stand-in: dense network and outputs, `delay` seconds more per batch"
    params = (Param("delay", float, 0.1, "seconds added to each batch", low=0.0),)

    def build(self, bundle):
        return _SlowNet(bundle.var, self.config["delay"])
