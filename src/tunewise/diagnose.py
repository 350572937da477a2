"""The doctor: watch a loss curve, say what went wrong, with numbers, causes and config changes.

`CurveWatcher` holds the rules; the training monitor feeds it every optimizer step and
`diagnose_curve` replays a whole run through it. `load_curve` reads a tunewise run directory
(metrics.jsonl), plain Hugging Face Trainer output (trainer_state.json, checkpoint-*/) or
TensorBoard event files. No torch or transformers here: `tunewise doctor` starts fast anywhere.

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

Diagnosis.exit_code(): 0 when no finding is worse than info, 1 when the worst is a warning, 2 when
any is an error.
"""

import json
import logging
import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

import yaml

logger = logging.getLogger(__name__)

Severity = Literal["info", "warning", "error"]
Verdict = Literal["healthy", "diverged", "flat", "overfitting", "unstable", "insufficient-data"]
Advice = tuple[list[str], list["Fix"]]

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
EXPECTED = ("expected a tunewise run directory (metrics.jsonl), a Trainer output_dir (trainer_state.json "
            "or checkpoint-*/trainer_state.json), a trainer_state.json file or TensorBoard event files")


class DoctorError(Exception):
    """Logs are missing or unreadable; the message names the file (and line) and what was expected."""


@dataclass
class Fix:
    """One remedy: a `section.key=value` override when a config change exists, and why it helps."""

    change: str | None
    why: str


