"""Issue 25, the last hostile-input list: each input once ended in a traceback, a wasted run or a wrong result; now
one line `error: ...` (exit 2, nothing written) or a warning that names what was left out."""
import json
import os

import pytest

from bench.errors import BenchError


def _cli(args, capsys):
    """In-process `python -m bench ...`: (exit code, stdout, stderr)."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err.strip()


# ------------------------------------------------------------------------ 2. rows of another schema or wrong types
def _good_row(i=1, **kw):
    r = dict(run_id=f"r{i}", sweep="s", method="dense", samples=10, seed=i, fid=2.5, mem_peak_bytes=2 ** 20,
             macs_total=1e9, started_at=f"2026-01-01T00:00:0{i}+00:00")
    r.update(kw)
    return r


def _write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_load_results_skips_a_row_of_another_schema_with_a_warning(tmp_path, capsys):
    from bench.results import append_row, load_results
    append_row(str(tmp_path), _good_row())
    other = tmp_path / "rows" / "run-other.parquet"
    _write_parquet(str(other), {"run_id": ["x"], "foo": [1.0], "samples": [None]})
    df = load_results(str(tmp_path))
    err = capsys.readouterr().err
    assert list(df["run_id"]) == ["r1"]
    assert f"skipping results file {other}: a row of another schema (no method column" in err, err
    assert other.exists()                                     # left out of the frame, never deleted


def test_load_results_converts_or_skips_cells_of_the_wrong_type_naming_file_and_column(tmp_path, capsys):
    from bench.results import append_row, load_results
    append_row(str(tmp_path), _good_row())
    bad = tmp_path / "rows" / "run-bad.parquet"
    _write_parquet(str(bad), {"run_id": ["y"], "method": ["dense"], "samples": ["many"], "started_at": ["2026-02"]})
    odd = tmp_path / "rows" / "run-odd.parquet"
    _write_parquet(str(odd), {"run_id": ["z"], "method": ["dense"], "samples": ["16"], "seed": [3.0],
                              "fid": [float("inf")], "more_smooth": ["true"], "started_at": ["2026-03"]})
    df = load_results(str(tmp_path))
    err = capsys.readouterr().err
    assert list(df["run_id"]) == ["r1", "z"]
    assert f"skipping results file {bad}: column samples holds 'many' (string), not int64" in err, err
    assert f"results file {odd}: column samples stored as string, read as int64" in err, err
    assert f"results file {odd}: column fid holds a non-finite number, read as null" in err, err
    assert df["samples"].dtype == "int64" and list(df["samples"]) == [10, 16] and list(df["seed"]) == [1, 3]
    assert df["fid"].isna().tolist() == [False, True] and df["more_smooth"].tolist()[1] is True


def test_results_show_over_rows_of_another_schema_and_missing_cells(tmp_path, capsys):
    """`results show` used to stop on 'boolean value of NA is ambiguous' (a nullable Int64 cell) and on a row
    without a sweep column."""
    from bench.results import append_row
    append_row(str(tmp_path), _good_row())
    _write_parquet(str(tmp_path / "rows" / "run-x.parquet"), {"run_id": ["x"], "foo": [1.0]})
    _write_parquet(str(tmp_path / "rows" / "run-y.parquet"), {"run_id": ["y"], "method": ["dense"],
                                                               "samples": ["many"]})
    _write_parquet(str(tmp_path / "rows" / "run-z.parquet"), {"run_id": ["z"], "method": ["dense"],
                                                               "samples": [16], "started_at": ["2027"]})
    code, out, err = _cli(["results", "show", "--results", tmp_path], capsys)
    assert code == 0, err
    assert "2 rows in" in out and "sweeps: (none), s" in out
    assert "row of another schema" in err and "column samples holds 'many'" in err


# ------------------------------------------------------------------------------- 1. bench-moe sizes beyond memory
def test_bench_moe_refuses_a_shape_that_cannot_fit_in_memory(tmp_path, capsys):
    """1000000:4000000:1 asked torch for 16 TB and ended in a traceback."""
    out = tmp_path / "moe.json"
    code, _, err = _cli(["bench-moe", "--shapes", "1000000:4000000:1", "--no-calibrate", "--json", out], capsys)
    assert code == 2 and err.startswith("error: shape 1000000:4000000:1 does not fit in memory: its tensors need "
                                        "about 87.3 TiB") and "more than the " in err and "\n" not in err, err
    assert not out.exists()


def test_bench_moe_memory_estimate_names_the_limit(monkeypatch):
    import torch
    from bench.benchmarks import moe as bench_moe
    shapes = bench_moe.parse_shapes("default,official-d16")
    monkeypatch.setattr(bench_moe, "memory_limit", lambda device: (50 * 2 ** 20, "free memory of test"))
    with pytest.raises(BenchError, match=r"shape official-d16 does not fit in memory: .*187 MiB.* more than the "
                                         r"50 MiB free memory of test"):
        bench_moe.check_memory(shapes, [32, 64, 128, 256], 4, 4, torch.device("cpu"))
    bench_moe.check_memory(shapes[:1], [32, 64, 128, 256], 4, 4, torch.device("cpu"))   # 4.35 MiB fits


# ------------------------------------------------------------------- 4. output files checked before any work
OUTPUTS = [(["bench-noise", "--json"], ".json"), (["bench-moe", "--no-calibrate", "--json"], ".json"),
           (["evaluate", "--out"], ".json"), (["sample", "--out"], ".png"), (["results", "export", "--csv"], ".csv")]


def _no_work(monkeypatch):
    """Loading a model or a device is work: the output check comes first."""
    import importlib

    def work(*a, **k):
        raise AssertionError("work started before the output was checked")
    for mod in ("_common", "evaluate", "sample", "bench_noise", "bench_moe"):
        m = importlib.import_module(f"bench.commands.{mod}")
        for name in ("bundle_from_args", "check_device"):
            if hasattr(m, name):
                monkeypatch.setattr(m, name, work)


@pytest.mark.parametrize("args,ext", OUTPUTS, ids=[a[0] for a, _ in OUTPUTS])
def test_an_output_path_that_is_a_directory_is_refused_before_any_work(args, ext, tmp_path, capsys, monkeypatch):
    """bench-noise --json DIR ran the whole benchmark, then failed on the write."""
    _no_work(monkeypatch)
    d = tmp_path / f"out{ext}"
    d.mkdir()
    extra = ["--results", tmp_path] if args[0] == "results" else []
    code, _, err = _cli(args + [d] + extra, capsys)
    assert code == 2 and err == f"error: {args[-1]} '{d}' is a directory; give a file path, e.g. " \
                                f"{os.path.join(d, 'out' + ext)}", err
    assert os.listdir(tmp_path) == [d.name] and os.listdir(d) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("args,ext", OUTPUTS, ids=[a[0] for a, _ in OUTPUTS])
def test_an_output_path_where_no_file_can_be_created_is_refused_before_any_work(args, ext, tmp_path, capsys,
                                                                               monkeypatch):
    """/proc takes no new files, though os.access says it is writable (to root): a probe file finds it."""
    _no_work(monkeypatch)
    extra = ["--results", tmp_path] if args[0] == "results" else []
    code, _, err = _cli(args + [f"/proc/varbench-out{ext}"] + extra, capsys)
    assert code == 2 and err.startswith(f"error: output directory is not writable: /proc ({args[-1]} /proc/"), err
    assert "\n" not in err


# ---------------------------------------------------------------------- 3. sweep on a results disk already full
def test_sweep_on_a_full_results_disk_stops_in_one_line_before_any_trial(tmp_path, capsys, monkeypatch):
    """The manifest write (the sweep's first) ended in an OSError traceback."""
    import bench.atomic
    import bench.sweep.session as S
    monkeypatch.setattr(S, "connect_ray", lambda address, verbose: dict(
        version="test", address="local", nodes=1, num_cpus=2.0, start_s=0.0, max_node_cpus=2.0, max_node_gpus=0.0))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    def trial(*a, **k):
        raise AssertionError("a trial started")
    monkeypatch.setattr(bench.atomic, "atomic_write_text", full)
    monkeypatch.setattr(S, "SweepRunner", trial)
    res = tmp_path / "res"
    code, out, err = _cli(["sweep", "tau", "--quick", "--results", res], capsys)
    assert code == 2 and err.startswith("error: sweep tau-") and "cannot write its manifest to " \
        f"{res / 'sweeps'} (No space left on device); no trial was started" in err and "\n" not in err, err
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []


# ------------------------------------------------------------------------ 5. fastvar match_saved out of reach
def test_fastvar_refuses_a_match_saved_its_layout_cannot_reach(tiny, tmp_path, capsys):
    """match_saved=0.99 ran at the largest saving (0.60) under the label 'match 0.99 saved'."""
    from bench.registry import create_method
    with pytest.raises(BenchError, match=r"match_saved=0.99 cannot be reached: pruning scales \[5, 6\] in blocks "
                                         r".* saves at most 0\.\d+ of the dense transformer MACs .*valid: "
                                         r"match_saved <= 0\.\d+") as e:
        create_method("fastvar", match_saved=0.99).check_model(tiny)
    most = float(str(e.value).split("valid: match_saved <= ")[1].split(",")[0])
    m = create_method("fastvar", match_saved=most)                      # the largest saving itself is reachable
    m.check_model(tiny)
    res = tmp_path / "res"
    code, _, err = _cli(["run", "--method", "fastvar", "--set", "match_saved=0.99", "--results", res], capsys)
    assert code == 2 and "match_saved=0.99 cannot be reached" in err and "\n" not in err, err
    assert not res.exists()


# ---------------------------------------------------------------------------- 6. duplicate keys in a sweep YAML
@pytest.mark.parametrize("text,message", [
    ("name: dup\nsamples: 16\nsamples: 32\npoints:\n  dense: {method: dense}\n",
     "key samples given twice (lines 2 and 3)"),
    ("name: dup\npoints:\n  dense:\n    method: dense\n    method: dmoe\n",
     "key points.dense.method given twice (lines 4 and 5)"),
    ("name: dup\npoints:\n  dense: {method: dense}\n  dense: {method: dmoe}\n",
     "key points.dense given twice (lines 3 and 4)"),
    ("name: dup\nmodels: [default]\npoints:\n  d:\n    method: dmoe\n    grid: {tau: [0.8], tau: [0.7]}\n",
     "key points.d.grid.tau given twice (lines 6 and 6)"),
])
def test_a_key_given_twice_in_a_sweep_yaml_is_refused(text, message, tmp_path, capsys):
    """PyYAML keeps the last value without a word: samples 16 became 32, point dense became method dmoe."""
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    code, _, err = _cli(["sweep", f, "--dry-run", "--results", tmp_path / "res"], capsys)
    assert code == 2 and err == f"error: sweep file {f}: {message}; give it once", err
    assert not (tmp_path / "res").exists()


def test_shipped_sweeps_and_anchors_still_read():
    from bench.sweep.spec import list_sweeps, read_yaml, sweep_path
    for n in list_sweeps():
        assert isinstance(read_yaml(sweep_path(n)), dict)


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    from bench.sweep.spec import read_yaml
    f = tmp_path / "m.yaml"
    f.write_text("base: &b {method: dmoe, grid: {tau: [0.8]}}\npoints:\n  a: {<<: *b, method: pruned-ffn}\n"
                 "  c: *b\n")
    d = read_yaml(str(f))
    assert d["points"]["a"]["method"] == "pruned-ffn" and d["points"]["c"]["method"] == "dmoe"


# ------------------------------------------------------------------ 7/8. reference folders checked up front
def _folder_bundle(tiny, root):
    """The tiny model as if trained on the image folder `root` (a registered user model)."""
    import copy
    b = copy.copy(tiny)
    b.dataset = dict(name="folder", path=root, classes=list("abcd"), image_size=32, hflip=False)
    b.class_names, b.name = list("abcd"), "mine"
    return b


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_a_corrupt_or_empty_reference_image_is_found_before_generation(command, tmp_path, capsys, monkeypatch):
    """A bad image was found only when the reference was read, after the generation (leaving cache files)."""
    from tests.imagefolder import make_image_folder
    import bench.sampling
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))

    def generate(*a, **k):
        raise AssertionError("generation started")
    monkeypatch.setattr(bench.sampling, "generate", generate)
    ref = make_image_folder(tmp_path / "ref", per_class=(6, 6, 6, 6))
    args = [command, "--model", "tiny", "--samples", 12, "--reference", ref]
    args += ["--results", tmp_path / "res"] if command == "run" else ["--out", tmp_path / "out.json"]
    empty = os.path.join(ref, "b", "0001.png")
    open(empty, "wb").close()
    code, _, err = _cli(args, capsys)
    assert code == 2 and err == f"error: reference image {empty} is empty (0 bytes); remove it or replace it " \
                                "with an image", err
    with open(empty, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(64))             # a PNG signature, then garbage
    code, _, err = _cli(args, capsys)
    assert code == 2 and err.startswith(f"error: reference image {empty} is not a readable image (") and "\n" not in err
    assert not (tmp_path / "res").exists() and not (tmp_path / "out.json").exists()
    assert [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs] == []


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_the_training_folder_or_a_folder_without_classes_is_refused_as_reference(command, tiny, tmp_path, capsys,
                                                                                 monkeypatch):
    """`register` refused the training folder as --reference; run and evaluate took it (FID against training
    images), and took a folder of images without class subfolders."""
    import shutil
    import bench.zoo
    from tests.imagefolder import make_image_folder
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "train", per_class=(4, 4, 4, 4))
    monkeypatch.setattr(bench.zoo, "load_model", lambda *a, **k: _folder_bundle(tiny, root))
    tail = ["--results", tmp_path / "res"] if command == "run" else ["--out", tmp_path / "out.json"]
    for ref, why in ((root, "is, holds"), (os.path.join(root, "a"), "lies inside")):
        code, _, err = _cli([command, "--model", "mine", "--samples", 4, "--reference", ref] + tail, capsys)
        assert code == 2 and err.startswith(f"error: --reference {ref} is, holds or lies inside the training folder "
                                            f"{root}; give a held-out folder"), err
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(os.listdir(os.path.join(root, "a"))):
        shutil.copy(os.path.join(root, "a", f), flat / f)
    monkeypatch.setattr(bench.zoo, "load_model", lambda *a, **k: tiny)
    code, _, err = _cli([command, "--model", "tiny", "--samples", 4, "--reference", flat] + tail, capsys)
    assert code == 2 and err == f"error: reference folder {flat} has no class subfolders; valid layout: " \
                                "DIR/<class>/*.png (one subfolder per class, as a training folder), or an .npz", err
    assert not (tmp_path / "res").exists() and not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------- 9. a 60-step fine-tune is found by its users
