"""The claims page (sweeps/claims.yaml): each paper claim as the paper states it, what the claims sweep measured at
the points that decide it (ΔFID with its interval and N, MACs saved, the other quality measures), and one word —
reproduced / refuted / not resolved — by the rule written beside it. The claims (CLAIMS) and the rules (RULES) are
data, here and nowhere else; claim_verdict applies a claim's rule to its points."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from reports import data as D
from reports import quality_vector as Q
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report

CLAIMS_SWEEP = "claims"
REPRODUCED, REFUTED, NOT_RESOLVED, NOT_RUN = "reproduced", "refuted", "not resolved", "not run"


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str
    stated: str                   # the paper's figure, as the paper states it
    points: Tuple[str, ...]       # sweep entries ("entry" or "entry/twin"); the first is the point under test
    rule: str                     # a key of RULES
    margin_pct: float = 1.0       # the band of the rule, in % of dense FID


CLAIMS = (
    Claim("dmoe_within_1pct", "DMoE-VAR", "FID within 1% of the dense VAR at −19% FLOPs (−11% time): MoE on the "
          "last three scales (VAR-d16)", ("dmoe",), "within"),
    Claim("dmoe_dynamic_vs_static", "DMoE-VAR", "dynamic thresholding beats static pruning at equal FLOPs: "
          "'Pruned-FFN' on the last three scales shows a sharp performance drop (fig. 3)", ("dmoe", "dmoe/static"),
          "lower"),
    Claim("dmoe_last_scales", "DMoE-VAR", "the last scales give the best FID-to-FLOP trade-off: scales 8–10 of 10 "
          "(fig. 4)", ("late", "early"), "lower"),
    Claim("dmoe_deeper", "DMoE-VAR", "deeper models save more: at a fixed τ the depth-20 FLOP/FID curve "
          "outperforms depth 16 (fig. 5)", ("deeper", "dmoe"), "deeper"),
    Claim("actvar", "ActVAR", "minimal performance degradation at −21.2% FLOPs: (75%, 75%; 75%) on the last two "
          "scales, both training stages (table 1, VAR-d20: FID 2.57 → 2.72, +5.8%)", ("actvar",), "small_loss",
          margin_pct=5.8),   # 'small' as the paper quantifies it: its own +5.8%
    Claim("actvar_stage1", "ActVAR (beside)", "stage 1 alone (router and selector trained, no stage-2 fine-tune); "
          "the paper reports both stages only", ("actvar_stage1",), "small_loss"),
    Claim("fastvar", "FastVAR", "< 1% quality drop with cached token pruning of the large scales (2.7× over "
          "FlashAttention-accelerated VAR-family models)", ("fastvar",), "small_loss"),
    Claim("skipvar", "SkipVAR", "< 1% drop: 1.81× overall at mean SSIM > 0.88 against the unaccelerated model",
          ("skipvar",), "small_loss"),
    Claim("fixed_tokens", "field", "the training-free families' '< 1% drop' near 20–30% saved, for fixed token "
          "pruning (ActVAR's baseline: FID 3.83 against 2.72 for dynamic tokens, table 4)", ("fixed_tokens",),
          "small_loss"),
    Claim("cfg_skip", "field", "the same '< 1% drop', for SkipVAR's unconditional-branch skip on the last two "
          "scales alone", ("cfg_skip",), "small_loss"),
    Claim("relu", "context", "no paper figure: the ReLU fine-tune with every expert kept (τ = 1), what the "
          "fine-tune alone costs before any expert is skipped", ("relu",), "small_loss"),
)


class Verdict(NamedTuple):
    word: str                     # REPRODUCED | REFUTED | NOT_RESOLVED | NOT_RUN
    because: str


@dataclass
class Point:
    """One measured point as a claim reads it."""
    name: str                     # its sweep point id
    delta: Optional[float]        # ΔFID against dense, and its interval
    lo: Optional[float]
    hi: Optional[float]
    dense_fid: Optional[float]
    macs_ratio: Optional[float]
    samples: Optional[int]
    stop: Optional[str]           # why a resolving run stopped
    level: float                  # % level of its intervals
    call: Q.QualityCall

    @property
    def complete(self) -> bool:
        return None not in (self.lo, self.hi) and bool(self.dense_fid)

    def band(self, pct: float) -> float:
        """pct % of this point's dense FID, in FID units."""
        return pct / 100 * abs(self.dense_fid)

    @property
    def saved(self) -> Optional[float]:
        return None if self.macs_ratio is None else 1 - self.macs_ratio

    def pct(self, v: float) -> float:
        return 100 * v / abs(self.dense_fid)