@dataclass
class Finding:
    """Something the doctor saw at a step: evidence in numbers, ranked causes, ranked fixes."""

    step: int | None
    severity: Severity
    code: str
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    causes: list[str] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "severity": self.severity, "code": self.code, "title": self.title,
                "evidence": self.evidence, "causes": self.causes,
                "fixes": [{"change": f.change, "why": f.why} for f in self.fixes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        fixes = [Fix(f.get("change"), f.get("why", "")) for f in data.get("fixes") or []]
        return cls(data.get("step"), data["severity"], data["code"], data["title"],
                   dict(data.get("evidence") or {}), list(data.get("causes") or []), fixes)


@dataclass
class TrainPoint:
    step: int
    loss: float
    grad_norm: float | None = None
    lr: float | None = None
    epoch: float | None = None
    trainable_tokens: int | None = None


@dataclass
class EvalPoint:
    step: int
    eval_loss: float | None
    epoch: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # other eval_* numbers (accuracy, bleu, ...)


@dataclass
class Curve:
    """A run's logged points, one per step, sorted by step."""

    train: list[TrainPoint]
    eval: list[EvalPoint]
    source: str = ""
    checkpoints: list[int] = field(default_factory=list)  # saved checkpoint steps; empty when unknown
    best_model_checkpoint: str | None = None
    total_steps: int | None = None


# ----------------------------------------------------------------------------- small helpers


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _hides_nan(loss: float, grad_norm: float | None) -> bool:
    """Trainer's logging_nan_inf_filter logs a NaN loss as 0.0; the grad norm still shows it."""
    return loss == 0.0 and grad_norm is not None and not math.isfinite(grad_norm)


def _num(x: float | None) -> str:
    """A loss-like number for people: three significant digits, NaN and inf spelled out."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else "inf" if x > 0 else "-inf"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _lr(x: float | None) -> str:
    # Always with a dot: PyYAML reads `2e-05` as a string but `2.0e-05` as a number.
    return "n/a" if x is None else f"{x:.1e}"


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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


def _rank(items: list[tuple[float, str, "Fix"]]) -> Advice:
    """Sort (score, cause, fix) by score, keeping the default order among equals."""
    ordered = sorted(items, key=lambda item: -item[0])
    return [cause for _, cause, _ in ordered], [fix for _, _, fix in ordered]


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
        if _finite(lr):
            self._peak_lr = max(self._peak_lr or 0.0, lr)
        self._zero_tokens |= trainable_tokens == 0
        bad = (_hides_nan(loss, grad_norm) or not _finite(loss)
               or not (grad_norm is None or _finite(grad_norm)))
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
        if not _finite(eval_loss):
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
        index = (max(0, math.ceil(epoch - 1e-9) - 1) if _finite(epoch) and epoch > 0
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
        hidden = _hides_nan(loss, grad_norm)
        shown = math.nan if hidden else loss
        last = self.losses[-1] if self.losses else None
        what = ("NaN (logged as 0.0 with grad_norm NaN: Trainer's logging_nan_inf_filter hid it)" if hidden
                else _num(shown))
        if _finite(shown):
            title = f"grad_norm is {_num(grad_norm)} at step {step} (loss {_num(shown)}); lr {_lr(lr)}"
        elif last:
            title = f"loss went from {_num(last[1])} at step {last[0]} to {what} at step {step}; lr {_lr(lr)}"
        else:
            title = f"loss is {what} from the first logged step {step}; lr {_lr(lr)}"
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
        return _rank([
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
        title = (f"loss jumped to {_num(loss)} at step {step} (running minimum {_num(low)} at step "
                 f"{low_step}, recent median {_num(ref)})")
        evidence = {"step": step, "loss": loss, "running_min": low, "running_min_step": low_step,
                    "recent_median": ref, "lr": self._peak_lr}
        return [Finding(step, "warning", "loss_spike", title, evidence, *self._divergence_advice())]

    def _explosion(self, step: int, loss: float, at_end: bool = False) -> Finding:
        began = self.open_episodes.get("loss_spike", step)
        self._open("loss_explosion", began)
        low_step, low = self._min or (step, loss)
        now = f"the run ended at {_num(loss)} (step {step})" if at_end else f"now {_num(loss)} at step {step}"
        title = (f"loss exploded at step {began} and did not come back: running minimum {_num(low)} at step "
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
        title = (f"grad_norm jumped to {_num(grad_norm)} at step {step}, {grad_norm / ref:.0f}x its recent "
                 f"median {_num(ref)}")
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
        lr_fix = Fix(f"training.learning_rate={_lr(lr / 10)}" if lr else None,
                     "a tenth of the rate: smaller steps do not overshoot")
        clip_text = ("max_grad_norm is 0 (no clipping): one large gradient can throw the weights off"
                     if clip == 0 else f"gradient clipping too loose (max_grad_norm {clip})" if clip
                     else "no or too little gradient clipping")
        warm = max(100, (total or 0) // 10)
        warm = min(warm, total // 2) if total and total >= 2 else warm  # never most of a short run
        warm_text = ("no warmup: the full rate hits fresh weights at step 1" if warmup == 0
                     else f"too little warmup ({warmup} steps)" if warmup else "too little warmup")
        items = [
            (4 + (6 if high else 0), f"learning rate too high ({_lr(lr)}{typical})", lr_fix),
            (3 + (5 if clip == 0 else 0) - (2 if clip and clip <= 0.3 else 0), clip_text,
             Fix("training.max_grad_norm=0.3", "clip each update's gradient norm to 0.3")),
            (2 + (3 if warmup == 0 else 0), warm_text,
             Fix(f"training.warmup_steps={warm}", "ramp the rate up so the first updates are small")),
            (1, "a bad example in the batch (empty target, extreme length, garbage tokens)",
             Fix(None, "filter the dataset: `tunewise inspect` shows examples with no trained tokens or "
                       "extreme length")),
        ]
        return _rank(items)

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
        title = (f"loss is {code.replace('_', ' ')} {when}: {_num(start)} at the start, {_num(now)} at step "
                 f"{step} ({change:+.1f}%); lr {_lr(lr)}")
        evidence = {"step": step, "start_loss": start, "loss": now, "change_pct": change, "lr": lr,
                    "median_grad_norm": grad, "points": len(values),
                    "trainable_tokens": 0 if self._zero_tokens else None}
        return Finding(step, severity, code, title, evidence, *self._flat_advice(lr, grad))

    def _flat_advice(self, lr: float | None, grad: float | None) -> Advice:
        """Causes and fixes of a loss that does not move, ranked with the run's facts."""
        low = lr is not None and lr < LOW_LR.get(self.method, LOW_LR[None])
        if low and self.method in ("lora", "qlora"):
            lr_text = f"learning rate {_lr(lr)} is too low: a LoRA run at a full-fine-tuning rate"
        elif low:
            lr_text = f"learning rate {_lr(lr)} is too low for {self.method or 'any'} fine-tuning"
        else:
            lr_text = f"learning rate too low ({_lr(lr)})"
        no_grad = grad is not None and grad < 1e-8
        masked = " (trainable_tokens is 0)" if self._zero_tokens else ""
        items = [
            (3 + (20 if masked else 0), f"labels are masked: few or no tokens are trained{masked}",
             Fix("data.train_on=assistant", "train the assistant turns; `tunewise inspect` shows the -100s")),
            (2 + (10 if low else 0), lr_text,
             Fix(f"training.learning_rate={_lr(lr * 10)}" if lr else None, "a 10x larger rate")),
            (1 + (15 if no_grad else 0),
             "the adapter receives no gradients" + (f" (median grad_norm {_num(grad)})" if no_grad else ""),
             Fix(None, "with gradient checkpointing on a PEFT model call "
                       "`model.enable_input_require_grads()` so gradients reach the adapter; check that "
                       "trainable parameters are > 0")),
        ]
        return _rank(items)

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
        title = (f"train loss dropped {drop / last:.0%} at the start of epoch {index + 1} ({_num(last)} -> "
                 f"{_num(after)}) against {_num(trend)} over the steps before: the model is memorizing")
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
        title = (f"eval loss rose 2 evals in a row: {_num(a)} -> {_num(b)} -> {_num(c)} at step {step} "
                 f"(best {_num(best['best_eval_loss'])} at step {best['best_eval_step']}) while train loss "
                 f"fell to {_num(train_c)}")
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
                 f"0.1-0.3): eval {_num(now.loss)}, train {_num(now.train)}")
        evidence = {"step": step, "gap": gap, "previous_gap": prev_gap, "eval_loss": now.loss,
                    "train_loss": now.train, **self._best_eval()}
        return [Finding(step, "warning", "generalization_gap", title, evidence, *self._overfit_advice())]

    def _check_memorized(self, step: int) -> list[Finding]:
        eval_loss, train = self._evals[-1].loss, self._evals[-1].train
        memorized = train is not None and train < MEMORIZED_TRAIN and eval_loss > MEMORIZED_EVAL
        if not memorized or self._fired("memorization"):
            return []
        title = (f"train loss {_num(train)} while eval loss is {_num(eval_loss)} at step {step}: the "
                 "training set is memorized")
        evidence = {"step": step, "train_loss": train, "eval_loss": eval_loss, **self._best_eval()}
        return [Finding(step, "warning", "memorization", title, evidence, *self._overfit_advice())]

    def _overfit_advice(self) -> Advice:
        """Causes and fixes of overfitting, in the order to try them."""
        epoch = self._best_eval().get("best_eval_epoch")
        when = f": eval loss was best at epoch {epoch:.2f}" if _finite(epoch) else ""
        epochs = max(1, round(epoch)) if _finite(epoch) else 1
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
        return _rank(items)


