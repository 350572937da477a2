"""The doctor's rules: `CurveWatcher` sees a run point by point and returns findings as they happen.

The live monitor feeds it every optimizer step; `diagnose.diagnose_curve` replays a logged run through it.

Thresholds ("point" = one logged train entry: each optimizer step live, each `logging_steps` in
a Trainer log):

- non_finite (error): the first NaN/inf loss or grad norm. A loss logged as exactly 0.0 with a
  non-finite grad norm is a NaN that Trainer's `logging_nan_inf_filter` hid.
- no_trainable_tokens: a step whose batch trained no token (every label -100; its loss is 0/0 = NaN)
  is no signal, not a divergence: warning at the first such step, error at 10 in a row (or when no
  step of the run trained a token). Only logs that count trained tokens (metrics.jsonl) show it.
- loss_spike (warning): loss > 2x the running minimum (of the 5-point median) and > minimum + 1.0,
  or > 2x the median of the last 5 calm points and > that median + 0.5 (catches small-loss
  tasks); either way also > that median + 8 robust standard deviations of the last 20 calm points
  (per-step losses are noisy; 10% of the median is assumed below 10 points). Over once the loss is
  back under max(1.25x, +0.25) of the median. loss_explosion (error): > 5x the minimum and
  > minimum + 3.0, spiked for 10 points in a row, or still spiked when the run ends.
- grad_norm_spike (warning): > 10x the median of the last 20 calm grad norms; over under 3x.
- not_falling (warning) at point 10 (or at the end of warmup, up to point 25): the mean of the last
  3 points is not below the mean of the first 3 by more than 1% of it, nor by more than the noise
  (std of the points around their straight-line fit). Skipped when that noise would hide a 5% fall.
- flat: the mean of the last tenth of the points (at least 5) is above 95% of the mean of the first
  tenth (at least 3), at point 50 (warning), at point 100 and at the end of the run (error).
- overfitting: eval loss rose at 2 evals in a row (> 1% in all) while train loss fell.
  generalization_gap: eval minus the mean of the last 10 train losses > 0.3 (healthy is ~0.1-0.3)
  plus 2 standard errors of that mean, and growing.
  memorization: train < 0.1 with eval > 1.0. epoch_drop: train loss falls at an epoch boundary by
  > 10% (and > 0.05), > 3x its fall just before, and > 3 standard errors of its noise.
"""

import logging
import math
import statistics
from typing import Any, NamedTuple

from tunewise.findings import Advice, Finding, Fix, Severity, fmt_lr, num, rank_advice

logger = logging.getLogger(__name__)

SPIKE_RATIO, SPIKE_ABOVE_MIN, SPIKE_ABOVE_MEDIAN, MEDIAN_WINDOW = 2.0, 1.0, 0.5, 5
SPIKE_SIGMAS, NOISE_WINDOW = 8.0, 20
EXPLOSION_RATIO, EXPLOSION_ABOVE_MIN, EXPLOSION_POINTS = 5.0, 3.0, 10
GRAD_SPIKE_RATIO, GRAD_CALM_RATIO, GRAD_WINDOW = 10.0, 3.0, 20
NOT_FALLING_AT, FLAT_AT, FLAT_ERROR_AT, FLAT_BAND, NOISY = 10, 50, 100, 0.05, 0.05
NO_SIGNAL_POINTS = 10  # steps in a row with no trained token before "nothing to learn" is an error
GAP_LIMIT, MEMORIZED_TRAIN, MEMORIZED_EVAL, EPOCH_DROP = 0.3, 0.1, 1.0, 0.10
MIN_POINTS = 5
# Rates below LOW_LR barely move a run, above HIGH_LR they often blow it up; None = method unknown.
LOW_LR = {"lora": 5e-5, "qlora": 5e-5, "full": 1e-6, None: 5e-6}
HIGH_LR = {"lora": 1e-3, "qlora": 1e-3, "full": 1e-4, None: 1e-3}
TYPICAL_LR = {"lora": "1e-4 to 3e-4", "qlora": "1e-4 to 3e-4", "full": "1e-5 to 5e-5"}
OVERFIT_CODES = frozenset({"overfitting", "generalization_gap", "memorization", "epoch_drop"})
UNSTABLE_CODES = frozenset({"non_finite", "loss_spike", "loss_explosion", "grad_norm_spike"})
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
WATCHER_KEYS = ("method", "learning_rate", "max_grad_norm", "warmup_steps", "total_steps", "steps_per_epoch")


