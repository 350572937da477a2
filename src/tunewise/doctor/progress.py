"""Progress rules: where "not falling" and "flat" are decided.

- not_falling (warning) at point NOT_FALLING_AT (or at the end of warmup, up to point FLAT_AT / 2):
  the mean of the last 3 points is not below the mean of the first 3 by more than MIN_FALL of it,
  nor by more than the noise (std of the points around their straight-line fit). Skipped when that
  noise would hide a NOISY (5%) fall.
- flat: the loss did not get rid of FLAT_BAND (10%) of where it started. Live at point FLAT_AT
  (warning) and FLAT_ERROR_AT (error), the means of the first and last tenth; at the end of a run of at
  least FLAT_MIN_POINTS points (error), the first point (or the median of the first 3 when higher)
  against the median of the last tenth, and not when the eval loss fell by FLAT_BAND meanwhile. The
  verdict `flat` (diagnose.py) is this end-of-run test.
- oscillation (warning), at the end of the run (the whole curve known), instead of flat: a loss with
  no trend (as flat) that swings: over the last two thirds of the points the 10th-90th percentile range
  is > OSC_SPREAD of their median; judged on OSC_MIN_POINTS points or more.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Literal

from tunewise.doctor.advice import flat_advice, oscillation_advice
from tunewise.doctor.findings import Finding, Severity, fmt_lr, num

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

NOT_FALLING_AT, FLAT_AT, FLAT_ERROR_AT, FLAT_BAND, NOISY, MIN_FALL = 10, 50, 100, 0.10, 0.05, 0.01
FLAT_MIN_POINTS, OSC_SPREAD, OSC_MIN_POINTS = 5, 0.5, 10


Stage = Literal["early", "checkpoint", "end"]


def _ends(values: list[float], stage: Stage) -> tuple[float, float]:
    """Loss at the start and now. Early on, the means of the first and last 3 points; at the live
    checkpoints, the means of the first and last tenth (at least 3 and 5 points: per-step noise averages
    out); at the end of the run the first point (or the median of the first 3, when higher: one lucky
    batch is no start) and the median of the last tenth (at least 3 points)."""
    n = len(values)
    if stage == "early":
        return statistics.fmean(values[:3]), statistics.fmean(values[-3:])
    if stage == "checkpoint":
        return statistics.fmean(values[: max(3, n // 10)]), statistics.fmean(values[-max(5, n // 10) :])
    start = max(values[0], statistics.median(values[:3]))
    return start, statistics.median(values[-max(3, n // 10) :])


def _noise(values: list[float]) -> float:
    """Standard deviation of the points around their straight-line fit: the batch-to-batch noise."""
    slope, intercept = statistics.linear_regression(range(len(values)), values)
    return statistics.stdev(v - (intercept + slope * i) for i, v in enumerate(values))


def spread(values: list[float]) -> float:
    """The 10th-90th percentile range, as a fraction of the median."""
    level = statistics.median(values)
    if level <= 0 or len(values) < 2:
        return 0.0
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return (deciles[-1] - deciles[0]) / level


def _oscillating(values: list[float]) -> bool:
    """Swinging widely without a trend, over OSC_MIN_POINTS points at least: a few noisy logs are no
    sustained oscillation (their 10-90% range is just their extremes)."""
    if len(values) < OSC_MIN_POINTS:
        return False
    start, now = _ends(values, "end")
    return now > (1 - FLAT_BAND) * start and spread(values[len(values) // 3 :]) > OSC_SPREAD


class ProgressRules:
    """The progress family: is the loss falling, and did it end lower than it began?"""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.end_change: float | None = None  # relative change of the loss, start to end; set by finish()
        # A rate still warming up barely moves the loss: judge "not falling" once warmup is over.
        self.not_falling_at = max(NOT_FALLING_AT, min(watch.warmup_steps or 0, FLAT_AT // 2))

    @property
    def flat_at_end(self) -> bool:
        oscillating = "oscillation" in self.watch.open_episodes
        return self.end_change is not None and self.end_change > -FLAT_BAND and not oscillating

    def check(self, step: int) -> list[Finding]:
        """not_falling at the early checkpoint, flat at FLAT_AT and FLAT_ERROR_AT points."""
        n = len(self.watch.losses)
        diverging = {"loss_spike", "loss_degradation"} & self.watch.open_episodes.keys()
        if n not in (self.not_falling_at, FLAT_AT, FLAT_ERROR_AT) or diverging:
            return []  # (a spike or a climb is reported already; it says nothing about learning speed)
        values = [loss for _, loss in self.watch.losses]
        if n == self.not_falling_at:
            start, now = _ends(values, "early")
            noise = _noise(values)
            if noise * math.sqrt(2 / 3) > NOISY * abs(start):
                return []  # too noisy to see a fall this early: the flat check decides later
            fell = start - now > min(MIN_FALL * abs(start), noise)
            return [] if fell else [self._finding("not_falling", "warning", step)]
        start, now = _ends(values, "checkpoint")
        if now > start * (1 - FLAT_BAND):
            return [self._finding("flat", "warning" if n == FLAT_AT else "error", step)]
        return []

    def finish(self) -> list[Finding]:
        """The end-of-run flat test; sets `end_change`."""
        losses = self.watch.losses
        values = [loss for _, loss in losses]
        # (after a divergence the curve says nothing about learning speed)
        stopped = {"loss_spike", "non_finite", "loss_degradation"} & self.watch.open_episodes.keys()
        if len(values) < FLAT_MIN_POINTS or stopped:
            return []
        start, now = _ends(values, "end")
        self.end_change = (now - start) / abs(start) if start else None
        if self.watch.overfitting.eval_fell(FLAT_BAND):
            self.end_change = None  # the held-out loss fell: the run learned, whatever the train loss did
        if "oscillation" not in self.watch.open_episodes and _oscillating(values):
            return [self._oscillation(losses[-1][0])]
        if self.flat_at_end and not self.watch.fired("flat", "error"):
            return [self._finding("flat", "error", losses[-1][0], at_end=True)]
        return []

    def _oscillation(self, step: int) -> Finding:
        values = [loss for _, loss in self.watch.losses]
        tail = values[len(values) // 3 :]
        level, swing = statistics.median(tail), spread(tail)
        self.watch.open("oscillation", step)
        title = (
            f"loss swings without a trend: between {num(min(tail))} and {num(max(tail))} "
            f"(median {num(level)}, a 10-90% range of {swing:.0%} of it) after {len(values)} "
            "logged steps"
        )
        evidence = {
            "step": step,
            "median_loss": level,
            "low": min(tail),
            "high": max(tail),
            "spread": swing,
            "points": len(values),
            "lr": self.watch.learning_rate or self.watch.peak_lr,
        }
        w = self.watch
        return Finding(
            step,
            "warning",
            "oscillation",
            title,
            evidence,
            *oscillation_advice(w.method, w.learning_rate or w.peak_lr, w.max_grad_norm),
        )

    def _finding(self, code: str, severity: Severity, step: int, at_end: bool = False) -> Finding:
        w = self.watch
        values = [loss for _, loss in w.losses]
        start, now = _ends(values, "early" if code == "not_falling" else "end" if at_end else "checkpoint")
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
