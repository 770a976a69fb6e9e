"""A method's prepare recipe, declared once: every setting typed like a method `Param`, and from that one
declaration come `python -m bench prepare <method>`'s flags and their checks, the method parameters that pick an
artifact (the keys a sweep sets), the artifact keys and the command a missing artifact's error suggests.

    RECIPE = Recipe(
        Setting(Param("finetune_steps", int, 300, "fine-tune steps", low=0), flag="--steps",
                artifacts=("dmoe-finetune",), key="steps", sweep=True),
        Setting(Param("lr", float, 2e-4, "fine-tune peak lr", low=0.0, low_open=True), artifacts=("dmoe-finetune",)),
        fixed={"dmoe-finetune": {"recipe": 1}})

    RECIPE.params("finetune_steps")            # the method's Param (the same object): a sweep key
    RECIPE.key("dmoe-finetune", config)        # {"recipe": 1, "steps": 300}: the artifact's identity
    RECIPE.recorded("dmoe-finetune", values)   # {"lr": 0.0002}: kept in its metadata, checked on reuse
    RECIPE.add_arguments(parser); RECIPE.from_args(args, "dmoe")   # the CLI (one-line errors)

A setting with a `key` identifies its artifacts (changing it makes another artifact); one without is recorded in
the artifact's metadata, and `prepare` refuses to reuse an artifact made with a different recorded recipe.
Values the key takes from the model (scale lists resolved against the model's scale count) are passed to `key`
by name, overriding the configured value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from bench.errors import BenchError
from bench.registry import Param


@dataclass(frozen=True)
class Setting:
    param: Param                        # name (the method parameter / recipe entry), type, default, range, help
    flag: Optional[str] = None          # prepare's flag; default --<name with dashes>
    artifacts: Tuple[str, ...] = ()     # artifact kinds this setting belongs to
    key: Optional[str] = None           # its entry in those artifacts' keys; None: recorded in their metadata only
    sweep: bool = False                 # also a method parameter (runs and sweeps pick the artifact by it)
    each: bool = False                  # the flag takes a comma-separated list: one artifact per value

    @property
    def name(self) -> str:
        return self.param.name

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.cli_flag[2:].replace("-", "_")

    @property
    def aliases(self) -> Tuple[str, ...]:
        """Other flags of the setting: the method parameter's own name (--finetune-steps beside --steps), so the name
        a sweep or `run --set` uses works for `prepare` too."""
        own = "--" + self.name.replace("_", "-")
        return (own,) if own != self.cli_flag else ()

    def rule(self) -> str:
        """The valid values in words, as the CLI states them (e.g. '>= 0', 'in (0, 1]', 'one of a, b')."""
        p = self.param
        if p.choices is not None:
            return "one of " + ", ".join(map(str, p.choices))
        if p.low is not None and p.high is not None:
            return f"in {'(' if p.low_open else '['}{p.low:g}, {p.high:g}{')' if p.high_open else ']'}"
        if p.low is not None:
            return f"{'>' if p.low_open else '>='} {p.low:g}"
        if p.high is not None:
            return f"{'<' if p.high_open else '<='} {p.high:g}"
        return {int: "an integer", float: "a finite number", bool: "true or false"}.get(p.type, "a string")

    def parse(self, raw):
        """A CLI string -> the typed value (a list for comma-separated input where allowed); one-line BenchError."""
        p = self.param
        if raw is None:
            return [p.default] if self.each else p.default
        text = str(raw)
        items = [s.strip() for s in text.split(",")] if (self.each or p.list_ok) else [text.strip()]
        if any(not s for s in items):
            raise BenchError(f"{self.cli_flag} must be {self._what()}, got {text!r}")
        values = [self._one(s, text) for s in items]
        if self.each:
            return values
        return values if len(values) > 1 else values[0]

    def _what(self) -> str:
        many = " (comma-separated: one artifact each)" if self.each else \
            " (one value or a comma-separated list)" if self.param.list_ok else ""
        return self.rule() + many

    def _one(self, s: str, text: str):
        p = self.param
        try:
            v = p.type(s) if p.type is not bool else s
            if p.type is float and not math.isfinite(v):    # nan passes every range comparison
                raise ValueError
        except (ValueError, OverflowError):
            kind = {int: "an integer ", float: "a finite number "}.get(p.type, "")
            raise BenchError(f"{self.cli_flag} must be {kind}{self._what()}, got {text}") from None
        try:
            return p.validate("prepare", v)
        except BenchError:
            raise BenchError(f"{self.cli_flag} must be {self._what()}, got {text}") from None

    def check(self, value):
        """A configured value (already typed, e.g. from code): the same rule, the same one-line error."""
        if self.each and isinstance(value, list):
            return [self.parse(str(v))[0] for v in value]
        if isinstance(value, list):
            return self.parse(",".join(map(str, value)))
        return self.parse(None if value is None else str(value))

    def text(self, value) -> str:
        """The value as this setting's flag takes it: lists comma-separated, floats by repr (the shortest text that
        parses back to the same float, so a suggested command makes exactly the artifact asked for)."""
        vs = value if isinstance(value, (list, tuple)) else [value]
        return ",".join(repr(v) if isinstance(v, float) else str(v) for v in vs)


class Recipe:
    """Settings in declaration order (the order of the flags and of the suggested command); `fixed`: constant
    key entries per artifact kind (e.g. the recipe version); `nested`: per kind, entries holding another kind's key."""

    def __init__(self, *settings: Setting, fixed: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 nested: Optional[Mapping[str, Mapping[str, str]]] = None):
        for what, xs in (("name", [s.name for s in settings]),
                         ("flag", [f for s in settings for f in (s.cli_flag, *s.aliases)])):
            dup = sorted({x for x in xs if xs.count(x) > 1})
            if dup:
                raise RuntimeError(f"recipe declares the {what} {dup[0]!r} twice")
        self.settings: Tuple[Setting, ...] = tuple(settings)
        self.fixed = {k: dict(v) for k, v in (fixed or {}).items()}
        self.nested = {k: dict(v) for k, v in (nested or {}).items()}

    def __getitem__(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return any(s.name == name for s in self.settings)

    def extend(self, *settings: Setting, fixed=None, nested=None) -> "Recipe":
        """This recipe plus more settings (and key entries): one method reusing another's declaration."""
        return Recipe(*self.settings, *settings, fixed={**self.fixed, **(fixed or {})},
                      nested={**self.nested, **(nested or {})})

    # ------------------------------------------------------------------ method parameters
    def params(self, *names: str) -> Tuple[Param, ...]:
        """The Params of the named settings (all sweep settings when none named), for a method's `params`."""
        picked = [self[n] for n in names] if names else [s for s in self.settings if s.sweep]
        bad = [s.name for s in picked if not s.sweep]
        if bad:
            raise RuntimeError(f"recipe setting {bad[0]!r} is not a method parameter (sweep=False)")
        return tuple(s.param for s in picked)

    def method_configs(self, values: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """The method parameters among `values` (prepare's), one config per value of an `each` setting."""
        base = {s.name: values[s.name] for s in self.settings if s.sweep and not s.each}
        each = [s for s in self.settings if s.sweep and s.each]
        if not each:
            return [base]
        (s,) = each
        return [dict(base, **{s.name: v}) for v in values[s.name]]

    def defaults(self) -> Dict[str, Any]:
        return {s.name: ([s.param.default] if s.each else s.param.default) for s in self.settings}

    # ------------------------------------------------------------------ artifacts
    def kinds(self) -> List[str]:
        out: List[str] = []
        for s in self.settings:
            out += [k for k in s.artifacts if k not in out]
        return out

    def key(self, kind: str, values: Mapping[str, Any], scope: Optional[Mapping[str, Any]] = None,
            **resolved) -> dict:
        """The artifact key of `kind`: its fixed entries, each keyed setting's value (from `values`, a method config
        or a prepare's values; `resolved` overrides entries by name, e.g. scales resolved against the model),
        and the keys it nests (e.g. the fine-tune an expert split was made from). `scope`: entries that identify
        what the artifact was made from beyond the recipe (the data: methods/_moe.data_scope), here and in every
        nested key; empty for the shipped default, whose keys are therefore unchanged."""
        key = dict(self.fixed.get(kind, {}))
        for s in self.settings:
            if kind in s.artifacts and s.key is not None:
                key[s.key] = values[s.name]
        for entry, other in self.nested.get(kind, {}).items():
            key[entry] = self.key(other, values, scope)
        unknown = sorted(set(resolved) - set(key))
        if unknown:
            raise RuntimeError(f"the {kind} key has no entry {unknown[0]!r}")
        key.update(resolved)
        key.update(scope or {})
        return key

    def recorded(self, kind: str, values: Mapping[str, Any]) -> dict:
        """The recipe entries of `kind` that do not identify it (recorded in its metadata, compared on reuse)."""
        return {s.name: values[s.name] for s in self.settings if kind in s.artifacts and s.key is None}

    def flags(self, values: Mapping[str, Any], kind: Optional[str] = None, **resolved) -> str:
        """`--flag value` for each setting in an artifact's key (of `kind`, or of any), in declaration order: the
        prepare command that makes that artifact."""
        out = []
        for s in self.settings:
            if s.key is not None and (kind is None or kind in s.artifacts):
                v = resolved.get(s.key, values[s.name])
                out.append(f"{s.cli_flag} {s.text(v)}")
        return " ".join(out)

    # ------------------------------------------------------------------ command line
    def add_arguments(self, parser) -> None:
        for s in self.settings:
            p = s.param
            default = s.text(p.default) if p.default is not None else "unset"
            also = f"; sweeps and run --set: {s.name}" if s.sweep and s.aliases else ""
            parser.add_argument(s.cli_flag, *s.aliases, dest=s.dest, default=None, metavar=p.type.__name__.upper(),
                                help=f"{p.help} ({s._what()}; default {default}{also})")

    def from_args(self, args, method_cls=None) -> Dict[str, Any]:
        """The typed values of every setting from parsed CLI arguments (absent flags: the declared defaults); with
        `method_cls`, the method is also built from them, so its cross-parameter checks run before any model loads."""
        values = {s.name: s.parse(getattr(args, s.dest)) for s in self.settings}
        if method_cls is not None:
            for config in self.method_configs(values):
                method_cls(**config)
        return values

    def values(self, **overrides) -> Dict[str, Any]:
        """Every setting's value: defaults, with `overrides` checked like CLI input (for code and tests)."""
        unknown = sorted(set(overrides) - {s.name for s in self.settings})
        if unknown:
            raise BenchError(f"unknown recipe setting {unknown[0]!r}; valid: "
                             f"{', '.join(s.name for s in self.settings)}")
        out = self.defaults()
        out.update({n: self[n].check(v) for n, v in overrides.items()})
        return out


def prepare_command(bundle, method: str, flags: str = "") -> str:
    """The `prepare` command line that makes a method's artifacts for this model (suggested by missing-artifact
    errors; `flags` usually from Recipe.flags)."""
    if bundle.source == "official":
        model = f"--var-ckpt {bundle.files.get('var', 'VAR.pth')} --vae-ckpt {bundle.files.get('vqvae', 'VAE.pth')}"
    else:
        model = f"--model {bundle.name}"
    return f"python -m bench prepare {method} {model} {flags}".strip()
