"""The shared protocol of one report output, written once as methods.md: samples, seeds, model, machine, how the
intervals are computed, what 'paired' means, the rules the figures apply and what their symbols say. Captions say
what is specific to their figure (reports.style.WORD_LIMIT words at most) and refer here (Context.caption)."""
from __future__ import annotations

import os
from typing import List, Sequence

from reports import data as D
from reports import quality_vector as Q
from reports.style import METHODS_FILE, write_text

SHIPPED_CLASSIFIER = "var-bench-classifier"
INCEPTION = "inception-v3-compat"


def extractor_names(df) -> List[str]:
    """The FID feature extractors of the rows, without their weights' hash ('var-bench-classifier@1a2b' ->
    'var-bench-classifier')."""
    return sorted({str(v).split("@", 1)[0] for v in D.col(df, "extractor") if v is not None})


def features_text(df) -> str:
    """What an FID axis is computed on, for an axis label: a description, never a hash."""
    names = extractor_names(df)
    plain = {SHIPPED_CLASSIFIER: "shipped classifier features", INCEPTION: "Inception-v3 features"}
    return ", ".join(plain.get(n, f"{n} features") for n in names)


def extractor_sentence(df) -> str:
    """A caption sentence naming the extractor(s) of an FID axis ('' when the rows do not say)."""
    names = extractor_names(df)
    return f" FID features: {', '.join(names)}." if names else ""


def short_warning(w: str) -> str:
    """A warning in a few words, for a caption ('incomplete sweep: its manifest ...' -> 'incomplete sweep';
    '3 of 9 rows timed on a noisy machine (...)' -> 'noisy timing (3/9 rows)'; the overview's 'tau: ...' keeps
    its sweep); methods.md states it whole."""
    import re
    sweep = re.match(r"([\w.-]+): (?=\d+ of \d+ rows timed|no paired timing|incomplete sweep)", w)
    prefix, rest = (sweep.group(0), w[sweep.end():]) if sweep else ("", w)
    noisy = re.match(r"(\d+) of (\d+) rows timed on a noisy machine", rest)
    if noisy:
        return f"{prefix}noisy timing ({noisy.group(1)}/{noisy.group(2)} rows)"
    if rest.startswith("no paired timing"):
        return f"{prefix}no paired timing"
    cut = min([i for i in (rest.find(":"), rest.find(" (")) if i > 0] or [len(rest)])
    return prefix + rest[:cut].strip()


def _uniq(df, name: str) -> str:
    vals = sorted({str(v) for v in D.col(df, name) if v is not None})
    return ", ".join(vals) if vals else "?"


def methods_text(df, flops: str = "analytic_all", warnings: Sequence[str] = (), title: str = "") -> str:
    """The methods note of one report output (Markdown)."""
    _, flops_desc = D.flops_column(df, flops)
    lines = [f"# Methods{': ' + title if title else ''}", "",
             "What every figure and table of this report shares; each caption says only what is specific to it.", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- **WARNING:** {w}." for w in warnings] + [""]
    lines += ["## Runs", "",
              f"- {len(df)} run{'' if len(df) == 1 else 's'}, sweep id {_uniq(df, 'sweep_id')}",
              f"- model {_uniq(df, 'model')} (depth {_uniq(df, 'model_depth')})",
              f"- {_uniq(df, 'samples')} samples per run, seed {_uniq(df, 'seed')}, batch {_uniq(df, 'batch_size')}",
              f"- sampling: cfg {_uniq(df, 'cfg')}, top-k {_uniq(df, 'top_k')}, top-p {_uniq(df, 'top_p')}",
              f"- machine: {_uniq(df, 'env_device_name')} ({_uniq(df, 'device')}, {_uniq(df, 'env_threads')} "
              f"threads, host {_uniq(df, 'env_host')})", ""]
    lines += ["## Measures and intervals", "",
              f"- FID: features of {_uniq(df, 'extractor')} (extractor@weights hash) against {_uniq(df, 'reference')}; "
              f"axis labels name the features ({features_text(df) or 'FID'}). FID intervals: class-stratified "
              f"bootstrap 95%.",
              f"- MACs: {flops_desc or 'no MAC column'}; transformer only (decoder excluded), CFG rows included; "
              f"'saved' is 1 − MACs / the same model's dense MACs."]
    if D.has_paired(df):
        lines.append(f"- Paired: a method is measured against dense inside the same trial, on the same class labels "
                     f"and seeds. {D.PAIRED_CI_TEXT} ({_uniq(df, 'timing_rounds')} rounds per trial). Time / dense "
                     f"is 1 / speedup; its interval is 1 / the speedup interval.")
    else:
        lines.append("- No paired timing in these rows: time / dense divides absolute times of different trials.")
    level = Q.level_note(df).strip()
    if level:
        lines.append(f"- {level}")
    lines += ["", "## Rules", "",
              f"- Quality vector ({', '.join(m.header for m in Q.MEASURES)}): {Q.QUALITY_RULE}.",
              f"- Resolution (paired figures and tables): {D.RESOLUTION_RULE}.",
              f"- ΔFID resolved (filled markers): {Q.resolved_legend(df)[0]}; hollow markers: "
              f"{Q.resolved_legend(df)[1]} (or no ΔFID interval).",
              "- Pareto front (FID figures): the points no other point beats on both point estimates (cost and FID "
              "minimised), among the points no off-axis quality measure calls worse; intervals are not used "
              "(paired_tradeoff says what is resolved).", "",
              "## Symbols", "",
              "- black star: the dense model; bars: 95% intervals (vertical: FID or ΔFID; horizontal: paired "
              "speedup, drawn as time / dense where the axis is time).",
              "- ringed points on a dotted staircase: the Pareto front.",
              "- points at the same cost (e.g. a DMoE point and its FLOP-matched twin, or dense rows of models of "
              "the same size) are set side by side by a small fraction of the axis so that none hides another; "
              "the tables hold the exact values.", ""]
    return "\n".join(lines)


def write_methods(out_dir: str, df, flops: str = "analytic_all", warnings: Sequence[str] = (),
                  title: str = "") -> str:
    return write_text(os.path.join(out_dir, METHODS_FILE), methods_text(df, flops, warnings, title))