# ----------------------------------------------------------------------------- reading logs


def load_curve(path: Path) -> Curve:
    """Read a run's train/eval points from any supported log; raises DoctorError when there are none."""
    path = Path(path)
    if not path.exists():
        raise DoctorError(f"{path}: no such file or directory; {EXPECTED}")
    curve = _read_file(path) if path.is_file() else _read_dir(path)
    if not curve.train and not curve.eval:
        raise DoctorError(f"{curve.source}: no train loss or eval loss entries found; {EXPECTED}")
    return curve


def _read_file(path: Path) -> Curve:
    if path.name.startswith("events.out.tfevents"):
        return _read_tensorboard(path)
    if path.suffix == ".jsonl":
        return _read_metrics_jsonl(path)
    if path.suffix == ".json":
        return _read_trainer_state(path)
    raise DoctorError(f"{path}: not a log the doctor reads; {EXPECTED}")


def _read_dir(path: Path) -> Curve:
    checkpoints = {int(m.group(1)): d for d in path.iterdir()
                   if d.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", d.name))}
    states = [checkpoints[s] / "trainer_state.json" for s in sorted(checkpoints)]
    states = [p for p in states if p.is_file()]
    if (path / "metrics.jsonl").is_file():
        curve = _read_metrics_jsonl(path / "metrics.jsonl")
    elif (path / "trainer_state.json").is_file():
        curve = _read_trainer_state(path / "trainer_state.json")
    elif states:
        curve = _read_trainer_state(states[-1])  # the newest checkpoint holds the whole history
    elif events := sorted(path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        curve = _read_tensorboard(events[-1].parent)  # the most recent run's directory
    else:
        raise DoctorError(f"{path}: found no logs; {EXPECTED}")
    curve.checkpoints = sorted(checkpoints) or curve.checkpoints
    return curve


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DoctorError names file:line when one is not JSON."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):  # a writer stopped mid-line
                logger.warning("%s:%d: ignoring the cut-off last line", path, lineno)
                return
            raise DoctorError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                              "expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DoctorError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _point(record: dict[str, Any], where: str, train: bool) -> TrainPoint | EvalPoint:
    """A train or eval point from one log record; DoctorError when its `step` is missing."""
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int | float):
        raise DoctorError(f'{where}: entry has no numeric `step`; expected e.g. {{"step": 10, "loss": 2.3}}')
    if train:
        tokens = record.get("trained_tokens", record.get("trainable_tokens"))
        return TrainPoint(int(step), _float(record["loss"]), _float(record.get("grad_norm")),
                          _float(record.get("learning_rate")), _float(record.get("epoch")),
                          int(tokens) if isinstance(tokens, int | float) else None)
    skip = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    metrics = {k: float(v) for k, v in record.items()
               if k.startswith("eval_") and k not in skip and _float(v) is not None}
    return EvalPoint(int(step), _float(record.get("eval_loss")), _float(record.get("epoch")), metrics)


def _curve(points: list[TrainPoint | EvalPoint], source: Path, **extra: Any) -> Curve:
    """Points in logged order -> Curve, keeping the last occurrence of each step.

    A step at or below one seen before means the run resumed from a checkpoint: what was logged
    after that step belongs to the abandoned attempt and is dropped.
    """
    train: dict[int, TrainPoint] = {}
    evals: dict[int, EvalPoint] = {}
    top = -1
    for p in points:
        is_train = isinstance(p, TrainPoint)
        if p.step <= top:
            # Step s logs its train loss, then its eval: an eval at s keeps the train loss at s.
            for kept, first_orphan in ((train, p.step + (not is_train)), (evals, p.step)):
                for s in [s for s in kept if s >= first_orphan]:
                    del kept[s]
        (train if is_train else evals)[p.step] = p
        top = p.step  # after dropping the orphans nothing later is left
    return Curve([train[s] for s in sorted(train) if train[s].loss is not None],
                 [evals[s] for s in sorted(evals)], str(source), **extra)


def _read_metrics_jsonl(path: Path) -> Curve:
    points = []
    for lineno, record in _json_lines(path):
        kind = record.get("type") or ("eval" if "eval_loss" in record else "train")
        if (kind == "train" and "loss" in record) or kind == "eval":
            points.append(_point(record, f"{path}:{lineno}", train=kind == "train"))
    return _curve(points, path)


def _read_trainer_state(path: Path) -> Curve:
    try:
        state = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DoctorError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                          "expected a Hugging Face trainer_state.json") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise DoctorError(f"{path}: no `log_history` list; expected a Hugging Face trainer_state.json")
    # Skip the final summary entry (train_runtime, train_loss): it is not a step.
    points = [_point(r, f"{path}: log_history[{i}]", train="loss" in r) for i, r in enumerate(history)
              if isinstance(r, dict) and "train_runtime" not in r
              and ("loss" in r or any(k.startswith("eval_") for k in r))]
    max_steps = state.get("max_steps")
    return _curve(points, path, best_model_checkpoint=state.get("best_model_checkpoint"),
                  total_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None)


