"""Long runs stay healthy (#13): a tiny model trained for thousands of steps with frequent saves and
evaluations. Memory does not grow, retention holds, metrics.jsonl has exactly one line per step, and
the report opens. Marked slow; `TUNEWISE_SOAK_STEPS` changes the length (default 2000)."""

from __future__ import annotations

import html.parser
import os
import resource
import statistics
from pathlib import Path

import pytest
from conftest import read_jsonl, tiny_overrides

from tunewise.config import load_config
from tunewise.rundir import STAGING, checkpoint_problem

STEPS = int(os.environ.get("TUNEWISE_SOAK_STEPS", "2000"))
EVERY = 50  # save and evaluate every 50 steps: 40 saves and 40 evaluations in 2000 steps
KEEP = 2
LEAK_BUDGET = 32 * 2**20  # 16 KiB per step over 2000 steps: a real leak shows far above this


def _rss() -> int:
    """Resident set size of this process now, in bytes (not the peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)


@pytest.mark.slow
@pytest.mark.model
def test_a_long_run_with_frequent_saves_keeps_memory_retention_and_metrics(
    tiny_model_dir, small_data, tmp_path
):
    from tunewise.training.run import TrainHooks, train

    extra = {
        "name": "soak",
        "training.max_steps": STEPS,
        "training.per_device_train_batch_size": 2,
        "training.gradient_accumulation_steps": 1,
        "training.logging_steps": 10,
        "training.eval_steps": EVERY,
        "training.save_steps": EVERY,
        "training.save_total_limit": KEEP,
        "training.per_device_eval_batch_size": 8,
        "data.max_seq_length": 48,
    }
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra))
    rss: list[int] = []
    result = train(cfg, hooks=TrainHooks(on_step=lambda record: rss.append(_rss()), samples=False))
    run_dir = tmp_path / "runs" / "soak"
    assert result.status == "completed" and result.global_step == STEPS, result.error

    tenth = len(rss) // 10
    early, late = statistics.median(rss[tenth : 2 * tenth]), statistics.median(rss[-tenth:])
    growth = late - early
    mib = 2**20
    print(
        f"\nsoak: {STEPS} steps, RSS {early / mib:.0f} MiB -> {late / mib:.0f} MiB ({growth / mib:+.1f} MiB)"
    )
    assert growth < LEAK_BUDGET, f"memory grew by {growth / 2**20:.1f} MiB over {STEPS} steps"

    saved = sorted(run_dir.glob("checkpoint-*"))
    assert 1 <= len(saved) <= KEEP, [p.name for p in saved]
    assert all(checkpoint_problem(p) is None for p in saved) and not (run_dir / STAGING).exists()
    assert f"checkpoint-{STEPS}" in {p.name for p in saved}

    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must have exactly one line per step"
    assert len([r for r in records if r["type"] == "eval"]) >= STEPS // EVERY

    report = run_dir / "report.html"
    parser = _Tags()
    parser.feed(report.read_text(encoding="utf-8"))
    assert {"html", "body", "img"} <= set(parser.tags), "the report does not open as an HTML page with charts"
    assert Path(report).stat().st_size > 10_000
