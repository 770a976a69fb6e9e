"""The field report (issue 24, items 4-5; issue 25, item 4), on hand-made rows: families come from the methods'
own `family` (a method no table lists still appears; ablations and compositions do not), each family is placed at a
budget only by a row within ±1 point of MACs saved, the ranking table says which families cannot reach a budget, and
the figure's memory panel draws each row's KV cache in % of dense. Also: tables print "-" for pandas NA."""
import pandas as pd
import pytest

from reports import field as F
from reports import style as S
from reports.context import Context
from tests.test_report import _paired, _row

DENSE_KV = 4096


def point(method, saved, *, kv=None, sp=(1.1, 1.0, 1.2), dq=(1.0, 0.0, 2.0), name=None, parent=""):
    p = f"m/{name or method}/{saved}"
    row = _paired(_row("field", "field-1", p, method, (1 - saved) * 1e9, 10.0 + dq[0], parent=parent), sp, dq)
    row.update(macs_ratio=1 - saved, kv_cache_bytes_peak=kv)
    return row


def field_rows():
    return [point("dense", 0.0, kv=DENSE_KV, sp=(1.0, 1.0, 1.0), dq=(0.0, 0.0, 0.0)),
            point("fastvar", 0.20, kv=3000, sp=(1.15, 1.1, 1.2)), point("fastvar", 0.309, kv=2500, sp=(1.3, 1.2, 1.4)),
            point("cfg-skip", 0.22, kv=2048, sp=(1.2, 1.1, 1.3)), point("cfg-skip", 0.33, kv=2048),
            point("cfg-skip", 0.41, kv=2048),
            point("skipvar", 0.251, kv=3500, sp=(1.4, 1.3, 1.5)),                 # 25.1%: at no budget
            point("skip-scales", 0.432, kv=1900),
            point("tome", 0.095, kv=3900, dq=(0.5, -0.5, 1.5)), point("tome", 0.197, kv=3600, dq=(3.0, 2.0, 4.0)),
            point("fixed-tokens", 0.10, kv=3800), point("fixed-tokens", 0.40, kv=2000),  # a gap at 20 and 30%
            point("actvar-tokens", 0.20, kv=3000),         # an ablation (family actvar): not a family of the field
            point("compose", 0.30, kv=3000),               # a composition: not a family either
            point("my-plugin", 0.30, kv=None)]             # no method registers it: shown as a family of its own


def ranked(rows, budget):
    return {e["family"]: e for e in F.ranking(rows, budget)}


@pytest.fixture
def rows(tmp_path):
    return F._rows(Context(pd.DataFrame(field_rows()), str(tmp_path)))


def test_families_are_the_methods_own_and_an_unlisted_one_is_kept(rows):
    df = pd.DataFrame(field_rows())
    assert F.families(df) == ["cfg-skip", "fastvar", "fixed-tokens", "my-plugin", "skip-scales", "skipvar", "tome"]
    assert {r["method"] for r in rows} == {"dense", *F.families(df)}
    assert F.family_name("tome") == "ToMe (token merging)" and F.family_name("my-plugin") == "my-plugin"


def test_a_family_is_placed_only_within_one_point_of_the_budget(rows):
    at30 = ranked(rows, 0.30)
    assert at30["fastvar"]["row"]["saved"] == pytest.approx(0.309)           # 0.9 points away: placed
    assert at30["cfg-skip"]["row"] is None and at30["cfg-skip"]["reach"] == "gap"   # 33.0%: 3 points away
    assert at30["skipvar"]["row"] is None                                    # 25.1% is not "equal compute" at 30%
    assert at30["skipvar"]["reach"] == "below" and at30["skipvar"]["nearest"] == pytest.approx(0.251)
    assert at30["my-plugin"]["row"]["saved"] == pytest.approx(0.30)
    # ranks among the placed rows only (dense, the 0% reference, included)
    assert {f for f, e in at30.items() if "rank_speed" in e} == {"dense", "fastvar", "my-plugin"}
    assert at30["fastvar"]["rank_speed"] == 1
    at20 = ranked(rows, 0.20)
    assert at20["cfg-skip"]["reach"] == "above"                              # its rows save 22-41%
    assert at20["fixed-tokens"]["reach"] == "gap" and at20["tome"]["row"]["saved"] == pytest.approx(0.197)
    assert at20["skip-scales"]["reach"] == "above"
    assert [at20[f]["rank_fid"] for f in ("dense", "fastvar", "tome")] == [1, 2, 3]
    at40 = ranked(rows, 0.40)
    assert at40["cfg-skip"]["row"]["saved"] == pytest.approx(0.41)           # exactly 1 point: inside
    assert at40["tome"]["reach"] == "below" and at40["fastvar"]["reach"] == "below"