def _read_tensorboard(path: Path) -> Curve:
    """Read a TensorBoard event file or directory (Trainer's tags: train/loss, eval/loss, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Keep every point (0); the accumulator drops steps orphaned by a resume itself.
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))

    def series(*names: str) -> dict[int, float]:
        name = next((n for n in names if n in tags), None)
        return {e.step: e.value for e in acc.Scalars(name)} if name else {}

    loss, grad, lr = series("train/loss", "loss"), series("train/grad_norm"), series("train/learning_rate")
    epoch, eval_loss = series("train/epoch", "epoch"), series("eval/loss", "eval_loss")
    train = [TrainPoint(s, v, grad.get(s), lr.get(s), epoch.get(s)) for s, v in sorted(loss.items())]
    evals = [EvalPoint(s, v, epoch.get(s)) for s, v in sorted(eval_loss.items())]
    return Curve(train, evals, str(path))


def _read_context(run_dir: Path) -> dict[str, Any]:
    """Facts for ranking causes, from a tunewise run's config.yaml, plan.json and result.json."""
    config_path = run_dir / "config.yaml"
    text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{config_path}:{mark.line + 1}" if mark else str(config_path)
        raise DoctorError(f"{where}: not valid YAML; expected the run's resolved config") from None
    training = config.get("training") or {}
    context: dict[str, Any] = {"method": (config.get("model") or {}).get("method")}
    for key in ("learning_rate", "max_grad_norm", "warmup_steps", "max_steps"):
        if _float(training.get(key)) is not None:
            context[key] = _float(training[key])
    if 0 < context.get("warmup_steps", 0) < 1:
        del context["warmup_steps"]  # a fraction of all steps (transformers 5); plan.json has the count
    elif "warmup_steps" in context:
        context["warmup_steps"] = int(context["warmup_steps"])
    if context.get("max_steps", 0) > 0:
        context["total_steps"] = int(context["max_steps"])
    plan = _json_object(run_dir / "plan.json")
    resolved = {"warmup_steps": plan.get("warmup_steps"), **{k: (plan.get("steps") or {}).get(k)
                                                             for k in ("total_steps", "steps_per_epoch")}}
    context.update({k: v for k, v in resolved.items() if isinstance(v, int)})
    context["status"] = _json_object(run_dir / "result.json").get("status")
    return context


