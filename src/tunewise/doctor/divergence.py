"""Divergence rules: non-finite values, loss spikes and explosions, gradient-norm spikes.

- non_finite (error): the first NaN/inf loss or grad norm. A loss logged as exactly 0.0 with a
  non-finite grad norm is a NaN that Trainer's `logging_nan_inf_filter` hid.
- loss_spike (warning): loss > SPIKE_RATIO x the running minimum (of the MEDIAN_WINDOW-point median)
  and > minimum + SPIKE_ABOVE_MIN, or > SPIKE_RATIO x the median of the last MEDIAN_WINDOW calm points
  and > that median + SPIKE_ABOVE_MEDIAN (catches small-loss tasks); either way also > that median +
  SPIKE_SIGMAS robust standard deviations of the last NOISE_WINDOW calm points (per-step losses are
  noisy). Judged from MIN_NOISE_POINTS calm points on (before that the noise is unknown and only the
  first-steps test below judges; from MEDIAN_WINDOW calm points on, a loss past the explosion line of
  the running minimum is beyond any noise and is judged at once). Over once the loss is back under
  max(CALM_RATIO x, + CALM_ABOVE) of the median.
- loss_explosion (error): > EXPLOSION_RATIO x the minimum and > minimum + EXPLOSION_ABOVE_MIN,
  spiked for EXPLOSION_POINTS points in a row, or still spiked when the run ends.
- loss_explosion in the first steps, before a calm curve exists: within the first EARLY_POINTS points
  the loss is > EARLY_RATIO x the starting loss (the median of the first 3 points) and > start +
  EARLY_ABOVE. At any step: the loss reaches KNOWS_NOTHING x ln(vocab size), the loss of a model that
  knows nothing, from a start below KNEW_SOMETHING x ln(vocab size) (vocab size from the run's context;
  the test is skipped without it).
- grad_norm_spike (warning): > GRAD_SPIKE_RATIO x the median of the last GRAD_WINDOW calm grad
  norms; over under GRAD_CALM_RATIO x.
- grad_norm_non_finite (warning): a NaN/inf grad norm while the loss stays calm (within CALM_RATIO of
  its recent median): an overflow whose update was skipped (fp16's loss scaler, or tunewise's monitor);
  its fixes depend on the run's precision (the watcher's `precision`, from the run's facts).
  GRAD_NAN_POINTS in a row (or with a loss that is not calm) is non_finite.
- A loss logged as exactly 0.0 with no grad norm, right after a loss above ZERO_FROM (and with every loss
  of the last NOISE_WINDOW logs above it), is a hidden NaN too (no real loss falls from there to 0.0000
  in one log): non_finite.
- loss_degradation (error): without a spike, the median of the last MEDIAN_WINDOW losses climbs above
  DEGRADE_RATIO x the running minimum, by more than DEGRADE_OF_DROP of what the run had learned (start
  - minimum) and by more than DEGRADE_SIGMAS x the point-to-point noise, for DEGRADE_POINTS points in
  a row; over once back under CALM_RATIO x the minimum. loss_rising (warning), at the end of the run:
  the mean of the last tenth of the losses is above RISE_RATIO x the minimum, by more than
  RISE_OF_DROP of what was learned (and the same noise margin). A run too short for these (under 10
  points) that ends far above where it started (DEGRADE_RATIO x the start and END_ABOVE above it) is
  a loss_degradation at its end; so is one that learned and whose last 3 points all climbed back
  (their mean DEGRADE_RATIO x its low, by DEGRADE_OF_DROP of what it learned; milder: loss_rising).
  Neither judges a short run that turns (up, then down) at more than ZIGZAG_MAX of its steps: too few
  points of per-batch noise to tell an ending from a batch.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from tunewise.doctor.advice import divergence_advice, hidden_nan_advice, overflow_advice
from tunewise.doctor.curve import finite, hides_nan
from tunewise.doctor.findings import Advice, Finding, fmt_lr, num

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

SPIKE_RATIO, SPIKE_ABOVE_MIN, SPIKE_ABOVE_MEDIAN, MEDIAN_WINDOW = 2.0, 1.0, 0.5, 5
SPIKE_SIGMAS, NOISE_WINDOW, MIN_NOISE_POINTS = 8.0, 20, 10
CALM_RATIO, CALM_ABOVE = 1.25, 0.25
EXPLOSION_RATIO, EXPLOSION_ABOVE_MIN, EXPLOSION_POINTS = 5.0, 3.0, 10
GRAD_SPIKE_RATIO, GRAD_CALM_RATIO, GRAD_WINDOW = 10.0, 3.0, 20
EARLY_POINTS, EARLY_RATIO, EARLY_ABOVE = 10, 3.0, 1.0
KNOWS_NOTHING, KNEW_SOMETHING = 1.0, 0.75  # fractions of ln(vocab size)
ZERO_FROM = 0.01  # a logged loss above this cannot fall to exactly 0.0 at the next log
GRAD_NAN_POINTS = 3
DEGRADE_RATIO, DEGRADE_OF_DROP, DEGRADE_SIGMAS, DEGRADE_POINTS = 1.5, 0.5, 3.0, 5
RISE_RATIO, RISE_OF_DROP, END_ABOVE = 1.2, 0.25, 0.2
LEARNED_MIN = 0.1  # a short run learned once its lowest loss is this fraction below its start
ZIGZAG_MAX = 0.5  # a short run that turns at more of its steps than this is per-batch noise


def zigzag(values: list[float]) -> float:
    """The share of steps at which the curve turns (its step-to-step change flips sign): about 2/3 for
    independent per-batch noise, near 0 for a curve that falls and then climbs."""
    diffs = [b - a for a, b in zip(values, values[1:], strict=False) if b != a]
    if len(diffs) < 2:
        return 0.0
    return sum((a > 0) != (b > 0) for a, b in zip(diffs, diffs[1:], strict=False)) / (len(diffs) - 1)


def above_start_line(loss: float, start: float) -> bool:
    """EARLY_RATIO x the run's starting loss and EARLY_ABOVE above it: more than the run had learned."""
    return loss > EARLY_RATIO * start and loss > start + EARLY_ABOVE


