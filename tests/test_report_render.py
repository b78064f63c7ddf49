"""The renderers of `gpuphase report` (gpuphase/report/render.py, gpuphase/report/html.py).

The example fixture in every format with its figures formatted as promised (nulls as —, never 0);
the HTML page well-formed, one SVG per plot and nothing fetched from elsewhere; untrusted labels
escaped in every format; an empty report and an 800-GPU one.
"""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gpuphase.report import html as report_html
from gpuphase.report.html import MULTIPLES_CAP, bin_series, nice_ticks, render_html
from gpuphase.report.render import (WIDTH, clean, evidence_value, joules, money, percent, render_markdown,
                                    render_text, tokens)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "report" / "example.json"
SCHEMA = ROOT / "gpuphase" / "report" / "schema.json"
HOSTILE = "<script>alert(1)</script>|x\ny\x1b[31m\"'&"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def example() -> dict:
    """A fresh copy of the example report (tests change theirs)."""
    return json.loads(FIXTURE.read_text())


def empty_report() -> dict:
    """A report over a range in which nothing was found: no GPUs, services or recommendations."""
    report = example()
    report.update(warnings=[], gpus=[], services=[], recommendations=[])
    fleet = report["fleet"]
    fleet.update(hosts=0, gpus=0, gpu_hours=0, energy_kwh=0, bandwidth_bound_hours=0, cost=None,
                 monthly_savings=None, idle_cost_by_host={})
    fleet["phase_hours"] = dict.fromkeys(fleet["phase_hours"], 0)
    fleet["idle_gpu_hours"] = {"allocated": 0, "unused": 0, "total": 0}
    fleet["idle_cost"] = {"allocated": None, "unused": None, "total": None}
    fleet["tokens"] = {"prefill": None, "decode": None}
    return report


def idle_cost(index: int) -> float:
    """GPU `index`'s idle cost in the big report: a permutation of 0..799 (389 is prime to 800),
    so the 64 most costly are not simply the first or the last 64."""
    return float(index * 389 % 800)


def big_report(count: int = 800) -> dict:
    """100 hosts of 8 GPUs, each with a day of hourly phase buckets and a distinct idle cost."""
    report = example()
    template = report["gpus"][0]
    gpus = []
    for index in range(count):
        gpu = copy.deepcopy(template)
        gpu.update(instance=f"node-{index // 8:03d}:9400", gpu=str(index % 8), uuid=f"GPU-{index:08d}")
        gpu["idle_cost"] = {"allocated": idle_cost(index), "unused": 0.0, "total": idle_cost(index)}
        bucket = template["phase_share_series"][0][1]
        gpu["phase_share_series"] = [[1796212800 + 3600 * hour, dict(bucket)] for hour in range(24)]
        gpus.append(gpu)
    report["gpus"] = gpus
    by_host: dict[str, float] = Counter()
    for gpu in gpus:
        by_host[gpu["instance"]] += gpu["idle_cost"]["total"]
    report["fleet"]["idle_cost_by_host"] = dict(by_host)
    report["fleet"].update(gpus=count, hosts=len(by_host))
    return report


def hostile_report() -> dict:
    """The example with markup, a table pipe, a newline and a terminal escape in its labels."""
    report = example()
    report["gpus"][0]["instance"] = HOSTILE
    report["gpus"][0]["model"] = '"><svg onload=alert(2)>'
    report["gpus"][0]["uuid"] = HOSTILE
    report["services"][0]["service"] = HOSTILE
    report["recommendations"][0]["summary"] = HOSTILE
    report["recommendations"][0]["target"]["instance"] = HOSTILE
    report["recommendations"][2]["options"][0]["detail"] = HOSTILE
    report["fleet"]["idle_cost_by_host"] = {HOSTILE: 34.15}
    report["warnings"].append(HOSTILE)
    return report


