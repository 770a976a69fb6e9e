"""Prepare recipes (bench/recipe.py): for every method with a prepare step, `prepare`'s flags, the recipe defaults,
the method parameters and the artifact keys come from one declaration; bad flag values (non-finite floats included)
are one line and exit 2 before anything loads or is written; and every artifact shipped in bench/assets/artifacts
is still found by the configurations that use it (the keys, hence the directory names, did not change)."""
import argparse
import json
import os

import pytest

from bench.artifacts import SHIPPED, artifact_name, find_artifact
from bench.commands.prepare import method_parser, preparable_methods
from bench.errors import BenchError
from bench.recipe import Recipe, Setting
from bench.registry import Param, create_method, method_class

COMMON_FLAGS = {"-h", "--help", "--model", "--var-ckpt", "--vae-ckpt", "--depth", "--patch-nums", "--device", "--out",
                "--threads", "--data", "--force"}


def artifact_keys(m, bundle) -> dict:
    """Each artifact kind's key as the method computes it when it runs (not through the recipe's CLI path)."""
    if m.name == "dmoe":
        return {"dmoe-finetune": m.finetune_key(), "dmoe-experts": m.experts_key()}
    if m.name == "pruned-ffn":
        return {"pruned-calib": m.calib_key(bundle), "dmoe-finetune": m.finetune_key()}
    if m.name == "skipvar":
        return {"skipvar-decision": m.artifact_key(bundle)}
    return {"actvar": m.artifact_key(bundle)}


def parse(name, *argv):
    cls = method_class(name)
    return cls.recipe.from_args(method_parser(name, cls, argparse.ArgumentParser).parse_args(list(argv)), cls)


def other_value(s: Setting):
    """A valid value other than the default, as it is typed on the command line."""
    p = s.param
    if p.choices:
        return next(c for c in p.choices if c != p.default)
    if p.name == "scales":
        return "4,5"
    if p.type is float:
        return "0.5" if p.high == 1.0 else f"{2 * p.default:g}"
    return str(2 * p.default if p.default else 1)


def test_preparable_methods_are_the_ones_declaring_a_recipe():
    assert set(preparable_methods()) == {"dmoe", "pruned-ffn", "actvar", "actvar-tokens", "actvar-experts", "skipvar"}


@pytest.mark.parametrize("name", ["dmoe", "pruned-ffn", "actvar", "actvar-tokens", "actvar-experts"])
def test_flags_defaults_params_and_keys_come_from_one_declaration(name, tiny):
    cls = method_class(name)
    recipe = cls.recipe
    parser = method_parser(name, cls, argparse.ArgumentParser)
    flags = {f for a in parser._actions for f in a.option_strings}
    # each setting's flag, and its method parameter's name where that differs (--steps and --finetune-steps)
    assert flags - COMMON_FLAGS - {"-v", "-q", "--verbose", "--quiet"} == {f for s in recipe.settings
                                                                           for f in (s.cli_flag, *s.aliases)}
    assert {"-q", "-v"} <= flags
    # no flag given: the recipe's defaults, which are the method parameters' defaults (the same Param objects)
    values = parse(name)
    assert values == recipe.defaults()
    params = {p.name: p for p in cls.params}
    for s in recipe.settings:
        if s.sweep:
            assert params[s.name] is s.param, s.name
    default = create_method(name)
    assert all(default.config[s.name] == s.param.default for s in recipe.settings if s.sweep)
    # the artifact keys of the prepare command's defaults are those of the method's defaults
    configs = recipe.method_configs(values)
    assert [artifact_keys(cls(**c), tiny) for c in configs] == [artifact_keys(default, tiny)]
    base = artifact_keys(default, tiny)
    for s in recipe.settings:
        changed = parse(name, s.cli_flag, other_value(s))
        (config,) = recipe.method_configs(changed)
        keys = artifact_keys(cls(**config), tiny)
        for kind in s.artifacts:
            if s.key is None:       # recorded in the artifact's metadata; not part of its identity
                assert keys[kind] == base[kind], (s.name, kind)
                assert recipe.recorded(kind, changed) != recipe.recorded(kind, values)
                continue
            assert keys[kind][s.key] != base[kind][s.key], (s.name, kind)
            same = {k for k in base[kind] if k != s.key and not isinstance(base[kind][k], dict)}
            assert {k: keys[kind][k] for k in same} == {k: base[kind][k] for k in same}, (s.name, kind)
            got, want = keys[kind][s.key], changed[s.name]
            want = want[0] if s.each else [4, 5] if s.name == "scales" else want
            if isinstance(got, list) and not isinstance(want, list):     # a rate resolved to one per scale
                want = [want] * len(got)
            assert got == want, (s.name, kind)
        for kind in set(base) - set(s.artifacts):    # other artifacts are untouched (or nest the one changed)
            if not any(isinstance(v, dict) for v in keys[kind].values()):
                assert keys[kind] == base[kind], (s.name, kind)


