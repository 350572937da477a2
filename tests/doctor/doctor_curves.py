"""Helpers for the doctor's rule tests: build curves from literal numbers and feed them point by point."""

from __future__ import annotations

import math
import random

from tunewise.doctor.curve import Curve, EvalPoint, TrainPoint
from tunewise.doctor.findings import Finding
from tunewise.doctor.watcher import CurveWatcher

__all__ = [
    "Curve",
    "CurveWatcher",
    "EvalPoint",
    "TrainPoint",
    "curve_of",
    "feed",
    "fired",
    "falling",
    "noisy",
]


def curve_of(
    losses: list[float],
    grads: list[float | None] | None = None,
    lr: float | None = 2e-4,
    evals: dict[int, float] | None = None,
    every: int = 1,
    steps_per_epoch: int | None = None,
) -> Curve:
    """A Curve logged every `every` steps; `evals` maps step -> eval loss."""
    train = []
    for i, loss in enumerate(losses):
        step = (i + 1) * every
        epoch = step / steps_per_epoch if steps_per_epoch else None
        train.append(TrainPoint(step, loss, grads[i] if grads else 0.5, lr, epoch))
    eval_points = [
        EvalPoint(s, x, s / steps_per_epoch if steps_per_epoch else None)
        for s, x in sorted((evals or {}).items())
    ]
    return Curve(train, eval_points, "test")


def feed(
    watcher: CurveWatcher,
    curve: Curve,
) -> dict[int, list[Finding]]:
    """Feed a curve one point at a time, as the live monitor does; returns the new findings per step."""
    out: dict[int, list[Finding]] = {}
    points = sorted([*curve.train, *curve.eval], key=lambda p: (p.step, isinstance(p, EvalPoint)))
    for p in points:
        if isinstance(p, TrainPoint):
            new = watcher.observe_train(p.step, p.loss, p.grad_norm, p.lr, p.epoch, p.trainable_tokens)
        else:
            new = watcher.observe_eval(p.step, p.eval_loss, p.epoch)
        out.setdefault(p.step, []).extend(new)
    return out


def fired(found: dict[int, list[Finding]]) -> list[tuple[int, str, str]]:
    """(step, code, severity) of every finding, in order."""
    return [(step, f.code, f.severity) for step, fs in found.items() for f in fs]


def falling(
    n: int, start: float = 2.3, floor: float = 1.0, tau: float = 40, noise: float = 0.03, seed: int = 0
):
    """A healthy curve: exponential decay to `floor` plus seeded Gaussian noise."""
    rng = random.Random(seed)
    return [round(floor + (start - floor) * math.exp(-i / tau) + rng.gauss(0, noise), 4) for i in range(n)]


def noisy(n: int, level: float, noise: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(level + rng.gauss(0, noise), 4) for _ in range(n)]
