"""The live progress line of `tunewise train`: a step's speed (trained tokens/s, padding share, MFU)."""

from __future__ import annotations

import math

import pytest

from tunewise.cli.printers import Progress, compact, speed_text, step_info


def _record(**speed: float | None) -> dict:
    """A metrics.jsonl train record as StepMonitor.on_step_end writes it (the speed numbers overridable)."""
    rec = {
        "type": "train",
        "step": 1,
        "loss": 2.5,
        "learning_rate": 1e-4,
        "tokens": 512,
        "positions": 528,
        "trained_tokens": 380,
        "tokens_per_s": 2563.0,
        "trained_tokens_per_s": 1902.4,
        "padding_fraction": 0.0303,
        "mfu": 0.0412,
        "step_time": 0.2,
    }
    rec.update(speed)
    return rec


def test_speed_text_shows_trained_rate_padding_and_mfu() -> None:
    assert speed_text(_record()) == "1.9k trained tok/s · pad 3.0% · MFU 4.1%"
    assert speed_text(_record(padding_fraction=0.3, mfu=0.41)) == "1.9k trained tok/s · pad 30% · MFU 41%"
    assert speed_text(_record(padding_fraction=0.0)) == "1.9k trained tok/s · pad 0% · MFU 4.1%"


def test_speed_text_leaves_out_what_the_record_lacks() -> None:
    assert speed_text(_record(mfu=None)) == "1.9k trained tok/s · pad 3.0%"
    assert speed_text(_record(padding_fraction=None, mfu=math.nan)) == "1.9k trained tok/s"
    # no labels in the batches: the rate of all tokens, named as such
    assert speed_text(_record(trained_tokens_per_s=None)) == "2.6k tok/s · pad 3.0% · MFU 4.1%"
    nothing = {"trained_tokens_per_s": None, "tokens_per_s": None, "padding_fraction": None, "mfu": None}
    assert speed_text(_record(**nothing)) == ""
    assert step_info(_record(**nothing)) == "loss 2.5 lr 0.0001"


@pytest.mark.parametrize(
    ("rate", "text"), [(7.25, "7.2"), (950.0, "950"), (1902.4, "1.9k"), (12_345.0, "12k"), (3.4e6, "3.4M")]
)
def test_compact_rates(rate: float, text: str) -> None:
    assert compact(rate) == text


def test_progress_prints_the_speed_on_the_plain_line_and_nothing_when_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = Progress(quiet=False)
    progress.begin({"max_steps": 20})
    progress.step(_record())
    line = capsys.readouterr().out
    assert line.startswith(
        "step 1/20  loss 2.5 lr 0.0001  1.9k trained tok/s · pad 3.0% · MFU 4.1%  elapsed "
    )
    progress.end()

    quiet = Progress(quiet=True)
    quiet.begin({"max_steps": 20})
    for step in (1, 10, 20):
        quiet.step(_record(step=step))
    quiet.end()
    assert capsys.readouterr().out == ""