def test_suggested_command_rebuilds_the_missing_artifact(tiny):
    """The command a missing-artifact error suggests, parsed back, gives the same artifact key."""
    for name, cfg in (("dmoe", dict(hoyer_weight=0.5, expert_size=16, router_steps=7)),
                      ("actvar", dict(scales=[4, 5], token_rate=[0.5, 0.25], experts=8, steps2=0)),
                      ("actvar-tokens", dict(token_rate=0.5, prepare_seed=3))):
        m = create_method(name, **cfg)
        hint = m.prepare_hint(tiny)
        argv = hint.split(f"prepare {name} --model tiny ")[1].split()
        (config,) = m.recipe.method_configs(parse(name, *argv))
        assert artifact_keys(method_class(name)(**config), tiny) == artifact_keys(m, tiny), hint


def cli(capsys, *args):
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def test_bad_flag_values_are_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    for name in preparable_methods():
        for s in method_class(name).recipe.settings:
            p = s.param
            bad = ["nan", "inf", "-inf", "x"] if p.type is float else ["1.5", "x"] if p.type is int else ["nope"]
            if p.low is not None:
                bad.append(f"{p.low - 1:g}")
            for v in bad:
                code, err = cli(capsys, "prepare", name, "--model", "tiny", f"{s.cli_flag}={v}")
                lines = [ln for ln in err.splitlines() if ln.strip()]
                assert code == 2 and len(lines) == 1 and f"error: {s.cli_flag} must be " in lines[0], (name, v, err)
                assert f"got {v}" in lines[0] and "Traceback" not in err
    code, err = cli(capsys, "prepare", "dmoe", "--model", "tiny", "--lr", "nan")
    assert err.strip() == "error: --lr must be a finite number > 0, got nan"
    code, err = cli(capsys, "prepare", "actvar", "--model", "tiny", "--token-rates", "0.5,inf")
    assert "--token-rates must be a finite number in (0, 1] (one value or a comma-separated list), got 0.5,inf" in err
    code, err = cli(capsys, "prepare", "dmoe", "--model", "tiny", "--expert-size", "16,0")
    assert "--expert-size must be >= 1 (comma-separated: one artifact each), got 16,0" in err
    assert not (tmp_path / "cache").exists()


def test_recipe_declaration_errors():
    s = Setting(Param("steps", int, 1, "steps", low=0), artifacts=("k",), key="steps")
    with pytest.raises(RuntimeError, match="declares the name 'steps' twice"):
        Recipe(s, s)
    with pytest.raises(RuntimeError, match="declares the flag '--steps' twice"):
        Recipe(s, Setting(Param("n", int, 1, "n"), flag="--steps"))
    r = Recipe(s, fixed={"k": dict(recipe=1)})
    assert r.key("k", r.values(steps=3)) == dict(recipe=1, steps=3)
    with pytest.raises(RuntimeError, match="not a method parameter"):
        r.params("steps")
    with pytest.raises(BenchError, match="unknown recipe setting 'stpes'; valid: steps"):
        r.values(stpes=3)
    with pytest.raises(BenchError, match="--steps must be >= 0, got -1"):
        r.values(steps=-1)


# configurations whose artifacts ship (the sweeps' and the methods' defaults)
SHIPPED_USERS = [
    ("dmoe", {}), ("pruned-ffn", {}), ("pruned-ffn", dict(weights="original", scales=[5, 6])),
    ("actvar", dict(scales=[5, 6])), ("actvar", dict(scales=[3, 4])), ("actvar", dict(scales=[5, 6], steps2=0)),
    ("actvar-tokens", dict(scales=[5, 6], steps2=0)), ("actvar-experts", dict(scales=[5, 6], steps2=0)),
    ("actvar", dict(scales=[5, 6], token_rate=[0.5, 0.25], weight_rate=0.5, train_token_rate=0.75,
                    train_weight_rate=0.75)),
    ("skipvar", {}), ("skipvar", dict(ssim_target=0.86)), ("skipvar", dict(ssim_target=0.88)),
]


