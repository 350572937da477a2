"""Masking rule: batches that train no token.

- no_trainable_tokens: a step whose batch trained no token (every label -100; its loss is 0/0 = NaN)
  is no signal, not a divergence: warning at the first such step, error at NO_SIGNAL_POINTS in a row
  (or when no step of the run trained a token). Only logs that count trained tokens (metrics.jsonl)
  show it; the live monitor stops the run at the error.
- nothing_trained: the loss is logged as exactly 0.0 with a grad norm of exactly 0.0, or from the first
  log on (no step ever had a real loss; a finite grad norm there is the rounding of a loss under the
  log's 4 decimals: the trained tokens are ones the model already predicts): nothing is trained. Warning
  at the first such point, error at ZERO_POINTS in a row (or when the run has no other loss).
- weights_unchanged: each batch's loss equals, within REPEAT_TOLERANCE, the loss logged at the same place
  of the epoch before, for REPEAT_POINTS logs in a row (a loss logged as 0.0 breaks the row; and the
  losses are not all one value): the same batches through the same weights. Nothing is being trained,
  though each loss is real. Only data that is not reshuffled each epoch shows it (custom loops,
  `shuffle=False`); error at once. The same batch through the same weights gives the same gradient
  too: where both points log a grad norm, it must repeat within REPEAT_TOLERANCE as well (a loss
  rounded to the log's 4 decimals repeats by chance at tiny values, 0.0013 against 0.0013, while the
  grad norms show the weights moved).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tunewise.doctor.advice import frozen_weights_advice, masking_advice, nothing_trained_advice
from tunewise.doctor.findings import Finding, Severity, num

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

NO_SIGNAL_POINTS = 10  # steps in a row with no trained token before "nothing to learn" is an error
ZERO_POINTS = 3  # logs in a row of loss 0.0 with grad_norm 0.0 before "nothing trained" is an error
REPEAT_POINTS = 4  # points in a row that repeat the loss one epoch before: the weights are not changing
REPEAT_TOLERANCE = 1e-5  # relative: a frozen model repeats its losses to the last logged digit


def _same(now: float | None, before: float | None) -> bool:
    """Equal within REPEAT_TOLERANCE (relative); a value missing on either side does not contradict."""
    if now is None or before is None:
        return True
    return abs(now - before) <= REPEAT_TOLERANCE * abs(before)


class MaskingRules:
    """The masking family: counts the steps in a row that trained no token."""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.untrained: list[int] = []  # the current run of steps that trained no token
        self.zeros: list[tuple[int, float | None]] = []  # the current run of (step, grad norm) at loss 0.0
        # (epoch, place in it) -> (step, loss, grad norm)
        self.by_place: dict[tuple[int, float], tuple[int, float, float | None]] = {}
        self.repeats: list[tuple[int, int, float]] = []  # a run of (step, its step an epoch before, loss)

    def trained(self, step: int) -> None:
        """A step that trained tokens (or does not say) ends a run of untrained steps."""
        self.untrained = []
        self.watch.close("no_trainable_tokens", step)

    def on_untrained(self, step: int) -> list[Finding]:
        """A step that trained no token: warn when such steps begin, an error when they go on."""
        self.untrained.append(step)
        if self.watch.open("no_trainable_tokens", step):
            return [self._finding("warning")]
        if len(self.untrained) == NO_SIGNAL_POINTS and not self.watch.fired("no_trainable_tokens", "error"):
            return [self._finding("error")]
        return []

    def loss_seen(self, step: int) -> None:
        """A real (non-zero) loss ends a run of zero-loss logs."""
        self.zeros = []
        self.watch.close("nothing_trained", step)

    def on_zero_loss(self, step: int, grad_norm: float | None) -> list[Finding]:
        """Loss exactly 0.0 with nothing behind it: warn when such logs begin, an error when they go on."""
        self.zeros.append((step, grad_norm))
        if self.watch.open("nothing_trained", step):
            return [self._zero_finding("warning")]
        if len(self.zeros) == ZERO_POINTS and not self.watch.fired("nothing_trained", "error"):
            return [self._zero_finding("error")]
        return []

    def check_repeat(
        self, step: int, loss: float, epoch: float | None, grad_norm: float | None = None
    ) -> list[Finding]:
        """A finite, non-zero loss: does it (and its grad norm, where both are logged) repeat the one at the
        same place of the epoch before?"""
        if loss == 0.0:  # (a memorized loss rounded to 0.0 says nothing, and breaks the row)
            self.repeats = []
            return []
        if epoch is None or not math.isfinite(epoch):
            return []
        whole = math.floor(epoch + 1e-9)
        place = round(epoch - whole, 3)
        self.by_place[(whole, place)] = (step, loss, grad_norm)
        earlier = self.by_place.get((whole - 1, place))
        if earlier is None:
            return []
        if not (_same(loss, earlier[1]) and _same(grad_norm, earlier[2])):
            self.repeats = []
            return []
        self.repeats.append((step, earlier[0], loss))
        varied = len({repeated for _, _, repeated in self.repeats}) > 1  # not one value memorized everywhere
        if len(self.repeats) >= REPEAT_POINTS and varied and not self.watch.fired("weights_unchanged"):
            return [self._repeat_finding()]
        return []

    def finish(self) -> list[Finding]:
        """A run in which no step trained a token (or had a loss) is an error, however short."""
        w = self.watch
        if self.untrained and not w.losses and not w.fired("no_trainable_tokens", "error"):
            return [self._finding("error")]
        if self.zeros and not w.losses and not w.fired("nothing_trained", "error"):
            return [self._zero_finding("error")]
        return []

    def _zero_finding(self, severity: Severity) -> Finding:
        (first, _), (last, grad) = self.zeros[0], self.zeros[-1]
        n = len(self.zeros)
        grads = "no grad_norm logged" if grad is None else f"grad_norm {num(grad)}"
        before = self.watch.losses[-1] if self.watch.losses else None
        since = f"after {num(before[1])} at step {before[0]}" if before else "from the first log"
        if severity == "warning":
            title = f"loss is exactly 0.0 with {grads} at step {first} ({since}): nothing is being trained"
        else:
            what = "the trained tokens leave nothing to learn" if grad else "no gradient reaches the weights"
            title = (
                f"loss is exactly 0.0 with {grads} at {n} logs in a row (steps {first}-{last}, {since}): "
                f"{what}, nothing is trained"
            )
        evidence = {
            "step": last,
            "loss": 0.0,
            "grad_norm": grad,
            "zero_loss_points": n,
            "first_step": first,
            "last_real_loss": before[1] if before else None,
            "lr": self.watch.peak_lr,
        }
        advice = nothing_trained_advice(self.watch.peak_lr, gradient=bool(grad))
        return Finding(last, severity, "nothing_trained", title, evidence, *advice)

    def _repeat_finding(self) -> Finding:
        (first, first_before, _), (last, last_before, _) = self.repeats[0], self.repeats[-1]
        title = (
            f"the loss at steps {first}-{last} repeats, batch for batch, the loss one epoch earlier (steps "
            f"{first_before}-{last_before}): the same batches meet the same weights, nothing is being trained"
        )
        evidence = {
            "step": last,
            "repeated_points": len(self.repeats),
            "pairs": [[s, before, loss] for s, before, loss in self.repeats[:8]],
            "lr": self.watch.peak_lr,
        }
        advice = frozen_weights_advice(self.watch.peak_lr)
        return Finding(last, "error", "weights_unchanged", title, evidence, *advice)

    def _finding(self, severity: Severity) -> Finding:
        first, last, n = self.untrained[0], self.untrained[-1], len(self.untrained)
        if severity == "warning":
            title = (
                f"step {first} trained no token: every label in its batch is -100, so its loss is 0/0 "
                "(NaN) and its update was skipped"
            )
        else:
            span = f"steps {first}-{last}" if n > 1 else f"step {first}"
            title = (
                f"no token was trained in {n} steps in a row ({span}): every label is -100, there is "
                "nothing to learn"
            )
        evidence = {
            "step": last,
            "trained_tokens": 0,
            "steps_without_trained_tokens": n,
            "first_step": first,
            "lr": self.watch.peak_lr,
        }
        return Finding(last, severity, "no_trainable_tokens", title, evidence, *masking_advice())
