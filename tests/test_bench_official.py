"""bench-official (bench/benchmarks/official.py): our sampler timed against the official VAR code.

The run against the release needs its code: set VARBENCH_VAR_CODE to a checkout of FoundationVision/VAR
(git clone https://github.com/FoundationVision/VAR); without it that test is skipped. The rest runs everywhere."""
import os
import sys

import pytest

from bench.errors import BenchError
from tests.conftest import run_cli

VAR_CODE = os.environ.get("VARBENCH_VAR_CODE")


@pytest.mark.skipif(not VAR_CODE, reason="VARBENCH_VAR_CODE (a FoundationVision/VAR checkout) not set")
def test_tiny_run_against_the_release_gives_equal_images_and_a_ratio_per_rep():
    """Depth 2 at scales 1,2,4 (64x64 images): the release and our sampler make bitwise the same images from the
    same weights, labels and seed; each rep is timed in ABBA order; the import leaves no trace (sys.modules, path,
    threads)."""
    import torch
    from bench.benchmarks.official import OfficialConfig, compare_with_official
    threads, path, modules = torch.get_num_threads(), list(sys.path), set(sys.modules)
    r = compare_with_official(VAR_CODE, OfficialConfig(depth=2, patch_nums=(1, 2, 4), batch_size=2, reps=2))
    assert r["images_equal"] is True and r["max_abs_diff"] == 0.0
    assert [rep["order"] for rep in r["reps"]] == ["official-ours", "ours-official"]
    for rep in r["reps"]:
        assert rep["ratio_cpu"] == rep["ours_cpu_s"] / rep["official_cpu_s"] > 0
        assert rep["ratio_user"] == rep["ours_user_s"] / rep["official_user_s"] > 0
        assert rep["ours_minor_faults"] >= 0 and rep["official_system_s"] >= 0
    assert r["allocator_fixed"] is sys.platform.startswith("linux")   # glibc's mallopt where there is glibc
    ratios = sorted(rep["ratio_cpu"] for rep in r["reps"])
    assert r["ours_over_official_min"] == ratios[0] and r["ours_over_official_max"] == ratios[-1]
    assert r["config"]["patch_nums"] == [1, 2, 4] and r["env_threads"] == 1
    assert torch.get_num_threads() == threads and sys.path == path
    assert not {m for m in set(sys.modules) - modules if m.split(".")[0] in ("models", "dist", "huggingface_hub")}


def test_command_refuses_a_missing_or_wrong_path_in_one_line(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):
        p = run_cli("bench-official", "--var-code", path, "--json", tmp_path / "out.json")
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "FoundationVision/VAR" in p.stderr
        assert "Traceback" not in p.stderr and not (tmp_path / "out.json").exists()


def test_a_checkout_that_fails_to_import_is_one_line_and_leaves_sys_modules_alone(tmp_path):
    """A folder shaped like the release whose import fails: one BenchError line naming the failure; whatever held
    the names `models` / `dist` before holds them again."""
    from bench.benchmarks.official import import_official
    (tmp_path / "models").mkdir()
    (tmp_path / "dist.py").write_text("")
    (tmp_path / "models" / "var.py").write_text("")
    (tmp_path / "models" / "__init__.py").write_text("import dist\nimport no_such_module_here\n")
    before = sys.modules.get("dist")
    with pytest.raises(BenchError) as e:
        import_official(str(tmp_path))
    assert "no_such_module_here" in str(e.value) and "\n" not in str(e.value)
    assert sys.modules.get("dist") is before and "models" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_bad_settings_are_refused_before_any_work():
    from bench.benchmarks.official import OfficialConfig, check_config
    for bad in (dict(reps=0), dict(batch_size=0), dict(depth=True), dict(patch_nums=(2, 1)), dict(threads=0),
                dict(allocator="tcmalloc")):
        with pytest.raises(BenchError):
            check_config(OfficialConfig(**bad))
