"""The doctor's coordinator: `CurveWatcher` sees a run point by point and feeds each rule family.

The live monitor (tunewise.training.monitor) feeds it every optimizer step; `diagnose.diagnose_curve`
replays a logged run through it. The rules live by family, each in its own module with its
thresholds ("point" = one logged train entry: each optimizer step live, each `logging_steps` in a
Trainer log):

- divergence.py: non-finite values, loss spikes and explosions, degradation, gradient-norm spikes;
- progress.py: a loss that is not falling early on, flat, or swinging without a trend;
- masking.py: batches that train no token, a loss of 0.0 with no gradient;
- overfitting.py: eval rising, a growing train-eval gap, memorization, epoch-boundary drops, eval
  degradation and NaN evals.

The watcher holds what they share: the run's facts, the finite losses seen, the findings so far and
the open episodes. One finding per code per episode: an episode (non-finite values, a spike, eval
rising) opens when a rule fires and closes when the curve is back; closed ones are in `recovered`.
"""

from __future__ import annotations

import logging

from tunewise.doctor.curve import Curve, EvalPoint, TrainPoint, finite
from tunewise.doctor.divergence import DivergenceRules
from tunewise.doctor.findings import Finding, Severity
from tunewise.doctor.masking import MaskingRules
from tunewise.doctor.overfitting import OverfittingRules
from tunewise.doctor.progress import ProgressRules

logger = logging.getLogger(__name__)

WATCHER_KEYS = (
    "method",
    "learning_rate",
    "max_grad_norm",
    "warmup_steps",
    "total_steps",
    "steps_per_epoch",
    "vocab_size",
    "precision",
)


