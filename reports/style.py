"""Paper-size figures (3.3 in single column, >= 7 pt), a colour-blind-safe palette, atomic writes of PNG+PDF with a
caption sidecar, and Markdown/LaTeX tables."""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from bench.atomic import atomic_path, atomic_write_text
from bench.log import get_logger
from reports.data import is_missing

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency; black is kept for dense
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999"]
DENSE_COLOR = "#000000"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
SINGLE = 3.3     # inches: one column of a two-column paper
DOUBLE = 6.9     # inches: full width
HEIGHT = 2.4


def setup():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({
        "font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
        "legend.fontsize": 7, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
        "lines.linewidth": 1.2, "lines.markersize": 4, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
        "savefig.dpi": 300, "pdf.fonttype": 42, "ps.fonttype": 42, "figure.dpi": 100,
    })
    return plt


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def write_text(path: str, text: str) -> str:
    return atomic_write_text(path, text)


WORD_LIMIT = 60          # a caption says what is specific to its figure; the shared protocol is in methods.md
METHODS_FILE = "methods.md"


def words(text: str) -> int:
    return len(text.split())


def save_figure(fig, out_dir: str, stem: str, caption: str) -> List[str]:
    """stem.png + stem.pdf + stem.md (the caption), each written atomically. A caption over WORD_LIMIT words is
    logged (what every figure shares belongs in methods.md)."""
    import matplotlib.pyplot as plt
    if words(caption) > WORD_LIMIT:
        get_logger(__name__).warning(f"caption of {stem} has {words(caption)} words (limit {WORD_LIMIT})")
    paths = []
    for ext in ("png", "pdf"):
        p = os.path.join(out_dir, f"{stem}.{ext}")
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    paths.append(write_text(os.path.join(out_dir, f"{stem}.md"), f"**{stem}** — {caption}\n"))
    return paths


# ---------------------------------------------------------------------------------------------- axes
def tick_formatter(max_decimals: int = 4):
    """A matplotlib Formatter: plain decimals, as few as write every tick exactly, the same number on one axis
    (0.285, 0.2875, 0.29 -> '0.2850', '0.2875', '0.2900'; never a trailing '0.28500' from a 5-decimal default), no
    shared offset, so each label reads as its value."""
    from matplotlib.ticker import Formatter

    def text(x, d):
        if abs(x) >= 1e5 or (x != 0 and abs(x) < 10 ** -max_decimals):
            return f"{x:.1e}"
        t = f"{x:.{d}f}"
        return t[1:] if t.startswith("-") and float(t) == 0 else t

    class Decimals(Formatter):
        ticks: List[float] = []

        def set_locs(self, locs):
            self.ticks = [float(v) for v in locs]

        def decimals(self):
            """The fewest decimals that write every tick exactly (a tick at 0.2875 is never '0.287'), and so
            distinctly."""
            locs = self.ticks

            def exact(d):
                return all(abs(float(text(v, d)) - v) <= 1e-9 * max(1.0, abs(v)) for v in locs
                           if 10 ** -max_decimals <= abs(v) < 1e5)
            return next((d for d in range(max_decimals + 1)
                         if exact(d) and len({text(v, d) for v in locs}) == len(locs)), max_decimals)

        def __call__(self, x, pos=None):
            return text(x, self.decimals())

        def format_ticks(self, values):
            self.set_locs(values)
            d = self.decimals()
            return [text(v, d) for v in values]
    return Decimals()


def tidy_ticks(ax, axis: str = "x", nbins: int = 4) -> None:
    """At most nbins+1 round ticks with short, distinct labels: a 3.3-inch axis holds four or five labels."""
    from matplotlib.ticker import MaxNLocator
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]))
    target.set_major_formatter(tick_formatter())


