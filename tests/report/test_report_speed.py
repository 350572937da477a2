"""The report's "Speed and memory" section, read from result.json's `speed` and `memory` numbers."""

from __future__ import annotations

import json
from pathlib import Path

from tunewise.report import write_report

GIB = 2**30


def _run_dir(path: Path, result: dict, steps: int = 6) -> Path:
    """A run directory with metrics.jsonl (speed numbers per step) and the given result.json."""
    path.mkdir(parents=True)
    records = [
        {
            "type": "train",
            "step": s,
            "epoch": s / steps,
            "loss": 2.0 - 0.1 * s,
            "grad_norm": 1.0,
            "learning_rate": 1e-4,
            "tokens": 500,
            "positions": 500,
            "padding_fraction": 0.0,
            "trained_tokens": 300 + 10 * s,
            "tokens_per_s": 2000.0 + 50 * s,
            "trained_tokens_per_s": 1200.0 + 30 * s,
            "mfu": 0.04,
            "step_time": 0.25,
            "time": 0.25 * s,
        }
        for s in range(1, steps + 1)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "result.json").write_text(json.dumps({"status": "completed", "global_step": steps, **result}))
    return path


SPEED = {
    "steps_timed": 11,
    "trained_tokens_per_s": 1902.4,
    "tokens_per_s": 2563.0,
    "padding_fraction": 0.0303,
    "mfu": 0.0412,
    "peak_flops": 1.5e12,
}


def _section(html: str, sid: str) -> str:
    start = html.index(f'<section id="{sid}">')
    return html[start : html.index("</section>", start)]


def test_speed_and_memory_section_shows_the_run_numbers(tmp_path: Path) -> None:
    warning = "memory: the plan estimated 2.00 GiB, the run peaked at 3.00 GiB (+50%); <report it>"
    memory = {
        "estimated_peak": 2 * GIB,
        "measured_peak": 3 * GIB,
        "error": 0.5,
        "measured_step_1": 1536 * 2**20,
        "warning": warning,
    }
    html = write_report(_run_dir(tmp_path / "run", {"speed": SPEED, "memory": memory})).read_text()
    section = _section(html, "speed")
    assert "<h2>Speed and memory</h2>" in section
    for label, value in [
        ("trained tokens/s", "1902 tokens/s"),
        ("all tokens/s", "2563 tokens/s"),
        ("padding fraction", "3.0%"),
        ("MFU", "4.1% of 1.5 TFLOP/s"),
        ("steps timed", "11 (the first step"),
        ("estimated peak (plan)", "2.00 GiB"),
        ("measured peak", "3.00 GiB"),
        ("measured at step 1", "1.50 GiB"),
        ("estimate error", "+50.0%"),
    ]:
        assert f"<tr><td>{label}</td><td>{value}" in section, (label, value)
    assert '<div class="warn">' in section and "&lt;report it&gt;" in section  # escaped, not markup
    assert (tmp_path / "run" / "throughput.png").stat().st_size > 5000  # per-step tokens/s chart


def test_section_leaves_out_missing_numbers_and_has_no_warning_when_the_estimate_holds(
    tmp_path: Path,
) -> None:
    speed = {**SPEED, "mfu": None, "peak_flops": None, "trained_tokens_per_s": None}
    memory = {"estimated_peak": 2 * GIB, "measured_peak": 2 * GIB + GIB // 10, "error": 0.05}
    html = write_report(_run_dir(tmp_path / "run", {"speed": speed, "memory": memory})).read_text()
    section = _section(html, "speed")
    assert (
        "<td>all tokens/s</td><td>2563 tokens/s" in section and "<td>estimate error</td><td>+5.0%" in section
    )
    assert "MFU" not in section and "trained tokens/s" not in section and "measured at step 1" not in section
    assert 'class="warn"' not in section


def test_older_result_without_speed_or_memory_renders_without_the_section(tmp_path: Path) -> None:
    html = write_report(_run_dir(tmp_path / "old", {"final_train_loss": 1.4})).read_text()
    assert 'id="speed"' not in html and "Speed and memory" not in html
    assert '<section id="hardware">' in html  # the rest of the page is there
    empty = write_report(_run_dir(tmp_path / "empty", {"speed": {}, "memory": "?"})).read_text()
    assert 'id="speed"' not in empty
