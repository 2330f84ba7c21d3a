"""A report page rendered like GitHub does (GFM -> HTML) and opened in headless Chromium:
every plot it links must load and the screenshot must show the page.

Needs Debian's chromium package (`apt-get install -y chromium`); skipped without /usr/bin/chromium.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from matplotlib import image

from harness.report import render_reports
from tests import reportdata as rd

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")

# after load, count images that decoded; --dump-dom prints the DOM with this marker
CHECK = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.insertAdjacentHTML("beforeend", `<p id="imgcheck">loaded=${ok} total=${imgs.length}</p>`);
});</script>"""


def chromium(tmp_path: Path, *args: str) -> str:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / ('profile-' + str(len(list(tmp_path.glob('profile-*')))))}",
    ]
    done = subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)
    return done.stdout


def test_run_page_renders_with_its_plots(tmp_path):
    rd.populate(tmp_path / "results")
    render_reports(tmp_path / "results", tmp_path / "reports")
    page = tmp_path / "reports" / "runs" / f"{rd.H100_RUN}.md"
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(page.read_text())
    html = page.with_suffix(".html")  # next to the .md, so relative plot links resolve as on GitHub
    html.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}{CHECK}</body></html>")

    dom = chromium(tmp_path, "--dump-dom", html.as_uri())
    found = re.search(r'id="imgcheck">loaded=(\d+) total=(\d+)', dom)
    assert found, dom[-2000:]
    loaded, total = map(int, found.groups())
    assert total == 5 and loaded == total  # memory breakdown + four probe plots

    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", html.as_uri())
    pixels = image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1400
    # text and plots: a good share of pixels is not page-white
    assert (pixels[..., :3].mean(axis=2) < 0.9).mean() > 0.01


def page_html(page: Path, dark: bool = False) -> Path:
    """The page as GitHub renders GFM, in its light or dark theme's colours."""
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(page.read_text())
    style = "background:#0d1117;color:#e6edf3" if dark else "background:#ffffff;color:#1f2328"
    html = page.with_name(page.stem + ("-dark" if dark else "") + ".html")
    html.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'></head><body style='{style}'>{body}"
        f"<script>document.body.insertAdjacentHTML('beforeend', "
        f"`<p id=tablecheck>tables=${{document.querySelectorAll('table').length}}</p>`)</script>"
        f"{CHECK}</body></html>"
    )
    return html


@pytest.mark.parametrize("dark", [False, True])
def test_device_page_shows_its_table_and_memory_plot(tmp_path, dark):
    rd.populate(tmp_path / "results")
    render_reports(tmp_path / "results", tmp_path / "reports")
    html = page_html(tmp_path / "reports" / "devices" / "nvidia-h100-80gb-hbm3.md", dark)
    dom = chromium(tmp_path, "--dump-dom", html.as_uri())
    assert re.search(r'id="tablecheck">tables=2<', dom), dom[-2000:]  # memory and throughput tables
    assert re.search(r'id="imgcheck">loaded=2 total=2<', dom), dom[-2000:]  # memory and load-time plots
    assert "Memory breakdown per cell" in dom and "Weights (GiB)" in dom

    shot = tmp_path / "device.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1600,3000", html.as_uri())
    pixels = image.imread(shot)[..., :3]
    bright = pixels.mean(axis=2) > 0.97
    if dark:
        # the plots keep their own white background: readable on the dark theme
        assert bright.mean() > 0.05
    else:
        assert (pixels.mean(axis=2) < 0.9).mean() > 0.01