class CurveWatcher:
    """The doctor's rules, fed one point at a time; each observe_* returns only new findings."""

    def __init__(
        self,
        method: str | None = None,
        learning_rate: float | None = None,
        max_grad_norm: float | None = None,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        vocab_size: int | None = None,
        precision: str | None = None,
    ):
        self.method = method.lower() if method else None
        self.learning_rate, self.max_grad_norm, self.warmup_steps = learning_rate, max_grad_norm, warmup_steps
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.vocab_size = vocab_size  # ln(vocab_size) is the loss of a model that knows nothing
        self.precision = precision  # bf16 | fp16 | fp32 (None: unknown): the overflow fixes depend on it
        self.findings: list[Finding] = []
        self.open_episodes: dict[str, int] = {}  # code -> step it began
        self.recovered: list[tuple[str, int, int]] = []  # (code, began, ended)
        self.losses: list[tuple[int, float]] = []  # every finite (step, loss)
        self.peak_lr: float | None = None
        self.zero_tokens = False  # some step trained no token
        self.last_step = 0
        self.divergence = DivergenceRules(self)
        self.progress = ProgressRules(self)
        self.masking = MaskingRules(self)
        self.overfitting = OverfittingRules(self)

    def observe_train(
        self,
        step: int,
        loss: float,
        grad_norm: float | None,
        lr: float | None,
        epoch: float | None,
        trainable_tokens: int | None = None,
    ) -> list[Finding]:
        """Check one optimizer (or logged) step; returns the findings it raised."""
        self.last_step = step
        if finite(lr):
            self.peak_lr = max(self.peak_lr or 0.0, lr)
        self.zero_tokens |= trainable_tokens == 0
        hidden = self.divergence.hides_nan(loss, grad_norm)
        loss_bad = hidden or not finite(loss)
        grad_bad = grad_norm is not None and not finite(grad_norm)
        # 0.0 with no gradient, or before any real loss (whatever the finite gradient): nothing trained, not a
        # fall. No loss starts below the log's 4 decimals on real data; a gradient there is only rounding's.
        untrained_zero = loss == 0.0 and (grad_norm == 0.0 or not self.losses)
        if trainable_tokens != 0:
            self.masking.trained(step)
        if trainable_tokens == 0 and (loss_bad or grad_bad or loss == 0.0):
            new = self.masking.on_untrained(step)  # 0/0: nothing to learn, not a divergence
        elif loss_bad:
            new = self.divergence.on_non_finite(step, loss, grad_norm, lr, trainable_tokens)
        elif untrained_zero and not grad_bad:
            new = self.masking.on_zero_loss(step, grad_norm)
        else:
            new = self._observe_finite(step, loss, grad_norm, lr, epoch, grad_bad)
        self.findings += new
        return new

    def _observe_finite(
        self,
        step: int,
        loss: float,
        grad_norm: float | None,
        lr: float | None,
        epoch: float | None,
        grad_bad: bool,
    ) -> list[Finding]:
        """A finite loss (its grad norm may be an overflow): every rule that reads the curve."""
        self.masking.loss_seen(step)
        if grad_bad:
            new = self.divergence.on_grad_non_finite(step, loss, grad_norm, lr)
        else:
            new = []
            self.divergence.grad_finite(step)
            self.close("non_finite", step)
        if "non_finite" in self.open_episodes:
            return new
        new += self.divergence.check_loss(step, loss)
        new += [] if grad_bad else self.divergence.check_grad_norm(step, grad_norm)
        self.losses.append((step, loss))
        self.divergence.record(step, loss)
        self.overfitting.record(step, loss, epoch)
        new += self.progress.check(step) + self.divergence.check_degradation(step)
        new += self.masking.check_repeat(step, loss, epoch, None if grad_bad else grad_norm)
        return new + self.overfitting.check_epoch_drop(step)

    def observe_eval(self, step: int, eval_loss: float | None, epoch: float | None) -> list[Finding]:
        """Check one evaluation; returns the findings it raised."""
        if not finite(eval_loss) and "non_finite" in self.open_episodes:
            return []  # it follows a non-finite train loss, which is reported already
        new = self.overfitting.observe_eval(step, eval_loss, epoch)
        self.findings += new
        return new

    def replay(self, curve: Curve, upto: int | None = None) -> list[Finding]:
        """Feed a logged curve (up to step `upto`) point by point; returns the findings it raised.

        The live monitor calls it on `--resume` and after a recovery, so the rules keep the history
        (the losses, the episodes, the once-per-run findings) of the steps logged before the restart.
        """
        new: list[Finding] = []
        # Trainer evaluates after logging the train loss of the same step.
        for point in sorted([*curve.train, *curve.eval], key=lambda p: (p.step, isinstance(p, EvalPoint))):
            if upto is not None and point.step > upto:
                break
            if isinstance(point, TrainPoint):
                new += self.observe_train(
                    point.step, point.loss, point.grad_norm, point.lr, point.epoch, point.trainable_tokens
                )
            else:
                new += self.observe_eval(point.step, point.eval_loss, point.epoch)
        return new

    def finish(self) -> list[Finding]:
        """End-of-run checks: a spike that never came back, nothing trained, a loss that stayed flat."""
        new = (
            self.divergence.finish()
            + self.masking.finish()
            + self.progress.finish()
            + self.overfitting.finish()
        )
        self.findings += new
        return new

    @property
    def end_change(self) -> float | None:
        """Relative change of the loss from the start to the end of the run; set by finish()."""
        return self.progress.end_change

    @property
    def flat_at_end(self) -> bool:
        return self.progress.flat_at_end

    @property
    def nothing_trained(self) -> bool:
        """No token (or no weight) trained for many steps in a row (or at all), and no falling loss after."""
        untrained = any(self.fired(code, "error") for code in ("no_trainable_tokens", "nothing_trained"))
        if self.fired("weights_unchanged"):  # real losses, so the loss may have fallen in the first epoch
            return True
        return untrained and (self.end_change is None or self.flat_at_end)

    def trouble_began(self, step: int) -> int:
        """The step where the climb that ended in a divergence at `step` began (see divergence.py)."""
        return self.divergence.trouble_began(step)

    # -- episodes, shared by every family
    def open(self, code: str, step: int) -> bool:
        """Open an episode; False when one with this code is open already (no repeated findings)."""
        if code in self.open_episodes:
            return False
        self.open_episodes[code] = step
        return True

    def close(self, code: str, step: int) -> None:
        if code in self.open_episodes:
            self.recovered.append((code, self.open_episodes.pop(code), step))

    def fired(self, code: str, severity: Severity | None = None) -> bool:
        """Whether a finding with this code (and severity) was raised already: the once-per-run rules."""
        return any(f.code == code and severity in (None, f.severity) for f in self.findings)
