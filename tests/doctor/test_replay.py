"""The doctor keeps its history across a restart (#16): a replayed watcher judges as if never stopped.

A healthy run (a loss falling like exp(-step/60) to a plateau, with noise) is watched without a stop,
by a fresh watcher that starts at step 301 (what `--resume` did before), and by one that replays steps
1-300 first (`CurveWatcher.replay`, what `--resume` and a recovery now do).
"""

from __future__ import annotations

import math
import random

from tunewise.doctor.curve import Curve, EvalPoint, TrainPoint
from tunewise.doctor.watcher import CurveWatcher

N, RESUME_AT = 400, 300
FACTS = {
    "method": "lora",
    "learning_rate": 2e-4,
    "max_grad_norm": 1.0,
    "warmup_steps": 10,
    "total_steps": N,
    "steps_per_epoch": N,
    "vocab_size": 49152,
}


def _points(seed: int) -> list[TrainPoint]:
    rng = random.Random(seed)
    return [
        TrainPoint(s, 1.0 + 1.5 * math.exp(-s / 60) + rng.gauss(0, 0.02), 0.5, 2e-4, s / N, 1000)
        for s in range(1, N + 1)
    ]


def _watch(watcher: CurveWatcher, points: list[TrainPoint]) -> list[tuple[int | None, str, str]]:
    found = []
    for p in points:
        found += watcher.observe_train(p.step, p.loss, p.grad_norm, p.lr, p.epoch, p.trainable_tokens)
    found += watcher.finish()
    return [(f.step, f.severity, f.code) for f in found]


def test_a_fresh_watcher_after_a_resume_calls_a_healthy_run_flat():
    """The defect the replay fixes: without the history the plateau looks like a flat run."""
    points = _points(0)
    assert _watch(CurveWatcher(**FACTS), points) == []
    fresh = _watch(CurveWatcher(**FACTS), points[RESUME_AT:])
    assert ("error", "flat") in {(severity, code) for _step, severity, code in fresh}


def test_a_replayed_watcher_judges_the_rest_of_the_run_as_an_uninterrupted_one():
    for seed in range(5):
        points = _points(seed)
        whole = _watch(CurveWatcher(**FACTS), points)
        watcher = CurveWatcher(**FACTS)
        watcher.replay(Curve(points, [EvalPoint(RESUME_AT + 50, 0.9)]), upto=RESUME_AT)
        assert watcher.losses == [(p.step, p.loss) for p in points[:RESUME_AT]]  # the eval after is not seen
        assert _watch(watcher, points[RESUME_AT:]) == [f for f in whole if f[0] is None or f[0] > RESUME_AT]


def test_replay_returns_the_findings_of_the_history_once():
    """A spike in the history is found during the replay, and not raised again after the restart."""
    points = _points(1)
    points[99] = TrainPoint(100, 40.0, 30.0, 2e-4, 0.25, 1000)
    watcher = CurveWatcher(**FACTS)
    history = watcher.replay(Curve(points, []), upto=RESUME_AT)
    assert any(f.step == 100 for f in history)
    later = _watch(watcher, points[RESUME_AT:])
    assert not {code for _step, _severity, code in later} & {f.code for f in history}