def above_explosion_line(loss: float, low: float) -> bool:
    """EXPLOSION_RATIO x the running minimum `low` and EXPLOSION_ABOVE_MIN above it: beyond any noise."""
    return loss > EXPLOSION_RATIO * low and loss > low + EXPLOSION_ABOVE_MIN


def above_spike_line(loss: float, low: float, ref: float) -> bool:
    """SPIKE_RATIO x the running minimum `low` and SPIKE_ABOVE_MIN above it, or SPIKE_RATIO x the recent
    median `ref` and SPIKE_ABOVE_MEDIAN above it (the noise margin aside)."""
    return (loss > SPIKE_RATIO * low and loss > low + SPIKE_ABOVE_MIN) or (
        loss > SPIKE_RATIO * ref and loss > ref + SPIKE_ABOVE_MEDIAN
    )


class DivergenceRules:
    """The divergence family; the watcher calls it for every point and at the end of the run."""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.calm: list[float] = []  # finite losses outside spikes: the reference for the next spike
        self.calm_grad_norms: list[float] = []  # finite grad norms outside spikes
        self.minimum: tuple[int, float] | None = None  # (step, running minimum of the smoothed loss)
        self.start: float | None = None  # the starting loss: the median of the first 3 calm losses
        self._first: list[float] = []
        self.hidden_steps: set[int] = set()  # steps whose 0.0 loss is a NaN the logging filter hid
        self._spike_ref, self._spiked_for, self._grad_ref = 0.0, 0, 0.0
        self._grad_nan: list[int] = []  # the current run of steps with a non-finite grad norm
        self._degraded: list[int] = []  # the current run of points above the degradation line
        self._diff_sum, self._diffs = 0.0, 0  # |step-to-step change| of the calm losses, over the whole run

    @property
    def knows_nothing(self) -> float | None:
        """ln(vocab size): the loss of a model that predicts every token with equal odds."""
        vocab = self.watch.vocab_size
        return math.log(vocab) if vocab and vocab > 1 else None

    def record(self, step: int, loss: float) -> None:
        """Remember a finite loss: outside a spike it is calm and may lower the running minimum."""
        if len(self._first) < 3 and "loss_spike" not in self.watch.open_episodes:
            self._first.append(loss)
            self.start = statistics.median(self._first)
        if "loss_spike" not in self.watch.open_episodes:
            if self.calm:
                self._diff_sum, self._diffs = self._diff_sum + abs(loss - self.calm[-1]), self._diffs + 1
            self.calm.append(loss)
            # The minimum of a 5-point median: the minimum of raw per-step losses sits far below the curve.
            smooth = statistics.median(self.calm[-MEDIAN_WINDOW:])
            if self.minimum is None or smooth < self.minimum[1]:
                self.minimum = (step, smooth)

    def hides_nan(self, loss: float, grad_norm: float | None) -> bool:
        """A NaN that Trainer's logging filter wrote as 0.0: the grad norm shows it, or, when no grad norm
        is logged, the loss before it was far from 0 (no real loss falls to 0.0000 in one log) and so was
        every loss of the last NOISE_WINDOW logs (else 0.0 is within the curve's own range)."""
        if hides_nan(loss, grad_norm):
            return True
        if loss != 0.0 or grad_norm is not None:
            return False
        if "non_finite" in self.watch.open_episodes:
            return True
        recent = [x for _, x in self.watch.losses[-NOISE_WINDOW:]]
        # A curve whose recent batches reach near 0 (a memorized set logged per example) has real zeros.
        return bool(recent) and recent[-1] > ZERO_FROM and min(recent) > ZERO_FROM

    def on_non_finite(
        self, step: int, loss: float, grad_norm: float | None, lr: float | None, tokens: int | None
    ) -> list[Finding]:
        hidden = self.hides_nan(loss, grad_norm)
        if hidden:
            self.hidden_steps.add(step)
        if not self.watch.open("non_finite", step):
            return []
        shown = math.nan if hidden else loss
        last = self.watch.losses[-1] if self.watch.losses else None
        if hidden and grad_norm is None:
            what = "NaN (logged as exactly 0.0: Trainer's logging_nan_inf_filter hides a NaN loss that way)"
        elif hidden:
            what = "NaN (logged as 0.0 with grad_norm NaN: Trainer's logging_nan_inf_filter hid it)"
        else:
            what = num(shown)
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
        advice = hidden_nan_advice(self.advice(), self.watch.precision) if hidden else self.advice()
        return [Finding(step, "error", "non_finite", title, evidence, *advice)]

    def on_grad_non_finite(self, step: int, loss: float, grad_norm: float, lr: float | None) -> list[Finding]:
        """A finite loss with a NaN/inf grad norm: an fp16 overflow (warning) while the loss stays calm and it
        does not go on; else a divergence."""
        self._grad_nan.append(step)
        if "non_finite" in self.watch.open_episodes:
            return []
        if not self._calm_loss(loss) or len(self._grad_nan) >= GRAD_NAN_POINTS:
            self.watch.close("grad_norm_non_finite", step)
            return self.on_non_finite(step, loss, grad_norm, lr, None)
        if not self.watch.open("grad_norm_non_finite", step):
            return []
        title = (
            f"grad_norm is {num(grad_norm)} at step {step} while the loss stays at {num(loss)}: an overflow "
            "whose update was skipped"
        )
        evidence = {"step": step, "grad_norm": grad_norm, "loss": loss, "lr": lr}
        w = self.watch
        advice = overflow_advice(w.precision, w.method, w.learning_rate or w.peak_lr, w.max_grad_norm)
        evidence["precision"] = w.precision
        return [Finding(step, "warning", "grad_norm_non_finite", title, evidence, *advice)]

    def grad_finite(self, step: int) -> None:
        """A finite grad norm ends a run of non-finite ones."""
        self._grad_nan = []
        self.watch.close("grad_norm_non_finite", step)

    def _calm_loss(self, loss: float) -> bool:
        if "loss_spike" in self.watch.open_episodes:
            return False
        if len(self.calm) < 3:
            return True
        ref = statistics.median(self.calm[-MEDIAN_WINDOW:])
        return loss <= max(CALM_RATIO * ref, ref + CALM_ABOVE)

    def check_loss(self, step: int, loss: float) -> list[Finding]:
        """loss_spike when a finite loss leaves the calm curve; loss_explosion when it stays away, when it
        leaves the first steps' level far behind, or when it reaches the loss of a model that knows
        nothing."""
        episodes = self.watch.open_episodes
        erased = self._erased(loss)
        if "loss_spike" in episodes:
            low = self.minimum[1] if self.minimum else self._spike_ref
            if loss <= max(CALM_RATIO * self._spike_ref, self._spike_ref + CALM_ABOVE):
                self.watch.close("loss_spike", step)
                self.watch.close("loss_explosion", step)
                return []
            self._spiked_for += 1
            stuck = above_explosion_line(loss, low) or erased or self._spiked_for >= EXPLOSION_POINTS
            return [self._explosion(step, loss)] if stuck and "loss_explosion" not in episodes else []
        if erased:
            return [self._begin_explosion(step, loss, self.start, "knows_nothing")]
        early = self.start is not None and len(self.watch.losses) < EARLY_POINTS
        if early and above_start_line(loss, self.start):
            return [self._begin_explosion(step, loss, self.start, "start")]
        if len(self.calm) < MEDIAN_WINDOW or self.minimum is None:
            return []  # no running minimum yet: only the first-steps test above judges
        low_step, low = self.minimum
        ref = statistics.median(self.calm[-MEDIAN_WINDOW:])
        if len(self.calm) < MIN_NOISE_POINTS:
            # The noise is not known yet; a jump past the explosion line is beyond any batch's noise.
            beyond = above_explosion_line(loss, low)
            return [self._begin_explosion(step, loss, ref, "running_min")] if beyond else []
        window = self.calm[-NOISE_WINDOW:]
        center = statistics.median(window)
        sigma = 1.4826 * statistics.median(abs(x - center) for x in window)  # robust std of the noise
        if not above_spike_line(loss, low, ref) or loss <= ref + SPIKE_SIGMAS * sigma:
            return []
        if above_explosion_line(loss, low):
            return [self._begin_explosion(step, loss, ref, "running_min")]
        self.watch.open("loss_spike", step)
        self._spike_ref, self._spiked_for = ref, 1
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

    def _erased(self, loss: float) -> bool:
        """The loss reached that of a model that knows nothing, from a start well below it."""
        ceiling = self.knows_nothing
        if ceiling is None or self.start is None or self.start >= KNEW_SOMETHING * ceiling:
            return False
        return loss >= KNOWS_NOTHING * ceiling

    def _begin_explosion(self, step: int, loss: float, ref: float, against: str) -> Finding:
        self.watch.open("loss_spike", step)
        self._spike_ref, self._spiked_for = ref, 1
        return self._explosion(step, loss, against=against)

    def _explosion(
        self, step: int, loss: float, at_end: bool = False, against: str = "running_min"
    ) -> Finding:
        began = self.watch.open_episodes.get("loss_spike", step)
        self.watch.open("loss_explosion", began)
        low_step, low = self.minimum or (step, loss)
        start, ceiling = self.start, self.knows_nothing
        now = f"the run ended at {num(loss)} (step {step})" if at_end else f"now {num(loss)} at step {step}"
        if against == "knows_nothing":
            why = (
                f"{num(loss)} is at or above ln(vocab size) = {num(ceiling)}, the loss of a model that knows "
                f"nothing: the fine-tune erased what the model knew (it started at {num(start)})"
            )
            title = f"loss exploded at step {began}: {why}"
        elif against == "start":
            title = (
                f"loss exploded at step {began}: {num(loss)}, "
                f"{f'{loss / start:.0f}x' if start else 'far above'} the {num(start)} it started at"
            )
        else:
            title = (
                f"loss exploded at step {began} and did not come back: running minimum {num(low)} at step "
                f"{low_step}; {now}"
            )
        evidence = {
            "step": step,
            "spike_step": began,
            "loss": loss,
            "start_loss": start,
            "running_min": low,
            "running_min_step": low_step,
            "knows_nothing_loss": ceiling,
            "lr": self.watch.peak_lr,
        }
        return Finding(step, "error", "loss_explosion", title, evidence, *self.advice())

    def check_degradation(self, step: int) -> list[Finding]:
        """loss_degradation: the smoothed loss climbed far above its minimum and stays there (no spike)."""
        episodes = self.watch.open_episodes
        losses = self.watch.losses
        if self.minimum is None or len(losses) < 2 * MEDIAN_WINDOW or "loss_spike" in episodes:
            return []
        low_step, low = self.minimum
        level = statistics.median(x for _, x in losses[-MEDIAN_WINDOW:])
        if "loss_degradation" in episodes:
            if level <= CALM_RATIO * low:
                self.watch.close("loss_degradation", step)
            return []
        rise = level - low
        learned = max(0.0, (self.start or low) - low)
        margin = max(DEGRADE_OF_DROP * learned, DEGRADE_SIGMAS * self.noise())
        if level > DEGRADE_RATIO * low and rise > margin:
            self._degraded.append(step)
        else:
            self._degraded = []
        if len(self._degraded) < DEGRADE_POINTS:
            return []
        began = self._degraded[0]
        self.watch.open("loss_degradation", low_step)
        title = (
            f"loss climbed from its minimum {num(low)} at step {low_step} to {num(level)} at step {step} "
            f"({level / low:.1f}x) and has not come back: no NaN, no single spike, a divergence all the same"
        )
        evidence = self._climb_evidence(step, low, low_step, level, above_since=began)
        return [Finding(step, "error", "loss_degradation", title, evidence, *self.advice())]

    def noise(self) -> float:
        """The point-to-point noise of the calm losses (a trend does not inflate it): the larger of the recent
        estimate (median over the last NOISE_WINDOW changes) and the whole run's (mean change), so that a
        quiet stretch of a noisy run does not make its noisy minimum look like a real low."""
        window = self.calm[-NOISE_WINDOW:]
        if len(window) < 3:
            return 0.0
        diffs = [abs(b - a) for a, b in zip(window, window[1:], strict=False)]
        recent = 1.4826 * statistics.median(diffs) / math.sqrt(2)
        # For Gaussian noise the mean |change| of two points is 2 / sqrt(pi) std.
        return max(recent, self._diff_sum / self._diffs * math.sqrt(math.pi) / 2)

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
        """A spike still open when the run ends is an explosion; a loss that ends well above its minimum
        is rising."""
        episodes = self.watch.open_episodes
        if "loss_spike" in episodes and "loss_explosion" not in episodes:
            return [self._explosion(self.watch.last_step, self.watch.losses[-1][1], at_end=True)]
        if {"loss_spike", "loss_degradation", "non_finite"} & episodes.keys() or self.minimum is None:
            return []
        values = [x for _, x in self.watch.losses]
        if len(values) < 2 * MEDIAN_WINDOW:
            return self._ended_above_start(values)
        low_step, low = self.minimum
        end = statistics.fmean(values[-max(MEDIAN_WINDOW, len(values) // 10) :])
        rise = end - low
        learned = max(0.0, (self.start or low) - low)
        if not (end > RISE_RATIO * low and rise > max(RISE_OF_DROP * learned, DEGRADE_SIGMAS * self.noise())):
            return []
        step = self.watch.last_step
        title = (
            f"loss ended at {num(end)}, {end / low:.2f}x its minimum {num(low)} at step {low_step}: it "
            "climbed back and did not fall again"
        )
        evidence = self._climb_evidence(step, low, low_step, end)
        return [Finding(step, "warning", "loss_rising", title, evidence, *self.advice())]

    def _ended_above_start(self, values: list[float]) -> list[Finding]:
        """A run too short for the degradation test (under 2 median windows) that ended far above where it
        started: each of its last 3 points above DEGRADE_RATIO x the start, their median END_ABOVE above it
        (a per-step log's batches jump around: one high batch among them is noise). Or one that learned and
        climbed back (`_short_climb`)."""
        start = self.start
        if start is None or len(values) < MEDIAN_WINDOW or zigzag(values) > ZIGZAG_MAX:
            return []  # (a few per-batch losses that jump up and down at most steps: noise, no ending)
        end = statistics.median(values[-3:])
        above = min(values[-3:]) > DEGRADE_RATIO * start  # each of them: one noisy batch is no ending
        if not (above and end > start + END_ABOVE):
            return self._short_climb(values)
        step = self.watch.last_step
        self.watch.open("loss_degradation", self.watch.losses[0][0])
        title = f"loss ended at {num(end)} (step {step}), {end / start:.1f}x the {num(start)} it started at"
        evidence = {
            "step": step,
            "start_loss": start,
            "loss": end,
            "ratio": end / start,
            "min_loss": self.minimum[1] if self.minimum else None,
            "min_step": self.watch.losses[0][0],
            "lr": self.watch.peak_lr,
        }
        return [Finding(step, "error", "loss_degradation", title, evidence, *self.advice())]

    def _short_climb(self, values: list[float]) -> list[Finding]:
        """A short run (too few points for a smoothed minimum) that learned (its lowest point LEARNED_MIN
        below its start) and then climbed back: each of its last 3 points above RISE_RATIO x that low.
        Their mean above DEGRADE_RATIO x the low, by DEGRADE_OF_DROP of what was learned, is a
        loss_degradation; above RISE_RATIO x, by RISE_OF_DROP of it, a loss_rising."""
        at = min(range(len(values) - 3), key=values.__getitem__)
        low, start = values[at], self.start or values[0]
        tail = values[-3:]
        learned = start - low
        if at == 0 or learned < LEARNED_MIN * start or low <= 0 or min(tail) <= RISE_RATIO * low:
            return []  # (it never fell from its start: nothing learned to lose)
        end = statistics.fmean(tail)
        if end > DEGRADE_RATIO * low and end - low > DEGRADE_OF_DROP * learned:
            severity, code = "error", "loss_degradation"
        elif end > RISE_RATIO * low and end - low > RISE_OF_DROP * learned:
            severity, code = "warning", "loss_rising"
        else:
            return []
        low_step = self.watch.losses[at][0]
        step = self.watch.last_step
        if code == "loss_degradation":
            self.watch.open("loss_degradation", low_step)
        title = (
            f"loss climbed from {num(low)} at step {low_step} to {num(end)} over its last 3 logs (step "
            f"{step}), {end / low:.1f}x that low: it learned, then got worse and did not come back"
        )
        evidence = self._climb_evidence(step, low, low_step, end, start_loss=start)
        return [Finding(step, severity, code, title, evidence, *self.advice())]

    def _climb_evidence(self, step: int, low: float, low_step: int, loss: float, **extra: float) -> dict:
        """The evidence of a loss that climbed from its low (degradation, rising, a short run's climb)."""
        return {
            "step": step,
            "min_loss": low,
            "min_step": low_step,
            "loss": loss,
            "ratio": loss / low,
            **extra,
            "lr": self.watch.peak_lr,
        }

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
