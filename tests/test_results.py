"""The results store: typed one-row parquet files, atomic appends, trial-key replacement, concurrent writers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.results import SCHEMA, append_row, load_results, row_files, to_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(i, **kw):
    r = dict(run_id=f"r{i:04d}", sweep="s", trial_key="", method="dense", samples=10 + i, seed=i,
             macs_fvcore_per_scale=[1.0, 2.5, float(i)], fid=1.5 + i, more_smooth=False,
             macs_uncounted_ops={"aten::add": 3}, started_at=f"2026-01-01T00:00:{i % 60:02d}+00:00",
             active_experts_per_scale=[None, 3.5], param_tau="[0.8, 0.7]")
    r.update(kw)
    return r


def test_round_trip_types_lists_and_json(tmp_path):
    append_row(str(tmp_path), _row(1))
    append_row(str(tmp_path), _row(2, sweep="other"))
    df = load_results(str(tmp_path))
    assert len(df) == 2 and list(df["run_id"]) == ["r0001", "r0002"]
    assert df["samples"].dtype == "int64" and df["fid"].dtype == "float64" and df["more_smooth"].dtype == bool
    assert df["macs_fvcore_per_scale"][0] == [1.0, 2.5, 1.0]                  # list columns come back as lists
    assert df["active_experts_per_scale"][1] == [None, 3.5]                  # method extras keep their lists
    assert json.loads(df["macs_uncounted_ops"][0]) == {"aten::add": 3}       # json columns hold JSON text
    assert list(load_results(str(tmp_path), sweep="other")["run_id"]) == ["r0002"]
    import pyarrow.parquet as pq
    t = pq.read_table(row_files(str(tmp_path))[0])
    typ = t.schema.field("macs_fvcore_per_scale").type  # lists stay lists in parquet
    assert typ.num_fields == 1 and str(typ.value_type) == "double" and str(typ).startswith("list")
    out = tmp_path / "rows.csv"
    to_csv(df, str(out))
    text = out.read_text()
    assert "[1.0, 2.5, 1.0]" in text and text.count("\n") == 3


def test_non_finite_numbers_are_stored_as_null(tmp_path):
    """A NaN or Inf (a metric not computed, an interval without bootstrap) never reaches a stored row: null."""
    import numpy as np
    import pyarrow.parquet as pq
    append_row(str(tmp_path), _row(1, fid=float("nan"), fid_ci_high=np.float64("inf"),
                                   macs_fvcore_per_scale=[1.0, float("nan")], precision=0.5))
    t = pq.read_table(row_files(str(tmp_path))[0]).to_pylist()[0]
    assert t["fid"] is None and t["fid_ci_high"] is None and t["macs_fvcore_per_scale"] == [1.0, None]
    assert t["precision"] == 0.5


def test_wrong_type_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="samples"):
        append_row(str(tmp_path), _row(1, samples="many"))
    assert not os.path.exists(tmp_path / "rows") or not os.listdir(tmp_path / "rows")


def test_trial_key_replaces_the_row(tmp_path):
    append_row(str(tmp_path), _row(1, trial_key="tau=0.8", fid=9.0))
    append_row(str(tmp_path), _row(2, trial_key="tau=0.8", fid=4.0))
    append_row(str(tmp_path), _row(3, trial_key="tau=0.7"))
    df = load_results(str(tmp_path))
    assert sorted(df["trial_key"]) == ["tau=0.7", "tau=0.8"]
    assert float(df[df["trial_key"] == "tau=0.8"]["fid"].iloc[0]) == 4.0


def test_empty_store_has_the_schema_columns(tmp_path):
    df = load_results(str(tmp_path))
    assert len(df) == 0 and "fid" in df.columns and "macs_fvcore" in df.columns


HANG_WRITER = r"""
import sys, time, pyarrow.parquet as pq
from bench import results
def slow_write(table, path, **kw):      # a writer caught mid-write: half a file on disk, then killed
    with open(path, "wb") as f:
        f.write(b"PAR1" + b"x" * 1000)
        f.flush()
    print("writing", flush=True)
    time.sleep(60)
