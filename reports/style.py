"""Paper-size figures (3.3 in single column, >= 7 pt), a colour-blind-safe palette, atomic writes of PNG+PDF with a
caption sidecar, and Markdown/LaTeX tables."""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from bench.atomic import atomic_path, atomic_write_text

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


def save_figure(fig, out_dir: str, stem: str, caption: str) -> List[str]:
    """stem.png + stem.pdf + stem.md (the caption), each written atomically."""
    import matplotlib.pyplot as plt
    paths = []
    for ext in ("png", "pdf"):
        p = os.path.join(out_dir, f"{stem}.{ext}")
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    paths.append(write_text(os.path.join(out_dir, f"{stem}.md"), f"**{stem}** — {caption}\n"))
    return paths


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


def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    try:
        if v != v:
            return "-"
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def fid_text(fid, lo, hi) -> str:
    if fid is None:
        return "-"
    if lo is None or hi is None:
        return fmt(fid)
    return f"{fmt(fid)} [{fmt(lo)}, {fmt(hi)}]"
