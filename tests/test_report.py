"""`tunewise report`: a self-contained HTML page from a real tiny run, Trainer states and failed runs,
opened in a real headless Chromium."""

from __future__ import annotations

import functools
import html as html_text
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chromium import dump_dom, screenshot
from conftest import FIXTURES, tiny_overrides, write_subset

from tunewise.report import write_report

STATES = FIXTURES / "trainer_states"


def needs_chromium(test):
    """`make test` installs Chromium: a missing browser is a failure, never a skip."""

    def run(*args, **kwargs):
        assert shutil.which("chromium"), "chromium missing: apt-get install -y chromium"
        return test(*args, **kwargs)

    return pytest.mark.chromium(functools.wraps(test)(run))


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 12-step LoRA run with evals, plus the eval.json and memorization.json `eval` would add."""
    from tunewise.config import load_config
    from tunewise.training.run import train

    root = tmp_path_factory.mktemp("report-run")
    data = write_subset(root / "data")
    extra = {
        "name": "tiny",
        "training.max_steps": 12,
        "training.warmup_steps": 2,
        "training.learning_rate": 5e-3,
    }
    result = train(load_config(None, tiny_overrides(tiny_model_dir, data, root / "runs", extra)))
    assert result.status == "completed", result.error
    base = {"n": 8, "exact_match": 0.0, "valid_json": 0.125, "field_accuracy": 0.1, "which": "base"}
    tuned = {"n": 8, "exact_match": 0.5, "valid_json": 0.875, "field_accuracy": 0.7, "which": "tuned"}
    (result.run_dir / "eval.json").write_text(json.dumps({"base": base, "tuned": tuned}))
    sets = {
        k: {"n": 4, "verbatim": v, "near_verbatim": v, "mean_similarity": v}
        for k, v in [("train", 1.0), ("rephrased", 0.0), ("heldout", 0.25)]
    }
    memo = {
        "flagged": True,
        "verdict": "memorized",
        "message": "overfit/memorized: 100% ...",
        "threshold": 0.9,
        "sets": sets,
    }
    (result.run_dir / "memorization.json").write_text(json.dumps(memo))
    return result.run_dir


def _sections(html: str) -> set[str]:
    return {part.split('"', 1)[0] for part in html.split('<section id="')[1:]}


def test_report_of_a_real_run_is_complete_and_self_contained(tiny_run: Path) -> None:
    out = write_report(tiny_run)
    html = out.read_text()
    assert out == tiny_run / "report.html"
    for png in ["loss.png", "learning_rate.png", "grad_norm.png", "throughput.png"]:
        assert (tiny_run / png).stat().st_size > 5000, png
    assert html.count("data:image/png;base64,") == 4
    assert "http://" not in html and "https://" not in html and "<script" not in html  # no network, no JS
    assert {
        "loss",
        "findings",
        "dynamics",
        "evaluation",
        "memorization",
        "plan",
        "hardware",
        "config",
    } <= _sections(html)
    assert 'id="verdict"' in html
    assert "training.max_steps" in html and "training.learning_rate" in html  # changed from the defaults
    assert "50.0%" in html and "+50.0 pts" in html  # exact match base -> tuned
    assert "memorized" in html
    # samples.json is written at the end of every completed run; only a recorded failure excuses it.
    samples_error = json.loads((tiny_run / "result.json").read_text()).get("samples_error")
    assert (tiny_run / "samples.json").is_file() or samples_error, "no samples.json and no samples_error"
    if samples_error is None:
        samples = json.loads((tiny_run / "samples.json").read_text())
        section = html[html.index('<section id="samples">') :].split("</section>")[0]
        assert len(samples) == 3 and section.count('<div class="sample">') == 3
        for sample in samples:
            assert html_text.escape(sample["reference"].strip()) in section
            assert html_text.escape(sample["prompt"]) in section


def test_report_does_not_import_torch_or_transformers(tiny_run: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from tunewise.report import write_report; "
        f"write_report(Path({str(tiny_run)!r})); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')); "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "name",
    [
        "healthy_lora",
        "nan_hidden_by_filter",
        "overfit_small_data",
        "early_explosion",
        "no_eval_healthy",
        "flat_lora_lr2e-5",
    ],
)
def test_report_of_a_plain_trainer_output_directory(name: str, tmp_path: Path) -> None:
    shutil.copy(STATES / f"{name}.json", tmp_path / "trainer_state.json")
    html = write_report(tmp_path).read_text()
    verdict = json.loads((FIXTURES / "expected_verdicts.json").read_text()).get(name)
    assert (tmp_path / "loss.png").stat().st_size > 5000
    assert 'id="loss-chart"' in html and 'id="findings"' in html
    if isinstance(verdict, str):
        assert f">{verdict.upper()}<" in html
    if name == "nan_hidden_by_filter":
        assert "NaN" in html


def _failed_run(run_dir: Path, metrics: str | None) -> Path:
    from tunewise.config import load_config

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        load_config(None, ["name=broken", "training.learning_rate=0.5"]).to_yaml()
    )
    (run_dir / "result.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "error": "RuntimeError: out of memory <at step 3>",
                "global_step": 0,
                "traceback": "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory",
            }
        )
    )
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text(metrics)
    return run_dir


def test_report_of_a_failed_run_without_metrics(tmp_path: Path) -> None:
    html = write_report(_failed_run(tmp_path / "broken", None)).read_text()
    assert "RuntimeError: out of memory &lt;at step 3&gt;" in html  # escaped, not markup
    assert ">FAILED<" in html and "no loss was recorded" in html
    assert "training.learning_rate" in html
    assert not (tmp_path / "broken" / "loss.png").exists()


def test_report_of_a_diverged_run_shows_nan(tmp_path: Path) -> None:
    lines = [
        {
            "type": "train",
            "step": s,
            "epoch": s / 10,
            "loss": 2.0 - 0.1 * s,
            "grad_norm": 1.0,
            "learning_rate": 1e-4,
            "tokens_per_s": 100.0,
        }
        for s in range(1, 8)
    ]
    lines.append(
        {
            "type": "train",
            "step": 8,
            "epoch": 0.8,
            "loss": math.nan,
            "grad_norm": math.inf,
            "learning_rate": 1e-4,
        }
    )
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"type": "train", "step": 9, "lo'  # killed mid-line
    html = write_report(_failed_run(tmp_path / "nan", text)).read_text()
    assert ">DIVERGED<" in html
    assert "NaN" in html
    assert (tmp_path / "nan" / "loss.png").is_file()


@needs_chromium
def test_report_renders_in_headless_chromium(tiny_run: Path, tmp_path: Path) -> None:
    report = write_report(tiny_run)
    png = screenshot(report, tmp_path / "report.png")
    assert png.stat().st_size > 50_000  # a page of charts, not a blank window
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = dump_dom(report)
    assert 'id="loss-chart"' in dom and 'src="data:image/png;base64,' in dom
    assert '<section id="findings">' in dom
    assert 'id="verdict"' in dom


@needs_chromium
def test_screenshot_script(tiny_run: Path, tmp_path: Path) -> None:
    script = Path(__file__).parent.parent / "scripts" / "screenshot_report.py"
    out = tmp_path / "docs" / "report.png"
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_run), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 50_000