def _json_object(path: Path) -> dict[str, Any]:
    """A small JSON file written by tunewise, or {} when it is missing or unreadable (it is only context)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        logger.warning("%s: not a JSON object; ignoring it", path)
        return {}
    return data


# ----------------------------------------------------------------------------- diagnosis


@dataclass
class Diagnosis:
    """What happened to a whole run: a verdict, a plain summary, findings and the checkpoint to keep."""

    verdict: Verdict
    summary: str
    findings: list[Finding]
    evidence: dict[str, Any]
    best_checkpoint: str | None
    source: str

    def worst_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__, default=None)

    def exit_code(self) -> int:
        """0 when no finding is worse than info, 1 when the worst is a warning, 2 when any is an error."""
        return SEVERITY_RANK[self.worst_severity() or "info"]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary, "evidence": self.evidence,
                "best_checkpoint": self.best_checkpoint, "source": self.source,
                "worst_severity": self.worst_severity(), "exit_code": self.exit_code(),
                "findings": [f.to_dict() for f in self.findings]}


def diagnose_path(path: Path) -> Diagnosis:
    """Load a run from any supported log and diagnose it, with config.yaml/result.json as context."""
    path = Path(path)
    curve = load_curve(path)
    return diagnose_curve(curve, _read_context(path if path.is_dir() else path.parent))


def diagnose_curve(curve: Curve, context: dict[str, Any] | None = None) -> Diagnosis:
    """Replay a curve through a CurveWatcher, add the whole-run checks, and give the verdict.

    Args:
        curve: the run's points.
        context: optional facts: CurveWatcher's arguments, and `status` from result.json.
    """
    context = context or {}
    watcher = CurveWatcher(**{key: context.get(key) for key in WATCHER_KEYS})
    watcher.total_steps = watcher.total_steps or curve.total_steps
    # Trainer evaluates after logging the train loss of the same step.
    for point in sorted([*curve.train, *curve.eval], key=lambda p: (p.step, isinstance(p, EvalPoint))):
        if isinstance(point, TrainPoint):
            watcher.observe_train(point.step, point.loss, point.grad_norm, point.lr, point.epoch,
                                  point.trainable_tokens)
        else:
            watcher.observe_eval(point.step, point.eval_loss, point.epoch)
    watcher.finish()
    _settle(watcher)
    verdict = _verdict(watcher, len(curve.train), context.get("status"))
    evidence = _run_evidence(curve, context.get("status"))
    bad_step = watcher.open_episodes.get("non_finite", watcher.open_episodes.get("loss_explosion"))
    checkpoint, evidence["keep"] = _choose_checkpoint(curve, bad_step)
    findings = list(watcher.findings)
    if verdict == "insufficient-data":
        findings.append(Finding(curve.train[-1].step if curve.train else None, "info", "insufficient_data",
                                f"only {len(curve.train)} train points; {MIN_POINTS} are needed to judge",
                                {"train_points": len(curve.train)}))
    summary = _summarize(verdict, findings, evidence)
    return Diagnosis(verdict, summary, findings, evidence, checkpoint, curve.source)


def _settle(watcher: CurveWatcher) -> None:
    """Post hoc, soften live findings that the rest of the run proved too pessimistic."""
    ended = {(code, began): end for code, began, end in watcher.recovered}
    last_step, last_loss = watcher.losses[-1] if watcher.losses else (None, None)
    for f in watcher.findings:
        if f.code in ("not_falling", "flat") and watcher.end_change is not None and not watcher.flat_at_end:
            f.severity, f.title = "info", f"{f.title}; it fell later ({_num(last_loss)} at step {last_step})"
        episode = {"non_finite": ("non_finite", f.step),
                   "loss_explosion": ("loss_spike", f.evidence.get("spike_step"))}.get(f.code)
        if episode in ended and f.severity == "error":
            f.severity, f.title = "warning", f"{f.title} (recovered by step {ended[episode]})"


def _verdict(watcher: CurveWatcher, train_points: int, status: str | None) -> Verdict:
    """diverged > nothing trained (flat) > insufficient-data > overfitting > flat > unstable > healthy."""
    codes = {f.code for f in watcher.findings}
    if status == "diverged" or {"non_finite", "loss_explosion"} & watcher.open_episodes.keys():
        return "diverged"
    if watcher.nothing_trained:
        return "flat"
    if train_points < MIN_POINTS:
        return "insufficient-data"
    if codes & OVERFIT_CODES:
        return "overfitting"
    if watcher.flat_at_end:
        return "flat"
    return "unstable" if codes & UNSTABLE_CODES else "healthy"


def _run_evidence(curve: Curve, status: str | None) -> dict[str, Any]:
    """Whole-run numbers: span, first/last/min loss, best and last eval, peak learning rate."""
    losses = [(p.step, math.nan if _hides_nan(p.loss, p.grad_norm) else p.loss) for p in curve.train]
    finite = [(s, x) for s, x in losses if _finite(x)]
    evals = [e for e in curve.eval if _finite(e.eval_loss)]
    lrs = [p.lr for p in curve.train if _finite(p.lr)]
    evidence: dict[str, Any] = {"train_points": len(losses), "eval_points": len(curve.eval)}
    if losses:
        evidence.update(first_step=losses[0][0], last_step=losses[-1][0], loss_last=losses[-1][1])
    if finite:
        low = min(finite, key=lambda t: t[1])
        evidence.update(loss_first=finite[0][1], loss_min=low[1], loss_min_step=low[0])
    if evals:
        best = min(evals, key=lambda e: e.eval_loss)
        evidence.update(best_eval_loss=best.eval_loss, best_eval_step=best.step,
                        last_eval_loss=evals[-1].eval_loss, last_eval_step=evals[-1].step)
    if lrs:
        evidence["peak_lr"] = max(lrs)
    if status:
        evidence["status"] = status
    return evidence


def _choose_checkpoint(curve: Curve, bad_step: int | None) -> tuple[str | None, str]:
    """The checkpoint to keep and why: lowest eval loss, else the last one before divergence."""
    evals = [e for e in curve.eval if _finite(e.eval_loss) and (bad_step is None or e.step < bad_step)]
    if evals:
        best = min(evals, key=lambda e: e.eval_loss)
        named = curve.best_model_checkpoint and Path(curve.best_model_checkpoint).name
        earlier = [s for s in curve.checkpoints if s <= best.step]
        name = (named if named == f"checkpoint-{best.step}"
                else f"checkpoint-{earlier[-1] if earlier else best.step}")
        return name, f"lowest eval loss {_num(best.eval_loss)} at step {best.step}"
    saved = [s for s in curve.checkpoints if bad_step is None or s < bad_step]
    if bad_step is not None and saved:
        return f"checkpoint-{saved[-1]}", f"the last checkpoint before the loss went bad at step {bad_step}"
    if bad_step is not None:
        return None, f"the last checkpoint saved before step {bad_step}, if any (checkpoint list unknown)"
    if saved:
        return f"checkpoint-{saved[-1]}", "no eval to compare: the final checkpoint; the run did not diverge"
    return None, "no eval and no checkpoint list: keep the final model"


def _summarize(verdict: Verdict, findings: list[Finding], ev: dict[str, Any]) -> str:
    """One or two plain sentences with the run's numbers."""
    span = (f"{_num(ev.get('loss_first'))} at step {ev.get('first_step')} to {_num(ev.get('loss_last'))} "
            f"at step {ev.get('last_step')}")
    if verdict == "diverged":
        bad = [f for f in findings if f.code in ("non_finite", "loss_explosion") and f.severity == "error"]
        what = bad[0].title if bad else f"result.json says the run diverged; loss went from {span}"
        return f"Training diverged: {what}. It never recovered (last logged step {ev.get('last_step')})."
    if verdict == "insufficient-data":
        return (f"Only {ev['train_points']} train points (steps {ev.get('first_step')}-"
                f"{ev.get('last_step')}); at least {MIN_POINTS} are needed to judge the curve.")
    if verdict == "overfitting" and ev.get("best_eval_step", ev.get("last_eval_step")) != ev.get(
            "last_eval_step"):
        return (f"Overfitting: eval loss was best at {_num(ev['best_eval_loss'])} (step "
                f"{ev['best_eval_step']}) and rose to {_num(ev['last_eval_loss'])} at step "
                f"{ev['last_eval_step']}, while train loss went from {span}.")
    untrained = [f for f in findings if f.code == "no_trainable_tokens" and f.severity == "error"]
    if verdict == "flat" and untrained:
        return f"Nothing to learn: {untrained[0].title} (last logged step {ev.get('last_step')})."
    codes = {"overfitting": OVERFIT_CODES, "flat": {"flat"}, "unstable": UNSTABLE_CODES}.get(verdict)
    if codes:
        first = min((f for f in findings if f.code in codes), key=lambda f: f.step or 0)
        lead = {"overfitting": "Overfitting", "flat": "Loss barely moved", "unstable": "Unstable"}[verdict]
        return f"{lead}: {first.title}. Over the run, loss went from {span}."
    tail = (f"; eval loss {_num(ev['last_eval_loss'])} at step {ev['last_eval_step']} (best "
            f"{_num(ev['best_eval_loss'])} at step {ev['best_eval_step']})" if "best_eval_step" in ev else "")
    return f"Healthy: loss fell from {span}{tail}."