def dodge(xs: Sequence[Optional[float]], ys: Optional[Sequence[Optional[float]]] = None, step: float = 0.015,
          tol: float = 0.005) -> List[Optional[float]]:
    """x positions with coincident points set side by side: points whose x lie within tol of the x span (and,
    given ys, whose y lie within tol of the y span too) are spread step x span apart, centred on their mean x.
    Draw with the result, say so in the caption; the values stay in the tables."""
    have = [i for i, x in enumerate(xs) if x is not None and (ys is None or ys[i] is not None)]
    out = list(xs)
    if len(have) < 2:
        return out

    def span(vals):
        lo, hi = min(vals), max(vals)
        return hi - lo if hi > lo else (abs(hi) or 1.0)
    sx = span([xs[i] for i in have])
    sy = span([ys[i] for i in have]) if ys is not None else None
    groups: List[List[int]] = []
    for i in sorted(have, key=lambda i: (xs[i], i)):
        for g in groups:
            if abs(xs[i] - xs[g[0]]) <= tol * sx and (ys is None or abs(ys[i] - ys[g[0]]) <= tol * sy):
                g.append(i)
                break
        else:
            groups.append([i])
    for g in groups:
        if len(g) > 1:
            g = sorted(g)                       # table order: the same point keeps its side in every figure
            centre = sum(xs[i] for i in g) / len(g)
            for k, i in enumerate(g):
                out[i] = centre + (k - (len(g) - 1) / 2) * step * sx
    return out


def dodged(before: Sequence[Optional[float]], after: Sequence[Optional[float]]) -> bool:
    return any(a is not None and b is not None and a != b for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------------- tables
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
        # symbols pdflatex's default input encoding cannot take
        "τ": r"$\tau$", "→": r"$\rightarrow$", "±": r"$\pm$", "α": r"$\alpha$", "β": r"$\beta$",
        "γ": r"$\gamma$", "Δ": r"$\Delta$", "Σ": r"$\Sigma$", "√": r"$\surd$", "×": r"$\times$", "−": "--",
        "—": "---", "–": "--", "·": r"$\cdot$", "½": r"$\frac{1}{2}$", "²": r"$^2$", "³": r"$^3$",
        "≤": r"$\leq$", "≥": r"$\geq$", "≈": r"$\approx$", "…": r"\ldots{}", "ä": r"\"a",
        "<": r"$<$", ">": r"$>$"}   # OT1 text mode prints < and > as inverted ! and ?
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX))


def _tex_escape(s: str) -> str:
    """LaTeX text for a table cell or caption, in one pass (a replacement is never escaped again)."""
    return _TEX_RE.sub(lambda m: _TEX[m.group(0)], s)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + (f"\n\n{caption}\n" if caption else "\n")


def latex_table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "", label: str = "",
                bold_rows: Optional[Sequence[int]] = None, spec: Optional[str] = None, wide: bool = False) -> str:
    """A booktabs table; spec: the column spec (default: first column left, the others right, for numbers; give
    p{...} columns where cells are sentences), wide: across both columns (table*)."""
    bold = set(bold_rows or [])
    spec = spec or "l" + "r" * (len(header) - 1)
    env = "table*" if wide else "table"
    out = [rf"\begin{{{env}}}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, r in enumerate(rows):
        cells = [_tex_escape(str(c)) for c in r]
        if i in bold:
            cells = [rf"\textbf{{{c}}}" for c in cells]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{_tex_escape(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out.append(rf"\end{{{env}}}")
    return "\n".join(out) + "\n"


def save_table(out_dir: str, stem: str, header, rows, caption: str, bold_rows=None) -> List[str]:
    """stem.md and stem.tex (booktabs), atomically."""
    return [write_text(os.path.join(out_dir, f"{stem}.md"), markdown_table(header, rows, caption)),
            write_text(os.path.join(out_dir, f"{stem}.tex"),
                       latex_table(header, rows, caption, f"tab:{stem.replace('_', '-')}", bold_rows))]


MISSING = "-"    # the tables' mark for a value a row does not have


def fmt(v, spec: str = ".3g") -> str:
    if is_missing(v):          # None, NaN and pandas' NA / NaT (str(pd.NA) would print "<NA>")
        return MISSING
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def fid_text(fid, lo, hi) -> str:
    if is_missing(fid):
        return MISSING
    if is_missing(lo) or is_missing(hi):
        return fmt(fid)
    return f"{fmt(fid)} [{fmt(lo)}, {fmt(hi)}]"