def finite(x: float | None) -> bool:
    """A number that is neither None, NaN nor inf."""
    return x is not None and math.isfinite(x)


def hides_nan(loss: float, grad_norm: float | None) -> bool:
    """Trainer's logging_nan_inf_filter logs a NaN loss as 0.0; the grad norm still shows it."""
    return loss == 0.0 and grad_norm is not None and not math.isfinite(grad_norm)


def _ends(values: list[float], early: bool) -> tuple[float, float]:
    """Mean loss at the start and now: 3 points each early on, later a tenth of the run (at least 3
    and 5 points) so that per-step noise averages out."""
    if early:
        return statistics.fmean(values[:3]), statistics.fmean(values[-3:])
    n = len(values)
    return statistics.fmean(values[:max(3, n // 10)]), statistics.fmean(values[-max(5, n // 10):])


def _noise(values: list[float]) -> float:
    """Standard deviation of the points around their straight-line fit: the batch-to-batch noise."""
    slope, intercept = statistics.linear_regression(range(len(values)), values)
    return statistics.stdev(v - (intercept + slope * i) for i, v in enumerate(values))


# ----------------------------------------------------------------------------- the rules


class _Eval(NamedTuple):
    step: int
    loss: float
    train: float | None  # recent train loss, for the gap
    train_se: float  # its standard error
    epoch: float | None



class CurveWatcher:
    """The doctor's rules, fed one point at a time; each observe_* returns only new findings.

    One finding per code per episode: an episode (non-finite values, a spike, eval rising) opens
    when a rule fires and closes when the curve is back; closed ones are listed in `recovered`.
    """

    def __init__(self, method: str | None = None, learning_rate: float | None = None,
                 max_grad_norm: float | None = None, warmup_steps: int | None = None,
                 total_steps: int | None = None, steps_per_epoch: int | None = None):
        self.method = method.lower() if method else None
        self.learning_rate, self.max_grad_norm, self.warmup_steps = learning_rate, max_grad_norm, warmup_steps
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.findings: list[Finding] = []
        self.open_episodes: dict[str, int] = {}  # code -> step it began
        self.recovered: list[tuple[str, int, int]] = []  # (code, began, ended)
        self.losses: list[tuple[int, float]] = []  # every finite (step, loss)
        self.end_change: float | None = None  # relative change of the loss, start to end; set by finish()
        # A rate still warming up barely moves the loss: judge "not falling" once warmup is over.
        self._not_falling_at = max(NOT_FALLING_AT, min(warmup_steps or 0, FLAT_AT // 2))
        self._calm: list[float] = []  # finite losses outside spikes: the reference for the next spike
        self._grads: list[float] = []  # finite grad norms outside spikes
        self._min: tuple[int, float] | None = None
        self._spike_ref, self._spiked_for, self._grad_ref = 0.0, 0, 0.0
        self._peak_lr: float | None = None
        self._zero_tokens = False
        self._untrained: list[int] = []  # the current run of steps that trained no token
        self._by_epoch: dict[int, list[float]] = {}
        self._evals: list[_Eval] = []
        self._last_step = 0

    def observe_train(self, step: int, loss: float, grad_norm: float | None, lr: float | None,
                      epoch: float | None, trainable_tokens: int | None = None) -> list[Finding]:
        """Check one optimizer (or logged) step; returns the findings it raised."""
        self._last_step = step
        if finite(lr):
            self._peak_lr = max(self._peak_lr or 0.0, lr)
        self._zero_tokens |= trainable_tokens == 0
        bad = (hides_nan(loss, grad_norm) or not finite(loss)
               or not (grad_norm is None or finite(grad_norm)))
        if trainable_tokens != 0:
            self._untrained = []
            self._close("no_trainable_tokens", step)
        if bad and trainable_tokens == 0:
            new = self._on_no_signal(step)  # 0/0: nothing to learn, not a divergence
        elif bad:
            new = self._on_non_finite(step, loss, grad_norm, lr, trainable_tokens)
        else:
            self._close("non_finite", step)
            new = self._check_loss_spike(step, loss) + self._check_grad_spike(step, grad_norm)
            self._record(step, loss, epoch)
            new += self._check_progress(step) + self._check_epoch_drop(step)
        self.findings += new
        return new

    def observe_eval(self, step: int, eval_loss: float | None, epoch: float | None) -> list[Finding]:
        """Check one evaluation; returns the findings it raised."""
        if not finite(eval_loss):
            return []  # a non-finite eval follows a non-finite train loss, which is reported already
        self._evals.append(_Eval(step, eval_loss, *self._recent_train(), epoch))
        if eval_loss <= min(e.loss for e in self._evals):
            self._close("overfitting", step)
        new = self._check_eval_rising(step) + self._check_gap(step) + self._check_memorized(step)
        self.findings += new
        return new

    def finish(self) -> list[Finding]:
        """End-of-run checks: a spike that never came back, a loss that stayed flat, nothing trained."""
        new: list[Finding] = []
        if "loss_spike" in self.open_episodes and "loss_explosion" not in self.open_episodes:
            new.append(self._explosion(self._last_step, self.losses[-1][1], at_end=True))
        if self._untrained and not self.losses and not self._fired("no_trainable_tokens", "error"):
            new.append(self._untrained_finding("error"))
        values = [loss for _, loss in self.losses]
        # (after a divergence the curve says nothing about learning speed)
        if len(values) >= NOT_FALLING_AT and not {"loss_spike", "non_finite"} & self.open_episodes.keys():
            start, now = _ends(values, early=False)
            self.end_change = (now - start) / abs(start) if start else None
            if self.flat_at_end and not self._fired("flat", "error"):
                new.append(self._progress("flat", "error", self.losses[-1][0], at_end=True))
        self.findings += new
        return new

    @property
    def flat_at_end(self) -> bool:
        return self.end_change is not None and self.end_change > -FLAT_BAND

    def trouble_began(self, step: int) -> int:
        """The step where the climb that ended at `step` (a divergence) began: the first of the losses right
        before it that all sit above 2x (and 1.0 above) the lowest loss seen before them; else `step`."""
        before = [(s, x) for s, x in self.losses if s < step]
        began = step
        for i in range(len(before) - 1, 0, -1):
            low = min(x for _, x in before[:i])
            if not (before[i][1] > SPIKE_RATIO * low and before[i][1] > low + SPIKE_ABOVE_MIN):
                break
            began = before[i][0]
        return began

    @property
    def nothing_trained(self) -> bool:
        """No token trained for NO_SIGNAL_POINTS steps in a row (or at all), and no falling loss after."""
        return self._fired("no_trainable_tokens", "error") and (self.end_change is None or self.flat_at_end)

    # -- bookkeeping
    def _open(self, code: str, step: int) -> bool:
        """Open an episode; False when one with this code is open already (no repeated findings)."""
        if code in self.open_episodes:
            return False
        self.open_episodes[code] = step
        return True

    def _fired(self, code: str, severity: Severity | None = None) -> bool:
        """Whether a finding with this code (and severity) was raised already: the once-per-run rules."""
        return any(f.code == code and severity in (None, f.severity) for f in self.findings)

    def _close(self, code: str, step: int) -> None:
        if code in self.open_episodes:
            self.recovered.append((code, self.open_episodes.pop(code), step))

    def _record(self, step: int, loss: float, epoch: float | None) -> None:
        self.losses.append((step, loss))
        if "loss_spike" not in self.open_episodes:
            self._calm.append(loss)
            # The minimum of a 5-point median: the minimum of raw per-step losses sits far below the curve.
            smooth = statistics.median(self._calm[-MEDIAN_WINDOW:])
            if self._min is None or smooth < self._min[1]:
                self._min = (step, smooth)
        # Trainer logs epoch 1.0 on the last step of the first epoch, so (0, 1] is epoch 0.
        index = (max(0, math.ceil(epoch - 1e-9) - 1) if finite(epoch) and epoch > 0
                 else (step - 1) // self.steps_per_epoch if self.steps_per_epoch else None)
        if index is not None:
            self._by_epoch.setdefault(index, []).append(loss)

    def _recent_train(self) -> tuple[float | None, float]:
        """Mean of the last 10 train losses since the previous eval, and its standard error."""
        since = self._evals[-1].step if self._evals else -1
        recent = [x for step, x in self.losses if step > since][-10:] or [x for _, x in self.losses[-10:]]
        if len(recent) < 2:
            return (recent[0] if recent else None), 0.0
        return statistics.fmean(recent), statistics.stdev(recent) / math.sqrt(len(recent))

    def _best_eval(self) -> dict[str, Any]:
        if not self._evals:
            return {}
        best = min(self._evals, key=lambda e: e.loss)
        return {"best_eval_step": best.step, "best_eval_loss": best.loss, "best_eval_epoch": best.epoch}

    # -- divergence
    def _on_non_finite(self, step: int, loss: float, grad_norm: float | None, lr: float | None,
                       tokens: int | None) -> list[Finding]:
        if not self._open("non_finite", step):
            return []
        hidden = hides_nan(loss, grad_norm)
        shown = math.nan if hidden else loss
        last = self.losses[-1] if self.losses else None
        what = ("NaN (logged as 0.0 with grad_norm NaN: Trainer's logging_nan_inf_filter hid it)" if hidden
                else num(shown))
        if finite(shown):
            title = f"grad_norm is {num(grad_norm)} at step {step} (loss {num(shown)}); lr {fmt_lr(lr)}"
        elif last:
            title = (f"loss went from {num(last[1])} at step {last[0]} to {what} at step {step}; "
                     f"lr {fmt_lr(lr)}")
        else:
            title = f"loss is {what} from the first logged step {step}; lr {fmt_lr(lr)}"
        evidence = {"step": step, "loss": shown, "grad_norm": grad_norm, "lr": lr,
                    "last_finite_loss": last[1] if last else None,
                    "last_finite_step": last[0] if last else None,
                    "nan_hidden_by_logging_filter": hidden, "trainable_tokens": tokens}
        return [Finding(step, "error", "non_finite", title, evidence, *self._divergence_advice())]

    def _on_no_signal(self, step: int) -> list[Finding]:
        """A step that trained no token: warn when such steps begin, an error when they go on."""
        self._untrained.append(step)
        if self._open("no_trainable_tokens", step):
            return [self._untrained_finding("warning")]
        if len(self._untrained) == NO_SIGNAL_POINTS and not self._fired("no_trainable_tokens", "error"):
            return [self._untrained_finding("error")]
        return []

    def _untrained_finding(self, severity: Severity) -> Finding:
        first, last, n = self._untrained[0], self._untrained[-1], len(self._untrained)
        if severity == "warning":
            title = (f"step {first} trained no token: every label in its batch is -100, so its loss is 0/0 "
                     "(NaN) and its update was skipped")
        else:
            span = f"steps {first}-{last}" if n > 1 else f"step {first}"
            title = (f"no token was trained in {n} steps in a row ({span}): every label is -100, there is "
                     "nothing to learn")
        evidence = {"step": last, "trained_tokens": 0, "steps_without_trained_tokens": n, "first_step": first,
                    "lr": self._peak_lr}
        return Finding(last, severity, "no_trainable_tokens", title, evidence, *self._masking_advice())

    def _masking_advice(self) -> Advice:
        """Causes and fixes of batches without trained tokens, most likely first."""
        return rank_advice([
            (3, "labels are masked: every label is -100 (trained_tokens 0), so no token carries loss",
             Fix("data.train_on=assistant",
                 "train the assistant turns; `tunewise inspect` shows which tokens are trained (the -100s)")),
            (2, "the responses are cut off: the prompt fills data.max_seq_length, leaving no response token",
             Fix("data.too_long=drop", "drop examples whose response does not fit (or raise "
                                       "data.max_seq_length); `tunewise check` lists them")),
            (1, "the data was read wrongly: no turn is recognised as the assistant's",
             Fix(None, "`tunewise inspect` shows how each row was read and which role each turn got")),
        ])

    def _check_loss_spike(self, step: int, loss: float) -> list[Finding]:
        if len(self._calm) < 3 or self._min is None:
            return []
        low_step, low = self._min
        exploded = loss > EXPLOSION_RATIO * low and loss > low + EXPLOSION_ABOVE_MIN
        if "loss_spike" in self.open_episodes:
            if loss <= max(1.25 * self._spike_ref, self._spike_ref + 0.25):
                self._close("loss_spike", step)
                self._close("loss_explosion", step)
                return []
            self._spiked_for += 1
            stuck = exploded or self._spiked_for >= EXPLOSION_POINTS
            stuck = stuck and "loss_explosion" not in self.open_episodes
            return [self._explosion(step, loss)] if stuck else []
        ref = statistics.median(self._calm[-MEDIAN_WINDOW:])
        window = self._calm[-NOISE_WINDOW:]
        center = statistics.median(window)
        sigma = 1.4826 * statistics.median(abs(x - center) for x in window)  # robust std of the noise
        if len(window) < 10:
            sigma = max(sigma, 0.1 * ref)  # too few points to trust the estimate: assume 10% noise
        spiked = ((loss > SPIKE_RATIO * low and loss > low + SPIKE_ABOVE_MIN)
                  or (loss > SPIKE_RATIO * ref and loss > ref + SPIKE_ABOVE_MEDIAN))
        if not spiked or loss <= ref + SPIKE_SIGMAS * sigma:
            return []
        self._open("loss_spike", step)
        self._spike_ref, self._spiked_for = ref, 1
        if exploded:
            return [self._explosion(step, loss)]
        title = (f"loss jumped to {num(loss)} at step {step} (running minimum {num(low)} at step "
                 f"{low_step}, recent median {num(ref)})")
        evidence = {"step": step, "loss": loss, "running_min": low, "running_min_step": low_step,
                    "recent_median": ref, "lr": self._peak_lr}
        return [Finding(step, "warning", "loss_spike", title, evidence, *self._divergence_advice())]

    def _explosion(self, step: int, loss: float, at_end: bool = False) -> Finding:
        began = self.open_episodes.get("loss_spike", step)
        self._open("loss_explosion", began)
        low_step, low = self._min or (step, loss)
        now = f"the run ended at {num(loss)} (step {step})" if at_end else f"now {num(loss)} at step {step}"
        title = (f"loss exploded at step {began} and did not come back: running minimum {num(low)} at step "
                 f"{low_step}; {now}")
        evidence = {"step": step, "spike_step": began, "loss": loss, "running_min": low,
                    "running_min_step": low_step, "lr": self._peak_lr}
        return Finding(step, "error", "loss_explosion", title, evidence, *self._divergence_advice())

    def _check_grad_spike(self, step: int, grad_norm: float | None) -> list[Finding]:
        if grad_norm is None:
            return []
        if "grad_norm_spike" in self.open_episodes:
            if grad_norm <= GRAD_CALM_RATIO * self._grad_ref:
                self._close("grad_norm_spike", step)
            return []
        ref = statistics.median(self._grads[-GRAD_WINDOW:]) if len(self._grads) >= 5 else 0.0
        if ref <= 0 or grad_norm <= GRAD_SPIKE_RATIO * ref:
            self._grads.append(grad_norm)
            return []
        self._open("grad_norm_spike", step)
        self._grad_ref = ref
        title = (f"grad_norm jumped to {num(grad_norm)} at step {step}, {grad_norm / ref:.0f}x its recent "
                 f"median {num(ref)}")
        evidence = {"step": step, "grad_norm": grad_norm, "recent_median": ref, "ratio": grad_norm / ref,
                    "max_grad_norm": self.max_grad_norm, "lr": self._peak_lr}
        return [Finding(step, "warning", "grad_norm_spike", title, evidence, *self._divergence_advice())]

    def _divergence_advice(self) -> Advice:
        """Causes and fixes of non-finite values, spikes and explosions, ranked with the run's facts."""
        lr, clip, warmup, total = (self.learning_rate or self._peak_lr, self.max_grad_norm, self.warmup_steps,
                                   self.total_steps)
        high = lr is not None and lr > HIGH_LR.get(self.method, HIGH_LR[None])
        typical = (f"; {self.method} usually trains at {TYPICAL_LR[self.method]}"
                   if self.method in TYPICAL_LR else "")
        lr_fix = Fix(f"training.learning_rate={fmt_lr(lr / 10)}" if lr else None,
                     "a tenth of the rate: smaller steps do not overshoot")
        clip_text = ("max_grad_norm is 0 (no clipping): one large gradient can throw the weights off"
                     if clip == 0 else f"gradient clipping too loose (max_grad_norm {clip})" if clip
                     else "no or too little gradient clipping")
        warm = max(100, (total or 0) // 10)
        warm = min(warm, total // 2) if total and total >= 2 else warm  # never most of a short run
        warm_text = ("no warmup: the full rate hits fresh weights at step 1" if warmup == 0
                     else f"too little warmup ({warmup} steps)" if warmup else "too little warmup")
        items = [
            (4 + (6 if high else 0), f"learning rate too high ({fmt_lr(lr)}{typical})", lr_fix),
            (3 + (5 if clip == 0 else 0) - (2 if clip and clip <= 0.3 else 0), clip_text,
             Fix("training.max_grad_norm=0.3", "clip each update's gradient norm to 0.3")),
            (2 + (3 if warmup == 0 else 0), warm_text,
             Fix(f"training.warmup_steps={warm}", "ramp the rate up so the first updates are small")),
            (1, "a bad example in the batch (empty target, extreme length, garbage tokens)",
             Fix(None, "filter the dataset: `tunewise inspect` shows examples with no trained tokens or "
                       "extreme length")),
        ]
        return rank_advice(items)

    # -- progress
    def _check_progress(self, step: int) -> list[Finding]:
        n = len(self.losses)
        if n not in (self._not_falling_at, FLAT_AT, FLAT_ERROR_AT) or "loss_spike" in self.open_episodes:
            return []  # (a spike is reported already; its losses say nothing about learning speed)
        values = [loss for _, loss in self.losses]
        if n == self._not_falling_at:
            start, now = _ends(values, early=True)
            noise = _noise(values)
            if noise * math.sqrt(2 / 3) > NOISY * abs(start):
                return []  # too noisy to see a fall this early: the flat check decides later
            fell = start - now > min(0.01 * abs(start), noise)
            return [] if fell else [self._progress("not_falling", "warning", step)]
        start, now = _ends(values, early=False)
        if now > start * (1 - FLAT_BAND):
            return [self._progress("flat", "warning" if n == FLAT_AT else "error", step)]
        return []

    def _progress(self, code: str, severity: Severity, step: int, at_end: bool = False) -> Finding:
        values = [loss for _, loss in self.losses]
        start, now = _ends(values, early=code == "not_falling")
        change = (now - start) / abs(start) * 100 if start else 0.0
        grad = statistics.median(self._grads) if self._grads else None
        lr = self.learning_rate or self._peak_lr
        when = "at the end of the run" if at_end else f"after {len(values)} logged steps"
        title = (f"loss is {code.replace('_', ' ')} {when}: {num(start)} at the start, {num(now)} at step "
                 f"{step} ({change:+.1f}%); lr {fmt_lr(lr)}")
        evidence = {"step": step, "start_loss": start, "loss": now, "change_pct": change, "lr": lr,
                    "median_grad_norm": grad, "points": len(values),
                    "trainable_tokens": 0 if self._zero_tokens else None}
        return Finding(step, severity, code, title, evidence, *self._flat_advice(lr, grad))

    def _flat_advice(self, lr: float | None, grad: float | None) -> Advice:
        """Causes and fixes of a loss that does not move, ranked with the run's facts."""
        low = lr is not None and lr < LOW_LR.get(self.method, LOW_LR[None])
        if low and self.method in ("lora", "qlora"):
            lr_text = f"learning rate {fmt_lr(lr)} is too low: a LoRA run at a full-fine-tuning rate"
        elif low:
            lr_text = f"learning rate {fmt_lr(lr)} is too low for {self.method or 'any'} fine-tuning"
        else:
            lr_text = f"learning rate too low ({fmt_lr(lr)})"
        no_grad = grad is not None and grad < 1e-8
        masked = " (trainable_tokens is 0)" if self._zero_tokens else ""
        items = [
            (3 + (20 if masked else 0), f"labels are masked: few or no tokens are trained{masked}",
             Fix("data.train_on=assistant", "train the assistant turns; `tunewise inspect` shows the -100s")),
            (2 + (10 if low else 0), lr_text,
             Fix(f"training.learning_rate={fmt_lr(lr * 10)}" if lr else None, "a 10x larger rate")),
            (1 + (15 if no_grad else 0),
             "the adapter receives no gradients" + (f" (median grad_norm {num(grad)})" if no_grad else ""),
             Fix(None, "with gradient checkpointing on a PEFT model call "
                       "`model.enable_input_require_grads()` so gradients reach the adapter; check that "
                       "trainable parameters are > 0")),
        ]
        return rank_advice(items)

    # -- overfitting
    def _check_epoch_drop(self, step: int) -> list[Finding]:
        if not self._by_epoch or self._fired("epoch_drop"):
            return []
        index = max(self._by_epoch)
        now, before = self._by_epoch[index], self._by_epoch.get(index - 1, [])
        if len(now) != 3 or len(before) < 6:
            return []
        last, after = statistics.fmean(before[-3:]), statistics.fmean(now)
        drop, trend = last - after, statistics.fmean(before[-6:-3]) - last
        diffs = [b - a for a, b in zip(before, before[1:], strict=False)]
        noise = statistics.stdev(diffs) / math.sqrt(2)
        # 3 standard errors of the difference of two 3-point means
        if drop <= max(EPOCH_DROP * last, 0.05, 3 * trend, 3 * noise * math.sqrt(2 / 3)):
            return []
        title = (f"train loss dropped {drop / last:.0%} at the start of epoch {index + 1} ({num(last)} -> "
                 f"{num(after)}) against {num(trend)} over the steps before: the model is memorizing")
        evidence = {"step": step, "epoch": index + 1, "loss_before": last, "loss_after": after, "drop": drop,
                    "drop_before": trend, **self._best_eval()}
        return [Finding(step, "warning", "epoch_drop", title, evidence, *self._overfit_advice())]

    def _check_eval_rising(self, step: int) -> list[Finding]:
        if len(self._evals) < 3:
            return []
        (a, train_a), (b, _), (c, train_c) = [(e.loss, e.train) for e in self._evals[-3:]]
        train_falls = train_a is None or train_c is None or train_c < train_a
        if not (a < b < c and c - a > 0.01 * a and train_falls) or not self._open("overfitting", step):
            return []
        best = self._best_eval()
        title = (f"eval loss rose 2 evals in a row: {num(a)} -> {num(b)} -> {num(c)} at step {step} "
                 f"(best {num(best['best_eval_loss'])} at step {best['best_eval_step']}) while train loss "
                 f"fell to {num(train_c)}")
        evidence = {"step": step, "eval_loss": c, "train_loss": train_c, **best}
        return [Finding(step, "warning", "overfitting", title, evidence, *self._overfit_advice())]

    def _check_gap(self, step: int) -> list[Finding]:
        if len(self._evals) < 2 or self._fired("generalization_gap"):
            return []
        prev, now = self._evals[-2:]
        if prev.train is None or now.train is None:
            return []
        gap, prev_gap = now.loss - now.train, prev.loss - prev.train
        # Two standard errors of margin: per-step train losses are noisy.
        if gap <= GAP_LIMIT + 2 * now.train_se or gap <= prev_gap:
            return []
        title = (f"train-eval gap grew to {gap:.2f} at step {step} (was {prev_gap:.2f}; healthy is about "
                 f"0.1-0.3): eval {num(now.loss)}, train {num(now.train)}")
        evidence = {"step": step, "gap": gap, "previous_gap": prev_gap, "eval_loss": now.loss,
                    "train_loss": now.train, **self._best_eval()}
        return [Finding(step, "warning", "generalization_gap", title, evidence, *self._overfit_advice())]

    def _check_memorized(self, step: int) -> list[Finding]:
        eval_loss, train = self._evals[-1].loss, self._evals[-1].train
        memorized = train is not None and train < MEMORIZED_TRAIN and eval_loss > MEMORIZED_EVAL
        if not memorized or self._fired("memorization"):
            return []
        title = (f"train loss {num(train)} while eval loss is {num(eval_loss)} at step {step}: the "
                 "training set is memorized")
        evidence = {"step": step, "train_loss": train, "eval_loss": eval_loss, **self._best_eval()}
        return [Finding(step, "warning", "memorization", title, evidence, *self._overfit_advice())]

    def _overfit_advice(self) -> Advice:
        """Causes and fixes of overfitting, in the order to try them."""
        epoch = self._best_eval().get("best_eval_epoch")
        when = f": eval loss was best at epoch {epoch:.2f}" if finite(epoch) else ""
        epochs = max(1, round(epoch)) if finite(epoch) else 1
        items = [
            (5, "too little data for this many passes: the model memorizes it",
             Fix(None, "add more, or more varied, training examples")),
            (4, f"too many epochs{when}",
             Fix(f"training.num_train_epochs={epochs}", "stop near the best eval")),
            (3, "too little adapter dropout", Fix("adapter.dropout=0.1", "dropout regularizes the adapter")),
            (2, "adapter rank larger than the data needs",
             Fix("adapter.r=4", "a smaller adapter memorizes less")),
            (1, "too little weight decay", Fix("training.weight_decay=0.01", "pulls weights toward zero")),
        ]
        if self.method == "full":
            items = [item for item in items if not (item[2].change or "").startswith("adapter.")]
        return rank_advice(items)