# ---------------------------------------------------------------------------------------------- rules
def _incomplete(*points: Point) -> Optional[Verdict]:
    bad = [p.name for p in points if not p.complete]
    return Verdict(NOT_RESOLVED, f"no ΔFID interval or dense FID for {', '.join(bad)}") if bad else None


def within_band(claim: Claim, a: Point) -> Verdict:
    m = claim.margin_pct
    none = _incomplete(a)
    if none:
        return none
    others = a.call.named(Q.WORSE, exclude=Q.FRONT_AXES)
    inside = -a.band(m) <= a.lo and a.hi <= a.band(m)
    if others:
        return Verdict(REFUTED, f"{' and '.join(others)} resolved worse"
                       + (f" (ΔFID inside ±{m:g}%)" if inside else ""))
    if a.lo > a.band(m):
        return Verdict(REFUTED, f"ΔFID interval wholly above +{m:g}% of dense FID: worse")
    if a.hi < -a.band(m):
        return Verdict(REFUTED, f"ΔFID interval wholly below −{m:g}% of dense FID: better than dense")
    if inside:
        return Verdict(REPRODUCED, f"ΔFID interval inside ±{m:g}% of dense FID; no other measure resolved worse")
    return Verdict(NOT_RESOLVED, f"ΔFID interval crosses ±{m:g}% of dense FID")


def small_loss(claim: Claim, a: Point) -> Verdict:
    m = claim.margin_pct
    none = _incomplete(a)
    if none:
        return none
    others = a.call.named(Q.WORSE, exclude=Q.FRONT_AXES)   # a quality loss FID does not show (issue: FID
    if others:                                                # rewarded varied samples with wrong classes)
        return Verdict(REFUTED, f"{' and '.join(others)} resolved worse"
                       + (f" (ΔFID upper bound {a.pct(a.hi):+.2f}% ≤ +{m:g}%)" if a.hi <= a.band(m) else ""))
    if a.hi <= a.band(m):
        return Verdict(REPRODUCED, f"ΔFID upper bound {a.pct(a.hi):+.2f}% ≤ +{m:g}% of dense FID; no other measure "
                                   f"resolved worse")
    if a.lo > a.band(m):
        return Verdict(REFUTED, f"ΔFID lower bound {a.pct(a.lo):+.2f}% > +{m:g}% of dense FID")
    return Verdict(NOT_RESOLVED, f"ΔFID interval [{a.pct(a.lo):+.2f}%, {a.pct(a.hi):+.2f}%] contains +{m:g}%")


def lower_than(claim: Claim, a: Point, b: Point) -> Verdict:
    none = _incomplete(a, b)
    if none:
        return none
    if a.hi < b.lo:
        return Verdict(REPRODUCED, f"{a.name}'s ΔFID interval lies wholly below {b.name}'s")
    if a.lo > b.hi:
        return Verdict(REFUTED, f"{a.name}'s ΔFID interval lies wholly above {b.name}'s")
    return Verdict(NOT_RESOLVED, "the two ΔFID intervals overlap")


