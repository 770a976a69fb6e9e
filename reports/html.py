"""One HTML page per report: index.html beside the files a report wrote, built from them alone, so it can be mailed.

    write_page(out_dir, "tau", rows, files, skipped, warnings, partial)

Top: the warnings (reports.data.run_warnings: incomplete sweep, noisy timing rows, no paired timing) and what was
drawn only in part (Context.note). Then each file group in the order the report wrote it: a figure (stem.png embedded
as a data URI, its caption from stem.md, links to the PDF and PNG beside the page) or a Markdown file (tables, text)
rendered as HTML, every table sortable by a click on its column header (a few lines of script, nothing fetched). Last:
the run facts (samples, models, machine, commit, versions: the rows' env_* columns) and the report's own (the
harness, commit and libraries that drew it), and what was not drawn with the reason.

Every text the page takes from the rows or the files is escaped: the template by Jinja2's autoescape, the Markdown
files by Python-Markdown with raw HTML, links, images and reference definitions switched off (a cell reading `<b>` or
`[x](y)` is shown as written, never made into an element or a link; Markdown's own emphasis and code spans stay).
"""
from __future__ import annotations

import base64
import datetime
import os
import re
import xml.etree.ElementTree as etree
from typing import Dict, List, Optional, Sequence, Tuple

from bench import __version__
from bench.log import get_logger
from reports import data as D
from reports.style import write_text

logger = get_logger(__name__)
PAGE = "index.html"
LONG_CELL = 60                        # characters: a table cell of sentences, shown 16em wide (30em past 4x)
SHORT_CELL = 24                       # characters: a value ('1.500x [1.400, 1.600]'), kept on one line
FIGURE_EXTS = ("png", "pdf")          # links under a figure, in this order
# the run facts: (label, column) shown first, then every env_* column of the rows
FACT_COLUMNS = [("Samples per run (N)", "samples"), ("Models", "model"), ("Model depth", "model_depth"),
                ("Sweep", "sweep"), ("Sweep id", "sweep_id"), ("Seed", "seed"), ("Batch size", "batch_size"),
                ("Device", "device"), ("Timing rounds per trial", "timing_rounds"),
                ("FID extractor", "extractor"), ("FID reference", "reference"),
                ("Started", "started_at"), ("Finished", "finished_at")]
ENV_LABELS = {"env_device_name": "Machine (CPU / GPU)", "env_threads": "Threads", "env_host": "Host",
              "env_platform": "Platform", "env_code_commit": "Code commit", "env_harness": "var-bench",
              "env_python": "Python", "env_torch": "torch", "env_torch_fidelity": "torch-fidelity",
              "env_fvcore": "fvcore", "env_ray": "ray", "env_cuda_visible_devices": "CUDA_VISIBLE_DEVICES"}
SPAN_COLUMNS = ("started_at", "finished_at")   # shown as first to last
OWN_PACKAGES = ("pandas", "matplotlib", "markdown", "jinja2")


# ---------------------------------------------------------------------------------------------- Markdown as text
def _markdown():
    """A Python-Markdown converter (tables) that renders text only: no raw HTML, links, images or entities."""
    import markdown
    from markdown.extensions import Extension
    from markdown.treeprocessors import Treeprocessor

    class Layout(Treeprocessor):
        """Headings two levels down (the page has h1 and h2), each table in a scrolling box, values on one line and
        cells of sentences wide enough to read."""
        def run(self, root):
            for el in root.iter():
                if re.fullmatch(r"h[1-6]", el.tag):
                    el.tag = f"h{min(6, int(el.tag[1]) + 2)}"
                elif el.tag == "td":
                    n = len("".join(el.itertext()))
                    if n > LONG_CELL or n <= SHORT_CELL:
                        el.set("class", "short" if n <= SHORT_CELL else "longer" if n > 4 * LONG_CELL else "long")
            for parent in list(root.iter()):
                for i, child in enumerate(list(parent)):
                    if child.tag == "table":
                        box = etree.Element("div", {"class": "scroll"})
                        parent.remove(child)
                        box.append(child)
                        parent.insert(i, box)

    class TextOnly(Extension):
        def extendMarkdown(self, md):
            md.preprocessors.deregister("html_block", strict=False)
            md.parser.blockprocessors.deregister("reference", strict=False)
            for name in ("html", "entity", "link", "reference", "image_link", "image_reference", "short_reference",
                         "short_image_ref", "autolink", "automail"):
                md.inlinePatterns.deregister(name, strict=False)
            md.treeprocessors.register(Layout(md), "varbench_layout", 1)

    return markdown.Markdown(extensions=["tables", TextOnly()], output_format="html")


