"""Masking rule: batches that train no token.

- no_trainable_tokens: a step whose batch trained no token (every label -100; its loss is 0/0 = NaN)
  is no signal, not a divergence: warning at the first such step, error at NO_SIGNAL_POINTS in a row
  (or when no step of the run trained a token). Only logs that count trained tokens (metrics.jsonl)
  show it; the live monitor stops the run at the error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunewise.doctor.advice import masking_advice
from tunewise.doctor.findings import Finding, Severity

if TYPE_CHECKING:
    from tunewise.doctor.watcher import CurveWatcher

NO_SIGNAL_POINTS = 10  # steps in a row with no trained token before "nothing to learn" is an error


class MaskingRules:
    """The masking family: counts the steps in a row that trained no token."""

    def __init__(self, watch: CurveWatcher):
        self.watch = watch
        self.untrained: list[int] = []  # the current run of steps that trained no token

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

    def finish(self) -> list[Finding]:
        """A run in which no step trained a token is an error, however short."""
        if self.untrained and not self.watch.losses and not self.watch.fired("no_trainable_tokens", "error"):
            return [self._finding("error")]
        return []

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