def deeper_saves_more(claim: Claim, deep: Point, shallow: Point) -> Verdict:
    m = claim.margin_pct
    if deep.saved is None or shallow.saved is None:
        return Verdict(NOT_RESOLVED, "a MACs ratio is missing")
    if deep.saved <= shallow.saved:
        return Verdict(REFUTED, f"{deep.name} saves {100 * deep.saved:.1f}% of dense MACs, no more than "
                                f"{shallow.name}'s {100 * shallow.saved:.1f}%")
    none = _incomplete(deep)
    if none:
        return none
    more = f"saves {100 * deep.saved:.1f}% against {100 * shallow.saved:.1f}%"
    if deep.lo > deep.band(m):
        return Verdict(REFUTED, f"{more}, but its ΔFID lower bound {deep.pct(deep.lo):+.2f}% > +{m:g}% of its "
                                f"dense FID")
    if deep.hi <= deep.band(m):
        return Verdict(REPRODUCED, f"{more}; ΔFID upper bound {deep.pct(deep.hi):+.2f}% ≤ +{m:g}% of its dense FID")
    return Verdict(NOT_RESOLVED, f"{more}; its ΔFID interval [{deep.pct(deep.lo):+.2f}%, {deep.pct(deep.hi):+.2f}%] "
                                 f"contains +{m:g}%")


class Rule(NamedTuple):
    decide: Callable[..., Verdict]     # (claim, *points in the claim's order) -> Verdict
    text: str                          # the rule as the page states it: {m} margin, {a} / {b} the points


RULES: Dict[str, Rule] = {
    "within": Rule(within_band,
                   "reproduced when the whole ΔFID interval lies inside ±{m}% of dense FID and no other quality "
                   "measure (Δ class accuracy, Δ precision, Δ recall) is resolved worse; refuted when the interval "
                   "lies wholly outside ±{m}% (the verdict says whether better or worse) or another measure is "
                   "resolved worse; else not resolved"),
    "small_loss": Rule(small_loss,
                       "reproduced when the ΔFID interval's upper bound is ≤ +{m}% of dense FID and no other "
                       "quality measure (Δ class accuracy, Δ precision, Δ recall) is resolved worse; refuted when its "
                       "lower bound is > +{m}% or another measure is resolved worse (the verdict names it); else not "
                       "resolved"),
    "lower": Rule(lower_than,
                  "reproduced when {a}'s ΔFID interval lies wholly below {b}'s; refuted when wholly above; else not "
                  "resolved (both are paired with the same dense on the same seeds; non-overlap of two intervals "
                  "is conservative: it needs a larger difference than a test of the difference would, so 'not "
                  "resolved' does not say they are equal)"),
    "deeper": Rule(deeper_saves_more,
                   "at the same τ: reproduced when {a} saves a larger share of its dense MACs than {b} and {a}'s "
                   "ΔFID upper bound is ≤ +{m}% of its own dense FID; refuted when it saves no more, or when its "
                   "ΔFID lower bound is > +{m}% of its dense FID (resolved worse than its dense by more than {m}%); "
                   "else not resolved (MACs are counted by formula, not sampled: compared as numbers)"),
}


def rule_text(claim: Claim) -> str:
    names = dict(zip("ab", claim.points))
    return RULES[claim.rule].text.format(m=f"{claim.margin_pct:g}", **names)


def rule_line(name: str) -> str:
    """A Markdown list item: one rule, in general terms (m, A, B), with what each claim it decides puts there."""
    def uses(c: Claim) -> str:
        parts = ([f"m = {c.margin_pct:g}"] if "{m}" in RULES[name].text else []) + \
                [f"{n} = {p}" for n, p in zip("AB", c.points) if len(c.points) > 1]
        return f"{c.key}: {', '.join(parts)}"
    users = [uses(c) for c in CLAIMS if c.rule == name]
    return f"- **{name}** ({'; '.join(users)}): {RULES[name].text.format(m='m', a='A', b='B')}."


def claim_verdict(claim: Claim, points: Dict[str, Optional[Point]]) -> Verdict:
    """The verdict rule: NOT_RUN when a point of the claim has no row, else the claim's rule on its points."""
    missing = [p for p in claim.points if points.get(p) is None]
    if missing:
        return Verdict(NOT_RUN, f"no row of {', '.join(missing)}")
    return RULES[claim.rule].decide(claim, *(points[p] for p in claim.points))