def test_the_ranking_table_says_which_families_cannot_reach_a_budget(rows):
    header, table, listed = F.ranking_table(rows)
    cell = {(r[0], r[1]): r for r in table}
    assert len(table) == len(F.BUDGETS) * 8                                  # every family at every budget
    assert cell[("20%", "CFG-branch skip (SkipVAR static)")][2] == "cannot reach (its rows save at least 22.0%)"
    assert cell[("30%", "SkipVAR (adaptive)")][2] == "cannot reach (its rows save at most 25.1%)"
    assert cell[("30%", "CFG-branch skip (SkipVAR static)")][2] == "no setting within ±1 point (nearest 33.0%)"
    fast = cell[("30%", "FastVAR")]
    assert fast[3] == "30.9%" and fast[header.index("KV")] == "61%" and fast[header.index("Rank (speed)")] == "1"
    assert cell[("30%", "my-plugin")][header.index("KV")] == "-"             # no kv_cache_bytes_peak in that row
    assert all(c == "-" for c in cell[("30%", "SkipVAR (adaptive)")][3:])
    assert "ActVAR" not in {r[1] for r in table} and "Composition" not in {r[1] for r in table}
    assert len(listed) == sum(1 for r in table if not r[2].startswith(("cannot", "no setting")))


def test_the_memory_panel_draws_kv_cache_in_percent_of_dense(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(S, "save_figure", lambda fig, out, stem, caption: drawn.update({stem: (fig, caption)}) or [])
    F.field(Context(pd.DataFrame(field_rows()), str(tmp_path)))
    fig, caption = drawn["field_pareto"]
    axes = fig.axes
    assert len(axes) == 3 and "KV cache" in axes[2].get_xlabel() and "KV-cache" in caption
    xs = sorted(round(float(x), 3) for c in axes[2].collections for x, _ in c.get_offsets())
    expect = sorted(round(100 * kv / DENSE_KV, 3) for r in field_rows() if F.is_family(r["method"])
                    for kv in [r["kv_cache_bytes_peak"]] if kv is not None)
    assert xs == expect                       # one point per row with the column, dense at 100%, none for my-plugin
    assert 100.0 in xs and (tmp_path / "field_ranking.md").exists()
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_tables_print_the_missing_mark_for_pandas_na():
    assert S.fmt(pd.NA) == S.fmt(None) == S.fmt(float("nan")) == S.fmt(pd.NaT) == S.MISSING == "-"
    assert S.fid_text(pd.NA, None, None) == "-" and S.fid_text(10.0, pd.NA, 12.0) == S.fmt(10.0)
    cells = pd.Series([1.5, None], dtype="Float64").tolist()                # a nullable column's NA
    assert [S.fmt(v) for v in cells] == ["1.5", "-"]


def test_the_field_sweep_runs_every_family_the_methods_declare():
    """sweeps/field.yaml's quick form (dense and each headline point) holds every family of the field, so a new
    method with a family of its own is noticed here until the sweep includes it."""
    from bench.registry import method_catalog
    from bench.sweep import expand, load_spec
    quick = {t.method for t in expand(load_spec("field", quick=True))}
    full = {t.method for t in expand(load_spec("field"))}
    own = {n for n, info in method_catalog().items() if info.family == n}
    assert quick == own == full and len(own) == 13
