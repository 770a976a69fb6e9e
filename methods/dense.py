"""Dense VAR: the baseline every other method is measured against."""
from bench.registry import Method, register_method


@register_method("dense")
class Dense(Method):
    kind = "none"
    display_name = "VAR (dense)"
    family = "dense"
    description = "the unmodified VAR (baseline)"

    def build(self, bundle):
        return bundle.var