# ----------------------------------------------------------------------------- text and findings.jsonl

_COLORS = {"error": "\033[31m", "warning": "\033[33m", "info": "\033[36m", "healthy": "\033[32m",
           "bold": "\033[1m"}


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_COLORS[style]}{text}\033[0m" if color else text


def render_diagnosis(d: Diagnosis, color: bool = False) -> str:
    """The text `tunewise doctor` prints: verdict, summary, evidence, findings, causes, fixes, checkpoint."""
    style = {"healthy": "healthy", "diverged": "error", "insufficient-data": "info"}.get(d.verdict, "warning")
    lines = [f"verdict: {_paint(d.verdict.upper(), style, color)}   (exit code {d.exit_code()})",
             f"source:  {d.source}", "", d.summary, "", "evidence:"]
    for key, value in d.evidence.items():
        if key != "keep":
            shown = (_lr(value) if key.endswith("lr") else _num(value)) if isinstance(value, float) else value
            lines.append(f"  {key:<18} {shown}")
    lines += ["", "findings over time:" if d.findings else "findings: none"]
    for f in sorted(d.findings, key=lambda f: (f.step is None, f.step or 0)):
        where = f"step {f.step}" if f.step is not None else "run"
        lines.append(f"  {where:<11} {_paint(f'{f.severity:<8}', f.severity, color)} {f.title}")
    causes, fixes = _ranked_advice(d.findings)
    if causes:
        lines += ["", "likely causes (most likely first):"] + [f"  {i}. {c}" for i, c in enumerate(causes, 1)]
    if fixes:
        lines += ["", "fixes (try in this order):"]
        for i, fix in enumerate(fixes, 1):
            lines += [f"  {i}. {_paint(fix.change, 'bold', color) if fix.change else '(no config change)'}",
                      f"     {fix.why}"]
    keep = _paint(d.best_checkpoint, "bold", color) if d.best_checkpoint else "-"
    lines += ["", f"checkpoint to keep: {keep} ({d.evidence.get('keep', '')})"]
    return "\n".join(lines)


def _ranked_advice(findings: list[Finding]) -> Advice:
    """Causes and fixes of warning/error findings, worst and latest (best informed) first, no repeats."""
    causes: list[str] = []
    fixes: list[Fix] = []
    seen: set[str] = set()  # the setting a fix changes (or its advice), else the cause text
    for f in sorted(findings, key=lambda f: (-SEVERITY_RANK[f.severity], -(f.step or 0))):
        if f.severity == "info":
            continue
        # The doctor's own findings pair each cause with its fix; others may not.
        pairs = (list(zip(f.causes, f.fixes, strict=True)) if len(f.causes) == len(f.fixes)
                 else [(c, None) for c in f.causes] + [(None, x) for x in f.fixes])
        for cause, fix in pairs:
            key = ((fix.change or "").split("=")[0] or fix.why) if fix else cause
            if key not in seen:
                seen.add(key)
                causes += [cause] if cause else []
                fixes += [fix] if fix else []
    return causes, fixes


def append_findings(path: Path, findings: list[Finding]) -> None:
    """Append findings to a findings.jsonl file, one JSON object per line (NaN stays NaN)."""
    with open(path, "a", encoding="utf-8") as fh:
        for finding in findings:
            fh.write(json.dumps(finding.to_dict(), default=str) + "\n")


def read_findings(path: Path) -> list[Finding]:
    """Read findings.jsonl; a missing file means no findings yet."""
    path = Path(path)
    if not path.is_file():
        return []
    findings = []
    for lineno, record in _json_lines(path):
        try:
            findings.append(Finding.from_dict(record))
        except KeyError as exc:
            raise DoctorError(f"{path}:{lineno}: finding has no {exc}; expected severity, code and "
                              "title") from None
    return findings
