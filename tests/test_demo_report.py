"""The demo's report, freshly made: `tunewise demo` on the tiny model, then its report in headless Chromium.

`docs/demo-report.html` is the report of a real `make demo` run of SmolLM2-135M (regenerate: `make demo`,
`tunewise report runs/demo`, `python scripts/screenshot_report.py runs/demo docs/report.png`, and copy
runs/demo/report.html to docs/demo-report.html). The test renders a report generated now from a run made
now by the demo's own path, and checks that it has every section the committed page shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from chromium import dump_dom, screenshot
from conftest import write_subset

from tunewise import cli
from tunewise.doctor.diagnose import diagnose_path

DOCS = Path(__file__).parent.parent / "docs"
pytestmark = pytest.mark.chromium


def _sections(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('<section id="')[1:]]


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tunewise demo` (check, base eval, train, tuned eval, doctor) on the tiny model, 6 steps."""
    root = tmp_path_factory.mktemp("demo")
    data = write_subset(root / "data", n_train=128, n_val=8, n_test=4)  # the check wants 100+
    argv = [
        "demo",
        "--quiet",
        f"model.name={tiny_model_dir}",
        f"output_dir={root / 'runs'}",
        f"data.train={data['train']}",
        f"data.validation={data['validation']}",
        f"data.test={data['test']}",
        "training.max_steps=6",
        "training.eval_steps=3",
        "training.save_steps=3",
        "training.per_device_train_batch_size=4",
        "training.gradient_accumulation_steps=1",
        "training.optim=adamw_torch",
        "eval.max_new_tokens=8",
    ]
    assert cli.main(argv) == 0
    (run_dir,) = [d for d in (root / "runs").iterdir() if d.is_dir()]
    return run_dir


def test_a_fresh_demo_report_renders_in_headless_chromium(demo_run: Path, tmp_path: Path) -> None:
    assert shutil.which("chromium"), "chromium missing: `make test` installs it (scripts/ensure_chromium.sh)"
    report = demo_run / "report.html"  # as the demo left it: written again after its eval
    png = screenshot(report, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    dom = dump_dom(report)
    assert 'id="loss-chart"' in dom and 'src="data:image/png;base64,' in dom  # the loss chart is there
    assert '<section id="findings">' in dom and 'id="verdict"' in dom  # and the doctor's findings
    assert f">{diagnose_path(demo_run).verdict.upper()}<" in dom and demo_run.name in dom
    evaluation = json.loads((demo_run / "eval.json").read_text())
    base, tuned = evaluation["base"]["exact_match"], evaluation["tuned"]["exact_match"]
    assert f"{base:.1%} → {tuned:.1%}" in dom  # the demo's own eval.json, base -> tuned
    # Every section of the committed demo report is in a freshly generated one, in the same order.
    committed = _sections((DOCS / "demo-report.html").read_text())
    fresh = _sections(dom)
    assert set(committed) <= set(fresh) and sorted(committed, key=fresh.index) == committed
    assert (DOCS / "report.png").stat().st_size > 50_000  # the screenshot the README shows