class Structure(HTMLParser):
    """Every element closed in order (void elements aside), tag counts, and the text as displayed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.errors: list[str] = []
        self.tags: Counter[str] = Counter()
        self.attributes: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags[tag] += 1
        self.attributes += [value or "" for _, value in attrs]
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags[tag] += 1
        self.attributes += [value or "" for _, value in attrs]

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'} at {self.getpos()}")
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Structure:
    """The page parsed, failing the test on any tag left open or closed out of order."""
    structure = Structure()
    structure.feed(page)
    structure.close()
    assert structure.errors == []
    assert structure.open == []
    return structure


def svgs(page: str) -> list[ET.Element]:
    """Every inline SVG of a page, each parsed as XML (so each is well-formed on its own)."""
    return [ET.fromstring(svg) for svg in re.findall(r"<svg\b.*?</svg>", page, re.S)]


def assert_self_contained(page: str) -> None:
    """Nothing the page would fetch: no script, stylesheet, image, font or import."""
    lowered = page.lower()
    for needle in ("src=", "<link", "url(", "@import", "<script", "<img", "<iframe", "<object"):
        assert needle not in lowered, needle


def md_tables(markdown: str) -> list[list[str]]:
    """The Markdown tables: runs of lines that start with a pipe."""
    tables: list[list[str]] = []
    previous = False
    for line in markdown.splitlines():
        row = line.startswith("|")
        if row and not previous:
            tables.append([])
        if row:
            tables[-1].append(line)
        previous = row
    return tables


def cell_separators(line: str) -> int:
    """The pipes that separate cells (an escaped one is text)."""
    return len(re.findall(r"(?<!\\)\|", line))


def text_row(text: str, first: str, after: str) -> list[str]:
    """A text table row's cells (split on runs of spaces), found by its first cell after a heading."""
    rows = [line.split() for line in text.split(after, 1)[1].splitlines() if line.startswith(first + " ")]
    assert rows, first
    return rows[0]


def sections_in_order(output: str, titles: list[str]) -> None:
    """Each title present, each after the one before."""
    positions = [output.index(title) for title in titles]
    assert positions == sorted(positions)


# --- formatting helpers -----------------------------------------------------------------------


def test_formatters_show_null_as_dash_and_zero_as_zero():
    assert tokens(3030000.0) == "3.03M"
    assert tokens(130000.0) == "130k"
    assert tokens(950) == "950"
    assert tokens(0) == "0"
    assert tokens(None) == "—"
    assert money(1825.0, "USD") == "1,825.00 USD"
    assert money(None, "USD") == "—"
    assert money(0, "EUR") == "0.00 EUR"
    assert percent(0.2549419403076172) == "25.5%"
    assert percent(None) == "—"
    assert joules(0.1489655172413793) == "0.149"
    assert joules(float("nan")) == "—"
    assert evidence_value(0.86, "ratio") == "86.0%"
    assert evidence_value(6.0, "h") == "6.00 h"
    assert evidence_value(None, "h") == "—"
    assert evidence_value("n/a", "") == "n/a"
    assert clean("a\nb\x1b[31m\u202e") == "a b\ufffd[31m\ufffd"


def test_nice_ticks_are_round_and_cover_the_top():
    assert nice_ticks(34.15) == [0, 10, 20, 30, 40]
    assert nice_ticks(13.0)[-1] >= 13.0
    assert nice_ticks(0) == [0.0, 1.0]
    assert all(tick == round(tick, 6) for tick in nice_ticks(0.0123))


def test_long_series_are_binned_and_keep_their_hours():
    # a week at a 5-minute step: 2016 buckets, binned into at most MAX_BINS bars
    series = [[1796212800 + 300 * n, {"prefill": 0.01, "decode": 0.05, "mixed": 0.0, "idle": 0.02}]
              for n in range(2016)]
    binned = bin_series(series, 7 * 86400)
    assert len(binned.bins) == report_html.MAX_BINS
    assert sum(b["decode"] for b in binned.bins) == pytest.approx(0.05 * 2016)
    assert binned.start == 1796212800 - 300
    assert binned.width * len(binned.bins) == pytest.approx(2016 * 300)
    # a gap in the data is an empty bin, not a stretched bar
    gappy = [[3600.0 * hour, {"prefill": 0, "decode": 1, "mixed": 0, "idle": 0}] for hour in (1, 2, 5)]
    assert [sum(b.values()) for b in bin_series(gappy, 0).bins] == [1, 1, 0, 0, 1]
    assert bin_series([], 3600) is None


# --- the example in every format --------------------------------------------------------------