pq.write_table = slow_write
results.append_row(sys.argv[1], dict(run_id="killed", method="dense", fid=1.0))
"""

LOOP_WRITER = r"""
import sys
from bench import results
for i in range(100000):
    results.append_row(sys.argv[1], dict(run_id=f"w{sys.argv[2]}-{i}", method="dense", payload=list(range(2000)),
                       check=sum(range(2000)) + i, i=i))
"""


def _python(code, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def test_writer_killed_mid_write_leaves_no_partial_row(tmp_path):
    append_row(str(tmp_path), _row(1))
    p = _python(HANG_WRITER, tmp_path)
    try:
        assert p.stdout.readline().strip() == "writing"
        temps = [f for f in os.listdir(tmp_path / "rows") if f.startswith(".tmp-")]
        assert temps  # the half-written file exists...
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    df = load_results(str(tmp_path))
    assert list(df["run_id"]) == ["r0001"]  # ...but the loader sees only complete rows
    assert not [f for f in os.listdir(tmp_path / "rows") if f.startswith(".tmp-")]  # and cleans the dead writer's


def test_writer_killed_at_a_random_point_and_concurrent_writers(tmp_path):
    writers = [_python(LOOP_WRITER, tmp_path, w) for w in range(3)]
    try:
        deadline = time.time() + 60
        while len(row_files(str(tmp_path))) < 30 and time.time() < deadline:
            time.sleep(0.05)
            df = load_results(str(tmp_path))  # reading while three processes write
            if len(df):
                assert (df["check"] == df["i"] + sum(range(2000))).all()
        writers[0].send_signal(signal.SIGKILL)
    finally:
        for p in writers:
            p.kill()
            p.wait(timeout=30)
    df = load_results(str(tmp_path))
    assert len(df) >= 30 and df["run_id"].is_unique
    assert not [f for f in os.listdir(tmp_path / "rows") if f.startswith(".tmp-")]  # killed writers' temps removed
    assert all(len(p) == 2000 for p in df["payload"])
    assert (df["check"] == df["i"] + sum(range(2000))).all()
    for w in range(3):  # no gaps: each writer's rows are 0..k (a killed writer loses at most its row in flight)
        idx = sorted(df[df["run_id"].str.startswith(f"w{w}-")]["i"])
        assert idx == list(range(len(idx)))


CONCURRENT_WRITER = r"""
import sys
from bench import results
for i in range(8):
    results.append_row(sys.argv[1], dict(run_id=f"c{sys.argv[2]}-{i}", method="dense", trial_key=f"t{sys.argv[2]}-{i}",
                                         fid=float(i)))
"""


def test_concurrent_writers_all_rows_present(tmp_path):
    procs = [_python(CONCURRENT_WRITER, tmp_path, w) for w in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    df = load_results(str(tmp_path))
    assert sorted(df["trial_key"]) == sorted(f"t{w}-{i}" for w in range(4) for i in range(8))


def test_schema_documents_every_contract_column():
    contract = """run_id sweep sweep_id trial_key method method_kind method_label method_config model model_id
    model_depth model_source samples seed seed_scheme batch_size cfg top_k top_p more_smooth device macs_fvcore
    macs_fvcore_per_scale macs_decoder macs_analytic macs_analytic_per_scale macs_uncounted_ops flop_images
    time_median_s time_p10_s time_p90_s time_per_scale_median_s time_decode_median_s images_per_s timing_batches
    warmup_batches timer mem_peak_bytes mem_kind fid fid_ci_low fid_ci_high isc_mean isc_std precision recall
    kid_mean kid_std extractor reference reference_count fidelity_token_agreement
    fidelity_token_agreement_per_scale fidelity_psnr_db env_torch env_python env_platform env_device_name
    env_threads env_code_commit env_host started_at finished_at wall_s""".split()
    missing = [c for c in contract if c not in SCHEMA]
    assert not missing
    assert all(len(v) == 2 and v[1] for v in SCHEMA.values())
