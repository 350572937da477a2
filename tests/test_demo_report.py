"""The real demo run's report, committed under docs/, opened in headless Chromium.

`docs/demo-report.html` is the report.html that `make demo` wrote for its run of SmolLM2-135M on the
bundled task (regenerate: `make demo`, then `python scripts/screenshot_report.py runs/demo
docs/report.png` and copy runs/demo/report.html to docs/demo-report.html).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from chromium import dump_dom, screenshot

DOCS = Path(__file__).parent.parent / "docs"
pytestmark = pytest.mark.chromium


def test_demo_report_renders_in_headless_chromium(tmp_path):
    assert shutil.which("chromium"), "chromium missing: apt-get install -y chromium (.ci/run does)"
    report = DOCS / "demo-report.html"
    png = screenshot(report, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    dom = dump_dom(report)
    assert 'id="loss-chart"' in dom and 'src="data:image/png;base64,' in dom  # the loss chart is there
    assert '<section id="findings">' in dom and 'id="verdict"' in dom  # and the doctor's findings
    assert ">HEALTHY<" in dom and "smollm2-135m-instruct" in dom
    assert (DOCS / "report.png").stat().st_size > 50_000  # the screenshot the README shows