def test_text_report_of_the_example():
    text = render_text(example())
    sections_in_order(text, ["gpuphase report", "Warnings", "Fleet summary", "Recommendations", "Per GPU",
                             "Per service"])
    sections_in_order(text, ["1. reclaim an unused GPU: node-a:9400 gpu 4",
                             "2. consolidate an idle GPU: node-a:9400 gpu 3, service reserved",
                             "3. bandwidth-bound decode", "4. disaggregate prefill and decode: service llama-70b"])
    assert "2026-12-02T11:00:00Z – 2026-12-02T17:00:00Z (6.00 h)" in text
    assert "Monthly saving: 1,825.00 USD" in text
    assert "Monthly saving: —" in text  # disaggregation: saving not known
    assert "monthly savings  3,680.00 USD" in text
    assert "idle cost        34.15 USD (allocated 19.15 USD, unused 15.00 USD)" in text
    assert "DRAM active             86.0%" in text
    assert 'sum_over_time(instance_gpu:gpu_unused_seconds:sum5m{instance="node-a:9400",gpu="4"}[6h]) / 3600' in text
    assert text_row(text, "bandwidth-richer", "3. ") == ["bandwidth-richer", "GPU", "30.00", "USD", "—"]
    # nulls are —, known zeros are 0
    assert text_row(text, "reserved", "Per service") == ["reserved", "1", "1", "6.00", "0", "0", "15.00",
                                                         "—", "—", "—", "—", "—"]
    assert text_row(text, "llama-70b", "Per service") == ["llama-70b", "2", "1", "12.00", "2.90M", "1.07M",
                                                          "30.00", "0.52", "25.70", "0.300", "13.0", "7.0%"]
    gpu_rows = [line.split() for line in text.splitlines() if line.startswith("node-a:9400 ")]
    assert len(gpu_rows) == 10  # five GPUs, their columns split over two blocks to fit
    assert gpu_rows[4] == ["node-a:9400", "4", "NVIDIA", "H100", "80GB", "HBM3", "6.00", "0.00", "0.00", "0.00",
                           "0.00", "6.00", "0.00", "6.00", "15.00"]
    assert gpu_rows[9] == ["node-a:9400", "4", "0.00", "100.0%", "0.42", "—", "—"]
    assert all(len(line) <= WIDTH for line in text.splitlines())
    assert "\x1b" not in text


def test_markdown_report_of_the_example():
    markdown = render_markdown(example())
    sections_in_order(markdown, ["# gpuphase report", "## Warnings", "## Fleet summary", "## Recommendations",
                                 "## Per GPU", "## Per service"])
    assert "### 1. reclaim an unused GPU: node-a:9400 gpu 4" in markdown
    assert "**Monthly saving: 1,825.00 USD**" in markdown
    assert "**Monthly saving: —**" in markdown
    assert "| reserved | 1 | 1 | 6.00 | 0 | 0 | 15.00 | — | — | — | — | — |" in markdown
    assert ("| unused hours | 6.00 h | `sum_over_time(instance_gpu:gpu_unused_seconds:sum5m"
            '{instance="node-a:9400",gpu="4"}[6h]) / 3600` |') in markdown
    assert "| power-cap decode | — | 55 kWh |" in markdown
    assert "- **selector**: `{job=\"gpuphase\"}`" in markdown
    tables = md_tables(markdown)
    assert len(tables) == 8  # phases, 4 evidence and 1 options tables, GPUs, services
    for table in tables:
        assert len({cell_separators(line) for line in table}) == 1, table[0]
    gpu_table = next(table for table in tables if table[0].startswith("| instance |"))
    assert len(gpu_table) == 2 + 5
    assert gpu_table[1].count("---:") == 14


def test_html_report_of_the_example():
    page = render_html(example())
    structure = parse(page)
    assert_self_contained(page)
    charts = svgs(page)
    assert len(charts) == structure.tags["svg"] == 7  # five GPUs' phase share, idle by host, energy per token
    assert [chart.get("class") for chart in charts].count("phase-chart") == 5
    shown = "".join(structure.text)
    sections_in_order(page, ['id="recommendations"', 'id="fleet"', 'id="gpus"', 'id="services"'])
    assert "Monthly saving: 1,825.00 USD" in shown
    assert ("<code>sum_over_time(instance_gpu:gpu_unused_seconds:sum5m{instance=&quot;node-a:9400&quot;,"
            "gpu=&quot;4&quot;}[6h]) / 3600</code>") in page
    assert ('<tr title="GPU-97d3ed17-4c06-03ca-7370-be8370da4344"><td>node-a:9400</td><td>3</td>'
            '<td>NVIDIA H100 80GB HBM3</td><td class="n">6.00</td>') in page
    assert '<td class="n">—</td>' in page and '<td class="n">0.00</td>' in page
    titles = [node.text for chart in charts for node in chart.iter("title")]
    assert "node-a:9400: 34.15 USD" in titles
    assert "reserved prefill: no tokens" in titles
    assert "llama-70b decode: 13.0 J" in titles
    assert any(title.endswith("UTC: idle 100.0% (1.00 h)") for title in titles)  # GPU 3, idle throughout
    for phase in ("prefill", "decode", "mixed", "idle", "unknown"):
        assert f'class="sw ph-{phase}"' in page and f".ph-{phase}{{fill:" in page