# ---------------------------------------------------------------------------------------------- rows -> points
def entry_keys(df) -> List[str]:
    """'entry' or 'entry/twin' per row, as CLAIMS names points (from the sweep columns, else the point id)."""
    out = []
    for entry, twin, point in zip(D.col(df, "sweep_entry"), D.col(df, "sweep_twin"), D.col(df, "sweep_point")):
        if not entry and point:         # <model>/<entry>[/<axes>][/<twin>]
            entry = str(point).split("/")[1] if "/" in str(point) else ""
        out.append(f"{entry}/{twin}" if twin else str(entry or ""))
    return out


def claim_points(df) -> Dict[str, Point]:
    """{entry key: Point} of the claims sweep's rows (the last row of a key where a model override doubled it)."""
    dense = Q.dense_fids(df)
    calls = Q.quality_calls(df)
    ratio, macs, models = D.col(df, "macs_ratio"), D.col(df, "macs_analytic_all"), D.col(df, "model")
    delta = list(zip(*(D.col(df, c) for c in ("fid_delta", "fid_delta_ci_low", "fid_delta_ci_high"))))
    samples, stops = D.col(df, "samples"), D.col(df, "resolve_stop_reason")
    records = df.to_dict("records")
    out = {}
    for i, (key, name) in enumerate(zip(entry_keys(df), D.point_labels(df))):
        r = ratio[i]
        if r is None and macs[i] is not None:   # older rows: the ratio from the dense row's MACs
            dm = D.dense_value(df, models[i], "macs_analytic_all")
            r = macs[i] / dm if dm else None
        out[key] = Point(name, *delta[i], dense[i], r, samples[i], stops[i], Q.interval_level(records[i]), calls[i])
    return out


# ---------------------------------------------------------------------------------------------- the page
def _each(points: List[Point], text: Callable[[Point], str]) -> str:
    """One cell over a claim's points: the text alone for one point, 'name: text' joined for several."""
    if len(points) == 1:
        return text(points[0])
    return "; ".join(f"{p.name}: {text(p)}" for p in points)


def _ours(p: Point) -> str:
    if p.delta is None:
        return "-"
    out = D.delta_text(p.delta, p.lo, p.hi)
    if p.dense_fid:
        out += (f" ({p.pct(p.delta):+.1f}%" + (f" [{p.pct(p.lo):+.1f}, {p.pct(p.hi):+.1f}]" if p.complete else "")
                + f" of dense FID {p.dense_fid:.3g})")
    return out + ("" if abs(p.level - 95) < 1e-9 else f" at {p.level:.4g}%")


def _samples(p: Point) -> str:
    return samples_text(p.samples, p.stop)


def samples_text(n, stop) -> str:
    """A sample count, with why a resolving run stopped there."""
    return "-" if n is None else f"{int(n):,}" + (f" ({stop})" if stop else "")


def _others(p: Point) -> str:
    """The quality measures other than ΔFID with their calls."""
    parts = [f"{m} {c}" for m, c in p.call.calls.items() if m not in Q.FRONT_AXES and c is not None]
    return "; ".join(parts) if parts else "not measured"


def claim_rows(df) -> List[Tuple[Claim, List[Point], Verdict]]:
    points = claim_points(df)
    out = []
    for claim in CLAIMS:
        verdict = claim_verdict(claim, points)
        out.append((claim, [points[p] for p in claim.points if p in points], verdict))
    return out


HEADER = ["Claim", "Paper's figure", "Points", "Ours: ΔFID [CI] (% of dense FID)", "N (stop)", "MACs saved",
          "Other quality measures", "Verdict", "Rule"]


def table_rows(rows) -> List[List[str]]:
    out = []
    for claim, points, verdict in rows:
        if verdict.word == NOT_RUN:
            out.append([claim.key, f"{claim.paper}: {claim.stated}", ", ".join(claim.points), "-", "-", "-", "-",
                        NOT_RUN, f"{verdict.because}; {rule_text(claim)}"])
            continue
        out.append([claim.key, f"{claim.paper}: {claim.stated}", ", ".join(p.name for p in points),
                    _each(points, _ours), _each(points, _samples),
                    _each(points, lambda p: "-" if p.saved is None else f"{100 * p.saved:.1f}%"),
                    _each(points, _others),
                    verdict.word, f"{verdict.because}. Rule: {rule_text(claim)}"])
    return out


