"""The learning-rate range test: the rules on known curves, a real run of the tiny model via the CLI, and
its batches made as the run makes them."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_overrides

from tunewise import cli
from tunewise.batching import batch_counts
from tunewise.config import load_config
from tunewise.sweep import parse_grid
from tunewise.training.lrfind import LR_FIND_NOTE, _range_trainer, smooth, stop_reason, suggest_lr


def _ramp(n: int = 100, start: float = 1e-6, end: float = 1.0) -> list[float]:
    return [start * (end / start) ** (i / (n - 1)) for i in range(n)]


def _run(lrs: list[float], losses: list[float]) -> tuple[list[float], list[float]]:
    """The points a range test records before its stop rule fires."""
    for n in range(1, len(lrs) + 1):
        if stop_reason(lrs[:n], losses[:n]):
            return lrs[:n], losses[:n]
    return lrs, losses


def test_clear_valley_gives_a_tenth_of_the_minimum_without_caution():
    # falls fastest around 1e-3, bottoms out near 1e-2, then blows up
    curve = [2.0 - 1.5 / (1 + math.exp(-2.5 * (math.log10(lr) + 3))) + (30 * lr) ** 2 for lr in _ramp()]
    lrs, losses = _run(_ramp(), curve)
    assert len(lrs) < 100  # the stop rule fired
    minimum, steepest, suggestion, rule, caution = suggest_lr(lrs, smooth(losses))
    assert caution is None, caution
    assert 3e-3 < minimum < 3e-2
    assert suggestion == pytest.approx(minimum / 10)
    assert 1e-4 < steepest < 1e-2
    assert "valley" in rule and "steepest" in rule


def test_flat_curve_gets_a_caution_naming_the_problem():
    lrs = _ramp()
    minimum, _, suggestion, _, caution = suggest_lr(lrs, smooth([2.0 + 0.001 * (i % 3) for i in range(100)]))
    assert caution and "fell only" in caution and LR_FIND_NOTE in caution
    assert lrs[0] <= suggestion <= lrs[-1]


def test_lr_find_on_the_tiny_model_plots_and_hands_off_a_grid(
    tiny_model_dir, small_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = tiny_overrides(
        tiny_model_dir,
        small_data,
        tmp_path / "runs",
        {"training.gradient_accumulation_steps": 1, "name": "tiny"},
    )
    assert cli.main(["lr-find", *overrides, "--start", "1e-5", "--end", "10", "--steps", "40"]) == 0
    out = capsys.readouterr().out
    out_dir = tmp_path / "runs" / "lr-find-tiny"
    assert (out_dir / "lr_find.png").stat().st_size > 0
    data = json.loads((out_dir / "lr_find.json").read_text())
    lrs = data["lrs"]
    assert 5 <= len(lrs) <= 40 and lrs[0] == pytest.approx(1e-5)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)  # exponential ramp

    # The valley rule recomputed by hand from the recorded losses: a bias-corrected EMA (0.9) run forward
    # then backward up to the first non-finite loss, a tenth of the lr at its minimum, within the ramp and
    # at most 0.1.
    def ema(xs: list[float]) -> list[float]:
        out, avg = [], 0.0
        for i, x in enumerate(xs, start=1):
            avg = 0.9 * avg + 0.1 * x
            out.append(avg / (1 - 0.9**i))
        return out

    n = next((i for i, x in enumerate(data["losses"]) if not math.isfinite(x)), len(lrs))
    by_hand = ema(ema(data["losses"][:n])[::-1])[::-1]
    assert data["smoothed"][:n] == pytest.approx(by_hand, rel=1e-9)
    valley = lrs[by_hand.index(min(by_hand))]
    assert data["minimum"] == valley
    assert data["suggestion"] == pytest.approx(min(max(valley / 10, lrs[0]), lrs[n - 1], 0.1), rel=1e-12)

    assert len(data["smoothed"]) == len(data["losses"]) == len(lrs)
    grid = parse_grid([data["sweep_grid"]])["training.learning_rate"]
    assert [float(v) for v in grid] == pytest.approx([data["suggestion"] * m for m in (0.5, 1, 2)], rel=0.05)
    assert "suggested: training.learning_rate=" in out and f"--grid {data['sweep_grid']}" in out
    assert "caution:" in out or "note:" in out
    assert data["batching"]["requested"] == data["batching"]["used"] == "padding_free"
    assert data["batching"]["reason"] is None


@pytest.mark.parametrize("batching", ["padding_free", "padded"])
def test_lr_find_batches_the_way_the_run_does(tiny_model_dir, small_data, tmp_path, monkeypatch, batching):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = {"training.gradient_accumulation_steps": 1, "data.batching": batching}
    cfg = load_config(None, tiny_overrides(tiny_model_dir, small_data, tmp_path / "runs", extra))
    trainer, choice = _range_trainer(cfg, tmp_path / "lr-find", steps=5)
    assert choice.requested == choice.used == batching
    batches = list(trainer.get_train_dataloader())
    examples = 0
    for batch in batches:
        counts = {k: int(v) for k, v in batch_counts(batch).items()}
        if batching == "padding_free":
            # one packed row per micro-batch: no attention mask, positions restart at each example, no padding
            assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
            assert counts["positions"] == counts["tokens"]
            examples += int((batch["position_ids"] == 0).sum())
        else:
            assert "attention_mask" in batch and "position_ids" not in batch
            examples += batch["input_ids"].shape[0]
    assert examples == 64  # every training example, 4 per micro-batch either way
    if batching == "padded":  # the bundled rows vary in length: right-padding shows up in the batches
        assert sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in batches) > 0