# --- untrusted strings ------------------------------------------------------------------------


def test_hostile_labels_are_escaped_in_html():
    report = hostile_report()
    report["recommendations"][0]["evidence"][0]["promql"] = "</code><script>alert(3)</script>"
    page = render_html(report)
    structure = parse(page)
    assert_self_contained(page)
    assert "<svg onload" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;|x y" in page
    assert "&lt;/code&gt;&lt;script&gt;alert(3)" in page
    assert clean(HOSTILE) in "".join(structure.text)
    assert any(clean(HOSTILE) in value for value in structure.attributes)  # row title, aria-label
    assert "\x1b" not in page
    charts = svgs(page)  # the hostile labels are in SVG text and attributes, which still parse
    labels = [chart.get("aria-label") for chart in charts]
    assert any(clean(HOSTILE) in label and '"><svg onload=alert(2)>' in label for label in labels)
    assert any(clean(HOSTILE) in (node.text or "") for chart in charts for node in chart.iter("title"))


def test_hostile_labels_are_escaped_in_markdown():
    markdown = render_markdown(hostile_report())
    assert "<script" not in markdown and "<svg" not in markdown
    assert "\x1b" not in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|x y" in markdown
    for table in md_tables(markdown):
        assert len({cell_separators(line) for line in table}) == 1, table
    gpu_table = next(table for table in md_tables(markdown) if table[0].startswith("| instance |"))
    assert len(gpu_table) == 2 + 5  # the newline in the label did not add a row


def test_hostile_labels_are_neutralised_in_text():
    text = render_text(hostile_report())
    assert "\x1b" not in text
    assert all(len(line) <= WIDTH for line in text.splitlines())
    row = next(line for line in text.splitlines() if line.startswith("<script>") and "…" in line)
    cells = row.split()
    assert cells[0] == "<script>alert(1)</script>|x…"  # cut at its cap of 28
    assert cells[1] == "0" and cells[4:6] == ["6.00", "0.06"]  # and still one row
    assert clean(HOSTILE) in text  # the summary, whole, on one line


# --- empty and large reports ------------------------------------------------------------------


def test_empty_report_renders_in_every_format():
    report = empty_report()
    text, markdown, page = render_text(report), render_markdown(report), render_html(report)
    for output in (text, markdown, page):
        for sentence in ("No warnings.", "No recommendations", "No GPUs in this report.",
                         "No services in this report."):
            assert sentence in output
    assert "Per GPU" in text and "|" not in text.split("Per GPU")[1]
    assert "| instance |" not in markdown
    parse(page)
    assert_self_contained(page)
    assert "<svg" not in page
    assert "No GPU has a phase series" in page and "No idle cost by host" in page


def test_800_gpus_render_with_64_small_multiples():
    report = big_report()
    page = render_html(report)
    structure = parse(page)
    charts = svgs(page)
    multiples = [chart for chart in charts if chart.get("class") == "phase-chart"]
    assert len(multiples) == MULTIPLES_CAP == 64
    assert "Showing the 64 GPUs with the most idle cost, of the 800 with a phase series" in page
    costliest = sorted(report["gpus"], key=lambda gpu: gpu["idle_cost"]["total"], reverse=True)[:64]
    expected = {f"phase share over time: {gpu['instance']} gpu {gpu['gpu']}, {gpu['model']}, {gpu['uuid']}"
                for gpu in costliest}
    assert {chart.get("aria-label") for chart in multiples} == expected
    assert structure.tags["tr"] >= 800
    assert page.count('<tr title="GPU-') == 800
    assert "Showing the 40 hosts with the most idle cost, of 100." in page
    assert all(len(line) <= WIDTH for line in render_text(report).splitlines())


def test_rendered_reports_follow_the_schema():
    import jsonschema  # a test dependency (pyproject.toml): never skipped
    schema = json.loads(SCHEMA.read_text())
    for report in (example(), empty_report(), big_report(70), hostile_report()):
        jsonschema.validate(report, schema)