def markdown_html(text: str):
    """Markdown text -> safe HTML (markupsafe.Markup, inserted by the template as is)."""
    from markupsafe import Markup
    return Markup(_markdown().convert(text))


def markdown_table_rows(text: str) -> List[int]:
    """Body rows of each pipe table in a Markdown text (what the page's tables must show)."""
    counts, n = [], None
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            n = -1 if n is None else n + 1          # the header line, then the |---| line counts 0
        elif n is not None:
            counts.append(max(n, 0))
            n = None
    return counts


# ---------------------------------------------------------------------------------------------- the page
class Item:
    """A group of files with one stem: a figure (a PNG) or a Markdown document (tables, text), with its links."""

    def __init__(self, stem: str, anchor: str, kind: str, title: str, body=None, image: str = "",
                 links: Sequence[Tuple[str, str]] = ()):
        self.stem, self.anchor, self.kind, self.title = stem, anchor, kind, title
        self.body, self.image, self.links = body, image, list(links)


def _anchor(stem: str, taken: set) -> str:
    base = "r-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "file")
    a, i = base, 2
    while a in taken:
        a, i = f"{base}-{i}", i + 1
    taken.add(a)
    return a


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _data_uri(path: str, mime: str = "image/png") -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def page_items(out_dir: str, files: Sequence[str]) -> Tuple[List[Item], List[str]]:
    """The page's figures and documents from the files a report wrote (in their order), and the other files."""
    stems: Dict[str, List[str]] = {}
    for f in files:
        if os.path.dirname(os.path.abspath(f)) != os.path.abspath(out_dir) or os.path.basename(f) == PAGE:
            continue
        stem, ext = os.path.splitext(os.path.basename(f))
        stems.setdefault(stem, []).append(ext.lstrip("."))
    items, others, taken = [], [], {"warnings", "contents", "facts", "not-drawn", "other-files"}
    for stem, exts in stems.items():
        links = [(e.upper() if e in FIGURE_EXTS else ("Markdown" if e == "md" else "LaTeX" if e == "tex" else e),
                  f"{stem}.{e}") for e in sorted(exts, key=lambda e: (e not in FIGURE_EXTS, e != "md", e))]
        md = os.path.join(out_dir, f"{stem}.md")
        if "png" in exts:
            body = markdown_html(_read(md)) if "md" in exts else None
            items.append(Item(stem, _anchor(stem, taken), "figure", stem, body,
                              _data_uri(os.path.join(out_dir, f"{stem}.png")), links))
        elif "md" in exts:
            kind = "table" if markdown_table_rows(_read(md)) else "text"
            items.append(Item(stem, _anchor(stem, taken), kind, stem, markdown_html(_read(md)), links=links))
        else:
            others += [name for _, name in links]
    return items, others


def _distinct(df, column: str) -> str:
    """The column's values, each with its row count when they differ ('-' when none)."""
    vals = [str(v) for v in D.col(df, column) if v is not None]
    if not vals:
        return "-"
    counts: Dict[str, int] = {}
    for v in vals:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return vals[0] + ("" if len(vals) == len(df) else f" ({len(vals)} of {len(df)} rows)")
    if column in SPAN_COLUMNS:
        return f"{min(vals)} to {max(vals)}"
    return "; ".join(f"{v} ({n} row{'' if n == 1 else 's'})" for v, n in sorted(counts.items()))


def run_facts(df) -> List[Tuple[str, str]]:
    """(label, value) of the rows: count, samples, models, machine, commit, versions (every env_* column)."""
    facts = [("Runs (rows)", str(len(df)))]
    facts += [(label, _distinct(df, c)) for label, c in FACT_COLUMNS if D.has_values(df, c)]
    env = [c for c in ENV_LABELS if c in df.columns] + sorted(c for c in df.columns
                                                             if c.startswith("env_") and c not in ENV_LABELS)
    facts += [(ENV_LABELS.get(c, c), _distinct(df, c)) for c in env if D.has_values(df, c)]
    return facts