SWEEP_60 = """models: [tiny]
samples: 16
batch_size: 8
points:
  dmoe:
    method: dmoe
    params: {tau: 0.7, finetune_steps: 60, router_steps: 2}
    twins:
      static:
        method: pruned-ffn
        params: {match_clamp: true, calib_images: 8}
        from_parent: {match_macs: macs_analytic_all}
"""


def test_a_60_step_finetune_is_found_by_pruned_ffn_and_by_a_sweep_asking_for_60_steps(tmp_path, capsys,
                                                                                     monkeypatch):
    """`prepare dmoe --steps 60` made the fine-tune; `prepare pruned-ffn` had no flag by the method parameter's name
    (finetune_steps) and a sweep's Pruned-FFN twin of a finetune_steps=60 DMoE point looked for the 300-step one."""
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    small = ["--model", "tiny", "--threads", 1]
    code, out, err = _cli(["prepare", "dmoe", *small, "--steps", 60, "--batch", 2, "--images", 8, "--eval-images", 4,
                           "--router-images", 8, "--router-steps", 2], capsys)
    assert code == 0, err
    code, out, err = _cli(["prepare", "pruned-ffn", *small, "--finetune-steps", 60, "--calib-images", 8], capsys)
    assert code == 0 and "prepared pruned-ffn" in out, err
    code, out, err = _cli(["prepare", "pruned-ffn", *small, "--steps", 60, "--calib-images", 8], capsys)
    assert code == 0, err                                             # --steps: the same setting
    spec = tmp_path / "ft60.yaml"
    spec.write_text(SWEEP_60)
    code, out, err = _cli(["sweep", spec, "--dry-run", "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    assert '"finetune_steps":60' in out.split("tiny/dmoe/static")[1].splitlines()[0], out   # the twin: 60 steps
    spec.write_text(SWEEP_60.replace("finetune_steps: 60", "finetune_steps: 59"))        # asks for what is not there
    code, out, err = _cli(["sweep", spec, "--dry-run", "--results", tmp_path / "res"], capsys)
    assert code == 2 and "no prepared dmoe-finetune artifact" in err and "--steps 59" in err, err


def test_twins_inherit_only_the_settings_they_share_with_the_parent():
    from bench.sweep.trials import shared_settings, twin_params
    assert shared_settings("dmoe", "pruned-ffn") == ["hoyer_weight", "finetune_steps", "prepare_seed"]
    assert shared_settings("dmoe", "dense") == []
    got = twin_params("dmoe", dict(tau=0.7, finetune_steps=60, prepare_seed=3), "pruned-ffn",
                      dict(prepare_seed=1, match_clamp=True))
    assert got == dict(match_clamp=True, prepare_seed=1, finetune_steps=60)   # the twin's own value wins


# --------------------------------------------------------------------------- 10. prepare --help tells the truth
@pytest.mark.parametrize("method,flag", [("dmoe", "--images"), ("actvar", "--images"),
                                         ("pruned-ffn", "--calib-images")])
def test_prepare_help_says_which_images_are_mirrored(method, flag, tiny, tmp_path, capsys):
    """The help said every image count is doubled "with mirrors"; an image folder is not mirrored."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main(["prepare", method, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "with mirrors)" not in out
    assert f"{flag} INT" in out and "only where the data is mirrored: shapes, or the model's own folder if it was " \
                                    "trained with mirroring; an image folder is not" in out
    from methods import _moe
    from tests.imagefolder import make_image_folder
    root = make_image_folder(tmp_path / "imgs", per_class=(4, 4, 4, 4))
    assert len(_moe.token_data(tiny, 4, data="shapes")[1]) == 8           # shapes: doubled
    assert len(_moe.token_data(tiny, 4, data=root)[1]) == 4               # a folder: not


# --------------------------------------------------------------- 11. the JSON of an unstored row is standard JSON
def test_the_row_printed_when_it_cannot_be_stored_is_standard_json(tmp_path, capsys, monkeypatch, classifier):
    """RowNotStored's line held bare NaN (not JSON; strict parsers refuse it) for the metrics not computed."""
    import bench.results

    def full(results_dir, row):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bench.results, "append_row", full)
    res, cache = tmp_path / "results", tmp_path / "cache"
    code, out, err = _cli(["run", "--model", "tiny", "--samples", 12, "--batch-size", 4, "--results", res,
                           "--classifier", classifier, "--reference-count", 16, "--metrics", "fid", "--bootstrap", 0,
                           "--timing-rounds", 0, "--cache-dir", cache, "--threads", 1], capsys)
    assert code == 2 and "its row could not be written" in err.splitlines()[-1]
    line = out.strip().splitlines()[-1]

    def strict(text):
        raise AssertionError(f"not JSON: {text}")
    row = json.loads(line, parse_constant=strict)                    # NaN / Infinity / -Infinity are refused
    assert row["model"] == "tiny" and row["precision"] is None and row["fid_ci_low"] is None
    assert isinstance(row["fid"], float)


def test_row_json_writes_null_for_every_non_finite_number():
    import numpy as np
    from bench.results import row_json
    text = row_json(dict(a=float("nan"), b=[1.0, float("inf")], c={"x": np.float64("nan"), "y": (1, -np.inf)},
                         d=np.array([1.0, np.nan]), e="s"))
    assert json.loads(text) == dict(a=None, b=[1.0, None], c={"x": None, "y": [1, None]}, d=[1.0, None], e="s")


# ------------------------------------------------------------------- 12. the pickle refusal names pickles
class _Reduces:
    """Unpickles by calling os.getpid (harmless; a real attack would call os.system): torch's message for a blocked
    module reads 'unsupported GLOBAL posix.getpid', which the refusal did not recognise."""

    def __reduce__(self):
        return (os.getpid, ())


class _Plain:
    pass


@pytest.mark.parametrize("obj,name", [(_Reduces(), "getpid"), (_Plain(), "_Plain")])
def test_a_pickled_object_is_refused_in_our_words(obj, name, tmp_path):
    import torch
    from bench.checkpoints import read_state_dict
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": obj}, str(path))
    with pytest.raises(BenchError) as e:
        read_state_dict(str(path), "VAR checkpoint")
    msg = str(e.value)
    assert msg.startswith(f"cannot read VAR checkpoint {path}: it contains pickled Python objects (") and name in msg
    assert "refused without running them" in msg and "\n" not in msg


def test_a_plain_pickle_is_refused_as_a_pickle(tmp_path):
    import pickle
    from bench.checkpoints import read_state_dict
    path = tmp_path / "raw.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Reduces()}, f, protocol=4)
    with pytest.raises(BenchError, match=r"it is a pickle the tensor-only loader cannot read .*refused without "
                                         r"running it"):
        read_state_dict(str(path), "VAR checkpoint")