def _has_claims(ctx: Context):
    if CLAIMS_SWEEP not in set(D.col(ctx.df, "sweep")):
        raise Skip(f"no rows of the {CLAIMS_SWEEP} sweep (sweeps/{CLAIMS_SWEEP}.yaml)")
    return ctx.df[[s == CLAIMS_SWEEP for s in D.col(ctx.df, "sweep")]]


@register_report("claims", "each paper claim: its figure, ours with interval and N, MACs saved, and reproduced / "
                 "refuted / not resolved by a stated rule", order=5)
def claims_page(ctx: Context) -> List[str]:
    df = _has_claims(ctx)
    rows = claim_rows(df)
    cells = table_rows(rows)
    counts = {w: sum(v.word == w for _, _, v in rows) for w in (REPRODUCED, REFUTED, NOT_RESOLVED, NOT_RUN)}
    tally = ", ".join(f"{n} {w}" for w, n in counts.items() if n)
    intro = (f"Each claim as its paper states it, what the {CLAIMS_SWEEP} sweep measured at the points that decide "
             f"it, and one word by the rule beside it ({tally}). ΔFID is paired with dense (same labels and seeds); "
             f"N is the sample count (and why a resolving run stopped there); MACs saved is 1 − routed transformer "
             f"MACs / dense. Other quality measures: the quality vector (methods.md).{Q.level_note(df)}")
    facts = ctx.caption(shown=df)
    md = [f"# Paper claims: {tally}", ""]
    md += [f"> **WARNING:** {w}." for w in ctx.warnings] + ([""] if ctx.warnings else [])
    md += [intro, "", S.markdown_table(HEADER, cells).rstrip("\n"), "", "## Rules", ""]
    md += [rule_line(name) for name in RULES]
    md += ["", facts, ""]
    files = [S.write_text(os.path.join(ctx.out_dir, "claims.md"), "\n".join(md))]
    # LaTeX: wrapped columns (the statements and rules are sentences)
    spec = "p{1.6cm}p{3.0cm}p{1.8cm}p{2.6cm}p{1.3cm}p{1.0cm}p{1.8cm}p{1.2cm}p{3.6cm}"
    files.append(S.write_text(os.path.join(ctx.out_dir, "claims.tex"),
                              S.latex_table(HEADER, cells, f"{intro} {facts}", "tab:claims", spec=spec,
                                            wide=True)))
    files += points_table(ctx, df)
    return files


def points_table(ctx: Context, df) -> List[str]:
    """Every point of the claims sweep with its whole quality vector and the per-sample measures."""
    vector, labels = Q.vector_cells(df), D.point_labels(df)
    sp, _ = D.paired_intervals(df)
    ratio, agree = D.col(df, "macs_ratio"), D.col(df, "fidelity_token_agreement")
    psnr = list(zip(D.col(df, "fidelity_psnr_db"), D.col(df, "psnr_to_dense_ci_low"),
                    D.col(df, "psnr_to_dense_ci_high")))
    ssim = list(zip(D.col(df, "ssim_to_dense"), D.col(df, "ssim_to_dense_ci_low"), D.col(df, "ssim_to_dense_ci_high")))
    samples = [samples_text(n, stop) for n, stop in zip(D.col(df, "samples"), D.col(df, "resolve_stop_reason"))]
    header = ["Point", "MACs / dense", "Speedup [95% CI]", *Q.vector_header(), "Token agreement",
              "PSNR to dense [CI] (dB)", "SSIM to dense [CI]", "N (stop)"]
    rows = [[labels[i], S.fmt(ratio[i], ".3f"), D.speedup_text(*sp[i]), *vector[i], S.fmt(agree[i], ".3f"),
             D.delta_text(*psnr[i], ".3g"), D.delta_text(*ssim[i], ".3f"), samples[i]]
            for i in range(len(df))]
    return S.save_table(ctx.out_dir, "claims_points", header, rows,
                        f"Every point of the {CLAIMS_SWEEP} sweep: cost, the quality vector (methods.md) and "
                        f"the per-sample measures against dense.{Q.level_note(df)} {ctx.caption(shown=df)}")
