"""weights_unchanged (doctor/masking.py): real losses that repeat, batch for batch, one epoch later.

The class: a run whose weights never change (no trainable weight, an optimizer over other parameters, a
learning rate of 0) over data that is not reshuffled shows each batch's loss again, to the digit, at
the same place of the next epoch. The real case (TRACE, tests/fixtures/real_runs/issues) is in the
corpus's dev split; these cases are built here, one on each side of each threshold.
"""

from __future__ import annotations

import random

from tunewise.doctor.curve import Curve, TrainPoint
from tunewise.doctor.diagnose import diagnose_curve
from tunewise.doctor.masking import REPEAT_POINTS, REPEAT_TOLERANCE

PER_EPOCH = 10


def _batch_losses(seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.9, 1.4), 4) for _ in range(PER_EPOCH)]


def _run(second_epoch: list[float], first_epoch: list[float] | None = None) -> Curve:
    first = first_epoch or _batch_losses()
    losses = first + second_epoch
    points = [TrainPoint(s + 1, loss, 0.8, 2e-4, s / PER_EPOCH) for s, loss in enumerate(losses)]
    return Curve(points, [])


def _codes(curve: Curve) -> set[str]:
    return {f.code for f in diagnose_curve(curve).findings}


def test_losses_repeated_one_epoch_later_mean_the_weights_never_changed():
    first = _batch_losses()
    d = diagnose_curve(_run(first[:REPEAT_POINTS], first))
    found = [f for f in d.findings if f.code == "weights_unchanged"]
    assert [(f.step, f.severity) for f in found] == [(PER_EPOCH + REPEAT_POINTS, "error")]
    assert found[0].evidence["pairs"][0] == [PER_EPOCH + 1, 1, first[0]]
    assert d.verdict == "flat" and d.evidence["cause"] == "nothing_trained"
    assert "optimizer" in found[0].causes[0]


def test_one_repeat_fewer_than_repeat_points_is_not_enough():
    first = _batch_losses()
    second = first[: REPEAT_POINTS - 1] + [first[REPEAT_POINTS - 1] * 0.9] + first[REPEAT_POINTS:]
    assert "weights_unchanged" not in _codes(_run(second[:REPEAT_POINTS], first))


def test_a_change_just_inside_the_tolerance_still_repeats_and_just_outside_does_not():
    first = _batch_losses()
    inside = [loss * (1 + 0.6 * REPEAT_TOLERANCE) for loss in first[:REPEAT_POINTS]]
    outside = [loss * (1 + 1.5 * REPEAT_TOLERANCE) for loss in first]
    assert "weights_unchanged" in _codes(_run(inside, first))
    assert "weights_unchanged" not in _codes(_run(outside, first))


def test_a_training_run_over_the_same_unshuffled_batches_is_not_flagged():
    """Weights that change: each batch's loss is lower one epoch later (by 1-3%)."""
    first = _batch_losses()
    rng = random.Random(1)
    second = [loss * (1 - rng.uniform(0.01, 0.03)) for loss in first]
    assert "weights_unchanged" not in _codes(_run(second, first))


def test_a_loss_memorized_to_one_value_everywhere_is_not_this_finding():
    """The same value at every step repeats too, but says nothing about which batch met which weights."""
    same = [0.0123] * PER_EPOCH
    assert "weights_unchanged" not in _codes(_run(same, same))
