"""Rendered check: ``report.html`` opened in headless Chromium shows every table and figure, no broken image.

The report itself carries no script (it must open anywhere, offline). The check renders a copy of it with one
small probe script appended: on the page's ``load`` event the probe writes, into the DOM, what the browser
actually laid out (section headings, table row counts, each image's ``complete`` and ``naturalWidth``), and
``chromium --dump-dom`` prints that DOM. An image whose data the browser cannot decode has naturalWidth 0.
Chromium runs with the flags that keep it off the network, and every host name resolves to nothing.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mammo_core.reporting.report import build_report
from tests.core.reporting.test_report import KEYS, make_store

CHROMIUM = Path("/usr/bin/chromium")
OFFLINE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000")
HEADINGS = ("Data summary", *(f"Table {i}" for i in range(1, 9)), *(f"Figure {i}" for i in range(9, 15)))
FIGURE_SECTIONS = ("Figure 9", "Figure 10", "Figure 11", "Figure 12", "Figure 13", "Figure 14", "Table 4", "Table 8")

PROBE = """<script>
window.addEventListener('load', () => {
  const sections = [...document.querySelectorAll('section')].map(s => ({
    heading: s.querySelector('h2').textContent,
    tables: [...s.querySelectorAll('table')].map(t => t.querySelectorAll('tbody tr').length),
    images: [...s.querySelectorAll('img')].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                                      height: i.naturalHeight}))}));
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify({title: document.title, sections});
  document.body.appendChild(out);
});
</script>"""


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing; skip (with the reason) when that is impossible."""
    if CHROMIUM.is_file():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not CHROMIUM.is_file():
        pytest.skip(f"chromium could not be installed with apt-get: {proc.stderr.strip()[-500:]}")
    return CHROMIUM


def render(page: Path, work: Path) -> dict:
    """What Chromium laid out for ``page`` (see PROBE), from a probed copy under ``work``."""
    chromium = ensure_chromium()
    probed = work / "probed.html"
    text = page.read_text(encoding="utf-8")
    assert text.count("</body>") == 1, f"{page}: expected one </body>"
    probed.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = subprocess.run([str(chromium), *OFFLINE_FLAGS, f"--user-data-dir={work / 'profile'}", "--dump-dom",
                           probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium printed no probe result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("render")
    dirs = make_store(root / "stages")
    paths = build_report(dirs, root / "report", {"code_version": "abc1234", "stage_keys": KEYS})
    return paths["html"]


def _by_label(result: dict) -> dict[str, dict]:
    return {s["heading"].split(":")[0]: s for s in result["sections"]}


def test_every_table_and_figure_renders_and_no_image_is_broken(report_html, tmp_path):
    result = render(report_html, tmp_path)
    assert result["title"] == "mammo-fusion: run report"
    sections = _by_label(result)
    missing = [h for h in HEADINGS if h not in sections]
    assert not missing, f"headings not rendered: {missing}"
    for label in HEADINGS:
        if label.startswith("Table") or label == "Data summary":
            assert sections[label]["tables"] and min(sections[label]["tables"]) > 0, (label, sections[label])
    for label in FIGURE_SECTIONS:
        assert sections[label]["images"], f"{label}: no image rendered"
    images = [(label, i) for label, s in sections.items() for i in s["images"]]
    assert len(images) == 10
    broken = [(label, i["alt"]) for label, i in images if not i["complete"] or i["width"] <= 0 or i["height"] <= 0]
    assert not broken, f"broken images: {broken}"
    assert {(i["width"], i["height"]) for _, i in images} == {(8, 6)}  # the fixture's PNGs, decoded


def test_the_check_sees_a_broken_image(report_html, tmp_path):
    """The probe must fail on a figure the browser cannot decode (else the test above could never fail)."""
    page = report_html.read_text(encoding="utf-8")
    first = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert first is not None
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(first.group(1), "iVBORw0KGgoAAAAAbm90IGEgcG5n", 1), encoding="utf-8")
    images = [i for s in render(broken, tmp_path)["sections"] for i in s["images"]]
    assert [i["width"] for i in images].count(0) == 1 and len(images) == 10
