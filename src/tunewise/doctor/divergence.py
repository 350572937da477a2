"""Divergence rules: non-finite values, loss spikes and explosions, gradient-norm spikes.

- non_finite (error): the first NaN/inf loss or grad norm. A loss logged as exactly 0.0 with a
  non-finite grad norm is a NaN that Trainer's `logging_nan_inf_filter` hid.
- loss_spike (warning): loss > SPIKE_RATIO x the running minimum (of the MEDIAN_WINDOW-point median)
  and > minimum + SPIKE_ABOVE_MIN, or > SPIKE_RATIO x the median of the last MEDIAN_WINDOW calm points
  and > that median + SPIKE_ABOVE_MEDIAN (catches small-loss tasks); either way also > that median +
  SPIKE_SIGMAS robust standard deviations of the last NOISE_WINDOW calm points (per-step losses are
  noisy; ASSUMED_NOISE of the median is assumed below MIN_NOISE_POINTS points). Over once the loss is
  back under max(CALM_RATIO x, + CALM_ABOVE) of the median.
- loss_explosion (error): > EXPLOSION_RATIO x the minimum and > minimum + EXPLOSION_ABOVE_MIN,
  spiked for EXPLOSION_POINTS points in a row, or still spiked when the run ends.
- grad_norm_spike (warning): > GRAD_SPIKE_RATIO x the median of the last GRAD_WINDOW calm grad
  norms; over under GRAD_CALM_RATIO x.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from tunewise.doctor.advice import divergence_advice
from tunewise.doctor.curve import finite, hides_nan
from tunewise.doctor.findings import Advice, Finding, fmt_lr, num

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

SPIKE_RATIO, SPIKE_ABOVE_MIN, SPIKE_ABOVE_MEDIAN, MEDIAN_WINDOW = 2.0, 1.0, 0.5, 5
SPIKE_SIGMAS, NOISE_WINDOW, MIN_NOISE_POINTS, ASSUMED_NOISE = 8.0, 20, 10, 0.1
CALM_RATIO, CALM_ABOVE = 1.25, 0.25
EXPLOSION_RATIO, EXPLOSION_ABOVE_MIN, EXPLOSION_POINTS = 5.0, 3.0, 10
GRAD_SPIKE_RATIO, GRAD_CALM_RATIO, GRAD_WINDOW = 10.0, 3.0, 20


class DivergenceRules:
    """The divergence family; the watcher calls it for every point and at the end of the run."""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.calm: list[float] = []  # finite losses outside spikes: the reference for the next spike
        self.calm_grad_norms: list[float] = []  # finite grad norms outside spikes
        self.minimum: tuple[int, float] | None = None  # (step, running minimum of the smoothed loss)
        self._spike_ref, self._spiked_for, self._grad_ref = 0.0, 0, 0.0

    def record(self, step: int, loss: float) -> None:
        """Remember a finite loss: outside a spike it is calm and may lower the running minimum."""
        if "loss_spike" not in self.watch.open_episodes:
            self.calm.append(loss)
            # The minimum of a 5-point median: the minimum of raw per-step losses sits far below the curve.
            smooth = statistics.median(self.calm[-MEDIAN_WINDOW:])
            if self.minimum is None or smooth < self.minimum[1]:
                self.minimum = (step, smooth)

    def on_non_finite(
        self, step: int, loss: float, grad_norm: float | None, lr: float | None, tokens: int | None
    ) -> list[Finding]:
        if not self.watch.open("non_finite", step):
            return []
        hidden = hides_nan(loss, grad_norm)
        shown = math.nan if hidden else loss
        last = self.watch.losses[-1] if self.watch.losses else None
        what = (
            "NaN (logged as 0.0 with grad_norm NaN: Trainer's logging_nan_inf_filter hid it)"
            if hidden
            else num(shown)
        )
        if finite(shown):
            title = f"grad_norm is {num(grad_norm)} at step {step} (loss {num(shown)}); lr {fmt_lr(lr)}"
        elif last:
            title = (
                f"loss went from {num(last[1])} at step {last[0]} to {what} at step {step}; lr {fmt_lr(lr)}"
            )
        else:
            title = f"loss is {what} from the first logged step {step}; lr {fmt_lr(lr)}"
        evidence = {
            "step": step,
            "loss": shown,
            "grad_norm": grad_norm,
            "lr": lr,
            "last_finite_loss": last[1] if last else None,
            "last_finite_step": last[0] if last else None,
            "nan_hidden_by_logging_filter": hidden,
            "trainable_tokens": tokens,
        }
        return [Finding(step, "error", "non_finite", title, evidence, *self.advice())]

    def check_loss(self, step: int, loss: float) -> list[Finding]:
        """loss_spike when a finite loss leaves the calm curve; loss_explosion when it stays away."""
        if len(self.calm) < 3 or self.minimum is None:
            return []
        low_step, low = self.minimum
        exploded = loss > EXPLOSION_RATIO * low and loss > low + EXPLOSION_ABOVE_MIN
        if "loss_spike" in self.watch.open_episodes:
            if loss <= max(CALM_RATIO * self._spike_ref, self._spike_ref + CALM_ABOVE):
                self.watch.close("loss_spike", step)
                self.watch.close("loss_explosion", step)
                return []
            self._spiked_for += 1
            stuck = exploded or self._spiked_for >= EXPLOSION_POINTS
            stuck = stuck and "loss_explosion" not in self.watch.open_episodes
            return [self._explosion(step, loss)] if stuck else []
        ref = statistics.median(self.calm[-MEDIAN_WINDOW:])
        window = self.calm[-NOISE_WINDOW:]
        center = statistics.median(window)
        sigma = 1.4826 * statistics.median(abs(x - center) for x in window)  # robust std of the noise
        if len(window) < MIN_NOISE_POINTS:
            sigma = max(sigma, ASSUMED_NOISE * ref)  # too few points to trust the estimate
        spiked = (loss > SPIKE_RATIO * low and loss > low + SPIKE_ABOVE_MIN) or (
            loss > SPIKE_RATIO * ref and loss > ref + SPIKE_ABOVE_MEDIAN
        )
        if not spiked or loss <= ref + SPIKE_SIGMAS * sigma:
            return []
        self.watch.open("loss_spike", step)
        self._spike_ref, self._spiked_for = ref, 1
        if exploded:
            return [self._explosion(step, loss)]
        title = (
            f"loss jumped to {num(loss)} at step {step} (running minimum {num(low)} at step "
            f"{low_step}, recent median {num(ref)})"
        )
        evidence = {
            "step": step,
            "loss": loss,
            "running_min": low,
            "running_min_step": low_step,
            "recent_median": ref,
            "lr": self.watch.peak_lr,
        }
        return [Finding(step, "warning", "loss_spike", title, evidence, *self.advice())]

    def _explosion(self, step: int, loss: float, at_end: bool = False) -> Finding:
        began = self.watch.open_episodes.get("loss_spike", step)
        self.watch.open("loss_explosion", began)
        low_step, low = self.minimum or (step, loss)
        now = f"the run ended at {num(loss)} (step {step})" if at_end else f"now {num(loss)} at step {step}"
        title = (
            f"loss exploded at step {began} and did not come back: running minimum {num(low)} at step "
            f"{low_step}; {now}"
        )
        evidence = {
            "step": step,
            "spike_step": began,
            "loss": loss,
            "running_min": low,
            "running_min_step": low_step,
            "lr": self.watch.peak_lr,
        }
        return Finding(step, "error", "loss_explosion", title, evidence, *self.advice())

    def check_grad_norm(self, step: int, grad_norm: float | None) -> list[Finding]:
        if grad_norm is None:
            return []
        if "grad_norm_spike" in self.watch.open_episodes:
            if grad_norm <= GRAD_CALM_RATIO * self._grad_ref:
                self.watch.close("grad_norm_spike", step)
            return []
        grads = self.calm_grad_norms
        ref = statistics.median(grads[-GRAD_WINDOW:]) if len(grads) >= 5 else 0.0
        if ref <= 0 or grad_norm <= GRAD_SPIKE_RATIO * ref:
            grads.append(grad_norm)
            return []
        self.watch.open("grad_norm_spike", step)
        self._grad_ref = ref
        title = (
            f"grad_norm jumped to {num(grad_norm)} at step {step}, {grad_norm / ref:.0f}x its recent "
            f"median {num(ref)}"
        )
        evidence = {
            "step": step,
            "grad_norm": grad_norm,
            "recent_median": ref,
            "ratio": grad_norm / ref,
            "max_grad_norm": self.watch.max_grad_norm,
            "lr": self.watch.peak_lr,
        }
        return [Finding(step, "warning", "grad_norm_spike", title, evidence, *self.advice())]

    def finish(self) -> list[Finding]:
        """A spike still open when the run ends is an explosion."""
        episodes = self.watch.open_episodes
        if "loss_spike" in episodes and "loss_explosion" not in episodes:
            return [self._explosion(self.watch.last_step, self.watch.losses[-1][1], at_end=True)]
        return []

    def trouble_began(self, step: int) -> int:
        """The step where the climb that ended at `step` (a divergence) began: the first of the losses right
        before it that all sit above 2x (and 1.0 above) the lowest loss seen before them; else `step`."""
        before = [(s, x) for s, x in self.watch.losses if s < step]
        began = step
        for i in range(len(before) - 1, 0, -1):
            low = min(x for _, x in before[:i])
            if not (before[i][1] > SPIKE_RATIO * low and before[i][1] > low + SPIKE_ABOVE_MIN):
                break
            began = before[i][0]
        return began

    def advice(self) -> Advice:
        w = self.watch
        return divergence_advice(
            w.method, w.learning_rate or w.peak_lr, w.max_grad_norm, w.warmup_steps, w.total_steps
        )
