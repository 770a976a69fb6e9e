"""The report's index.html (reports/html.py) from hand-made rows: warnings first, every image embedded and decodable,
every table with as many body rows as its Markdown file, every link resolving, every inserted text escaped; then the
same page in a real headless Chromium (marked `browser`: skipped without chromium + chromedriver + selenium unless
VARBENCH_REQUIRE_BROWSER=1, as in CI, makes that a failure)."""
import base64
import io
import os
import re
import shutil
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

from tests.test_report import DENSE_MACS, PAIRED_POINTS, _paired, _row

EVIL = "<script>alert(1)</script> [x](javascript:alert(2)) & &amp; <b>"
ENV = dict(env_code_commit="0123abc", env_harness="0.1.0", env_torch="2.4.0", env_python="3.11.2",
           env_platform="Linux-test")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """What the checks need of a page: ids, links, images, tables (body rows, header cells) and whether every
    element is closed in order."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.ids, self.hrefs, self.imgs, self.tables, self.scripts = [], [], [], [], 0
        self.stack, self.errors, self.section, self.part = [], [], None, None
        self.doctype = text.lstrip().lower().startswith("<!doctype html>")
        self.text = text
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"never closed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section" and "id" in a:
            self.section = a["id"]
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self.tables.append(dict(section=self.section, head=0, body=0, has_head=False))
        if tag in ("thead", "tbody"):
            self.part = tag
            self.tables[-1]["has_head"] |= tag == "thead"
        if tag == "tr" and self.tables:
            self.tables[-1]["body" if self.part == "tbody" else "head"] += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("thead", "tbody"):
            self.part = None


def md_table_rows(path):
    """Body rows of each pipe table of a Markdown file (counted here, not by the code under test)."""
    counts, n = [], None
    for line in open(path, encoding="utf-8").read().splitlines() + [""]:
        if line.startswith("|"):
            n = 0 if n is None else n + 1
        elif n is not None:
            counts.append(n - 1)          # less the |---| line
            n = None
    return counts


def expected_rows(out_dir, page):
    """{section id: body rows of its tables, in order} from the Markdown files the sections name."""
    out = {}
    for section in {t["section"] for t in page.tables if t["has_head"]}:
        stem = section[len("r-"):]
        out[section] = md_table_rows(os.path.join(out_dir, f"{stem}.md"))
    return out


def check_page(out_dir):
    """The checks any index.html must pass; returns the parsed page."""
    text = open(os.path.join(out_dir, "index.html"), encoding="utf-8").read()
    page = Page(text)
    assert page.doctype and not page.errors, page.errors
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    assert page.scripts == 1                                  # the page's own sorting script, nothing inserted
    from reports.html import _SCRIPT, _STYLE
    assert _SCRIPT in text and _STYLE in text                 # as written, not escaped
    from PIL import Image
    for src in page.imgs:
        if src.startswith("data:"):
            head, data = src.split(",", 1)
            assert head == "data:image/png;base64"
            im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            assert im.size[0] > 0 and im.size[1] > 0
        else:
            assert not urlparse(src).scheme and os.path.isfile(os.path.join(out_dir, unquote(src))), src
    for href in page.hrefs:
        if href.startswith("#"):
            assert href[1:] in page.ids, href
        else:
            u = urlparse(href)
            assert not u.scheme and not u.netloc and not href.startswith("/"), href
            assert os.path.isfile(os.path.join(out_dir, unquote(u.path))), href
    got = {}
    for t in page.tables:
        if t["has_head"]:
            assert t["head"] == 1, t
            got.setdefault(t["section"], []).append(t["body"])
    assert got == expected_rows(out_dir, page)
    return page


# ---------------------------------------------------------------------------------------------- a hand-made report
def report_rows():
    rows = [_paired(_row("pr", "pr-1", "m/dense", "dense", DENSE_MACS, 10.0, extra=ENV), (1.0, 1.0, 1.0),
                    (0.0, 0.0, 0.0))]
    for point, (sp, dq, _) in PAIRED_POINTS.items():
        rows.append(_paired(_row("pr", "pr-1", point, "dmoe", 0.8e9, 10.0 + dq[0], params=dict(tau=0.5), extra=ENV),
                            sp, dq, noisy=point == "m/d"))
    rows[1]["method_label"] = EVIL                            # a user's label reaches the paired table's cells
    rows.append(_row("pr", "pr-1", "m/unpaired", "pruned-ffn", 0.9e9, 10.6, extra=ENV))   # drawn in part
    return rows


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """`bench report` of one hand-made sweep: a noisy row, a row without paired timing, a manifest of one trial
    more than the rows (incomplete), and a label that is markup."""
    from bench.results import append_row
    from bench.sweep import write_manifest
    from reports import build_reports
    root = tmp_path_factory.mktemp("html")
    store = str(root / "store")
    rows = report_rows()
    for r in rows:
        append_row(store, r)
    write_manifest(store, dict(sweep="pr", sweep_id="pr-1", created_at="2026-01-01T00:00:00+00:00",
                               trials=[dict(key=f"pr-1/{i}") for i in range(len(rows) + 1)]))
    written, _ = build_reports(store, "pr", str(root / "out"))
    out = str(root / "out" / "pr")
    assert os.path.join(out, "index.html") in written
    return out


def test_report_page_is_whole_and_resolves(report_dir):
    page = check_page(report_dir)
    text = page.text
    # every figure and table the report wrote is on the page, figures embedded (no file needed to show them)
    stems = {os.path.splitext(f)[0] for f in os.listdir(report_dir) if f.endswith((".png", ".tex"))}
    assert {s[len("r-"):] for s in page.ids if s.startswith("r-")} == stems | {"methods"}   # + the protocol
    assert "Measures and intervals" in text and "Symbols" in text   # methods.md's sections, on the page
    assert len(page.imgs) == sum(f.endswith(".png") for f in os.listdir(report_dir))
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
    # warnings first: incomplete sweep, the noisy row, what was drawn in part
    warn = text.index('id="warnings"')
    assert warn < text.index('<section id="r-')
    top = text[warn:text.index("</section>", warn)]
    assert "incomplete sweep: its manifest lists 7 trials, 6 have rows" in top
    assert "1 of 6 rows timed on a noisy machine" in top and "m/d" in top
    assert "pareto_fid_vs_time: 1 run(s) without a paired speedup not drawn" in top
    # the run facts: N, machine, commit, versions from the env_* columns, and the report's own
    facts = text[text.index('<section id="facts">'):]
    for fact in ("<td>64</td>", "<td>Test CPU</td>", "<td>0123abc</td>", "<td>2.4.0</td>", "<td>3.11.2</td>",
                 "Linux-test", "This report was drawn", "jinja2"):
        assert fact in facts, fact
    # the label is text: escaped, no element or link made of it
    assert "&lt;script&gt;alert(1)&lt;/script&gt; [x](javascript:alert(2))" in text
    assert "javascript:" not in "".join(page.hrefs) and "<b>" not in text
    # README.md names the page
    assert "- index.html" in open(os.path.join(report_dir, "README.md")).read()


def test_page_from_hand_made_files(tmp_path):
    """write_page alone: a figure, a table, a text file and an unknown file; every text given is escaped."""
    from PIL import Image
    from reports.html import write_page
    d = str(tmp_path)
    Image.new("RGB", (30, 20), "white").save(os.path.join(d, "fig.png"))
    files = [os.path.join(d, n) for n in ("fig.png", "fig.pdf", "fig.md", "tab.md", "tab.tex", "notes.md",
                                          "extra.csv")]
    for f in files[1:]:
        open(f, "w").close()
    open(files[2], "w").write("**fig** — a caption with `code` & <i>markup</i>.\n")
    open(files[3], "w").write("| A | B<b> |\n|---|---|\n| 1 | x |\n| 2 | <img src=x onerror=alert(1)> |\n"
                              "| 3 | [l](http://example.com) |\n\nThe caption.\n\n| C |\n|---|\n| only |\n")
    open(files[5], "w").write("# A heading\n\nrows: 9\n")
    df = pd.DataFrame([dict(samples=8, env_device_name="CPU <x>", env_threads=2, env_code_commit="c0ffee",
                            env_new_column="kept")])
    path = write_page(d, "t <&> \"q\"", df, files, skipped=["tau: fewer than two τ", "fig: a note"],
                      warnings=["w <b>1</b>"], partial=["fig: a note"], what={"tau": "τ <curve>"})
    page = check_page(d)
    text = open(path, encoding="utf-8").read()
    assert "<title>Report: t &lt;&amp;&gt; &#34;q&#34;</title>" in text
    assert "w &lt;b&gt;1&lt;/b&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "CPU &lt;x&gt;" in text and "τ &lt;curve&gt;" in text and "<td>kept</td>" in text
    assert page.imgs and page.imgs[0].startswith("data:image/png;base64,")
    assert "http://" not in "".join(page.hrefs) and "<h3>A heading</h3>" in text
    assert "extra.csv" in page.hrefs and "fig.pdf" in page.hrefs and "tab.tex" in page.hrefs
    not_drawn = text[text.index('id="not-drawn"'):]
    assert "tau: fewer than two τ" in not_drawn and "fig: a note" not in not_drawn    # a note is a warning


# ---------------------------------------------------------------------------------------------- a real browser
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium():
    """(chromium, chromedriver) of this machine, before the report is drawn; skipped (or, with
    VARBENCH_REQUIRE_BROWSER=1, failed) when either or selenium is missing."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        why = (f"headless-browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; "
               f"pip install selenium)")
        if os.environ.get("VARBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"VARBENCH_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return browser, driver


def _driver(chromium, profile):
    """selenium's Chrome driving the system's chromium (nothing downloaded: both paths given)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = chromium
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", "--window-size=1280,900"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def _sort_key(text):
    """The page's numeric sort key of a cell: its leading number (as the script reads it)."""
    text = re.sub(r"(\d),(?=\d{3}(\D|$))", r"\1", text.strip().replace("\u2212", "-"))
    m = re.match(r"^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?", text, re.I)
    return float(m.group(0)) if m else None


@pytest.mark.browser
def test_report_page_in_headless_chromium(chromium, report_dir, tmp_path):
    from selenium.webdriver.common.by import By
    drv = _driver(chromium, tmp_path / "profile")
    try:
        url = "file://" + os.path.join(report_dir, "index.html")
        drv.get(url)
        assert drv.title == "Report: pr"
        # every image decoded
        imgs = drv.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        assert imgs and all(done and w > 0 for done, w in imgs), imgs
        # every sortable table shows as many rows as the Markdown file behind it
        page = Page(open(os.path.join(report_dir, "index.html"), encoding="utf-8").read())
        want = expected_rows(report_dir, page)
        got = drv.execute_script("""
            const out = {};
            document.querySelectorAll('main table').forEach(t => {
              if (!t.tHead) return;
              const id = t.closest('section').id;
              (out[id] = out[id] || []).push(t.tBodies[0].rows.length);
            });
            return out;""")
        assert got == want and want
        # a click on a column header sorts by it, a second click reverses
        table = drv.find_element(By.CSS_SELECTOR, "#r-paired_summary table")
        headers = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        col = next(i for i, h in enumerate(headers) if h.startswith("Speedup"))
        button = table.find_elements(By.CSS_SELECTOR, "thead th button")[col]

        def column():
            return [r.find_elements(By.TAG_NAME, "td")[col].text for r in table.find_elements(By.CSS_SELECTOR,
                                                                                             "tbody tr")]
        before = column()
        button.click()
        up = [_sort_key(c) for c in column() if _sort_key(c) is not None]
        assert up == sorted(up) and len(up) >= 3 and sorted(column()) == sorted(before)
        th = table.find_elements(By.CSS_SELECTOR, "thead th")[col]
        assert th.get_attribute("aria-sort") == "ascending"
        button.click()
        down = [_sort_key(c) for c in column() if _sort_key(c) is not None]
        assert down == sorted(down, reverse=True) and th.get_attribute("aria-sort") == "descending"
        # every link resolves: anchors to an element, files (resolved by the browser) to a file beside the page
        links = drv.execute_script("return Array.from(document.links).map(a => [a.getAttribute('href'), a.href]);")
        assert links
        for raw, resolved in links:
            if raw.startswith("#"):
                assert drv.execute_script("return document.getElementById(arguments[0]) !== null;", raw[1:]), raw
            else:
                u = urlparse(resolved)
                assert u.scheme == "file" and os.path.isfile(unquote(u.path)), (raw, resolved)
        # an anchor link moves to its section
        drv.find_element(By.CSS_SELECTOR, "nav a[href='#facts']").click()
        assert drv.execute_script("return location.hash;") == "#facts"
        # no console error (scripts, images, the page itself)
        severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        shot = os.environ.get("VARBENCH_PAGE_SCREENSHOT")
        if shot:                         # the whole page (its table sorted), for a person to look at
            h = drv.execute_script("return document.documentElement.scrollHeight;")
            drv.set_window_size(1280, min(h + 100, 16000))
            drv.save_screenshot(shot)
    finally:
        drv.quit()


def test_claims_document_on_the_page(tmp_path):
    """A whole Markdown document (the claims page: heading, warning, table, rules) becomes one section: its table
    sortable with a row per claim, its headings below the page's."""
    from reports.claims import CLAIMS, RULES, claims_page
    from reports.context import Context
    from reports.html import write_page
    from tests.test_claims_report import CLAIM_ROWS
    df = pd.DataFrame([r for r, _ in CLAIM_ROWS])
    d = str(tmp_path)
    files = claims_page(Context(df, d, warnings=["incomplete sweep: 3 of 4"]))
    write_page(d, "claims", df, files, warnings=["incomplete sweep: 3 of 4"])
    page = check_page(d)
    tables = {t["section"]: t["body"] for t in page.tables if t["has_head"]}
    assert tables == {"r-claims": len(CLAIMS), "r-claims_points": len(CLAIM_ROWS)}
    text = page.text
    section = text[text.index('<section id="r-claims"'):text.index('<section id="r-claims_points"')]
    assert "<h3>Paper claims:" in section and "<h4>Rules</h4>" in section and "<blockquote>" in section
    assert section.count("<li>") == len(RULES) and "FastVAR: &lt; 1% quality drop" in section
    assert "lower bound is &gt; +1%" in section