def own_facts() -> List[Tuple[str, str]]:
    """The report's own: when and by what it was drawn."""
    import platform
    from bench.env import package_version   # lazy: pulls torch; the CLI imports this module
    from bench.train import code_commit   # lazy: pulls torch; the CLI imports this module
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return ([("Drawn at", now), ("var-bench", __version__), ("Code commit", code_commit()),
             ("Python", platform.python_version())] + [(p, package_version(p)) for p in OWN_PACKAGES])


def write_page(out_dir: str, title: str, df, files: Sequence[str], skipped: Sequence[str] = (),
               warnings: Sequence[str] = (), partial: Sequence[str] = (), what: Optional[Dict[str, str]] = None) -> str:
    """Write out_dir/index.html from the report's files; returns its path. skipped: 'report: reason' of what was
    not drawn; partial: notes of what was drawn in part; what: {report name: what it draws} for the skipped."""
    from markupsafe import Markup
    items, others = page_items(out_dir, files)
    what = what or {}
    not_drawn = [(s, what.get(s.split(":")[0], "")) for s in skipped if s not in partial]
    page = _template().render(
        title=title, warnings=[markdown_html(w.rstrip(".") + ".") for w in warnings],
        partial=[markdown_html(p) for p in partial], items=items, others=others, not_drawn=not_drawn,
        facts_text=D.caption_facts(df), facts=run_facts(df), own=own_facts(),
        script=Markup(_SCRIPT), style=Markup(_STYLE))      # the page's own constants, not inserted text
    path = write_text(os.path.join(out_dir, PAGE), page)
    logger.debug(f"page {path}: {len(items)} sections, {len(warnings)} warnings")
    return path