def test_every_shipped_artifact_is_found_by_the_configurations_that_use_it(monkeypatch, tmp_path):
    from bench.zoo import load_model
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))            # only the shipped copies can be found
    shipped = sorted(os.listdir(SHIPPED))
    for d in shipped:                                              # names hold the hash of the key they record
        meta = json.load(open(os.path.join(SHIPPED, d, "meta.json")))
        assert artifact_name(meta["kind"], meta["model_id"], meta["key"]) == d
    found = set()
    for model in ("default", "shapes-d6"):
        b = load_model(model)
        for name, cfg in SHIPPED_USERS:
            for kind, key in artifact_keys(create_method(name, **cfg), b).items():
                d = find_artifact(kind, b.model_id, key)
                if d is not None:
                    found.add(os.path.basename(d))
    assert found == set(shipped)


def test_suggested_command_keeps_every_digit(tiny):
    m = create_method("dmoe", hoyer_weight=0.000123456789)
    assert "--hoyer-weight 0.000123456789 " in m.prepare_hint(tiny)


def test_a_prepared_artifact_is_reused_only_for_the_settings_it_was_made_with(tmp_path, monkeypatch):
    """bench.artifacts.reusable, the one reuse-or-refuse rule of dmoe, actvar and pruned-ffn: no artifact (or no
    DONE, or --force) -> make it; the same recorded settings -> reuse; other ones -> one line naming each setting
    that differs and --force. A second write of a complete artifact keeps it unless forced."""
    from bench.artifacts import read_meta, reusable, write_artifact
    recipe = dict(lr=2e-4, images=2000, data="shapes")

    def write(text):
        def files(tmp):
            open(os.path.join(tmp, "weights.txt"), "w").write(text)
            return dict(recipe=recipe if text == "one" else dict(recipe, lr=0.1))
        return files
    assert reusable(None, recipe) is False
    half = tmp_path / "half"
    half.mkdir()
    (half / "meta.json").write_text(json.dumps(dict(recipe=dict(lr=1))))
    assert reusable(str(half), recipe) is False                           # a killed prepare: no DONE, remade
    d = write_artifact("kind", "model", dict(steps=3), str(tmp_path), write("one"))
    assert reusable(d, recipe) is True and reusable(d, recipe, force=True) is False
    with pytest.raises(BenchError) as e:
        reusable(d, dict(recipe, lr=0.1, images=4))
    msg = str(e.value)
    assert msg == (f"{d} was made with {{'images': 2000, 'lr': 0.0002}}, not {{'images': 4, 'lr': 0.1}}; "
                   f"pass --force to redo it")
    # settings recorded elsewhere in the metadata; file paths compared as resolved
    folder = tmp_path / "imgs"
    folder.mkdir()
    recorded = lambda meta: dict(data=meta["recipe"]["data"])
    assert reusable(d, dict(data="shapes"), recorded=recorded, paths=("data",)) is True
    with pytest.raises(BenchError, match=r"made with \{'data': 'shapes'\}, not \{'data': '.*imgs'\}"):
        reusable(d, dict(data=str(folder)), recorded=recorded, paths=("data",))
    monkeypatch.chdir(tmp_path)                                            # imgs/ and /abs/path/imgs: the same
    assert reusable(d, dict(data="imgs"), recorded=lambda meta: dict(data=str(folder)), paths=("data",)) is True
    assert write_artifact("kind", "model", dict(steps=3), str(tmp_path), write("two")) == d
    assert open(os.path.join(d, "weights.txt")).read() == "one"           # the complete one stands
    assert write_artifact("kind", "model", dict(steps=3), str(tmp_path), write("two"), force=True) == d
    assert open(os.path.join(d, "weights.txt")).read() == "two" and read_meta(d)["recipe"]["lr"] == 0.1
    assert sorted(os.listdir(tmp_path)) == sorted(["half", "imgs", os.path.basename(d)])   # no temp left
