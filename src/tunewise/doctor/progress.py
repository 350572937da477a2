"""Progress rules: where "not falling" and "flat" are decided.

- not_falling (warning) at point NOT_FALLING_AT (or at the end of warmup, up to point FLAT_AT / 2):
  the mean of the last 3 points is not below the mean of the first 3 by more than MIN_FALL of it,
  nor by more than the noise (std of the points around their straight-line fit). Skipped when that
  noise would hide a NOISY (5%) fall.
- flat: the mean of the last tenth of the points (at least 5) is above 1 - FLAT_BAND (95%) of the
  mean of the first tenth (at least 3), at point FLAT_AT (warning), at point FLAT_ERROR_AT and at the
  end of the run (error). The verdict `flat` (diagnose.py) is this end-of-run test.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from tunewise.doctor.advice import flat_advice
from tunewise.doctor.findings import Finding, Severity, fmt_lr, num

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

NOT_FALLING_AT, FLAT_AT, FLAT_ERROR_AT, FLAT_BAND, NOISY, MIN_FALL = 10, 50, 100, 0.05, 0.05, 0.01


def _ends(values: list[float], early: bool) -> tuple[float, float]:
    """Mean loss at the start and now: 3 points each early on, later a tenth of the run (at least 3
    and 5 points) so that per-step noise averages out."""
    if early:
        return statistics.fmean(values[:3]), statistics.fmean(values[-3:])
    n = len(values)
    return statistics.fmean(values[: max(3, n // 10)]), statistics.fmean(values[-max(5, n // 10) :])


def _noise(values: list[float]) -> float:
    """Standard deviation of the points around their straight-line fit: the batch-to-batch noise."""
    slope, intercept = statistics.linear_regression(range(len(values)), values)
    return statistics.stdev(v - (intercept + slope * i) for i, v in enumerate(values))


class ProgressRules:
    """The progress family: is the loss falling, and did it end lower than it began?"""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.end_change: float | None = None  # relative change of the loss, start to end; set by finish()
        # A rate still warming up barely moves the loss: judge "not falling" once warmup is over.
        self.not_falling_at = max(NOT_FALLING_AT, min(watch.warmup_steps or 0, FLAT_AT // 2))

    @property
    def flat_at_end(self) -> bool:
        return self.end_change is not None and self.end_change > -FLAT_BAND

    def check(self, step: int) -> list[Finding]:
        """not_falling at the early checkpoint, flat at FLAT_AT and FLAT_ERROR_AT points."""
        n = len(self.watch.losses)
        if n not in (self.not_falling_at, FLAT_AT, FLAT_ERROR_AT) or "loss_spike" in self.watch.open_episodes:
            return []  # (a spike is reported already; its losses say nothing about learning speed)
        values = [loss for _, loss in self.watch.losses]
        if n == self.not_falling_at:
            start, now = _ends(values, early=True)
            noise = _noise(values)
            if noise * math.sqrt(2 / 3) > NOISY * abs(start):
                return []  # too noisy to see a fall this early: the flat check decides later
            fell = start - now > min(MIN_FALL * abs(start), noise)
            return [] if fell else [self._finding("not_falling", "warning", step)]
        start, now = _ends(values, early=False)
        if now > start * (1 - FLAT_BAND):
            return [self._finding("flat", "warning" if n == FLAT_AT else "error", step)]
        return []

    def finish(self) -> list[Finding]:
        """The end-of-run flat test; sets `end_change`."""
        losses = self.watch.losses
        values = [loss for _, loss in losses]
        # (after a divergence the curve says nothing about learning speed)
        if len(values) < NOT_FALLING_AT or {"loss_spike", "non_finite"} & self.watch.open_episodes.keys():
            return []
        start, now = _ends(values, early=False)
        self.end_change = (now - start) / abs(start) if start else None
        if self.flat_at_end and not self.watch.fired("flat", "error"):
            return [self._finding("flat", "error", losses[-1][0], at_end=True)]
        return []

    def _finding(self, code: str, severity: Severity, step: int, at_end: bool = False) -> Finding:
        w = self.watch
        values = [loss for _, loss in w.losses]
        start, now = _ends(values, early=code == "not_falling")
        change = (now - start) / abs(start) * 100 if start else 0.0
        grads = w.divergence.calm_grad_norms
        grad = statistics.median(grads) if grads else None
        lr = w.learning_rate or w.peak_lr
        when = "at the end of the run" if at_end else f"after {len(values)} logged steps"
        title = (
            f"loss is {code.replace('_', ' ')} {when}: {num(start)} at the start, {num(now)} at step "
            f"{step} ({change:+.1f}%); lr {fmt_lr(lr)}"
        )
        evidence = {
            "step": step,
            "start_loss": start,
            "loss": now,
            "change_pct": change,
            "lr": lr,
            "median_grad_norm": grad,
            "points": len(values),
            "trainable_tokens": 0 if w.zero_tokens else None,
        }
        return Finding(step, severity, code, title, evidence, *flat_advice(w.method, lr, grad, w.zero_tokens))