def _template():
    import jinja2
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_TEMPLATE)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Report: {{ title }}</title>
<style>{{ style }}</style>
</head>
<body>
<header>
<h1>Report: {{ title }}</h1>
<p class="lede">{{ facts_text }}</p>
</header>
<main>
{% if warnings or partial %}
<section id="warnings" class="warnings" aria-label="Warnings">
<h2>Warnings</h2>
{% if warnings %}
<ul>
{% for w in warnings %}<li>{{ w }}</li>
{% endfor %}
</ul>
{% endif %}
{% if partial %}
<p>Drawn in part:</p>
<ul>
{% for p in partial %}<li>{{ p }}</li>
{% endfor %}
</ul>
{% endif %}
</section>
{% endif %}
<nav id="contents" aria-label="Contents">
<h2>Contents</h2>
<ul>
{% for it in items %}<li><a href="#{{ it.anchor }}">{{ it.title }}</a> <span class="kind">{{ it.kind }}</span></li>
{% endfor %}
<li><a href="#facts">Run facts</a></li>
{% if not_drawn %}<li><a href="#not-drawn">Not drawn</a></li>
{% endif %}
</ul>
</nav>
{% for it in items %}
<section id="{{ it.anchor }}" class="item {{ it.kind }}">
<h2>{{ it.title }}</h2>
{% if it.kind == "figure" %}
<figure>
<img src="{{ it.image }}" alt="Figure {{ it.title }}">
{% if it.body %}<figcaption>{{ it.body }}</figcaption>{% endif %}
</figure>
{% else %}
<div class="doc">{{ it.body }}</div>
{% endif %}
<p class="files">Files:{% for label, name in it.links %} <a href="{{ name }}">{{ label }}</a>{% endfor %}</p>
</section>
{% endfor %}
<section id="facts">
<h2>Run facts</h2>
<div class="facts">
<table class="plain">
<caption>The rows of this report</caption>
<tbody>
{% for k, v in facts %}<tr><th scope="row">{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}
</tbody>
</table>
<table class="plain">
<caption>This report was drawn</caption>
<tbody>
{% for k, v in own %}<tr><th scope="row">{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}
</tbody>
</table>
</div>
</section>
{% if not_drawn %}
<section id="not-drawn">
<h2>Not drawn</h2>
<ul>
{% for s, w in not_drawn %}<li>{{ s }}{% if w %} <span class="what">({{ w }})</span>{% endif %}</li>
{% endfor %}
</ul>
</section>
{% endif %}
{% if others %}
<section id="other-files">
<h2>Other files</h2>
<ul>
{% for name in others %}<li><a href="{{ name }}">{{ name }}</a></li>
{% endfor %}
</ul>
</section>
{% endif %}
</main>
<script>{{ script }}</script>
</body>
</html>
"""

# sorting: numbers by value (the leading number of '1.23x [1.1, 1.3]', '+0.5', '43%', '10,000'), then text; '-' and empty
# cells last in either direction
_SCRIPT = """
(function () {
  "use strict";
  function key(cell) {
    var t = cell.textContent.trim();
    if (t === "" || t === "-") { return [2, 0, ""]; }
    var m = t.replace(/\\u2212/g, "-").replace(/(\\d),(?=\\d{3}(\\D|$))/g, "$1").match(/^[+-]?(\\d+\\.?\\d*|\\.\\d+)(e[+-]?\\d+)?/i);
    return m ? [0, parseFloat(m[0]), t] : [1, 0, t.toLowerCase()];
  }
  function compare(a, b, dir) {
    if (a[0] !== b[0]) { return a[0] - b[0]; }
    if (a[0] === 2) { return 0; }
    var d = a[0] === 0 ? a[1] - b[1] : (a[2] < b[2] ? -1 : a[2] > b[2] ? 1 : 0);
    return d * dir;
  }
  function sortBy(table, col, th) {
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (r, i) {
      return {row: r, key: r.cells[col] ? key(r.cells[col]) : [2, 0, ""], i: i};
    });
    rows.sort(function (a, b) { return compare(a.key, b.key, dir) || a.i - b.i; });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  document.querySelectorAll("main table").forEach(function (table) {
    if (!table.tHead || !table.tBodies.length) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = document.createElement("button");
      button.type = "button";
      button.title = "sort by this column";
      while (th.firstChild) { button.appendChild(th.firstChild); }
      th.appendChild(button);
      button.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
})();
"""

_STYLE = """
:root { --ink: #1a1a1a; --muted: #555; --line: #d0d0d0; --warn-bg: #fff4e0; --warn-line: #d55e00; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 72rem; }
h1 { font-size: 1.6rem; margin: .5rem 0; }
h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; padding-bottom: .2rem; border-bottom: 1px solid var(--line); }
h3, h4, h5, h6 { font-size: 1rem; }
.lede { color: var(--muted); font-size: .9rem; }
.warnings { background: var(--warn-bg); border-left: 4px solid var(--warn-line); padding: .2rem 1rem .5rem;
            margin: 1rem 0; }
.warnings h2 { border: 0; margin-top: .5rem; color: #8a3b00; }
.warnings li p, li p { margin: .2rem 0; }
nav ul { columns: 2 18rem; padding-left: 1.2rem; }
.kind, .what, .files { color: var(--muted); font-size: .85rem; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; max-height: 36rem; border: 1px solid #eee; }
figcaption { font-size: .9rem; margin-top: .4rem; max-width: 60rem; }
.scroll { overflow-x: auto; margin: .5rem 0; }
table { border-collapse: collapse; font-size: .85rem; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .6rem; text-align: left; vertical-align: top; }
td { min-width: 4em; }
td.short { white-space: nowrap; }
td.long { min-width: 16em; }
td.longer { min-width: 30em; }
thead th { background: #f3f5f8; position: sticky; top: 0; }
thead th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer;
                  color: inherit; text-align: left; }
thead th button::after { content: " \\2195"; color: #999; }
thead th[aria-sort=ascending] button::after { content: " \\25B2"; color: var(--ink); }
thead th[aria-sort=descending] button::after { content: " \\25BC"; color: var(--ink); }
tbody tr:nth-child(even) { background: #fafafa; }
blockquote { margin: .5rem 0; padding: .2rem .8rem; border-left: 4px solid var(--warn-line); background: var(--warn-bg); }
code { font-size: .85em; background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
.facts { display: flex; flex-wrap: wrap; gap: 2rem; }
.facts table.plain th { font-weight: 600; white-space: nowrap; }
caption { text-align: left; font-weight: 600; padding-bottom: .3rem; }
"""
